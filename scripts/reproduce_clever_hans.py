"""Clever Hans: does the marker-trained model use the marker, and do the explanations show it?

    python scripts/reproduce_clever_hans.py            # 16 phantoms, seed 2
    python scripts/reproduce_clever_hans.py --n 30 --seed 4

``medcam3d/weights/demo_axialnet_cleverhans.pt`` was trained (scripts/train_demo.py --clever-hans) on phantoms where a
bright metal marker outside the body appeared with 90 % of the scans showing nodule_right_lung and 5 % of the others.
``demo_axialnet_cleverhans_guided.pt`` (where installed) is that model fine-tuned on the same kind of data with the
allowed-region loss added (scripts/train_demo.py --clever-hans --guided, issue 17). Here every phantom carries the
marker (labels drawn as usual, prevalence 0.3), and for the marker-trained model(s) and, as a control, the clean
default demo model:

* the model's actual use of the marker: the raw-score drop of each label when the same patient is rendered without
  the marker (1 forward pass per phantom);
* how much of each method's positive contribution lands on the marker, against chance (the marker's volume share);
* for comparison, the score drop when the nodule itself is removed (phantoms that show it).

The shares are computed twice, with the cells placed by the field convention (the paper's; each cell owns an even
block of the field of view) and by ``auto`` (medcam3d's default: each cell at its receptive-field centre, owning the
voxels nearest it -- the marker, in front of the body and outside the region the cells cover, belongs to the nearest
cells). Writes the section "clever_hans" of docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from medcam3d.evaluate.numbers import md_table
from medcam3d.evaluate.parts import SuiteOptions
from medcam3d.evaluate.phantoms import PhantomSource
from medcam3d.evaluate.report import update_section
from medcam3d.evaluate.reproduce import (
    RESULTS_HEADER,
    add_common_args,
    command_of,
    demo_model,
    results_section,
    set_threads,
)
from medcam3d.evaluate.suite import evaluate

LABEL = "nodule_right_lung"
WEIGHTS = Path(__file__).resolve().parents[1] / "medcam3d" / "weights"


GEOMETRIES = ("field", "auto")  # the paper's display convention, and medcam3d's default


def run(name: str, n: int, seed: int, map_geometry: str = "auto") -> tuple[dict, dict]:
    """(the result as evaluation.json has it, the model card)"""
    mut, grid = demo_model(name)
    source = PhantomSource(grid, n, seed, clever_hans={"label": LABEL, "p_with": 1.0, "p_without": 1.0})
    opts = SuiteOptions(parts=("ground_truth",), classes="present", seed=seed, map_geometry=map_geometry)
    res = evaluate(mut, source, opts, progress=lambda s: print(f"  {map_geometry}: {s}", file=sys.stderr, flush=True))
    return res.to_dict(), mut.card or {}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def row(name: str, geometry: str, res: dict) -> list:
    s = res["summary"]
    mk = s["marker"]
    others = [lab for lab in res["model"]["labels"] if lab != LABEL]
    nod = s["ground_truth"].get(LABEL, {})
    with_nodule = [c for c in res["cases"] if LABEL in c["labels"]]
    drop_with = _mean(c["marker_ground_truth"]["score_drop"][LABEL] for c in with_nodule)
    without_nodule = [c for c in res["cases"] if LABEL not in c["labels"]]
    drop_without = _mean(c["marker_ground_truth"]["score_drop"][LABEL] for c in without_nodule)
    return [
        name, f"{geometry}: {', '.join(s['placement'])}", mk["n"], mk["score_drop"][LABEL], drop_with, drop_without,
        _mean(mk["score_drop"][lab] for lab in others), nod.get("score_drop"),
        mk["chance"], mk["share"]["hirescam"][LABEL], mk["share"]["gradcam"][LABEL],
        _mean(mk["share"]["hirescam"][lab] for lab in others), _mean(mk["share"]["gradcam"][lab] for lab in others),
        nod.get("share", {}).get("hirescam"), nod.get("share", {}).get("gradcam"),
    ]


def models() -> list[tuple[str, str]]:
    """(weights name, title) of the models compared: the marker-trained model, the same recipe fine-tuned with the
    allowed-region loss where its weights are installed, and the clean default model as the control."""
    out = [("demo_axialnet_cleverhans", "marker-trained")]
    if (WEIGHTS / "demo_axialnet_cleverhans_guided.pt").is_file():
        out.append(("demo_axialnet_cleverhans_guided", "marker-trained + allowed-region loss"))
    return out + [("demo_axialnet", "clean (control)")]


def card_line(title: str, card: dict) -> str | None:
    """One line of the model card's held-out marker effect (None without one)."""
    held = card.get("held_out") or {}
    effect = held.get("marker_effect")
    if not effect:
        return None
    line = (f"- {title} model card (held-out, {held.get('n')} phantoms, marker independent of the label): "
            f"{_effect(held)}")
    control = (card.get("training") or {}).get("same_budget_control")
    if control:  # the same fine-tuning without the loss (weights not shipped): what fine-tuning alone does
        line += (f" Same-budget control {control['name']} ({control['what']}; weights not shipped): "
                 f"{_effect(control['held_out'])}")
    return line


