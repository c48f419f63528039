"""Voxel grid, affine and smooth random fields of the phantoms (internal).

The anatomy is designed in a *reference field of view* of ``REF_FOV_MM`` = 300 × 320 × 320 mm (slice, row, column),
in "reference millimetres" centred on the field of view. A grid of any shape and spacing maps its voxel centres
into that box, so the chest always fills the field of view the way it fills a 320 mm chest CT; the affine carries
the grid's true spacing. With the default spacing (``REF_FOV_MM / shape``) reference mm are real mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FOV_CENTRE_RAS", "REF_FOV_MM", "Grid", "smooth_field"]

REF_FOV_MM: tuple[float, float, float] = (300.0, 320.0, 320.0)
"""Extent in mm (inferior→superior, anterior→posterior, right→left) of the reference field of view."""

FOV_CENTRE_RAS: tuple[float, float, float] = (0.0, -20.0, -170.0)
"""World (RAS mm) position of the centre of every phantom's field of view (a table-centred scanner frame)."""


@dataclass(frozen=True)
class Grid:
    """A voxel grid ``[S, H, W]`` in MONAI axcodes ``"SPL"`` with ``spacing`` (slice, row, column) in mm."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def axis(self, k: int) -> np.ndarray:
        """Voxel-centre coordinates along array axis ``k`` in reference mm, ``float32 [shape[k]]``.

        Increasing with the index and centred on 0: superior, posterior and patient-left are positive."""
        n, extent = self.shape[k], REF_FOV_MM[k]
        return ((np.arange(n) + 0.5) * (extent / n) - extent / 2).astype(np.float32)

    @property
    def affine(self) -> np.ndarray:
        """``float64 [4, 4]`` mapping array indices (k, j, i, 1) to RAS mm (nibabel convention).

        Slices go superior (+z), rows posterior (−y), columns to the patient's left (−x); the centre of the
        grid lies at :data:`FOV_CENTRE_RAS`."""
        ds, dr, dc = self.spacing
        s, h, w = self.shape
        cx, cy, cz = FOV_CENTRE_RAS
        return np.array(
            [
                [0.0, 0.0, -dc, cx + dc * (w - 1) / 2],
                [0.0, -dr, 0.0, cy + dr * (h - 1) / 2],
                [ds, 0.0, 0.0, cz - ds * (s - 1) / 2],
                [0.0, 0.0, 0.0, 1.0],
            ]
        )


def _axis_weights(coords: np.ndarray, extent: float, corr_mm: float) -> np.ndarray:
    """Gaussian interpolation weights ``float32 [len(coords), n_nodes]`` from a node lattice to ``coords``.

    The lattice (spacing ``corr_mm``, padded beyond the field of view) depends only on ``extent`` and
    ``corr_mm``, so the same random node values give the same field on any grid. Rows have unit norm, so
    unit-variance node values give a unit-variance field."""
    half = extent / 2 + 2 * corr_mm
    nodes = np.arange(-half, half + 1e-6, corr_mm)
    w = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / (0.8 * corr_mm)) ** 2)
    return (w / np.sqrt((w**2).sum(axis=1, keepdims=True))).astype(np.float32)


def smooth_field(rng: np.random.Generator, grid: Grid, corr_mm: float) -> np.ndarray:
    """A smooth Gaussian random field with unit variance and correlation length ``corr_mm``.

    Returns ``float32 [S, H, W]``. Made separably (three small products), so it costs about as much as one
    pass over the volume; the same ``rng`` state gives the same field, in reference mm, on any grid."""
    wz, wy, wx = (_axis_weights(grid.axis(k), REF_FOV_MM[k], corr_mm) for k in range(3))
    nodes = rng.standard_normal((wz.shape[1], wy.shape[1], wx.shape[1]), dtype=np.float32)
    field = (wz @ nodes.reshape(wz.shape[1], -1)).reshape(wz.shape[0], wy.shape[1], wx.shape[1])
    field = np.matmul(wy, field)
    return (field.reshape(-1, wx.shape[1]) @ wx.T).reshape(wz.shape[0], wy.shape[0], wx.shape[0])
