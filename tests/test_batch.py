"""`medcam3d batch`: cohorts, shards, organ shares, Dask workers killed mid-run, a scan that kills its worker, the
command itself killed and resumed, determinism against a plain loop.

Small phantoms (24 x 64 x 64 at the demo spacing) and the untrained-config trick keep this file fast. What is
compared between runs ("identical outputs"): the SHA-256 of every map NIfTI (``lowres_*``, ``fullres_*``) and
``scores.csv`` of every scan, and ``cohort_table.csv`` (which holds no timings or dates). ``summary.json`` (timings,
creation time, run ids) and the PNG montages are not compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medcam3d.batch import folder_name, parse_shard, read_cohort, shard
from medcam3d.batch.cohort import ScanTask
from medcam3d.batch.organs import organ_fractions, organ_shares
from medcam3d.cli import main
from medcam3d.config import load_config
from medcam3d.data import ORGAN_CODES, make_dataset
from medcam3d.errors import InputError
from medcam3d.models import AxialNet

SHAPE = (24, 64, 64)
SPACING = (5.0, 2.5, 2.5)
POISON = "zz_poison"  # sorts last: the good scans are handed out first
TESTS = Path(__file__).resolve().parent


class PoisonAxialNet(AxialNet):
    """Test-only model (never used by production code): AxialNet that SIGKILLs its own process when the input is
    the poison scan (a uniform block at 1000 HU, i.e. at the top of the intensity window in more than 5 % of the
    network grid; a phantom has a few voxels there at most)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float((x > 0.55).float().mean()) > 0.05:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


