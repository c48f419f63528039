"""``--cluster slurm --cluster-config FILE``: a small YAML -> ``dask_jobqueue.SLURMCluster`` keyword arguments.

The YAML (every key optional except ``jobs``; unknown keys are an error naming the file)::

    jobs: 8                     # SLURM jobs to start (each runs `processes` Dask workers)
    cores: 8                    # CPUs booked per job (sbatch --cpus-per-task); shared by its workers' torch threads
    processes: 1                # Dask workers per job (each loads the model once)
    memory: 32GB                # memory per job
    walltime: "04:00:00"
    queue: gpu                  # partition (sbatch -p)
    account: radiology          # sbatch -A
    gpus_per_job: 1             # 0 or 1: adds --gres=gpu:1 and runs the model on CUDA (use more jobs for more GPUs)
    job_extra_directives: ["--qos=normal"]
    job_script_prologue: ["module load cuda/12.4", "source /shared/venvs/medcam3d/bin/activate"]
    worker_extra_args: []
    local_directory: $TMPDIR
    log_directory: /shared/logs/medcam3d
    interface: ib0              # network interface of workers and scheduler
    python: /shared/venvs/medcam3d/bin/python
    death_timeout: 120
    job_name: medcam3d
    dashboard_address: null     # the scheduler's dashboard (default: none)

Dask's thread count per worker is 1 (one scan at a time); the job books ``cores`` CPUs and every worker uses
``cores // processes`` torch threads. The workers need medcam3d installed and the cohort, config, weights and
``--out`` folder on a shared file system.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["read_slurm_config", "slurm_cluster_kwargs", "start_slurm_cluster"]

_PASSTHROUGH = ("memory", "walltime", "queue", "account", "local_directory", "log_directory", "interface", "python",
                "death_timeout", "job_name")
_LISTS = ("job_extra_directives", "job_script_prologue", "worker_extra_args")
KEYS = ("jobs", "cores", "processes", "gpus_per_job", "dashboard_address", *_PASSTHROUGH, *_LISTS)


def _int(doc: dict[str, Any], key: str, default: int | None, where: str, lo: int = 1) -> int | None:
    v = doc.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise InputError(f"{key} must be an integer >= {lo}, got {v!r}", where)
    return v


def slurm_cluster_kwargs(doc: Any, where: str = "<cluster config>") -> tuple[dict[str, Any], int, int]:
    """Translate the YAML mapping into ``(SLURMCluster kwargs, jobs, torch threads per worker)``."""
    if not isinstance(doc, dict):
        raise InputError("cluster config must be a YAML mapping (jobs: 4, cores: 8, ...)", where)
    unknown = sorted(str(k) for k in doc if k not in KEYS)
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(KEYS)})", where)
    jobs = _int(doc, "jobs", None, where)
    if jobs is None:
        raise InputError("jobs (the number of SLURM jobs to start) is required", where)
    processes = _int(doc, "processes", 1, where)
    cores = _int(doc, "cores", processes, where)
    gpus = _int(doc, "gpus_per_job", 0, where, lo=0)
    assert processes is not None and cores is not None and gpus is not None
    if cores < processes:
        raise InputError(f"cores ({cores}) must be at least processes ({processes})", where)
    if gpus > 1 or (gpus == 1 and processes != 1):
        raise InputError("gpus_per_job: use one GPU per job with processes: 1, and more jobs for more GPUs", where)
    kwargs: dict[str, Any] = {
        "cores": processes,  # Dask threads per job: one per worker process, so each worker runs one scan at a time
        "processes": processes,
        "job_cpu": cores,  # CPUs booked per job
    }
    for k in _PASSTHROUGH:
        if doc.get(k) is not None:
            v = doc[k]
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise InputError(f"{k} must be a string or number, got {v!r}", where)
            kwargs[k] = v
    kwargs.setdefault("memory", "8GB")
    for k in _LISTS:
        v = doc.get(k)
        if v is None:
            continue
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise InputError(f"{k} must be a list of strings", where)
        kwargs[k] = list(v)
    if gpus:
        kwargs["job_extra_directives"] = [*kwargs.get("job_extra_directives", []), f"--gres=gpu:{gpus}"]
    kwargs["scheduler_options"] = {"dashboard_address": doc.get("dashboard_address")}
    if "interface" in kwargs:
        kwargs["scheduler_options"]["interface"] = kwargs["interface"]
    return kwargs, jobs, max(1, cores // processes)


def read_slurm_config(path: str | Path) -> tuple[dict[str, Any], int, int, bool]:
    """Read the YAML file: ``(kwargs, jobs, torch threads, uses GPUs)``."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError("cluster config not found", p)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InputError(f"not valid YAML ({str(e).splitlines()[0]})", p) from None
    kwargs, jobs, threads = slurm_cluster_kwargs(doc, str(p))
    return kwargs, jobs, threads, bool(doc.get("gpus_per_job"))


def start_slurm_cluster(kwargs: dict[str, Any], jobs: int) -> Any:
    """Start ``SLURMCluster(**kwargs)`` scaled to ``jobs`` jobs (dask-jobqueue imported here)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise InputError("--cluster slurm needs dask-jobqueue: pip install 'medcam3d[slurm]'") from None
    cluster = SLURMCluster(**kwargs)
    cluster.scale(jobs=jobs)
    return cluster
