"""`medcam3d explain` end to end on small phantoms: outputs, geometry, scores, montages, DICOM, bad input."""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scan_files import bad_inputs, phantom_to_dicom

from medcam3d import Explainer
from medcam3d.cli import build_parser, main
from medcam3d.config import load_config
from medcam3d.data import make_phantom, write_nifti
from medcam3d.io import read_volume
from medcam3d.preprocess import Preprocessor

SHAPE = (24, 64, 64)  # small phantom at the demo spacing; the demo preprocessing pads it to 60 x 128 x 128
SPACING = (5.0, 2.5, 2.5)


@pytest.fixture(scope="module")
def untrained_config(tmp_path_factory) -> Path:
    """The demo config with randomly initialised (seeded) weights, so these tests do not depend on training."""
    d = tmp_path_factory.mktemp("cfg")
    torch.manual_seed(0)
    cfg = load_config("demo_axialnet")
    from medcam3d.models import build_model

    net = build_model(cfg.model)
    torch.save(net.state_dict(), d / "random.pt")
    text = Path(cfg.path).read_text().replace("weights: package:medcam3d/weights/demo_axialnet.pt",
                                              "weights: random.pt")
    (d / "untrained.yaml").write_text(text)
    return d / "untrained.yaml"


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scan")
    ph = make_phantom(11, shape=SHAPE, spacing=SPACING, present={"nodule_right_lung": True}, prevalence=0.0)
    write_nifti(ph, d / "phantom.nii.gz")
    return d / "phantom.nii.gz"


@pytest.fixture(scope="module")
def explained(tmp_path_factory, scan, untrained_config) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    code = main(["explain", str(scan), "--config", str(untrained_config), "--out", str(out), "--quiet",
                 "--full-res", "top-2"])
    assert code == 0
    return out


def read_scores(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_exist_and_nothing_else(explained, untrained_config):
    cfg = load_config(untrained_config)
    summary = json.loads((explained / "summary.json").read_text())
    rows = read_scores(explained)
    assert [r["label"] for r in rows] == cfg.labels  # every class explained by default
    full = [int(r["index"]) for r in rows if r["full_resolution"] == "1"]
    assert len(full) == 2
    expected = {"scores.csv", "summary.json", "lowres_hirescam.nii.gz", "lowres_gradcam.nii.gz"}
    for c in full:
        lab = cfg.labels[c]
        expected |= {f"fullres_hirescam_{c:03d}_{lab}.nii.gz", f"fullres_gradcam_{c:03d}_{lab}.nii.gz",
                     f"montage_{c:03d}_{lab}.png"}
    assert {p.name for p in explained.iterdir()} == expected
    assert sorted(summary["files"]) == sorted(expected)
    assert not list(explained.parent.glob(".*partial*"))


def test_fullres_maps_carry_the_scan_affine_and_shape(explained, scan):
    src = nib.load(str(scan))
    maps = sorted(explained.glob("fullres_*.nii.gz"))
    assert maps
    peaks = []
    for m in maps:
        img = nib.load(str(m))
        assert img.shape == src.shape
        assert np.allclose(img.affine, src.affine, atol=1e-5)
        # display maps are stored as uint8 with scl_slope 1/255: readers that apply the scaling see [0, 1]
        assert img.get_data_dtype() == np.uint8
        assert img.dataobj.slope == pytest.approx(1 / 255) and img.dataobj.inter == 0
        data = np.asarray(img.dataobj)
        assert 0.0 <= data.min() and data.max() <= 1.0 + 1e-6
        assert np.allclose(data * 255, np.round(data * 255), atol=1e-4)  # steps of 1/255
        peaks.append(data.max())
    # maps are normalised over the whole network grid, whose padding lies outside this small scan
    assert max(peaks) > 0.1


def test_lowres_4d_has_all_classes_and_block_geometry(explained, untrained_config):
    cfg = load_config(untrained_config)
    img = nib.load(str(explained / "lowres_hirescam.nii.gz"))
    assert img.shape == (20, 8, 8, len(cfg.labels))  # [S/3, 8, 8] AxialNet map, one volume per class
    # default map geometry "auto": AxialNet declares its receptive-field centres, 3 slices x 8 x 8 network voxels
    # apart at 5 x 2.5 x 2.5 mm (the field convention, 3 x 16 x 16 voxels: test_receptive_map_geometry_... below)
    assert np.allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), [15.0, 20.0, 20.0])


