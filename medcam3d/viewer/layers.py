"""napari layer-data tuples ``(data, kwargs, "image")`` for scans and maps, and how they are displayed.

Scans: grey, in a lung (W1500/L−600) or soft-tissue (W400/L40) window. Maps: :data:`MAP_COLORMAP`, saturated
colours (``plasma``: purple, magenta, orange, yellow; never white or black) whose opacity ramps up from fully
transparent at the bottom of the range, with translucent (alpha) blending -- so a map stays readable over white
soft tissue and over black air in either window, where additive blending saturates to white. The contrast limits
run from ``threshold × peak`` to the map's peak, so values at or below the threshold (and every negative value of a
signed raw map) are transparent: the display's ReLU and normalisation, done on the GPU, without touching the data.
Where no cell of the network sits (uncovered) is drawn by :mod:`.coverage`'s shapes layer (:func:`cover_layer`).
No Qt, no napari: the tuples are plain data.
"""

from __future__ import annotations

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
    "WINDOWS",
    "LayerData",
    "cover_layer",
    "folder_layers",
    "map_layer",
    "map_limits",
    "map_name",
    "method_title",
    "scan_layer",
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


def cover_layer(cover: Cover, extent: np.ndarray, name: str) -> LayerData:
    """The shapes layer drawing where the network's cells sit (:mod:`.coverage`): ``cover`` at first, redrawn by
    the comparison as the slice moves; ``extent`` is the scan's world box (it scales the outline width)."""
    styles = cover.styles(extent) if cover.shapes else {}  # napari warns about empty colour lists
    kwargs = {"name": name, "ndim": 3, "blending": "translucent", "opacity": 1.0, **styles,
              "scale": (SHAPES_UNIT_MM,) * 3, "metadata": {"medcam3d": {"kind": "cover"}}, **_WORLD}
    return cover.data(), kwargs, "shapes"


def folder_layers(folder: OutputFolder, window: str = "lung") -> list[LayerData]:
    """The scan (when its recorded path still exists) and every method's map of the highest-scoring class."""
    out: list[LayerData] = []
    scan = folder.scan_path
    if scan is not None and scan.exists():
        vol = read_volume(scan)
        out.append(scan_layer(place(vol.array, vol.affine), "CT", window, str(scan)))
    top = folder.by_score()[0]
    out += [map_layer(folder.map(m, top.index)) for m in folder.methods]
    return out
