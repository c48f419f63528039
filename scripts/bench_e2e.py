"""Benchmark: the whole ``medcam3d explain`` command against the plain pipeline a user would write, side by side.

Writes a full-size chest-CT-like scan (512 x 512 x 300 int16 NIfTI at 0.7 x 0.7 x 1.25 mm, seeded: a body with two
lungs, a heart, a spine and noise), saves the paper-size AxialNet of ``configs/axialnet_chestct.yaml`` (80 labels) with
seeded random weights, then runs, each in its own process and alternating:

* **plain** -- what a user would write: load the NIfTI with MONAI, the config's MONAI preprocessing, one forward
  pass under ``torch.inference_mode`` (scores printed);
* **explain** -- ``medcam3d explain`` with HiResCAM + Grad-CAM and the certificate, writing the output folder, for
  (a) ``--full-res top-3`` (maps and montages of the 3 top classes), (b) ``--full-res top-10``, (c) ``--full-res
  none`` (all 80 classes at low resolution only).

For each case it prints both wall times (process start to exit), both peak resident set sizes (``ru_maxrss`` of
the child), the ratios, the output folder's size, and the write stage's timings from ``summary.json``; each case is
the median of ``--repeats`` alternating pairs (default: 1 for (a) and (b), 3 for (c)): the median run of each
command, and the median of the pairs' wall-time ratios. Random weights make about
half of the labels positive, so the default full resolution would write the cap (10 classes): (b) is that default.

Usage: python scripts/bench_e2e.py [--work DIR] [--cases a b c] [--repeats-c 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPE = (512, 512, 300)
SPACING = (0.7, 0.7, 1.25)
CASES = {"a": ["top-3"], "b": ["top-10"], "c": ["none"]}
CASE_TITLES = {"a": "3 top classes, full resolution", "b": "10 classes, full resolution",
               "c": "all 80, low resolution only"}

PLAIN = """
import sys, torch
from monai.transforms import Compose, LoadImage
from medcam3d.config import load_config, instantiate_transform
cfg = load_config(sys.argv[2])
model = cfg.build_model().eval()
pre = Compose([LoadImage(image_only=True, ensure_channel_first=True)]
              + [instantiate_transform(s, 'cfg') for s in cfg.preprocessing])
x = pre(sys.argv[1]).as_tensor()[None].float()
with torch.inference_mode():
    scores = model(x)
print('positive:', int((torch.sigmoid(scores) >= 0.5).sum()))
"""


def write_scan(path: Path, seed: int = 0) -> None:
    """A chest-CT-like int16 volume (RAS axes with x and y flipped, as scanners store them), slice by slice."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    nx, ny, nz = SHAPE
    x = (np.arange(nx) - nx / 2) * SPACING[0]
    y = (np.arange(ny) - ny / 2) * SPACING[1]
    xx, yy = np.meshgrid(x, y, indexing="ij")
    vol = np.empty(SHAPE, dtype=np.int16)
    for k in range(nz):
        z = (k - nz / 2) * SPACING[2]
        hu = np.full((nx, ny), -1000.0)
        hu[(xx / 160) ** 2 + (yy / 110) ** 2 <= 1] = 40.0  # body
        lung = max(0.0, 1 - (z / 190) ** 2) ** 0.5
        for side in (-1, 1):
            hu[((xx - side * 70) / (55 * lung + 1e-6)) ** 2 + ((yy + 5) / (75 * lung + 1e-6)) ** 2 <= 1] = -850.0
        if abs(z + 40) < 60:
            hu[((xx + 15) / 45) ** 2 + ((yy - 45) / 40) ** 2 <= 1] = 45.0  # heart
        hu[(xx / 18) ** 2 + ((yy + 85) / 18) ** 2 <= 1] = 700.0  # spine
        vol[:, :, k] = np.clip(hu + rng.normal(0, 20, hu.shape), -1024, 3071).astype(np.int16)
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [SPACING[0] * nx / 2, SPACING[1] * ny / 2, -SPACING[2] * nz / 2]
    nib.save(nib.Nifti1Image(vol, affine), str(path))


