"""The paper's Figure 8 on phantoms, and the guided-vs-plain evaluation of the demo AxialNet (issue 17).

    python scripts/reproduce_figure8.py                    # plain vs guided on 64 fresh phantoms
    python scripts/reproduce_figure8.py --update-cards     # also write the numbers into both model cards
    python scripts/reproduce_figure8.py --demo-seed demo_axialnet   # pick the `medcam3d demo` phantom offline

For each fresh phantom (seeds disjoint from training and held-out ones) and each model (``demo_axialnet_plain``,
``demo_axialnet_guided``), HiResCAM and Grad-CAM are computed with the default ``"auto"`` placement (AxialNet's
declared receptive-field centres). Per (phantom, present label), with the label's allowed region (the union of its
organs from the config's ``allowed_regions``):

* display mass share -- the share of the display heatmap's mass inside the allowed organs (voxel level);
* peak in allowed organ -- the pointing game of the display heatmap on those organs (voxel level);
* a/(a+b) -- the allowed-region score of the signed map at feature resolution (cell fractions, same placement);
* lesion pointing game -- the display heatmap's peak on the lesion mask;
* |HiResCAM| mass inside -- ``Σ |map| · allowed fraction`` at feature resolution (does the model simply zero its
  maps?);
* the completeness residual (certificate, all labels) and the mean AUROC of the scores over all phantoms.

Figure-8 cases: a lung label where HiResCAM's positive evidence lies mostly in the correct lung (a/(a+b) > 0.5)
while Grad-CAM's display peak lies in the heart, the body wall or the other lung; the reverse count swaps the
methods. Montages go to docs/img/figure8_*.png, tables to the ``figure8`` section of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

from medcam3d import Explainer
from medcam3d.config import load_config
from medcam3d.data import LABELS, ORGAN_CODES, make_phantom
from medcam3d.evaluate.metrics import allowed_region_score, auroc, pointing_game
from medcam3d.evaluate.report import update_section
from medcam3d.files import write_json_atomic
from medcam3d.geometry import block_fractions
from medcam3d.io import Volume
from medcam3d.models import load_demo
from medcam3d.preprocess import Preprocessor
from medcam3d.train import allowed_cells

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "medcam3d" / "weights"
IMG = ROOT / "docs" / "img"
MODELS = ("demo_axialnet_plain", "demo_axialnet_guided")
FIRST_SEED = 7_000_000  # fresh: training uses 1_000_000.., held-out 1_500_000.., the AUROC test 9_000_000..
DEMO_PRESENT = ("cardiomegaly", "nodule_right_lung", "pleural_effusion_left")  # what `medcam3d demo` plants
WALL = ("body", "spine", "ribs")


def where(labelmap: np.ndarray, heat: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    """Organ name at the display heatmap's peak (first maximum) and the peak's index; ``"outside"`` = no organ."""
    idx = np.unravel_index(int(torch.argmax(heat)), heat.shape)
    code = int(labelmap[idx])
    names = {v: k for k, v in ORGAN_CODES.items()}
    return names.get(code, "outside"), tuple(int(i) for i in idx)


def peak_class(organ: str, allowed: list[str]) -> str:
    """Where a peak lies relative to a label's allowed organs: allowed, other lung, heart, body wall, outside."""
    if organ in allowed:
        return "allowed"
    if organ.endswith("lung"):
        return "other lung"
    if organ == "heart":
        return "heart"
    return "body wall" if organ in WALL else "outside"


