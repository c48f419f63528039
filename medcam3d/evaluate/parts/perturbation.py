"""The ``perturbation`` part: deletion / insertion curves and their areas per fill, for the chosen classes of the
first ``perturbation_scans`` phantoms (:mod:`medcam3d.evaluate.perturbation`).

Cost: ``4(T−1)`` forward passes per (scan, class, method) for deletion and insertion in MoRF and LeRF order, plus
``2 + 2(T−1)`` per (scan, fill) shared by all classes and methods (the end points and the random order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from torch import Tensor

from ...methods import method_title
from ..numbers import json_number, md_table, mean_curve, mean_of
from ..perturbation import MODES, perturbation_curves, perturbation_passes
from .base import CaseRecord, CaseView, PartBase, SuiteOptions, SuiteRun, register_part

__all__ = ["CurveKey", "CurveMean", "CurveRecord", "FillSummary", "PerturbationCase", "PerturbationPart",
           "PerturbationSummary"]


class CurveKey(NamedTuple):
    """Which curve: (fill, method, mode, order, label)."""

    fill: str
    method: str
    mode: str
    order: str
    label: str


@dataclass
class CurveRecord:
    """One curve: raw scores at each step and the area under them."""

    auc: float | None
    curve: list[float | None]

    def to_json(self) -> dict[str, Any]:
        return {"auc": self.auc, "curve": self.curve}


def _nest(items: dict[CurveKey, Any]) -> dict[str, Any]:
    """``{key: record}`` -> ``{fill: {method: {mode: {order: {label: record.to_json()}}}}}`` (insertion order)."""
    out: dict[str, Any] = {}
    for key, rec in items.items():
        out.setdefault(key.fill, {}).setdefault(key.method, {}).setdefault(key.mode, {}).setdefault(
            key.order, {})[key.label] = rec.to_json()
    return out


@dataclass
class PerturbationCase:
    """One phantom: every curve, keyed by (fill, method, mode, order, label)."""

    curves: dict[CurveKey, CurveRecord]

    def to_json(self) -> dict[str, Any]:
        return {"perturbation": _nest(self.curves)}


@dataclass
class CurveMean:
    """One (fill, method, mode, order) over every (scan, class) pair: mean area and point-wise mean curve."""

    auc: float | None
    curve: list[float | None] | None

    def to_json(self) -> dict[str, Any]:
        return {"auc": self.auc, "curve": self.curve}


@dataclass
class FillSummary:
    """One fill: means per (method, mode, order) and the number of (scan, class) pairs."""

    means: dict[tuple[str, str, str], CurveMean]
    n: int

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (m, mode, order), mean in self.means.items():
            out.setdefault(m, {}).setdefault(mode, {})[order] = mean.to_json()
        return {**out, "n": self.n}


@dataclass
class PerturbationSummary:
    """Per fill."""

    fills: dict[str, FillSummary]

    def to_json(self) -> dict[str, Any]:
        return {"perturbation": {fill: s.to_json() for fill, s in self.fills.items()}}


@register_part
class PerturbationPart(PartBase[PerturbationCase, PerturbationSummary]):
    name = "perturbation"
    cost = ("4(T-1) forward passes per (scan, class, method) for deletion+insertion in MoRF and LeRF order, "
            "plus 2 + 2(T-1) per (scan, fill) shared by all classes and methods (end points, random order)")
    pass_kinds: ClassVar[tuple[str, ...]] = ("perturbation",)

    def unit_passes(self, options: SuiteOptions) -> dict[str, int]:
        interior = max(options.steps - 1, 0)
        return {"perturbation_per_scan_class_method":
                4 * interior if set(options.modes) == set(MODES) else 2 * interior,
                "perturbation_per_scan_fill_shared": perturbation_passes(options.steps, 0, 0, len(options.modes))}

    def run_case(self, run: SuiteRun, case: CaseView) -> PerturbationCase | None:
        opt = run.options
        if not case.chosen or (opt.perturbation_scans is not None and case.case.index >= opt.perturbation_scans):
            return None
        idx = [run.labels.index(lab) for lab in case.chosen]
        x = case.case.x[0].to(opt.device)
        curves: dict[CurveKey, CurveRecord] = {}
        for fill in opt.fills:
            run.say(f"{case.case.name}: perturbation ({fill})")
            res = perturbation_curves(
                lambda b: run.model(b.to(opt.device)), x, {m: case.raw[m][idx] for m in opt.methods}, idx, fill,
                opt.steps, opt.orders, opt.modes, opt.batch_size, opt.seed, run.hu_to_input)
            run.spend("perturbation", res.passes)
            for m in opt.methods:
                for mode in opt.modes:
                    for order, c in res.curves[m][mode].items():
                        curves.update(_records(fill, m, mode, order, case.chosen, res.auc[m][mode][order], c))
        return PerturbationCase(curves)

    def summarise(self, run: SuiteRun, cases: Sequence[tuple[CaseRecord, PerturbationCase]]) -> PerturbationSummary:
        opt = run.options
        fills: dict[str, FillSummary] = {}
        for fill in opt.fills:
            means: dict[tuple[str, str, str], CurveMean] = {}
            n_pairs = 0
            for m in opt.methods:
                for mode in opt.modes:
                    for o in opt.orders:
                        items = [v for _, r in cases for k, v in r.curves.items() if k[:4] == (fill, m, mode, o)]
                        n_pairs = len(items)
                        means[(m, mode, o)] = CurveMean(mean_of(v.auc for v in items),
                                                        mean_curve([v.curve for v in items]))
            fills[fill] = FillSummary(means, n_pairs)
        return PerturbationSummary(fills)

    def render(self, summary: PerturbationSummary, options: SuiteOptions, labels: Sequence[str]) -> list[str]:
        if not summary.fills:
            return []
        out = ["## Perturbation (raw scores; area under the curve over the fraction of cells replaced)", ""]
        for fill, per in summary.fills.items():
            rows = []
            for m in options.methods:
                for mode in options.modes:
                    rows.append([method_title(m), mode, *[_auc(per, m, mode, o) for o in options.orders]])
            out += [f"Fill: {fill} ({per.n} (scan, class) pairs)", "",
                    md_table(["method", "mode", *options.orders], rows), ""]
        return out


def _records(fill: str, method: str, mode: str, order: str, labels: Sequence[str], auc: Tensor,
             curves: Tensor) -> dict[CurveKey, CurveRecord]:
    """``auc [K]`` and ``curves [K, T+1]`` of the K chosen labels as records."""
    return {CurveKey(fill, method, mode, order, lab): CurveRecord(json_number(auc[j]),
                                                                  [json_number(v) for v in curves[j].tolist()])
            for j, lab in enumerate(labels)}


def _auc(per: FillSummary, method: str, mode: str, order: str) -> float | None:
    mean = per.means.get((method, mode, order))
    return mean.auc if mean is not None else None