def write_config(folder: Path, repo: Path, seed: int = 0) -> Path:
    """configs/axialnet_chestct.yaml with seeded random weights saved next to it."""
    import torch

    from medcam3d.config import load_config

    cfg = load_config(repo / "configs" / "axialnet_chestct.yaml")
    torch.manual_seed(seed)
    torch.save(cfg.build_model().state_dict(), folder / "random_axialnet.pt")
    text = (repo / "configs" / "axialnet_chestct.yaml").read_text()
    assert "weights: null" in text
    (folder / "axialnet_random.yaml").write_text(text.replace("weights: null", "weights: random_axialnet.pt"))
    return folder / "axialnet_random.yaml"


@dataclass
class Run:
    seconds: float
    peak_mb: float
    output_mb: float | None = None
    timings: dict[str, float] | None = None
    stdout: str = ""


def run(cmd: list[str], env: dict[str, str], out: Path | None = None) -> Run:
    """Run ``cmd`` in a child process: wall time and the child's peak RSS (``ru_maxrss``)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read() if proc.stdout else "", proc.stderr.read() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    r = Run(seconds, usage.ru_maxrss / 1024.0, stdout=stdout)
    if out is not None:
        r.output_mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
        r.timings = json.loads((out / "summary.json").read_text())["timings_s"]
    return r


def median_run(runs: list[Run]) -> Run:
    """The run of median wall time (its other numbers with it)."""
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", help="working folder (default: a temporary one, removed unless --keep)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=1, help="alternating pairs for cases a and b")
    ap.add_argument("--repeats-c", type=int, default=3, help="alternating pairs for case c")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    scan = work / "chest_512x512x300.nii.gz"
    made = not scan.exists()
    if made:
        write_scan(scan)
    config = write_config(work, repo)
    print(f"scan {scan.name} {SHAPE} int16 at {SPACING} mm ({scan.stat().st_size / 1e6:.0f} MB, "
          f"{'written' if made else 'reused'}); {platform.node()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    plain_cmd = [sys.executable, "-c", PLAIN, str(scan), str(config)]
    rows = []
    for case in args.cases:
        plains, explains = [], []
        for rep in range(args.repeats_c if case == "c" else args.repeats):
            out = work / f"out_{case}"
            explain_cmd = [sys.executable, "-m", "medcam3d.cli", "explain", str(scan), "--config", str(config),
                           "--out", str(out), "--quiet", "--full-res", *CASES[case]]
            order = [("plain", plain_cmd, None), ("explain", explain_cmd, out)]
            for name, cmd, o in order if rep % 2 == 0 else order[::-1]:  # alternate which goes first
                r = run(cmd, env, o)
                (plains if name == "plain" else explains).append(r)
                print(f"  ({case}) run {rep + 1} {name}: {r.seconds:.1f} s, peak RSS {r.peak_mb:.0f} MB"
                      + (f", output {r.output_mb:.0f} MB, timings {r.timings}" if o else f", {r.stdout.strip()}"),
                      flush=True)
        p, e = median_run(plains), median_run(explains)
        ratios = [b.seconds / a.seconds for a, b in zip(plains, explains)]
        rows.append((case, len(plains), p, e, statistics.median(ratios), ratios))
    print(f"\nload average at end {os.getloadavg()[0]:.1f}\n")
    print("| case | runs | plain pipeline: wall, peak RSS | `medcam3d explain`: wall, peak RSS | wall ratio "
          "| RSS ratio | output | write stage |")
    print("|---|---|---|---|---|---|---|---|")
    for case, n, p, e, ratio, ratios in rows:
        t = e.timings or {}
        write = (f"{t.get('write', 0):.1f} s (maps {t.get('write.fullres_maps', 0):.1f} s, montages "
                 f"{t.get('write.montages', 0):.1f} s)")
        each = f" (pairs: {', '.join(f'{r:.2f}' for r in ratios)})" if n > 1 else ""
        print(f"| ({case}) {CASE_TITLES[case]} | {'median of ' + str(n) if n > 1 else '1'} | {p.seconds:.1f} s, "
              f"{p.peak_mb / 1024:.2f} GB | {e.seconds:.1f} s, {e.peak_mb / 1024:.2f} GB | "
              f"**{ratio:.2f}×**{each} | **{e.peak_mb / p.peak_mb:.2f}×** | {e.output_mb:.0f} MB | {write} |")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
