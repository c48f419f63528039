"""Reading a batch folder: finished scans' summaries, failures, and the (scan, class) table.

Only what a report may show is kept. Privacy by default: no input paths, no DICOM UIDs or series descriptions,
no host names; error messages have file paths replaced by ``<path>`` (``include_paths=True`` keeps them and adds
each scan's input path). DICOM patient identifiers never reach summary.json in the first place (see
:mod:`medcam3d.io.dicom`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = [
    "NONDETERMINISTIC_COLUMNS",
    "TABLE_COLUMNS",
    "Cohort",
    "ScanEntry",
    "collect",
    "redact_paths",
    "table_rows",
]

SCANS = "scans"
DONE = ".done"
FAILURES = "failures.jsonl"
BATCH_FILE = "medcam3d_batch.json"

#: fixed columns of the cohort table, then per method ``peak_<m>_{i,j,k,value,x,y,z}``, ``share_<m>_<organ>`` and
#: ``outside_allowed_<m>``.
TABLE_COLUMNS = ("scan_id", "class_index", "label", "score", "probability", "predicted", "full_resolution",
                 "certificate", "completeness_residual", "relative_residual", "l2", "pearson", "top_overlap")
#: columns whose values change from run to run (none: timings and dates are not in the table). The determinism
#: tests compare the whole table.
NONDETERMINISTIC_COLUMNS: tuple[str, ...] = ()

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s'\"`,;()<>\[\]{}]+)+")


def redact_paths(text: str) -> str:
    """Replace file paths in a message by ``<path>``."""
    return _PATH.sub("<path>", text)


@dataclass
class ScanEntry:
    """One finished scan: its id, folder and summary.json."""

    scan_id: str
    folder: Path
    summary: dict[str, Any]

    @property
    def classes(self) -> list[dict[str, Any]]:
        return list(self.summary.get("classes", []))


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


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def collect(root: str | Path, include_paths: bool = False) -> Cohort:
    """Read ``root`` (a ``medcam3d batch`` folder)."""
    d = Path(root).expanduser().resolve()
    scans_dir = d / SCANS
    if not scans_dir.is_dir():
        raise InputError("not a medcam3d batch folder (no scans/ inside)", d)
    scans: list[ScanEntry] = []
    unfinished = 0
    for sub in sorted(p for p in scans_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (sub / DONE).is_file():
            unfinished += 1
            continue
        try:
            summary = _load(sub / "summary.json")
        except (OSError, ValueError):
            unfinished += 1
            continue
        sid = str(summary.get("batch", {}).get("scan_id") or sub.name)
        if not include_paths:
            summary = _private(summary)
        scans.append(ScanEntry(sid, sub, summary))
    scans.sort(key=lambda s: s.scan_id)
    done_ids = {s.scan_id for s in scans}
    latest: dict[str, dict[str, Any]] = {}
    fpath = d / FAILURES
    if fpath.is_file():
        for line in fpath.read_text(encoding="utf-8").splitlines():
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
    failures = [latest[k] for k in sorted(latest)]
    cohort = Cohort(d, scans, failures, unfinished)
    cohort.model = dict.fromkeys(("config", "synthetic_data_only", "certificate_kind", "certificate_summary",
                                  "medcam3d_version", "threshold"))
    for s in scans:
        for m in s.summary.get("methods", []):
            if m not in cohort.methods:
                cohort.methods.append(m)
        for c in s.classes:
            if c["label"] not in cohort.labels:
                cohort.labels.append(c["label"])
        shares = s.summary.get("organ_shares") or {}
        for o in shares.get("organs", []):
            if o not in cohort.organs:
                cohort.organs.append(o)
        for label, entry in (shares.get("classes") or {}).items():
            if "allowed" in entry:
                cohort.allowed.setdefault(label, list(entry["allowed"]))
    if scans:
        s0 = scans[0].summary
        cohort.model = {
            "config": (s0.get("config") or {}).get("name"),
            "synthetic_data_only": bool((s0.get("model") or {}).get("synthetic_data_only")),
            "certificate_kind": (s0.get("certificate") or {}).get("kind"),
            "certificate_summary": (s0.get("certificate") or {}).get("summary"),
            "medcam3d_version": s0.get("medcam3d_version"),
            "threshold": s0.get("threshold"),
        }
    return cohort


def _private(summary: dict[str, Any]) -> dict[str, Any]:
    """Drop what could identify a patient or a site: input path, UIDs, descriptions, hosts."""
    out = dict(summary)
    inp = dict(out.get("input") or {})
    for k in ("path", "meta", "sha256"):
        inp.pop(k, None)
    out["input"] = inp
    out.pop("batch_host", None)
    return out


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None if v is None else float(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def table_rows(cohort: Cohort, include_paths: bool = False) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per (scan, explained class), sorted by scan id then class index; and the column names."""
    methods, organs = cohort.methods, cohort.organs
    cols = list(TABLE_COLUMNS)
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
        shares = (s.summary.get("organ_shares") or {}).get("classes") or {}
        for c in sorted(s.classes, key=lambda c: c["index"]):
            dis = c.get("disagreement") or {}
            r: dict[str, Any] = {
                "scan_id": s.scan_id, "class_index": int(c["index"]), "label": c["label"],
                "score": _num(c.get("score")), "probability": _num(c.get("probability")),
                "predicted": int(bool(c.get("predicted"))), "full_resolution": int(bool(c.get("full_resolution"))),
                "certificate": c.get("certificate"),
                "completeness_residual": _num(c.get("completeness_residual")),
                "relative_residual": _num(c.get("relative_residual")),
                "l2": _num(dis.get("l2")), "pearson": _num(dis.get("pearson")),
                "top_overlap": _num(dis.get("top_overlap")),
            }
            if include_paths:
                r["input_path"] = (s.summary.get("input") or {}).get("path")
            for m in methods:
                pk = (c.get("peak") or {}).get(m) or {}
                ijk = pk.get("map_index") or [None] * 3
                xyz = pk.get("world_ras_mm") or [None] * 3
                r.update({f"peak_{m}_i": ijk[0], f"peak_{m}_j": ijk[1], f"peak_{m}_k": ijk[2],
                          f"peak_{m}_value": _num(pk.get("value")),
                          f"peak_{m}_x": _num(xyz[0]), f"peak_{m}_y": _num(xyz[1]), f"peak_{m}_z": _num(xyz[2])})
            entry = shares.get(c["label"]) or {}
            for m in methods:
                per = entry.get(m) or {}
                for o in organs:
                    r[f"share_{m}_{o}"] = _num(per.get(o))
                r[f"outside_allowed_{m}"] = _num((entry.get("outside_allowed") or {}).get(m))
            rows.append({k: r.get(k) for k in cols})
    return cols, rows
