"""The output folder of one explained scan: names, atomic replacement, montages, and ``summary.json``'s schema.

Folder layout (documented in the README; readers -- viewer, batch, reports -- rely on these names)::

    scores.csv                              index,label,score,probability,predicted,full_resolution
    summary.json                            provenance, timings, certificate, per-class metrics (:class:`Summary`)
    lowres_<method>.nii.gz                  4-D (x, y, z, K): every explained class's SIGNED RAW map at feature
                                            resolution, placed in world space by its affine (align_corners=False
                                            blocks of the network grid); class order = summary["classes"]
    fullres_<method>_<NNN>_<label>.nii.gz   display heatmap in [0, 1] (ReLU, whole-map min-max, linear between the
                                            cells as the map geometry places them, 0 where no cell sits) on the
                                            scan's own grid: the scan's exact affine and shape; uint8 with
                                            scl_slope = 1/255 (readers that apply the scaling see [0, 1])
    montage_<NNN>_<label>.png               axial / coronal / sagittal slices through the HiResCAM peak: CT with the
                                            HiResCAM overlay (top row) and with the Grad-CAM overlay (bottom row)
    dicom_pm_<method>_<NNN>_<label>.dcm     with --dicom-out (DICOM scans): the fullres heatmap as a DICOM Parametric
                                            Map referencing the source series (one float frame per source slice)
    dicom_seg_<method>_<NNN>_<label>.dcm    with --dicom-seg LEVEL: that heatmap >= LEVEL as a binary DICOM SEG
                                            HiResCAM overlay (top row) and with the Grad-CAM overlay (bottom row;
                                            one row when the certificate proves the methods coincide), orientation
                                            letters, the covered region outlined, the peak marked, a colour bar in
                                            raw scores, the CT window named

Segmentation networks (``task: segmentation``; summary ``task == "segmentation"``) explain *targets* -- regions of
the predicted segmentation (:mod:`medcam3d.targets`) -- where classification networks explain classes: every
``<NNN>_<label>`` above is then the target index and the target's name, ``scores.csv`` and the summary's
``classes`` hold one row per target, and the folder also holds::

    segmentation.nii.gz                     the predicted label map (uint8, value = output channel, 0 = background)
                                            on the scan's own grid (its affine and shape; nearest neighbour)
    targets.csv                             target,name,class,label,region,component,voxels,centroid_x_mm,
                                            centroid_y_mm,centroid_z_mm,score (:class:`TargetRecord`)

and the montages cut through each region's centroid instead of the map's peak, the region outlined.

``NNN`` is the zero-padded class (or target) index.
A folder is written under a temporary name next to its destination and
renamed into place when complete; an existing medcam3d output folder is replaced, anything else is refused.

``summary.json`` has one owner, this module: :class:`Summary` (typed records), written only by
:func:`write_summary` and read only by :func:`load_summary` -- the command line, the viewer, the reports and the
batch runner all go through them. The certificate inside it is :meth:`medcam3d.certificate.Certificate.to_dict`.

Versioning rule (top-level ``schema_version``, :data:`SCHEMA_VERSION`):

* **adding** a field keeps the version. Readers ignore keys they do not know: top-level ones (and the
  certificate's) are kept uninterpreted in the record's ``extra``, so a summary loaded and written again keeps
  them; other unknown keys are dropped. A field missing from an older file takes its default.
* **renaming or removing** a field bumps the version; :func:`load_summary` migrates every older version to the
  current one (``_MIGRATIONS``). A file of a newer version than this code knows is refused with an InputError.

Files without ``schema_version`` (written before the schema had a version) hold the same fields as version 1 and
load as such.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import numpy as np

from .certificate import Certificate
from .errors import InputError
from .files import atomic_path, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "SCHEMA_VERSION",
    "SCORES",
    "SUMMARY",
    "WINDOWS",
    "DICOM_PM_PREFIX",
    "DICOM_SEG_PREFIX",
    "SEGMENTATION",
    "TARGETS",
    "TARGET_FIELDS",
    "BatchRecord",
    "COVERED_COLOUR",
    "PEAK_COLOUR",
    "REGION_COLOUR",
    "VIEW_LETTERS",
    "CertificateRecord",
    "ClassRecord",
    "ConfigRecord",
    "DicomExportRecord",
    "DisagreementRecord",
    "GridRecord",
    "InputRecord",
    "MapGeometryRecord",
    "ModelRecord",
    "MontageRenderer",
    "MontageView",
    "PeakRecord",
    "Summary",
    "TargetRecord",
    "check_output_folder",
    "class_stem",
    "dicom_pm_name",
    "dicom_seg_name",
    "draw_montage",
    "fullres_name",
    "load_summary",
    "lowres_name",
    "montage_name",
    "montage_views",
    "output_folder",
    "read_targets_csv",
    "render_montage",
    "summary_from_dict",
    "to_spl",
    "write_json",
    "write_scores_csv",
    "write_summary",
    "write_targets_csv",
]

SUMMARY = "summary.json"
DICOM_PM_PREFIX = "dicom_pm_"
DICOM_SEG_PREFIX = "dicom_seg_"
SCORES = "scores.csv"
#: segmentation networks: the predicted label map on the scan grid, and one row per explained target
SEGMENTATION = "segmentation.nii.gz"
TARGETS = "targets.csv"
SCHEMA_VERSION = 1
"""Version of the ``summary.json`` schema this code writes (see the versioning rule in the module docstring)."""
#: CT display windows: name -> (level, width) in HU
WINDOWS = {"lung": (-600.0, 1500.0), "soft_tissue": (40.0, 400.0)}

# Re-export for one release: the atomic JSON writer now lives in medcam3d.files.
write_json = write_json_atomic


def class_stem(index: int, label: str) -> str:
    """``NNN_label`` with the label reduced to file-name-safe characters."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "class"
    return f"{index:03d}_{safe}"


