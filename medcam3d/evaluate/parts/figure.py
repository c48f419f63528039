"""The ``figure`` part: the paper's step-by-step figure (Figure 7) for one (scan, class), 0 extra model passes
(:mod:`medcam3d.evaluate.figure`).

Drawn for the first phantom showing ``figure_label`` (default: the first phantom with a present label, for its
first present label), from the kept activations and gradients; written as ``step_by_step.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..figure import FeatureBreakdown, plot_step_by_step, step_by_step
from ..numbers import json_number
from .base import (
    CaseRecord,
    CaseView,
    PartBase,
    SuiteOptions,
    SuiteRun,
    WrittenFile,
    register_part,
)

__all__ = ["FIGURE_PNG", "FigurePart", "FigureRecord"]

FIGURE_PNG = "step_by_step.png"


@dataclass
class FigureRecord:
    """The figure's (scan, class), its raw score and the per-feature breakdown of both maps (not in the JSON)."""

    case: str
    label: str
    score: float | None
    breakdown: dict[str, FeatureBreakdown] = field(repr=False)

    def info(self) -> dict[str, Any]:
        """What evaluation.json records of the figure (its top-level ``figure`` entry)."""
        return {"case": self.case, "label": self.label, "score": self.score}

    def to_json(self) -> dict[str, Any]:
        return {}  # neither in the case's entry nor in the summary: evaluation.json has it at the top level


@register_part
class FigurePart(PartBase[FigureRecord, FigureRecord]):
    name = "figure"
    cost = "0 extra passes"

    def __init__(self) -> None:
        self.made = False  # one figure per run

    def run_case(self, run: SuiteRun, case: CaseView) -> FigureRecord | None:
        want = run.options.figure_label
        label = (want if want in case.present else None) if want is not None else next(iter(case.present), None)
        exp = case.explanation
        if self.made or label is None or exp.activations is None or exp.gradients is None:
            return None
        k = run.labels.index(label)
        self.made = True
        return FigureRecord(case.case.name, label, json_number(case.scores[k]),
                            step_by_step(exp.activations[0], exp.gradients[0, k], run.options.top_features))

    def summarise(self, run: SuiteRun, cases: Sequence[tuple[CaseRecord, FigureRecord]]) -> FigureRecord | None:
        return cases[0][1] if cases else None

    def render(self, summary: FigureRecord, options: SuiteOptions, labels: Sequence[str]) -> list[str]:
        return []  # the figure is linked below the tables once written (:meth:`write`)

    def write(self, summary: FigureRecord, out: Path) -> list[WrittenFile]:
        score = f"{summary.score:+.3f}" if summary.score is not None else "–"
        path = plot_step_by_step(summary.breakdown, out / FIGURE_PNG,
                                 title=f"{summary.label} on {summary.case} (score {score}): Grad-CAM = Σ α_f A^f, "
                                       "HiResCAM = Σ ∂s/∂A^f ⊙ A^f")
        return [WrittenFile("figure", path, f"\n![step by step]({FIGURE_PNG})\n")]
