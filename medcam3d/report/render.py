"""The cohort report: one self-contained HTML file (images embedded), optional PDF, and the (scan, class) table.

A cohort of segmentation scans (:attr:`Cohort.segmentation`) shows targets where classes are shown: per class, how
many scans have it and how large its components are; per scan, the components per class (also written as
``cohort_targets.csv``) and a table of its targets (class, component, voxels, centroid, score, certificate) with
the montages through their centroids.

Every text field goes through jinja2 autoescaping; the page carries no script and a Content-Security-Policy that
forbids scripts and remote loads, so a scan id such as ``<script>alert(1)</script>`` is shown as text.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import atomic_path, write_bytes_atomic
from ..methods import method_title
from ..outputs import ClassRecord, montage_name
from .collect import (
    TARGETS_PER_SCAN_COLUMNS,
    Cohort,
    ScanEntry,
    coincide_by_proof,
    collect,
    placement_text,
    table_rows,
    targets_per_scan,
)
from .plots import (
    data_uri,
    disagreement_figure,
    organ_shares_figure,
    score_distribution,
    thumbnail,
)

__all__ = ["ReportFiles", "cohort_stats", "render_html", "segmentation_stats", "write_report", "write_table"]

HTML_NAME = "cohort_report.html"
PDF_NAME = "cohort_report.pdf"
TABLE_NAME = "cohort_table"
TARGETS_NAME = "cohort_targets"
_TEXT_COLUMNS = ("scan_id", "label", "certificate", "input_path", "class_label", "region")
_INT_COLUMNS = ("class_index", "predicted", "full_resolution")


@dataclass
class ReportFiles:
    """What :func:`write_report` wrote (``targets``: ``cohort_targets.csv`` of a segmentation cohort)."""

    html: Path
    csv: Path
    parquet: Path | None = None
    pdf: Path | None = None
    targets: Path | None = None


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def write_table(cols: Sequence[str], rows: Sequence[dict[str, Any]], stem: Path) -> tuple[Path, Path | None]:
    """``<stem>.csv`` always; ``<stem>.parquet`` too when pyarrow is installed."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in cols])
    csv_path = stem.with_suffix(".csv")
    write_bytes_atomic(csv_path, buf.getvalue().encode("utf-8"))
    try:  # pyarrow: optional and heavy, imported only to write the Parquet copy
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return csv_path, None
    table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows],
                                 schema=_schema(pa, cols, rows)) if rows else pa.table({c: [] for c in cols})
    pq_path = stem.with_suffix(".parquet")
    with atomic_path(pq_path) as tmp:
        pq.write_table(table, str(tmp))
    return csv_path, pq_path


