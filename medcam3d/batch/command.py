"""``medcam3d batch``: the command line. Cheap to import (no dask, no torch work at import; dask is imported by the
engine when a run starts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..argtypes import int_at_least, probability
from ..errors import InputError
from ..geometry import GEOMETRIES
from ..methods import DEFAULT_METHODS
from .cohort import parse_shard
from .engine import EngineOptions, run_batch
from .worker import BatchSettings

__all__ = ["cmd_batch", "register"]

EXAMPLES = """examples:
  medcam3d batch cohort.csv --out audit/                        # embedded Dask cluster, CPU workers
  medcam3d batch scans_folder/ --out audit/ --workers 4
  medcam3d batch cohort.csv --out audit/ --gpus 0,1             # one worker per GPU
  medcam3d batch cohort.csv --out audit/ --scheduler tcp://10.0.0.5:8786
  medcam3d batch cohort.csv --out audit/ --cluster slurm --cluster-config slurm.yaml
  medcam3d batch cohort.csv --out audit/ --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT   # no engine
  medcam3d report audit/                                        # after a job array

manifest: CSV with scan_id,path[,organ_labels_path] (header optional; paths relative to the manifest).
Re-running the same command skips finished scans. Exit code 0: every scan finished; 3: the run completed but some
scans failed or rows were bad (see OUT/failures.jsonl); 2: bad command line or settings; 1: internal error.
"""


def _gpus(text: str) -> tuple[str, ...]:
    ids = tuple(s.strip() for s in text.split(",") if s.strip())
    if not ids or not all(s.isdigit() for s in ids) or len(set(ids)) != len(ids):
        raise InputError(f"--gpus {text!r}: expected distinct GPU ids like 0,1")
    return ids


def _organ_codes(spec: str | None) -> tuple[tuple[str, int], ...]:
    if spec is None:
        # medcam3d.data imports scipy (about half a second): only when the phantoms' codes are the default
        from ..data import ORGAN_CODES

        return tuple(ORGAN_CODES.items())
    p = Path(spec).expanduser()
    if not p.is_file():
        raise InputError("organ codes file not found", p)
    import yaml

    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise InputError("organ codes file is not valid JSON/YAML", p) from None
    if not isinstance(doc, dict) or not doc or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in doc.items()
    ):
        raise InputError("organ codes must map organ names to integer label values, e.g. {right_lung: 2}", p)
    if len(set(doc.values())) != len(doc):
        raise InputError("organ codes: two organs share a label value", p)
    return tuple((k, int(v)) for k, v in doc.items())


def _check_device(text: str) -> None:
    """A device string torch does not know is refused here (one line); availability is checked on the workers."""
    if text == "auto":
        return
    import torch  # heavy: this module stays cheap to import

    try:
        d = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"--device {text!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if d.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {text!r}: medcam3d runs on cpu, cuda or mps")


def _check_options(args: argparse.Namespace, shard_spec: Any) -> None:
    """Refuse option combinations that cannot work, before anything is written (one line each)."""
    _check_device(args.device)
    if args.dicom_seg is not None and not args.dicom_out:
        raise InputError("--dicom-seg needs --dicom-out")
    engines = [x for x in (args.scheduler, args.scheduler_file, args.cluster) if x]
    if len(engines) > 1 or (engines and shard_spec):
        raise InputError("choose one of --scheduler, --scheduler-file, --cluster slurm, --shard")
    if (args.workers or args.gpus) and (engines or shard_spec):
        raise InputError("--workers/--gpus are for the embedded cluster; not with --scheduler, --cluster or --shard")
    if args.workers is not None and args.gpus:
        raise InputError("--workers and --gpus: choose one (one worker per GPU)")
    if args.cluster and not args.cluster_config:
        raise InputError("--cluster slurm needs --cluster-config FILE (YAML)")
    if args.cluster_config and not args.cluster:
        raise InputError("--cluster-config needs --cluster slurm")
    if args.bundle and args.config:
        raise InputError("give --config or --bundle, not both")
    for name in ("retries", "workers", "torch_threads", "allowed_failures"):
        v = getattr(args, name)
        if v is not None and v < (1 if name in ("workers", "torch_threads") else 0):
            least = 1 if name in ("workers", "torch_threads") else 0
            raise InputError(f"--{name.replace('_', '-')} {v}: must be >= {least}")


def cmd_batch(args: argparse.Namespace) -> int:
    shard_spec = parse_shard(args.shard) if args.shard else None
    _check_options(args, shard_spec)
    if shard_spec:
        kind = "loop"
    elif args.scheduler:
        kind = "scheduler"
    elif args.scheduler_file:
        kind = "scheduler_file"
    elif args.cluster:
        kind = "slurm"
    else:
        kind = "local"
    engine = EngineOptions(kind=kind, workers=args.workers, gpus=_gpus(args.gpus) if args.gpus else (),
                           address=args.scheduler, scheduler_file=args.scheduler_file,
                           cluster_config=args.cluster_config, allowed_failures=args.allowed_failures)
    config = args.config
    if config and Path(config).expanduser().exists():
        config = str(Path(config).expanduser().resolve())  # workers may run elsewhere: absolute paths
    bundle = str(Path(args.bundle).expanduser().resolve()) if args.bundle else None
    checkpoint = str(Path(args.model).expanduser().resolve()) if args.model else None
    settings = BatchSettings(
        out_dir=str(Path(args.out).expanduser().resolve()), config=config, bundle=bundle, checkpoint=checkpoint,
        methods=tuple(args.methods), classes=tuple(args.classes) if args.classes else None,
        full_res=tuple(args.full_res) if args.full_res else None, device=args.device,
        torch_threads=args.torch_threads, organ_codes=_organ_codes(args.organ_codes),
        allow_resample=args.allow_resample, map_geometry=args.map_geometry, max_voxels=args.max_voxels,
        ignore_modality=args.ignore_modality, dicom_out=args.dicom_out, dicom_seg=args.dicom_seg,
        target_layer=args.target_layer,
    )
    result = run_batch(args.cohort, args.out, settings, engine, shard_spec=shard_spec, retries=args.retries,
                       redo=args.redo, quiet=args.quiet, report=not args.no_report)
    if args.json:
        print(json.dumps({"run_id": result.run_id, "total": result.total, "done": result.done,
                          "skipped": result.skipped, "failed": result.failed, "bad_rows": len(result.bad_rows),
                          "seconds": round(result.seconds, 3),
                          "report": str(result.report) if result.report else None}))
    return 0 if result.ok else 3


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "batch", help="explain a cohort (manifest CSV or folder) on Dask: resumable, fault-tolerant, with a report",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cohort", help="manifest CSV (scan_id,path[,organ_labels_path]) or a folder of scans")
    p.add_argument("--out", required=True, help="batch folder (created; re-runs resume it)")
    p.add_argument("--config", help="YAML config (default: the embedded demo model's)")
    p.add_argument("--bundle", metavar="DIR", help="a MONAI bundle folder (configs/inference.json, models/model.pt) "
                                                   "instead of --config, as in medcam3d explain")
    p.add_argument("--model", metavar="CHECKPOINT", help="weights file overriding the config's")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help=f"methods to compute (default: {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--classes", nargs="+", metavar="CLASS", help="as in medcam3d explain (default: all)")
    p.add_argument("--full-res", nargs="+", metavar="CLASS",
                   help="classes with full-resolution maps and montages, as in medcam3d explain (default: predicted "
                        "positive, at least the top 3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N, on the workers (--gpus sets cuda)")
    p.add_argument("--organ-codes", metavar="FILE",
                   help="JSON/YAML {organ name: label value} of the organ label maps (default: the phantoms' codes, "
                        "medcam3d.data.ORGAN_CODES)")
    p.add_argument("--allow-resample", action="store_true", help="accept irregular DICOM series by resampling")
    p.add_argument("--target-layer", metavar="LAYER", help="as in medcam3d explain: the explained layer, overriding "
                                                         "the config's (default: the config's)")
    p.add_argument("--map-geometry", choices=list(GEOMETRIES), default=None,
                   help="as in medcam3d explain; also where the organ shares' blocks lie (default: the config's "
                        "map_geometry, else auto)")
    p.add_argument("--max-voxels", type=int_at_least(1), metavar="N",
                   help="as in medcam3d explain: largest scan or preprocessing grid, in voxels (default 1.5e+09)")
    p.add_argument("--ignore-modality", action="store_true",
                   help="as in medcam3d explain: explain DICOM scans of a modality the config does not read")
    p.add_argument("--dicom-out", action="store_true",
                   help="as in medcam3d explain: also DICOM Parametric Maps of the full-resolution heatmaps (every "
                        "scan must be a DICOM series; others fail as bad input)")
    p.add_argument("--dicom-seg", type=probability, metavar="LEVEL",
                   help="with --dicom-out: also each heatmap >= LEVEL as a binary DICOM SEG")
    g = p.add_argument_group("where it runs")
    g.add_argument("--workers", type=int,
                   help="embedded cluster: CPU worker processes (default: one per core up to 4, then cores/2, <= 8)")
    g.add_argument("--gpus", help="embedded cluster: one worker per GPU id, e.g. 0,1")
    g.add_argument("--torch-threads", type=int, help="torch threads per worker (default: cores / workers)")
    g.add_argument("--scheduler", metavar="ADDRESS", help="use a running Dask scheduler, e.g. tcp://host:8786")
    g.add_argument("--scheduler-file", metavar="FILE", help="use the Dask scheduler described by this file")
    g.add_argument("--cluster", choices=["slurm"], help="start SLURM workers with dask-jobqueue (extra: slurm)")
    g.add_argument("--cluster-config", metavar="FILE", help="YAML for --cluster slurm (see docs/batch.md)")
    g.add_argument("--shard", metavar="I/N", help="run shard I of N (0 <= I < N) in this process, without Dask")
    g = p.add_argument_group("failures and resuming")
    g.add_argument("--retries", type=int, default=1,
                   help="resubmit a scan that raised an unexpected error or killed its workers up to K times "
                        "(default 1; bad input is not retried)")
    g.add_argument("--allowed-failures", type=int,
                   help="worker deaths one scan may cause before Dask gives up on it (embedded/SLURM cluster; "
                        "default: dask's distributed.scheduler.allowed-failures, 3)")
    g.add_argument("--redo", action="store_true",
                   help="accept a batch folder made with other settings and recompute its scans")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--quiet", action="store_true", help="no progress or messages")
    p.add_argument("--json", action="store_true", help="print a JSON summary of the run on stdout")
    p.set_defaults(func=cmd_batch)
