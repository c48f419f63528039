"""The ``localisation`` part: what the maps say about where the model looks (0 extra model passes).

Per (phantom, present label, method): relevance mass (share of positive contribution inside the lesion, feature
resolution), relevance rank accuracy, pointing game and the IoU curve of the display heatmap (upsampled to the
network grid) over the paper's thresholds; per chosen label with allowed organs, the allowed-region score a/(a+b).

Cohort level (:meth:`LocalisationPart.summarise`): the best-threshold IoU of the paper's Table 2 -- the threshold
with the best mean IoU on the validation phantoms (the first ``validation_fraction``) applied to the others.
As Draelos & Carin insist, these numbers describe the *model* (where it looks), not whether a map is right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...heatmaps import to_heatmap
from ...methods import method_title
from ..metrics import (
    IOU_THRESHOLDS,
    allowed_region_score,
    best_threshold_iou,
    block_fractions,
    iou_curve,
    pointing_game,
    relevance_mass,
    relevance_rank_accuracy,
)
from ..numbers import fmt_number, json_number, md_table, mean_of
from .base import CaseRecord, CaseView, PartBase, SuiteOptions, SuiteRun, register_part

__all__ = ["AllowedRow", "IouChoice", "LocalisationCase", "LocalisationMean", "LocalisationMetrics",
           "LocalisationPart", "LocalisationRow", "LocalisationSummary"]


@dataclass
class LocalisationMetrics:
    """One (phantom, label, method)."""

    relevance_mass: float | None
    rank_accuracy: float | None
    pointing: float | None
    iou_max: float | None

    def to_json(self) -> dict[str, Any]:
        return {"relevance_mass": self.relevance_mass, "rank_accuracy": self.rank_accuracy,
                "pointing": self.pointing, "iou_max": self.iou_max}


@dataclass
class LocalisationCase:
    """One phantom: metrics per (present label, method), a/(a+b) per (chosen label with allowed organs, method),
    and the IoU curves kept for the cohort's threshold choice (not written to the JSON)."""

    metrics: dict[str, dict[str, LocalisationMetrics]]
    allowed: dict[str, dict[str, float | None]]
    iou_curves: dict[str, dict[str, list[float]]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"localisation": {lab: {m: x.to_json() for m, x in per.items()} for lab, per in self.metrics.items()},
                "allowed_region": self.allowed}


@dataclass
class IouChoice:
    """The threshold chosen on the validation phantoms and the mean IoU of both splits at it
    (:func:`~medcam3d.evaluate.metrics.best_threshold_iou`; None where undefined)."""

    threshold: float | None
    index: int
    validation: float | None
    test: float | None
    n_validation: int
    n_test: int

    @classmethod
    def choose(cls, validation: list[list[float]], test: list[list[float]]) -> IouChoice:
        best = best_threshold_iou(np.array(validation).reshape(-1, len(IOU_THRESHOLDS)),
                                  np.array(test).reshape(-1, len(IOU_THRESHOLDS)))
        return cls(json_number(best["threshold"]), int(best["index"]), json_number(best["validation"]),
                   json_number(best["test"]), int(best["n_validation"]), int(best["n_test"]))

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "index": self.index, "validation": self.validation, "test": self.test,
                "n_validation": self.n_validation, "n_test": self.n_test}


@dataclass
class LocalisationMean:
    """One (label, method) over the phantoms showing the label."""

    relevance_mass: float | None
    rank_accuracy: float | None
    pointing: float | None
    iou: IouChoice

    def to_json(self) -> dict[str, Any]:
        return {"relevance_mass": self.relevance_mass, "rank_accuracy": self.rank_accuracy,
                "pointing": self.pointing, "iou": self.iou.to_json()}


@dataclass
class LocalisationRow:
    """One label: the number of phantoms showing it and the means per method."""

    n: int
    methods: dict[str, LocalisationMean]

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, **{m: x.to_json() for m, x in self.methods.items()}}


@dataclass
class AllowedRow:
    """One label: the number of phantoms scored and the mean a/(a+b) per method."""

    n: int
    methods: dict[str, float | None]

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, **self.methods}


@dataclass
class LocalisationSummary:
    """Per label: localisation means (labels shown at least once) and allowed-region means."""

    rows: dict[str, LocalisationRow]
    allowed: dict[str, AllowedRow]

    def to_json(self) -> dict[str, Any]:
        return {"localisation": {lab: r.to_json() for lab, r in self.rows.items()},
                "allowed_region": {lab: r.to_json() for lab, r in self.allowed.items()}}


