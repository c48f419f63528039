"""Issue 19: a MONAI segmentation bundle (``--bundle``): the task read from the metadata or the postprocessing, the
prediction and its components checked against the bundle's network run by MONAI itself."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medcam3d.cli import main
from medcam3d.monai.bundle import load_bundle
from medcam3d.outputs import load_summary

pytest.importorskip("monai.bundle")

from test_monai_bundle import _direct_scores  # noqa: E402  (after the skip guard; the bundle run by MONAI itself)

CHANNELS = {"0": "background", "1": "nodule", "2": "mass"}
NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8],
           "strides": [2], "num_res_units": 0}
INFERENCE = {
    "imports": ["$import torch"],
    "image_key": "image",
    "network_def": NETWORK,
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "SPL"},
        {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -1000, "a_max": 1000, "b_min": -1.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "@image_key"},
    ]},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]},
}
PRED = {"type": "image", "format": "segmentation", "num_channels": 3, "spatial_shape": [16, 16, 16],
        "dtype": "float32", "value_range": [0, 1], "is_patch_data": False, "channel_def": CHANNELS}
#: the scan is stored in SPL order (axes S, P, L), so the network grid is the scan's own array
SPL = np.array([[0, 0, -1.5, 20], [0, -1.5, 0, 30], [2.0, 0, 0, -40], [0, 0, 0, 1]])


def make_bundle(root: Path, inference: dict = INFERENCE, pred: dict | None = PRED, seed: int = 0) -> Path:
    from monai.networks.nets import UNet

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(inference))
    if pred is not None:
        meta = {"name": "tiny_seg", "version": "0.1.0",
                "network_data_format": {"inputs": {"image": {"type": "image"}}, "outputs": {"pred": pred}}}
        (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.manual_seed(seed)
    net = UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"})
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("segbundle_scan")
    rng = np.random.default_rng(1)
    data = rng.normal(0, 600, (16, 16, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, SPL), str(d / "scan.nii.gz"))
    return d / "scan.nii.gz"


def bundle_prediction(bundle: Path, scan: Path) -> np.ndarray:
    """The bundle's network run by MONAI (its parsed network and preprocessing): the argmax label map."""
    return _direct_scores(bundle, scan).argmax(0)


def test_task_from_metadata_and_postprocessing(tmp_path):
    assert load_bundle(make_bundle(tmp_path / "a")).task == "segmentation"  # format: segmentation
    image_only = {**PRED, "format": "labels"}
    assert load_bundle(make_bundle(tmp_path / "b", pred=image_only)).task == "segmentation"  # image + argmax
    no_argmax = {**INFERENCE, "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True}]}}
    assert load_bundle(make_bundle(tmp_path / "c", no_argmax, pred=image_only)).task is None
    probabilities = {**PRED, "type": "probabilities", "format": "classes"}
    assert load_bundle(make_bundle(tmp_path / "d", pred=probabilities)).task is None  # a classifier's argmax
    assert load_bundle(make_bundle(tmp_path / "e", pred=None)).task == "segmentation"  # no metadata, argmax
    cfg = load_bundle(make_bundle(tmp_path / "f"))
    assert cfg.labels == ["background", "nodule", "mass"] and cfg.probability == "softmax"
    assert cfg.target_settings().explained(3) == [1, 2]


def test_segmentation_bundle_end_to_end(tmp_path, scan):
    bundle = make_bundle(tmp_path / "bundle")
    out = tmp_path / "out"
    assert main(["explain", str(scan), "--bundle", str(bundle), "--out", str(out), "--quiet"]) == 0
    s = load_summary(out)
    assert s.task == "segmentation" and s.segmentation_labels == {"1": "nodule", "2": "mass"}
    want = bundle_prediction(bundle, scan)
    img = nib.load(str(out / "segmentation.nii.gz"))
    np.testing.assert_allclose(img.affine, SPL, atol=1e-6)
    assert img.shape == (16, 16, 16)
    np.testing.assert_array_equal(np.asarray(img.dataobj), want)  # the grid is the scan's array
    # targets: each class's 26-connected components, largest first (at most 20), voxel counts as scipy counts them
    expected = []
    for cls in (1, 2):
        lab, n = ndimage.label(want == cls, structure=np.ones((3, 3, 3)))
        sizes = sorted(np.bincount(lab.ravel())[1:].tolist(), reverse=True)[:20]
        expected += [(cls, size) for size in sizes]
    assert expected, "the random bundle predicts no foreground; choose another seed"
    with open(out / "targets.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["class"]), int(r["voxels"])) for r in rows] == expected
    assert [t.voxels for t in s.targets] == [size for _, size in expected]
    # full resolution by default: the 10 largest targets (ties: in target order), maps on the scan's grid
    by_size = sorted(range(len(expected)), key=lambda t: (-expected[t][1], t))
    assert [t for t, c in enumerate(s.classes) if c.full_resolution] == sorted(by_size[:10])
    largest = by_size[0]
    stem = f"{largest:03d}_{s.targets[largest].name.replace(' ', '_')}"
    for method in ("hirescam", "gradcam"):
        fr = nib.load(str(out / f"fullres_{method}_{stem}.nii.gz"))
        assert fr.shape == (16, 16, 16)
        np.testing.assert_allclose(fr.affine, SPL, atol=1e-6)
    assert s.model.target_layer  # chosen by target_layer="auto" on the UNet
