"""Perturbation faithfulness (deletion / insertion AUCs) and parameter-randomisation curves, HiResCAM vs Grad-CAM.

    python scripts/reproduce_faithfulness.py           # demo AxialNet (4 phantoms) + small ResNet (8 phantoms)
    python scripts/reproduce_faithfulness.py --n 6 --steps 10 --skip-resnet

Deletion / insertion (:mod:`medcam3d.evaluate.perturbation`): the cells are the explained map's voxels (AxialNet:
3 x 16 x 16 blocks of the 60 x 128 x 128 grid; ResNet: ~10 x 9 x 9 blocks of 30 x 64 x 64), visited most-relevant-
first (MoRF), least-relevant-first (LeRF) or at random, replaced by air (−1000 HU), soft tissue (40 HU) or a blurred
copy of the scan, and scored on each label's raw score (multi-label, never argmax), for every label the phantom shows.
Lower deletion-MoRF and higher insertion-MoRF areas than random mean the map ranks the cells the score depends on.

Randomisation (:mod:`medcam3d.evaluate.randomization`): the layers are re-initialised from the output down
(cascading) or one at a time (independent), and each method's maps are compared with the trained model's (Spearman
of raw and of absolute maps, 3-D SSIM of the normalised maps). Maps that do not change would not explain the model.

Writes the section "faithfulness" of docs/results.md.
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
    phantom_resnet,
    results_section,
    set_threads,
)
from medcam3d.evaluate.suite import evaluate
from medcam3d.methods import DEFAULT_METHODS as METHODS
from medcam3d.methods import method_title as method_name


def run(mut, grid, n: int, seed: int, steps: int, fills: tuple[str, ...], rand_scans: int, prevalence: float) -> dict:
    source = PhantomSource(grid, n, seed, prevalence=prevalence)
    opts = SuiteOptions(parts=("perturbation", "randomisation"), classes="present", fills=fills, steps=steps,
                        randomisation_scans=rand_scans, randomisation_depth=2, seed=seed)
    result = evaluate(mut, source, opts, progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    return result.to_dict()  # the numbers as evaluation.json has them


def tables(res: dict, steps: int) -> str:
    s = res["summary"]
    out = []
    rows = []
    for fill, per in s["perturbation"].items():
        for m in METHODS:
            d, i = per[m]["deletion"], per[m]["insertion"]
            rows.append([fill, method_name(m), per["n"], d["morf"]["auc"], d["random"]["auc"], d["lerf"]["auc"],
                         i["morf"]["auc"], i["random"]["auc"], i["lerf"]["auc"]])
    out += [("Area under the raw-score curves (mean over (scan, label) pairs; deletion: lower MoRF = better, "
             "insertion: higher MoRF = better):"), "",
            md_table(["fill", "method", "pairs", "deletion MoRF", "deletion random", "deletion LeRF", "insertion MoRF",
                      "insertion random", "insertion LeRF"], rows), ""]
    air = s["perturbation"].get("air")
    if air:
        fr = [f"{t / steps:.2f}" for t in range(steps + 1)]
        curve_rows = []
        for m in METHODS:
            for mode in ("deletion", "insertion"):
                curve_rows.append([f"{method_name(m)} {mode} MoRF", *air[m][mode]["morf"]["curve"]])
        curve_rows.append(["random deletion", *air[METHODS[0]]["deletion"]["random"]["curve"]])
        curve_rows.append(["random insertion", *air[METHODS[0]]["insertion"]["random"]["curve"]])
        out += ["Mean raw-score curves, air fill (columns: fraction of cells replaced):", "",
                md_table(["curve", *fr], curve_rows, 2), ""]
    for mode, e in s.get("randomisation", {}).items():
        rows = []
        for j, layer in enumerate(e["layers"]):
            r = [layer]
            for m in METHODS:
                r += [e[m][k][j] for k in ("spearman", "spearman_abs", "ssim")]
            rows.append(r)
        heads = ["randomised " + ("down to" if mode == "cascading" else "layer")]
        for m in METHODS:
            heads += [f"{method_name(m)} Spearman", f"{method_name(m)} abs. Spearman", f"{method_name(m)} SSIM"]
        out += [(f"{mode.capitalize()} randomisation ({e['n']} (scan, label) pairs; similarity to the trained model's "
                "maps):"), "", md_table(heads, rows), ""]
    p = res["passes"]
    out += [(f"Model passes spent: perturbation {p['perturbation']}, randomisation {p['randomisation']} explanations "
            f"(costs: {res['costs']['perturbation']})."), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4, help="phantoms for the demo AxialNet (default 4)")
    ap.add_argument("--n-resnet", type=int, default=8, help="phantoms for the small ResNet (default 8)")
    ap.add_argument("--seed", type=int, default=3, help="phantom dataset seed (default 3)")
    ap.add_argument("--steps", type=int, default=8, help="perturbation steps (default 8)")
    ap.add_argument("--fills", nargs="+", default=["air", "soft_tissue", "blur"], help="fills (default all three)")
    ap.add_argument("--prevalence", type=float, default=0.2, help="label prevalence of the phantoms (default 0.2)")
    ap.add_argument("--randomisation-scans", type=int, default=2, help="phantoms with randomisation curves (2)")
    add_common_args(ap)
    args = ap.parse_args()
    started = time.perf_counter()
    set_threads(args.threads)
    fills = tuple(args.fills)

    mut, grid = demo_model()
    res = run(mut, grid, args.n, args.seed, args.steps, fills, args.randomisation_scans, args.prevalence)
    parts = ["### Demo AxialNet", "", f"{args.n} phantoms, {args.steps} steps, layer groups of depth 2.", "",
             tables(res, args.steps)]
    print(parts[-1])
    if not args.skip_resnet:
        mut, grid = phantom_resnet(n_train=args.train_n, epochs=args.epochs, max_minutes=args.max_minutes)
        res = run(mut, grid, args.n_resnet, args.seed, args.steps, fills, args.randomisation_scans, args.prevalence)
        parts += ["### 3-D ResNet-34v-style model", "",
                  f"{args.n_resnet} phantoms at 30 x 64 x 64, {args.steps} steps.", "", tables(res, args.steps)]
        print(parts[-1])
    notes = ("Perturbation faithfulness and sanity checks for both methods. Fills are in network-grid units "
             "((clip(HU, −1000, 800) + 1000)/1800 − 0.449); blur: Gaussian with half a cell per axis as sigma.")
    body = results_section("Faithfulness: deletion / insertion and parameter randomisation", command_of(), args.seed,
                           started, notes) + "\n" + "\n".join(parts)
    update_section(args.results, "faithfulness", body, header=RESULTS_HEADER)
    print(f"updated {args.results}")


if __name__ == "__main__":
    main()