def lowres_name(method: str) -> str:
    return f"lowres_{method}.nii.gz"


def fullres_name(method: str, index: int, label: str) -> str:
    return f"fullres_{method}_{class_stem(index, label)}.nii.gz"


def dicom_pm_name(method: str, index: int, label: str) -> str:
    return f"{DICOM_PM_PREFIX}{method}_{class_stem(index, label)}.dcm"


def dicom_seg_name(method: str, index: int, label: str) -> str:
    return f"{DICOM_SEG_PREFIX}{method}_{class_stem(index, label)}.dcm"


def montage_name(index: int, label: str) -> str:
    return f"montage_{class_stem(index, label)}.png"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_output_folder(p: Path) -> bool:
    return (p / SUMMARY).is_file() or (p / SCORES).is_file()


def check_output_folder(dest: str | os.PathLike[str]) -> Path:
    """The checks :func:`output_folder` makes, made before any work and creating nothing (commands call it first,
    so that a bad ``--out`` is refused before the scan is read). Returns the resolved path.

    InputError when ``dest`` is a file, a non-empty folder that is not a medcam3d output folder, or when the
    nearest existing folder above it is not a writable folder."""
    d = Path(dest).expanduser().resolve()
    if d.exists() and not d.is_dir():
        raise InputError("output path exists and is not a folder", d)
    if d.is_dir() and any(d.iterdir()) and not _is_output_folder(d):
        raise InputError("output folder is not empty and is not a medcam3d output folder; refusing to replace it", d)
    above = d.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise InputError(f"cannot create the output folder: {above} is not a folder", d)
    if not os.access(above, os.W_OK):
        raise InputError("output folder's parent is not writable", d)
    return d


@contextmanager
def output_folder(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``dest``; on success it replaces ``dest`` (renames), on failure it
    is deleted and ``dest`` is untouched.

    ``dest`` may not exist, be empty, or be an earlier medcam3d output folder; anything else is an InputError
    (we never delete a user's files; :func:`check_output_folder`)."""
    d = check_output_folder(dest)
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder's parent ({e.strerror})", d) from None
    if not os.access(d.parent, os.W_OK):
        raise InputError("output folder's parent is not writable", d)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", suffix=".partial", dir=d.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if d.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{d.name}.", suffix=".old", dir=d.parent))
        os.rmdir(old)
        os.replace(d, old)
    os.replace(tmp, d)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


SCORE_FIELDS = ("index", "label", "score", "probability", "predicted", "full_resolution")


