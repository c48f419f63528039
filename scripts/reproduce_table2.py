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
first use; with ``--skip-resnet`` its subsection of the previous run is carried over, marked as such). Every metric
is computed twice, with the cells placed by the field convention (the paper's) and by ``auto`` (medcam3d's default:
the receptive-field centres), and shown side by side. Writes the section "table2" of docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from reproduce_common import kept_subsection  # scripts/ is on sys.path when a script runs

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

RESNET_HEADING = "### 3-D ResNet-34v-style model"  # with --skip-resnet its previous subsection is carried over
GEOMETRIES = ("field", "auto")  # side by side: the paper's display convention, and medcam3d's default


def run(mut, grid, n: int, seed: int, map_geometry: str = "auto") -> dict:
    source = PhantomSource(grid, n, seed)
    opts = SuiteOptions(parts=("ground_truth", "localisation"), classes="present", seed=seed, map_geometry=map_geometry)
    say = lambda s: print(f"  {map_geometry}: {s}", file=sys.stderr, flush=True)  # noqa: E731
    result = evaluate(mut, source, opts, progress=say)
    return result.to_dict()  # the numbers as evaluation.json has them


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pair(get, results: dict[str, dict]) -> list:
    """``get(result)`` for each geometry, in :data:`GEOMETRIES` order (one column each)."""
    return [get(results[g]) for g in GEOMETRIES]


def _means(rows: list[list], first: int) -> list:
    """Column means of ``rows`` from column ``first`` on (strings count as missing)."""
    return [_mean(r[i] if not isinstance(r[i], str) else None for r in rows) for i in range(first, len(rows[0]))]


def _by_label(results: dict[str, dict]) -> tuple[list, list, list]:
    """The rows of the three tables (IoU; ground truth; descriptive), one per label shown, geometries side by side."""
    rows, rows_gt, rows_desc = [], [], []
    for lab in LABELS:
        if lab not in results["field"]["summary"]["localisation"]:
            continue
        loc = {g: results[g]["summary"]["localisation"][lab] for g in GEOMETRIES}
        gt = {g: results[g]["summary"]["ground_truth"][lab] for g in GEOMETRIES}
        al = {g: results[g]["summary"]["allowed_region"].get(lab, {}) for g in GEOMETRIES}
        h = loc["field"]["hirescam"]["iou"]
        thresholds = " / ".join(_threshold(loc[g][m]["iou"]["threshold"]) for m in ("hirescam", "gradcam")
                                for g in GEOMETRIES)
        rows.append([lab, f"{h['n_validation']} / {h['n_test']}",
                     *[loc[g][m]["iou"]["test"] for m in ("hirescam", "gradcam") for g in GEOMETRIES], thresholds])
        rows_gt.append([lab, gt["field"]["n"], *[gt[g]["chance"] for g in GEOMETRIES],
                        *[gt[g][k][m] for k in ("share", "lift") for m in ("hirescam", "gradcam") for g in GEOMETRIES],
                        gt["field"]["score_drop"]])
        rows_desc.append([lab, *[loc[g][m][k] for k in ("rank_accuracy", "pointing") for m in ("hirescam", "gradcam")
                                 for g in GEOMETRIES],
                          *[al[g].get(m) for m in ("hirescam", "gradcam") for g in GEOMETRIES]])
    return rows, rows_gt, rows_desc


