"""The evaluation suite on phantoms: every part of :mod:`medcam3d.evaluate` for one model, one call.

:func:`evaluate` explains each phantom once (all classes, both methods, activations and gradients kept) and runs
the parts asked for:

``exactness``      completeness residuals, Table-1 L2 (Grad-CAM from HiResCAM), CAM equality       0 extra passes
``ground_truth``   share of each method's positive contribution in the lesion / marker vs chance;
                   score change when the lesion / marker is removed                                 1 pass per (scan, removed object)
``localisation``   relevance mass, rank accuracy, pointing game, best-threshold IoU, allowed-region
                   score a/(a+b)                                                                    0 extra passes
``perturbation``   deletion / insertion curves and AUCs (MoRF, LeRF, random) per fill               4(T−1) per (scan, class, method)
                                                                                                    + 2T per (scan, fill)
``randomisation``  cascading / independent parameter randomisation curves                           1 explanation per (scan, layer group, mode)
``figure``         the step-by-step figure for one (scan, class)                                    0 extra passes

Which classes: ``"present"`` (default) evaluates, on each phantom, the classes whose lesion it shows (ground truth
exists only for them); ``"all"`` or a list of labels widens exactness, allowed-region scores and perturbation to
those classes (localisation and ground truth always need a lesion). Table 1 and the certificate always cover all
classes (they are free). Best-threshold IoU uses the first ``validation_fraction`` of the phantoms (by index) to
choose each label's threshold and reports the others (the paper's Table 2 protocol).

The result is a JSON-serialisable dict: ``cases`` (per phantom records) and ``summary`` (means per label and
method); :func:`to_markdown` renders it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..heatmaps import to_heatmap
from .exactness import exactness_record
from .metrics import (
    IOU_THRESHOLDS,
    allowed_region_score,
    best_threshold_iou,
    block_fractions,
    chance_share,
    iou_curve,
    pointing_game,
    relevance_mass,
    relevance_rank_accuracy,
)
from .perturbation import MODES, ORDERS, perturbation_curves, perturbation_passes
from .phantoms import PhantomSource
from .randomization import randomization_curves, randomization_groups

__all__ = ["COSTS", "PARTS", "ModelUnderTest", "SuiteOptions", "evaluate", "to_markdown"]

PARTS = ("exactness", "ground_truth", "localisation", "perturbation", "randomisation", "figure")

#: Model passes per (scan, class), as stated in the output (T = perturbation steps, G = layer groups).
COSTS = {
    "explanation": "1 forward pass + 1 batched head backward per scan (all classes at once), plus for the "
                   "certificate n_probes + 1 head-only evaluations and n_probes single head backwards",
    "exactness": "0 extra passes",
    "ground_truth": "0 extra passes for the shares; 1 forward pass per (scan, removed lesion or marker)",
    "localisation": "0 extra passes",
    "perturbation": "4(T-1) forward passes per (scan, class, method) for deletion+insertion in MoRF and LeRF order, "
                    "plus 2 + 2(T-1) per (scan, fill) shared by all classes and methods (end points, random order)",
    "randomisation": "1 explanation per (scan, layer group, mode), shared by all classes",
    "figure": "0 extra passes",
}


@dataclass
class SuiteOptions:
    """What :func:`evaluate` runs (see the module docstring).

    Attributes:
        methods: methods to compare (HiResCAM and Grad-CAM).
        parts: subset of :data:`PARTS`.
        classes: ``"present"``, ``"all"`` or a list of labels.
        removal: measure the score change when each lesion / the marker is removed.
        fills: perturbation fills (``"air"``, ``"soft_tissue"``, ``"blur"``).
        steps: perturbation steps T.
        orders, modes: perturbation orders and modes.
        perturbation_scans: at most this many phantoms get perturbation curves (None: all).
        batch_size: inputs per forward pass in perturbation.
        randomisation: ``"cascading"`` and/or ``"independent"``.
        randomisation_depth: layer grouping depth (:func:`~medcam3d.evaluate.randomization.randomization_groups`).
        randomisation_scans: at most this many phantoms get randomisation curves.
        validation_fraction: share of the phantoms (the first ones) used to choose IoU thresholds.
        top_features: features shown per method in the figure.
        figure_label: the label of the figure (default: the first phantom's first present label).
        seed: seed of random orders and re-initialisations.
        device: ``"cpu"``, ``"cuda"``...
        map_geometry: ``"field"`` (the paper's convention) or ``"receptive"`` (cells at the receptive-field centres
            the model declares): where feature cells lie for the ground-truth shares, the localisation heatmaps
            and the allowed-region score.
    """

    methods: tuple[str, ...] = ("hirescam", "gradcam")
    parts: tuple[str, ...] = PARTS
    classes: str | Sequence[str] = "present"
    removal: bool = True
    fills: tuple[str, ...] = ("air", "soft_tissue", "blur")
    steps: int = 10
    orders: tuple[str, ...] = ORDERS
    modes: tuple[str, ...] = MODES
    perturbation_scans: int | None = None
    batch_size: int = 8
    randomisation: tuple[str, ...] = ("cascading", "independent")
    randomisation_depth: int | None = 2
    randomisation_scans: int | None = 2
    validation_fraction: float = 0.5
    top_features: int = 4
    figure_label: str | None = None
    seed: int = 0
    device: str = "cpu"
    map_geometry: str = "field"

    def check(self) -> None:
        """Raise ValueError for unknown parts, fills, orders or modes."""
        from .perturbation import FILLS

        for name, values, allowed in (("parts", self.parts, PARTS), ("fills", self.fills, FILLS),
                                      ("orders", self.orders, ORDERS), ("modes", self.modes, MODES),
                                      ("randomisation", self.randomisation, ("cascading", "independent"))):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"{name}: unknown {bad[0]!r} (choose from {', '.join(allowed)})")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.map_geometry not in ("field", "receptive"):
            raise ValueError(f"map_geometry: unknown {self.map_geometry!r} (choose from field, receptive)")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in (0, 1)")


@dataclass
class ModelUnderTest:
    """A model with what the suite needs to know about it.

    Attributes:
        model: the network (eval mode is set for the calls).
        labels: names of its M outputs.
        target_layer: explained layer (dotted name; default the model's ``medcam3d_target_layer``).
        layout: layout of the explained layer (default the model's ``medcam3d_layout``).
        allowed_regions: label -> organ names where its evidence may lie.
        hu_to_input: HU -> network units (for the perturbation fills).
        name: shown in the outputs.
        card: the model card, if any (its held-out AUROC is reported).
    """

    model: nn.Module
    labels: list[str]
    target_layer: str | None = None
    layout: Any = None
    allowed_regions: dict[str, list[str]] = field(default_factory=dict)
    hu_to_input: Callable[[float], float] | None = None
    name: str = "model"
    card: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Any, checkpoint: str | None = None, device: str = "cpu") -> ModelUnderTest:
        """Build from a :class:`medcam3d.config.Config` (``checkpoint`` overrides its weights)."""
        import json
        from pathlib import Path

        from ..errors import InputError

        if checkpoint is not None:
            cp = Path(checkpoint).expanduser().resolve()
            if not cp.is_file():
                raise InputError("model checkpoint not found", cp)
            config.weights = str(cp)
        model = config.build_model().to(device).eval()
        wp = config.weights_path
        card_path = wp.with_suffix(".json") if wp is not None else None
        card = json.loads(card_path.read_text(encoding="utf-8")) if card_path and card_path.is_file() else None
        return cls(model, list(config.labels), config.target_layer, config.layout, dict(config.allowed_regions),
                   None, config.name if wp is None else f"{config.name} ({wp.name})", card)


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------


def _f(v: Any) -> float | None:
    """A JSON number, None for NaN/inf."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _mean(values: Iterable[Any]) -> float | None:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(xs)) if xs else None


def _mean_curve(curves: list[list[float]]) -> list[float] | None:
    if not curves:
        return None
    arr = np.array(curves, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        m = np.nanmean(arr, axis=0) if np.isfinite(arr).any() else arr[0]
    return [_f(v) for v in m]  # type: ignore[misc]


def _scores(model: nn.Module, x: Tensor, device: str) -> Tensor:
    with torch.inference_mode():
        return model(x.to(device)).detach().double().cpu()


# ----------------------------------------------------------------------------------------------------------------
# the suite
# ----------------------------------------------------------------------------------------------------------------


def evaluate(
    mut: ModelUnderTest,
    source: PhantomSource,
    options: SuiteOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the suite on every phantom of ``source``.

    Args:
        mut: the model under test.
        source: the phantoms (on the model's network grid).
        options: what to run (default :class:`SuiteOptions`).
        progress: called with a short message per step.

    Returns:
        ``{"model", "options", "costs", "cases": [...], "summary": {...}, "timings", "passes", "figure"}`` (JSON
        numbers; the figure's :class:`~medcam3d.evaluate.figure.FeatureBreakdown` is returned under ``"_figure"``
        for :func:`medcam3d.evaluate.report.write_outputs`, not serialised).
    """
    from ..explainer import Explainer
    from .figure import step_by_step

    opt = options or SuiteOptions()
    opt.check()
    say = progress or (lambda s: None)
    model = mut.model.to(opt.device).eval()
    labels = list(mut.labels)
    explainer_kwargs = {"target_layer": mut.target_layer, "methods": opt.methods, "layout": mut.layout,
                        "labels": labels}
    hu_to_input = mut.hu_to_input or getattr(source.grid, "hu_to_input", None)
    if hu_to_input is None:
        from .perturbation import demo_hu_to_input

        hu_to_input = demo_hu_to_input
    timings: dict[str, float] = {p: 0.0 for p in ("explain", *PARTS)}
    passes: dict[str, int] = {"explain": 0, "removal": 0, "perturbation": 0, "randomisation": 0}
    cases: list[dict[str, Any]] = []
    iou: dict[str, dict[str, list[tuple[int, list[float]]]]] = {}
    rand_records: dict[str, list[dict[str, Any]]] = {m: [] for m in opt.randomisation}
    figure_parts: Any = None
    figure_info: dict[str, Any] | None = None
    rand_groups: list[list[str]] | None = None
    n = len(source)
    n_val = max(1, math.ceil(opt.validation_fraction * n)) if n > 1 else 1

    with Explainer(model, keep_gradients=True, **explainer_kwargs) as explainer:  # type: ignore[arg-type]
        for i in range(n):
            case = source.case(i)
            say(f"{case.name}: explaining")
            t0 = time.perf_counter()
            exp = explainer(case.x.to(opt.device)).cpu()
            timings["explain"] += time.perf_counter() - t0
            passes["explain"] += 1
            scores = exp.scores[0].double()
            raw = {m: exp.raw[m][0] for m in opt.methods}  # [M, *s]
            map_shape = tuple(exp.map_size)
            grid_shape = tuple(case.x.shape[2:])
            geo = exp.map_geometry(opt.map_geometry)
            present = [lab for lab in case.labels if lab in labels and lab in case.lesions]
            if opt.classes == "present":
                chosen = list(present)
            elif opt.classes == "all":
                chosen = list(labels)
            else:
                chosen = [c for c in opt.classes if c in labels]  # type: ignore[union-attr]
            rec: dict[str, Any] = {
                "case": case.name, "index": i, "split": "validation" if i < n_val else "test",
                "labels": list(case.labels), "marker": case.marker is not None,
                "scores": {lab: _f(s) for lab, s in zip(labels, scores.tolist())},
                "certificate": exp.certificate.kind,
            }

            # -- exactness ------------------------------------------------------------------------------------------
            if "exactness" in opt.parts:
                t0 = time.perf_counter()
                ex = exactness_record(exp, opt.methods)
                rec["exactness"] = {
                    "residual": {m: {lab: _f(v) for lab, v in zip(labels, ex["residual"][m][0].tolist())}
                                 for m in opt.methods},
                    "relative_residual": {m: {lab: _f(v) for lab, v in zip(labels, ex["relative_residual"][m][0].tolist())}
                                          for m in opt.methods},
                }
                if "table1_l2" in ex:
                    rec["exactness"]["table1_l2"] = {lab: _f(v) for lab, v in zip(labels, ex["table1_l2"][0].tolist())}
                if "cam_equality" in ex:
                    rec["exactness"]["cam_equality"] = {m: _f(v[0].max()) for m, v in ex["cam_equality"].items()}
                timings["exactness"] += time.perf_counter() - t0

            # -- ground truth -----------------------------------------------------------------------------------------
            fractions = {lab: block_fractions(case.lesions[lab], map_shape, geo) for lab in present}
            if "ground_truth" in opt.parts:
                t0 = time.perf_counter()
                gt: dict[str, Any] = {}
                for lab in present:
                    k = labels.index(lab)
                    entry: dict[str, Any] = {"chance": chance_share(fractions[lab]),
                                             "share": {m: _f(relevance_mass(raw[m][k], fractions[lab])) for m in opt.methods}}
                    if opt.removal:
                        s_wo = _scores(model, source.without(case, [lab]), opt.device)[0]
                        passes["removal"] += 1
                        entry["score"] = _f(scores[k])
                        entry["score_without"] = _f(s_wo[k])
                        entry["score_drop"] = _f(scores[k] - s_wo[k])
                    gt[lab] = entry
                rec["ground_truth"] = gt
                if case.marker is not None:
                    frac_m = block_fractions(case.marker, map_shape, geo)
                    mk: dict[str, Any] = {"chance": chance_share(frac_m), "share": {}}
                    for m in opt.methods:
                        vals = relevance_mass(raw[m], frac_m)  # [M]
                        mk["share"][m] = {lab: _f(v) for lab, v in zip(labels, vals.tolist())}
                    if opt.removal:
                        s_wo = _scores(model, source.without(case, ["marker"]), opt.device)[0]
                        passes["removal"] += 1
                        mk["score_drop"] = {lab: _f(v) for lab, v in zip(labels, (scores - s_wo).tolist())}
                    rec["marker_ground_truth"] = mk
                timings["ground_truth"] += time.perf_counter() - t0

            # -- localisation -----------------------------------------------------------------------------------------
            if "localisation" in opt.parts:
                t0 = time.perf_counter()
                loc: dict[str, Any] = {}
                for lab in present:
                    k = labels.index(lab)
                    mask = case.lesions[lab]
                    entry = {}
                    for m in opt.methods:
                        heat = to_heatmap(raw[m][None, [k]], grid_shape, geometry=geo)[0, 0]
                        curve = iou_curve(heat, mask)
                        iou.setdefault(lab, {}).setdefault(m, []).append((i, curve.tolist()))
                        entry[m] = {
                            "relevance_mass": _f(relevance_mass(raw[m][k], fractions[lab])),
                            "rank_accuracy": _f(relevance_rank_accuracy(heat, mask)),
                            "pointing": _f(pointing_game(heat, mask)),
                            "iou_max": _f(np.nanmax(curve.numpy())) if np.isfinite(curve.numpy()).any() else None,
                        }
                    loc[lab] = entry
                rec["localisation"] = loc
                allowed: dict[str, Any] = {}
                for lab in (present if opt.classes == "present" else chosen):
                    organs = mut.allowed_regions.get(lab)
                    if not organs:
                        continue
                    region = torch.zeros(grid_shape, dtype=torch.bool)
                    for o in organs:
                        if o in case.organs:
                            region |= case.organs[o]
                    frac = block_fractions(region, map_shape, geo)
                    k = labels.index(lab)
                    allowed[lab] = {m: _f(allowed_region_score(raw[m][k], frac)) for m in opt.methods}
                rec["allowed_region"] = allowed
                timings["localisation"] += time.perf_counter() - t0

            # -- perturbation ---------------------------------------------------------------------------------------
            if "perturbation" in opt.parts and chosen and (opt.perturbation_scans is None or i < opt.perturbation_scans):
                t0 = time.perf_counter()
                idx = [labels.index(lab) for lab in chosen]
                pert: dict[str, Any] = {}
                for fill in opt.fills:
                    say(f"{case.name}: perturbation ({fill})")
                    res = perturbation_curves(
                        lambda b: model(b.to(opt.device)), case.x[0].to(opt.device), {m: raw[m][idx] for m in opt.methods},
                        idx, fill, opt.steps, opt.orders, opt.modes, opt.batch_size, opt.seed, hu_to_input)
                    passes["perturbation"] += res.passes
                    pert[fill] = {
                        m: {mode: {o: {lab: {"auc": _f(res.auc[m][mode][o][j]),
                                              "curve": [_f(v) for v in res.curves[m][mode][o][j].tolist()]}
                                        for j, lab in enumerate(chosen)}
                                   for o in res.curves[m][mode]}
                            for mode in opt.modes}
                        for m in opt.methods
                    }
                rec["perturbation"] = pert
                timings["perturbation"] += time.perf_counter() - t0

            # -- randomisation --------------------------------------------------------------------------------------
            n_rand = len(rand_records[opt.randomisation[0]]) if opt.randomisation else 0
            if ("randomisation" in opt.parts and chosen and opt.randomisation
                    and (opt.randomisation_scans is None or n_rand < opt.randomisation_scans)):
                t0 = time.perf_counter()
                idx = [labels.index(lab) for lab in chosen]
                if rand_groups is None:
                    rand_groups = randomization_groups(model, case.x.to(opt.device), opt.randomisation_depth)
                for mode in opt.randomisation:
                    say(f"{case.name}: {mode} randomisation")
                    rc = randomization_curves(model, case.x.to(opt.device), explainer_kwargs, idx, mode, rand_groups,
                                              seed=opt.seed, original={m: exp.raw[m][:, idx] for m in opt.methods})
                    passes["randomisation"] += rc["passes"]
                    rand_records[mode].append({
                        "case": case.name, "layers": rc["layers"],
                        "similarity": {m: {s: {lab: [_f(v) for v in t[0, j].tolist()] for j, lab in enumerate(chosen)}
                                           for s, t in per.items()} for m, per in rc["similarity"].items()},
                    })
                timings["randomisation"] += time.perf_counter() - t0

            # -- figure ------------------------------------------------------------------------------------------
            if "figure" in opt.parts and figure_parts is None:
                want = opt.figure_label
                lab = (want if want in present else None) if want is not None else (present[0] if present else None)
                if lab is not None and exp.activations is not None and exp.gradients is not None:
                    k = labels.index(lab)
                    figure_parts = step_by_step(exp.activations[0], exp.gradients[0, k], opt.top_features)
                    figure_info = {"case": case.name, "label": lab, "score": _f(scores[k])}
            cases.append(rec)

    summary = _summarise(cases, labels, opt, iou, rand_records, n_val)
    card = mut.card or {}
    return {
        "model": {"name": mut.name, "labels": labels, "held_out_auroc": (card.get("held_out") or {}).get("auroc"),
                  "mean_held_out_auroc": (card.get("held_out") or {}).get("mean_auroc"),
                  "synthetic_data_only": card.get("synthetic_data_only")},
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt.__dict__.items()},
        "phantoms": {"n": n, "seed": source.seed, "grid": list(source.grid.shape), "validation": n_val},
        "costs": COSTS,
        "passes": passes,
        "passes_per_class": _per_class_passes(opt, cases),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "summary": summary,
        "cases": cases,
        "figure": figure_info,
        "_figure": figure_parts,
    }


def _per_class_passes(opt: SuiteOptions, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Model passes per (scan, class) of the perturbation part at these settings (formula; see COSTS)."""
    return {
        "perturbation_per_scan_class_method": 4 * max(opt.steps - 1, 0) if set(opt.modes) == set(MODES) else 2 * max(opt.steps - 1, 0),
        "perturbation_per_scan_fill_shared": perturbation_passes(opt.steps, 0, 0, len(opt.modes)),
        "removal_per_scan_object": 1,
    }


def _summarise(cases: list[dict[str, Any]], labels: list[str], opt: SuiteOptions,
               iou: dict[str, dict[str, list[tuple[int, list[float]]]]],
               rand_records: dict[str, list[dict[str, Any]]], n_val: int) -> dict[str, Any]:
    methods = list(opt.methods)
    out: dict[str, Any] = {"certificate": sorted({c["certificate"] for c in cases})}
    # exactness
    if "exactness" in opt.parts and cases:
        ex: dict[str, Any] = {"max_abs_residual": {}, "max_relative_residual": {}, "table1": {}}
        for m in methods:
            ex["max_abs_residual"][m] = _f(max((abs(v) for c in cases for v in c["exactness"]["residual"][m].values()
                                                if v is not None), default=math.nan))
            ex["max_relative_residual"][m] = _f(max((abs(v) for c in cases
                                                     for v in c["exactness"]["relative_residual"][m].values()
                                                     if v is not None), default=math.nan))
        exact = all(c["certificate"] in ("cam", "affine-head") for c in cases)
        if all("table1_l2" in c["exactness"] for c in cases):
            for lab in labels:
                pres = [c["exactness"]["table1_l2"][lab] for c in cases if lab in c["labels"]]
                every = [c["exactness"]["table1_l2"][lab] for c in cases]
                ex["table1"][lab] = {"n_present": len(pres), "gradcam_present": _mean(pres), "gradcam_all": _mean(every),
                                     "hirescam": 0.0 if exact else None}
        eq = [c["exactness"]["cam_equality"] for c in cases if "cam_equality" in c["exactness"]]
        ex["cam_equality"] = ({m: _f(max(e[m] for e in eq)) for m in eq[0]} if eq else None)
        ex["exact"] = exact
        out["exactness"] = ex
    # ground truth
    if "ground_truth" in opt.parts:
        gt: dict[str, Any] = {}
        for lab in labels:
            rs = [c["ground_truth"][lab] for c in cases if lab in c.get("ground_truth", {})]
            if not rs:
                continue
            chance = _mean(r["chance"] for r in rs)
            share = {m: _mean(r["share"][m] for r in rs) for m in methods}
            gt[lab] = {"n": len(rs), "chance": chance, "share": share,
                       "lift": {m: (share[m] / chance if share[m] is not None and chance else None) for m in methods},
                       "score_drop": _mean(r.get("score_drop") for r in rs)}
        out["ground_truth"] = gt
        mks = [c["marker_ground_truth"] for c in cases if "marker_ground_truth" in c]
        if mks:
            out["marker"] = {
                "n": len(mks), "chance": _mean(r["chance"] for r in mks),
                "share": {m: {lab: _mean(r["share"][m][lab] for r in mks) for lab in labels} for m in methods},
                "score_drop": ({lab: _mean(r["score_drop"][lab] for r in mks) for lab in labels}
                               if "score_drop" in mks[0] else None),
            }
    # localisation
    if "localisation" in opt.parts:
        loc: dict[str, Any] = {}
        for lab in labels:
            rs = [c["localisation"][lab] for c in cases if lab in c.get("localisation", {})]
            if not rs:
                continue
            entry: dict[str, Any] = {"n": len(rs)}
            for m in methods:
                curves = iou.get(lab, {}).get(m, [])
                val = [cv for i, cv in curves if i < n_val]
                tst = [cv for i, cv in curves if i >= n_val]
                best = best_threshold_iou(np.array(val).reshape(-1, len(IOU_THRESHOLDS)),
                                          np.array(tst).reshape(-1, len(IOU_THRESHOLDS)))
                entry[m] = {
                    "relevance_mass": _mean(r[m]["relevance_mass"] for r in rs),
                    "rank_accuracy": _mean(r[m]["rank_accuracy"] for r in rs),
                    "pointing": _mean(r[m]["pointing"] for r in rs),
                    "iou": {k: (_f(v) if isinstance(v, float) else v) for k, v in best.items()},
                }
            loc[lab] = entry
        out["localisation"] = loc
        allowed: dict[str, Any] = {}
        for lab in labels:
            rs = [c["allowed_region"][lab] for c in cases if lab in c.get("allowed_region", {})]
            if rs:
                allowed[lab] = {"n": len(rs), **{m: _mean(r[m] for r in rs) for m in methods}}
        out["allowed_region"] = allowed
    # perturbation
    if "perturbation" in opt.parts:
        pert: dict[str, Any] = {}
        for fill in opt.fills:
            per_fill: dict[str, Any] = {}
            n_pairs = 0
            for m in methods:
                per_fill[m] = {}
                for mode in opt.modes:
                    per_fill[m][mode] = {}
                    for o in opt.orders:
                        items = [v for c in cases if "perturbation" in c
                                 for v in c["perturbation"][fill][m][mode][o].values()]
                        n_pairs = len(items)
                        per_fill[m][mode][o] = {"auc": _mean(v["auc"] for v in items),
                                                "curve": _mean_curve([v["curve"] for v in items])}
            per_fill["n"] = n_pairs
            pert[fill] = per_fill
        out["perturbation"] = pert
    # randomisation
    if "randomisation" in opt.parts:
        rnd: dict[str, Any] = {}
        for mode, recs in rand_records.items():
            if not recs:
                continue
            entry = {"layers": ["(trained)"] + recs[0]["layers"], "n": 0}
            for m in methods:
                entry[m] = {}
                for s in ("spearman", "spearman_abs", "ssim"):
                    curves = [cv for r in recs for cv in r["similarity"][m][s].values()]
                    entry[m][s] = _mean_curve(curves)
                    entry["n"] = len(curves)
            rnd[mode] = entry
        out["randomisation"] = rnd
    return out


# ----------------------------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(v)
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.1e}"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub markdown table; numbers with ``digits`` decimals, None/NaN as "–"."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(v if isinstance(v, str) else _fmt(v, digits) for v in r) + " |")
    return "\n".join(lines)


_NAMES = {"hirescam": "HiResCAM", "gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "xgradcam": "XGrad-CAM",
          "layercam": "LayerCAM", "cam": "CAM"}


def method_name(m: str) -> str:
    return _NAMES.get(m, m)


def to_markdown(result: Mapping[str, Any], title: str = "medcam3d evaluation", command: str | None = None) -> str:
    """A markdown summary of :func:`evaluate`'s result (tables of the summary; per-case records stay in the JSON)."""
    s = result["summary"]
    methods = list(result["options"]["methods"])
    mn = [method_name(m) for m in methods]
    out = [f"# {title}", ""]
    if command:
        out += [f"Command: `{command}`", ""]
    ph = result["phantoms"]
    model = result["model"]
    out += [f"Model: {model['name']}; phantoms: {ph['n']} (seed {ph['seed']}, grid {ph['grid']}, first "
            f"{ph['validation']} used to choose IoU thresholds); certificate: {', '.join(s['certificate'])}.", ""]
    if model.get("mean_held_out_auroc") is not None:
        out += [f"Held-out mean AUROC from the model card: {model['mean_held_out_auroc']:.3f}"
                + (" (synthetic phantoms only)" if model.get("synthetic_data_only") else "") + ".", ""]
    ex = s.get("exactness")
    if ex:
        out += ["## Exactness (0 extra model passes)", ""]
        out += [md_table(["method", "max |s − s(0) − Σ map|", "max relative"],
                         [[method_name(m), ex["max_abs_residual"][m], ex["max_relative_residual"][m]] for m in methods],
                         4), ""]
        if ex.get("table1"):
            out += ["Table 1 analogue: L2 distance between min-max-normalised maps at feature resolution; HiResCAM is "
                    "the locations the model used " + ("(certified exact)" if ex.get("exact") else "(NOT certified)"), ""]
            rows = [[lab, t["n_present"], t["gradcam_present"], t["gradcam_all"], t["hirescam"]]
                    for lab, t in ex["table1"].items()]
            out += [md_table(["label", "n present", "Grad-CAM L2 (present)", "Grad-CAM L2 (all scans)", "HiResCAM L2"],
                             rows), ""]
        if ex.get("cam_equality"):
            out += ["CAM architecture: max relative |CAM − N·map|: "
                    + ", ".join(f"{method_name(m)} {_fmt(v, 6)}" for m, v in ex["cam_equality"].items()), ""]
    gt = s.get("ground_truth")
    if gt:
        out += ["## Ground truth by construction", "",
                "Share of each method's positive contribution inside the lesion (chance = the lesion's volume share), "
                "and the raw-score drop when the lesion is removed from the same patient.", ""]
        rows = [[lab, g["n"], g["chance"], *[g["share"][m] for m in methods], g["score_drop"]] for lab, g in gt.items()]
        out += [md_table(["label", "n", "chance", *[f"{x} share" for x in mn], "score drop"], rows), ""]
    mk = s.get("marker")
    if mk:
        out += [f"Marker ({mk['n']} phantoms; chance share {_fmt(mk['chance'], 4)}):", ""]
        rows = [[lab, *[mk["share"][m][lab] for m in methods], (mk["score_drop"] or {}).get(lab)]
                for lab in model["labels"]]
        out += [md_table(["label", *[f"{x} share on marker" for x in mn], "score drop without marker"], rows, 4), ""]
    loc = s.get("localisation")
    if loc:
        out += ["## Describing the model: localisation", ""]
        heads = ["label", "n"]
        for x in mn:
            heads += [f"{x} mass", f"{x} rank acc.", f"{x} pointing", f"{x} IoU (t)"]
        rows = []
        for lab, e in loc.items():
            r: list[Any] = [lab, e["n"]]
            for m in methods:
                io = e[m]["iou"]
                r += [e[m]["relevance_mass"], e[m]["rank_accuracy"], e[m]["pointing"],
                      f"{_fmt(io['test'])} ({_fmt(io['threshold'], 2)})"]
            rows.append(r)
        out += [md_table(heads, rows), ""]
    al = s.get("allowed_region")
    if al:
        out += ["Allowed-region score a/(a+b) (share of positive contribution inside the allowed organs):", ""]
        out += [md_table(["label", "n", *mn], [[lab, a["n"], *[a[m] for m in methods]] for lab, a in al.items()]), ""]
    pt = s.get("perturbation")
    if pt:
        out += ["## Perturbation (raw scores; area under the curve over the fraction of cells replaced)", ""]
        for fill, per in pt.items():
            rows = []
            for m in methods:
                for mode in result["options"]["modes"]:
                    rows.append([method_name(m), mode, *[per[m][mode].get(o, {}).get("auc")
                                                          for o in result["options"]["orders"]]])
            out += [f"Fill: {fill} ({per['n']} (scan, class) pairs)", "",
                    md_table(["method", "mode", *result["options"]["orders"]], rows), ""]
    rd = s.get("randomisation")
    if rd:
        out += ["## Parameter randomisation (similarity to the trained model's maps)", ""]
        for mode, e in rd.items():
            rows = []
            for j, layer in enumerate(e["layers"]):
                r = [layer]
                for m in methods:
                    r += [e[m][sname][j] if e[m][sname] else None for sname in ("spearman", "spearman_abs", "ssim")]
                rows.append(r)
            heads = ["randomised up to" if mode == "cascading" else "randomised layer"]
            for x in mn:
                heads += [f"{x} Spearman", f"{x} |Spearman|", f"{x} SSIM"]
            out += [f"{mode.capitalize()} ({e['n']} (scan, class) pairs):", "", md_table(heads, rows), ""]
    out += ["## Costs (model passes)", ""]
    out += [f"- {k}: {v}" for k, v in result["costs"].items()]
    out += ["", "Passes spent: " + ", ".join(f"{k} {v}" for k, v in result["passes"].items()) + "; seconds: "
            + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items() if v), ""]
    return "\n".join(out)