def make_configs(folder: Path) -> dict[str, Path]:
    """The demo config with seeded random weights (``untrained.yaml``) and the same with :class:`PoisonAxialNet`
    (``poison.yaml``)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = load_config("demo_axialnet")
    from medcam3d.models import build_model

    torch.save(build_model(cfg.model).state_dict(), folder / "random.pt")
    text = Path(cfg.path).read_text().replace("weights: package:medcam3d/weights/demo_axialnet.pt",
                                              "weights: random.pt")
    (folder / "untrained.yaml").write_text(text)
    (folder / "poison.yaml").write_text(text.replace("_target_: medcam3d.models.AxialNet",
                                                     "_target_: test_batch.PoisonAxialNet"))
    return {"untrained": folder / "untrained.yaml", "poison": folder / "poison.yaml"}


def map_checksums(out: Path) -> dict[str, str]:
    """SHA-256 of every map NIfTI and scores.csv of every finished scan, keyed by relative path."""
    files = sorted(p for p in (out / "scans").glob("*/*") if p.parent.name[0] != "."
                   and (p.name.endswith(".nii.gz") or p.name == "scores.csv"))
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run_log(out: Path) -> list[list[dict]]:
    """The run logs of a batch folder, oldest first: a list of records per run."""
    runs = []
    for f in sorted((out / "runs").glob("*.jsonl")):
        runs.append([json.loads(line) for line in f.read_text().splitlines()])
    return runs


BATCH_ARGS = ["--full-res", "top-1", "--torch-threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    return make_configs(tmp_path_factory.mktemp("cfg"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cohort")
    ds = make_dataset(4, 5, out_dir=d, shape=SHAPE, spacing=SPACING, prevalence=0.3)
    good = Path(ds.manifest)
    ref = nib.load(str(d / "phantom_5_00000.nii.gz"))
    nib.save(nib.Nifti1Image(np.full(SHAPE, 1000.0, np.float32), ref.affine), str(d / "poison.nii.gz"))
    with_poison = d / "with_poison.csv"
    with_poison.write_text(good.read_text() + f"{POISON},poison.nii.gz,\n")
    return {"dir": d, "good": good, "poison": with_poison}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cohort, configs) -> Path:
    """The uninterrupted reference: both shards of 2 run without any engine (a plain loop in this process)."""
    out = tmp_path_factory.mktemp("ref") / "batch"
    for i in range(2):
        assert main(["batch", str(cohort["good"]), "--out", str(out), "--config", str(configs["untrained"]),
                     "--shard", f"{i}/2", *BATCH_ARGS]) == 0
    assert main(["report", str(out), "--quiet"]) == 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# cohorts, shards, organ shares: no model
# ---------------------------------------------------------------------------------------------------------------
def test_manifest_rows_good_and_bad(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "b.nii.gz").write_bytes(b"x")
    (tmp_path / "b_organs.nii.gz").write_bytes(b"x")
    sub = tmp_path / "sub"
    sub.mkdir()
    m = sub / "m.csv"
    m.write_text(
        "# a comment\n"
        "path,scan_id,organs\n"  # header in another order
        "../a.nii.gz,A,\n"
        f"{tmp_path / 'b.nii.gz'},B,../b_organs.nii.gz\n"
        "../missing.nii.gz,C,\n"
        "../a.nii.gz,A,\n"  # duplicate id
        "../a.nii.gz,,\n"  # empty id
        "../a.nii.gz,D,../no_organs.nii.gz\n"
        "only-one-column\n"
        "\n"
        "../b.nii.gz,<script>alert(1)</script>,\n"
    )
    tasks, bad = read_cohort(m)
    assert [t.scan_id for t in tasks] == ["<script>alert(1)</script>", "A", "B"]
    by_id = {t.scan_id: t for t in tasks}
    assert by_id["A"].path == str(tmp_path / "a.nii.gz") and by_id["A"].organs is None
    assert by_id["B"].organs == str(tmp_path / "b_organs.nii.gz")
    assert [b.where for b in bad] == ["m.csv:5", "m.csv:6", "m.csv:7", "m.csv:8", "m.csv:9"]
    problems = " | ".join(b.error for b in bad)
    for word in ("columns", "not found: " + str(tmp_path / "missing.nii.gz"), "duplicate", "empty scan id",
                 "organ label map not found"):
        assert word in problems
    # unsafe ids get a safe, distinct folder name; safe ids are kept
    weird = by_id["<script>alert(1)</script>"].folder
    assert "/" not in weird and "<" not in weird and not weird.startswith(".")
    assert folder_name("A") == "A" and folder_name("a/b") != folder_name("a?b")
    # headerless manifests are positional
    m2 = tmp_path / "m2.csv"
    m2.write_text("X,a.nii.gz\nY,b.nii.gz,b_organs.nii.gz\n")
    t2, b2 = read_cohort(m2)
    assert [(t.scan_id, t.organs is not None) for t in t2] == [("X", False), ("Y", True)] and not b2


def test_folder_of_scans(cohort):
    tasks, bad = read_cohort(cohort["dir"])
    ids = [t.scan_id for t in tasks]
    assert ids == ["phantom_5_00000", "phantom_5_00001", "phantom_5_00002", "phantom_5_00003", "poison"]
    assert not bad
    assert all(t.organs and t.organs.endswith("_organs.nii.gz") for t in tasks if t.scan_id.startswith("phantom"))
    assert next(t for t in tasks if t.scan_id == "poison").organs is None


def test_shards_partition_the_cohort_exactly_once():
    tasks = [ScanTask(f"s{i:02d}", f"/x/{i}", None, f"s{i:02d}") for i in range(11)]
    rng = np.random.default_rng(0)
    for n in range(1, 6):
        shuffled = [tasks[i] for i in rng.permutation(len(tasks))]
        parts = [shard(shuffled, i, n) for i in range(n)]
        ids = [t.scan_id for p in parts for t in p]
        assert sorted(ids) == [t.scan_id for t in tasks]  # every scan, each once
        assert len(ids) == len(set(ids))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == [shard(tasks, i, n) for i in range(n)]  # independent of the manifest's order
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(InputError):
            parse_shard(bad)


def test_organ_shares_by_hand():
    # network grid 2 x 4 x 4, map 1 x 2 x 2: each map voxel is a 2 x 2 x 2 block of 8 grid voxels
    labels = np.zeros((2, 4, 4))
    labels[:, :2, :2] = 2  # block (0, 0): all code 2
    labels[0, :2, 2:] = 3  # block (0, 1): half code 3, half unlabelled (0)
    labels[:, 2:, :] = 7  # blocks (1, *): an unnamed code -> unlabelled
    names, frac = organ_fractions(labels, (1, 2, 2), {"a": 2, "b": 3})
    assert names == ["a", "b", "unlabelled"]
    assert frac[:, 0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert frac[:, 0, 0, 1].tolist() == [0.0, 0.5, 0.5]
    assert frac[:, 0, 1, 1].tolist() == [0.0, 0.0, 1.0]
    raw = torch.tensor([[[[2.0, 4.0], [-5.0, 0.0]]],  # class 0: positive 2 in block 00, 4 in block 01
                        [[[-1.0, -1.0], [-1.0, -1.0]]]])  # class 1: no positive contribution
    sh = organ_shares(raw, frac).numpy()
    assert sh[0] == pytest.approx([2 / 6, 0.5 * 4 / 6, 0.5 * 4 / 6])
    assert np.isnan(sh[1]).all()


def test_command_line_errors_write_nothing(tmp_path, cohort, configs, capsys):
    out = tmp_path / "o"
    base = ["batch", str(cohort["good"]), "--out", str(out), "--config", str(configs["untrained"]), "--quiet"]
    cases = [
        (base + ["--shard", "2/2"], "--shard"),
        (base + ["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "--workers"),
        (base + ["--scheduler", "tcp://127.0.0.1:1", "--shard", "0/2"], "choose one"),
        (base + ["--cluster", "slurm"], "--cluster-config"),
        (base + ["--gpus", "0,0"], "--gpus"),
        (["batch", str(tmp_path / "nope.csv"), "--out", str(out), "--quiet"], "nope.csv"),
        (["report", str(tmp_path)], "not a medcam3d batch folder"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_slurm_yaml_to_cluster_kwargs(tmp_path, monkeypatch):
    from medcam3d.batch.slurm import (
        read_slurm_config,
        slurm_cluster_kwargs,
        start_slurm_cluster,
    )

    f = tmp_path / "slurm.yaml"
    f.write_text("jobs: 3\ncores: 8\nprocesses: 2\nmemory: 32GB\nwalltime: '02:00:00'\nqueue: cpu\naccount: rad\n"
                 "job_script_prologue: ['source /venv/bin/activate']\njob_extra_directives: ['--qos=low']\n")
    kwargs, jobs, threads, gpu = read_slurm_config(f)
    assert jobs == 3 and threads == 4 and not gpu
    assert kwargs == {"cores": 2, "processes": 2, "job_cpu": 8, "memory": "32GB", "walltime": "02:00:00",
                      "queue": "cpu", "account": "rad", "job_script_prologue": ["source /venv/bin/activate"],
                      "job_extra_directives": ["--qos=low"], "scheduler_options": {"dashboard_address": None}}
    kw, _, t, = slurm_cluster_kwargs({"jobs": 1, "cores": 6, "gpus_per_job": 1})
    assert kw["job_extra_directives"] == ["--gres=gpu:1"] and t == 6 and kw["cores"] == 1
    for doc, msg in (({"cores": 4}, "jobs"), ({"jobs": 1, "nodes": 2}, "unknown key"),
                     ({"jobs": 1, "gpus_per_job": 2}, "one GPU per job"), ({"jobs": 1, "cores": 1, "processes": 2},
                                                                            "at least processes"), ([1], "mapping")):
        with pytest.raises(InputError, match=msg):
            slurm_cluster_kwargs(doc, str(f))
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(InputError, match=r"medcam3d\[slurm\]"):
        start_slurm_cluster(kwargs, jobs)
    monkeypatch.undo()
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        return
    kwargs["scheduler_options"]["host"] = "127.0.0.1"
    cluster = SLURMCluster(**kwargs)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p cpu", "#SBATCH -A rad", "#SBATCH --cpus-per-task=8", "#SBATCH --qos=low",
                 "source /venv/bin/activate", "--nthreads 1"):
        assert line in script


def test_batch_uses_the_shared_helpers():
    """Checksums come from medcam3d.files; the default methods are the library's."""
    import medcam3d.files
    import medcam3d.methods
    from medcam3d.batch import engine, worker

    assert engine.sha256_of is medcam3d.files.sha256_of
    assert worker.BatchSettings("out").methods == medcam3d.methods.DEFAULT_METHODS == ("hirescam", "gradcam")


