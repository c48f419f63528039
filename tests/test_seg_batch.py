"""`medcam3d batch` with a segmentation config (issue 19): per-scan folders as `medcam3d explain` writes them, the
task in the settings fingerprint, organ shares per target, and the cohort report's target tables.

The network is tests/test_seg_cli.py's :class:`FixedSeg`, whose every output is known by hand: a voxel of 1000 HU
is ``nodule``, -1000 HU ``mass``, 0 HU background; HiResCAM of a region target at ``features`` is 1 on the region
and 0 elsewhere. The scans are small (14 x 12 x 10 voxels) and the batch runs as one shard (no Dask), so this file
is fast. Expected component sizes come from scipy's 26-connected labelling of the scans as written, not from
medcam3d.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from test_seg_cli import LABELS, RAS, SHAPE, blobs, write_config

from medcam3d.cli import main

# scan-b: two nodule boxes touching only at a corner (one 26-connected component of 8 + 8 voxels), a separate
# nodule of 27 voxels and a mass of 24
B_NODULES = [(slice(0, 2), slice(0, 2), slice(0, 2)), (slice(2, 4), slice(2, 4), slice(2, 4)),
             (slice(8, 11), slice(7, 10), slice(6, 9))]
B_MASS = (slice(10, 14), slice(0, 3), slice(0, 2))
#: organ codes of scan-a's organ map: lung_a where j < 4, lung_b elsewhere
CODES = {"lung_a": 1, "lung_b": 2}


def scan_b() -> tuple[np.ndarray, np.ndarray]:
    hu, labels = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.uint8)
    for box in B_NODULES:
        hu[box], labels[box] = 1000.0, 1
    hu[B_MASS], labels[B_MASS] = -1000.0, 2
    return hu, labels


def components(labels: np.ndarray, cls: int) -> list[int]:
    """Sizes of the 26-connected components of class ``cls``, largest first (scipy, full connectivity)."""
    lab, n = ndimage.label(labels == cls, structure=np.ones((3, 3, 3), bool))
    return sorted(np.bincount(lab.ravel())[1:].tolist(), reverse=True)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("segbatch")
    cfg = write_config(d / "cfg", extra="allowed_regions: {nodule: [lung_a]}\n")
    truth = {"scan-a": blobs(), "scan-b": scan_b(), "scan-empty": (np.zeros(SHAPE, np.float32),
                                                                    np.zeros(SHAPE, np.uint8))}
    for sid, (hu, _) in truth.items():
        nib.save(nib.Nifti1Image(hu, RAS), str(d / f"{sid}.nii.gz"))
    organs = np.where(np.arange(SHAPE[1])[None, :, None] < 4, 1, 2) * np.ones(SHAPE, np.uint8)
    nib.save(nib.Nifti1Image(organs.astype(np.uint8), RAS), str(d / "scan-a_organs.nii.gz"))
    (d / "codes.yaml").write_text(json.dumps(CODES))
    manifest = d / "cohort.csv"
    manifest.write_text("scan_id,path,organ_labels_path\nscan-a,scan-a.nii.gz,scan-a_organs.nii.gz\n"
                        "scan-b,scan-b.nii.gz,\nscan-empty,scan-empty.nii.gz,\n")
    out = d / "batch"
    assert main(["batch", str(manifest), "--out", str(out), "--config", str(cfg), "--shard", "0/1",
                 "--torch-threads", "1", "--organ-codes", str(d / "codes.yaml"), "--quiet"]) == 0
    assert main(["report", str(out), "--quiet"]) == 0
    single = d / "explained"  # the same scan explained on its own
    assert main(["explain", str(d / "scan-a.nii.gz"), "--config", str(cfg), "--out", str(single), "--quiet"]) == 0
    return {"out": out, "truth": truth, "config": cfg, "manifest": manifest, "single": single, "dir": d}


def test_scan_folders_are_what_explain_writes(seg_run):
    out, single = seg_run["out"], seg_run["single"]
    folder = out / "scans" / "scan-a"
    assert {p.name for p in folder.iterdir()} == {p.name for p in single.iterdir()} | {".done"}
    for p in single.iterdir():
        if p.name.endswith(".nii.gz") or p.name in ("targets.csv", "scores.csv"):
            assert sha(folder / p.name) == sha(p), p.name
    s = json.loads((folder / "summary.json").read_text())
    assert s["task"] == "segmentation" and s["batch"]["scan_id"] == "scan-a"
    assert [t["name"] for t in s["targets"]] == ["nodule component 1", "nodule component 2", "mass component 1"]
    # the empty prediction: finished, its all-background segmentation and a note, nothing explained
    empty = out / "scans" / "scan-empty"
    assert (empty / ".done").is_file() and read_csv(empty / "targets.csv") == []
    assert not np.asarray(nib.load(str(empty / "segmentation.nii.gz")).dataobj).any()
    e = json.loads((empty / "summary.json").read_text())
    assert e["classes"] == [] and "segmentation is empty" in e["notes"][0] and "organ_shares" not in e


def test_targets_csv_voxels_are_the_components_of_each_scan(seg_run):
    out, truth = seg_run["out"], seg_run["truth"]
    for sid in ("scan-a", "scan-b"):
        rows = read_csv(out / "scans" / sid / "targets.csv")
        predicted = np.asarray(nib.load(str(out / "scans" / sid / "segmentation.nii.gz")).dataobj)
        assert np.array_equal(predicted, truth[sid][1])  # the prediction is the planted labels (FixedSeg)
        for cls, name in ((1, "nodule"), (2, "mass")):
            got = [int(r["voxels"]) for r in rows if r["label"] == name]
            assert got == components(truth[sid][1], cls) == components(predicted, cls), (sid, name)
            assert [int(r["component"]) for r in rows if r["label"] == name] == list(range(1, len(got) + 1))
    # by hand: scan-a 48 + 8 nodule voxels and a 27-voxel mass; scan-b's corner-touching boxes are one component
    assert [int(r["voxels"]) for r in read_csv(out / "scans" / "scan-b" / "targets.csv")] == [27, 16, 24]


def test_fingerprint_records_the_task(seg_run, capsys):
    from medcam3d.batch.engine import fingerprint
    from medcam3d.batch.worker import BatchSettings

    batch = json.loads((seg_run["out"] / "medcam3d_batch.json").read_text())
    assert batch["fingerprint"]["task"] == "segmentation"
    # a classification config names no task: its fingerprint (and older batch folders' hashes) has no such key
    assert "task" not in fingerprint(BatchSettings(out_dir=str(seg_run["dir"]), config="demo_axialnet"))
    # the same folder with a config of another task is refused, naming the task among the differences
    other = write_config(seg_run["dir"] / "cls", task="probability: softmax")
    capsys.readouterr()
    assert main(["batch", str(seg_run["manifest"]), "--out", str(seg_run["out"]), "--config", str(other),
                 "--shard", "0/1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "made with other settings" in err and "task" in err


def test_organ_shares_per_target_by_hand(seg_run):
    """HiResCAM of a target is 1 on its region: its share of an organ is the region's fraction inside it. Blob A
    (j = 2..5) lies half in lung_a (j < 4), blob B (j = 8, 9) in lung_b, the mass (j = 1..3) in lung_a. Nodules are
    allowed lung_a only; the mass has no allowed organs."""
    s = json.loads((seg_run["out"] / "scans" / "scan-a" / "summary.json").read_text())
    shares = s["organ_shares"]["classes"]
    assert list(shares) == ["nodule component 1", "nodule component 2", "mass component 1"]
    expected = {"nodule component 1": (0.5, 0.5), "nodule component 2": (0.0, 1.0), "mass component 1": (1.0, 0.0)}
    for name, (a, b) in expected.items():
        got = shares[name]["hirescam"]
        assert got["lung_a"] == pytest.approx(a, abs=1e-6) and got["lung_b"] == pytest.approx(b, abs=1e-6)
        assert got["unlabelled"] == pytest.approx(0.0, abs=1e-6)
    assert shares["nodule component 1"]["allowed"] == ["lung_a"]
    assert shares["nodule component 1"]["outside_allowed"]["hirescam"] == pytest.approx(0.5, abs=1e-6)
    assert shares["nodule component 2"]["outside_allowed"]["hirescam"] == pytest.approx(1.0, abs=1e-6)
    assert "allowed" not in shares["mass component 1"]
    # Grad-CAM's map of a nodule target is positive on every nodule voxel alike (A and B): 24 of 56 in lung_a
    assert shares["nodule component 1"]["gradcam"]["lung_a"] == pytest.approx(24 / 56, abs=1e-6)


def test_cohort_table_and_targets_per_scan(seg_run):
    out, truth = seg_run["out"], seg_run["truth"]
    table = read_csv(out / "cohort_table.csv")
    expected = [(sid, r["target"], r["name"], r["class"], r["label"], r["component"], r["voxels"])
                for sid in ("scan-a", "scan-b") for r in read_csv(out / "scans" / sid / "targets.csv")]
    assert [(t["scan_id"], t["class_index"], t["label"], t["target_class"], t["class_label"], t["component"],
             t["voxels"]) for t in table] == expected
    a = [t for t in table if t["scan_id"] == "scan-a"]
    assert [float(t["share_hirescam_lung_a"]) for t in a] == pytest.approx([0.5, 0.0, 1.0], abs=1e-6)
    per_scan = read_csv(out / "cohort_targets.csv")
    want = []
    for sid in ("scan-a", "scan-b"):
        for cls, name in ((1, "nodule"), (2, "mass")):
            sizes = components(truth[sid][1], cls)
            want.append([sid, name, str(len(sizes)), str(len(sizes)), str(sizes[0]), str(sum(sizes))])
    assert [list(r.values()) for r in per_scan] == want
    html = (out / "cohort_report.html").read_text(encoding="utf-8")
    assert "Targets: nodule: 2 components, largest 27 voxels; mass: 1 component, largest 24 voxels." in html
    assert "Targets: none." in html and "segmentation is empty" in html
    assert html.count('<img class="montage"') == 2 * 2  # --montages 2 for the two scans with targets
    assert LABELS[1] in html


def test_target_layer_in_the_fingerprint_and_checked_first(seg_run, capsys):
    """``batch --target-layer``: recorded in the fingerprint only when given (older folders keep their hash), so a
    folder made at the config's layer refuses another layer; an unknown layer exits 2 before anything is written."""
    from medcam3d.batch.engine import fingerprint
    from medcam3d.batch.worker import BatchSettings

    cfg = str(seg_run["config"])
    assert "target_layer" not in fingerprint(BatchSettings(out_dir=str(seg_run["dir"]), config=cfg))
    assert fingerprint(BatchSettings(out_dir=str(seg_run["dir"]), config=cfg, target_layer="head"))[
        "target_layer"] == "head"
    capsys.readouterr()
    args = ["batch", str(seg_run["manifest"]), "--config", cfg, "--shard", "0/1", "--quiet"]
    assert main([*args, "--out", str(seg_run["out"]), "--target-layer", "head"]) == 2
    err = capsys.readouterr().err
    assert "made with other settings" in err and "target_layer" in err
    fresh = seg_run["dir"] / "fresh_batch"
    assert main([*args, "--out", str(fresh), "--target-layer", "haed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no module named 'haed'" in err[0] and not fresh.exists()


def test_dask_workers_write_the_same_files(seg_run):
    """The same cohort on a local Dask cluster (2 worker processes): every scan's segmentation, maps, targets.csv
    and scores.csv are byte-identical to the one-shard run's, and the empty scan is finished the same way."""
    out = seg_run["dir"] / "dask_batch"
    assert main(["batch", str(seg_run["manifest"]), "--out", str(out), "--config", str(seg_run["config"]),
                 "--workers", "2", "--torch-threads", "1", "--organ-codes", str(seg_run["dir"] / "codes.yaml"),
                 "--quiet", "--no-report"]) == 0
    for sid in seg_run["truth"]:
        ref, got = seg_run["out"] / "scans" / sid, out / "scans" / sid
        assert (got / ".done").is_file()
        files = sorted(p.name for p in ref.iterdir() if p.name.endswith((".nii.gz", ".csv")))
        assert files and files == sorted(p.name for p in got.iterdir() if p.name.endswith((".nii.gz", ".csv")))
        for name in files:
            assert sha(got / name) == sha(ref / name), (sid, name)
