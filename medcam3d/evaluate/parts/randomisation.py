"""The ``randomisation`` part: cascading / independent parameter randomisation curves
(:mod:`medcam3d.evaluate.randomization`), HiResCAM and Grad-CAM alike.

Cohort level: the layer groups are found once, on the first phantom with a chosen class, and shared by the whole
cohort (every curve has the same points); at most ``randomisation_scans`` phantoms are randomised. Cost: 1
explanation per (scan, layer group, mode), shared by all classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ...methods import method_title
from ..numbers import json_number, md_table, mean_curve
from ..randomization import SIMILARITIES, randomization_curves, randomization_groups
from .base import CaseRecord, CaseView, PartBase, SuiteOptions, SuiteRun, register_part

__all__ = ["RandomisationCase", "RandomisationCurves", "RandomisationMean", "RandomisationPart",
           "RandomisationSummary"]

Curve = list[float | None]


@dataclass
class RandomisationCurves:
    """One (phantom, mode): the randomised layer groups and, per (method, similarity, label), the curve (index 0:
    the trained model)."""

    layers: list[str]
    similarity: dict[str, dict[str, dict[str, Curve]]]


@dataclass
class RandomisationCase:
    """One randomised phantom, per mode (kept for the summary; not written into the case's JSON entry)."""

    modes: dict[str, RandomisationCurves]

    def to_json(self) -> dict[str, Any]:
        return {}


@dataclass
class RandomisationMean:
    """One mode over every (scan, class) pair: the layer labels, the number of pairs and the mean curve per
    (method, similarity)."""

    layers: list[str]
    n: int
    curves: dict[str, dict[str, Curve | None]]

    def to_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "n": self.n, **self.curves}


@dataclass
class RandomisationSummary:
    """Per mode (those with at least one phantom)."""

    modes: dict[str, RandomisationMean]

    def to_json(self) -> dict[str, Any]:
        return {"randomisation": {mode: s.to_json() for mode, s in self.modes.items()}}


@register_part
class RandomisationPart(PartBase[RandomisationCase, RandomisationSummary]):
    name = "randomisation"
    cost = "1 explanation per (scan, layer group, mode), shared by all classes"
    pass_kinds: ClassVar[tuple[str, ...]] = ("randomisation",)

    def __init__(self) -> None:
        self.groups: list[list[str]] | None = None  # found on the first randomised phantom, shared by the cohort
        self.done = 0  # phantoms randomised so far

    def run_case(self, run: SuiteRun, case: CaseView) -> RandomisationCase | None:
        opt = run.options
        if not (case.chosen and opt.randomisation) or (
                opt.randomisation_scans is not None and self.done >= opt.randomisation_scans):
            return None
        idx = [run.labels.index(lab) for lab in case.chosen]
        x = case.case.x.to(opt.device)
        if self.groups is None:
            self.groups = randomization_groups(run.model, x, opt.randomisation_depth)
        original = {m: case.explanation.raw[m][:, idx] for m in opt.methods}
        rec = RandomisationCase({})
        for mode in opt.randomisation:
            run.say(f"{case.case.name}: {mode} randomisation")
            rc = randomization_curves(run.model, x, run.explainer_kwargs, idx, mode, self.groups, seed=opt.seed,
                                      original=original)
            run.spend("randomisation", rc["passes"])
            rec.modes[mode] = RandomisationCurves(rc["layers"], {m: _curves(per, case.chosen)
                                                                 for m, per in rc["similarity"].items()})
        self.done += 1
        return rec

    def summarise(self, run: SuiteRun, cases: Sequence[tuple[CaseRecord, RandomisationCase]]) -> RandomisationSummary:
        modes: dict[str, RandomisationMean] = {}
        for mode in run.options.randomisation:
            recs = [r.modes[mode] for _, r in cases if mode in r.modes]
            if not recs:
                continue
            mean = RandomisationMean(["(trained)", *recs[0].layers], 0, {})
            for m in run.options.methods:
                mean.curves[m] = {}
                for s in SIMILARITIES:
                    curves = [cv for r in recs for cv in r.similarity[m][s].values()]
                    mean.curves[m][s] = mean_curve(curves)
                    mean.n = len(curves)
            modes[mode] = mean
        return RandomisationSummary(modes)

    def render(self, summary: RandomisationSummary, options: SuiteOptions, labels: Sequence[str]) -> list[str]:
        if not summary.modes:
            return []
        out = ["## Parameter randomisation (similarity to the trained model's maps)", ""]
        for mode, e in summary.modes.items():
            rows = []
            for j, layer in enumerate(e.layers):
                r: list[Any] = [layer]
                for m in options.methods:
                    r += [_point(e.curves[m][s], j) for s in SIMILARITIES]
                rows.append(r)
            heads = ["randomised up to" if mode == "cascading" else "randomised layer"]
            for x in (method_title(m) for m in options.methods):
                heads += [f"{x} Spearman", f"{x} |Spearman|", f"{x} SSIM"]
            out += [f"{mode.capitalize()} ({e.n} (scan, class) pairs):", "", md_table(heads, rows), ""]
        return out


def _curves(per_similarity: dict[str, Tensor], labels: Sequence[str]) -> dict[str, dict[str, Curve]]:
    """similarity -> ``[1, K, G+1]`` curves of one phantom -> similarity -> label -> curve."""
    return {s: {lab: [json_number(v) for v in t[0, j].tolist()] for j, lab in enumerate(labels)}
            for s, t in per_similarity.items()}


def _point(curve: Curve | None, j: int) -> float | None:
    return curve[j] if curve else None
