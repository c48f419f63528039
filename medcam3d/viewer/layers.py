"""napari layer-data tuples ``(data, kwargs, "image")`` for scans and maps, and how they are displayed.

Scans: grey, in a lung (W1500/L−600) or soft-tissue (W400/L40) window. Maps: the ``inferno`` colormap, which starts
at black, with additive blending, so the CT stays readable under them; the contrast limits run from
``threshold × peak`` to the map's peak, so values at or below the threshold (and every negative value of a signed
raw map) add nothing: the display's ReLU and normalisation, done on the GPU, without touching the data.
No Qt, no napari: the tuples are plain data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from ..io import read_volume
from ..methods import METHOD_TITLES, method_title
from ..outputs import WINDOWS as CT_WINDOWS
from .folder import ClassEntry, MapImage, OutputFolder
from .geometry import WORLD_AXES, Placed, place

__all__ = [
    "DEFAULT_OPACITY",
    "DEFAULT_THRESHOLD",
    "MAP_COLORMAP",
    "WINDOWS",
    "LayerData",
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
MAP_COLORMAP = "inferno"
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
        "blending": "additive",
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
