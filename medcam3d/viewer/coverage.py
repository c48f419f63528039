"""Where the network's cells sit on the scan, drawn so that "no cell here" never reads as "no evidence here".

A feature-resolution map has ``n`` cells per axis, centred at ``offset + stride * i`` voxels of the network grid
(``summary.json``: ``map_geometry``, ``map_shape``). Display heatmaps hold the edge cell's value out to half a
stride beyond the outermost centres and are 0 further out, so the *covered* region is, per axis of the network
grid, the voxel-index interval ``[offset − stride / 2, offset + stride (n − 1) + stride / 2]`` (voxel centres at
integers; :func:`medcam3d.geometry.covered_box`); the network grid's affine places it in RAS mm. For the
``"field"`` placement it is the whole field, ``[−0.5, N − 0.5]``. Everything outside it -- including any part of
the scan the preprocessing cropped away -- is *uncovered*.

The viewer draws it per pane in a shapes layer: on a 2-D slice, the covered region's outline and a grey veil over
the uncovered part of the scan (all of the slice when the slice misses the covered region); in 3-D, the covered
box's 12 edges. Pure numpy: the shapes are plain ``(vertices, shape_type)`` lists for napari's shapes layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..geometry import MapGeometry, covered_box
from ..outputs import Summary
from .geometry import RAS_TO_WORLD, Placed

__all__ = [
    "COVER_STYLE",
    "SHAPES_UNIT_MM",
    "Cover",
    "box_corners",
    "cover_shapes",
    "covered_voxels",
    "covered_world_box",
    "placed_extent",
]

#: colours (RGBA) of the drawing: the covered region's outline and the veil over the uncovered region
COVER_STYLE = {"outline": (0.0, 0.9, 1.0, 1.0), "veil": (0.55, 0.6, 0.75, 0.4), "none": (0.0, 0.0, 0.0, 0.0)}
#: outline width as a fraction of the scan's largest in-plane extent
_OUTLINE_WIDTH = 0.006
#: the shapes layer's data unit in mm (its ``scale``). napari shows a shape on a slice when its rounded out-of-plane
#: data coordinate lies within 0.5 of the slice's: in mm that misses slices at half-millimetre positions (voxel
#: centres often are), in micrometres it holds for any position given to the micrometre
SHAPES_UNIT_MM = 1e-3


def covered_voxels(summary: Summary) -> np.ndarray | None:
    """``[2, 3]``: the covered interval per network-grid axis (row 0 low, row 1 high bounds, voxel-index units;
    :func:`medcam3d.geometry.covered_box` of the recorded placement).

    None when the summary does not say (no network grid, or a placement other than ``"field"`` without offsets)."""
    g, grid = summary.map_geometry, summary.network_grid
    if len(g.offset_voxels) == 3 and len(g.stride_voxels) == 3 and len(summary.map_shape) == 3:
        placement = MapGeometry(tuple(g.offset_voxels), tuple(g.stride_voxels), g.kind)
        return np.asarray(covered_box(placement, summary.map_shape), dtype=np.float64).T
    if g.kind == "field" and len(grid.shape) == 3:  # older summaries: the field covers the whole grid
        return np.stack([np.full(3, -0.5), np.asarray(grid.shape, np.float64) - 0.5])
    return None


def box_corners(bounds: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``[8, 3]``: the corners of the index box ``bounds`` (``[2, 3]``) mapped through the 4 x 4 ``affine``."""
    corners = np.array(list(itertools.product(*bounds.T)), dtype=np.float64)  # [8, 3]
    return (np.asarray(affine, np.float64) @ np.c_[corners, np.ones(8)].T)[:3].T


def covered_world_box(summary: Summary) -> np.ndarray | None:
    """``[2, 3]``: the covered region in the napari world (S, P, L) mm, as its bounding box (exact for network
    grids along the world axes; an oblique grid's covered region is a rotated box and this is its hull).
    None when the summary does not say where the cells are (see :func:`covered_voxels`)."""
    bounds, affine = covered_voxels(summary), summary.network_grid.affine
    if bounds is None or affine is None:
        return None
    world = box_corners(bounds, RAS_TO_WORLD @ np.asarray(affine, np.float64))
    return np.stack([world.min(axis=0), world.max(axis=0)])


def placed_extent(placed: Placed) -> np.ndarray:
    """``[2, 3]``: the world (S, P, L) mm box a placed array's voxels fill (voxel edges, not centres)."""
    bounds = np.stack([np.full(3, -0.5), np.asarray(placed.data.shape, np.float64) - 0.5])
    world = box_corners(bounds, placed.affine)
    return np.stack([world.min(axis=0), world.max(axis=0)])


