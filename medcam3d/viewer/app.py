"""The side-by-side comparison and its window, under their former module name (re-exports kept for one release).

:class:`Comparison`, :data:`PANES` and :func:`default_methods` live in :mod:`medcam3d.viewer.comparison`;
:class:`ViewerApp` and :func:`open_viewer` in :mod:`medcam3d.viewer.window`. ``from medcam3d.viewer.app import
open_viewer`` (docs/viewer.md) keeps working. Importing this module imports Qt (through the window's widget).
"""

from __future__ import annotations

from .comparison import PANES, Comparison, default_methods
from .window import ViewerApp, open_viewer

__all__ = ["PANES", "Comparison", "ViewerApp", "default_methods", "open_viewer"]