def write_scores_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """``scores.csv``: one row per class (index, label, score, probability, predicted, full_resolution)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SCORE_FIELDS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return write_text_atomic(path, buf.getvalue())


# -----------------------------------------------------------------------------------------------------------------
# summary.json
# -----------------------------------------------------------------------------------------------------------------
_EXTRA = "extra"


class _SchemaError(ValueError):
    """A summary that does not follow the schema (turned into an InputError naming the file)."""


@dataclass(kw_only=True)
class _Record:
    """Base of the summary's records. ``to_dict`` writes the fields in order (the items of an ``extra`` field last,
    as keys of the record itself); ``from_dict`` reads them by name, building nested records and checking numbers
    and strings, and ignores unknown keys (a record with an ``extra`` field keeps them there)."""

    #: fields left out of the JSON when None (such keys were absent, not null, before the schema had types)
    _omit_if_none: ClassVar[tuple[str, ...]] = ()
    #: fields left out of the JSON when they hold their default (added fields whose default is what older files
    #: meant: a file rewritten keeps its keys)
    _omit_if_default: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (fresh lists and dicts: changing it leaves the record alone)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            omit = (value is None and f.name in self._omit_if_none) or (
                f.name in self._omit_if_default and value == f.default)
            if f.name != _EXTRA and not omit:
                out[f.name] = _dump(value)
        out.update(_dump(getattr(self, _EXTRA, {})))
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """The record held by a parsed JSON object (a _SchemaError when a required key is missing or has the wrong
        type)."""
        if not isinstance(data, Mapping):
            raise _SchemaError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
        hints = _hints(cls)
        names = [f.name for f in fields(cls)]
        for f in fields(cls):
            if f.name not in data and f.default is MISSING and f.default_factory is MISSING:
                raise _SchemaError(f"missing {f.name!r}")
        kwargs = {n: _load(hints[n], data[n], n) for n in names if n in data and n != _EXTRA}
        if _EXTRA in names:
            kwargs[_EXTRA] = {str(k): v for k, v in data.items() if k not in names}
        return cls(**kwargs)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a record class (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _dump(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value


def _load(hint: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as the annotated type ``hint``: records built, numbers and strings checked."""
    if value is None or hint is Any:
        return value
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return _load(kinds[0], value, where) if len(kinds) == 1 else value
    if isinstance(hint, type) and issubclass(hint, _Record):
        return hint.from_dict(value)
    if origin is list and isinstance(value, list):
        return [_load(args[0], v, where) for v in value]
    if origin is dict and isinstance(value, Mapping):
        return {str(k): _load(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return hint(value)
    if (hint is str and isinstance(value, str)) or (hint is bool and isinstance(value, bool)):
        return value
    raise _SchemaError(f"{where!r} should be {getattr(hint, '__name__', hint)}, got {value!r}"[:200])


@dataclass(kw_only=True)
class InputRecord(_Record):
    """The explained scan: ``path``, ``sha256`` and DICOM ``meta`` identify it (reports drop them unless asked);
    ``shape``, ``spacing_mm``, ``axcodes`` and the 4 x 4 ``affine`` (array index -> RAS mm) describe its grid."""

    path: str | None = None
    sha256: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    shape: list[int] = field(default_factory=list)
    spacing_mm: list[float] = field(default_factory=list)
    axcodes: str | None = None
    affine: list[list[float]] | None = None


@dataclass(kw_only=True)
class ConfigRecord(_Record):
    """The config: its name, file and the file's SHA-256."""

    name: str | None = None
    path: str | None = None
    sha256: str | None = None


@dataclass(kw_only=True)
class ModelRecord(_Record):
    """The model: its spec in the config, weights file and SHA-256, explained layer and why, model card."""

    spec: Any = None
    weights: str | None = None
    weights_sha256: str | None = None
    target_layer: str | None = None
    target_layer_reason: str | None = None  # why this layer (given, declared, or target_layer="auto"'s choice)
    synthetic_data_only: bool = False
    card: dict[str, Any] | None = None


@dataclass(kw_only=True)
class GridRecord(_Record):
    """The network grid: ``shape`` ``(S, H, W)`` and its 4 x 4 affine (array index -> RAS mm)."""

    shape: list[int] = field(default_factory=list)
    affine: list[list[float]] | None = None


@dataclass(kw_only=True)
class MapGeometryRecord(_Record):
    """Where feature-resolution cells sit on the network grid: ``kind`` (``field`` | ``receptive``); cell ``i`` of
    axis ``d`` is centred at network voxel ``offset_voxels[d] + stride_voxels[d] * i``; ``source``: how that was
    found (:attr:`medcam3d.placement.Placement.source`: ``declared``, ``derived``, ``requested`` or
    ``fallback: <reason>``; absent in older summaries)."""

    _omit_if_none: ClassVar[tuple[str, ...]] = ("source",)

    kind: str = "field"
    offset_voxels: list[float] = field(default_factory=list)
    stride_voxels: list[float] = field(default_factory=list)
    source: str | None = None


@dataclass(kw_only=True)
class CertificateRecord(_Record):
    """The certificate as :meth:`Certificate.to_dict` writes it, plus the largest Jacobian difference and probe
    residual. The typed fields are what readers use; the per-class evidence (``classes``, ``per_class``,
    ``jacobian_difference``, ``baseline``, residuals...) stays in ``extra`` exactly as ``to_dict`` wrote it."""

    kind: str
    exact: bool = False
    summary: str = ""
    head: str | None = None
    tolerance: float | None = None
    n_probes: int | None = None
    jacobian_test: str | None = None
    max_jacobian_difference: float | None = None
    max_probe_residual: float | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_certificate(cls, cert: Certificate) -> CertificateRecord:
        """The record of ``cert``: its :meth:`~Certificate.to_dict`, with the two maxima when it lacks them."""
        record = cert.to_dict()
        record.setdefault("max_jacobian_difference", float(cert.jacobian_difference.max()))
        record.setdefault("max_probe_residual",
                          float(cert.probe_residual.max()) if cert.probe_residual.numel() else 0.0)
        return cls.from_dict(record)


@dataclass(kw_only=True)
class PeakRecord(_Record):
    """A method's raw-map maximum for one class: ``map_index`` (feature-resolution cell), ``value`` and, when the
    value is positive and the map is 3-D, its position ``world_ras_mm`` (RAS mm)."""

    map_index: list[int]
    value: float
    world_ras_mm: list[float] | None = None


@dataclass(kw_only=True)
class DisagreementRecord(_Record):
    """How far two methods' maps of one class lie apart (:meth:`Explanation.disagreement`): ``l2``, ``pearson``,
    ``top_overlap``; further measures in ``extra``."""

    methods: list[str]
    l2: float | None = None
    pearson: float | None = None
    top_overlap: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class ClassRecord(_Record):
    """One explained class: scores, the certificate kind, completeness residuals, bias, peaks per method, and the
    disagreement of the first two methods (absent with one method)."""

    _omit_if_none: ClassVar[tuple[str, ...]] = ("disagreement",)

    index: int
    label: str
    score: float
    probability: float
    predicted: bool
    full_resolution: bool
    certificate: str | None = None
    completeness_residual: float | None = None
    relative_residual: float | None = None
    bias: float | None = None
    peak: dict[str, PeakRecord] = field(default_factory=dict)
    disagreement: DisagreementRecord | None = None


@dataclass(kw_only=True)
class TargetRecord(_Record):
    """One explained target of a segmentation network (:class:`medcam3d.targets.TargetInfo` as written out).

    Attributes:
        index: position on the K axis of the maps (and in ``classes``, ``scores.csv``, ``targets.csv``).
        name: the target's name (e.g. ``"mass component 1"``), as file names and ``classes[].label`` show it.
        cls: the output channel whose score is explained (= its value in ``segmentation.nii.gz``).
        label: that channel's class name.
        region: ``"predicted"`` (the class's whole predicted mask), ``"component"`` (one 26-connected component of
            it), ``"mask"``, ``"box"`` or ``"class"``.
        component: the component's rank by size (1 = largest); None for other regions.
        voxels: the region's size in network-grid voxels (None when unknown).
        centroid_mm: the region's centroid in RAS mm (the convention of :attr:`PeakRecord.world_ras_mm`), mapped
            from network-grid indices by the network grid's affine; None when unknown.
        score: the raw region score: the class's logits summed (``reduce: sum``) or averaged (``mean``) over the
            region -- not a probability.
    """

    index: int
    name: str
    cls: int
    label: str
    region: str
    component: int | None = None
    voxels: int | None = None
    centroid_mm: list[float] | None = None
    score: float


#: the columns of ``targets.csv`` (:func:`write_targets_csv`, :func:`read_targets_csv`)
TARGET_FIELDS = ("target", "name", "class", "label", "region", "component", "voxels", "centroid_x_mm",
                 "centroid_y_mm", "centroid_z_mm", "score")


def _cell(value: Any) -> str:
    """A CSV cell: empty for None, 9 significant digits for floats."""
    if value is None:
        return ""
    return f"{value:.9g}" if isinstance(value, float) else str(value)


def write_targets_csv(records: Sequence[TargetRecord], path: str | os.PathLike[str]) -> Path:
    """``targets.csv``: one row per target (:data:`TARGET_FIELDS`; empty cells for unknown values)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(TARGET_FIELDS)
    for r in records:
        xyz = list(r.centroid_mm) if r.centroid_mm is not None else [None, None, None]
        w.writerow([_cell(v) for v in (r.index, r.name, r.cls, r.label, r.region, r.component, r.voxels,
                                       *(None if v is None else float(v) for v in xyz), float(r.score))])
    return write_text_atomic(path, buf.getvalue())


def read_targets_csv(path: str | os.PathLike[str]) -> list[TargetRecord]:
    """The records of a ``targets.csv`` (:func:`write_targets_csv`); InputError naming the file when it is not
    one."""
    p = Path(path)
    try:
        rows = list(csv.DictReader(io.StringIO(p.read_text(encoding="utf-8"))))
    except OSError as e:
        raise InputError(f"unreadable ({e.strerror or e})", p) from None
    opt = (lambda v, kind: kind(v) if v != "" else None)  # noqa: E731 - a two-use converter
    try:
        return [TargetRecord(
            index=int(r["target"]), name=r["name"], cls=int(r["class"]), label=r["label"], region=r["region"],
            component=opt(r["component"], int), voxels=opt(r["voxels"], int),
            centroid_mm=None if r["centroid_x_mm"] == "" else [float(r[f"centroid_{a}_mm"]) for a in "xyz"],
            score=float(r["score"])) for r in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"not a medcam3d targets.csv ({type(e).__name__}: {e})", p) from None


@dataclass(kw_only=True)
class BatchRecord(_Record):
    """Written by ``medcam3d batch``: the scan's id, its folder under ``scans/`` and the run that made it."""

    scan_id: str
    folder: str | None = None
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class DicomExportRecord(_Record):
    """The DICOM objects written beside the NIfTI maps (``--dicom-out``): Parametric Maps, SEGs (with
    ``--dicom-seg``) and the level the SEGs were thresholded at."""

    parametric_maps: list[str] = field(default_factory=list)
    segmentations: list[str] = field(default_factory=list)
    seg_threshold: float | None = None


@dataclass(kw_only=True)
class Summary(_Record):
    """``summary.json``: provenance, geometry, timings, certificate and per-class results of one output folder.

    Only ``methods`` and ``classes`` are required when reading (class order = the K axis of the low-resolution
    maps). ``batch`` and ``organ_shares`` (:func:`medcam3d.batch.organs.shares_record`) are written by
    ``medcam3d batch``; ``notes`` holds one-line remarks for the user (e.g. that the full-resolution cap cut the
    predicted-positive classes); other top-level sections (``demo``, those of newer writers) are kept in ``extra``.

    ``warnings`` (things to check, e.g. a scan that does not look like the config's modality) and ``assumptions``
    (what was assumed rather than refused, e.g. which of several DICOM series was read, a generated DICOM UID), one
    line each, ``dicom_export`` and ``notes`` were added in schema version 1 (added fields keep the version); they
    are absent from older files.

    Segmentation networks (added in version 1 too; older files read as ``task == "classification"``, and
    ``task`` is written only when it is not that): ``task`` is ``"segmentation"``, ``targets`` describes each
    explained target in the maps' K order (:class:`TargetRecord`), ``classes`` holds one record per target
    (``label`` = the target's name, ``score`` = its raw region score, ``probability`` = the mean predicted
    probability of its class over the region), ``segmentation`` names the predicted label map's file and
    ``segmentation_labels`` maps its values (as strings) to class names (background 0 omitted).
    """

    _omit_if_none: ClassVar[tuple[str, ...]] = ("batch", "organ_shares", "warnings", "assumptions", "dicom_export",
                                                "notes", "targets", "segmentation", "segmentation_labels")
    _omit_if_default: ClassVar[tuple[str, ...]] = ("task",)

    schema_version: int = SCHEMA_VERSION
    medcam3d_version: str = "unknown"
    created: str | None = None
    input: InputRecord = field(default_factory=InputRecord)
    config: ConfigRecord = field(default_factory=ConfigRecord)
    model: ModelRecord = field(default_factory=ModelRecord)
    network_grid: GridRecord = field(default_factory=GridRecord)
    map_shape: list[int] = field(default_factory=list)
    map_affine: list[list[float]] | None = None
    map_geometry: MapGeometryRecord = field(default_factory=MapGeometryRecord)
    methods: list[str]
    device: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    certificate: CertificateRecord | None = None
    probability: str = "sigmoid"
    threshold: float = 0.5
    classes: list[ClassRecord]
    files: list[str] = field(default_factory=list)
    batch: BatchRecord | None = None
    organ_shares: dict[str, Any] | None = None
    warnings: list[str] | None = None
    assumptions: list[str] | None = None
    dicom_export: DicomExportRecord | None = None
    notes: list[str] | None = None
    task: str = "classification"
    targets: list[TargetRecord] | None = None
    segmentation: str | None = None
    segmentation_labels: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def with_sections(self, sections: Mapping[str, Any] | None) -> Summary:
        """A copy with top-level ``sections`` added (replacing fields of the same name), as JSON values."""
        return summary_from_dict({**self.to_dict(), **sections}) if sections else self


def _from_unversioned(data: dict[str, Any]) -> dict[str, Any]:
    """Version 0 (no ``schema_version``) -> 1: the same fields."""
    return data


#: ``_MIGRATIONS[v]`` turns a version-v object into a version-(v + 1) one
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _from_unversioned}


def _migrate(data: Mapping[str, Any]) -> dict[str, Any]:
    version = data.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise _SchemaError(f"bad schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise _SchemaError(f"schema version {version} is newer than this medcam3d reads ({SCHEMA_VERSION}); "
                           "upgrade medcam3d")
    out = dict(data)
    for v in range(version, SCHEMA_VERSION):
        out = _MIGRATIONS[v](out)
    out["schema_version"] = SCHEMA_VERSION
    return out


def summary_from_dict(data: Any, where: str | os.PathLike[str] = "<summary>") -> Summary:
    """The :class:`Summary` of a parsed ``summary.json`` of any known version (migrated to the current one).
    InputError naming ``where`` when it is not a medcam3d summary."""
    if not isinstance(data, Mapping):
        raise InputError("not a medcam3d summary (not a JSON object)", where)
    try:
        return Summary.from_dict(_migrate(data))
    except _SchemaError as e:
        raise InputError(f"not a medcam3d summary ({e})", where) from None


def load_summary(path: str | os.PathLike[str]) -> Summary:
    """Read ``summary.json`` (``path`` is the file or its output folder): the one loader every reader uses.
    InputError naming the file when it is missing, unreadable or not a medcam3d summary."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"unreadable ({e.strerror or e})", p) from None
    except ValueError as e:
        raise InputError(f"not valid JSON ({e})", p) from None
    return summary_from_dict(data, p)


def write_summary(summary: Summary, path: str | os.PathLike[str]) -> Path:
    """Write ``summary.json`` atomically: the one writer (NaN written as ``NaN``, as Python's json reads it)."""
    return write_json_atomic(summary.to_dict(), path)



# -----------------------------------------------------------------------------------------------------------------
# Montage
# -----------------------------------------------------------------------------------------------------------------

#: montage colours (RGB in [0, 1]): the outline of the region the map's cells cover, the marker at the peak, and
#: the outline of an explained segmentation region
COVERED_COLOUR = (0.0, 1.0, 1.0)
PEAK_COLOUR = (0.2, 1.0, 0.2)
REGION_COLOUR = (1.0, 0.3, 1.0)
#: orientation letters per view: (top, bottom, left, right) -- radiological convention
VIEW_LETTERS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
#: ``covered`` for a montage: a bool volume on the scan grid, or a function of scan indices ``(i, j, k)``
Covered = np.ndarray | Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _spl_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel's orientation transform from the array axes of ``affine`` to SPL: row ``a`` = (SPL axis, flip)."""
    # nibabel is imported where montages need it, as in the rest of medcam3d's I/O
    from nibabel import orientations as ornt

    # nibabel orders the target by the output axes: we want (S, P, L)
    return ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(("S", "P", "L")))


def to_spl(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient a 3-D array to SPL (axis 0 inferior→superior, 1 anterior→posterior, 2 right→left) by flips and
    axis swaps only (no resampling, a view). Returns the view and its voxel spacing (slice, row, column) in mm."""
    from nibabel import orientations as ornt  # see _spl_transform

    xform = _spl_transform(affine)
    out = ornt.apply_orientation(array, xform)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing = tuple(float(zooms[int(src_axis)]) for src_axis in np.argsort(xform[:, 0]))
    return out, spacing  # type: ignore[return-value]


def _overlay_rgba(hm: np.ndarray, cmap: Any, floor: float = 0.2) -> np.ndarray:
    rgba = cmap(np.clip(hm, 0.0, 1.0))
    rgba[..., 3] = np.where(hm > floor, 0.6 * np.clip(hm, 0, 1), 0.0)
    return rgba


def _peak_spl(volume: np.ndarray, affine: np.ndarray) -> tuple[int, int, int]:
    """SPL index ``(k, j, i)`` of the maximum of ``volume`` (scan axes). The maximum is found in memory order (a
    strided scan of a transposed view is many times slower on a full-size CT); ties go to the first in memory."""
    fortran = volume.flags.f_contiguous and not volume.flags.c_contiguous
    flat = int(np.argmax(volume.ravel(order="F" if fortran else "C")))
    ijk = np.unravel_index(flat, volume.shape, order="F" if fortran else "C")
    out = [0, 0, 0]
    for a, (axis, flip) in enumerate(_spl_transform(affine)):
        out[int(axis)] = volume.shape[a] - 1 - int(ijk[a]) if flip < 0 else int(ijk[a])
    return out[0], out[1], out[2]


def _index_spl(ijk: Sequence[int], shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, int, int]:
    """SPL index ``(k, j, i)`` of scan voxel ``ijk`` (as :func:`_peak_spl` maps the peak)."""
    out = [0, 0, 0]
    for a, (axis, flip) in enumerate(_spl_transform(affine)):
        out[int(axis)] = shape[a] - 1 - int(ijk[a]) if flip < 0 else int(ijk[a])
    return out[0], out[1], out[2]


def _unit(a: np.ndarray) -> np.ndarray:
    """A display map slice as float in [0, 1] (uint8 maps hold ``round(255 h)``)."""
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else np.asarray(a, dtype=np.float32)


@dataclass
class MontageView:
    """One column of a montage: 2-D slices through the peak, oriented for display (rows top to bottom).

    Attributes:
        name: ``axial`` | ``coronal`` | ``sagittal``.
        ct: ``[rows, cols]`` HU.
        maps: method -> ``[rows, cols]`` display values in [0, 1].
        covered: ``[rows, cols]`` bool, where the map's cells sit (None: not known, drawn as all covered).
        region: ``[rows, cols]`` bool, the explained segmentation region on this slice (None: no region).
        aspect: pixel height / width.
        peak: ``(row, col)`` of the peak in this view.
    """

    name: str
    ct: np.ndarray
    maps: dict[str, np.ndarray]
    covered: np.ndarray | None
    aspect: float
    peak: tuple[int, int]
    region: np.ndarray | None = None

    @property
    def letters(self) -> tuple[str, str, str, str]:
        """Orientation letters (top, bottom, left, right)."""
        return VIEW_LETTERS[self.name]


_Cut = tuple[Callable[[np.ndarray], np.ndarray], tuple[int, int]]


def _cuts(k: int, j: int, i: int, n_slices: int) -> dict[str, _Cut]:
    """View name -> (slice of an SPL volume, the peak's (row, col) in it) through SPL voxel ``(k, j, i)``."""
    return {
        "axial": (lambda a: a[k], (j, i)),  # rows A -> P (anterior up), cols R -> L (patient right on the left)
        "coronal": (lambda a: a[::-1, j, :], (n_slices - 1 - k, i)),  # superior up, patient right on the left
        "sagittal": (lambda a: a[::-1, :, i], (n_slices - 1 - k, j)),  # superior up, anterior on the left
    }


def _covered_slices(covered: Covered | None, shape: tuple[int, ...], affine: np.ndarray,
                    cuts: Mapping[str, Any]) -> dict[str, np.ndarray | None]:
    """The covered mask on each view's slice (scan indices of the slice's pixels passed to a callable)."""
    if covered is None:
        return {name: None for name in cuts}
    if not callable(covered):
        vol = to_spl(np.asarray(covered, dtype=bool), affine)[0]
        return {name: np.asarray(cut(vol)) for name, (cut, _) in cuts.items()}
    index = [to_spl(np.broadcast_to(np.arange(n).reshape([-1 if a == d else 1 for a in range(3)]), shape),
                    affine)[0] for d, n in enumerate(shape)]
    return {name: np.asarray(covered(*(np.asarray(cut(ix)) for ix in index)), dtype=bool)
            for name, (cut, _) in cuts.items()}


def montage_views(
    ct: np.ndarray,
    maps: Mapping[str, np.ndarray],
    affine: np.ndarray,
    peak_from: str | None = None,
    covered: Covered | None = None,
    at: Sequence[int] | None = None,
    region: np.ndarray | None = None,
) -> list[MontageView]:
    """The axial, coronal and sagittal slices through the peak of ``maps[peak_from]`` (default: the first map), or
    through scan voxel ``at = (i, j, k)`` (a segmentation region's centroid), which the marker then marks;
    ``region`` (bool ``[I, J, K]``, the explained region) is cut with them and outlined.

    Args:
        ct: ``[I, J, K]`` HU on the scan grid.
        maps: method -> ``[I, J, K]`` display map on the same grid: float in [0, 1], or uint8 ``round(255 h)``.
        affine: the scan's affine (orients the slices radiologically, sets pixel aspect ratios).
        covered: where the maps' cells sit: a bool ``[I, J, K]`` volume or a function of scan indices
            ``(i, j, k)`` (arrays of one shape) returning bools; None when unknown.
    Only the three slices are read from the volumes (reoriented views, no copies of the volumes)."""
    methods = list(maps)
    ct_s, sp = to_spl(ct, affine)
    maps_s = {m: to_spl(v, affine)[0] for m, v in maps.items()}
    if at is not None:
        k, j, i = _index_spl(at, tuple(ct.shape), affine)
    else:
        k, j, i = _peak_spl(np.asarray(maps[peak_from or methods[0]]), affine)
    cuts = _cuts(k, j, i, ct_s.shape[0])
    masks = _covered_slices(covered, tuple(ct.shape), affine, cuts)
    regions = _covered_slices(region, tuple(ct.shape), affine, cuts)
    aspects = {"axial": sp[1] / sp[2], "coronal": sp[0] / sp[2], "sagittal": sp[0] / sp[1]}
    return [
        MontageView(name, np.asarray(cut(ct_s)), {m: _unit(np.asarray(cut(v))) for m, v in maps_s.items()},
                    masks[name], aspects[name], peak, regions[name])
        for name, (cut, peak) in cuts.items()
    ]


def _blend(ct: np.ndarray, hm: np.ndarray, window: tuple[float, float], cmap: Any) -> np.ndarray:
    """``[rows, cols, 3]`` uint8: the CT in gray through ``window`` (lo, hi HU) with the heatmap over it (alpha as
    :func:`_overlay_rgba`), composited once here rather than by matplotlib image by image."""
    lo, hi = window
    gray = np.clip((ct.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)[..., None]
    rgba = _overlay_rgba(hm, cmap)
    alpha = rgba[..., 3:4]
    return np.round((gray * (1.0 - alpha) + rgba[..., :3] * alpha) * 255.0).astype(np.uint8)


def _setup_panel(ax: Any, view: MontageView, title: str) -> tuple[Any, Any]:
    """The fixed parts of a panel (limits, orientation letters, title, no ticks); returns its image and peak-marker
    artists, updated for every montage."""
    rows, cols = view.ct.shape
    image = ax.imshow(np.zeros((rows, cols, 3), dtype=np.uint8), aspect=view.aspect, interpolation="bilinear")
    (peak,) = ax.plot([0], [0], marker="+", markersize=14, markeredgewidth=2, color=PEAK_COLOUR, linestyle="none",
                      zorder=3)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    top, bottom, left, right = view.letters
    style = {"transform": ax.transAxes, "color": "white", "fontsize": 9, "fontweight": "bold"}
    ax.text(0.5, 0.99, top, ha="center", va="top", **style)
    ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)
    ax.text(0.01, 0.5, left, ha="left", va="center", **style)
    ax.text(0.99, 0.5, right, ha="right", va="center", **style)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return image, peak


def _region_outline(p: _Panel, region: np.ndarray | None) -> Any:
    """The panel's outline of the explained region on its slice (the previous one removed); None when nothing is
    drawn."""
    if p.region is not None:
        p.region.remove()
    if region is None or not region.any() or region.all():
        return None
    return p.ax.contour(region.astype(np.float32), levels=[0.5], colors=[REGION_COLOUR], linewidths=1.2)


def _footer(window: str, views: Sequence[MontageView], marker: str, note: str | None) -> str:
    level, width = WINDOWS[window]
    lines = [f"window: {window.replace('_', ' ')} (level {level:g} HU, width {width:g} HU)   + {marker}"]
    if any(v.covered is not None and not v.covered.all() for v in views):
        lines[0] += "   cyan outline: where the map's cells sit (outside it: no cell, not zero evidence)"
    if any(v.region is not None for v in views):
        lines[0] += "   magenta outline: the explained region"
    if note:
        lines.append(note)
    return "\n".join(lines)


@dataclass
class _Panel:
    """One drawn panel of a :class:`MontageRenderer` figure: row ``method``, column ``view`` (index into views)."""

    ax: Any
    image: Any
    peak: Any
    method: str
    view: int
    outline: Any = None
    region: Any = None


class MontageRenderer:
    """Draws montage PNGs (:func:`draw_montage`), reusing one matplotlib figure while the layout stays the same
    (rows, slice shapes and aspects: every class of one scan): building the axes and colour bars costs about as
    much as drawing them. Not thread-safe: one renderer per thread.

    The image is 1200 x (400 x rows) pixels at the default dpi. The PNG's ``medcam3d`` text chunk records each
    panel's pixel box (``bbox_px``: left, top, right, bottom) and slice shape."""

    def __init__(self, dpi: int = 100) -> None:
        self.dpi = dpi
        self._layout: tuple[Any, ...] | None = None
        self._fig: Any = None
        self._panels: list[_Panel] = []
        self._bars: list[tuple[Any, Any]] = []
        self._texts: list[Any] = []
        self._meta: list[dict[str, Any]] = []

    def draw(
        self,
        views: Sequence[MontageView],
        path: str | os.PathLike[str],
        title: str,
        *,
        methods: Sequence[str] | None = None,
        window: str = "lung",
        scales: Mapping[str, tuple[float, float]] | None = None,
        note: str | None = None,
        marker: str | None = None,
    ) -> Path:
        """One PNG of ``views`` (arguments as :func:`draw_montage`)."""
        from matplotlib import colormaps  # heavy: imported only when a montage is drawn (see _build)

        rows = list(methods or views[0].maps)
        layout = (tuple(rows), tuple((v.name, v.ct.shape, v.aspect) for v in views))
        if layout != self._layout:
            self._build(rows, views)
            self._layout = layout
        level, width = WINDOWS[window]
        cmap = colormaps["inferno"]
        for p in self._panels:
            view = views[p.view]
            p.image.set_data(_blend(view.ct, view.maps[p.method], (level - width / 2, level + width / 2), cmap))
            p.peak.set_data([view.peak[1]], [view.peak[0]])
            if p.outline is not None:
                p.outline.remove()
                p.outline = None
            mask = view.covered
            if mask is not None and mask.any() and not mask.all():
                p.outline = p.ax.contour(mask.astype(np.float32), levels=[0.5], colors=[COVERED_COLOUR],
                                         linewidths=1.2)
            p.region = _region_outline(p, view.region)
        for m, (mappable, bar) in zip(rows, self._bars):
            lo, hi = (scales or {}).get(m, (0.0, 1.0))
            mappable.set_clim(lo, hi if hi > lo else lo + 1.0)
            bar.set_label(f"{m} raw score" if scales and m in scales else "display value", fontsize=8)
        self._texts[0].set_text(title)
        self._texts[1].set_text(_footer(window, views, marker or f"peak of {rows[0]}", note))
        meta = json.dumps({"panels": self._meta, "window": window})
        with atomic_path(path) as tmp:  # the temporary name keeps the .png suffix, which chooses the format
            self._fig.savefig(tmp, dpi=self.dpi, metadata={"medcam3d": meta},
                              pil_kwargs={"compress_level": 1})  # 3x faster than the default 6, 20 % larger
        return Path(path)

    def _build(self, rows: Sequence[str], views: Sequence[MontageView]) -> None:
        """The figure for ``rows`` x ``views``: panels, a colour bar per row, title and footer."""
        import matplotlib  # heavy: imported only when a montage is drawn

        matplotlib.use("Agg", force=False)
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure

        dpi, height = self.dpi, 4.0 * len(rows)
        fig = Figure(figsize=(12, height), dpi=dpi)
        row_h = (height - 1.0) / len(rows)  # inches: 0.45 title above, 0.55 footer below
        self._fig, self._panels, self._bars, self._meta = fig, [], [], []
        for r, m in enumerate(rows):
            y0 = (0.55 + (len(rows) - 1 - r) * row_h) / height
            for c, view in enumerate(views):
                ax = fig.add_axes((0.012 + c * 0.302, y0, 0.29, (row_h - 0.3) / height))
                image, peak = _setup_panel(ax, view, f"{m} - {view.name}")
                self._panels.append(_Panel(ax, image, peak, m, c))
                ax.apply_aspect()
                b = ax.get_position()
                self._meta.append({"method": m, "view": view.name, "shape": list(view.ct.shape),
                                   "bbox_px": [round(b.x0 * 12 * dpi, 2), round((1 - b.y1) * height * dpi, 2),
                                               round(b.x1 * 12 * dpi, 2), round((1 - b.y0) * height * dpi, 2)]})
            mappable = ScalarMappable(Normalize(0.0, 1.0), colormaps["inferno"])
            bar = fig.colorbar(mappable, cax=fig.add_axes((0.925, y0 + 0.1 / height, 0.012, (row_h - 0.5) / height)))
            bar.ax.tick_params(labelsize=7)
            self._bars.append((mappable, bar))
        self._texts = [fig.suptitle("", fontsize=12, y=1 - 0.12 / height),
                       fig.text(0.5, 0.05 / height, "", ha="center", va="bottom", fontsize=8)]


def draw_montage(
    views: Sequence[MontageView],
    path: str | os.PathLike[str],
    title: str,
    *,
    methods: Sequence[str] | None = None,
    window: str = "lung",
    scales: Mapping[str, tuple[float, float]] | None = None,
    note: str | None = None,
    dpi: int = 100,
    renderer: MontageRenderer | None = None,
    marker: str | None = None,
) -> Path:
    """Draw ``views`` as a PNG: one row per method (default: every map of the views), columns axial / coronal /
    sagittal, each with orientation letters, the covered region's outline and a marker at the peak, a colour bar
    per row on the signed map's raw-score scale (``scales[method] = (lo, hi)``: the raw scores display values 0 and
    1 stand for; without it the display scale), and a footer naming the window, what the marker marks (``marker``,
    default the first row's peak) and ``note``. ``renderer``: a :class:`MontageRenderer` to reuse between montages
    of one scan (its ``dpi`` wins).

    The image is 1200 x (400 x rows) pixels at the default dpi. The PNG's ``medcam3d`` text chunk records each
    panel's pixel box (``bbox_px``: left, top, right, bottom) and slice shape."""
    r = renderer or MontageRenderer(dpi)
    return r.draw(views, path, title, methods=methods, window=window, scales=scales, note=note, marker=marker)


def render_montage(
    ct: np.ndarray,
    maps: dict[str, np.ndarray],
    affine: np.ndarray,
    path: str | os.PathLike[str],
    title: str,
    window: str = "lung",
    peak_from: str | None = None,
    dpi: int = 100,
    *,
    scales: Mapping[str, tuple[float, float]] | None = None,
    covered: Covered | None = None,
    note: str | None = None,
    methods: Sequence[str] | None = None,
    renderer: MontageRenderer | None = None,
    at: Sequence[int] | None = None,
    region: np.ndarray | None = None,
) -> Path:
    """A PNG: one row per method, columns axial / coronal / sagittal through the peak of ``maps[peak_from]``, or
    through scan voxel ``at`` (:func:`montage_views` then :func:`draw_montage`).

    Args:
        ct: ``[I, J, K]`` HU on the scan grid.
        maps: method -> ``[I, J, K]`` heatmap on the same grid: float in [0, 1], or uint8 ``round(255 h)``.
        affine: the scan's affine (to orient the slices radiologically and set pixel aspect ratios).
        title: figure title (class, score, ...).
        window: ``"lung"`` (W1500/L−600) or ``"soft_tissue"`` (W400/L40).
        peak_from: the method whose maximum chooses the slices (default: the first).
        scales: method -> (lo, hi), the raw scores of display values 0 and 1 (for the colour bars).
        covered: where the maps' cells sit (see :func:`montage_views`); its edge is outlined.
        note: a line under the images (e.g. that the methods coincide by proof).
        methods: the rows (default: every map).
        renderer: a :class:`MontageRenderer` reused between the montages of one scan (faster; its dpi wins).
        at: ``(i, j, k)`` scan voxel to cut through instead of the peak (a segmentation region's centroid); the
            marker marks it and the footer says so.
        region: bool ``[I, J, K]``: the explained segmentation region, outlined in magenta.
    The image is 1200 x (400 x rows) pixels at the default dpi."""
    views = montage_views(ct, maps, affine, peak_from, covered, at, region)
    marker = "centroid of the region" if at is not None else None
    return draw_montage(views, path, title, methods=methods, window=window, scales=scales, note=note, dpi=dpi,
                        renderer=renderer, marker=marker)
