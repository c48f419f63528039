"""Reading a batch folder: finished scans' summaries, failures, and the (scan, class) table.

Scans of a segmentation network (summary ``task == "segmentation"``) explain *targets* (regions of the predicted
segmentation) where classification scans explain classes: their rows are (scan, target), with the target's class,
component, size and centroid (:data:`SEGMENTATION_COLUMNS`, present only when the cohort has such scans, so that a
classification table is unchanged), and they are grouped by the target's class wherever the report groups rows
by class. :func:`targets_per_scan` counts each scan's components per class.

Only what a report may show is kept. Privacy by default: no input paths, no DICOM UIDs or series descriptions,
no host names; error messages have file paths replaced by ``<path>`` (``include_paths=True`` keeps them and adds
each scan's input path). DICOM patient identifiers never reach summary.json in the first place (see
:mod:`medcam3d.io.dicom`). Summaries are read with :func:`medcam3d.outputs.load_summary`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import SEGMENTATION_TASK  # re-exported here for one release (its home is medcam3d.config)
from ..errors import InputError
from ..outputs import SUMMARY, ClassRecord, MapGeometryRecord, Summary, TargetRecord, load_summary

__all__ = [
    "CAM_EQUIVALENT",
    "NONDETERMINISTIC_COLUMNS",
    "SEGMENTATION_COLUMNS",
    "SEGMENTATION_TASK",
    "TABLE_COLUMNS",
    "TARGETS_PER_SCAN_COLUMNS",
    "Cohort",
    "ScanEntry",
    "coincide_by_proof",
    "collect",
    "placement_text",
    "redact_paths",
    "table_rows",
    "targets_per_scan",
]

SCANS = "scans"
DONE = ".done"
FAILURES = "failures.jsonl"
BATCH_FILE = "medcam3d_batch.json"

#: fixed columns of the cohort table, then per method ``peak_<m>_{i,j,k,value,x,y,z}``, ``share_<m>_<organ>`` and
#: ``outside_allowed_<m>``.
TABLE_COLUMNS = ("scan_id", "class_index", "label", "score", "probability", "predicted", "full_resolution",
                 "certificate", "completeness_residual", "relative_residual", "l2", "pearson", "top_overlap")
#: the columns a segmentation cohort's table adds after ``label`` (which is then the target's name and
#: ``class_index`` the target's index): the target's output channel and its name, the region kind, the component's
#: rank by size (1 = largest), its size in network-grid voxels and its centroid in RAS mm
SEGMENTATION_COLUMNS = ("target_class", "class_label", "region", "component", "voxels", "centroid_x_mm",
                        "centroid_y_mm", "centroid_z_mm")
#: the columns of :func:`targets_per_scan` (``cohort_targets.csv``)
TARGETS_PER_SCAN_COLUMNS = ("scan_id", "class_label", "targets", "components", "largest_voxels", "total_voxels")
#: columns whose values change from run to run (none: timings and dates are not in the table). The determinism
#: tests compare the whole table.
NONDETERMINISTIC_COLUMNS: tuple[str, ...] = ()

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s'\"`,;()<>\[\]{}]+)+")


#: methods whose maps coincide (up to a positive factor, so their display maps are equal) when the certificate is
#: ``cam``: global average pooling + one linear layer after the explained layer (medcam3d.certificate)
CAM_EQUIVALENT = frozenset({"cam", "hirescam", "gradcam"})


def coincide_by_proof(certificate: str | None, methods: Sequence[str]) -> bool:
    """True when the certificate kind ``certificate`` proves that ``methods`` give one and the same map: kind
    ``cam`` and every method one of :data:`CAM_EQUIVALENT` (a comparison of them is then degenerate)."""
    return certificate == "cam" and bool(methods) and set(methods) <= CAM_EQUIVALENT


def _numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def placement_text(geometry: MapGeometryRecord) -> str:
    """One line saying where the feature-resolution cells were drawn: kind, how the placement was found, cell
    centres ``offset + stride × i`` in network-grid voxels, e.g. ``receptive (derived): cell i of each axis at
    (1, 32, 32) + (3, 8, 8) × i network voxels``."""
    how = getattr(geometry, "source", None)  # recorded since medcam3d placed cells by "auto"
    head = f"{geometry.kind} ({how})" if how else f"{geometry.kind} (how found: not recorded)"
    if not geometry.offset_voxels or not geometry.stride_voxels:
        return f"{head}: the field of view divided evenly" if geometry.kind == "field" else head
    return (f"{head}: cell i of each axis at {_numbers(geometry.offset_voxels)} + "
            f"{_numbers(geometry.stride_voxels)} × i network voxels")


def redact_paths(text: str) -> str:
    """Replace file paths in a message by ``<path>``."""
    return _PATH.sub("<path>", text)


@dataclass
class ScanEntry:
    """One finished scan: its id, folder and summary.json."""

    scan_id: str
    folder: Path
    summary: Summary

    @property
    def classes(self) -> list[ClassRecord]:
        return list(self.summary.classes)

    @property
    def is_segmentation(self) -> bool:
        """True for a segmentation network's scan (its classes are targets)."""
        return self.summary.task == SEGMENTATION_TASK

    @property
    def targets(self) -> list[TargetRecord]:
        """The explained targets, parallel to :attr:`classes` (empty for a classification scan)."""
        return list(self.summary.targets or []) if self.is_segmentation else []

    def target(self, c: ClassRecord) -> TargetRecord | None:
        """The target a class record stands for (matched by index; None for a classification scan)."""
        return next((t for t in self.targets if t.index == c.index), None)

    def group(self, c: ClassRecord) -> str:
        """The name rows are grouped by: a class's label, a target's class label."""
        t = self.target(c)
        return t.label if t is not None else c.label


