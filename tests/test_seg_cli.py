"""Issue 19, part 3: ``medcam3d explain`` of a segmentation network (``task: segmentation``): the predicted
segmentation on the scan's grid, one map per target, ``targets.csv``, the summary's segmentation fields, and
refusals -- checked on a network whose every output is computable by hand.

The network (:class:`FixedSeg`): ``features`` is a 1x1x1 convolution giving ``f = (x, -x)`` of the preprocessed
intensity ``x = HU / 1000`` (clipped to [-1, 1]); ``head`` is a 1x1x1 convolution giving the logits
``(0.5, x + 0.25, -x)`` of (background, nodule, mass). So a voxel of 1000 HU is nodule, -1000 HU mass, 0 HU
background, and for a nodule region R of such voxels: region score ``sum_R (1 + 0.25) = 1.25 |R|``, the head's bias
over R ``0.25 |R|``, HiResCAM at ``features`` = ``x`` on R and 0 elsewhere (sum ``|R|`` = score minus bias).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medcam3d import pipeline
from medcam3d.cli import main
from medcam3d.outputs import TARGET_FIELDS, load_summary, read_targets_csv

LABELS = ["background", "nodule", "mass"]
SHAPE = (14, 12, 10)
#: the blobs: (slices, HU); A and B are nodules (two components), C a mass
BLOB_A = (slice(2, 6), slice(2, 6), slice(2, 5))  # 4 x 4 x 3 = 48 voxels
BLOB_B = (slice(9, 11), slice(8, 10), slice(6, 8))  # 2 x 2 x 2 = 8 voxels
BLOB_C = (slice(9, 12), slice(1, 4), slice(1, 4))  # 3 x 3 x 3 = 27 voxels
RAS = np.array([[2.0, 0, 0, 10], [0, 2.0, 0, 20], [0, 0, 3.0, -30], [0, 0, 0, 1]])
LPS = np.array([[-2.0, 0, 0, 10], [0, -2.0, 0, 20], [0, 0, 3.0, -30], [0, 0, 0, 1]])
SPL = np.array([[0, 0, -2.5, 5], [0, -2.0, 0, 7], [3.0, 0, 0, -9], [0, 0, 0, 1]])  # axes S, P, L: grid = scan


class FixedSeg(nn.Module):
    """``[B, 1, *S] -> [B, 3, *S]``: two 1x1x1 convolutions (weights set by :func:`fixed_state`)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv3d(1, 2, 1)
        self.head = nn.Conv3d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fixed_state() -> dict[str, torch.Tensor]:
    return {
        "features.weight": torch.tensor([1.0, -1.0]).view(2, 1, 1, 1, 1),
        "features.bias": torch.zeros(2),
        "head.weight": torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).view(3, 2, 1, 1, 1),
        "head.bias": torch.tensor([0.5, 0.25, 0.0]),
    }


def write_config(folder: Path, *, extra: str = "", labels: list[str] = LABELS, pad: tuple[int, ...] = (12, 16, 18),
                 task: str = "task: segmentation") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(fixed_state(), folder / "fixed.pt")
    (folder / "seg.yaml").write_text(f"""name: fixed_seg
{task}
model: {{_target_: test_seg_cli.FixedSeg}}
weights: fixed.pt
target_layer: features
labels: [{", ".join(labels)}]
preprocessing:
  - {{_target_: Orientation, axcodes: SPL}}
  - {{_target_: ScaleIntensityRange, a_min: -1000.0, a_max: 1000.0, b_min: -1.0, b_max: 1.0, clip: true}}
  - {{_target_: ResizeWithPadOrCrop, spatial_size: [{", ".join(map(str, pad))}]}}
{extra}""")
    return folder / "seg.yaml"


