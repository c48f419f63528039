"""Feature-grid maps sampled directly on the scan's own grid: no network-grid volume, no per-class inverse.

A scan voxel at index ``x = (i, j, k)`` lies at RAS position ``A_scan x``. When the preprocessing is purely
affine-geometric (reorientation, resampling to a spacing, padding and cropping -- the shipped configs), the network
grid is the scan resampled through its affine, so the same point is network-grid index ``g = inv(A_grid) A_scan x``
(``A_grid``: the preprocessed MetaTensor's affine), and, through the map's placement (cell ``i`` of axis ``d`` centred
at grid voxel ``offset[d] + stride[d] i``, :class:`~medcam3d.geometry.MapGeometry`), cell coordinate
``u = (g − offset) / stride``. The display value there is the map interpolated by the placement's rule
(:func:`medcam3d.geometry.cell_weights`): linear between neighbouring cell centres, the edge cell's value within half
a cell beyond the outermost centres, 0 further out (*uncovered*: no cell sits there).

:class:`ScanSampler` evaluates that on every scan voxel, a slab of slices (along the scan's last axis) and a
chunk of maps at a time, so memory stays bounded on a 512 x 512 x 300 scan:

* **separable** when ``x -> u`` is a permuted diagonal (each scan axis moves one map axis: every scan that is not
  oblique to the network grid, which the shipped configs keep aligned to the scan): three small per-axis weight
  matrices, contracted in the cheapest order;
* **general** otherwise (oblique): trilinear ``grid_sample`` between cell centres (``align_corners=True``, edge
  values held), times the covered mask.

:func:`affine_reason` says whether the fast path applies to a preprocessed scan; otherwise the caller falls back to
MONAI's inverse (:meth:`medcam3d.preprocess.Preprocessor.invert`). Slabs come out as uint8 display values
``round(255 h)`` laid out ``[C, slices, J, I]``, i.e. each map's slab is the Fortran-order bytes of the scan array
(NIfTI's voxel order), ready to compress.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import MapGeometry, cell_weights

__all__ = [
    "AFFINE_OPERATIONS",
    "ScanSampler",
    "affine_reason",
    "covered_axis",
    "voxel_to_cells",
]

#: MONAI operations (as recorded in ``applied_operations``) after which the network grid is the scan resampled
#: through the grid's affine: ``value(g) = scan(inv(A_scan) A_grid g)`` (interpolated). Spacing records itself as
#: ``SpatialResample``; intensity transforms are not recorded (they do not move voxels).
AFFINE_OPERATIONS = frozenset({
    "Orientation", "Spacing", "SpatialResample", "Flip",
    "ResizeWithPadOrCrop", "SpatialPad", "BorderPad", "DivisiblePad",
    "SpatialCrop", "CenterSpatialCrop", "CenterScaleCrop", "CropForeground",
})

#: a slab holds about this many scan voxels per map (a multiple of whole slices): ~4 MB of uint8 per map, one gzip
#: member each; independent of the thread count and of the number of maps, so outputs are reproducible
SLAB_VOXELS = 1 << 22
#: off-diagonal coefficients that move ``u`` by less than this many cells across the whole scan are treated as 0
_DRIFT = 1e-4


def covered_axis(u: np.ndarray, n_cells: int) -> np.ndarray:
    """Where positions ``u`` (cell units, any shape) are covered along an axis of ``n_cells`` cells:
    ``−0.5 <= u <= n − 0.5`` (bool, same shape)."""
    return (u >= -0.5) & (u <= n_cells - 0.5)


def voxel_to_cells(scan_affine: Any, grid_affine: Any, geometry: MapGeometry) -> np.ndarray:
    """``[3, 4]`` float64 map from a scan voxel index ``(i, j, k, 1)`` to the map's cell coordinates ``u``:
    ``u = (inv(A_grid) A_scan x − offset) / stride`` (``geometry`` on the network grid)."""
    to_grid = np.linalg.inv(np.asarray(grid_affine, dtype=np.float64)) @ np.asarray(scan_affine, dtype=np.float64)
    offset = np.asarray(geometry.offset, dtype=np.float64)
    stride = np.asarray(geometry.stride, dtype=np.float64)
    if offset.shape != (3,):
        raise ValueError(f"a placement with {offset.size} axes cannot be drawn on a 3-D scan")
    out = to_grid[:3].copy()
    out[:, 3] -= offset
    return out / stride[:, None]


def affine_reason(grid: Any, scan_affine: Any, scan_shape: Sequence[int]) -> str | None:
    """None when the network grid ``grid`` (the preprocessed MetaTensor of a scan with ``scan_affine`` and
    ``scan_shape``) is that scan resampled through the grid's affine, so :class:`ScanSampler` applies; otherwise
    why not (a non-affine operation, or a grid that does not come from this scan)."""
    ops = getattr(grid, "applied_operations", None)
    if ops is None or not hasattr(grid, "affine"):
        return "the network grid carries no record of its preprocessing"
    for op in ops:
        name = op.get("class") if isinstance(op, Mapping) else None
        if name not in AFFINE_OPERATIONS:
            return f"the preprocessing applies {name or 'an unrecorded operation'}"
    meta = getattr(grid, "meta", {}) or {}
    original = meta.get("original_affine")
    shape = meta.get("spatial_shape")
    if original is not None and not np.allclose(np.asarray(original, dtype=np.float64), scan_affine, atol=1e-4):
        return "the network grid was made from another grid than the scan's"
    if shape is not None and tuple(int(s) for s in np.asarray(shape).tolist()) != tuple(int(s) for s in scan_shape):
        return "the network grid was made from another shape than the scan's"
    return None


def _permutation(to_cells: np.ndarray, scan_shape: Sequence[int]) -> tuple[int, ...] | None:
    """For each scan axis the one map axis it moves, when ``to_cells`` is a permuted diagonal (off-diagonal terms
    drifting by less than :data:`_DRIFT` cells across the scan); None for an oblique mapping."""
    m = to_cells[:, :3]
    extent = np.maximum(np.asarray(scan_shape, dtype=np.float64) - 1.0, 1.0)
    drift = np.abs(m) * extent[None, :]  # [map axis, scan axis]
    perm = tuple(int(d) for d in np.argmax(drift, axis=0))
    if sorted(perm) != [0, 1, 2]:
        return None
    off = drift.copy()
    off[list(perm), [0, 1, 2]] = 0.0
    return perm if float(off.max()) < _DRIFT else None


class ScanSampler:
    """Display maps on the scan grid, slab by slab.

    Args:
        to_cells: ``[3, 4]`` scan voxel index -> cell coordinates (:func:`voxel_to_cells`).
        map_size: the maps' spatial size ``(n0, n1, n2)`` (feature resolution, network-grid axis order).
        scan_shape: ``(I, J, K)``.
        slab_voxels: about how many scan voxels one slab holds per map (whole slices along K).
    """

    def __init__(self, to_cells: np.ndarray, map_size: Sequence[int], scan_shape: Sequence[int],
                 slab_voxels: int = SLAB_VOXELS) -> None:
        self.to_cells = np.asarray(to_cells, dtype=np.float64)
        self.map_size = tuple(int(n) for n in map_size)
        self.scan_shape = tuple(int(n) for n in scan_shape)
        if len(self.map_size) != 3 or len(self.scan_shape) != 3:
            raise ValueError(f"map_size {self.map_size} and scan_shape {self.scan_shape} must have 3 axes")
        self.perm = _permutation(self.to_cells, self.scan_shape)
        i, j, _ = self.scan_shape
        self.slab = max(1, int(slab_voxels) // (i * j))
        self._weights: list[Tensor] = []
        self._buffer = torch.empty(0, dtype=torch.float32)  # reused between slabs: fresh memory costs page faults
        if self.perm is not None:
            for a, d in enumerate(self.perm):
                x = torch.arange(self.scan_shape[a], dtype=torch.float64)
                u = self.to_cells[d, a] * x + self.to_cells[d, 3]
                self._weights.append(cell_weights(u, self.map_size[d]).to(torch.float32))

    @property
    def separable(self) -> bool:
        """True when each scan axis moves one map axis (per-axis weight matrices)."""
        return self.perm is not None

    def cells_at(self, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Cell coordinates ``[..., 3]`` (float64) of scan voxels at indices ``i, j, k`` (broadcast together)."""
        t = self.to_cells
        x = [np.asarray(v, dtype=np.float64) for v in (i, j, k)]
        return np.stack(np.broadcast_arrays(*[t[d, 0] * x[0] + t[d, 1] * x[1] + t[d, 2] * x[2] + t[d, 3]
                                              for d in range(3)]), axis=-1)

    def covered_at(self, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Bool (shape of ``i``): whether a cell sits at scan voxels ``(i, j, k)`` (within half a cell of the
        outermost centres on every axis)."""
        u = self.cells_at(i, j, k)
        return np.logical_and.reduce([covered_axis(u[..., d], n) for d, n in enumerate(self.map_size)])

    def slabs(self, maps: Tensor, out: np.ndarray | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(k0, k1, uint8 [C, k1 − k0, J, I])``: ``round(255 h)`` of the display maps ``maps``
        ``[C, *map_size]`` (values in [0, 1]) at scan slices ``k0 .. k1 − 1``, 0 where uncovered. With ``out``
        (uint8 ``[C, K, J, I]``, C-contiguous) the slabs are written into it and the views yielded."""
        if tuple(maps.shape[1:]) != self.map_size:
            raise ValueError(f"maps have shape {tuple(maps.shape)}; expected [C, {self.map_size}]")
        i, j, k = self.scan_shape
        if out is None:
            out = np.empty((maps.shape[0], k, j, i), dtype=np.uint8)
        elif out.shape != (maps.shape[0], k, j, i) or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous uint8 of shape {(maps.shape[0], k, j, i)}")
        # 255 h + 0.5 on the cells: covered weights sum to 1, so a covered voxel gets 255 h + 0.5 in [0.5, 255.5]
        # (floored by the conversion to uint8: rounded) and an uncovered one exactly 0 -- no clamping needed
        scaled = maps.detach().to("cpu", torch.float32) * 255.0 + 0.5
        target = torch.from_numpy(out)
        for k0 in range(0, k, self.slab):
            k1 = min(k0 + self.slab, k)
            values = self._slab_separable(scaled, k0, k1) if self.separable else self._slab_general(scaled, k0, k1)
            target[:, k0:k1].copy_(values)  # float32 -> uint8 truncates: one pass
            yield k0, k1, out[:, k0:k1]

    def _slab_buffer(self, shape: tuple[int, ...]) -> Tensor:
        """A float32 scratch tensor of ``shape``, reusing one buffer between slabs."""
        n = math.prod(shape)
        if self._buffer.numel() < n:
            self._buffer = torch.empty(n, dtype=torch.float32)
        return self._buffer[:n].view(shape)

    def _slab_separable(self, scaled: Tensor, k0: int, k1: int) -> Tensor:
        """``[C, k1 − k0, J, I]`` float32 by three per-axis contractions (in a reused buffer)."""
        assert self.perm is not None
        pi, pj, pk = self.perm
        w_i, w_j, w_k = self._weights
        m = scaled.permute(0, 1 + pk, 1 + pj, 1 + pi)  # [C, nK, nJ, nI]
        t = torch.einsum("kp,cpqr->ckqr", w_k[k0:k1], m)  # [C, ks, nJ, nI]
        c, ks, n_j, n_i = t.shape
        out = self._slab_buffer((c, ks, w_j.shape[0], w_i.shape[0]))
        if n_i <= max(16, n_j):
            # J, then I as the last step: one large matrix product [C ks J, nI] @ [nI, I], nI multiply-adds a voxel
            rows = torch.tensordot(w_j, t, dims=([1], [2])).permute(1, 2, 0, 3)  # [C, ks, J, nI], small
            torch.mm(rows.reshape(-1, n_i), w_i.T, out=out.view(-1, w_i.shape[0]))
        else:  # many map cells along I: contract them while the slab is small
            torch.matmul(w_j, torch.matmul(t, w_i.T), out=out)
        return out

    def _slab_general(self, scaled: Tensor, k0: int, k1: int) -> Tensor:
        """``[C, k1 − k0, J, I]`` float32 by trilinear sampling between cell centres, times the covered mask."""
        i_n, j_n, _ = self.scan_shape
        k, j, i = np.meshgrid(np.arange(k0, k1), np.arange(j_n), np.arange(i_n), indexing="ij", sparse=True)
        u = self.cells_at(i, j, k)  # [ks, J, I, 3]
        covered = torch.from_numpy(np.logical_and.reduce(
            [covered_axis(u[..., d], n) for d, n in enumerate(self.map_size)]))
        norm = np.empty_like(u)
        for d, n in enumerate(self.map_size):  # grid_sample with align_corners=True: -1 is cell 0, +1 cell n - 1
            norm[..., d] = 0.0 if n == 1 else 2.0 * np.clip(u[..., d], 0.0, n - 1.0) / (n - 1.0) - 1.0
        grid = torch.from_numpy(norm[..., ::-1].astype(np.float32))[None]  # grid_sample wants (x=W, y=H, z=D)
        out = F.grid_sample(scaled[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        return out * covered[None]