def explain_phantom(exp: Explainer, x: torch.Tensor, ph, regions: dict[str, list[str]]) -> dict:
    """Records for one phantom and one model: per present label the metrics (module docstring), plus scores."""
    e = exp(x)
    present = [k for k in range(len(LABELS)) if ph.labels[k]]
    heat = {m: dict(zip(present, e.heatmap(m, classes=present)[0].float())) for m in ("hirescam", "gradcam")}
    raw = {m: e.raw[m][0].double() for m in ("hirescam", "gradcam")}  # [L, T, h, w]
    organs = {k: torch.from_numpy(v) for k, v in ph.organ_masks.items()}
    cells = allowed_cells(organs, regions, LABELS, e.map_size, e.placement.geometry).double()
    covered = e.covered_region(ph.hu.shape)
    labelmap = ph.organ_labelmap()
    rows = []
    for k, lab in enumerate(LABELS):
        if not ph.labels[k]:
            continue
        vox = torch.zeros(ph.hu.shape, dtype=torch.bool)
        for organ in regions[lab]:
            vox |= organs[organ]
        lesion = torch.from_numpy(ph.lesion_masks[lab])
        lesion_cells = block_fractions(lesion, e.map_size, e.placement.geometry).double()
        row = {"seed": int(ph.seed), "label": lab,
               # model-independent limits of the a/(a+b) target under this placement: the score of a map that is
               # exactly the lesion (its cell fractions), and the share of the allowed organs the cells cover
               "lesion_ar": float(allowed_region_score(lesion_cells, cells[k])),
               "covered_share": float((vox & covered).sum() / vox.sum())}
        for m in ("hirescam", "gradcam"):
            h = heat[m][k]
            organ, idx = where(labelmap, h)
            row[m] = {
                "mass_share": float((h * vox).sum() / h.sum()) if h.sum() > 0 else math.nan,
                "peak_in_allowed": float(pointing_game(h, vox)),
                "ar": float(allowed_region_score(raw[m][k], cells[k])),
                "lesion_pointing": float(pointing_game(h, lesion)),
                "abs_inside": float((raw[m][k].abs() * cells[k]).sum()),
                "abs_total": float(raw[m][k].abs().sum()),
                "peak_organ": organ,
                "peak_where": peak_class(organ, regions[lab]),
                "peak_index": idx,
            }
        rows.append(row)
    residual = float(e.certificate.relative_residual.abs().max())
    return {"rows": rows, "scores": e.scores[0].tolist(), "labels": ph.labels.tolist(), "residual": residual}


