"""``medcam3d view``: open an output folder in napari, HiResCAM next to Grad-CAM on the scan.

Cheap to import: napari and Qt are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from ..errors import InputError
from .folder import OutputFolder
from .layers import DEFAULT_OPACITY, DEFAULT_THRESHOLD, WINDOWS

__all__ = ["cmd_view", "register"]

VIEW_EXAMPLES = """examples:
  medcam3d view scan_medcam3d/                           # the folder written by `medcam3d explain`
  medcam3d view scan.nii.gz --maps scan_medcam3d/        # the scan given explicitly (e.g. after moving it)
  medcam3d view out/ --class cardiomegaly --window soft_tissue --methods hirescam gradcampp
  medcam3d view out/ --screenshot out.png --size 1200 600  # render and exit (reports, tests; needs a display:
                                                         # on a server run it under `xvfb-run -a`)
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``view`` sub-command."""
    p = subparsers.add_parser(
        "view", help="look at the maps in napari: HiResCAM next to Grad-CAM on the scan, per class",
        epilog=VIEW_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="output folder of `medcam3d explain`, or the scan when --maps is given")
    p.add_argument("--maps", metavar="OUT_DIR", help="output folder whose maps to show over the scan PATH")
    p.add_argument("--class", dest="class_", metavar="CLASS", help="label or index to show (default: highest score)")
    p.add_argument("--methods", nargs=2, metavar=("LEFT", "RIGHT"),
                   help="method of each pane (default: hirescam gradcam)")
    p.add_argument("--window", choices=WINDOWS, default="lung", help="CT window (default: lung)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"show maps above this fraction of their peak, in [0, 1) (default: {DEFAULT_THRESHOLD})")
    p.add_argument("--opacity", type=float, default=DEFAULT_OPACITY,
                   help=f"map opacity in [0, 1] (default: {DEFAULT_OPACITY})")
    p.add_argument("--3d", dest="three_d", action="store_true", help="start in 3-D rendering")
    p.add_argument("--screenshot", metavar="FILE.png",
                   help="render the view to this PNG and exit instead of opening an interactive window")
    p.add_argument("--size", nargs=2, type=int, default=(1200, 600), metavar=("WIDTH", "HEIGHT"),
                   help="screenshot size in pixels (default: 1200 600)")
    p.set_defaults(func=cmd_view)


def _check_gui() -> None:
    if importlib.util.find_spec("napari") is None:
        raise InputError("napari is not installed: pip install 'medcam3d[napari]'", "medcam3d view")
    no_display = not any(os.environ.get(v) for v in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"))
    if sys.platform.startswith("linux") and no_display:
        raise InputError("no display (DISPLAY is not set); on a server run it under `xvfb-run -a`", "medcam3d view")


def cmd_view(args: argparse.Namespace) -> int:
    """Run ``medcam3d view``; returns the exit status."""
    maps, scan = (Path(args.maps), Path(args.path)) if args.maps else (Path(args.path), None)
    if args.screenshot is not None:
        shot = Path(args.screenshot)
        if shot.suffix.lower() != ".png":
            raise InputError("--screenshot: the file name must end with .png", shot)
        if not shot.parent.is_dir():
            raise InputError("--screenshot: no such folder", shot.parent)
    if min(args.size) < 64:
        raise InputError(f"--size {args.size[0]} {args.size[1]}: width and height must be at least 64 pixels")
    if not 0.0 <= args.threshold < 1.0 or not 0.0 <= args.opacity <= 1.0:
        raise InputError("--threshold must be in [0, 1) and --opacity in [0, 1]")
    folder = OutputFolder(maps)
    _check_gui()
    # napari and Qt are heavy and optional: imported only when the command runs (keeps `medcam3d --help` fast)
    import napari

    from .window import open_viewer

    app = open_viewer(folder, scan, methods=args.methods, class_=args.class_, window=args.window,
                      threshold=args.threshold, opacity=args.opacity, ndisplay=3 if args.three_d else 2)
    if args.screenshot is None:
        napari.run()
        return 0
    try:
        app.comparison.screenshot(tuple(args.size), args.screenshot)
    finally:
        app.viewer.close()
    print(f"wrote {args.screenshot}")
    return 0