@dataclass
class Cohort:
    """A batch folder's contents as the report sees them."""

    root: Path
    scans: list[ScanEntry]
    failures: list[dict[str, Any]]  # latest failure per scan that is not finished
    unfinished: int  # scans with a folder but no done marker
    methods: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    organs: list[str] = field(default_factory=list)
    allowed: dict[str, list[str]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def segmentation(self) -> bool:
        """True when a scan of the cohort is a segmentation network's (rows are targets, grouped by class)."""
        return any(s.is_segmentation for s in self.scans)


def collect(root: str | Path, include_paths: bool = False) -> Cohort:
    """Read ``root`` (a ``medcam3d batch`` folder)."""
    d = Path(root).expanduser().resolve()
    scans_dir = d / SCANS
    if not scans_dir.is_dir():
        raise InputError("not a medcam3d batch folder (no scans/ inside)", d)
    scans, unfinished = _finished_scans(scans_dir, include_paths)
    cohort = Cohort(d, scans, _failures(d / FAILURES, {s.scan_id for s in scans}, include_paths), unfinished)
    _gather_names(cohort)
    cohort.model = _model_info(scans)
    return cohort


def _finished_scans(scans_dir: Path, include_paths: bool) -> tuple[list[ScanEntry], int]:
    """The scans with a done marker and a readable summary (sorted by id), and how many folders are not."""
    scans: list[ScanEntry] = []
    unfinished = 0
    for sub in sorted(p for p in scans_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (sub / DONE).is_file():
            unfinished += 1
            continue
        try:
            summary = load_summary(sub / SUMMARY)
        except InputError:
            unfinished += 1
            continue
        sid = summary.batch.scan_id if summary.batch is not None and summary.batch.scan_id else sub.name
        scans.append(ScanEntry(sid, sub, summary if include_paths else _private(summary)))
    return sorted(scans, key=lambda s: s.scan_id), unfinished


def _failures(path: Path, done_ids: set[str], include_paths: bool) -> list[dict[str, Any]]:
    """The latest failure of every scan that is not finished, sorted by scan id (or manifest row)."""
    latest: dict[str, dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        key = str(rec.get("scan_id")) if rec.get("scan_id") is not None else f"<row {rec.get('where')}>"
        if key in done_ids:
            continue
        rec = {k: rec.get(k) for k in ("scan_id", "error", "error_type", "stage", "attempts", "worker_deaths",
                                       "where", "time")}
        if not include_paths and rec.get("error"):
            rec["error"] = redact_paths(str(rec["error"]))
        latest[key] = rec
    return [latest[k] for k in sorted(latest)]


def _add_new(names: list[str], more: Sequence[str]) -> None:
    names += [n for n in dict.fromkeys(more) if n not in names]


def _gather_names(cohort: Cohort) -> None:
    """The cohort's methods, class labels (a target's: its class's), organs and allowed organs, in first-seen
    order."""
    for s in cohort.scans:
        _add_new(cohort.methods, s.summary.methods)
        _add_new(cohort.labels, [s.group(c) for c in s.classes])
        shares = s.summary.organ_shares or {}
        _add_new(cohort.organs, shares.get("organs", []))
        groups = {c.label: s.group(c) for c in s.classes}
        for label, entry in (shares.get("classes") or {}).items():
            if "allowed" in entry:
                cohort.allowed.setdefault(groups.get(label, label), list(entry["allowed"]))


def _model_info(scans: list[ScanEntry]) -> dict[str, Any]:
    """What produced the scans (from the first one): config, demo flag, certificate, version, threshold."""
    if not scans:
        return dict.fromkeys(("config", "synthetic_data_only", "certificate_kind", "certificate_summary",
                              "medcam3d_version", "threshold"))
    s0 = scans[0].summary
    cert = s0.certificate
    return {
        "config": s0.config.name,
        "synthetic_data_only": bool(s0.model.synthetic_data_only),
        "certificate_kind": cert.kind if cert is not None else None,
        "certificate_summary": cert.summary if cert is not None else None,
        "medcam3d_version": s0.medcam3d_version,
        "threshold": s0.threshold,
    }


def _private(summary: Summary) -> Summary:
    """Drop what could identify a patient or a site: input path, UIDs, descriptions, hosts."""
    inp = replace(summary.input, path=None, meta={}, sha256=None)
    # warnings (e.g. a scan that does not look like CT) stay, without paths; assumptions name DICOM UIDs: dropped
    warnings = [redact_paths(w) for w in summary.warnings] if summary.warnings else summary.warnings
    return replace(summary, input=inp, extra={k: v for k, v in summary.extra.items() if k != "batch_host"},
                   warnings=warnings, assumptions=None)


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None if v is None else float(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def table_rows(cohort: Cohort, include_paths: bool = False) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per (scan, explained class), sorted by scan id then class index; and the column names. A
    segmentation cohort's rows are (scan, target), with :data:`SEGMENTATION_COLUMNS` after ``label``."""
    methods, organs = cohort.methods, cohort.organs
    cols = list(TABLE_COLUMNS)
    if cohort.segmentation:
        at = cols.index("label") + 1
        cols[at:at] = SEGMENTATION_COLUMNS
    if include_paths:
        cols.insert(1, "input_path")
    for m in methods:
        cols += [f"peak_{m}_{a}" for a in ("i", "j", "k", "value", "x", "y", "z")]
    for m in methods:
        cols += [f"share_{m}_{o}" for o in organs]
    for m in methods:
        cols.append(f"outside_allowed_{m}")
    rows: list[dict[str, Any]] = []
    for s in cohort.scans:
        shares = (s.summary.organ_shares or {}).get("classes") or {}
        for c in sorted(s.classes, key=lambda c: c.index):
            r = _class_row(s, c, methods, organs, shares.get(c.label) or {})
            r.update(_target_cells(s.target(c)))
            if include_paths:
                r["input_path"] = s.summary.input.path
            rows.append({k: r.get(k) for k in cols})
    return cols, rows


def _class_row(s: ScanEntry, c: ClassRecord, methods: Sequence[str], organs: Sequence[str],
               shares: dict[str, Any]) -> dict[str, Any]:
    """The table row of class ``c`` of scan ``s`` (``shares``: its organ_shares entry)."""
    dis = c.disagreement
    r: dict[str, Any] = {
        "scan_id": s.scan_id, "class_index": int(c.index), "label": c.label,
        "score": _num(c.score), "probability": _num(c.probability),
        "predicted": int(bool(c.predicted)), "full_resolution": int(bool(c.full_resolution)),
        "certificate": c.certificate,
        "completeness_residual": _num(c.completeness_residual),
        "relative_residual": _num(c.relative_residual),
        "l2": _num(dis.l2) if dis else None, "pearson": _num(dis.pearson) if dis else None,
        "top_overlap": _num(dis.top_overlap) if dis else None,
    }
    for m in methods:
        pk = c.peak.get(m)
        ijk: Sequence[int | None] = (pk.map_index if pk else None) or [None] * 3
        xyz: Sequence[float | None] = (pk.world_ras_mm if pk else None) or [None] * 3
        r.update({f"peak_{m}_i": ijk[0], f"peak_{m}_j": ijk[1], f"peak_{m}_k": ijk[2],
                  f"peak_{m}_value": _num(pk.value if pk else None),
                  f"peak_{m}_x": _num(xyz[0]), f"peak_{m}_y": _num(xyz[1]), f"peak_{m}_z": _num(xyz[2])})
    for m in methods:
        per = shares.get(m) or {}
        for o in organs:
            r[f"share_{m}_{o}"] = _num(per.get(o))
        r[f"outside_allowed_{m}"] = _num((shares.get("outside_allowed") or {}).get(m))
    return r


def _target_cells(t: TargetRecord | None) -> dict[str, Any]:
    """The :data:`SEGMENTATION_COLUMNS` of a target's row (nothing for a class)."""
    if t is None:
        return {}
    xyz: Sequence[float | None] = t.centroid_mm or [None] * 3
    return {"target_class": int(t.cls), "class_label": t.label, "region": t.region, "component": t.component,
            "voxels": t.voxels, "centroid_x_mm": _num(xyz[0]), "centroid_y_mm": _num(xyz[1]),
            "centroid_z_mm": _num(xyz[2])}


def targets_per_scan(cohort: Cohort) -> list[dict[str, Any]]:
    """Per segmentation scan and class (cohort order): how many targets and connected components it has, the
    largest component's size and all its targets' voxels (network-grid voxels; None when not recorded). Rows have
    :data:`TARGETS_PER_SCAN_COLUMNS`; a class without a target in a scan has no row."""
    rows: list[dict[str, Any]] = []
    for s in cohort.scans:
        by_class: dict[str, list[TargetRecord]] = {}
        for t in s.targets:
            by_class.setdefault(t.label, []).append(t)
        for label in [lab for lab in cohort.labels if lab in by_class]:
            ts = by_class[label]
            components = [t.voxels for t in ts if t.region == "component"]
            sizes = [t.voxels for t in ts if t.voxels is not None]
            rows.append({"scan_id": s.scan_id, "class_label": label, "targets": len(ts),
                         "components": len(components),
                         "largest_voxels": max((v for v in components if v is not None), default=None),
                         "total_voxels": sum(sizes) if sizes else None})
    return rows
