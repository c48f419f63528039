"""Clever Hans: does the marker-trained model use the marker, and do the explanations show it?

    python scripts/reproduce_clever_hans.py            # 16 phantoms, seed 2
    python scripts/reproduce_clever_hans.py --n 30 --seed 4

``medcam3d/weights/demo_axialnet_cleverhans.pt`` was trained (scripts/train_demo.py --clever-hans) on phantoms where a
bright metal marker outside the body appeared with 90 % of the scans showing nodule_right_lung and 5 % of the others.
Here every phantom carries the marker (labels drawn as usual, prevalence 0.3), and for the marker-trained model and,
as a control, the clean demo model:

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
    drop_without = _mean(c["marker_ground_truth"]["score_drop"][LABEL] for c in res["cases"] if LABEL not in c["labels"])
    return [
        name, f"{geometry}: {', '.join(s['placement'])}", mk["n"], mk["score_drop"][LABEL], drop_with, drop_without,
        _mean(mk["score_drop"][lab] for lab in others), nod.get("score_drop"),
        mk["chance"], mk["share"]["hirescam"][LABEL], mk["share"]["gradcam"][LABEL],
        _mean(mk["share"]["hirescam"][lab] for lab in others), _mean(mk["share"]["gradcam"][lab] for lab in others),
        nod.get("share", {}).get("hirescam"), nod.get("share", {}).get("gradcam"),
    ]


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
    for name, title in (("demo_axialnet_cleverhans", "marker-trained"), ("demo_axialnet", "clean (control)")):
        for geometry in GEOMETRIES:
            res, card = run(name, args.n, args.seed, geometry)
            rows.append(row(title, geometry, res))
        effect = (card.get("held_out") or {}).get("marker_effect")
        if effect:
            cards.append(f"- {title} model card (held-out, marker independent of the label): mean {LABEL} score "
                         f"with marker {effect['mean_score_with_marker']}, without {effect['mean_score_without_marker']}"
                         f"; AUROC of the score for the marker {effect['auroc_marker_as_target']}.")
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
             "each explanation puts the positive evidence for the label on it.")
    body = results_section("Clever Hans: a marker-trained model", command_of(), args.seed, started, notes) + "\n" + text
    update_section(args.results, "clever_hans", body, header=RESULTS_HEADER)
    print(f"updated {args.results}")


if __name__ == "__main__":
    main()
