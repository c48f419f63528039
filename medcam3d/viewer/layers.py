"""napari layer-data tuples ``(data, kwargs, "image")`` for scans and maps, and how they are displayed.

Scans: grey, in a lung (W1500/L−600) or soft-tissue (W400/L40) window. Maps: :data:`MAP_COLORMAP`, saturated
colours (``plasma``: purple, magenta, orange, yellow; never white or black) whose opacity ramps up from fully
transparent at the bottom of the range, with translucent (alpha) blending -- so a map stays readable over white
soft tissue and over black air in either window, where additive blending saturates to white. The contrast limits
run from ``threshold × peak`` to the map's peak, so values at or below the threshold (and every negative value of a
signed raw map) are transparent: the display's ReLU and normalisation, done on the GPU, without touching the data.
Where no cell of the network sits (uncovered) is drawn by :mod:`.coverage`'s shapes layer (:func:`cover_layer`).
A segmentation network's predicted label map is a labels layer (:func:`segmentation_layer`) drawn between the scan
and the maps: one fixed colour per class (:data:`SEGMENTATION_COLOURS`, none of them the maps' or the outline's),
its names in the layer's features. No Qt, no napari: the tuples are plain data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import read_volume
from ..methods import METHOD_TITLES, method_title
from ..outputs import WINDOWS as CT_WINDOWS
from .coverage import SHAPES_UNIT_MM, Cover
from .folder import ClassEntry, MapImage, OutputFolder
from .geometry import WORLD_AXES, Placed, place

__all__ = [
    "DEFAULT_OPACITY",
    "DEFAULT_THRESHOLD",
    "MAP_BLENDING",
    "MAP_COLORMAP",
    "SEGMENTATION_COLOURS",
    "SEGMENTATION_OPACITY",
    "WINDOWS",
    "LayerData",
    "cover_layer",
    "folder_layers",
    "map_layer",
    "map_limits",
    "map_name",
    "method_title",
    "scan_layer",
    "segmentation_colours",
    "segmentation_layer",
    "window_limits",
]

LayerData = tuple[Any, dict[str, Any], str]

WINDOWS: tuple[str, ...] = tuple(CT_WINDOWS)
_PLASMA = ((0.255, 0.014, 0.615), (0.524, 0.025, 0.653), (0.736, 0.209, 0.528), (0.890, 0.406, 0.373),
           (0.983, 0.624, 0.228), (0.968, 0.895, 0.147))  # matplotlib's plasma at 0.1, 0.27, ..., 0.95
_ALPHA = (0.0, 0.75, 1.0, 1.0, 1.0, 1.0)
MAP_COLORMAP: dict[str, Any] = {
    "name": "medcam3d map",
    "colors": [(*rgb, a) for rgb, a in zip(_PLASMA, _ALPHA, strict=True)],
    "controls": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
}
"""The maps' colormap (napari ``colormap=`` dict): plasma's saturated colours, transparent at 0 and opaque from
0.4 of the range up (the layer's opacity then applies)."""
MAP_BLENDING = "translucent"
DEFAULT_THRESHOLD = 0.2
DEFAULT_OPACITY = 0.7
#: class colours of a segmentation (RGB; value v takes colour (v - 1) mod 8): blues, greens, reds and browns, none
#: of them the maps' plasma colours or the covered region's cyan
SEGMENTATION_COLOURS: tuple[tuple[float, float, float], ...] = (
    (0.122, 0.467, 0.706), (0.173, 0.627, 0.173), (0.839, 0.153, 0.157), (0.549, 0.337, 0.294),
    (0.498, 0.498, 0.498), (0.737, 0.741, 0.133), (0.400, 0.761, 0.647), (0.651, 0.463, 0.114))
SEGMENTATION_OPACITY = 0.35
# method_title and _TITLES stay importable from this module for one release (home: medcam3d.methods)
_TITLES = METHOD_TITLES
_WORLD = {"axis_labels": WORLD_AXES, "units": ("mm", "mm", "mm")}


def window_limits(window: str) -> tuple[float, float]:
    """Contrast limits (HU) of a CT window: ``"lung"`` or ``"soft_tissue"``."""
    if window not in CT_WINDOWS:
        raise InputError(f"unknown window {window!r} (windows: {', '.join(WINDOWS)})")
    level, width = CT_WINDOWS[window]
    return level - width / 2, level + width / 2


def map_limits(data: np.ndarray, threshold: float) -> tuple[float, float]:
    """Contrast limits showing the part of a map above ``threshold`` (a fraction of its peak, in [0, 1))."""
    if not 0.0 <= threshold < 1.0:
        raise InputError(f"threshold {threshold} is not a fraction of the peak in [0, 1)")
    peak = float(np.max(data)) if data.size else 0.0
    if peak <= 0.0:  # no positive evidence: show nothing
        return 0.0, 1.0
    return threshold * peak, peak


def map_name(entry: ClassEntry, method: str, full_resolution: bool) -> str:
    """``"HiResCAM · nodule_right_lung"``, marked when at feature resolution."""
    return f"{method_title(method)} · {entry.label}" + ("" if full_resolution else " · feature resolution")


def scan_layer(placed: Placed, name: str, window: str = "lung", source: str | None = None) -> LayerData:
    """A CT scan in a window."""
    kwargs = {"name": name, "affine": placed.affine, "colormap": "gray", "contrast_limits": window_limits(window),
              "rendering": "mip", "metadata": {"medcam3d": {"kind": "scan", "source": source}}, **_WORLD}
    return placed.data, kwargs, "image"


def map_layer(m: MapImage, name: str | None = None, threshold: float = DEFAULT_THRESHOLD,
              opacity: float = DEFAULT_OPACITY, visible: bool = True) -> LayerData:
    """A map over the scan (named by :func:`map_name` unless ``name`` is given)."""
    data = m.placed.data
    lo, hi = map_limits(data, threshold)
    kwargs = {
        "name": name or map_name(m.entry, m.method, m.full_resolution),
        "affine": m.placed.affine,
        "colormap": MAP_COLORMAP,
        "blending": MAP_BLENDING,
        "contrast_limits": (lo, hi),
        "opacity": opacity,
        "visible": visible,
        # feature-resolution maps show their blocks: that is what the model computed
        "interpolation2d": "linear" if m.full_resolution else "nearest",
        "interpolation3d": "linear" if m.full_resolution else "nearest",
        "rendering": "mip",
        "metadata": {"medcam3d": {"kind": "map", "method": m.method, "class_index": m.entry.index,
                                  "label": m.entry.label, "full_resolution": m.full_resolution, "path": str(m.path)}},
        **_WORLD,
    }
    return data, kwargs, "image"


def segmentation_colours(values: Sequence[int]) -> dict[int | None, tuple[float, float, float, float]]:
    """napari's ``colormap=`` of a labels layer: value ``v > 0`` -> :data:`SEGMENTATION_COLOURS` ``[(v - 1) mod 8]``
    (opaque; the layer's opacity applies), background 0 and any value not listed transparent."""
    clear = (0.0, 0.0, 0.0, 0.0)
    colours: dict[int | None, tuple[float, float, float, float]] = {0: clear, None: clear}
    for v in values:
        if int(v) > 0:
            colours[int(v)] = (*SEGMENTATION_COLOURS[(int(v) - 1) % len(SEGMENTATION_COLOURS)], 1.0)
    return colours


def segmentation_layer(placed: Placed, names: Mapping[int, str], name: str = "segmentation",
                       opacity: float = SEGMENTATION_OPACITY, visible: bool = True) -> LayerData:
    """The predicted segmentation as a labels layer: integer ``placed.data`` (value = output channel, 0 =
    background), coloured per class (:func:`segmentation_colours`), ``names`` (value -> class name) in its
    features (napari's status bar names the class under the cursor) and metadata."""
    values = sorted({0, *(int(v) for v in names)})
    kwargs = {"name": name, "affine": placed.affine, "opacity": opacity, "visible": visible,
              "colormap": segmentation_colours(values), "blending": "translucent",
              "features": {"index": values, "class": [names.get(v, "background" if v == 0 else str(v))
                                                      for v in values]},
              "metadata": {"medcam3d": {"kind": "segmentation", "labels": {int(k): v for k, v in names.items()}}},
              **_WORLD}
    return placed.data, kwargs, "labels"


def cover_layer(cover: Cover, extent: np.ndarray, name: str) -> LayerData:
    """The shapes layer drawing where the network's cells sit (:mod:`.coverage`): ``cover`` at first, redrawn by
    the comparison as the slice moves; ``extent`` is the scan's world box (it scales the outline width)."""
    styles = cover.styles(extent) if cover.shapes else {}  # napari warns about empty colour lists
    kwargs = {"name": name, "ndim": 3, "blending": "translucent", "opacity": 1.0, **styles,
              "scale": (SHAPES_UNIT_MM,) * 3, "metadata": {"medcam3d": {"kind": "cover"}}, **_WORLD}
    return cover.data(), kwargs, "shapes"


def folder_layers(folder: OutputFolder, window: str = "lung") -> list[LayerData]:
    """The scan (when its recorded path still exists), the predicted segmentation (segmentation folders) and every
    method's map of the first listed class or target (:meth:`OutputFolder.listing`: the highest-scoring class, the
    first target)."""
    out: list[LayerData] = []
    scan = folder.scan_path
    if scan is not None and scan.exists():
        vol = read_volume(scan)
        out.append(scan_layer(place(vol.array, vol.affine), "CT", window, str(scan)))
    seg = folder.segmentation()
    if seg is not None:
        out.append(segmentation_layer(seg, folder.segmentation_labels))
    top = folder.listing()[0]
    out += [map_layer(folder.map(m, top.index)) for m in folder.methods]
    return out