def test_command_modules_are_cheap_to_import():
    code = ("import sys, medcam3d.batch.command, medcam3d.report.command, medcam3d.cli as c; c.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'jinja2', "
            "'matplotlib', 'pandas')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------------
def test_shards_run_their_slice_and_organ_shares_are_right(reference, cohort):
    runs = run_log(reference)
    assert len(runs) == 2
    ids = [sorted(r["scan_id"] for r in run if r.get("status") == "done") for run in runs]
    everything = sorted(t.scan_id for t in read_cohort(cohort["good"])[0])
    assert ids == [everything[0::2], everything[1::2]]
    assert all(r["worker"] is None for run in runs for r in run if "status" in r)  # no engine
    assert sorted(p.name for p in (reference / "scans").iterdir()) == everything
    for sid in everything[:2]:
        check_organ_shares(reference / "scans" / sid, cohort["dir"] / f"{sid}_organs.nii.gz")


def check_organ_shares(folder: Path, organs_path: Path) -> None:
    """Organ shares against an independent computation: the phantom grid has the network spacing, so each scan
    voxel is one network-grid voxel; find its map voxel -- the cell whose centre is nearest, clamped at the edges --
    through the low-resolution map's affine (nibabel only), whatever map geometry the run used."""
    summary = json.loads((folder / "summary.json").read_text())
    low = nib.load(str(folder / "lowres_hirescam.nii.gz"))
    raw = np.maximum(np.asarray(low.dataobj, dtype=np.float64), 0.0)  # [s, h, w, K] (x, y, z, class)
    organs_img = nib.load(str(organs_path))
    lab = np.asarray(organs_img.dataobj).astype(int)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in lab.shape], indexing="ij"), -1).reshape(-1, 3)
    world = organs_img.affine @ np.c_[ijk, np.ones(len(ijk))].T
    # floor(x + 0.5): a voxel exactly halfway between two centres goes to the upper cell
    m = np.floor((np.linalg.inv(low.affine) @ world)[:3].T + 0.5 + 1e-9).astype(int)
    m = np.clip(m, 0, np.array(raw.shape[:3]) - 1)
    # network-grid voxels per map voxel: the scan covers only part of the padded network grid, so count each cell's
    # voxels over the whole grid, with the cell centres the summary records (offset + stride * index)
    geo = summary["map_geometry"]
    net = summary["network_grid"]["shape"]
    gijk = np.stack(np.meshgrid(*[np.arange(n) for n in net], indexing="ij"), -1).reshape(-1, 3)
    pos = (gijk - np.array(geo["offset_voxels"])) / np.array(geo["stride_voxels"])
    gm = np.clip(np.floor(pos + 0.5 + 1e-9).astype(int), 0, np.array(raw.shape[:3]) - 1)
    count = np.zeros(raw.shape[:3])
    np.add.at(count, tuple(gm.T), 1)
    labels_in_order = [c["label"] for c in summary["classes"]]
    shares = summary["organ_shares"]
    assert shares["organs"] == [*ORGAN_CODES, "unlabelled"]
    for k, label in enumerate(labels_in_order):
        total = raw[..., k].sum()
        per_voxel = raw[m[:, 0], m[:, 1], m[:, 2], k] / count[m[:, 0], m[:, 1], m[:, 2]]
        got = shares["classes"][label]["hirescam"]
        if total == 0:
            assert all(v is None for v in got.values())
            continue
        for organ, code in ORGAN_CODES.items():
            expected = per_voxel[lab.reshape(-1) == code].sum() / total
            assert got[organ] == pytest.approx(expected, abs=2e-6), (folder.name, label, organ)
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-5)
        allowed = shares["classes"][label]["allowed"]
        outside = shares["classes"][label]["outside_allowed"]["hirescam"]
        assert outside == pytest.approx(1.0 - sum(got[o] for o in allowed), abs=1e-5)