def nanmean(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def summarise(per_phantom: list[dict]) -> dict:
    """The model's numbers over all phantoms (means over (phantom, present label) pairs unless said)."""
    rows = [r for p in per_phantom for r in p["rows"]]
    scores = np.array([p["scores"] for p in per_phantom])
    labels = np.array([p["labels"] for p in per_phantom])
    per_label_auc = {lab: auroc(labels[:, k], scores[:, k]) for k, lab in enumerate(LABELS)}
    out: dict = {"n_phantoms": len(per_phantom), "n_pairs": len(rows)}
    for m in ("hirescam", "gradcam"):
        ar_by_label = {lab: nanmean([r[m]["ar"] for r in rows if r["label"] == lab]) for lab in LABELS}
        out[m] = {
            "display_mass_share_in_allowed_organs": nanmean([r[m]["mass_share"] for r in rows]),
            "peak_in_allowed_organs": nanmean([r[m]["peak_in_allowed"] for r in rows]),
            "allowed_region_ar_mean_over_labels": nanmean(list(ar_by_label.values())),
            "allowed_region_ar_by_label": ar_by_label,
            "lesion_pointing_game": nanmean([r[m]["lesion_pointing"] for r in rows]),
            "abs_mass_inside_allowed_region": nanmean([r[m]["abs_inside"] for r in rows]),
            "abs_mass_total": nanmean([r[m]["abs_total"] for r in rows]),
            "peak_in_allowed_by_label": {lab: nanmean([r[m]["peak_in_allowed"] for r in rows if r["label"] == lab])
                                         for lab in LABELS},
        }
    lesion_ar = {lab: nanmean([r["lesion_ar"] for r in rows if r["label"] == lab]) for lab in LABELS}
    out["lesion_shaped_map"] = {"allowed_region_ar_mean_over_labels": nanmean(list(lesion_ar.values())),
                                "allowed_region_ar_by_label": lesion_ar,
                                "allowed_organs_covered_share": nanmean([r["covered_share"] for r in rows])}
    out["mean_auroc"] = nanmean([float(v) for v in per_label_auc.values()])
    out["auroc"] = per_label_auc
    out["max_relative_completeness_residual"] = max(p["residual"] for p in per_phantom)
    return out


def is_lung_label(regions: dict[str, list[str]], lab: str) -> bool:
    return regions[lab] in (["right_lung"], ["left_lung"])


def figure8_cases(per_phantom: list[dict], regions: dict[str, list[str]], a: str, b: str) -> list[dict]:
    """Lung-label rows where method ``a``'s positive evidence lies mostly in the correct lung (a/(a+b) > 0.5) while
    method ``b``'s display peak lies in the heart, the body wall or the other lung."""
    wrong = ("heart", "body wall", "other lung")
    return [r for p in per_phantom for r in p["rows"]
            if is_lung_label(regions, r["label"]) and r[a]["ar"] > 0.5 and r[b]["peak_where"] in wrong]


def montage(ph, x: torch.Tensor, exp: Explainer, row: dict, path: Path, title: str) -> None:
    """CT slice through the lesion centre with HiResCAM and Grad-CAM overlays and each method's peak."""
    import matplotlib  # heavy: only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = LABELS.index(row["label"])
    e = exp(x, classes=[k])
    lesion = ph.lesion_masks[row["label"]]
    z = int(np.round(np.argwhere(lesion)[:, 0].mean()))
    ct = ph.hu[z]
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.5))
    for ax, m in zip(axes, (None, "hirescam", "gradcam")):
        ax.imshow(ct, cmap="gray", vmin=-1000, vmax=400)
        for organ, colour in (("right_lung", "c"), ("left_lung", "c"), ("heart", "m")):
            ax.contour(ph.organ_masks[organ][z], levels=[0.5], colors=colour, linewidths=0.6)
        ax.contour(lesion[z], levels=[0.5], colors="y", linewidths=0.9)
        if m is not None:
            h = e.heatmap(m)[0, 0, z].float().numpy()
            ax.imshow(h, cmap="jet", alpha=0.45 * (h > 0.05), vmin=0, vmax=1)
            s, i, j = row[m]["peak_index"]
            ax.plot(j, i, "w+" if s == z else "wx", ms=10, mew=2)
            ax.set_title(f"{'HiResCAM' if m == 'hirescam' else 'Grad-CAM'}: peak in {row[m]['peak_organ']}"
                         + ("" if s == z else f" (slice {s})"), fontsize=8)
        else:
            ax.set_title(f"{row['label']} (yellow)\nseed {row['seed']}, slice {z}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def markdown(summary: dict, counts: dict, montages: list[str], n: int, minutes: float,
             models: tuple[str, str] = MODELS) -> str:
    """The ``figure8`` section of docs/results.md."""
    p, g = summary[models[0]], summary[models[1]]
    lines = [
        "## Figure 8 analogue: where the evidence for a lung finding lies, plain vs HiResCAM-guided demo AxialNet",
        "",
        f"Written by `scripts/reproduce_figure8.py` ({n} fresh phantoms, seeds {FIRST_SEED}-{FIRST_SEED + n - 1}, "
        f"label prevalence 0.3; {minutes:.1f} min). Both models: the same recipe, data, steps and seed "
        "(`scripts/train_demo.py`), the guided one with the allowed-region loss of `medcam3d.train` added "
        "(model cards: `medcam3d/weights/demo_axialnet_plain.json`, `demo_axialnet_guided.json`). Maps with the "
        "default placement (`auto`: AxialNet's receptive-field centres; the display map is painted only where "
        "cells sit). Means over (phantom, present label) pairs unless said.",
        "",
        "| | plain HiResCAM | guided HiResCAM | plain Grad-CAM | guided Grad-CAM |",
        "|---|---|---|---|---|",
    ]
    rows = (
        ("display-heatmap mass share inside the allowed organs", "display_mass_share_in_allowed_organs"),
        ("display peak inside the allowed organs", "peak_in_allowed_organs"),
        ("allowed-region a/(a+b), mean over labels", "allowed_region_ar_mean_over_labels"),
        ("lesion pointing game", "lesion_pointing_game"),
        ("mean map mass inside the allowed region (Σ abs(map) × allowed fraction)", "abs_mass_inside_allowed_region"),
        ("mean map mass, all cells (Σ abs(map))", "abs_mass_total"),
    )
    for title, key in rows:
        lines.append(f"| {title} | {fmt(p['hirescam'][key])} | {fmt(g['hirescam'][key])} | "
                     f"{fmt(p['gradcam'][key])} | {fmt(g['gradcam'][key])} |")
    lines += [
        f"| mean AUROC (all labels) | {fmt(p['mean_auroc'])} | {fmt(g['mean_auroc'])} | | |",
        f"| max relative completeness residual (HiResCAM, all labels) | {p['max_relative_completeness_residual']:.1e} "
        f"| {g['max_relative_completeness_residual']:.1e} | | |",
        "",
        "Figure-8 cases among the present lung labels: HiResCAM's positive evidence mostly (a/(a+b) > 0.5) in the "
        "correct lung while Grad-CAM's peak lies in the heart, the body wall or the other lung; and the reverse.",
        "",
        "| model | present lung labels | HiResCAM right, Grad-CAM elsewhere | Grad-CAM right, HiResCAM elsewhere |",
        "|---|---|---|---|",
    ]
    for name in models:
        c = counts[name]
        lines.append(f"| {name} | {c['lung_pairs']} | {c['figure8']} | {c['reverse']} |")
    lines += ["", "Per label: share of (phantom, present label) pairs whose display peak lies in the allowed organs.",
              "", "| label | n | plain HiResCAM | plain Grad-CAM | guided HiResCAM | guided Grad-CAM |",
              "|---|---|---|---|---|---|"]
    for lab in LABELS:
        cells = [fmt(summary[name][m]["peak_in_allowed_by_label"][lab]) for name in models
                 for m in ("hirescam", "gradcam")]
        lines.append(f"| {lab} | {counts['n_by_label'][lab]} | " + " | ".join(cells) + " |")
    if montages:
        lines += ["", "Montages (guided model; yellow: lesion, cyan: lungs, magenta: heart; + the peak in this slice, "
                  "x a peak in another slice):", ""]
        lines += [f"![figure 8 case](img/{Path(m).name})" for m in montages]
    card = json.loads((WEIGHTS / f"{models[1]}.json").read_text())
    return "\n".join(lines + ["", *targets(p, g, card)])


