"""The dock widget of ``medcam3d view``: classes by score (or, for a segmentation folder, its targets with class,
component, voxels and score), a method per pane, CT window, map opacity and threshold, the covered region's
outline on or off, the segmentation on or off, jump to a map's peak, 2-D slices or 3-D rendering, and what the
outline means (and, when the certificate proves it, that the methods coincide). It only drives a
:class:`~.comparison.Comparison`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from qtpy.QtGui import QFont
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..methods import method_title
from ..outputs import TargetRecord
from .comparison import PANES, Comparison
from .folder import ClassEntry
from .layers import WINDOWS

__all__ = ["CLASS_COLUMNS", "TARGET_COLUMNS", "ComparisonWidget", "target_cells"]

CLASS_COLUMNS = ("class", "score", "p", "full res.")
#: the table's columns for a segmentation folder (one row per target, in targets.csv order)
TARGET_COLUMNS = ("target", "class", "component", "voxels", "score")
T = TypeVar("T")


def _class_cells(e: ClassEntry) -> tuple[str, ...]:
    return (e.label, f"{e.score:+.3f}", f"{e.probability:.3f}", "yes" if e.full_resolution else "")


def target_cells(t: TargetRecord) -> tuple[str, ...]:
    """A target's row of the table: name, class, component rank (empty for a whole region), voxels, score."""
    return (t.name, t.label, "" if t.component is None else str(t.component),
            "" if t.voxels is None else str(t.voxels), f"{t.score:+.3f}")


def _present(part: T | None) -> T:
    """A part Qt's typing marks optional (header, scroll bar, selection model) that a table always has."""
    if part is None:
        raise RuntimeError("the class table lacks a header, scroll bar or selection model")
    return part


def _spin(value: float, maximum: float, changed: Callable[[float], None]) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(0.0, maximum)
    box.setSingleStep(0.05)
    box.setDecimals(2)
    box.setValue(value)
    box.valueChanged.connect(changed)
    return box