def test_receptive_map_geometry_in_batch(tmp_path, cohort, configs):
    """--map-geometry receptive: the organ shares use the cells nearest each receptive-field centre (AxialNet's
    cells are 8 network voxels apart in-plane, not 16) and agree with the independent computation."""
    out = tmp_path / "batch"
    assert main(["batch", str(cohort["good"]), "--out", str(out), "--config", str(configs["untrained"]),
                 "--shard", "0/2", "--map-geometry", "receptive", *BATCH_ARGS]) == 0
    done = sorted(p for p in (out / "scans").iterdir() if p.is_dir())
    assert done
    for folder in done[:2]:
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["map_geometry"]["kind"] == "receptive"
        assert summary["map_geometry"]["stride_voxels"] == [3.0, 8.0, 8.0]
        assert summary["organ_shares"]["map_geometry"] == "receptive"
        check_organ_shares(folder, cohort["dir"] / f"{folder.name}_organs.nii.gz")
    fp = json.loads((out / "medcam3d_batch.json").read_text())["fingerprint"]
    assert fp["map_geometry"] == "receptive"


def test_a_rerun_with_other_settings_is_refused(reference, cohort, configs, capsys):
    before = map_checksums(reference)
    code = main(["batch", str(cohort["good"]), "--out", str(reference), "--config", str(configs["poison"]),
                 "--shard", "0/2", *BATCH_ARGS])
    assert code == 2 and "--redo" in capsys.readouterr().err
    assert map_checksums(reference) == before


