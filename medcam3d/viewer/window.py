"""The ``medcam3d view`` window: a napari viewer showing an output folder in two panes, with the dock widget.

:func:`open_viewer` reads the folder and its scan, builds the :class:`~.comparison.Comparison` and docks the
:class:`~.widget.ComparisonWidget` that drives it. Importing this module imports Qt (through the widget); napari
is imported when a window is opened.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..io import read_volume
from .comparison import Comparison
from .folder import OutputFolder
from .layers import DEFAULT_OPACITY, DEFAULT_THRESHOLD
from .widget import ComparisonWidget

if TYPE_CHECKING:
    import napari

__all__ = ["ViewerApp", "open_viewer"]


@dataclass
class ViewerApp:
    """A viewer showing an output folder: the napari viewer, its two panes and their dock widget."""

    viewer: napari.Viewer
    comparison: Comparison
    widget: ComparisonWidget


def open_viewer(
    maps: OutputFolder | str | os.PathLike[str],
    scan: str | os.PathLike[str] | None = None,
    *,
    methods: Sequence[str] | None = None,
    class_: str | int | None = None,
    window: str = "lung",
    threshold: float = DEFAULT_THRESHOLD,
    opacity: float = DEFAULT_OPACITY,
    ndisplay: int = 2,
    viewer: napari.Viewer | None = None,
) -> ViewerApp:
    """A napari window with the output folder ``maps`` over ``scan`` (default: the scan recorded in it).

    ``viewer``: an empty viewer to use (default: a new, shown one; a viewer must be shown for screenshots to
    hold pixels)."""
    import napari  # heavy (Qt, vispy): imported when a window is opened

    folder = maps if isinstance(maps, OutputFolder) else OutputFolder(maps)
    recorded = folder.scan_path
    source = scan if scan is not None else recorded
    if source is None or (scan is None and not Path(source).exists()):
        raise InputError("the scan recorded in summary.json is missing; give it: medcam3d view SCAN --maps "
                         f"{folder.path}", recorded or folder.path)
    volume = read_volume(source)
    own = viewer is None
    viewer = napari.Viewer(title=f"medcam3d - {folder.path.name}") if viewer is None else viewer
    try:
        comparison = Comparison(viewer, folder, volume, methods, class_, window, threshold, opacity)
    except BaseException:
        if own:
            viewer.close()
        raise
    if ndisplay != 2:
        comparison.set_ndisplay(ndisplay)
    widget = ComparisonWidget(comparison)
    viewer.window.add_dock_widget(widget, name="medcam3d", area="right")
    return ViewerApp(viewer, comparison, widget)