def test_scores_and_maps_match_the_python_api(explained, scan, untrained_config):
    cfg = load_config(untrained_config)
    vol = read_volume(scan)
    x = Preprocessor.from_config(cfg)(vol).as_tensor()[None]
    exp = Explainer(cfg.build_model().eval(), cfg.target_layer)(x)
    rows = read_scores(explained)
    got = np.array([float(r["score"]) for r in rows])
    assert np.allclose(got, exp.scores[0].numpy(), rtol=1e-4, atol=1e-5)
    probs = np.array([float(r["probability"]) for r in rows])
    assert np.allclose(probs, torch.sigmoid(exp.scores[0]).numpy(), atol=1e-5)
    low = np.asarray(nib.load(str(explained / "lowres_hirescam.nii.gz")).dataobj)
    assert np.allclose(np.moveaxis(low, -1, 0), exp.raw["hirescam"][0].numpy(), atol=1e-6)
    summary = json.loads((explained / "summary.json").read_text())
    # completeness, as written to the summary: HiResCAM sums to score - bias
    for c in summary["classes"]:
        total = float(low[..., c["index"]].sum())
        assert total == pytest.approx(c["score"] - c["bias"], abs=1e-4 + 1e-4 * abs(c["score"]))


def test_summary_records_provenance(explained, scan, untrained_config):
    s = json.loads((explained / "summary.json").read_text())
    assert s["input"]["path"] == str(scan.resolve())
    assert len(s["input"]["sha256"]) == 64 and len(s["config"]["sha256"]) == 64
    assert len(s["model"]["weights_sha256"]) == 64
    assert s["certificate"]["kind"] == "affine-head" and s["certificate"]["exact"]
    assert {"torch", "monai", "numpy", "nibabel"} <= set(s["versions"])
    assert {"read", "preprocess", "explain", "write"} <= set(s["timings_s"])
    assert s["device"] == "cpu"
    c = s["classes"][0]
    assert {"l2", "pearson", "top_overlap"} <= set(c["disagreement"])
    assert abs(c["relative_residual"]) < 1e-5


def test_montage_size_and_content(explained):
    from PIL import Image

    for png in explained.glob("montage_*.png"):
        im = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
        assert im.shape == (800, 1200, 3)  # 2 methods x 3 views at 100 dpi
        assert im.std() > 20  # not blank
        top, bottom = im[60:400], im[440:780]
        assert np.abs(top - bottom).mean() > 1.0  # the HiResCAM and Grad-CAM rows differ


