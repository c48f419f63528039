"""The ``ground_truth`` part: ground truth by construction.

For every label a phantom shows, the share of each method's positive contribution inside the lesion (feature
resolution, block fractions; :func:`~medcam3d.evaluate.metrics.relevance_mass`) against chance (the lesion's volume
share), and the model's actual use of the lesion: the raw-score drop when the same patient is rendered without it.
The same for the Clever-Hans marker, for every label. Cost: 0 passes for the shares, 1 forward pass per (scan,
removed lesion or marker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ...methods import method_title
from ..metrics import block_fractions, chance_share, relevance_mass
from ..numbers import fmt_number, json_number, md_table, mean_of
from .base import CaseRecord, CaseView, PartBase, SuiteOptions, SuiteRun, register_part

__all__ = ["GroundTruthCase", "GroundTruthPart", "GroundTruthSummary", "LesionEvidence", "LesionSummary",
           "MarkerEvidence", "MarkerSummary", "Removal"]

PerLabel = dict[str, float | None]


@dataclass
class Removal:
    """The raw score of a label with and without an object, and the drop ``score − score_without``."""

    score: float | None
    score_without: float | None
    score_drop: float | None


@dataclass
class LesionEvidence:
    """One (phantom, label): chance share, each method's share inside the lesion, the score drop without it."""

    chance: float
    share: dict[str, float | None]
    removal: Removal | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"chance": self.chance, "share": self.share}
        if self.removal is not None:
            out.update(score=self.removal.score, score_without=self.removal.score_without,
                       score_drop=self.removal.score_drop)
        return out


@dataclass
class MarkerEvidence:
    """One phantom with the marker: chance share, each (method, label)'s share on it, score drops without it."""

    chance: float
    share: dict[str, PerLabel]
    score_drop: PerLabel | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"chance": self.chance, "share": self.share}
        if self.score_drop is not None:
            out["score_drop"] = self.score_drop
        return out


@dataclass
class GroundTruthCase:
    """One phantom: evidence per present label, and on the marker when it carries one."""

    lesions: dict[str, LesionEvidence]
    marker: MarkerEvidence | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ground_truth": {lab: e.to_json() for lab, e in self.lesions.items()}}
        if self.marker is not None:
            out["marker_ground_truth"] = self.marker.to_json()
        return out


@dataclass
class LesionSummary:
    """One label over the phantoms showing it: means of chance, shares, lift (share / chance) and score drop."""

    n: int
    chance: float | None
    share: dict[str, float | None]
    lift: dict[str, float | None]
    score_drop: float | None

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "chance": self.chance, "share": self.share, "lift": self.lift,
                "score_drop": self.score_drop}


@dataclass
class MarkerSummary:
    """The marker over the phantoms carrying it: mean chance, shares per (method, label), score drops per label."""

    n: int
    chance: float | None
    share: dict[str, PerLabel]
    score_drop: PerLabel | None

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "chance": self.chance, "share": self.share, "score_drop": self.score_drop}


@dataclass
class GroundTruthSummary:
    """Per label (those shown at least once), and the marker (when some phantom carries it)."""

    lesions: dict[str, LesionSummary]
    marker: MarkerSummary | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ground_truth": {lab: s.to_json() for lab, s in self.lesions.items()}}
        if self.marker is not None:
            out["marker"] = self.marker.to_json()
        return out


