"""One scan of a batch: read -> explain -> organ shares -> output folder -> done marker; a small status record back.

A segmentation config's scans are explained and written exactly as ``medcam3d explain`` does (one map per target,
``segmentation.nii.gz``, ``targets.csv``); their organ shares are per target (keyed by the target's name, as the
summary's ``classes`` name it; a target may rest on the organs its class is allowed), and a scan whose prediction
is empty (nothing explained) has none.

This module runs inside Dask workers (and in the plain loop of ``--shard``). It never imports dask at import time.
A worker process keeps one :class:`medcam3d.pipeline.Session` per settings (module-level cache): the model is
loaded by the first scan a process handles and reused for every later one. A process-wide lock runs one scan at a
time per process (a model with hooks is not thread-safe), so a worker with several threads does not oversubscribe.

Atomicity: :meth:`Session.write` builds the folder under a temporary name (``.<folder>.XXXXXXXX.partial``) beside
its destination and renames it into place when complete; the ``.done`` marker is written (atomically) after
that. A folder without a marker is complete but unconfirmed and is redone on the next run; a leftover temporary
folder from a killed process is removed before its scan is processed again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..config import SEGMENTATION_TASK, Config, load_config
from ..errors import InputError
from ..files import atomic_path
from ..io import Volume, check_dicom_source, read_volume
from ..methods import DEFAULT_METHODS
from ..pipeline import DEFAULT_CONFIG, DicomExport, EmptyScan, ScanResult, Session, read_scan
from .cohort import ScanTask
from .organs import organ_fractions, shares_record

__all__ = ["DONE", "SCANS", "BatchSettings", "clear_sessions", "is_done", "process_scan", "read_done", "scan_dir"]

DONE = ".done"
SCANS = "scans"

_SESSIONS: dict[tuple[Any, ...], Session] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class BatchSettings:
    """What every task needs (small; pickled with each task).

    Attributes:
        out_dir: the batch folder (absolute; must be visible to every worker).
        config: config path or shipped name (None: the embedded demo model); must be visible to every worker.
        bundle: a MONAI bundle folder instead of ``config`` (absolute; visible to every worker), as ``--bundle``.
        checkpoint: weights overriding the config's.
        methods, classes, full_res: as ``medcam3d explain`` (None = its defaults).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` on the worker.
        torch_threads: intra-op threads for torch on the worker (None: the worker's own thread count).
        organ_codes: organ name -> label value of the organ label maps.
        allow_resample: accept irregular DICOM series by resampling.
        map_geometry: ``auto`` | ``field`` | ``receptive``, as ``medcam3d explain --map-geometry`` (also used for
            the organ shares' blocks); None: the config's ``map_geometry``, else ``auto``.
        max_voxels: the size checks' voxel limit (None: the default), as ``--max-voxels``.
        ignore_modality: explain DICOM scans of a modality the config does not read, as ``--ignore-modality``.
        target_layer: the explained layer overriding the config's, as ``--target-layer`` (None: the config's).
        dicom_out: also write the full-resolution maps as DICOM Parametric Maps (``--dicom-out``; every scan must be
            a DICOM series).
        dicom_seg: with ``dicom_out``, also each map thresholded at this level as a DICOM SEG (``--dicom-seg``).
        run_id: this run's id (recorded in the done markers).
        fingerprint_sha: the batch folder's settings fingerprint (recorded in the done markers; a marker with
            another fingerprint does not count as done).
    """

    out_dir: str
    config: str | None = None
    checkpoint: str | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    classes: tuple[str, ...] | None = None
    full_res: tuple[str, ...] | None = None
    device: str = "auto"
    torch_threads: int | None = None
    organ_codes: tuple[tuple[str, int], ...] = ()
    allow_resample: bool = False
    map_geometry: str | None = None
    max_voxels: int | None = None
    ignore_modality: bool = False
    dicom_out: bool = False
    dicom_seg: float | None = None
    run_id: str = ""
    fingerprint_sha: str = ""
    bundle: str | None = None
    target_layer: str | None = None

    def session_key(self) -> tuple[Any, ...]:
        return (self.config, self.bundle, self.checkpoint, self.methods, self.device, self.torch_threads,
                self.map_geometry, self.max_voxels, self.ignore_modality, self.target_layer)

    def load_config(self) -> Config:
        """The config these settings name: the bundle's (:func:`medcam3d.monai.bundle.load_bundle`), the given
        config, or the embedded demo model's."""
        if self.bundle is None:
            return load_config(self.config or DEFAULT_CONFIG)
        from ..monai.bundle import config_or_bundle  # lazy: MONAI's bundle parser is needed only with a bundle

        source = config_or_bundle(self.config, self.bundle)
        assert isinstance(source, Config)
        return source

    @property
    def dicom(self) -> DicomExport | None:
        """The DICOM export asked for (None without ``dicom_out``)."""
        return DicomExport(seg_threshold=self.dicom_seg) if self.dicom_out else None


def scan_dir(out_dir: str | os.PathLike[str], task: ScanTask) -> Path:
    return Path(out_dir) / SCANS / task.folder


def is_done(folder: Path, fingerprint_sha: str | None = None) -> bool:
    """A scan is finished iff its folder holds the done marker (written after the folder was renamed into place),
    made with the given settings fingerprint when one is given."""
    if fingerprint_sha is None:
        return (folder / DONE).is_file()
    d = read_done(folder)
    return d is not None and d.get("fingerprint_sha") == fingerprint_sha


def read_done(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json_atomic(obj: Any, path: Path) -> None:
    """Write JSON atomically and flushed to disk (the done marker must survive a crash once it exists)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(scans: Path, folder: str) -> int:
    """Delete temporary folders a killed process left for this scan (``.<folder>.XXXXXXXX.partial`` / ``.old``)."""
    pat = re.compile(r"\." + re.escape(folder) + r"\.[a-z0-9_]{8}\.(partial|old)")
    n = 0
    try:
        entries = list(scans.iterdir())
    except OSError:
        return 0
    for p in entries:
        if pat.fullmatch(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def clear_sessions() -> None:
    """Forget the cached sessions of this process."""
    with _LOCK:
        _SESSIONS.clear()


def _worker_threads() -> int | None:
    # dask is heavy and optional: imported when asked inside a worker, never at import time
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError, AttributeError):
        return None


def _set_threads(n: int | None) -> None:
    if n and torch.get_num_threads() != int(n):
        torch.set_num_threads(max(1, int(n)))


def get_session(settings: BatchSettings) -> tuple[Session, bool]:
    """This process's Session for ``settings`` and whether this call loaded it. Call with ``_LOCK`` held."""
    key = settings.session_key()
    if key in _SESSIONS:
        return _SESSIONS[key], False
    config = settings.load_config() if settings.bundle else settings.config
    _SESSIONS[key] = Session(config, settings.checkpoint, settings.methods, settings.device,
                             map_geometry=settings.map_geometry, max_voxels=settings.max_voxels,
                             ignore_modality=settings.ignore_modality, target_layer=settings.target_layer)
    return _SESSIONS[key], True


def _share_labels(session: Session, result: ScanResult) -> tuple[list[str], dict[str, list[str]]]:
    """The names the organ shares are keyed by, indexed like the explanation's outputs, and the allowed organs per
    name: the config's labels and ``allowed_regions`` for classes; for segmentation targets, the target names (as
    the summary's ``classes`` name them), each allowed the organs of its class."""
    cfg = session.config
    exp = result.explanation
    if result.task != SEGMENTATION_TASK:
        return list(cfg.labels), dict(cfg.allowed_regions or {})
    names = list(exp.labels or [])
    allowed = {}
    for t in exp.targets or []:
        label = cfg.labels[t.cls] if 0 <= t.cls < len(cfg.labels) else None
        if label is not None and label in (cfg.allowed_regions or {}):
            allowed[t.name] = list(cfg.allowed_regions[label])
    return names, allowed


def _organ_shares(session: Session, result: ScanResult, organs: str, codes: dict[str, int]) -> dict[str, Any]:
    t0 = time.perf_counter()
    lab_vol = read_volume(organs)
    on_grid = session.preprocessor.preprocess_labels(lab_vol, like=result.grid)[0]  # [S, H, W]
    exp = result.explanation
    geometry = exp.map_geometry(session.map_geometry)
    names, frac = organ_fractions(on_grid.as_tensor() if hasattr(on_grid, "as_tensor") else on_grid,
                                  exp.map_size, codes, geometry)
    raw = {m: exp.raw[m][0] for m in exp.methods}
    labels, allowed = _share_labels(session, result)
    rec = shares_record(raw, exp.classes, labels, names, frac, allowed)
    rec["codes"] = dict(codes)
    rec["resolution"] = "feature"
    rec["map_geometry"] = geometry.kind  # where the blocks lie: field or receptive (summary: map_geometry)
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    return rec


def _explain_and_write(session: Session, task: ScanTask, settings: BatchSettings, volume: Volume, t_read: float,
                       dest: Path) -> None:
    """Explain ``volume`` and write its output folder at ``dest`` (with the ``batch`` section and, with an organ
    map, ``organ_shares``). A segmentation net that predicts nothing to explain gets its folder as ``medcam3d
    explain`` writes it (the empty segmentation and a note, no maps, no organ shares): finished, not failed."""
    extra: dict[str, Any] = {"batch": {"scan_id": task.scan_id, "folder": task.folder, "run_id": settings.run_id}}
    try:
        result = session.explain_volume(volume, settings.classes, read_seconds=t_read)
    except EmptyScan as e:
        session.write_empty(e.result, dest, extra=extra)
        return
    if task.organs:
        extra["organ_shares"] = _organ_shares(session, result, task.organs, dict(settings.organ_codes))
    # maps are compressed with this worker's share of the cores (set for torch by the caller)
    session.write(result, dest, settings.classes, settings.full_res, extra=extra, dicom=settings.dicom,
                  threads=torch.get_num_threads())


def process_scan(task: ScanTask, settings: BatchSettings, attempt: int = 1) -> dict[str, Any]:
    """Explain one scan into ``OUT/scans/<folder>/`` and return a small status record (never arrays).

    The record: ``scan_id``, ``folder``, ``status`` (``done`` | ``skipped`` | ``failed``), ``error`` and
    ``retryable`` (failed only: an :class:`InputError` is the scan's fault and not retried), ``seconds``,
    ``model_loaded`` (this task loaded the model), ``pid``, ``host``, ``worker``, ``attempt``."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"scan_id": task.scan_id, "folder": task.folder, "attempt": attempt, "pid": os.getpid(),
                           "host": socket.gethostname(), "worker": _worker_address(), "model_loaded": False}
    scans = Path(settings.out_dir) / SCANS
    dest = scans / task.folder
    if is_done(dest, settings.fingerprint_sha):
        # finished by an earlier run (skipped), or by this run on a worker that died before Dask fetched the
        # result, so that Dask computed the task again (done)
        marker = read_done(dest) or {}
        rec.update(status="done" if marker.get("run_id") == settings.run_id else "skipped", seconds=0.0,
                   recovered=marker.get("run_id") == settings.run_id)
        return rec
    with _LOCK:
        try:
            remove_leftovers(scans, task.folder)
            _set_threads(settings.torch_threads or _worker_threads())
            session, loaded = get_session(settings)
            rec["model_loaded"] = loaded
            volume, t_read = read_scan(task.path, allow_resample=settings.allow_resample,
                                       max_voxels=settings.max_voxels)
            if settings.dicom_out:
                check_dicom_source(volume)
            _explain_and_write(session, task, settings, volume, t_read, dest)
            _fsync_dir(scans)
            _write_json_atomic({
                "scan_id": task.scan_id, "run_id": settings.run_id, "fingerprint_sha": settings.fingerprint_sha,
                "attempt": attempt, "pid": os.getpid(),
                "host": rec["host"], "worker": rec["worker"],
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }, dest / DONE)
            rec["status"] = "done"
        except InputError as e:
            rec.update(status="failed", error=str(e), error_type="InputError", retryable=False)
        except Exception as e:  # noqa: BLE001 - a scan's failure must not stop the cohort
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            rec.update(status="failed", error=f"{type(e).__name__}: {e}", error_type=type(e).__name__,
                       retryable=True, traceback="".join(tb[-6:])[-4000:])
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    return rec


def settings_dict(settings: BatchSettings) -> dict[str, Any]:
    d = asdict(settings)
    d["organ_codes"] = dict(settings.organ_codes)
    return d
