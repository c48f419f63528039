"""The evaluation suite on phantoms: every part of :mod:`medcam3d.evaluate` for one model, one call.

:func:`evaluate` explains each phantom once (all classes, every method, activations and gradients kept) and runs
the parts asked for on it (:mod:`medcam3d.evaluate.parts`, one module per part, registered by name):

``exactness``      completeness residuals, Table-1 L2 (Grad-CAM from        0 extra passes
                   HiResCAM), CAM equality
``ground_truth``   share of each method's positive contribution in the
                   lesion / marker vs chance; score change when the
                   lesion / marker is removed                               1 pass per (scan, removed object)
``localisation``   relevance mass, rank accuracy, pointing game,
                   best-threshold IoU, allowed-region score a/(a+b)         0 extra passes
``perturbation``   deletion / insertion curves and AUCs (MoRF, LeRF,        4(T−1) per (scan, class, method)
                   random) per fill                                         + 2T per (scan, fill)
``randomisation``  cascading / independent parameter randomisation curves   1 explanation per (scan, layer group, mode)
``figure``         the step-by-step figure for one (scan, class)            0 extra passes

Which classes: ``"present"`` (default) evaluates, on each phantom, the classes whose lesion it shows (ground truth
exists only for them); ``"all"`` or a list of labels widens exactness, allowed-region scores and perturbation to
those classes (localisation and ground truth always need a lesion). Table 1 and the certificate always cover all
classes (they are free). Best-threshold IoU uses the first ``validation_fraction`` of the phantoms (by index) to
choose each label's threshold and reports the others (the paper's Table 2 protocol).

The result is an :class:`~medcam3d.evaluate.result.EvaluationResult` (typed records; ``to_dict()`` is the JSON of
``evaluation.json``: ``cases`` per phantom and ``summary`` means per label and method); :func:`to_markdown` renders
it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..explainer import Explainer
from ..methods import method_title
from .numbers import md_table
from .parts import (
    PARTS,
    REGISTRY,
    CaseRecord,
    CaseView,
    JsonRecord,
    ModelUnderTest,
    Part,
    SuiteOptions,
    SuiteRun,
)
from .result import EvaluationResult, ModelInfo, PhantomInfo, to_markdown

if TYPE_CHECKING:  # types only: importing phantoms loads scipy (through medcam3d.data); the suite never needs it
    from .phantoms import PhantomSource

__all__ = ["COSTS", "PARTS", "EvaluationResult", "ModelUnderTest", "SuiteOptions", "costs", "evaluate",
           "md_table", "method_name", "to_markdown"]

EXPLANATION_COST = ("1 forward pass + 1 batched head backward per scan (all classes at once), plus for the "
                    "certificate n_probes + 1 head-only evaluations and n_probes single head backwards")


def costs() -> dict[str, str]:
    """Model passes of the explanation and of every registered part, in words (``costs`` in evaluation.json)."""
    return {"explanation": EXPLANATION_COST, **{name: part.cost for name, part in REGISTRY.items()}}


#: The costs of the built-in parts (as stated in the output; T = perturbation steps, G = layer groups).
COSTS = costs()

#: Kept for one release: the display name of a method is :func:`medcam3d.methods.method_title`.
method_name = method_title


def evaluate(
    mut: ModelUnderTest,
    source: PhantomSource,
    options: SuiteOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Run the suite on every phantom of ``source``.

    Args:
        mut: the model under test.
        source: the phantoms (on the model's network grid), e.g. a :class:`~medcam3d.evaluate.phantoms.PhantomSource`.
        options: what to run (default :class:`SuiteOptions`).
        progress: called with a short message per step.

    Returns:
        The :class:`~medcam3d.evaluate.result.EvaluationResult` (``to_dict()``: the JSON of evaluation.json).
    """
    opt = options or SuiteOptions()
    opt.check()
    run = SuiteRun.start(mut, source, opt, progress)
    parts: dict[str, Part[JsonRecord, JsonRecord]] = {name: cls() for name, cls in REGISTRY.items()
                                                      if name in opt.parts}
    timings = {"explain": 0.0, **{name: 0.0 for name in REGISTRY}}
    cases: list[CaseRecord] = []
    with Explainer(run.model, keep_gradients=True, **run.explainer_kwargs) as explainer:
        for i in range(len(source)):
            view = _explain(run, explainer, i, timings)
            cases.append(_run_parts(run, parts, view, timings))
    summaries: dict[str, JsonRecord] = {}
    for name, part in parts.items():
        summary = part.summarise(run, [(c, c.records[name]) for c in cases if name in c.records])
        if summary is not None:
            summaries[name] = summary
    return EvaluationResult(
        ModelInfo.of(mut), opt, PhantomInfo(len(source), source.seed, list(source.grid.shape), run.n_validation),
        costs(), run.passes, {k: v for cls in REGISTRY.values() for k, v in cls().unit_passes(opt).items()},
        {k: round(v, 3) for k, v in timings.items()}, summaries, cases)


def _explain(run: SuiteRun, explainer: Explainer, i: int, timings: dict[str, float]) -> CaseView:
    """Render phantom ``i`` and explain it (one forward pass + one batched head backward)."""
    case = run.source.case(i)
    run.say(f"{case.name}: explaining")
    t0 = time.perf_counter()
    exp = explainer(case.x.to(run.options.device)).cpu()
    timings["explain"] += time.perf_counter() - t0
    run.spend("explain")
    return CaseView.of(run, case, exp)


def _run_parts(run: SuiteRun, parts: dict[str, Part[JsonRecord, JsonRecord]], view: CaseView,
               timings: dict[str, float]) -> CaseRecord:
    """Every selected part on one explained phantom; its record keeps what they returned."""
    record = CaseRecord.of(view, run.labels)
    for name, part in parts.items():
        t0 = time.perf_counter()
        rec = part.run_case(run, view)
        timings[name] += time.perf_counter() - t0
        if rec is not None:
            record.records[name] = rec
    return record