def blobs() -> tuple[np.ndarray, np.ndarray]:
    """The scan (HU) and its true label map (what FixedSeg predicts)."""
    hu = np.zeros(SHAPE, np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    for blob, value, label in ((BLOB_A, 1000, 1), (BLOB_B, 1000, 1), (BLOB_C, -1000, 2)):
        hu[blob] = value
        labels[blob] = label
    return hu, labels


def write_scan(path: Path, affine: np.ndarray, hu: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(blobs()[0] if hu is None else hu, affine), str(path))
    return path


def mask_of(*blob_slices: tuple[slice, ...]) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    for b in blob_slices:
        m[b] = True
    return m


def centroid_mm(affine: np.ndarray, blob: tuple[slice, ...]) -> np.ndarray:
    centre = [(s.start + s.stop - 1) / 2 for s in blob]
    return (affine @ np.array([*centre, 1.0]))[:3]


def softmax_p(logits: list[float], k: int) -> float:
    e = np.exp(np.array(logits))
    return float(e[k] / e.sum())


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("segcfg"))


@pytest.fixture(scope="module", params=["RAS", "LPS"])
def run(request, tmp_path_factory, config) -> tuple[Path, np.ndarray]:
    """``medcam3d explain`` of the blob scan with the scan's affine RAS- or LPS-oriented."""
    affine = {"RAS": RAS, "LPS": LPS}[request.param]
    d = tmp_path_factory.mktemp(f"segrun_{request.param}")
    scan = write_scan(d / "scan.nii.gz", affine)
    assert main(["explain", str(scan), "--config", str(config), "--out", str(d / "out"), "--quiet"]) == 0
    return d / "out", affine


NAMES = ["nodule component 1", "nodule component 2", "mass component 1"]
STEMS = ["000_nodule_component_1", "001_nodule_component_2", "002_mass_component_1"]


def test_files_of_a_segmentation_folder(run):
    out, _ = run
    expected = {"scores.csv", "summary.json", "segmentation.nii.gz", "targets.csv", "lowres_hirescam.nii.gz",
                "lowres_gradcam.nii.gz"}
    for stem in STEMS:
        expected |= {f"fullres_hirescam_{stem}.nii.gz", f"fullres_gradcam_{stem}.nii.gz", f"montage_{stem}.png"}
    assert {p.name for p in out.iterdir()} == expected
    assert sorted(load_summary(out).files) == sorted(expected)


def test_segmentation_nifti_in_scan_space_with_the_predicted_labels(run):
    out, affine = run
    img = nib.load(str(out / "segmentation.nii.gz"))
    assert img.shape == SHAPE
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), blobs()[1])