class ComparisonWidget(QWidget):
    """Controls for the two panes of ``comparison``.

    Attributes (for scripts and tests): ``table`` (one row per class, highest score first, or per target in their
    order; selecting a row shows that class, or that target at its centroid), ``method_boxes`` (left, right),
    ``window_box``, ``opacity_box``, ``threshold_box``, ``peak_buttons`` (left, right), ``cover_box`` (draw the
    covered region), ``segmentation_box`` (show the segmentation; None without one), ``three_d``, ``legend`` (what
    the outline means; one pane or two).
    """

    def __init__(self, comparison: Comparison, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.comparison = comparison
        self.entries = comparison.folder.listing()
        self.table = self._class_table()
        self.method_boxes = [self._method_box(pane) for pane in range(2)]

        self.window_box = QComboBox()
        for w in WINDOWS:
            self.window_box.addItem(w.replace("_", " "), w)
        self.window_box.setCurrentIndex(self.window_box.findData(comparison.window))
        self.window_box.currentIndexChanged.connect(lambda _i: comparison.set_window(self.window_box.currentData()))

        self.opacity_box = _spin(comparison.opacity, 1.0, comparison.set_opacity)
        self.threshold_box = _spin(comparison.threshold, 0.95, comparison.set_threshold)
        self.threshold_box.setToolTip("show each map above this fraction of its peak")

        self.peak_buttons = []
        peaks = QHBoxLayout()
        for pane, name in enumerate(PANES):
            button = QPushButton(f"Jump to {name} peak")
            button.setToolTip(f"move the slices and the camera to the maximum of the {name} pane's map")
            button.clicked.connect(lambda _checked=False, p=pane: comparison.jump_to_peak(p))
            peaks.addWidget(button)
            self.peak_buttons.append(button)

        self.cover_box = QCheckBox("outline the covered region")
        self.cover_box.setToolTip("outline where the network's cells sit and veil the rest of the scan: no cell "
                                  "there (uncovered), which is not the same as no evidence")
        self.cover_box.setChecked(comparison.cover_layers[0].visible)
        self.cover_box.toggled.connect(comparison.show_cover)
        self.segmentation_box = self._segmentation_box()
        self.legend = QLabel()
        self.legend.setWordWrap(True)
        self._on_legend()

        self.three_d = QCheckBox("3-D rendering")
        self.three_d.setChecked(comparison.viewer.dims.ndisplay == 3)
        self.three_d.toggled.connect(lambda on: comparison.set_ndisplay(3 if on else 2))
        self._lay_out(peaks)

    def _class_table(self) -> QTableWidget:
        """The table of classes (or targets), the shown one selected; choosing a row shows it."""
        folder = self.comparison.folder
        columns = TARGET_COLUMNS if folder.is_segmentation else CLASS_COLUMNS
        table = QTableWidget(len(self.entries), len(columns))
        table.setHorizontalHeaderLabels(columns)
        _present(table.verticalHeader()).setVisible(False)
        table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = _present(table.horizontalHeader())
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        bold = QFont()
        bold.setBold(True)
        for row, e in enumerate(self.entries):
            target = folder.target(e)
            cells = _class_cells(e) if target is None else target_cells(target)
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if e.predicted and target is None:
                    item.setFont(bold)
                item.setToolTip(self._tip(e, target))
                table.setItem(row, col, item)
        scrollbar = _present(table.verticalScrollBar()).sizeHint().width()
        table.setMinimumWidth(header.length() + scrollbar + 2 * table.frameWidth())  # labels in full
        table.selectRow(self._row(self.comparison.entry.index))
        table.itemSelectionChanged.connect(self._on_class)
        return table

    def _method_box(self, pane: int) -> QComboBox:
        """The method chooser of ``pane`` (0 left, 1 right)."""
        box = QComboBox()
        for m in self.comparison.folder.methods:
            box.addItem(method_title(m), m)
        box.setCurrentIndex(box.findData(self.comparison.methods[pane]))
        box.currentIndexChanged.connect(lambda _i, p=pane: self._on_method(p))
        return box

    def _segmentation_box(self) -> QCheckBox | None:
        """The segmentation's on/off check box (None when the panes show no segmentation)."""
        if not self.comparison.segmentation_layers:
            return None
        box = QCheckBox("show the segmentation")
        box.setToolTip("the predicted label map, one colour per class, under the maps")
        box.setChecked(self.comparison.segmentation_layers[0].visible)
        box.toggled.connect(self.comparison.show_segmentation)
        return box

    def _lay_out(self, peaks: QHBoxLayout) -> None:
        form = QFormLayout()
        for pane_name, box in zip(PANES, self.method_boxes, strict=True):
            form.addRow(f"{pane_name} pane", box)
        form.addRow("CT window", self.window_box)
        form.addRow("map opacity", self.opacity_box)
        form.addRow("map threshold", self.threshold_box)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addLayout(form)
        layout.addLayout(peaks)
        layout.addWidget(self.cover_box)
        if self.segmentation_box is not None:
            layout.addWidget(self.segmentation_box)
        layout.addWidget(self.three_d)
        layout.addWidget(self.legend)

    @staticmethod
    def _tip(e: ClassEntry, target: TargetRecord | None) -> str:
        res = f"{'full-resolution' if e.full_resolution else 'feature-resolution'} maps"
        if target is None:
            return f"{e.label} (output {e.index}): {'predicted' if e.predicted else 'not predicted'}; {res}"
        where = ("centroid " + ", ".join(f"{v:.1f}" for v in target.centroid_mm) + " mm (RAS)"
                 if target.centroid_mm else "no centroid recorded")
        return f"{target.name} (target {e.index}, class {target.label} = output {target.cls}): {where}; {res}"

    def _row(self, class_index: int) -> int:
        return next(r for r, e in enumerate(self.entries) if e.index == class_index)

    def _on_class(self) -> None:
        rows = _present(self.table.selectionModel()).selectedRows()
        if not rows:
            return
        index = self.entries[rows[0].row()].index
        if self.comparison.folder.is_segmentation:
            self.comparison.show_target(index)
        else:
            self.comparison.show_class(index)

    def _on_method(self, pane: int) -> None:
        self.comparison.set_method(pane, self.method_boxes[pane].currentData())
        self._on_legend()

    def _on_legend(self) -> None:
        self.legend.setText("\n".join(self.comparison.legend()))
