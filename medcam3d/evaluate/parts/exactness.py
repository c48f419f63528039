"""The ``exactness`` part: completeness residuals, the paper's Table-1 L2 (Grad-CAM from HiResCAM) and CAM
equality, read from what one explanation already computed (0 extra model passes; :mod:`medcam3d.evaluate.exactness`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...methods import method_title
from ..exactness import exactness_record
from ..numbers import fmt_number, json_number, md_table, mean_of
from .base import CaseRecord, CaseView, PartBase, SuiteOptions, SuiteRun, register_part

__all__ = ["ExactnessCase", "ExactnessPart", "ExactnessSummary", "Table1Row"]

PerLabel = dict[str, float | None]
EXACT_KINDS = ("cam", "affine-head")


@dataclass
class ExactnessCase:
    """One phantom: ``s − s(0) − Σ map`` and its relative size per (method, label); the Table-1 L2 per label
    (when both HiResCAM and Grad-CAM ran); ``max|CAM − N·map| / max|CAM|`` per method (CAM architectures)."""

    residual: dict[str, PerLabel]
    relative_residual: dict[str, PerLabel]
    table1_l2: PerLabel | None = None
    cam_equality: dict[str, float | None] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"residual": self.residual, "relative_residual": self.relative_residual}
        if self.table1_l2 is not None:
            out["table1_l2"] = self.table1_l2
        if self.cam_equality is not None:
            out["cam_equality"] = self.cam_equality
        return {"exactness": out}


@dataclass
class Table1Row:
    """Table 1 for one label: mean Grad-CAM L2 over the phantoms showing it and over all, HiResCAM's (0 when
    certified exact, else unknown)."""

    n_present: int
    gradcam_present: float | None
    gradcam_all: float | None
    hirescam: float | None

    def to_json(self) -> dict[str, Any]:
        return {"n_present": self.n_present, "gradcam_present": self.gradcam_present,
                "gradcam_all": self.gradcam_all, "hirescam": self.hirescam}


@dataclass
class ExactnessSummary:
    """The cohort: largest residuals per method, Table 1 per label, largest CAM deviation, and whether every
    phantom's certificate proves the maps exact."""

    max_abs_residual: dict[str, float | None]
    max_relative_residual: dict[str, float | None]
    table1: dict[str, Table1Row]
    cam_equality: dict[str, float | None] | None
    exact: bool

    def to_json(self) -> dict[str, Any]:
        return {"exactness": {"max_abs_residual": self.max_abs_residual,
                              "max_relative_residual": self.max_relative_residual,
                              "table1": {lab: row.to_json() for lab, row in self.table1.items()},
                              "cam_equality": self.cam_equality, "exact": self.exact}}


def _per_label(labels: Sequence[str], values: Any) -> PerLabel:
    """``[M]`` tensor -> label -> JSON number."""
    return {lab: json_number(v) for lab, v in zip(labels, values.tolist())}


def _largest(values: Any) -> float | None:
    """Largest absolute value of the non-missing values (None when there are none)."""
    return json_number(max((abs(v) for v in values if v is not None), default=math.nan))


@register_part
class ExactnessPart(PartBase[ExactnessCase, ExactnessSummary]):
    name = "exactness"
    cost = "0 extra passes"

    def run_case(self, run: SuiteRun, case: CaseView) -> ExactnessCase:
        methods, labels = run.options.methods, run.labels
        ex = exactness_record(case.explanation, methods)
        rec = ExactnessCase({m: _per_label(labels, ex["residual"][m][0]) for m in methods},
                            {m: _per_label(labels, ex["relative_residual"][m][0]) for m in methods})
        if "table1_l2" in ex:
            rec.table1_l2 = _per_label(labels, ex["table1_l2"][0])
        if "cam_equality" in ex:
            rec.cam_equality = {m: json_number(v[0].max()) for m, v in ex["cam_equality"].items()}
        return rec

    def summarise(self, run: SuiteRun, cases: Sequence[tuple[CaseRecord, ExactnessCase]]) -> ExactnessSummary | None:
        if not cases:
            return None
        methods = run.options.methods
        exact = all(c.certificate in EXACT_KINDS for c, _ in cases)
        table1: dict[str, Table1Row] = {}
        if all(r.table1_l2 is not None for _, r in cases):
            for lab in run.labels:
                pres = [r.table1_l2[lab] for c, r in cases if lab in c.labels and r.table1_l2 is not None]
                every = [r.table1_l2[lab] for _, r in cases if r.table1_l2 is not None]
                table1[lab] = Table1Row(len(pres), mean_of(pres), mean_of(every), 0.0 if exact else None)
        eq = [r.cam_equality for _, r in cases if r.cam_equality is not None]
        cam_eq = {m: _largest(e[m] for e in eq) for m in eq[0]} if eq else None
        return ExactnessSummary(
            {m: _largest(v for _, r in cases for v in r.residual[m].values()) for m in methods},
            {m: _largest(v for _, r in cases for v in r.relative_residual[m].values()) for m in methods},
            table1, cam_eq, exact)

    def render(self, summary: ExactnessSummary, options: SuiteOptions, labels: Sequence[str]) -> list[str]:
        methods = options.methods
        out = ["## Exactness (0 extra model passes)", ""]
        out += [md_table(["method", "max |s − s(0) − Σ map|", "max relative"],
                         [[method_title(m), summary.max_abs_residual[m], summary.max_relative_residual[m]]
                          for m in methods], 4), ""]
        if summary.table1:
            out += ["Table 1 analogue: L2 distance between min-max-normalised maps at feature resolution; HiResCAM is "
                    "the locations the model used " + ("(certified exact)" if summary.exact else "(NOT certified)"), ""]
            rows = [[lab, t.n_present, t.gradcam_present, t.gradcam_all, t.hirescam]
                    for lab, t in summary.table1.items()]
            out += [md_table(["label", "n present", "Grad-CAM L2 (present)", "Grad-CAM L2 (all scans)", "HiResCAM L2"],
                             rows), ""]
        if summary.cam_equality:
            out += ["CAM architecture: max relative |CAM − N·map|: "
                    + ", ".join(f"{method_title(m)} {fmt_number(v, 6)}" for m, v in summary.cam_equality.items()), ""]
        return out