def _effect(held: dict) -> str:
    """A card's held-out marker effect, the nodule's AUROC and the mean AUROC, in words."""
    effect = held["marker_effect"]
    return (f"mean {LABEL} score with marker {effect['mean_score_with_marker']}, without "
            f"{effect['mean_score_without_marker']}; AUROC of the score for the marker "
            f"{effect['auroc_marker_as_target']}, for the nodule {(held.get('auroc') or {}).get(LABEL)}; mean AUROC "
            f"over labels {held.get('mean_auroc')}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="phantoms (default 16)")
    ap.add_argument("--seed", type=int, default=2, help="phantom dataset seed (default 2)")
    add_common_args(ap, small_model=False)
    args = ap.parse_args()
    started = time.perf_counter()
    set_threads(args.threads)

    rows = []
    cards = []
    for name, title in models():
        for geometry in GEOMETRIES:
            res, card = run(name, args.n, args.seed, geometry)
            rows.append(row(title, geometry, res))
        line = card_line(title, card)
        if line:
            cards.append(line)
    n_nod = rows[0][2]
    text = "\n".join([
        (f"Every phantom carries the marker. Score drops are raw-score (logit) changes of {LABEL} when the marker is "
        f"removed from the same patient (all phantoms; those showing a nodule; those without), the mean over the "
        f"other 12 labels, and the drop when the nodule itself is removed. Shares: fraction of each method's positive "
        f"contribution to {LABEL} (and, mean over the other labels) that lies on the marker; chance = the marker's "
        f"volume share under the cells' blocks; last two columns: share inside the nodule. Cells: where the map's "
        f"cells were placed (field: the field of view divided evenly, the paper's convention; auto: medcam3d's "
        f"default, here the receptive-field centres AxialNet declares) -- the score drops do not depend on it."), "",
        md_table(["model", "cells", "n", "drop w/o marker", "(nodule shown)", "(no nodule)", "other labels",
                  "drop w/o nodule", "marker chance", "HiResCAM on marker", "Grad-CAM on marker",
                  "HiResCAM on marker (others)",
                  "Grad-CAM on marker (others)", "HiResCAM in nodule", "Grad-CAM in nodule"], rows, 4), "",
        *cards, "",
    ])
    print(text)
    notes = (f"The marker-trained model's shortcut, measured by removing the marker ({n_nod} phantoms), and whether "
             "each explanation puts the positive evidence for the label on it; the same for the marker recipe "
             "fine-tuned with the allowed-region loss of `medcam3d.train` (issue 17: is the marker still used?).")
    body = results_section("Clever Hans: a marker-trained model", command_of(), args.seed, started, notes) + "\n" + text
    update_section(args.results, "clever_hans", body, header=RESULTS_HEADER)
    print(f"updated {args.results}")


if __name__ == "__main__":
    main()