TARGETS = (  # issue 17's targets for the guided model: (what, key, threshold)
    ("HiResCAM display mass share inside the allowed organs ≥ 0.4", "display_mass_share_in_allowed_organs", 0.4),
    ("HiResCAM display peak inside the allowed organs ≥ 0.6", "peak_in_allowed_organs", 0.6),
    ("HiResCAM allowed-region a/(a+b) ≥ 0.6, mean over labels", "allowed_region_ar_mean_over_labels", 0.6),
)


def budget(card: dict) -> str:
    """One sentence on the guided model's training budget, from its model card."""
    tr = card.get("training", {})
    slab, vol = tr.get("slab_phase", {}).get("steps"), tr.get("volume_phase", {}).get("steps")
    start = "fine-tuned from " + str(tr["init"]).split(" (")[0] if tr.get("init") else "trained from scratch"
    return (f"The guided model was {start} for {slab} slab + {vol} volume steps in {tr.get('minutes_training')} "
            f"min on {tr.get('threads')} thread(s) (its model card), not to convergence.")


def targets(p: dict, g: dict, card: dict) -> list[str]:
    """The issue-17 targets against the measured numbers, and what limits the missed ones (plain ``p``, guided
    ``g`` summaries; ``card``: the guided model card)."""
    ph, gh = p["hirescam"], g["hirescam"]
    rows = [(what, gh[key], ph[key], gh[key] >= bar) for what, key, bar in TARGETS]
    rows += [
        ("mean AUROC within 0.05 of the plain model's", g["mean_auroc"], p["mean_auroc"],
         g["mean_auroc"] >= p["mean_auroc"] - 0.05),
        ("HiResCAM completeness residual ≤ 1e-5 relative (both models)", g["max_relative_completeness_residual"],
         p["max_relative_completeness_residual"],
         max(g["max_relative_completeness_residual"], p["max_relative_completeness_residual"]) <= 1e-5),
        ("mean abs(HiResCAM) mass inside the allowed region ≥ the plain model's",
         gh["abs_mass_inside_allowed_region"], ph["abs_mass_inside_allowed_region"],
         gh["abs_mass_inside_allowed_region"] >= ph["abs_mass_inside_allowed_region"]),
    ]
    lines = ["### Issue 17's targets", "", "| target | guided | plain | met |", "|---|---|---|---|"]
    for what, gv, pv, met in rows:
        show = (lambda v: f"{v:.1e}") if "residual" in what else fmt
        lines.append(f"| {what} | {show(gv)} | {show(pv)} | {'yes' if met else '**no**'} |")
    if all(met for *_, met in rows):
        return lines
    lim = g["lesion_shaped_map"]
    by = lim["allowed_region_ar_by_label"]
    low = sorted((lab for lab in LABELS if not math.isnan(by[lab])), key=lambda lab: by[lab])[:3]
    c = lim["allowed_region_ar_mean_over_labels"]
    ceiling = ("the 0.6 target exceeds what such a map reaches" if c < 0.6 else
               "the placement caps a/(a+b) below 1, most for these labels, without by itself putting 0.6 out of reach")
    worst = sorted((lab for lab in LABELS if not math.isnan(gh["allowed_region_ar_by_label"][lab])),
                   key=lambda lab: gh["allowed_region_ar_by_label"][lab])[:3]
    share = lambda s: s["abs_mass_inside_allowed_region"] / s["abs_mass_total"]  # noqa: E731
    lines += ["", (
        "What limits the missed targets (the best measured is in the table; the shipped model is the guided one). "
        "*Placement.* The 8 × 8 cells sit over the middle 64 of 128 pixels; "
        f"{lim['allowed_organs_covered_share']:.2f} of the allowed organs' voxels lie in the covered region (mean "
        "over pairs), and each edge cell owns "
        "everything beyond it -- chest wall, spine, air. A map that were exactly the lesion (its cell fractions) "
        f"would score a/(a+b) {lim['allowed_region_ar_mean_over_labels']:.3f} (mean over labels; lowest "
        + ", ".join(f"{lab} {by[lab]:.2f}" for lab in low)
        + f"): evidence on the lesion itself counts partly as outside, and {ceiling}; the guided model's lowest "
        "labels are " + ", ".join(f"{lab} {gh['allowed_region_ar_by_label'][lab]:.2f}" for lab in worst) + ". "
        "*The loss.* It penalises a share (positive contribution outside the region over all positive "
        "contribution; for absent labels over all absolute contribution): it rewards moving evidence inside or "
        "shrinking what lies outside, never the amount inside, and is blind to map size: the guided maps are "
        f"{'smaller' if gh['abs_mass_total'] < ph['abs_mass_total'] else 'not smaller'} overall (mean Σ abs(map) "
        f"{gh['abs_mass_total']:.3f} vs {ph['abs_mass_total']:.3f}), so their absolute mass inside the allowed "
        f"region is lower although its share rose ({share(gh):.3f} vs {share(ph):.3f}). "
        f"*Budget.* {budget(card)} "
        "*Next.* Train longer or from scratch with the loss; weight absent labels lower (`--absent-weight`) so "
        "that the model is not pushed to shrink all positive evidence; add a term that keeps the positive "
        "contribution inside the region (e.g. a hinge on its mass); score a/(a+b) against the lesion-shaped "
        "ceiling above; and, for a model meant to be explained, pad its convolutions so that cells cover the "
        "whole slice."
    )]
    return lines