def test_dask_worker_killed_and_poison_scan(tmp_path, cohort, configs, reference):
    """2 local workers; one is SIGKILLed right after it finishes its first scan (while it runs its next one); the
    poison scan kills its worker every time. Every good scan completes, identical to the plain-loop reference, and
    the poison scan ends in failures.jsonl after allowed-failures + 1 = 2 worker deaths."""
    out = tmp_path / "batch"
    args = ["batch", str(cohort["poison"]), "--out", str(out), "--config", str(configs["poison"]), "--workers", "2",
            "--retries", "0", "--allowed-failures", "1", *BATCH_ARGS]
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(main(args)))
    runner.start()
    killed = None
    deadline = time.monotonic() + 240
    while runner.is_alive() and time.monotonic() < deadline and killed is None:
        markers = list((out / "scans").glob("*/.done")) if (out / "scans").is_dir() else []
        if markers:
            killed = json.loads(markers[0].read_text())["pid"]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    runner.join(300)
    assert killed is not None and not runner.is_alive()
    assert codes == [3]  # completed, with a failed scan
    good = sorted(t.scan_id for t in read_cohort(cohort["good"])[0])
    assert sorted(p.name for p in (out / "scans").iterdir() if (p / ".done").is_file()) == good
    assert not [p for p in (out / "scans").iterdir() if p.name.startswith(".")]  # no leftovers
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["scan_id"], f["error_type"], f["worker_deaths"]) for f in failures] == [(POISON, "KilledWorker", 2)]
    (run,) = run_log(out)
    done = [r for r in run if r.get("status") == "done"]
    assert sorted(r["scan_id"] for r in done) == good
    assert any(r["pid"] != killed for r in done)
    # each worker process loaded the model once, however many scans it explained
    # (a result lost with the killed worker is recomputed by Dask and found finished: "recovered", no model work)
    real = [r for r in done if not r.get("recovered")]
    assert sum(r["model_loaded"] for r in real) == len({r["pid"] for r in real})
    # identical outputs: maps, scores and the cohort table (the report was written at the end of the batch)
    assert map_checksums(out) == map_checksums(reference)
    assert sha(out / "cohort_table.csv") == sha(reference / "cohort_table.csv")
    assert POISON in (out / "cohort_report.html").read_text()


