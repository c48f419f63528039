"""Running a cohort: embedded Dask LocalCluster, an existing scheduler, SLURM, or a plain loop (``--shard``).

:func:`run_batch` is the whole command: read the cohort, refuse a batch folder made with other settings, log bad
rows, skip finished scans, run the rest, log every status record, write the report. Dask is imported inside the
functions that use it.

Fault tolerance:

* a scan whose task raises (anything but an :class:`~medcam3d.errors.InputError`, which is the scan's fault) is
  resubmitted up to ``retries`` times;
* a scan that kills its worker process (segfault, out-of-memory kill, ``os._exit``) is rescheduled by Dask on a
  restarted worker until it has killed ``allowed_failures + 1`` workers; Dask then raises ``KilledWorker`` and the
  scan is resubmitted while ``retries`` allow, else marked failed. So one scan kills at most
  ``(allowed_failures + 1) * (retries + 1)`` workers, and the rest of the cohort finishes;
* the embedded cluster sends one task at a time to each single-threaded worker (``worker-saturation: 1.0``), so an
  innocent scan is never queued behind a poisonous one on the same worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..explainer import Explainer
from ..files import sha256_of, write_json_atomic
from ..report import write_report
from .cohort import BadRow, ScanTask, read_cohort, shard
from .slurm import read_slurm_config, start_slurm_cluster
from .worker import (
    SCANS,
    BatchSettings,
    process_scan,
    read_done,
    scan_dir,
    settings_dict,
)

__all__ = [
    "BATCH_FILE",
    "FAILURES",
    "BatchResult",
    "EngineOptions",
    "default_workers",
    "fingerprint",
    "local_cluster",
    "run_batch",
    "run_dask",
    "run_loop",
]

FAILURES = "failures.jsonl"
BATCH_FILE = "medcam3d_batch.json"
RUNS = "runs"
log = logging.getLogger("medcam3d.batch")


@dataclass
class EngineOptions:
    """Where the tasks run.

    Attributes:
        kind: ``local`` (embedded LocalCluster) | ``scheduler`` (address) | ``scheduler_file`` | ``slurm`` |
            ``loop`` (no engine: this process, one scan after another).
        workers: local CPU workers (``local``); ignored with ``gpus``.
        gpus: GPU ids for one local worker each (``CUDA_VISIBLE_DEVICES`` per worker).
        address / scheduler_file / cluster_config: for the other kinds.
        allowed_failures: worker deaths a scan may cause before Dask gives up on it (embedded and SLURM clusters;
            default: Dask's ``distributed.scheduler.allowed-failures``).
    """

    kind: str = "local"
    workers: int | None = None
    gpus: tuple[str, ...] = ()
    address: str | None = None
    scheduler_file: str | None = None
    cluster_config: str | None = None
    allowed_failures: int | None = None


@dataclass
class BatchResult:
    """What a run did. ``records``: the final status record of every scan it ran (not the skipped ones)."""

    run_id: str
    total: int
    skipped: int
    done: int
    failed: int
    bad_rows: list[BadRow]
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    report: Path | None = None

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.bad_rows


def default_workers(cores: int | None = None) -> int:
    """Embedded CPU workers by default: one per core up to 4 cores, then one per two cores, at most 8 (writing
    maps and montages is single-threaded, so two 1-thread workers beat one 2-thread worker on 2 cores)."""
    c = cores or _cores()
    return max(1, min(8, c if c <= 4 else c // 2))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------------------
class Progress:
    """done / skipped / failed counts with an estimate of the time left: a tqdm bar on a terminal, else a line every
    ``every`` seconds (batch logs), nothing when quiet."""

    def __init__(self, total: int, skipped: int, quiet: bool, every: float = 30.0) -> None:
        self.total, self.skipped, self.done, self.failed = total, skipped, 0, 0
        self.quiet, self.every = quiet, every
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=skipped, unit="scan", dynamic_ncols=True, smoothing=0.1)
            self.bar.set_postfix_str(self._counts())

    def _counts(self) -> str:
        return f"done {self.done}, skipped {self.skipped}, failed {self.failed}"

    def eta(self) -> float | None:
        ran = self.done + self.failed
        left = self.total - self.skipped - ran
        if ran == 0:
            return None
        return (time.monotonic() - self.t0) / ran * left

    def update(self, rec: dict[str, Any]) -> None:
        st = rec.get("status")
        if st == "done":
            self.done += 1
        elif st == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self._counts())
        elif not self.quiet and (time.monotonic() - self.last >= self.every):
            self.last = time.monotonic()
            self.line()

    def line(self) -> None:
        eta = self.eta()
        left = "" if eta is None else f", about {_fmt_s(eta)} left"
        n = self.done + self.failed + self.skipped
        print(f"medcam3d batch: {n}/{self.total} ({self._counts()}){left}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_s(seconds: float) -> str:
    s = round(seconds)
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


# ---------------------------------------------------------------------------------------------------------------
# logs
# ---------------------------------------------------------------------------------------------------------------
def _append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    """Append one JSON line with a single write (O_APPEND: concurrent shards do not interleave lines)."""
    line = (json.dumps(obj, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _failure_line(rec: dict[str, Any], run_id: str) -> dict[str, Any]:
    keep = ("scan_id", "folder", "error", "error_type", "stage", "attempts", "worker_deaths", "where", "host",
            "worker")
    out = {k: rec[k] for k in keep if rec.get(k) is not None}
    out.update(run_id=run_id, time=_now())
    return out


# ---------------------------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------------------------
OnRecord = Callable[[dict[str, Any]], None]


def _final(rec: dict[str, Any], attempts: int, deaths: int) -> dict[str, Any]:
    rec = dict(rec)
    rec["attempts"] = attempts
    if deaths:
        rec["worker_deaths"] = deaths
    if rec.get("status") == "failed":
        rec.setdefault("stage", "explain")
    return rec


def run_loop(todo: Sequence[ScanTask], settings: BatchSettings, retries: int, on_record: OnRecord) -> None:
    """No engine: explain the scans one after another in this process (``--shard`` and the benchmark's baseline).
    torch's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    try:
        _loop(todo, settings, retries, on_record)
    finally:
        torch.set_num_threads(threads)


def _loop(todo: Sequence[ScanTask], settings: BatchSettings, retries: int, on_record: OnRecord) -> None:
    for task in todo:
        attempt = 1
        while True:
            rec = process_scan(task, settings, attempt)
            if rec["status"] == "failed" and rec.get("retryable") and attempt <= retries:
                attempt += 1
                continue
            on_record(_final(rec, attempt, 0))
            break


def _killed_record(task: ScanTask, err: BaseException, deaths: int, attempt: int) -> dict[str, Any]:
    return {"scan_id": task.scan_id, "folder": task.folder, "status": "failed", "retryable": True,
            "error": f"the scan killed its worker process {deaths} time(s) (Dask KilledWorker: {err})",
            "error_type": "KilledWorker", "attempt": attempt, "stage": "explain"}


def run_dask(client: Any, todo: Sequence[ScanTask], settings: BatchSettings, retries: int, on_record: OnRecord,
             allowed_failures: int | None = None) -> None:
    """Submit one task per scan to a Dask client and handle results as they complete (retries, KilledWorker)."""
    # dask: imported when a run uses it
    from distributed import KilledWorker, as_completed

    if allowed_failures is None:
        try:
            allowed_failures = int(client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures))
        except Exception:  # noqa: BLE001 - only used in messages
            import dask

            allowed_failures = int(dask.config.get("distributed.scheduler.allowed-failures"))
    meta: dict[str, tuple[ScanTask, int, int]] = {}
    tag = settings.run_id.rsplit("-", 1)[-1]

    def submit(task: ScanTask, attempt: int, deaths: int) -> Any:
        key = f"medcam3d-scan-{task.folder}-{tag}-{attempt}"
        fut = client.submit(process_scan, task, settings, attempt, key=key, pure=False, retries=0)
        meta[fut.key] = (task, attempt, deaths)
        return fut

    ac = as_completed([submit(t, 1, 0) for t in todo])
    for fut in ac:
        task, attempt, deaths = meta.pop(fut.key)
        try:
            rec = fut.result()
        except KilledWorker as e:
            deaths += allowed_failures + 1
            rec = _killed_record(task, e, deaths, attempt)
        except Exception as e:  # noqa: BLE001 - the scheduler lost, a pickling problem...: this scan failed
            rec = {"scan_id": task.scan_id, "folder": task.folder, "status": "failed", "retryable": True,
                   "error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__, "attempt": attempt}
        fut.release()
        if rec.get("status") == "failed" and rec.get("retryable") and attempt <= retries:
            ac.add(submit(task, attempt + 1, deaths))
            continue
        on_record(_final(rec, attempt, deaths))


#: imported once by the fork server that starts (and restarts) local workers, so a new worker is ready at once
FORKSERVER_PRELOAD = ("distributed", "numpy", "scipy", "torch", "nibabel", "monai", "monai.transforms",
                      "medcam3d.pipeline", "medcam3d.batch.worker")


@contextmanager
def local_cluster(workers: int, gpus: Sequence[str] = (), threads: int | None = None,
                  allowed_failures: int | None = None, quiet_logs: bool = True) -> Iterator[Any]:
    """An in-process Dask LocalCluster bound to 127.0.0.1, no dashboard: ``workers`` single-threaded worker
    processes (or one per GPU id, each with its own ``CUDA_VISIBLE_DEVICES``), each limited to ``threads``
    torch/BLAS threads. Nannies restart a worker that dies. Where the platform has it, workers are forked from a
    fork server that has already imported torch, MONAI and medcam3d (a restarted worker is ready in a second
    instead of re-importing for ten). The Dask settings hold while the context is open."""
    import dask  # heavy and optional (extra: reports): imported when a cluster starts
    from distributed import LocalCluster

    n = len(gpus) or workers
    t = threads or max(1, _cores() // max(1, n))
    env = {"OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t), "OPENBLAS_NUM_THREADS": str(t)}
    # Dask's nanny sets these in *this* process's environment before starting workers (the fork server inherits
    # them): thread counts for our workers, and no MALLOC_TRIM_THRESHOLD_, which turns off glibc's dynamic mmap
    # threshold and makes every large tensor allocation a fresh mmap (measurably slower torch). Restored on exit.
    pre_spawn = {**env, "MALLOC_TRIM_THRESHOLD_": None}
    saved = {k: os.environ.get(k) for k in pre_spawn}
    # The worker's statistical profiler samples the running task's stack every 10 ms (GIL-bound): off, it cost
    # several per cent of a scan's time in the benchmark.
    cfg: dict[str, Any] = {"distributed.scheduler.worker-saturation": 1.0,
                           "distributed.nanny.pre-spawn-environ": pre_spawn,
                           "distributed.worker.profile.enabled": False}
    if allowed_failures is not None:
        cfg["distributed.scheduler.allowed-failures"] = int(allowed_failures)
    if "forkserver" in multiprocessing.get_all_start_methods():
        cfg["distributed.worker.multiprocessing-method"] = "forkserver"
    with dask.config.set(cfg):
        if cfg.get("distributed.worker.multiprocessing-method") == "forkserver":
            from distributed.utils import get_mp_context

            get_mp_context().set_forkserver_preload(list(FORKSERVER_PRELOAD))
        cluster = LocalCluster(
            n_workers=0 if gpus else n, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, silence_logs=logging.CRITICAL if quiet_logs else logging.WARNING, env=env,
        )
        try:
            if gpus:
                base = cluster.new_spec
                for g in gpus:
                    cluster.worker_spec[f"gpu-{g}"] = {
                        "cls": base["cls"],
                        "options": {**base["options"], "env": {**env, "CUDA_VISIBLE_DEVICES": str(g)}},
                    }
                cluster.scale(len(gpus))
            yield cluster
        finally:
            cluster.close()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------
def fingerprint(settings: BatchSettings) -> dict[str, Any]:
    """What makes two runs' outputs comparable: config and weights checksums, methods, class selections, codes, the
    task (``segmentation``; absent for classification configs, which name none)."""
    cfg = settings.load_config()
    if settings.bundle or settings.target_layer:
        # a network_def that does not build, weights that do not fit or an unknown layer: refused before any output
        model = cfg.build_model()
        if settings.target_layer:
            Explainer(model, settings.target_layer)
    weights = Path(settings.checkpoint).expanduser().resolve() if settings.checkpoint else cfg.weights_path
    if settings.checkpoint and not (weights and weights.is_file()):
        raise InputError("model checkpoint not found", weights)
    return {
        "config_name": cfg.name,
        "config_sha256": sha256_of(cfg.path) if cfg.path else None,
        "weights_sha256": sha256_of(weights) if weights is not None and weights.is_file() else None,
        "methods": list(settings.methods),
        "classes": list(settings.classes) if settings.classes else None,
        "full_res": list(settings.full_res) if settings.full_res else None,
        "organ_codes": dict(settings.organ_codes),
        "map_geometry": settings.map_geometry or cfg.map_geometry or "auto",
        # recorded only with --bundle, so that older batch folders keep their hash
        **({"bundle": settings.bundle} if settings.bundle else {}),
        # the task (issue 19): recorded only when the config (or bundle) names one, for the same reason
        **({"task": cfg.task} if cfg.task else {}),
        **({"target_layer": settings.target_layer} if settings.target_layer else {}),
        # outputs added by issue 18: recorded only when asked for, so that older batch folders keep their hash
        **({"dicom_out": {"seg_threshold": settings.dicom_seg}} if settings.dicom_out else {}),
    }


def _fp_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _check_batch_folder(out: Path, fp: dict[str, Any], redo: bool) -> str:
    """Create or check ``OUT/medcam3d_batch.json``; returns the fingerprint hash recorded in done markers."""
    h = _fp_hash(fp)
    f = out / BATCH_FILE
    if out.exists() and not out.is_dir():
        raise InputError("--out exists and is not a folder", out)
    if f.is_file():
        try:
            old = json.loads(f.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
        if old.get("fingerprint_sha") != h and not redo:
            before = old.get("fingerprint", {})
            diff = sorted(k for k in set(before) | set(fp) if before.get(k) != fp.get(k)) or ["unknown"]
            raise InputError(f"this batch folder was made with other settings ({', '.join(diff)} differ); use "
                             "another --out, or --redo to recompute its scans with these settings", out)
        if old.get("fingerprint_sha") == h:
            return h
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")) and not (out / SCANS).is_dir():
        raise InputError("--out is a non-empty folder that is not a medcam3d batch folder", out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"medcam3d_batch": 1, "created": _now(), "fingerprint_sha": h, "fingerprint": fp}, f)
    return h


def finished(out: Path, task: ScanTask, fp_sha: str) -> bool:
    """Done with these settings: the marker exists and records this fingerprint."""
    d = read_done(scan_dir(out, task))
    return d is not None and d.get("fingerprint_sha") == fp_sha


def run_batch(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    settings: BatchSettings,
    engine: EngineOptions,
    *,
    shard_spec: tuple[int, int] | None = None,
    retries: int = 1,
    redo: bool = False,
    quiet: bool = False,
    report: bool = True,
    progress_every: float = 30.0,
) -> BatchResult:
    """The ``medcam3d batch`` command as a function (see the module docstring)."""
    t0 = time.perf_counter()
    out_dir = Path(out).expanduser().resolve()
    tasks, bad = read_cohort(source)
    if not tasks and not bad:
        raise InputError("the cohort has no scans", source)
    if shard_spec is not None:
        tasks = shard(tasks, *shard_spec)  # may be empty when there are more shards than scans
        if shard_spec[0] != 0:
            bad = []  # shard 0 reports the bad rows, once
    fp = fingerprint(settings)
    fp_sha = _check_batch_folder(out_dir, fp, redo)
    (out_dir / SCANS).mkdir(exist_ok=True)
    (out_dir / RUNS).mkdir(exist_ok=True)
    run_id = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    settings = replace(settings, out_dir=str(out_dir), run_id=run_id, fingerprint_sha=fp_sha)
    run_log = out_dir / RUNS / f"{run_id}.jsonl"
    _append_jsonl(run_log, {"event": "start", "time": _now(), "run_id": run_id, "source": str(source),
                            "shard": list(shard_spec) if shard_spec else None, "engine": engine.kind,
                            "settings": settings_dict(settings), "fingerprint": fp})
    for b in bad:
        rec = {"scan_id": b.scan_id, "status": "failed", "error": b.error, "error_type": "BadRow", "stage": "manifest",
               "where": b.where, "attempts": 0}
        _append_jsonl(out_dir / FAILURES, _failure_line(rec, run_id))
        _append_jsonl(run_log, rec)
        if not quiet:
            print(f"medcam3d batch: skipping bad row {b.where}: {b.error}", file=sys.stderr)
    todo = [t for t in tasks if not finished(out_dir, t, fp_sha)]
    skipped = len(tasks) - len(todo)
    result = BatchResult(run_id, len(tasks), skipped, 0, 0, bad)
    progress = Progress(len(tasks), skipped, quiet, every=progress_every)
    if not quiet:
        where = {"loop": "this process", "local": "a local Dask cluster", "scheduler": engine.address,
                 "scheduler_file": engine.scheduler_file, "slurm": "SLURM"}.get(engine.kind, engine.kind)
        print(f"medcam3d batch: {len(tasks)} scans{f' (shard {shard_spec[0]}/{shard_spec[1]})' if shard_spec else ''}"
              f", {skipped} already finished, {len(todo)} to run on {where}; output {out_dir}", file=sys.stderr)

    def on_record(rec: dict[str, Any]) -> None:
        result.records.append(rec)
        if rec["status"] == "done":
            result.done += 1
        elif rec["status"] == "skipped":
            result.skipped += 1
        else:
            result.failed += 1
            _append_jsonl(out_dir / FAILURES, _failure_line(rec, run_id))
            if not quiet:
                print(f"\nmedcam3d batch: FAILED {rec['scan_id']!r}: {rec.get('error')}", file=sys.stderr)
        _append_jsonl(run_log, rec)
        progress.update(rec)

    try:
        if todo:
            _run(engine, todo, settings, retries, on_record)
    finally:
        progress.close()
        result.seconds = time.perf_counter() - t0
        _append_jsonl(run_log, {"event": "end", "time": _now(), "total": result.total, "done": result.done,
                                "skipped": result.skipped, "failed": result.failed, "bad_rows": len(bad),
                                "seconds": round(result.seconds, 3)})
    if report and shard_spec is None:
        result.report = _write_report(out_dir, quiet)
    if not quiet:
        print(f"medcam3d batch: {result.done} done, {result.skipped} skipped, {result.failed} failed, "
              f"{len(bad)} bad rows in {_fmt_s(result.seconds)}"
              + (f"; failures in {out_dir / FAILURES}" if result.failed or bad else "")
              + (f"; report {result.report}" if result.report else ""), file=sys.stderr)
    return result


def _write_report(out_dir: Path, quiet: bool) -> Path | None:
    try:
        return write_report(out_dir).html
    except (ImportError, InputError) as e:  # the scans are done; a missing report extra must not fail the run
        if not quiet:
            print(f"medcam3d batch: no report ({e}); install medcam3d[reports]", file=sys.stderr)
        return None


def _run(engine: EngineOptions, todo: list[ScanTask], settings: BatchSettings, retries: int,
         on_record: OnRecord) -> None:
    if engine.kind == "loop":
        run_loop(todo, settings, retries, on_record)
        return
    try:
        from distributed import Client
    except ImportError:
        raise InputError("medcam3d batch needs dask[distributed]: pip install 'medcam3d[reports]' (or use --shard "
                         "to run without Dask)") from None
    allowed = engine.allowed_failures
    if engine.kind == "local":
        n = len(engine.gpus) or engine.workers or default_workers()
        threads = settings.torch_threads or max(1, _cores() // n)
        settings = replace(settings, torch_threads=threads, device="cuda" if engine.gpus else settings.device)
        with local_cluster(n, engine.gpus, threads, allowed) as cluster, Client(cluster) as client:
            run_dask(client, todo, settings, retries, on_record, allowed)
        return
    if engine.kind == "slurm":
        import dask

        kwargs, jobs, threads, gpu = read_slurm_config(engine.cluster_config or "")
        cfg = {} if allowed is None else {"distributed.scheduler.allowed-failures": int(allowed)}
        settings = replace(settings, torch_threads=settings.torch_threads or threads,
                           device="cuda" if gpu else settings.device)
        with dask.config.set(cfg):
            cluster = start_slurm_cluster(kwargs, jobs)
            try:
                with Client(cluster) as client:
                    run_dask(client, todo, settings, retries, on_record, allowed)
            finally:
                cluster.close()
        return
    if engine.kind == "scheduler":
        client = _connect(lambda: Client(engine.address, timeout="30s"), f"scheduler {engine.address}")
    elif engine.kind == "scheduler_file":
        f = Path(engine.scheduler_file or "")
        if not f.is_file():
            raise InputError("scheduler file not found", f)
        client = _connect(lambda: Client(scheduler_file=str(f), timeout="30s"), f"scheduler file {f}")
    else:
        raise InputError(f"unknown engine {engine.kind!r}")
    with client:
        run_dask(client, todo, settings, retries, on_record, None)


def _connect(make: Callable[[], Any], what: str) -> Any:
    try:
        return make()
    except (OSError, TimeoutError) as e:
        raise InputError(f"cannot connect to the Dask {what} ({e})") from None
