"""Table 2 analogue (best-threshold IoU against lesion masks) and ground truth by construction, per label.

    python scripts/reproduce_table2.py                 # demo AxialNet + the small 3-D ResNet-34v-style model
    python scripts/reproduce_table2.py --n 40 --seed 1 --skip-resnet

Phantoms ``(seed, 0..n-1)`` are explained once (HiResCAM and Grad-CAM). For every label a phantom shows:

* **IoU** (the paper's Table 2 protocol): the display heatmap (ReLU, whole-map min-max, trilinear upsampling to the
  network grid) is binarised at each threshold 0.02, 0.04, ..., 0.98; the threshold with the best mean IoU on the
  validation phantoms (the first half) is applied to the test phantoms (the second half), whose mean IoU is
  reported. As the paper insists, IoU describes the *model* (where it looks), not whether the explanation is right.
* **Ground truth by construction:** the share of each method's positive contribution inside the lesion (feature
  resolution, block fractions) against chance (the lesion's volume share), and the model's actual use of the
  lesion: the raw-score drop when the same patient is rendered without it (1 forward pass per lesion).
* relevance rank accuracy, pointing game (ties shared) and the allowed-region score a/(a+b).

The small ResNet-34v-style model is loaded from build/reproduce/ (trained by scripts/reproduce_table1.py, or here on
first use). Writes the section "table2" of docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from medcam3d.data import LABELS
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


def run(mut, grid, n: int, seed: int, map_geometry: str = "field") -> dict:
    source = PhantomSource(grid, n, seed)
    opts = SuiteOptions(parts=("ground_truth", "localisation"), classes="present", seed=seed, map_geometry=map_geometry)
    result = evaluate(mut, source, opts, progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    return result.to_dict()  # the numbers as evaluation.json has them


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def tables(res: dict) -> str:
    s = res["summary"]
    loc, gt, al = s["localisation"], s["ground_truth"], s["allowed_region"]
    rows, rows_gt, rows_desc = [], [], []
    for lab in LABELS:
        if lab not in loc:
            continue
        e = loc[lab]
        h, g = e["hirescam"]["iou"], e["gradcam"]["iou"]
        rows.append([lab, f"{h['n_validation']} / {h['n_test']}", h["test"], h["threshold"], g["test"], g["threshold"]])
        q = gt[lab]
        rows_gt.append([lab, q["n"], q["chance"], q["share"]["hirescam"], q["share"]["gradcam"], q["lift"]["hirescam"],
                        q["lift"]["gradcam"], q["score_drop"]])
        a = al.get(lab, {})
        rows_desc.append([lab, e["hirescam"]["rank_accuracy"], e["gradcam"]["rank_accuracy"], e["hirescam"]["pointing"],
                          e["gradcam"]["pointing"], a.get("hirescam"), a.get("gradcam")])
    rows.append(["**mean over labels**", "", _mean(r[2] for r in rows), "", _mean(r[4] for r in rows), ""])
    rows_gt.append(["**mean over labels**", "", _mean(r[2] for r in rows_gt), _mean(r[3] for r in rows_gt),
                    _mean(r[4] for r in rows_gt), _mean(r[5] for r in rows_gt), _mean(r[6] for r in rows_gt),
                    _mean(r[7] for r in rows_gt)])
    rows_desc.append(["**mean over labels**", *[_mean(r[i] for r in rows_desc) for i in range(1, 7)]])
    return "\n".join([
        ("Best-threshold IoU with the lesion masks (threshold chosen on the validation phantoms, IoU of the test "
        "phantoms):"), "",
        md_table(["label", "n val / test", "HiResCAM IoU", "threshold", "Grad-CAM IoU", "threshold"], rows), "",
        ("Ground truth by construction: share of positive contribution inside the lesion, chance (= its volume "
        "share), lift (share / chance), and the raw-score drop when the lesion is removed:"), "",
        md_table(["label", "n", "chance", "HiResCAM share", "Grad-CAM share", "HiResCAM lift", "Grad-CAM lift",
                  "score drop"], rows_gt), "",
        "Relevance rank accuracy, pointing game (ties shared) and allowed-region score a/(a+b):", "",
        md_table(["label", "HiResCAM rank acc.", "Grad-CAM rank acc.", "HiResCAM pointing", "Grad-CAM pointing",
                  "HiResCAM a/(a+b)", "Grad-CAM a/(a+b)"], rows_desc), "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="phantoms per model (default 40; the first half chooses thresholds)")
    ap.add_argument("--seed", type=int, default=1, help="phantom dataset seed (default 1)")
    ap.add_argument("--map-geometry", choices=["field", "receptive"], default="field",
                    help="field: the paper's convention (section 'table2'); receptive: AxialNet's cells at their "
                         "receptive-field centres (section 'table2_receptive'; the demo AxialNet only)")
    add_common_args(ap)
    args = ap.parse_args()
    receptive = args.map_geometry == "receptive"
    started = time.perf_counter()
    set_threads(args.threads)

    mut, grid = demo_model()
    parts = ["### Demo AxialNet", "", f"{args.n} phantoms (prevalence 0.3 per label).", "",
             tables(run(mut, grid, args.n, args.seed, args.map_geometry))]
    print(parts[-1])
    if not args.skip_resnet and not receptive:
        mut, grid = phantom_resnet(n_train=args.train_n, epochs=args.epochs, max_minutes=args.max_minutes)
        ho = (mut.card or {}).get("held_out", {})
        parts += ["### 3-D ResNet-34v-style model", "",
                  f"{args.n} phantoms at 30 x 64 x 64 (held-out mean AUROC of the model: {ho.get('mean_auroc')}).", "",
                  tables(run(mut, grid, args.n, args.seed))]
        print(parts[-1])
    notes = ("Paper's Table 2 analogue plus ground truth by construction. Only scans showing a label count for it. "
             "IoU, rank accuracy and pointing use the display heatmap upsampled to the network grid; shares and "
             "a/(a+b) use the signed raw maps at feature resolution. '–' = undefined (no case, or no positive "
             "evidence).")
    title = "Table 2 analogue: IoU with lesion masks, and ground truth by construction"
    if receptive:
        title += ", with AxialNet's cells at their receptive-field centres"
        notes += (" Map geometry 'receptive': heatmaps are drawn with each cell at its receptive-field centre (for the "
                  "demo AxialNet 8 network voxels apart in-plane, from pixel 32 to 88 of 128) and each cell's block is "
                  "the voxels nearest its centre; compare with the section above, which divides the field of view "
                  "evenly (the paper's convention).")
    body = results_section(title, command_of(), args.seed, started, notes) + "\n" + "\n".join(parts)
    update_section(args.results, "table2_receptive" if receptive else "table2", body, header=RESULTS_HEADER)
    print(f"updated {args.results}")


if __name__ == "__main__":
    main()