def test_batch_command_killed_and_resumed(tmp_path, cohort, configs, reference):
    """The batch command (a real process group: driver and workers) is SIGKILLed after its first finished scan,
    then run again: only the unfinished scans run, and no folder is ever visible under its final name before it
    is complete."""
    out = tmp_path / "batch"
    cmd = [sys.executable, "-m", "medcam3d.cli", "batch", str(cohort["good"]), "--out", str(out), "--config",
           str(configs["untrained"]), "--workers", "2", "--no-report", *BATCH_ARGS]
    incomplete: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # every folder under its final name must be complete whenever we look
        verified: set[int] = set()  # inodes of folders seen complete (a folder is never modified after its rename)
        while not stop.is_set():
            scans = out / "scans"
            for d in list(scans.iterdir()) if scans.is_dir() else []:
                if d.name.startswith("."):
                    continue
                try:
                    inode = d.stat().st_ino
                    if inode in verified:
                        continue
                    files = json.loads((d / "summary.json").read_text())["files"]
                    missing = [f for f in files if not (d / f).is_file()]
                    problem = f"{d.name}: missing {missing}" if missing else None
                except FileNotFoundError:
                    problem, inode = f"{d.name}: no summary.json", -1
                try:
                    same = d.stat().st_ino == inode  # not replaced by a newer complete folder meanwhile
                except FileNotFoundError:
                    same = False
                if problem and same:
                    incomplete.append(problem)
                elif same:
                    verified.add(inode)
            time.sleep(0.03)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "scans").is_dir() and list((out / "scans").glob("*/.done")):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        first = {p.parent.name: p.read_text() for p in (out / "scans").glob("*/.done")}
        everything = sorted(t.scan_id for t in read_cohort(cohort["good"])[0])
        assert 1 <= len(first) < len(everything)
        again = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300, check=False)
        assert again.returncode == 0, again.stderr[-2000:]
    finally:
        stop.set()
        watcher.join(5)
    assert not incomplete, incomplete[:5]
    summary = json.loads(again.stdout)
    assert summary["skipped"] == len(first) and summary["done"] == len(everything) - len(first)
    runs = run_log(out)
    ran_again = sorted(r["scan_id"] for r in runs[-1] if r.get("status") == "done")
    assert ran_again == sorted(set(everything) - set(first))  # only the unfinished scans ran
    assert {p.parent.name: p.read_text() for p in (out / "scans").glob("*/.done") if p.parent.name in first} == first
    assert not [p for p in (out / "scans").iterdir() if p.name.startswith(".")]  # killed writes cleaned up
    assert map_checksums(out) == map_checksums(reference)
    assert main(["report", str(out), "--quiet"]) == 0
    assert sha(out / "cohort_table.csv") == sha(reference / "cohort_table.csv")


def test_attach_to_a_running_scheduler(tmp_path, cohort, configs, reference):
    """--scheduler ADDRESS: a scheduler someone else started (here: in this process, one thread worker)."""
    from distributed import LocalCluster

    threads = torch.get_num_threads()
    try:
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                          dashboard_address=None) as cluster:
            out = tmp_path / "batch"
            assert main(["batch", str(cohort["good"]), "--out", str(out), "--config", str(configs["untrained"]),
                         "--scheduler", cluster.scheduler_address, "--no-report", *BATCH_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    assert map_checksums(out) == map_checksums(reference)
    (run,) = run_log(out)
    assert all(r["worker"].startswith("tcp://127.0.0.1:")
               for r in run if r.get("status") == "done")


def test_one_local_worker_per_gpu_with_its_own_device():
    from distributed import Client

    from medcam3d.batch.engine import local_cluster

    with local_cluster(0, gpus=["0", "1"], threads=1) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        seen = client.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS")))
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in seen)
    assert sorted(seen.values()) == [("0", "1"), ("1", "1")]