def card_block(s: dict, n: int) -> dict:
    """The model card's ``explanations_held_out`` entry."""
    def rnd(v):
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        return None if isinstance(v, float) and math.isnan(v) else round(float(v), 4) if isinstance(v, float) else v
    return {"script": "scripts/reproduce_figure8.py", "seeds": [FIRST_SEED, FIRST_SEED + n - 1], "prevalence": 0.3,
            "placement": "auto (declared receptive-field centres)",
            "max_relative_completeness_residual": float(f"{s['max_relative_completeness_residual']:.3g}"),
            **{m: rnd(s[m]) for m in ("hirescam", "gradcam")}, "mean_auroc": rnd(s["mean_auroc"])}


def draw(seed: int, pre: Preprocessor, **kw):
    ph = make_phantom(seed, **kw)
    return ph, pre(Volume(ph.hu, ph.affine, f"phantom {seed}")).as_tensor()[None]


def pick_demo_seed(name: str, pre: Preprocessor, regions: dict[str, list[str]], tries: int) -> dict | None:
    """The first `medcam3d demo` phantom seed (planted labels as the demo's) where, for a lung label, HiResCAM's
    evidence is mostly in the correct lung and Grad-CAM's peak is in the heart, the body wall or the other lung."""
    exp = Explainer(load_demo(name), methods=["hirescam", "gradcam"], map_geometry="auto")
    for seed in range(1, tries + 1):
        ph, x = draw(seed, pre, present=dict.fromkeys(DEMO_PRESENT, True), prevalence=0.0)
        rec = explain_phantom(exp, x, ph, regions)
        hits = figure8_cases([rec], regions, "hirescam", "gradcam") or [  # else: the peaks alone differ
            r for r in rec["rows"] if is_lung_label(regions, r["label"]) and r["hirescam"]["peak_where"] == "allowed"
            and r["gradcam"]["peak_where"] in ("heart", "body wall", "other lung")]
        if hits:
            r = hits[0]
            organ = r["gradcam"]["peak_organ"].replace("body", "body wall").replace("_", " ")
            look = (f"{r['label']} -- HiResCAM peaks in the {regions[r['label']][0].replace('_', ' ')} "
                    f"(a/(a+b) {r['hirescam']['ar']:.2f}), Grad-CAM in the {organ} (default auto placement)")
            return {"seed": seed, "label": r["label"], "look_at": look, "model": name,
                    "hirescam_allowed_region_ar": round(r["hirescam"]["ar"], 3),
                    "chosen_by": "scripts/reproduce_figure8.py --demo-seed (first seed whose HiResCAM display peak "
                                 "lies in the correct lung while Grad-CAM's lies in the heart, body wall or other "
                                 "lung; none of seeds 1-30 had a/(a+b) > 0.5 as well)"}
    return None