@register_part
class LocalisationPart(PartBase[LocalisationCase, LocalisationSummary]):
    name = "localisation"
    cost = "0 extra passes"

    def run_case(self, run: SuiteRun, case: CaseView) -> LocalisationCase:
        rec = LocalisationCase({}, {})
        for lab in case.present:
            k = run.labels.index(lab)
            mask = case.case.lesions[lab]
            rec.metrics[lab] = {}
            for m in run.options.methods:
                heat = to_heatmap(case.raw[m][None, [k]], case.grid_shape, geometry=case.display_geometry)[0, 0]
                curve = iou_curve(heat, mask).numpy()
                rec.iou_curves.setdefault(lab, {})[m] = curve.tolist()
                rec.metrics[lab][m] = LocalisationMetrics(
                    json_number(relevance_mass(case.raw[m][k], case.fractions[lab])),
                    json_number(relevance_rank_accuracy(heat, mask)), json_number(pointing_game(heat, mask)),
                    json_number(np.nanmax(curve)) if np.isfinite(curve).any() else None)
        for lab in case.chosen:
            organs = run.mut.allowed_regions.get(lab)
            if organs:
                rec.allowed[lab] = self._allowed(run, case, lab, organs)
        return rec

    @staticmethod
    def _allowed(run: SuiteRun, case: CaseView, label: str, organs: Sequence[str]) -> dict[str, float | None]:
        """a/(a+b) of each method for ``label`` with the union of ``organs`` allowed."""
        region = torch.zeros(case.grid_shape, dtype=torch.bool)
        for o in organs:
            if o in case.case.organs:
                region |= case.case.organs[o]
        frac = block_fractions(region, case.map_shape, case.geometry)
        k = run.labels.index(label)
        return {m: json_number(allowed_region_score(case.raw[m][k], frac)) for m in run.options.methods}

    def summarise(self, run: SuiteRun, cases: Sequence[tuple[CaseRecord, LocalisationCase]]) -> LocalisationSummary:
        rows: dict[str, LocalisationRow] = {}
        allowed: dict[str, AllowedRow] = {}
        for lab in run.labels:
            shown = [(c.index, r) for c, r in cases if lab in r.metrics]
            if shown:
                rows[lab] = LocalisationRow(len(shown), {m: self._mean(run, lab, m, shown)
                                                         for m in run.options.methods})
            scored = [r.allowed[lab] for _, r in cases if lab in r.allowed]
            if scored:
                allowed[lab] = AllowedRow(len(scored), {m: mean_of(a[m] for a in scored) for m in run.options.methods})
        return LocalisationSummary(rows, allowed)

    @staticmethod
    def _mean(run: SuiteRun, label: str, method: str, shown: list[tuple[int, LocalisationCase]]) -> LocalisationMean:
        """Means over the phantoms showing ``label``; the IoU threshold chosen on the validation phantoms."""
        per = [r.metrics[label][method] for _, r in shown]
        curves = [(i, r.iou_curves[label][method]) for i, r in shown]
        iou = IouChoice.choose([cv for i, cv in curves if i < run.n_validation],
                               [cv for i, cv in curves if i >= run.n_validation])
        return LocalisationMean(mean_of(x.relevance_mass for x in per), mean_of(x.rank_accuracy for x in per),
                                mean_of(x.pointing for x in per), iou)

    def render(self, summary: LocalisationSummary, options: SuiteOptions, labels: Sequence[str]) -> list[str]:
        methods = options.methods
        titles = [method_title(m) for m in methods]
        out: list[str] = []
        if summary.rows:
            out += ["## Describing the model: localisation", ""]
            heads = ["label", "n"]
            for t in titles:
                heads += [f"{t} mass", f"{t} rank acc.", f"{t} pointing", f"{t} IoU (t)"]
            rows = []
            for lab, e in summary.rows.items():
                r: list[Any] = [lab, e.n]
                for m in methods:
                    x = e.methods[m]
                    r += [x.relevance_mass, x.rank_accuracy, x.pointing,
                          f"{fmt_number(x.iou.test)} ({fmt_number(x.iou.threshold, 2)})"]
                rows.append(r)
            out += [md_table(heads, rows), ""]
        if summary.allowed:
            out += ["Allowed-region score a/(a+b) (share of positive contribution inside the allowed organs):", ""]
            out += [md_table(["label", "n", *titles],
                             [[lab, a.n, *[a.methods[m] for m in methods]] for lab, a in summary.allowed.items()]), ""]
        return out