@dataclass(frozen=True)
class Cover:
    """The shapes of one pane's drawing: ``shapes[i]`` is ``[V, 3]`` world vertices of type ``types[i]`` and role
    ``roles[i]`` (``"outline"`` or ``"veil"``, a key of :data:`COVER_STYLE`)."""

    shapes: list[np.ndarray]
    types: list[str]
    roles: list[str]

    def data(self) -> list[np.ndarray]:
        """The shapes in the shapes layer's data units (:data:`SHAPES_UNIT_MM`)."""
        return [v / SHAPES_UNIT_MM for v in self.shapes]

    def styles(self, extent: np.ndarray) -> dict[str, list]:
        """napari ``Shapes.add`` keyword arguments for these shapes (edge width scaled to the scan ``extent``, in
        data units)."""
        width = _OUTLINE_WIDTH * float(np.max(extent[1] - extent[0])) / SHAPES_UNIT_MM
        return {
            "shape_type": list(self.types),
            "edge_color": [COVER_STYLE["outline"] if r == "outline" else COVER_STYLE["none"] for r in self.roles],
            "face_color": [COVER_STYLE["veil"] if r == "veil" else COVER_STYLE["none"] for r in self.roles],
            "edge_width": [width if r == "outline" else 0.0 for r in self.roles],
        }


def _rectangle(axes: tuple[int, int], lo: np.ndarray, hi: np.ndarray, sliced: dict[int, float]) -> np.ndarray:
    """``[4, 3]``: a rectangle spanning ``lo..hi`` on the two displayed ``axes``, at the sliced coordinates."""
    a, b = axes
    out = np.zeros((4, 3))
    for axis, value in sliced.items():
        out[:, axis] = value
    out[:, a] = (lo[a], lo[a], hi[a], hi[a])
    out[:, b] = (lo[b], hi[b], hi[b], lo[b])
    return out


def _veils(box: np.ndarray, extent: np.ndarray, axes: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The part of the ``extent`` rectangle outside ``box`` (both ``[2, 3]``, box within extent) on ``axes``, as up
    to four (lo, hi) rectangles: the bands before and after the box along ``axes[0]``, then beside it."""
    a, b = axes
    out = []
    for lo_a, hi_a in ((extent[0, a], box[0, a]), (box[1, a], extent[1, a])):
        lo, hi = extent[0].copy(), extent[1].copy()
        lo[a], hi[a] = lo_a, hi_a
        out.append((lo, hi))
    for lo_b, hi_b in ((extent[0, b], box[0, b]), (box[1, b], extent[1, b])):
        lo, hi = box[0].copy(), box[1].copy()
        lo[b], hi[b] = lo_b, hi_b
        out.append((lo, hi))
    return [(lo, hi) for lo, hi in out if hi[a] > lo[a] and hi[b] > lo[b]]


def cover_shapes(box: np.ndarray | None, extent: np.ndarray, displayed: Sequence[int],
                 point: Sequence[float]) -> Cover:
    """The drawing of the covered ``box`` over a scan filling ``extent`` (both world ``[2, 3]``).

    ``displayed``: the world axes on screen (two: a slice at ``point`` along the other axis; three: 3-D, the box's
    edges). No box (placement unknown): nothing is drawn."""
    if box is None:
        return Cover([], [], [])
    clipped = np.clip(box, extent[0], extent[1])
    if len(displayed) == 3:
        corners = np.array(list(itertools.product(*clipped.T)))  # corner c: bit 2 - d set at axis d's high bound
        edges = [(i, j) for i, j in itertools.combinations(range(8), 2) if bin(i ^ j).count("1") == 1]
        return Cover([corners[[i, j]] for i, j in edges], ["line"] * len(edges), ["outline"] * len(edges))
    axes = (int(displayed[0]), int(displayed[1]))
    sliced = {d: float(point[d]) for d in range(3) if d not in axes}
    inside = all(box[0, d] <= v <= box[1, d] for d, v in sliced.items())
    if not inside or np.any(clipped[1, list(axes)] <= clipped[0, list(axes)]):  # no cell on this slice
        return Cover([_rectangle(axes, extent[0], extent[1], sliced)], ["rectangle"], ["veil"])
    veils = [_rectangle(axes, lo, hi, sliced) for lo, hi in _veils(clipped, extent, axes)]
    return Cover([*veils, _rectangle(axes, clipped[0], clipped[1], sliced)], ["rectangle"] * (len(veils) + 1),
                 ["veil"] * len(veils) + ["outline"])
