"""HiResCAM next to Grad-CAM on the scan: two panes of one napari viewer (grid mode, linked cameras).

Layer order ``[left scan, left map, left cover, right scan, right map, right cover]`` with a grid stride of 3 puts
each scan under its map, and over both the drawing of where the network's cells sit (:mod:`.coverage`: the covered
region's outline, a veil over the uncovered rest), in its own pane; both scan layers share one array. A
segmentation folder adds the predicted segmentation as a labels layer between each scan and its map (``[scan,
segmentation, map, cover]`` per pane, stride 4), and its entries are targets: showing one moves the slices to the
target's centroid (:meth:`Comparison.show_target`). When the
summary's certificate proves that the two methods give the same map (kind ``cam``), one pane is shown with a line
saying so instead of two identical ones. :class:`Comparison` changes what the panes show (class, method, window,
threshold, opacity, slice, 2-D/3-D); :meth:`Comparison.screenshot` renders the panes at a chosen size.
The window around it (viewer + dock widget) is :mod:`medcam3d.viewer.window`. No Qt import here; napari is
imported when a comparison is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from ..files import atomic_path
from ..io import Volume
from ..methods import DEFAULT_METHODS, method_title
from ..report.collect import coincide_by_proof
from .coverage import Cover, cover_shapes, covered_world_box, placed_extent
from .folder import ClassEntry, MapImage, OutputFolder
from .geometry import RAS_TO_WORLD, Placed, place
from .layers import (
    DEFAULT_OPACITY,
    DEFAULT_THRESHOLD,
    cover_layer,
    map_layer,
    map_limits,
    map_name,
    scan_layer,
    segmentation_layer,
    window_limits,
)

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

__all__ = ["PANES", "Comparison", "default_methods"]

PANES: tuple[str, str] = ("left", "right")
_SCAN_OPACITY_3D = 0.35  # a projection of the whole CT would hide the maps


def default_methods(available: Sequence[str]) -> tuple[str, str]:
    """HiResCAM left and Grad-CAM right when present, else the first two methods (or one method twice)."""
    preferred = [m for m in DEFAULT_METHODS if m in available]
    picked = (preferred + [m for m in available if m not in preferred])[:2]
    return (picked[0], picked[-1])


class Comparison:
    """The two panes of a viewer showing one output folder over its scan.

    Args:
        viewer: an empty napari viewer (the panes become its first four layers).
        folder: the output folder.
        scan: the explained scan.
        methods: method of the left and of the right pane (default :func:`default_methods`).
        class_: label or index of the class (or target) to show (default: the first of
            :meth:`OutputFolder.listing`: the highest score, or the first target).
        window: ``"lung"`` or ``"soft_tissue"``.
        threshold: maps are shown above this fraction of their peak, in [0, 1).
        opacity: of the maps, in [0, 1].
    """

    def __init__(
        self,
        viewer: napari.Viewer,
        folder: OutputFolder,
        scan: Volume,
        methods: Sequence[str] | None = None,
        class_: str | int | None = None,
        window: str = "lung",
        threshold: float = DEFAULT_THRESHOLD,
        opacity: float = DEFAULT_OPACITY,
    ) -> None:
        self.viewer = viewer
        self.folder = folder
        self.methods = list(methods or default_methods(folder.methods))
        if len(self.methods) != 2:
            raise InputError(f"two methods are needed (left, right), got {len(self.methods)}")
        self.entry: ClassEntry = folder.entry(class_) if class_ is not None else folder.listing()[0]
        if not 0.0 <= opacity <= 1.0:
            raise InputError(f"opacity {opacity} is not in [0, 1]")
        self.threshold, self.opacity, self.window = threshold, opacity, window
        placed = place(scan.array, scan.affine)
        self.box, self.extent = covered_world_box(folder.summary), placed_extent(placed)
        self.scan_layers: list[Layer] = []
        self.segmentation_layers: list[Layer] = []  # segmentation folders: one per pane, under the map
        self.map_layers: list[Layer] = []
        self.cover_layers: list[Layer] = []
        segmentation = folder.segmentation()
        for pane, method in enumerate(self.methods):
            self._add_pane(pane, self._map(method), placed, scan.source, segmentation)
        viewer.canvas.overlays.scale_bar.visible = True
        viewer.canvas.overlays.text.update({"visible": True, "position": "bottom_left", "font_size": 10})
        self._arrange()
        for event in (viewer.dims.events.point, viewer.dims.events.ndisplay, viewer.dims.events.order):
            event.connect(self._draw_cover)
        if self.centroid() is not None:
            self.jump_to_centroid()
        else:
            self.jump_to_peak(0)
        self._draw_cover()
        viewer.reset_view()

    def _add_pane(self, pane: int, m: MapImage, placed: Placed, source: str | None,
                  segmentation: Placed | None) -> None:
        """Add a pane's layers: the CT, the predicted segmentation (when given), the map, the drawing of the
        covered region (drawn once the viewer has its three dimensions, :meth:`_draw_cover`)."""
        # napari (and Qt) load only when a viewer is built: importing this module stays cheap
        from napari.layers import Layer

        name = PANES[pane]
        layers = [(Layer.create(*scan_layer(placed, f"{name}: CT", self.window, source)), self.scan_layers)]
        if segmentation is not None:
            seg = segmentation_layer(segmentation, self.folder.segmentation_labels, f"{name}: segmentation")
            layers.append((Layer.create(*seg), self.segmentation_layers))
        map_l = Layer.create(*map_layer(m, f"{name}: {map_name(m.entry, m.method, m.full_resolution)}",
                                        self.threshold, self.opacity))
        map_l.name_overlay.visible = True
        cover_l = Layer.create(*cover_layer(Cover([], [], []), self.extent, f"{name}: covered region"))
        for layer, group in (*layers, (map_l, self.map_layers), (cover_l, self.cover_layers)):
            self.viewer.add_layer(layer)
            group.append(layer)

    # what is shown --------------------------------------------------------------------------------------------------
    def _map(self, method: str) -> MapImage:
        return self.folder.map(method, self.entry.index)

    def _show(self, pane: int, m: MapImage) -> None:
        layer = self.map_layers[pane]
        data, kwargs, _ = map_layer(m, f"{PANES[pane]}: {map_name(m.entry, m.method, m.full_resolution)}",
                                    self.threshold, self.opacity)
        layer.data = data
        for key in ("affine", "interpolation2d", "interpolation3d", "name", "metadata"):
            setattr(layer, key, kwargs[key])
        lo, hi = kwargs["contrast_limits"]
        layer.contrast_limits_range = (min(float(data.min()), lo), hi)
        layer.contrast_limits = (lo, hi)

    @property
    def coincide(self) -> bool:
        """True when the certificate proves that the two panes' methods give the same map (one pane shown)."""
        cert = self.folder.summary.certificate
        distinct = len(set(self.methods)) == 2  # the same method twice was asked for: two panes, as asked
        return distinct and coincide_by_proof(cert.kind if cert is not None else None, self.methods)

    def _arrange(self) -> None:
        """Two panes side by side, or one when the methods coincide by proof."""
        one = self.coincide
        stride = 4 if self.segmentation_layers else 3
        self.viewer.canvas.grid.update({"enabled": not one, "stride": stride, "shape": (1, 1 if one else 2)})
        for layer in (self.scan_layers[1], self.map_layers[1]):
            layer.visible = not one
        self.cover_layers[1].visible = not one and self.cover_layers[0].visible
        if self.segmentation_layers:
            self.segmentation_layers[1].visible = not one and self.segmentation_layers[0].visible
        self._caption()

    def legend(self) -> list[str]:
        """The lines under the class: what the outline means, and (certificate ``cam``) why one pane."""
        g = self.folder.summary.map_geometry
        how = getattr(g, "source", None)  # recorded since cells are placed by "auto"
        where = g.kind + (f", {how.split(':')[0]}" if how else "")  # a fallback's reason: in the report
        lines = [f"cyan box: where the network's cells are ({where}) · veiled: no cell, not 'no evidence'"
                 if self.box is not None else "where the network's cells are is not recorded in this folder"]
        if self.coincide:
            cert = self.folder.summary.certificate
            lines.append(f"{' and '.join(method_title(m) for m in self.methods)} coincide by proof "
                         f"for this model (certificate {cert.kind if cert else '?'}): one pane shown")
        if self.folder.is_segmentation:
            names = ", ".join(self.folder.segmentation_labels.values()) or "no class recorded"
            lines.append(f"under the maps: the predicted segmentation ({names})" if self.segmentation_layers
                         else "the predicted segmentation is missing from this folder: not shown")
        return lines

    def _head(self) -> str:
        """The caption's first line: the class (score, probability) or the target (class, size, score)."""
        e, t = self.entry, self.folder.target(self.entry)
        if t is None:
            return f"{e.label}   score {e.score:+.3f}   p = {e.probability:.3f}{'   predicted' if e.predicted else ''}"
        size = f"   {t.voxels} voxels" if t.voxels is not None else ""
        return f"{t.name}   class {t.label}{size}   region score {t.score:+.3f}"

    def _caption(self) -> None:
        self.viewer.canvas.overlays.text.text = "\n".join([self._head(), *self.legend()])

    def _draw_cover(self, event: object = None) -> None:
        """Redraw the covered region for the displayed slice (or the 3-D box)."""
        dims = self.viewer.dims
        cover = cover_shapes(self.box, self.extent, dims.displayed, dims.point)
        styles = cover.styles(self.extent)
        for layer in self.cover_layers:
            layer.data = []
            if cover.shapes:
                layer.add(cover.data(), **styles)

    def show_cover(self, visible: bool) -> None:
        """Show or hide the drawing of the covered region."""
        self.cover_layers[0].visible = visible
        self.cover_layers[1].visible = visible and not self.coincide

    def show_segmentation(self, visible: bool) -> None:
        """Show or hide the predicted segmentation (segmentation folders)."""
        for pane, layer in enumerate(self.segmentation_layers):
            layer.visible = visible and (pane == 0 or not self.coincide)

    def show_class(self, class_: str | int) -> None:
        """Show this class's (or target's) maps in both panes."""
        self.entry = self.folder.entry(class_)
        for pane in range(2):
            self._show(pane, self._map(self.methods[pane]))
        self._caption()

    def show_target(self, target: str | int) -> None:
        """Show this target's maps in both panes and move the slices to its centroid (when recorded)."""
        self.show_class(target)
        if self.centroid() is not None:
            self.jump_to_centroid()

    def set_method(self, pane: int, method: str) -> None:
        """Show ``method`` in pane 0 (left) or 1 (right)."""
        m = self.folder.map(method, self.entry.index)
        self.methods[pane] = method
        self._show(pane, m)
        self._arrange()

    def set_window(self, window: str) -> None:
        """CT window of both panes: ``"lung"`` or ``"soft_tissue"``."""
        limits = window_limits(window)
        self.window = window
        for layer in self.scan_layers:
            layer.contrast_limits = limits

    def set_threshold(self, threshold: float) -> None:
        """Show the maps above this fraction of their peak."""
        for layer in self.map_layers:
            layer.contrast_limits = map_limits(np.asarray(layer.data), threshold)
        self.threshold = threshold

    def set_opacity(self, opacity: float) -> None:
        """Opacity of both maps, in [0, 1]."""
        if not 0.0 <= opacity <= 1.0:
            raise InputError(f"opacity {opacity} is not in [0, 1]")
        self.opacity = opacity
        for layer in self.map_layers:
            layer.opacity = opacity

    # where ----------------------------------------------------------------------------------------------------------
    def peak(self, pane: int) -> np.ndarray:
        """World position (mm, napari axes) of the maximum of the map in ``pane``."""
        layer = self.map_layers[pane]
        data = np.asarray(layer.data)
        ijk = np.unravel_index(int(np.argmax(data)), data.shape)
        return (layer.affine.affine_matrix @ np.array([*ijk, 1.0]))[:3]

    def centroid(self) -> np.ndarray | None:
        """World position (mm, napari axes) of the shown target's centroid; None for a class or without one."""
        t = self.folder.target(self.entry)
        if t is None or t.centroid_mm is None or len(t.centroid_mm) != 3:
            return None
        return (RAS_TO_WORLD @ np.array([*t.centroid_mm, 1.0]))[:3]

    def jump_to_peak(self, pane: int = 0) -> None:
        """Move the slices through, and centre the camera on, the peak of the map in ``pane``."""
        self._jump(self.peak(pane))

    def jump_to_centroid(self) -> None:
        """Move the slices through, and centre the camera on, the shown target's centroid."""
        world = self.centroid()
        if world is None:
            raise InputError(f"{self.entry.label!r} has no recorded centroid (not a segmentation target)",
                             self.folder.path)
        self._jump(world)

    def _jump(self, world: np.ndarray) -> None:
        self.viewer.dims.set_point(range(3), tuple(float(v) for v in world))
        self.viewer.scene.camera.center = tuple(float(world[d]) for d in self.viewer.dims.displayed)

    def set_ndisplay(self, ndisplay: int) -> None:
        """2 (slices) or 3 (maximum intensity projections, the CT faint under the maps)."""
        for layer in self.scan_layers:
            layer.opacity = _SCAN_OPACITY_3D if ndisplay == 3 else 1.0
        self.viewer.dims.ndisplay = ndisplay

    # pictures -------------------------------------------------------------------------------------------------------
    def screenshot(self, size: tuple[int, int], path: str | os.PathLike[str] | None = None) -> np.ndarray:
        """Render the panes on a canvas of ``size`` = (width, height) pixels, the view fitted to it (the canvas
        keeps that size); optionally write a PNG (atomically). Returns ``uint8 [height, width, 4]``."""
        shape = (int(size[1]), int(size[0]))
        self.viewer.canvas.size = shape
        self.viewer.fit_to_view()
        image = self.viewer.screenshot(canvas_only=True, flash=False, size=shape)
        if path is not None:
            _write_png(image, Path(path))
        return image


def _write_png(image: np.ndarray, path: Path) -> None:
    # Pillow: imported when a screenshot is written
    from PIL import Image

    if path.suffix.lower() != ".png":
        raise InputError("screenshot file name must end with .png", path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image[..., :3])).save(tmp, optimize=True)
