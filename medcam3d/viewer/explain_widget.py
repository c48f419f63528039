"""npe2 widget: explain a 3-D image layer with a config/model, in a worker thread, and add the maps as layers.

The layer's voxels and its data -> world transform, read as medcam3d's world (:mod:`.geometry`; true of layers
opened with the medcam3d reader), make the scan; :class:`medcam3d.pipeline.Session` explains it and writes an output
folder exactly as ``medcam3d explain`` does (kept: ``medcam3d view FOLDER`` compares every class side by side);
each method's map of the top class (for a segmentation network: the predicted segmentation, then the maps of its
first target) is added over the layer.
"""

from __future__ import annotations

import tempfile
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..config import available_configs
from ..errors import InputError
from ..io import Volume
from ..methods import DEFAULT_METHODS, METHODS, method_title
from ..pipeline import DEFAULT_CONFIG, Session
from .folder import OutputFolder
from .geometry import ras_affine
from .layers import map_layer, segmentation_layer

if TYPE_CHECKING:
    import napari
    from napari.layers import Image

__all__ = ["STAGES", "ExplainWidget", "explain_steps", "layer_volume"]

STAGES = ("loading the model", "explaining", "writing the output folder")


def layer_volume(layer: Image) -> Volume:
    """The scan held by a 3-D image layer: its voxels and RAS affine (from the layer's data -> world transform)."""
    # napari is heavy: imported where used, as in the whole viewer package
    from napari.utils.transforms import Affine

    if layer.ndim != 3 or layer.rgb or layer.multiscale:
        raise InputError("a single-scale, 3-D, grey-level image layer is needed", f"layer {layer.name!r}")
    physical = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear)
    to_world = layer.affine.affine_matrix @ physical.affine_matrix
    return Volume(np.asarray(layer.data), ras_affine(to_world), source=f"napari layer {layer.name!r}")


def explain_steps(
    volume: Volume, config: str, checkpoint: str | None, methods: Sequence[str], device: str, out: Path
) -> Generator[str, None, Path]:
    """Explain ``volume`` and write the output folder ``out``, yielding each stage's name before it runs."""
    yield STAGES[0]
    session = Session(config, checkpoint, methods, device)
    yield STAGES[1]
    result = session.explain_volume(volume)
    yield STAGES[2]
    session.write(result, out)
    return out


class ExplainWidget(QWidget):
    """Choose an image layer, a config (shipped name or YAML file), optionally a checkpoint, the methods, the
    device and the output folder (default: a new folder in the temporary directory); press *Explain*.

    ``run()`` starts the worker and returns it (``worker.finished`` fires when the maps have been added)."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: Any = None

        self.layer_box = QComboBox()
        self.config_box = QComboBox()
        self.config_box.setEditable(True)
        self.config_box.addItems(available_configs())
        self.config_box.setCurrentText(DEFAULT_CONFIG)
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("the config's weights")
        self.method_checks = {m: QCheckBox(method_title(m)) for m in [*DEFAULT_METHODS, *sorted(set(METHODS) -
                                                                                              set(DEFAULT_METHODS))]}
        for m in DEFAULT_METHODS:
            self.method_checks[m].setChecked(True)
        self.device_box = QComboBox()
        self.device_box.addItems(["auto", "cpu", "cuda"])
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("a new folder in the temporary directory")
        self.run_button = QPushButton("Explain")
        self.run_button.clicked.connect(self.run)
        self.progress = QProgressBar()
        self.progress.setRange(0, len(STAGES))
        self.status = QLabel("")
        self.status.setWordWrap(True)

        methods = QVBoxLayout()
        for box in self.method_checks.values():
            methods.addWidget(box)
        form = QFormLayout()
        form.addRow("image layer", self.layer_box)
        form.addRow("config", _with_browse(self.config_box, self._browse_config))
        form.addRow("checkpoint", _with_browse(self.checkpoint_edit, self._browse_checkpoint))
        form.addRow("methods", methods)
        form.addRow("device", self.device_box)
        form.addRow("output folder", _with_browse(self.out_edit, self._browse_out))
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)

        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # inputs ---------------------------------------------------------------------------------------------------------
    def _refresh_layers(self, _event: Any = None) -> None:
        from napari.layers import Image

        current = self.layer_box.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image) and layer.ndim == 3]
        self.layer_box.clear()
        self.layer_box.addItems(names)
        active = self.viewer.layers.selection.active
        preferred = current if current in names else (active.name if active is not None else "")
        if preferred in names:
            self.layer_box.setCurrentText(preferred)

    def _browse_config(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "medcam3d config", "", "YAML (*.yaml *.yml)")
        if path:
            self.config_box.setCurrentText(path)

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "model weights", "", "PyTorch (*.pt *.pth);;all files (*)")
        if path:
            self.checkpoint_edit.setText(path)

    def _browse_out(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "output folder")
        if path:
            self.out_edit.setText(path)

    # running --------------------------------------------------------------------------------------------------------
    def run(self) -> Any:
        """Start explaining in a worker thread; returns the worker (None if the inputs are bad)."""
        from napari.qt.threading import create_worker

        try:
            name = self.layer_box.currentText()
            if name not in self.viewer.layers:
                raise InputError("choose a 3-D image layer to explain")
            volume = layer_volume(self.viewer.layers[name])
            methods = [m for m, box in self.method_checks.items() if box.isChecked()]
            if not methods:
                raise InputError("choose at least one method")
        except InputError as e:
            self._on_error(e)
            return None
        out_text = self.out_edit.text().strip()
        out = Path(out_text) if out_text else Path(tempfile.mkdtemp(prefix="medcam3d_")) / "explanation"
        self.run_button.setEnabled(False)
        self.progress.setValue(0)
        self.worker = create_worker(
            explain_steps, volume, self.config_box.currentText().strip() or DEFAULT_CONFIG,
            self.checkpoint_edit.text().strip() or None, methods, self.device_box.currentText(), out,
            _progress={"total": len(STAGES), "desc": "medcam3d"},
        )
        self.worker.yielded.connect(self._on_stage)
        self.worker.returned.connect(self._on_done)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(lambda: self.run_button.setEnabled(True))
        self.worker.start()
        return self.worker

    def _on_stage(self, stage: str) -> None:
        self.progress.setValue(STAGES.index(stage))
        self.status.setText(f"{stage}...")

    def _on_done(self, out: Path) -> None:
        from napari.layers import Layer

        folder = OutputFolder(out)
        top = folder.listing()[0]
        seg = folder.segmentation()
        if seg is not None:  # a segmentation network: its prediction under the maps
            self.viewer.add_layer(Layer.create(*segmentation_layer(seg, folder.segmentation_labels)))
        for method in folder.methods:
            self.viewer.add_layer(Layer.create(*map_layer(folder.map(method, top.index))))
        self.progress.setValue(len(STAGES))
        what = (f"first of {len(folder.targets)} targets: {top.label}; every target" if folder.is_segmentation
                else f"top class {top.label} (p = {top.probability:.3f}); every class")
        self.status.setText(f"{what} is in {folder.path}: `medcam3d view {folder.path}` compares them side by side")

    def _on_error(self, error: Exception) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(f"error: {error}")
        show_error(f"medcam3d: {error}")


def _with_browse(field: QWidget, browse: Any) -> QWidget:
    row = QWidget()
    layout = QHBoxLayout(row)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(field)
    button = QPushButton("...")
    button.setMaximumWidth(32)
    button.clicked.connect(browse)
    layout.addWidget(button)
    return row