_STATE: dict = {}  # explainers, preprocessor and regions, shared with forked workers


def _one_phantom(seed: int) -> dict:
    ph, x = draw(seed, _STATE["pre"], prevalence=0.3)
    out = {name: explain_phantom(exp, x, ph, _STATE["regions"]) for name, exp in _STATE["explainers"].items()}
    print(f"phantom {seed - FIRST_SEED + 1}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="fresh phantoms (>= 60)")
    ap.add_argument("--update-cards", action="store_true", help="write the numbers into both model cards")
    ap.add_argument("--demo-seed", metavar="MODEL", help="only choose the `medcam3d demo` seed for MODEL's card")
    ap.add_argument("--tries", type=int, default=40, help="candidate demo seeds")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--json", type=Path, default=None, help="also write all records here")
    ap.add_argument("--models", nargs=2, default=list(MODELS), metavar=("PLAIN", "GUIDED"), help="demo model names")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--img", type=Path, default=IMG, help="folder for the montages")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cfg = load_config("demo_axialnet")
    pre, regions = Preprocessor.from_config(cfg), cfg.allowed_regions
    if args.demo_seed:
        found = pick_demo_seed(args.demo_seed, pre, regions, args.tries)
        print(json.dumps(found))
        if found is not None:
            card_path = WEIGHTS / f"{args.demo_seed}.json"
            card = json.loads(card_path.read_text())
            card["demo"] = found
            write_json_atomic(card, card_path, indent=2)
        return
    models = tuple(args.models)
    explainers = {name: Explainer(load_demo(name), methods=["hirescam", "gradcam"], map_geometry="auto")
                  for name in models}
    _STATE.update(explainers=explainers, pre=pre, regions=regions)
    seeds = [FIRST_SEED + i for i in range(args.n)]
    if args.jobs > 1:  # phantoms are independent: one worker process per core, each with one thread
        with multiprocessing.get_context("fork").Pool(args.jobs, initializer=torch.set_num_threads,
                                                      initargs=(1,)) as pool:
            done = pool.map(_one_phantom, seeds, chunksize=1)
    else:
        done = [_one_phantom(s) for s in seeds]
    per = {name: [d[name] for d in done] for name in models}
    summary = {name: summarise(per[name]) for name in models}
    counts: dict = {"n_by_label": {lab: sum(r["label"] == lab for r in per[models[0]] for r in r["rows"])
                                   for lab in LABELS}}
    for name in models:
        counts[name] = {
            "lung_pairs": sum(is_lung_label(regions, r["label"]) for p in per[name] for r in p["rows"]),
            "figure8": len(figure8_cases(per[name], regions, "hirescam", "gradcam")),
            "reverse": len(figure8_cases(per[name], regions, "gradcam", "hirescam")),
        }
    montages = []
    for j, row in enumerate(figure8_cases(per[models[1]], regions, "hirescam", "gradcam")[:3]):
        ph, x = draw(row["seed"], pre, prevalence=0.3)
        path = args.img / f"figure8_{j + 1}.png"
        montage(ph, x, explainers[models[1]], row, path, f"{models[1]}: HiResCAM vs Grad-CAM for {row['label']}")
        montages.append(str(path))
    minutes = (time.perf_counter() - t0) / 60
    update_section(args.results, "figure8", markdown(summary, counts, montages, args.n, minutes, models))
    if args.json:
        write_json_atomic({"summary": summary, "counts": counts, "records": per}, args.json, indent=1)
    if args.update_cards:
        for name in models:
            card_path = WEIGHTS / f"{name}.json"
            card = json.loads(card_path.read_text())
            card["explanations_held_out"] = {**card_block(summary[name], args.n), "figure8_counts": counts[name]}
            write_json_atomic(card, card_path, indent=2)
    print(json.dumps({n: {k: summary[n][k] for k in ("mean_auroc", "max_relative_completeness_residual")}
                      for n in models}, indent=1))
    print(json.dumps({n: {m: {k: v for k, v in summary[n][m].items() if not isinstance(v, dict)}
                          for m in ("hirescam", "gradcam")} for n in models}, indent=1))
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