def test_rerun_replaces_the_folder(tmp_path, scan, untrained_config):
    out = tmp_path / "out"
    args = ["explain", str(scan), "--config", str(untrained_config), "--out", str(out), "--quiet"]
    assert main(args + ["--full-res", "top-3"]) == 0
    assert len(list(out.glob("montage_*.png"))) == 3
    assert main(args + ["--full-res", "none", "--classes", "0", "1"]) == 0
    assert not list(out.glob("montage_*.png")) and not list(out.glob("fullres_*"))
    assert len(read_scores(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folders left


def test_refuses_to_replace_a_foreign_folder(tmp_path, scan, untrained_config):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    code = main(["explain", str(scan), "--config", str(untrained_config), "--out", str(out), "--quiet"])
    assert code == 2
    assert [p.name for p in out.iterdir()] == ["thesis.docx"]


def test_dicom_folder_input(tmp_path, untrained_config):
    ph = make_phantom(12, shape=SHAPE, spacing=SPACING, prevalence=0.0)
    phantom_to_dicom(ph.hu, ph.affine, tmp_path / "dicom")
    write_nifti(ph, tmp_path / "same.nii.gz")
    a, b = tmp_path / "from_dicom", tmp_path / "from_nifti"
    for src, out in ((tmp_path / "dicom", a), (tmp_path / "same.nii.gz", b)):
        assert main(["explain", str(src), "--config", str(untrained_config), "--out", str(out), "--quiet",
                     "--full-res", "top-1"]) == 0
    sa = {r["label"]: float(r["score"]) for r in read_scores(a)}
    sb = {r["label"]: float(r["score"]) for r in read_scores(b)}
    assert sa.keys() == sb.keys()
    assert all(abs(sa[k] - sb[k]) < 1e-3 for k in sa)  # same voxels (HU rounded to integers), same world grid
    ma = nib.load(str(next(a.glob("fullres_hirescam_*"))))
    mb = nib.load(str(next(b.glob("fullres_hirescam_*"))))
    # the DICOM volume is in its own (ITK) index order; both maps must sit on the same world voxels
    centre_a = ma.affine @ np.array([*(np.array(ma.shape) - 1) / 2, 1])
    centre_b = mb.affine @ np.array([*(np.array(mb.shape) - 1) / 2, 1])
    assert np.allclose(centre_a, centre_b, atol=1e-3)


def test_every_bad_input_exits_2_and_writes_nothing(tmp_path, untrained_config, capsys):
    cases = bad_inputs(tmp_path)
    tiny = tmp_path / "inputs" / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([2.5, 2.5, 5.0, 1])), str(tiny))
    cases["volume too small for the model"] = (tiny, "too small")
    bad_cfg = tmp_path / "inputs" / "bad_key.yaml"
    bad_cfg.write_text(untrained_config.read_text() + "\nlearning_rate: 0.1\n")
    bad_tf = tmp_path / "inputs" / "bad_transform.yaml"
    bad_tf.write_text(untrained_config.read_text().replace("_target_: ShiftIntensity", "_target_: MagicDenoise"))
    (tmp_path / "inputs" / "random.pt").write_bytes((untrained_config.parent / "random.pt").read_bytes())
    good = tmp_path / "inputs" / "good.nii.gz"
    write_nifti(make_phantom(1, shape=SHAPE, spacing=SPACING), good)
    failures = []
    runs = [(name, ["explain", str(p), "--config", str(untrained_config)], p.name, pat)
            for name, (p, pat) in cases.items()]
    runs += [
        ("unknown config key", ["explain", str(good), "--config", str(bad_cfg)], bad_cfg.name, "unknown key"),
        ("unknown transform", ["explain", str(good), "--config", str(bad_tf)], bad_tf.name, "MagicDenoise"),
        ("missing checkpoint", ["explain", str(good), "--config", str(untrained_config), "--model", "nope.pt"],
         "nope.pt", "not found"),
        ("unknown class", ["explain", str(good), "--config", str(untrained_config), "--classes", "spleen"], "spleen",
         "unknown class"),
    ]
    (tmp_path / "out").mkdir()
    for name, args, must_name, pattern in runs:
        out = tmp_path / "out" / name.replace(" ", "_")
        capsys.readouterr()
        code = main(args + ["--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        if code != 2:
            failures.append(f"{name}: exit {code}")
        if "\n" in err or must_name not in err or not re.search(pattern, err):
            failures.append(f"{name}: message {err!r}")
        if out.exists() or list(out.parent.glob(".*")):
            failures.append(f"{name}: wrote something")
    assert not failures, "\n".join(failures)


def test_internal_error_exits_1_with_a_hint(monkeypatch, scan, untrained_config, tmp_path, capsys):
    from medcam3d import pipeline

    def broken(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(pipeline.Session, "explain_volume", broken)
    code = main(["explain", str(scan), "--config", str(untrained_config), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 1
    assert "please report" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_real_process_exit_codes_version_and_help(tmp_path):
    exe = [sys.executable, "-m", "medcam3d.cli"]
    v = subprocess.run(exe + ["--version"], capture_output=True, text=True, check=False)
    assert v.returncode == 0 and v.stdout.startswith("medcam3d ")
    h = subprocess.run(exe + ["explain", "--help"], capture_output=True, text=True, check=False)
    assert h.returncode == 0 and "examples:" in h.stdout and "--full-res" in h.stdout
    bad = subprocess.run(exe + ["explain", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "missing.nii.gz" in bad.stderr and not (tmp_path / "o").exists()
    usage = subprocess.run(exe + ["explain"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2


def test_receptive_map_geometry_places_cells_at_their_receptive_field_centres(tmp_path, scan, untrained_config):
    """--map-geometry receptive: the low-resolution maps' affine puts cell (t, i, j) at network-grid voxel
    (3t + 1, 8i + 32, 8j + 32) -- 8 voxels apart, not 16 -- and the full-resolution heatmaps follow."""
    from medcam3d.io import read_volume as rv
    from medcam3d.pipeline import Session

    out = tmp_path / "rec"
    assert main(["explain", str(scan), "--config", str(untrained_config), "--out", str(out), "--quiet",
                 "--full-res", "top-2", "--map-geometry", "receptive"]) == 0
    field_out = tmp_path / "field"  # the paper's convention, no longer the default
    assert main(["explain", str(scan), "--config", str(untrained_config), "--out", str(field_out), "--quiet",
                 "--full-res", "top-2", "--map-geometry", "field"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    field = json.loads((field_out / "summary.json").read_text())
    assert summary["map_geometry"] == {"kind": "receptive", "offset_voxels": [1.0, 32.0, 32.0],
                                       "stride_voxels": [3.0, 8.0, 8.0], "source": "declared"}
    assert field["map_geometry"]["kind"] == "field" and field["map_geometry"]["stride_voxels"] == [3.0, 16.0, 16.0]
    assert field["map_geometry"]["source"] == "requested"
    img = nib.load(str(out / "lowres_hirescam.nii.gz"))
    assert np.allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), [15.0, 20.0, 20.0])  # 3 x 8 x 8 voxels apart
    session = Session(untrained_config)
    grid = session.explain_volume(rv(scan)).grid
    grid_affine = np.asarray(grid.affine, dtype=np.float64)
    for ijk, centre in [((0, 0, 0), (1, 32, 32)), ((19, 7, 3), (58, 88, 56))]:
        world = img.affine @ np.array([*ijk, 1.0])
        assert np.allclose(world, grid_affine @ np.array([*centre, 1.0]), atol=1e-4)
    # same scores and raw maps as the field geometry; only where they are drawn differs
    a = np.asarray(img.dataobj)
    b = np.asarray(nib.load(str(field_out / "lowres_hirescam.nii.gz")).dataobj)
    assert np.allclose(a, b, atol=1e-6)
    names = sorted(p.name for p in out.glob("fullres_*.nii.gz"))
    assert names == sorted(p.name for p in field_out.glob("fullres_*.nii.gz"))
    differ = [not np.allclose(np.asarray(nib.load(str(out / n)).dataobj),
                              np.asarray(nib.load(str(field_out / n)).dataobj), atol=1e-4) for n in names]
    assert all(differ)



def test_class_selection_tokens():
    """--classes / --full-res tokens on hand-made scores: a 0.5 threshold is a score of 0 (sigmoid)."""
    from medcam3d.errors import InputError
    from medcam3d.selection import depends_on_scores, find_class, select_classes

    labels = ["a", "b", "c", "d"]
    scores = np.array([0.5, 2.0, -1.0, 1.0])
    probs = 1.0 / (1.0 + np.exp(-scores))

    def sel(spec):
        return select_classes(spec, scores, probs, labels, 0.5)

    assert sel(None) == sel(["all"]) == [0, 1, 2, 3]
    assert sel(["positive"]) == [1, 3, 0]  # probability >= 0.5, highest score first
    assert sel(["top-2"]) == [1, 3] and sel(["top-0"]) == [] and sel(["none"]) == []
    assert sel(["c", "top-1", "0", "b", " d "]) == [2, 1, 0, 3]  # union in first-come order
    assert sel(["positive", "top-3"]) == [1, 3, 0]
    for spec, message in ((["top-x"], "bad token 'top-x'"), (["9"], r"index 9 out of range \(0..3\)"),
                          (["zebra"], "unknown class 'zebra'")):
        with pytest.raises(InputError, match=f"--full-res: {message}"):
            select_classes(spec, scores, probs, labels, 0.5, what="--full-res")
    assert depends_on_scores(None) and depends_on_scores(["a", "top-3"]) and depends_on_scores(["positive"])
    assert not depends_on_scores(["a", "1", "none"])
    assert find_class("b", labels) == 1 and find_class(3, labels) == 3
    assert find_class(7, ["x", "y"], [3, 7]) == 1 and find_class("y", ["x", "y"], [3, 7]) == 1
    assert find_class("3", ["x", "y"], [5, 7]) is None


def test_default_full_resolution_is_positive_at_least_3_at_most_10(scan, untrained_config):
    """Hand-made scores on the 13 demo labels: all positive -> the 10 highest, with a note; two positive -> the top
    3; an explicit --full-res is not capped."""
    from dataclasses import replace

    from medcam3d.pipeline import MAX_FULL_RES, Session

    session = Session(untrained_config)
    result = session.explain_volume(read_volume(scan))

    def with_scores(scores):
        t = torch.tensor([scores], dtype=torch.float32)
        return replace(result, explanation=replace(result.explanation, scores=t),
                       probabilities=torch.sigmoid(t)[0].double().numpy())

    all_positive = with_scores([0.5 + 0.1 * c for c in range(13)])  # class 12 highest ... class 0 lowest
    plan = session.plan_outputs(all_positive)
    assert MAX_FULL_RES == 10 and plan.full_res == [12, 11, 10, 9, 8, 7, 6, 5, 4, 3]
    assert len(plan.notes) == 1 and "13 classes are predicted positive" in plan.notes[0] and "\n" not in plan.notes[0]
    assert session.summarise(all_positive, plan).notes == plan.notes
    two = with_scores([-1.0, 2.0, -3.0, 0.5, -0.2, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0, -11.0])
    plan = session.plan_outputs(two)
    assert plan.full_res == [1, 3, 4] and plan.notes == []
    assert session.plan_outputs(all_positive, full_res=["all"]).full_res == list(range(13))
    assert session.plan_outputs(all_positive, full_res=["top-2", "0"]).full_res == [12, 11, 0]


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, scan, untrained_config, capsys):
    """Without a terminal (a SLURM log) every stage is one line on stderr with the time since the start."""
    out = tmp_path / "o"
    args = ["explain", str(scan), "--config", str(untrained_config), "--out", str(out), "--full-res", "top-2"]
    assert main(args) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("medcam3d [")]
    stages = [re.fullmatch(r"medcam3d \[\s*(\d+\.\d) s\] (.+)", ln) for ln in lines]
    assert all(stages), lines
    names = [m.group(2) for m in stages]
    for expected in ("reading scan", "loading model", "explaining", "writing", "low-resolution maps", "done"):
        assert expected in names
    assert any(n.startswith("full resolution") for n in names)
    times = [float(m.group(1)) for m in stages]
    assert times == sorted(times)
    summary = json.loads((out / "summary.json").read_text())
    assert {"read", "preprocess", "explain", "write", "write.lowres", "write.fullres_maps",
            "write.montages"} <= set(summary["timings_s"])
    assert main(["explain", str(scan), "--config", str(untrained_config), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_disk_full_while_writing_exits_with_one_line_and_keeps_the_previous_output(tmp_path, scan, untrained_config,
                                                                                   monkeypatch, capsys):
    """A simulated ENOSPC while a map is compressed: exit 1 or 2, one line naming the folder and the problem, the
    partial folder removed and the earlier output folder at --out untouched."""
    import errno

    from medcam3d.io import writers

    out = tmp_path / "out"
    args = ["explain", str(scan), "--config", str(untrained_config), "--out", str(out), "--quiet", "--full-res",
            "top-1"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers, "_gzip_member", full)
    capsys.readouterr()
    code = main(args + ["--full-res", "top-2"])
    err = capsys.readouterr().err.strip()
    assert code in (1, 2)
    assert "\n" not in err and "No space left on device" in err and str(out) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or old folder left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_help_says_what_full_resolution_costs():
    # the explain sub-command's help, formatted by argparse itself (not captured from stdout, where output left
    # over from other tests' background threads could interleave)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["explain"].format_help().split()).replace("- ", "-")  # argparse wraps after hyphens
    assert "per class" in text and "'none' writes the low-resolution maps only" in text and "@" not in text
