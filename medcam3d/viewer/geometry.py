"""medcam3d's napari world: millimetres along (S, P, L), reached from RAS affines.

napari shows the last two world axes of a 2-D view with the first running down the screen and the second to the
right, and it slices a layer only when each data axis maps onto one world axis (an affine that swaps axes is
singular on the displayed plane). Every scan and map is therefore shown in one fixed world::

    world = (z, -y, -x) of RAS mm = (superior, posterior, patient-left) mm          (MONAI axcodes "SPL")

so the default 2-D view is an axial slice in radiological convention (anterior up, the patient's right on the
screen's left) with the slider running inferior→superior, as on the network grid (docs/architecture.md). An array
is shown through a transposed view (no copy) whose axes follow the world axes, with the affine
``RAS_TO_WORLD @ affine @ P`` (``P`` the axis permutation); flips stay in the affine as negative voxel sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..io.volume import validate_affine

__all__ = ["RAS_TO_WORLD", "WORLD_AXES", "WORLD_TO_RAS", "Placed", "place", "ras_affine"]

WORLD_AXES: tuple[str, str, str] = ("S", "P", "L")
"""Names of the napari world axes (millimetres)."""

RAS_TO_WORLD = np.array(
    [[0.0, 0.0, 1.0, 0.0],  # S = z
     [0.0, -1.0, 0.0, 0.0],  # P = -y
     [-1.0, 0.0, 0.0, 0.0],  # L = -x
     [0.0, 0.0, 0.0, 1.0]]
)
"""4x4: RAS mm -> napari world mm."""

WORLD_TO_RAS = RAS_TO_WORLD.T.copy()
"""4x4: napari world mm -> RAS mm (the inverse of a signed permutation is its transpose)."""


@dataclass(frozen=True)
class Placed:
    """An array ready for napari.

    Attributes:
        data: the array, transposed (a view) so that data axis ``d`` runs along world axis ``d``.
        affine: 4x4 float64, ``data`` index -> world mm (napari's ``affine=``).
        axes: data axis ``d`` is axis ``axes[d]`` of the source array.
    """

    data: np.ndarray
    affine: np.ndarray
    axes: tuple[int, int, int]


def place(array: np.ndarray, affine: np.ndarray) -> Placed:
    """Place a 3-D ``array`` with its RAS ``affine`` (index -> RAS mm) in the napari world (no copy)."""
    from nibabel.orientations import io_orientation

    world = RAS_TO_WORLD @ validate_affine(affine, "affine")
    to_world = io_orientation(world)[:, 0].astype(int)  # source axis -> the world axis it runs along
    axes = tuple(int(a) for a in np.argsort(to_world))  # world axis -> source axis
    perm = np.eye(4)
    perm[:3, :3] = 0.0
    for d, source_axis in enumerate(axes):
        perm[source_axis, d] = 1.0  # data index d is source index axes[d]
    return Placed(np.transpose(np.asarray(array), axes), world @ perm, axes)  # type: ignore[arg-type]


def ras_affine(world_affine: np.ndarray) -> np.ndarray:
    """The RAS affine of a napari layer's data, from its data -> world affine."""
    return WORLD_TO_RAS @ np.asarray(world_affine, dtype=np.float64)