def _schema(pa: Any, cols: Sequence[str], rows: Sequence[dict[str, Any]]) -> Any:
    fields = []
    for c in cols:
        vals = [r.get(c) for r in rows if r.get(c) is not None]
        if c in _TEXT_COLUMNS:
            t = pa.string()
        elif c in _INT_COLUMNS or (vals and all(isinstance(v, int) for v in vals)):
            t = pa.int64()
        else:
            t = pa.float64()
        fields.append(pa.field(c, t))
    return pa.schema(fields)


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------
def _finite(xs: Sequence[Any]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def _mean(xs: Sequence[Any]) -> float | None:
    f = _finite(xs)
    return sum(f) / len(f) if f else None


def _median(xs: Sequence[Any]) -> float | None:
    f = sorted(_finite(xs))
    if not f:
        return None
    n = len(f)
    return f[n // 2] if n % 2 else 0.5 * (f[n // 2 - 1] + f[n // 2])


def _compared(cohort: Cohort) -> list[str]:
    """The two methods the summaries' disagreement measures compare (the first two of the cohort)."""
    return cohort.methods[:2]


def _group(row: dict[str, Any]) -> str:
    """The label a row is grouped by: its class (a target row: its target's class)."""
    return str(row.get("class_label") or row["label"])


def _coincide(row: dict[str, Any], compared: Sequence[str]) -> bool:
    """True when the row's (per-class) certificate proves the compared methods give the same map."""
    return len(compared) == 2 and coincide_by_proof(row.get("certificate"), compared)


def cohort_stats(cohort: Cohort, rows: Sequence[dict[str, Any]], disagree_below: float,
                 flag_outside: float) -> dict[str, Any]:
    """Per-class numbers of the cohort pages. The disagreement of two methods leaves out the (scan, class) pairs
    where they coincide by proof (certificate ``cam``): ``coinciding`` counts them; with nothing else left,
    ``all_coincide`` is True and the page says so in one line instead of a table of zeros."""
    by_label: dict[str, list[dict[str, Any]]] = {lab: [] for lab in cohort.labels}
    for r in rows:
        by_label.setdefault(_group(r), []).append(r)
    methods, compared = cohort.methods, _compared(cohort)
    coinciding = sum(_coincide(r, compared) for r in rows)
    classes, disagreement, where = [], [], []
    for lab in cohort.labels:
        rs = by_label[lab]
        differ = [r for r in rs if not _coincide(r, compared)]
        pos = sum(r["predicted"] for r in rs)
        classes.append({"label": lab, "n": len(rs), "positive": pos, "rate": pos / len(rs) if rs else None,
                        "mean_score": _mean([r["score"] for r in rs]),
                        "median_score": _median([r["score"] for r in rs]),
                        "mean_probability": _mean([r["probability"] for r in rs]),
                        "max_residual": max((abs(r["relative_residual"]) for r in rs
                                             if r["relative_residual"] is not None), default=None)})
        over = [r["top_overlap"] for r in differ if r["top_overlap"] is not None]
        if differ or not rs:
            disagreement.append({"label": lab, "n": len(over), "median_l2": _median([r["l2"] for r in differ]),
                                 "mean_pearson": _mean([r["pearson"] for r in differ]), "mean_top_overlap": _mean(over),
                                 "disagree_rate": (sum(o < disagree_below for o in over) / len(over)) if over
                                 else None})
        entry: dict[str, Any] = {"label": lab, "allowed": cohort.allowed.get(lab), "shares": {}, "outside": {},
                                 "n": 0}
        for m in methods:
            entry["shares"][m] = [_mean([r.get(f"share_{m}_{o}") for r in rs]) for o in cohort.organs]
            entry["outside"][m] = _mean([r.get(f"outside_allowed_{m}") for r in rs])
        entry["n"] = sum(1 for r in rs if methods and r.get(f"share_{methods[0]}_{cohort.organs[0]}") is not None) \
            if cohort.organs else 0
        first = entry["outside"].get(methods[0]) if methods else None
        entry["flagged"] = first is not None and first > flag_outside
        where.append(entry)
    where.sort(key=lambda e: (e["outside"].get(methods[0]) is None if methods else True,
                              -(e["outside"].get(methods[0]) or 0.0) if methods else 0.0, e["label"]))
    return {"classes": classes, "disagreement": disagreement, "where": where, "coinciding": coinciding,
            "all_coincide": bool(rows) and coinciding == len(rows), "compared": [method_title(m) for m in compared]}


def segmentation_stats(cohort: Cohort, per_scan: Sequence[dict[str, Any]],
                       rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per class of a segmentation cohort: scans with at least one target of it, its targets, the mean and largest
    number of components per such scan, the median of each scan's largest component (voxels), the mean region
    score and the largest relative completeness residual (``per_scan``: :func:`targets_per_scan`)."""
    out = []
    for lab in cohort.labels:
        counts = [r for r in per_scan if r["class_label"] == lab]
        rs = [r for r in rows if _group(r) == lab]
        out.append({"label": lab, "scans": len(counts), "targets": sum(r["targets"] for r in counts),
                    "mean_components": _mean([r["components"] for r in counts]),
                    "max_components": max((r["components"] for r in counts), default=None),
                    "median_largest": _median([r["largest_voxels"] for r in counts]),
                    "mean_score": _mean([r["score"] for r in rs]),
                    "max_residual": max((abs(r["relative_residual"]) for r in rs
                                         if r["relative_residual"] is not None), default=None)})
    return out


# ---------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------
def _env() -> Any:
    try:  # jinja2: an optional extra (reports), imported when a page is rendered
        import jinja2
    except ImportError:
        raise InputError("the report needs jinja2: pip install 'medcam3d[reports]'") from None
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent / "templates")),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )

    def num(v: Any, fmt: str = ".3f") -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "–"
        return format(v, fmt)

    def pct(v: Any) -> str:
        return "–" if v is None else f"{100 * v:.0f} %"

    env.filters["num"] = num
    env.filters["pct"] = pct
    return env


def _class_view(c: ClassRecord) -> dict[str, Any]:
    """A class as the template reads it (a plain dict; ``disagreement`` always present, None with one method;
    ``coincide``: its certificate proves the two compared methods give the same map)."""
    compared = c.disagreement.methods if c.disagreement is not None else []
    return {**c.to_dict(), "disagreement": c.disagreement.to_dict() if c.disagreement is not None else None,
            "coincide": len(compared) == 2 and coincide_by_proof(c.certificate, compared)}


def _montages(s: ScanEntry, montages: int, thumb_width: int) -> list[dict[str, Any]]:
    """Up to ``montages`` montage thumbnails of the scan's full-resolution classes, highest score first (a
    segmentation scan's targets in their order: largest component first within a class)."""
    images: list[dict[str, Any]] = []
    order = (lambda c: c.index) if s.is_segmentation else (lambda c: (-c.score, c.index))
    for c in sorted((c for c in s.classes if c.full_resolution), key=order):
        if len(images) >= montages:
            break
        p = s.folder / montage_name(c.index, c.label)
        if p.is_file():
            images.append({"label": c.label, "score": c.score, "probability": c.probability,
                           "target": _target_view(s, c), "src": data_uri(thumbnail(p, thumb_width), "image/jpeg")})
    return images


def _target_view(s: ScanEntry, c: ClassRecord) -> dict[str, Any] | None:
    """A target's row of its scan's targets table (None for a class)."""
    t = s.target(c)
    if t is None:
        return None
    return {"name": t.name, "label": t.label, "cls": t.cls, "region": t.region, "component": t.component,
            "voxels": t.voxels, "centroid": ", ".join(f"{v:.1f}" for v in t.centroid_mm) if t.centroid_mm else None,
            "score": t.score, "certificate": c.certificate}


def _target_counts(s: ScanEntry, per_scan: Sequence[dict[str, Any]]) -> list[str]:
    """One phrase per class of a segmentation scan, e.g. ``mass: 2 components, largest 224 voxels``."""
    out = []
    for r in per_scan:
        if r["scan_id"] != s.scan_id:
            continue
        n = r["components"]
        if n:
            size = f", largest {r['largest_voxels']} voxels" if r["largest_voxels"] is not None else ""
            out.append(f"{r['class_label']}: {n} component{'s' if n != 1 else ''}{size}")
        else:
            out.append(f"{r['class_label']}: {r['targets']} region{'s' if r['targets'] != 1 else ''}")
    return out


def _scan_sections(cohort: Cohort, max_scans: int, findings: int, montages: int, thumb_width: int,
                   per_scan: Sequence[dict[str, Any]] = ()) -> list[dict]:
    out = []
    for s in cohort.scans[:max_scans]:
        cls = sorted(s.classes, key=lambda c: (-float(c.probability or 0.0), c.index))
        inp = s.summary.input
        top = [_class_view(c) for c in cls[:findings]]
        targets = [_target_view(s, c) for c in sorted(s.classes, key=lambda c: c.index)] if s.is_segmentation \
            else []
        out.append({"scan_id": s.scan_id, "anchor": f"scan-{s.folder.name}",
                    "segmentation": s.is_segmentation, "targets": targets,
                    "target_counts": _target_counts(s, per_scan),
                    "notes": list(s.summary.notes or []) if s.is_segmentation else [],
                    "top": top, "images": _montages(s, montages, thumb_width),
                    "positives": [c.label for c in cls if c.predicted],
                    "shape": inp.shape or None, "spacing": inp.spacing_mm or None, "path": inp.path,
                    "shares": (s.summary.organ_shares or {}).get("classes") or {},
                    "warnings": list(s.summary.warnings or []),
                    "placement": placement_text(s.summary.map_geometry),
                    "coincide": bool(top) and all(c["coincide"] for c in top),
                    "compared": [method_title(m) for m in s.summary.methods[:2]]})
    return out


def render_html(cohort: Cohort, cols: Sequence[str], rows: Sequence[dict[str, Any]], *, title: str,
                max_scans: int = 200, findings: int = 5, montages: int = 2, thumb_width: int = 900,
                disagree_below: float = 0.5, flag_outside: float = 0.5, include_paths: bool = False) -> str:
    stats = cohort_stats(cohort, rows, disagree_below, flag_outside)
    labels = cohort.labels
    per_scan = targets_per_scan(cohort) if cohort.segmentation else []
    figures: dict[str, str] = {}
    if rows:
        scores = {lab: [r["score"] for r in rows if _group(r) == lab and r["score"] is not None] for lab in labels}
        figures["scores"] = data_uri(_score_figure(cohort, labels, scores))
        compared = _compared(cohort)
        top = {lab: [r["top_overlap"] for r in rows if _group(r) == lab and r["top_overlap"] is not None
                     and not _coincide(r, compared)] for lab in labels}
        if any(top.values()):
            figures["overlap"] = data_uri(disagreement_figure(labels, top, "top-10 % overlap (1 = same locations)"))
        if cohort.organs and cohort.methods:
            for m in cohort.methods:
                means = {e["label"]: [v if v is not None else 0.0 for v in e["shares"][m]] for e in stats["where"]}
                if any(e["n"] for e in stats["where"]):
                    figures[f"organs_{m}"] = data_uri(organ_shares_figure(labels, cohort.organs, means, m))
    env = _env()
    tpl = env.get_template("report.html.j2")
    return tpl.render(
        title=title, created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cohort=cohort,
        stats=stats, figures=figures,
        scans=_scan_sections(cohort, max_scans, findings, montages, thumb_width, per_scan),
        n_rows=len(rows), max_scans=max_scans, disagree_below=disagree_below, flag_outside=flag_outside,
        include_paths=include_paths, methods=cohort.methods, organs=cohort.organs,
        has_shares=any(e["n"] for e in stats["where"]), segmentation=cohort.segmentation,
        seg_stats=segmentation_stats(cohort, per_scan, rows) if cohort.segmentation else [],
        per_scan=_per_scan_table(cohort, per_scan),
    )


def _score_figure(cohort: Cohort, labels: Sequence[str], scores: dict[str, list[float]]) -> bytes:
    """The score distribution: raw class scores with the decision threshold, or (segmentation) raw region scores,
    which have no threshold."""
    if cohort.segmentation:
        return score_distribution(labels, scores, None, what="raw region score (the class's logits over the region)",
                                  title="Region scores per class")
    thr = cohort.model.get("threshold")
    thr_score = math.log(thr / (1 - thr)) if isinstance(thr, (int, float)) and 0 < thr < 1 else None
    return score_distribution(labels, scores, thr_score)


def _per_scan_table(cohort: Cohort, per_scan: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The "targets per scan" rows of the page (every scan, one compact line each): per class, its row of
    :func:`targets_per_scan` (None where the scan has no target of the class)."""
    rows = []
    for s in cohort.scans if cohort.segmentation else []:
        cells = {r["class_label"]: r for r in per_scan if r["scan_id"] == s.scan_id}
        rows.append({"scan_id": s.scan_id, "anchor": f"scan-{s.folder.name}",
                     "cells": [cells.get(lab) for lab in cohort.labels]})
    return rows


def _weasyprint() -> Any:
    try:  # weasyprint: optional (extra: pdf), imported only for --pdf
        import weasyprint
    except (ImportError, OSError):  # OSError: the package is there but its system libraries (pango) are not
        raise InputError("--pdf needs weasyprint: pip install 'medcam3d[pdf]' (and its system libraries, "
                         "e.g. Debian: apt-get install libpango-1.0-0 libpangoft2-1.0-0)") from None
    return weasyprint


def write_report(root: str | Path, *, html: str | Path | None = None, pdf: bool | str | Path = False,
                 include_paths: bool = False, title: str | None = None, max_scans: int = 200, findings: int = 5,
                 montages: int = 2, disagree_below: float = 0.5, flag_outside: float = 0.5) -> ReportFiles:
    """Write ``cohort_report.html`` (or ``html``), ``cohort_table.csv`` (+ ``.parquet`` with pyarrow) and, with
    ``pdf``, ``cohort_report.pdf`` (weasyprint) for the batch folder ``root``."""
    weasyprint = _weasyprint() if pdf else None  # fail before writing anything
    cohort = collect(root, include_paths=include_paths)
    cols, rows = table_rows(cohort, include_paths=include_paths)
    csv_path, pq_path = write_table(cols, rows, cohort.root / TABLE_NAME)
    targets_csv = write_table(TARGETS_PER_SCAN_COLUMNS, targets_per_scan(cohort),
                              cohort.root / TARGETS_NAME)[0] if cohort.segmentation else None
    page = render_html(cohort, cols, rows, title=title or "medcam3d cohort report", max_scans=max_scans,
                       findings=findings, montages=montages, disagree_below=disagree_below,
                       flag_outside=flag_outside, include_paths=include_paths)
    html_path = Path(html).expanduser().resolve() if html else cohort.root / HTML_NAME
    html_path.parent.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(html_path, csv_path, pq_path, targets=targets_csv)
    pdf_path = None
    if weasyprint is not None:
        pdf_path = Path(pdf).expanduser().resolve() if not isinstance(pdf, bool) else html_path.with_suffix(".pdf")
        data = weasyprint.HTML(string=page, base_url=str(cohort.root)).write_pdf()
        write_bytes_atomic(pdf_path, data)
        files.pdf = pdf_path
    write_bytes_atomic(html_path, page.encode("utf-8"))
    return files
