"""An output folder of ``medcam3d explain`` opened for display (layout: :mod:`medcam3d.outputs`).

Reads ``summary.json`` (:func:`medcam3d.outputs.load_summary`: classes with scores, methods, the scan's path) and
the maps: a class's full-resolution
heatmap when the folder has one, else its feature-resolution signed raw map from ``lowres_<method>.nii.gz``
(volume ``k`` of the 4-D file is ``summary["classes"][k]``), each placed in the napari world by its own affine.
Maps are read with their NIfTI scaling applied (:func:`read_scaled`): a full-resolution heatmap stored as uint8
with ``scl_slope = 1/255`` reads as float32 in [0, 1], as one stored as float32 does. Nothing is recomputed.

A segmentation folder (summary ``task == "segmentation"``) explains *targets* -- regions of the predicted
segmentation -- where a classification folder explains classes: ``classes`` then holds one record per target
(label = the target's name), :attr:`OutputFolder.targets` describes them (class, component, voxels, centroid) and
:meth:`OutputFolder.segmentation` reads the predicted label map (``segmentation.nii.gz``, integer values = output
channels) for a labels layer. No Qt, no napari.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..config import SEGMENTATION_TASK
from ..errors import InputError
from ..outputs import SUMMARY, Summary, TargetRecord, fullres_name, load_summary, lowres_name
from ..selection import find_class
from .geometry import Placed, place

__all__ = ["ClassEntry", "MapImage", "OutputFolder", "read_labels", "read_scaled"]


def read_scaled(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file's voxel values as float32 with its ``scl_slope``/``scl_inter`` applied (never the stored
    integers), and its affine (float64)."""
    import nibabel as nib  # imported when maps are read, as everywhere in medcam3d (keeps `medcam3d` light)

    img: Any = nib.load(str(path))
    return img.get_fdata(dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A label map's integer values (as stored: uint8 for medcam3d's segmentation; other dtypes rounded to int32)
    and its affine (float64). InputError naming the file when it cannot be read."""
    import nibabel as nib  # see read_scaled

    try:
        img: Any = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the segmentation ({e})", path) from None
    if not np.issubdtype(data.dtype, np.integer):
        data = np.rint(data).astype(np.int32)
    return data, np.asarray(img.affine, dtype=np.float64)


@dataclass(frozen=True)
class ClassEntry:
    """One explained class of the folder; ``position`` is its volume in the 4-D low-resolution files."""

    position: int
    index: int
    label: str
    score: float
    probability: float
    predicted: bool
    full_resolution: bool


@dataclass(frozen=True)
class MapImage:
    """One method's map of one class, placed in the napari world.

    ``full_resolution``: the display heatmap in [0, 1] on the scan grid (0 where no cell sits); otherwise the
    signed raw map at feature resolution (``path`` is then the 4-D file)."""

    method: str
    entry: ClassEntry
    placed: Placed
    full_resolution: bool
    path: Path


class OutputFolder:
    """The classes, methods and maps of one output folder.

    Raises :class:`InputError` naming the folder or file when it is not a readable medcam3d output folder."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().resolve()
        if not (self.path / SUMMARY).is_file():
            raise InputError(f"not a medcam3d output folder (no {SUMMARY}; make one with `medcam3d explain`)",
                             self.path)
        self.summary: Summary = load_summary(self.path / SUMMARY)
        self.classes = [
            ClassEntry(k, c.index, c.label, c.score, c.probability, c.predicted, c.full_resolution)
            for k, c in enumerate(self.summary.classes)
        ]
        self.methods = [m for m in self.summary.methods if (self.path / lowres_name(m)).is_file()]
        if self.is_segmentation and not self.classes:
            raise InputError("nothing to show: the segmentation network predicted nothing to explain "
                             f"({'; '.join(self.summary.notes or []) or 'no targets'})", self.path)
        if not self.classes or not self.methods:
            raise InputError("no explained classes or no lowres_<method>.nii.gz maps", self.path)
        self.targets: list[TargetRecord] = list(self.summary.targets or []) if self.is_segmentation else []
        if self.is_segmentation and len(self.targets) != len(self.classes):
            raise InputError(f"a segmentation summary needs one target per explained class record, found "
                             f"{len(self.targets)} targets and {len(self.classes)} classes", self.path / SUMMARY)
        self._lowres = lru_cache(maxsize=None)(self._read_lowres)
        self._fullres = lru_cache(maxsize=4)(self._read_fullres)  # full-resolution maps can be large
        self._segmentation = lru_cache(maxsize=1)(self._read_segmentation)

    @property
    def scan_path(self) -> Path | None:
        """The explained scan as recorded in the summary (it may since have moved)."""
        p = self.summary.input.path
        return Path(p) if p else None

    @property
    def is_segmentation(self) -> bool:
        """True for the folder of a segmentation network (its classes are targets)."""
        return self.summary.task == SEGMENTATION_TASK

    def by_score(self) -> list[ClassEntry]:
        """The classes, highest score first."""
        return sorted(self.classes, key=lambda c: -c.score)

    def listing(self) -> list[ClassEntry]:
        """The entries in the order they are listed, the first shown by default: classes highest score first;
        targets in their order (``targets.csv``: per class, components largest first)."""
        return list(self.classes) if self.is_segmentation else self.by_score()

    def target(self, entry: ClassEntry) -> TargetRecord | None:
        """The target described by a class entry of a segmentation folder, matched by index (None in a
        classification folder)."""
        return next((t for t in self.targets if t.index == entry.index), None)

    @property
    def segmentation_labels(self) -> dict[int, str]:
        """Value of the segmentation -> class name (background 0 omitted; empty when not recorded)."""
        return {int(k): v for k, v in (self.summary.segmentation_labels or {}).items()}

    @property
    def segmentation_path(self) -> Path | None:
        """The predicted segmentation's file when the summary names one and it exists."""
        name = self.summary.segmentation if self.is_segmentation else None
        return self.path / name if name and (self.path / name).is_file() else None

    def segmentation(self) -> Placed | None:
        """The predicted label map placed in the napari world (integer data), or None (no segmentation file)."""
        path = self.segmentation_path
        return self._segmentation(path) if path is not None else None

    def entry(self, class_: str | int) -> ClassEntry:
        """The class with this label or model output index."""
        position = find_class(class_, [c.label for c in self.classes], [c.index for c in self.classes])
        if position is not None:
            return self.classes[position]
        raise InputError(f"class {class_!r} was not explained in this folder (explained: "
                         f"{', '.join(c.label for c in self.classes[:6])}{', ...' if len(self.classes) > 6 else ''})",
                         self.path)

    def map(self, method: str, class_: str | int, feature_resolution: bool = False) -> MapImage:
        """``method``'s map of ``class_``: full resolution when written (unless ``feature_resolution``), else
        feature resolution."""
        if method not in self.methods:
            raise InputError(f"method {method!r} is not in this folder (methods: {', '.join(self.methods)})",
                             self.path)
        entry = self.entry(class_)
        full = self.path / fullres_name(method, entry.index, entry.label)
        if entry.full_resolution and not feature_resolution and full.is_file():
            return MapImage(method, entry, self._fullres(full), True, full)
        data, affine = self._lowres(method)
        return MapImage(method, entry, place(data[..., entry.position], affine), False,
                        self.path / lowres_name(method))

    def _read_lowres(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.path / lowres_name(method)
        data, affine = read_scaled(path)
        if data.ndim != 4 or data.shape[3] != len(self.classes):
            raise InputError(f"expected a 4-D map with {len(self.classes)} classes, found shape {data.shape}", path)
        return data, affine

    @staticmethod
    def _read_fullres(path: Path) -> Placed:
        return place(*read_scaled(path))

    @staticmethod
    def _read_segmentation(path: Path) -> Placed:
        return place(*read_labels(path))