def test_targets_csv_counts_centroids_scores(run):
    out, affine = run
    with open(out / "targets.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(TARGET_FIELDS)
    assert [r["name"] for r in rows] == NAMES
    assert [int(r["voxels"]) for r in rows] == [48, 8, 27]
    assert [(int(r["class"]), r["label"], r["region"], int(r["component"])) for r in rows] == [
        (1, "nodule", "component", 1), (1, "nodule", "component", 2), (2, "mass", "component", 1)]
    for r, blob in zip(rows, (BLOB_A, BLOB_B, BLOB_C)):
        got = [float(r[f"centroid_{a}_mm"]) for a in "xyz"]
        np.testing.assert_allclose(got, centroid_mm(affine, blob), atol=1e-3)
    # region scores: sums of logits, 1.25 per nodule voxel (x + 0.25 at x = 1), 1 per mass voxel (-x at x = -1)
    assert [float(r["score"]) for r in rows] == pytest.approx([60.0, 10.0, 27.0], abs=1e-4)
    assert read_targets_csv(out / "targets.csv")[0].voxels == 48


def test_summary_segmentation_fields_and_exact_hirescam(run):
    out, affine = run
    s = load_summary(out)
    assert s.task == "segmentation" and s.segmentation == "segmentation.nii.gz"
    assert s.segmentation_labels == {"1": "nodule", "2": "mass"}
    assert [t.name for t in s.targets] == NAMES and [t.index for t in s.targets] == [0, 1, 2]
    assert [c.label for c in s.classes] == NAMES
    np.testing.assert_allclose(s.targets[2].centroid_mm, centroid_mm(affine, BLOB_C), atol=1e-3)
    # the head after `features` is a 1x1x1 convolution: affine, HiResCAM exact per target
    assert s.certificate is not None and s.certificate.kind == "affine-head" and s.certificate.exact
    for c, voxels, bias in zip(s.classes, (48, 8, 27), (0.25, 0.25, 0.0)):
        assert c.certificate == "affine-head"
        assert c.completeness_residual <= 1e-5
        assert c.bias == pytest.approx(bias * voxels, abs=1e-5)  # the head's bias summed over the region
        assert c.predicted and c.full_resolution
    # probability: the mean softmax probability of the target's class over its region (here constant over it)
    p_nodule = softmax_p([0.5, 1.25, -1.0], 1)
    p_mass = softmax_p([0.5, -0.75, 1.0], 2)
    assert [c.probability for c in s.classes] == pytest.approx([p_nodule, p_nodule, p_mass], rel=1e-5)
    lowres = nib.load(str(out / "lowres_hirescam.nii.gz"))
    assert lowres.shape[3] == 3
    # HiResCAM of a target = x on its region on the network grid, so its sum is the region's voxel count
    assert np.asarray(lowres.dataobj).reshape(-1, 3).sum(axis=0) == pytest.approx([48.0, 8.0, 27.0], abs=1e-4)


def test_full_resolution_maps_per_target_on_the_scan(run):
    """Target 0 (component A): HiResCAM is x on A only -> display 1 on A, 0 elsewhere; Grad-CAM's channel weight is
    the mean gradient (48/N, 0), so its map is 48/N x everywhere -> display 1 on both nodules A and B."""
    out, affine = run
    for method, want in (("hirescam", mask_of(BLOB_A)), ("gradcam", mask_of(BLOB_A, BLOB_B))):
        img = nib.load(str(out / f"fullres_{method}_{STEMS[0]}.nii.gz"))
        assert img.shape == SHAPE
        np.testing.assert_allclose(img.affine, affine, atol=1e-6)
        np.testing.assert_allclose(img.get_fdata(), want.astype(float), atol=1e-6)
    mass = nib.load(str(out / f"fullres_hirescam_{STEMS[2]}.nii.gz")).get_fdata()
    np.testing.assert_allclose(mass, mask_of(BLOB_C).astype(float), atol=1e-6)


def test_scores_csv_rows_are_targets(run):
    out, _ = run
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == NAMES
    assert [float(r["score"]) for r in rows] == pytest.approx([60.0, 10.0, 27.0], rel=1e-5)
    assert all(r["predicted"] == "1" and r["full_resolution"] == "1" for r in rows)


def test_default_full_res_is_the_largest_targets(tmp_path, config, monkeypatch):
    """With a cap of 2, the two largest regions (48 and 27 voxels) get full resolution, and a note says so."""
    monkeypatch.setattr(pipeline, "MAX_FULL_RES", 2)
    scan = write_scan(tmp_path / "scan.nii.gz", RAS)
    assert main(["explain", str(scan), "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    s = load_summary(tmp_path / "out")
    assert [c.full_resolution for c in s.classes] == [True, False, True]
    assert any("2 largest" in n for n in s.notes or [])
    assert not (tmp_path / "out" / f"montage_{STEMS[1]}.png").exists()


def test_classes_selects_targets_by_class_label(tmp_path, config):
    scan = write_scan(tmp_path / "scan.nii.gz", RAS)
    out = tmp_path / "out"
    assert main(["explain", str(scan), "--config", str(config), "--out", str(out), "--quiet",
                 "--classes", "mass"]) == 0
    assert [t.name for t in load_summary(out).targets] == ["mass component 1"]
    with open(out / "targets.csv", newline="") as f:
        assert [r["target"] for r in csv.DictReader(f)] == ["2"]


def test_predicted_region_and_mean_reduce(tmp_path):
    """``targets: {region: predicted, reduce: mean}``: one target per class, scored by the mean logit."""
    cfg = write_config(tmp_path / "cfg", extra="targets: {region: predicted, reduce: mean}\n")
    scan = write_scan(tmp_path / "scan.nii.gz", RAS)
    assert main(["explain", str(scan), "--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    s = load_summary(tmp_path / "out")
    assert [(t.name, t.region, t.component, t.voxels) for t in s.targets] == [
        ("nodule predicted", "predicted", None, 56), ("mass predicted", "predicted", None, 27)]
    assert [t.score for t in s.targets] == pytest.approx([1.25, 1.0], rel=1e-6)
    assert all(c.completeness_residual <= 1e-5 for c in s.classes)


def test_target_mask(tmp_path, config):
    """``--target-mask``: the mask (scan grid) is the region of each explained class. The box i, j, k in 0..3
    holds 8 voxels of blob A (x = 1) and 56 of 0 HU: nodule 8 x 1.25 + 56 x 0.25 = 24, mass 8 x (-1) = -8."""
    scan = write_scan(tmp_path / "scan.nii.gz", LPS)
    mask = np.zeros(SHAPE, np.uint8)
    mask[0:4, 0:4, 0:4] = 1
    nib.save(nib.Nifti1Image(mask, LPS), str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "out"
    assert main(["explain", str(scan), "--config", str(config), "--out", str(out), "--quiet",
                 "--target-mask", str(tmp_path / "mask.nii.gz")]) == 0
    s = load_summary(out)
    assert [(t.name, t.region, t.voxels) for t in s.targets] == [("nodule mask", "mask", 64), ("mass mask", "mask", 64)]
    assert [t.score for t in s.targets] == pytest.approx([24.0, -8.0], abs=1e-4)
    np.testing.assert_allclose(s.targets[0].centroid_mm, (LPS @ [1.5, 1.5, 1.5, 1])[:3], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "segmentation.nii.gz")).dataobj), blobs()[1])


def test_empty_prediction_is_a_note_and_no_maps(tmp_path, config, capsys):
    """A scan where the net predicts only background: exit 0, one note, the (all-background) segmentation in scan
    space, headers-only CSVs, no maps."""
    scan = write_scan(tmp_path / "scan.nii.gz", LPS, hu=np.zeros(SHAPE, np.float32))
    out = tmp_path / "out"
    assert main(["explain", str(scan), "--config", str(config), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "segmentation is empty" in err[0] and err[0].startswith("medcam3d: note:")
    assert {p.name for p in out.iterdir()} == {"scores.csv", "summary.json", "segmentation.nii.gz", "targets.csv"}
    img = nib.load(str(out / "segmentation.nii.gz"))
    np.testing.assert_allclose(img.affine, LPS, atol=1e-6)
    assert img.shape == SHAPE and not np.asarray(img.dataobj).any()
    assert (out / "targets.csv").read_text().strip() == ",".join(TARGET_FIELDS)
    s = load_summary(out)
    assert s.task == "segmentation" and s.targets == [] and s.classes == [] and s.certificate is None
    assert s.notes is not None and "segmentation is empty" in s.notes[0]


def _refused(capsys, argv: list[str], out: Path, needle: str) -> None:
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medcam3d: error:") and needle in err[0], err
    assert not out.exists()


def test_class_outside_the_output_channels_exit_2(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg", extra="targets: {classes: [1, 5]}\n")
    scan = write_scan(tmp_path / "scan.nii.gz", RAS)
    out = tmp_path / "out"
    _refused(capsys, ["explain", str(scan), "--config", str(cfg), "--out", str(out)], out,
             "class 5 is outside the model's 3 output channels")


def test_labels_not_counting_the_channels_exit_2(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg", labels=[*LABELS, "extra"])
    scan = write_scan(tmp_path / "scan.nii.gz", RAS)
    out = tmp_path / "out"
    _refused(capsys, ["explain", str(scan), "--config", str(cfg), "--out", str(out)], out,
             "names 4 classes but the model gives 3 output channels")


def test_mask_of_another_shape_exit_2(tmp_path, config, capsys):
    scan = write_scan(tmp_path / "scan.nii.gz", RAS)
    nib.save(nib.Nifti1Image(np.ones((14, 12, 9), np.uint8), RAS), str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "out"
    _refused(capsys, ["explain", str(scan), "--config", str(config), "--out", str(out),
                      "--target-mask", str(tmp_path / "mask.nii.gz")], out, "mask.nii.gz: the target mask has shape")


def test_target_mask_needs_a_segmentation_model(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg", task="")
    scan = write_scan(tmp_path / "scan.nii.gz", RAS)
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), RAS), str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "out"
    _refused(capsys, ["explain", str(scan), "--config", str(cfg), "--out", str(out),
                      "--target-mask", str(tmp_path / "mask.nii.gz")], out, "for segmentation models")


def test_model_declaring_segmentation_needs_no_task_key(tmp_path, monkeypatch):
    """A model with ``medcam3d_task = "segmentation"`` is explained as one without ``task:`` in the config."""
    monkeypatch.setattr(FixedSeg, "medcam3d_task", "segmentation", raising=False)
    cfg = write_config(tmp_path / "cfg", task="probability: softmax")
    scan = write_scan(tmp_path / "scan.nii.gz", RAS)
    assert main(["explain", str(scan), "--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet",
                 "--full-res", "none"]) == 0
    s = load_summary(tmp_path / "out")
    assert s.task == "segmentation" and [t.voxels for t in s.targets] == [48, 8, 27]


def test_printed_table_and_summary_json(tmp_path, config, capsys):
    scan = write_scan(tmp_path / "scan.nii.gz", RAS)
    assert main(["explain", str(scan), "--config", str(config), "--out", str(tmp_path / "out"),
                 "--full-res", "none"]) == 0
    printed = capsys.readouterr().out
    assert "segmentation: segmentation.nii.gz (1=nodule, 2=mass)" in printed
    assert "nodule component 1       48        60.000" in printed
    data = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert data["task"] == "segmentation" and not math.isnan(data["classes"][0]["probability"])


def test_demo_task_segmentation_wiring(tmp_path, monkeypatch):
    """``medcam3d demo --task segmentation`` runs the segmentation demo config on a phantom with the planted
    lesions (here the hand-set net stands in for the demo net: 1000 HU and more -> nodule, -1000 HU -> mass)."""
    from medcam3d import cli

    cfg = write_config(tmp_path / "cfg", pad=(20, 32, 32))
    monkeypatch.setattr(cli, "SEG_DEMO_CONFIG", str(cfg))
    out = tmp_path / "demo"
    assert main(["demo", "--task", "segmentation", "--out", str(out), "--quiet"]) == 0
    s = load_summary(out / "explanation")
    assert s.task == "segmentation" and s.config.name == "fixed_seg"
    assert s.extra["demo"]["planted"] == sorted(cli.DEMO_LESIONS["segmentation"])
    assert (out / "explanation" / "segmentation.nii.gz").is_file() and (out / "scan" / "phantom.nii.gz").is_file()
    assert s.targets and all(t.cls in (1, 2) for t in s.targets)


@pytest.mark.slow
def test_demo_segmentation_with_the_shipped_model(tmp_path):
    """``medcam3d demo --task segmentation``: the shipped demo segmentation net on a phantom with a planted mass;
    its mass target lies on the planted mass (centroid inside the phantom's mass mask), and every target's HiResCAM
    at ``decoder_out`` (a 1x1x1 convolution follows) is exact."""
    from medcam3d.data import LABELS

    out = tmp_path / "demo"
    assert main(["demo", "--task", "segmentation", "--out", str(out), "--quiet"]) == 0
    s = load_summary(out / "explanation")
    assert s.task == "segmentation" and s.config.name == "demo_segnet" and s.model.synthetic_data_only
    assert s.model.target_layer == "decoder_out"
    assert s.certificate is not None and s.certificate.kind == "affine-head"
    assert all(c.certificate == "affine-head" and abs(c.relative_residual) <= 1e-5 for c in s.classes)
    masses = [t for t in s.targets if t.label == "mass"]
    assert masses, "the demo net finds no mass on its demo phantom"
    lesions = nib.load(str(out / "scan" / "phantom_lesions.nii.gz"))
    ijk = np.rint(np.linalg.inv(lesions.affine) @ [*masses[0].centroid_mm, 1.0])[:3].astype(int)
    bits = int(np.asarray(lesions.dataobj)[tuple(ijk)])
    assert bits >> LABELS.index("mass_right_lung") & 1
    seg = nib.load(str(out / "explanation" / "segmentation.nii.gz"))
    assert seg.shape == lesions.shape
    np.testing.assert_allclose(seg.affine, lesions.affine, atol=1e-5)


def test_target_layer_option_overrides_the_config(tmp_path, config, capsys):
    """``--target-layer head`` explains the network's output itself (the config names ``features``): the head
    after it is the region sum, so HiResCAM is the class logit on the region, summing to the region score with no
    bias -- 1.25 per nodule voxel, 1 per mass voxel. An unknown layer is one line, exit 2, nothing written."""
    scan = write_scan(tmp_path / "scan.nii.gz", RAS)
    out = tmp_path / "out"
    assert main(["explain", str(scan), "--config", str(config), "--out", str(out), "--quiet", "--full-res", "none",
                 "--target-layer", "head"]) == 0
    s = load_summary(out)
    assert s.model is not None and s.model.target_layer == "head" and s.model.target_layer_reason == "given"
    assert s.certificate is not None and s.certificate.kind == "affine-head"
    assert [c.bias for c in s.classes] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    lowres = np.asarray(nib.load(str(out / "lowres_hirescam.nii.gz")).dataobj).reshape(-1, 3)
    assert lowres.sum(axis=0) == pytest.approx([1.25 * 48, 1.25 * 8, 27.0], abs=1e-4)
    bad = tmp_path / "bad"
    _refused(capsys, ["explain", str(scan), "--config", str(config), "--out", str(bad), "--target-layer", "haed"],
             bad, "no module named 'haed'")


def test_min_voxels_in_the_config(tmp_path, capsys):
    """``targets: {min_voxels: 10}``: nodule B (8 voxels) is dropped with a note, A (48) and the mass (27) are
    explained. With ``min_voxels: 100`` nothing is left: a note, exit 0, the segmentation (still the model's whole
    prediction) and no maps. ``min_voxels: 0`` is refused naming the key."""
    scan = write_scan(tmp_path / "scan.nii.gz", RAS)
    cfg = write_config(tmp_path / "c10", extra="targets: {min_voxels: 10}\n")
    out = tmp_path / "out"
    assert main(["explain", str(scan), "--config", str(cfg), "--out", str(out), "--quiet", "--full-res", "none"]) == 0
    s = load_summary(out)
    assert [(t.name, t.voxels) for t in s.targets] == [("nodule component 1", 48), ("mass component 1", 27)]
    assert any("1 component(s) smaller than min_voxels=10 dropped" in n for n in s.notes or [])
    cfg = write_config(tmp_path / "c100", extra="targets: {min_voxels: 100}\n")
    empty = tmp_path / "empty"
    capsys.readouterr()
    assert main(["explain", str(scan), "--config", str(cfg), "--out", str(empty), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medcam3d: note:") and "min_voxels=100" in err[0]
    assert {p.name for p in empty.iterdir()} == {"scores.csv", "summary.json", "segmentation.nii.gz", "targets.csv"}
    labels = np.asarray(nib.load(str(empty / "segmentation.nii.gz")).dataobj)
    np.testing.assert_array_equal(labels, blobs()[1])
    bad = tmp_path / "bad"
    _refused(capsys, ["explain", str(scan), "--config", str(write_config(tmp_path / "c0",
                      extra="targets: {min_voxels: 0}\n")), "--out", str(bad)], bad,
             "targets.min_voxels must be a positive integer")