@register_part
class GroundTruthPart(PartBase[GroundTruthCase, GroundTruthSummary]):
    name = "ground_truth"
    cost = "0 extra passes for the shares; 1 forward pass per (scan, removed lesion or marker)"
    pass_kinds: ClassVar[tuple[str, ...]] = ("removal",)

    def unit_passes(self, options: SuiteOptions) -> dict[str, int]:
        return {"removal_per_scan_object": 1}

    def run_case(self, run: SuiteRun, case: CaseView) -> GroundTruthCase:
        return GroundTruthCase({lab: self._lesion(run, case, lab) for lab in case.present}, self._marker(run, case))

    def _lesion(self, run: SuiteRun, case: CaseView, label: str) -> LesionEvidence:
        k = run.labels.index(label)
        frac = case.fractions[label]
        entry = LesionEvidence(chance_share(frac),
                               {m: json_number(relevance_mass(case.raw[m][k], frac)) for m in run.options.methods})
        if run.options.removal:
            without = run.scores(run.source.without(case.case, [label]))[0]
            run.spend("removal")
            s = case.scores
            entry.removal = Removal(json_number(s[k]), json_number(without[k]), json_number(s[k] - without[k]))
        return entry

    def _marker(self, run: SuiteRun, case: CaseView) -> MarkerEvidence | None:
        if case.case.marker is None:
            return None
        frac = block_fractions(case.case.marker, case.map_shape, case.geometry)
        share = {m: _per_label(run.labels, relevance_mass(case.raw[m], frac)) for m in run.options.methods}  # [M]
        mk = MarkerEvidence(chance_share(frac), share)
        if run.options.removal:
            without = run.scores(run.source.without(case.case, ["marker"]))[0]
            run.spend("removal")
            mk.score_drop = _per_label(run.labels, case.scores - without)
        return mk

    def summarise(self, run: SuiteRun, cases: Sequence[tuple[CaseRecord, GroundTruthCase]]) -> GroundTruthSummary:
        methods = run.options.methods
        lesions: dict[str, LesionSummary] = {}
        for lab in run.labels:
            rs = [r.lesions[lab] for _, r in cases if lab in r.lesions]
            if not rs:
                continue
            chance = mean_of(e.chance for e in rs)
            share = {m: mean_of(e.share[m] for e in rs) for m in methods}
            lift = {m: (v / chance if v is not None and chance else None) for m, v in share.items()}
            drop = mean_of(e.removal.score_drop if e.removal else None for e in rs)
            lesions[lab] = LesionSummary(len(rs), chance, share, lift, drop)
        return GroundTruthSummary(lesions, _marker_summary([r.marker for _, r in cases if r.marker is not None],
                                                           methods, run.labels))

    def render(self, summary: GroundTruthSummary, options: SuiteOptions, labels: Sequence[str]) -> list[str]:
        methods = options.methods
        titles = [method_title(m) for m in methods]
        out: list[str] = []
        if summary.lesions:
            out += ["## Ground truth by construction", "",
                    ("Share of each method's positive contribution inside the lesion (chance = the lesion's volume "
                    "share), and the raw-score drop when the lesion is removed from the same patient."), ""]
            rows = [[lab, g.n, g.chance, *[g.share[m] for m in methods], g.score_drop]
                    for lab, g in summary.lesions.items()]
            out += [md_table(["label", "n", "chance", *[f"{x} share" for x in titles], "score drop"], rows), ""]
        mk = summary.marker
        if mk:
            out += [f"Marker ({mk.n} phantoms; chance share {fmt_number(mk.chance, 4)}):", ""]
            rows = [[lab, *[mk.share[m][lab] for m in methods], (mk.score_drop or {}).get(lab)] for lab in labels]
            out += [md_table(["label", *[f"{x} share on marker" for x in titles], "score drop without marker"], rows,
                             4), ""]
        return out


def _per_label(labels: Sequence[str], values: Any) -> PerLabel:
    """``[M]`` tensor -> label -> JSON number."""
    return {lab: json_number(v) for lab, v in zip(labels, values.tolist())}


def _marker_summary(marks: list[MarkerEvidence], methods: Sequence[str], labels: Sequence[str]) -> MarkerSummary | None:
    """Means over the phantoms carrying the marker (None when none does)."""
    if not marks:
        return None
    share = {m: {lab: mean_of(r.share[m][lab] for r in marks) for lab in labels} for m in methods}
    drops = ({lab: mean_of(r.score_drop[lab] for r in marks if r.score_drop is not None) for lab in labels}
             if marks[0].score_drop is not None else None)
    return MarkerSummary(len(marks), mean_of(r.chance for r in marks), share, drops)
