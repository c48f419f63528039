"""The result of one run of the evaluation suite: typed records, their JSON form (``evaluation.json``) and the
markdown summary (``evaluation.md``).

:class:`EvaluationResult` holds the model, the options, the phantoms, costs and passes spent, each phantom's
:class:`~medcam3d.evaluate.parts.CaseRecord` and each part's summary record. :meth:`EvaluationResult.to_dict` is
the JSON form: ``{"model", "options", "phantoms", "costs", "passes", "passes_per_class", "timings", "summary",
"cases", "figure"}``; :func:`to_markdown` renders the summary, each part drawing its own section(s).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .parts import CaseRecord, JsonRecord, ModelUnderTest, SuiteOptions, get_part
from .parts.figure import FigureRecord

__all__ = ["EvaluationResult", "ModelInfo", "PhantomInfo", "to_markdown"]


@dataclass
class ModelInfo:
    """The model as the outputs name it, with the held-out AUROC of its model card (if any)."""

    name: str
    labels: list[str]
    held_out_auroc: Any = None
    mean_held_out_auroc: float | None = None
    synthetic_data_only: bool | None = None

    @classmethod
    def of(cls, mut: ModelUnderTest) -> ModelInfo:
        card: Mapping[str, Any] = mut.card or {}
        held_out = card.get("held_out") or {}
        return cls(mut.name, list(mut.labels), held_out.get("auroc"), held_out.get("mean_auroc"),
                   card.get("synthetic_data_only"))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "labels": self.labels, "held_out_auroc": self.held_out_auroc,
                "mean_held_out_auroc": self.mean_held_out_auroc, "synthetic_data_only": self.synthetic_data_only}


@dataclass
class PhantomInfo:
    """The phantoms: how many, their dataset seed, the network grid, how many choose the IoU thresholds."""

    n: int
    seed: int
    grid: list[int]
    validation: int

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, "grid": self.grid, "validation": self.validation}


@dataclass(eq=False)
class EvaluationResult:
    """Everything one run of :func:`~medcam3d.evaluate.suite.evaluate` found.

    Attributes:
        model, options, phantoms: what was evaluated, how, on what.
        costs: part (and ``"explanation"``) -> its model passes, in words.
        passes: model passes spent, by kind.
        passes_per_class: model passes per unit of work at these options (formulas of the parts).
        timings: seconds per step (``"explain"`` and every part).
        summaries: part name -> its summary record (parts that ran, in run order).
        cases: one record per phantom.
    """

    model: ModelInfo
    options: SuiteOptions
    phantoms: PhantomInfo
    costs: dict[str, str]
    passes: dict[str, int]
    passes_per_class: dict[str, int]
    timings: dict[str, float]
    summaries: dict[str, JsonRecord]
    cases: list[CaseRecord]

    @property
    def certificates(self) -> list[str]:
        """The certificate kinds of the phantoms' explanations, sorted, each once."""
        return sorted({c.certificate for c in self.cases})

    @property
    def placements(self) -> list[str]:
        """Where the phantoms' cells were placed and how that was found, e.g. ``"receptive (declared)"``, sorted,
        each once (per case in evaluation.json: ``placement``)."""
        return sorted({f"{p['kind']} ({p['source']})" if p else "unknown" for p in (c.placement for c in self.cases)})

    @property
    def figure(self) -> FigureRecord | None:
        """The step-by-step figure's record, when the figure part drew one."""
        record = self.summaries.get("figure")
        return record if isinstance(record, FigureRecord) else None

    def summary_dict(self) -> dict[str, Any]:
        """The ``summary`` entry of evaluation.json: the certificate kinds, then each part's summary."""
        out: dict[str, Any] = {"certificate": self.certificates, "placement": self.placements}
        for record in self.summaries.values():
            out.update(record.to_json())
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (evaluation.json without the command line)."""
        figure = self.figure
        return {
            "model": self.model.to_json(),
            "options": self.options.to_json(),
            "phantoms": self.phantoms.to_json(),
            "costs": dict(self.costs),
            "passes": dict(self.passes),
            "passes_per_class": dict(self.passes_per_class),
            "timings": dict(self.timings),
            "summary": self.summary_dict(),
            "cases": [c.to_dict() for c in self.cases],
            "figure": figure.info() if figure is not None else None,
        }

    def __getitem__(self, key: str) -> Any:
        """``result["summary"]`` etc.: the JSON form's entries (``"_figure"``: the figure's feature breakdown).

        Kept for one release: :func:`~medcam3d.evaluate.suite.evaluate` returned that dict before it returned this
        record; new code reads the typed attributes or :meth:`to_dict`."""
        if key == "_figure":
            return self.figure.breakdown if self.figure is not None else None
        return self.to_dict()[key]


def to_markdown(result: EvaluationResult, title: str = "medcam3d evaluation", command: str | None = None) -> str:
    """A markdown summary of a result: a header, each part's tables (per-case records stay in the JSON), costs."""
    out = _header(result, title, command)
    for name, summary in result.summaries.items():
        out += get_part(name)().render(summary, result.options, result.model.labels)
    out += ["## Costs (model passes)", ""]
    out += [f"- {k}: {v}" for k, v in result.costs.items()]
    out += ["", "Passes spent: " + ", ".join(f"{k} {v}" for k, v in result.passes.items()) + "; seconds: "
            + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items() if v), ""]
    return "\n".join(out)


def _header(result: EvaluationResult, title: str, command: str | None) -> list[str]:
    out = [f"# {title}", ""]
    if command:
        out += [f"Command: `{command}`", ""]
    ph, model = result.phantoms, result.model
    out += [(f"Model: {model.name}; phantoms: {ph.n} (seed {ph.seed}, grid {ph.grid}, first {ph.validation} used to "
            f"choose IoU thresholds); certificate: {', '.join(result.certificates)}; cells placed: "
            f"{'; '.join(result.placements)}."), ""]
    if model.mean_held_out_auroc is not None:
        out += [f"Held-out mean AUROC from the model card: {model.mean_held_out_auroc:.3f}"
                + (" (synthetic phantoms only)" if model.synthetic_data_only else "") + ".", ""]
    return out
