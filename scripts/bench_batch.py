"""Benchmark: `medcam3d batch` throughput on phantoms with 1 and 2 Dask workers, and Dask's overhead versus a plain
loop over the same scans, side by side in one run.

Measured in this run on this machine, each configuration on a fresh output folder (nothing skipped):
  * loop      -- no engine: this process explains the scans one after another (what ``--shard`` does), torch using
                 every core;
  * dask x1   -- the embedded LocalCluster with 1 worker process using every core;
  * dask x2   -- 2 worker processes, cores/2 torch threads each.

Configurations run in interleaved rounds (``--repeat``, default 2) and the best round of each is shown, which
filters out other processes' load. For each: the wall time of the whole run (cluster start, model loading, all
scans) and the steady-state throughput
in scans per minute, taken between the first and the last finished scan (so it excludes start-up and the first
scan's model loading). Dask's overhead = loop throughput / dask-x1 throughput - 1 (target <= 5 %).

The model is the demo config's architecture with seeded random weights unless ``--config`` names another config
(same cost per scan as trained weights). Scans are 60 x 128 x 128 phantoms (the demo grid) or, with ``--quick``,
24 x 64 x 64 ones padded to it.

Usage: python scripts/bench_batch.py [--scans 12] [--repeat 2] [--quick] [--threads N] [--config FILE]
       [--full-res top-1]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from medcam3d.batch import read_cohort
from medcam3d.batch.engine import _cores, local_cluster, run_dask, run_loop
from medcam3d.batch.worker import BatchSettings, clear_sessions
from medcam3d.config import load_config
from medcam3d.data import make_dataset
from medcam3d.models import build_model


def untrained_config(folder: Path) -> Path:
    torch.manual_seed(0)
    cfg = load_config("demo_axialnet")
    torch.save(build_model(cfg.model).state_dict(), folder / "random.pt")
    text = Path(cfg.path).read_text().replace("weights: package:medcam3d/weights/demo_axialnet.pt",
                                              "weights: random.pt")
    (folder / "untrained.yaml").write_text(text)
    return folder / "untrained.yaml"


def measure(name: str, run, n: int, tag: str = "") -> dict:
    """Run ``run(on_record, tag)``; returns wall time and steady-state scans per minute."""
    stamps: list[float] = []
    failed: list[str] = []
    inside: list[float] = []

    def on_record(rec: dict) -> None:
        stamps.append(time.perf_counter())
        inside.append(rec.get("seconds", float("nan")))
        if rec["status"] != "done":
            failed.append(f"{rec['scan_id']}: {rec.get('error')}")

    t0 = time.perf_counter()
    run(on_record, tag)
    wall = time.perf_counter() - t0
    if failed or len(stamps) != n:
        raise SystemExit(f"{name}: {len(stamps)} records, failures: {failed}")
    steady = (n - 1) / (stamps[-1] - stamps[0]) * 60 if n > 1 and stamps[-1] > stamps[0] else float("nan")
    later = inside[1:] or inside
    return {"name": name, "wall": wall, "first": stamps[0] - t0, "steady": steady,
            "per_scan": sum(later) / len(later)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scans", type=int, default=12, help="phantoms in the cohort (default 12)")
    ap.add_argument("--quick", action="store_true", help="small phantoms (24 x 64 x 64)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the loop and of the one worker (default: every core); 2 workers get "
                         "half as many each, at least 1")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the best of each is shown (2)")
    ap.add_argument("--config", help="config to benchmark (default: demo architecture, random weights)")
    ap.add_argument("--full-res", nargs="+", default=None, metavar="CLASS",
                    help="full-resolution classes (default: the batch default, positives and at least top-3)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        t = Path(tmp)
        cfg = args.config or str(untrained_config(t))
        shape = (24, 64, 64) if args.quick else (60, 128, 128)
        ds = make_dataset(args.scans, 11, out_dir=t / "cohort", shape=shape, spacing=(5.0, 2.5, 2.5))
        tasks, bad = read_cohort(ds.manifest)
        assert not bad and len(tasks) == args.scans
        cores = args.threads or _cores()
        n = len(tasks)

        def settings(out: str, threads: int) -> BatchSettings:
            (t / out / "scans").mkdir(parents=True)
            return BatchSettings(out_dir=str(t / out), config=cfg, device="cpu", torch_threads=threads,
                                 full_res=tuple(args.full_res) if args.full_res else None, run_id=out,
                                 organ_codes=tuple(__import__("medcam3d.data", fromlist=["ORGAN_CODES"])
                                                   .ORGAN_CODES.items()))

        def loop(on_record, tag):
            clear_sessions()
            run_loop(tasks, settings(f"loop{tag}", cores), 0, on_record)

        def dask(workers: int):
            def go(on_record, tag):
                from distributed import Client

                threads = max(1, cores // workers)
                with local_cluster(workers, threads=threads) as cluster, Client(cluster) as client:
                    run_dask(client, tasks, settings(f"dask{workers}{tag}", threads), 0, on_record)
            return go

        print(f"medcam3d batch benchmark: {n} phantoms {shape} at 5 x 2.5 x 2.5 mm, {_cores()} cores, {cores} "
              f"torch threads for the loop and the one worker, torch "
              f"{torch.__version__}, {platform.processor() or platform.machine()}, "
              f"full-res {args.full_res or 'default'}")
        configs = [("loop (no Dask)", loop), ("dask x1 worker", dask(1)), ("dask x2 workers", dask(2))]
        runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
        for rnd in range(args.repeat):  # interleaved rounds; the best of each filters out other processes' load
            for name, go in configs:
                runs[name].append(measure(name, go, n, tag=f"r{rnd}"))
        results = [max(runs[name], key=lambda r: r["steady"]) for name, _ in configs]
    print(f"{'configuration':<18} {'wall s':>8} {'first scan s':>13} {'scans/min (steady)':>19} "
          f"{'scans/min (wall)':>17} {'s/scan in task':>15}")
    for r in results:
        print(f"{r['name']:<18} {r['wall']:8.1f} {r['first']:13.1f} {r['steady']:19.1f} {n / r['wall'] * 60:17.1f}"
              f" {r['per_scan']:15.2f}")
    loop_r, d1, d2 = results
    overhead = loop_r["steady"] / d1["steady"] - 1
    print(f"Dask overhead vs plain loop (steady state, 1 worker): {100 * overhead:+.1f} % (target <= 5 %)")
    print(f"Dask overhead vs plain loop (whole run incl. cluster start, 1 worker): "
          f"{100 * (d1['wall'] / loop_r['wall'] - 1):+.1f} %")
    print(f"2 workers vs 1 worker (steady state): x{d2['steady'] / d1['steady']:.2f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(1-minute load average at the end: {load:.1f}; other processes skew these numbers)")


if __name__ == "__main__":
    main()