def _threshold(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _columns(*names: str) -> list[str]:
    return [f"{name} {g}" for name in names for g in GEOMETRIES]


def tables(results: dict[str, dict]) -> str:
    """The three tables, each metric with one column per geometry (``field``, ``auto``)."""
    rows, rows_gt, rows_desc = _by_label(results)
    rows.append(["**mean over labels**", "", *_means(rows, 2)[:-1], ""])
    rows_gt.append(["**mean over labels**", "", *_means(rows_gt, 2)])
    rows_desc.append(["**mean over labels**", *_means(rows_desc, 1)])
    placed = "; ".join(f"{g}: {', '.join(results[g]['summary']['placement'])}" for g in GEOMETRIES)
    return "\n".join([
        f"Cells placed ({placed}).", "",
        ("Best-threshold IoU with the lesion masks (threshold chosen on the validation phantoms, IoU of the test "
         "phantoms; thresholds HiResCAM field / auto / Grad-CAM field / auto):"), "",
        md_table(["label", "n val / test", *_columns("HiResCAM IoU", "Grad-CAM IoU"), "thresholds"], rows), "",
        ("Ground truth by construction: share of positive contribution inside the lesion, chance (= its volume "
         "share under the cells' blocks), lift (share / chance), and the raw-score drop when the lesion is removed "
         "(the same for both geometries):"), "",
        md_table(["label", "n", *_columns("chance"), *_columns("HiResCAM share", "Grad-CAM share", "HiResCAM lift",
                                                               "Grad-CAM lift"), "score drop"], rows_gt), "",
        "Relevance rank accuracy, pointing game (ties shared) and allowed-region score a/(a+b):", "",
        md_table(["label", *_columns("HiResCAM rank acc.", "Grad-CAM rank acc.", "HiResCAM pointing",
                                     "Grad-CAM pointing", "HiResCAM a/(a+b)", "Grad-CAM a/(a+b)")], rows_desc), "",
    ])


def both(mut, grid, n: int, seed: int) -> dict[str, dict]:
    """The suite's results with each geometry of :data:`GEOMETRIES`."""
    return {g: run(mut, grid, n, seed, g) for g in GEOMETRIES}


NOTES = (
    "Paper's Table 2 analogue plus ground truth by construction. Only scans showing a label count for it. IoU, rank "
    "accuracy and pointing use the display heatmap upsampled to the network grid; shares and a/(a+b) use the signed "
    "raw maps at feature resolution, each cell owning a block of network voxels. '–' = undefined (no case, or no "
    "positive evidence). Each metric twice: **field** -- the paper's display convention, the field of view divided "
    "evenly among the cells (heatmaps `F.interpolate(align_corners=False)`, blocks by adaptive pooling); **auto** -- "
    "medcam3d's default, each cell at its receptive-field centre as the model declares it (the demo AxialNet: 8 "
    "network voxels apart in-plane, from pixel 32 to 88 of 128; slice groups of 3) or as medcam3d derives it from "
    "the layers (the 3-D ResNet-34v-style model: 8 voxels apart from voxel 4), heatmaps 0 beyond half a stride past "
    "the outermost centres, each cell's block the voxels nearest its centre."
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40,
                    help="phantoms per model (default 40; the first half chooses thresholds)")
    ap.add_argument("--seed", type=int, default=1, help="phantom dataset seed (default 1)")
    add_common_args(ap)
    args = ap.parse_args()
    started = time.perf_counter()
    set_threads(args.threads)

    mut, grid = demo_model()
    parts = ["### Demo AxialNet", "", f"{args.n} phantoms (prevalence 0.3 per label).", "",
             tables(both(mut, grid, args.n, args.seed))]
    print(parts[-1])
    if not args.skip_resnet:
        mut, grid = phantom_resnet(n_train=args.train_n, epochs=args.epochs, max_minutes=args.max_minutes)
        ho = (mut.card or {}).get("held_out", {})
        parts += [RESNET_HEADING, "",
                  f"{args.n} phantoms at 30 x 64 x 64 (held-out mean AUROC of the model: {ho.get('mean_auroc')}).", "",
                  tables(both(mut, grid, args.n, args.seed))]
        print(parts[-1])
    else:
        parts += [kept_subsection(args.results, "table2", RESNET_HEADING) or ""]
    title = "Table 2 analogue: IoU with lesion masks, and ground truth by construction (field and auto placement)"
    body = results_section(title, command_of(), args.seed, started, NOTES) + "\n" + "\n".join(parts)
    update_section(args.results, "table2", body, header=RESULTS_HEADER)
    print(f"updated {args.results}")


if __name__ == "__main__":
    main()
