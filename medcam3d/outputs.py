"""The output folder of one explained scan: names, atomic replacement, montages, and ``summary.json``'s schema.

Folder layout (documented in the README; readers -- viewer, batch, reports -- rely on these names)::

    scores.csv                              index,label,score,probability,predicted,full_resolution
    summary.json                            provenance, timings, certificate, per-class metrics (:class:`Summary`)
    lowres_<method>.nii.gz                  4-D (x, y, z, K): every explained class's SIGNED RAW map at feature
                                            resolution, placed in world space by its affine (align_corners=False
                                            blocks of the network grid); class order = summary["classes"]
    fullres_<method>_<NNN>_<label>.nii.gz   display heatmap in [0, 1] (ReLU, whole-map min-max, trilinear upsampling)
                                            on the scan's own grid: the scan's exact affine and shape, float32
    montage_<NNN>_<label>.png               axial / coronal / sagittal slices through the HiResCAM peak: CT with the
                                            HiResCAM overlay (top row) and with the Grad-CAM overlay (bottom row)

``NNN`` is the zero-padded class index. A folder is written under a temporary name next to its destination and
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
    "BatchRecord",
    "CertificateRecord",
    "ClassRecord",
    "ConfigRecord",
    "DisagreementRecord",
    "GridRecord",
    "InputRecord",
    "MapGeometryRecord",
    "ModelRecord",
    "PeakRecord",
    "Summary",
    "class_stem",
    "fullres_name",
    "load_summary",
    "lowres_name",
    "montage_name",
    "output_folder",
    "render_montage",
    "summary_from_dict",
    "to_spl",
    "write_json",
    "write_scores_csv",
    "write_summary",
]

SUMMARY = "summary.json"
SCORES = "scores.csv"
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


def montage_name(index: int, label: str) -> str:
    return f"montage_{class_stem(index, label)}.png"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_output_folder(p: Path) -> bool:
    return (p / SUMMARY).is_file() or (p / SCORES).is_file()


@contextmanager
def output_folder(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``dest``; on success it replaces ``dest`` (renames), on failure it
    is deleted and ``dest`` is untouched.

    ``dest`` may not exist, be empty, or be an earlier medcam3d output folder; anything else is an InputError
    (we never delete a user's files)."""
    d = Path(dest).expanduser().resolve()
    if d.exists() and not d.is_dir():
        raise InputError("output path exists and is not a folder", d)
    if d.is_dir() and any(d.iterdir()) and not _is_output_folder(d):
        raise InputError("output folder is not empty and is not a medcam3d output folder; refusing to replace it", d)
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

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (fresh lists and dicts: changing it leaves the record alone)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != _EXTRA and not (value is None and f.name in self._omit_if_none):
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
    """The model: its spec in the config, weights file and SHA-256, explained layer, model card."""

    spec: Any = None
    weights: str | None = None
    weights_sha256: str | None = None
    target_layer: str | None = None
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
    ``fallback: <reason>``; None in summaries written before it was recorded)."""

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
class BatchRecord(_Record):
    """Written by ``medcam3d batch``: the scan's id, its folder under ``scans/`` and the run that made it."""

    scan_id: str
    folder: str | None = None
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Summary(_Record):
    """``summary.json``: provenance, geometry, timings, certificate and per-class results of one output folder.

    Only ``methods`` and ``classes`` are required when reading (class order = the K axis of the low-resolution
    maps). ``batch`` and ``organ_shares`` (:func:`medcam3d.batch.organs.shares_record`) are written by
    ``medcam3d batch``; other top-level sections (``demo``, those of newer writers) are kept in ``extra``.
    """

    _omit_if_none: ClassVar[tuple[str, ...]] = ("batch", "organ_shares")

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


def to_spl(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient a 3-D array to SPL (axis 0 inferior→superior, 1 anterior→posterior, 2 right→left) by flips and
    axis swaps only (no resampling). Returns the view and its voxel spacing (slice, row, column) in mm."""
    # nibabel is imported where montages need it, as in the rest of medcam3d's I/O
    from nibabel import orientations as ornt

    src = ornt.io_orientation(affine)
    # nibabel orders the target by the output axes: we want (S, P, L)
    target = ornt.axcodes2ornt(("S", "P", "L"))
    xform = ornt.ornt_transform(src, target)
    out = ornt.apply_orientation(array, xform)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing = tuple(float(zooms[int(src_axis)]) for src_axis in np.argsort(xform[:, 0]))
    return out, spacing  # type: ignore[return-value]


def _overlay_rgba(hm: np.ndarray, cmap: Any, floor: float = 0.2) -> np.ndarray:
    rgba = cmap(np.clip(hm, 0.0, 1.0))
    rgba[..., 3] = np.where(hm > floor, 0.6 * np.clip(hm, 0, 1), 0.0)
    return rgba


def render_montage(
    ct: np.ndarray,
    maps: dict[str, np.ndarray],
    affine: np.ndarray,
    path: str | os.PathLike[str],
    title: str,
    window: str = "lung",
    peak_from: str | None = None,
    dpi: int = 100,
) -> Path:
    """A PNG: one row per method, columns axial / coronal / sagittal through the peak of ``maps[peak_from]``.

    Args:
        ct: ``[I, J, K]`` HU on the scan grid.
        maps: method -> ``[I, J, K]`` heatmap in [0, 1] on the same grid.
        affine: the scan's affine (to orient the slices radiologically and set pixel aspect ratios).
        title: figure title (class, score, ...).
        window: ``"lung"`` (W1500/L−600) or ``"soft_tissue"`` (W400/L40).
        peak_from: the method whose maximum chooses the slices (default: the first).
    The image is 1200 x (400 x rows) pixels at the default dpi."""
    import matplotlib  # heavy: imported only when a montage is drawn

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    methods = list(maps)
    ct_s, sp = to_spl(ct, affine)
    maps_s = {m: to_spl(v, affine)[0] for m, v in maps.items()}
    ref = maps_s[peak_from or methods[0]]
    k, j, i = np.unravel_index(int(np.argmax(ref)), ref.shape)
    level, width = WINDOWS[window]
    lo, hi = level - width / 2, level + width / 2
    cmap = colormaps["inferno"]
    views = [
        ("axial", lambda a: a[k], sp[1] / sp[2]),  # rows P (anterior up), cols L (patient right on the left)
        ("coronal", lambda a: a[::-1, j, :], sp[0] / sp[2]),  # superior up, patient right on the left
        ("sagittal", lambda a: a[::-1, :, i], sp[0] / sp[1]),  # superior up, anterior on the left
    ]
    fig, axes = plt.subplots(len(methods), 3, figsize=(12, 4 * len(methods)), dpi=dpi, squeeze=False)
    for r, m in enumerate(methods):
        for c, (name, cut, aspect) in enumerate(views):
            ax = axes[r, c]
            ax.imshow(cut(ct_s), cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="bilinear")
            ax.imshow(_overlay_rgba(cut(maps_s[m]), cmap), aspect=aspect, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{m} - {name}", fontsize=10)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    try:
        with atomic_path(path) as tmp:  # the temporary name keeps the .png suffix, which chooses the format
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)
