"""``medcam3d batch``: the per-scan pipeline over a cohort, on Dask distributed, resumable and fault-tolerant.

Modules (none imports dask at import time; the engine imports it inside its functions):

* :mod:`~medcam3d.batch.cohort`   manifest / folder of scans -> :class:`ScanTask` list, bad rows, shards;
* :mod:`~medcam3d.batch.organs`   share of positive HiResCAM / Grad-CAM contribution inside each organ;
* :mod:`~medcam3d.batch.worker`   one scan -> one output folder + done marker, returning a small status record;
  the model is loaded once per worker process and kept;
* :mod:`~medcam3d.batch.engine`   run the tasks: embedded LocalCluster, an existing scheduler, SLURM
  (dask-jobqueue) or a plain loop (``--shard``); retries, worker deaths, progress;
* :mod:`~medcam3d.batch.slurm`    the small SLURM YAML -> ``dask_jobqueue.SLURMCluster`` keyword arguments;
* :mod:`~medcam3d.batch.command`  the command line.

Batch folder layout (``--out DIR``)::

    DIR/medcam3d_batch.json        what produced the scans (config/weights checksums, methods, classes): a re-run
                                   with different settings is refused instead of mixing models
    DIR/scans/<folder>/            one ``medcam3d explain`` output folder per scan (see medcam3d.outputs) whose
                                   summary.json also holds ``batch`` (scan id) and, with an organ map,
                                   ``organ_shares``; written under a temporary name and renamed into place
    DIR/scans/<folder>/.done       done marker (JSON), written after the rename: a scan is finished iff it exists
    DIR/failures.jsonl             one JSON line per failed scan attempt series (append-only across runs)
    DIR/runs/<run_id>.jsonl        start line, one status record per scan, end line (append-only)
    DIR/cohort_report.html         the report (``medcam3d report DIR``), cohort_table.csv / .parquet; for a
                                   segmentation config also cohort_targets.csv (components per scan and class)
"""

from __future__ import annotations

from .cohort import BadRow, ScanTask, folder_name, parse_shard, read_cohort, shard

__all__ = ["BadRow", "ScanTask", "folder_name", "parse_shard", "read_cohort", "shard"]
