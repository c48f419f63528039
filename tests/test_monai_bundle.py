"""Issue 16: MONAI bundles (``--bundle DIR``) and dictionary transforms / short ``_target_`` names in configs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medcam3d.cli import main
from medcam3d.config import Config, full_target
from medcam3d.outputs import load_summary

pytest.importorskip("monai.bundle")

NETWORK = {"_target_": "DenseNet", "spatial_dims": "@spatial_dims", "in_channels": 1, "out_channels": 2,
           "init_features": 4, "growth_rate": 4, "block_config": [2, 2], "bn_size": 2}
INFERENCE = {
    "imports": ["$import torch"],
    "image_key": "image",
    "spatial_dims": 3,
    "device": "$torch.device('cpu')",
    "network_def": NETWORK,
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "SPL"},
        {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -1000, "a_max": 400, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "ResizeWithPadOrCropd", "keys": "@image_key", "spatial_size": [24, 24, 24]},
        {"_target_": "EnsureTyped", "keys": "@image_key"},
    ]},
    "datalist": [],
    "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1},
    "inferer": {"_target_": "SimpleInferer"},
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer"},
    "run": ["$@evaluator.run()"],
}
METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
    "version": "0.1.0", "monai_version": "1.6.1", "pytorch_version": "2.13.0", "numpy_version": "2.0",
    "name": "tiny_ct_classifier", "task": "3-D CT classification (test bundle)",
    "description": "a tiny DenseNet built in the tests", "authors": "medcam3d tests", "copyright": "none",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "hounsfield", "num_channels": 1,
                             "spatial_shape": [24, 24, 24], "dtype": "float32", "value_range": [0, 1],
                             "is_patch_data": False, "channel_def": {"0": "image"}}},
        "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": 2, "spatial_shape": [2],
                             "dtype": "float32", "value_range": [], "is_patch_data": False,
                             "channel_def": {"0": "no_nodule", "1": "nodule"}}},
    },
}


def _network():
    from monai.networks.nets import DenseNet

    args = {k: v for k, v in NETWORK.items() if k != "_target_"}
    return DenseNet(**{**args, "spatial_dims": 3})


def make_bundle(root: Path, inference=INFERENCE, weights=None) -> Path:
    """A bundle laid out as MONAI's bundle spec says: configs/{inference,metadata}.json, models/model.pt."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    (root / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=2))
    torch.manual_seed(3)
    torch.save(weights if weights is not None else _network().state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bundle_scan")
    rng = np.random.default_rng(0)
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    data = rng.normal(-300, 400, (30, 32, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, aff), str(tmp / "scan.nii.gz"))
    return tmp / "scan.nii.gz"


def _direct_scores(bundle: Path, scan: Path) -> np.ndarray:
    """The bundle run by MONAI itself: its parsed network and preprocessing, the weights loaded by torch."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    x = parser.get_parsed_content("preprocessing")({"image": str(scan)})["image"]
    with torch.no_grad():
        return net.eval()(x.as_tensor()[None])[0].numpy()


def test_bundle_same_scores_as_the_bundle_network(tmp_path, scan):
    bundle = make_bundle(tmp_path / "bundle")
    out = tmp_path / "out"
    assert main(["explain", str(scan), "--bundle", str(bundle), "--out", str(out), "--quiet"]) == 0
    summary = load_summary(out)
    got = {c.label: c.score for c in summary.classes}
    want = _direct_scores(bundle, scan)
    assert set(got) == {"no_nodule", "nodule"}  # label names from the metadata's channel_def
    np.testing.assert_allclose([got["no_nodule"], got["nodule"]], want, rtol=1e-4, atol=1e-5)
    assert summary.model.target_layer_reason is not None and summary.model.target_layer_reason.startswith("auto")


def test_monai_bundle_run_accepts_the_test_bundle(tmp_path, scan):
    """The same inference.json runs under ``monai.bundle.run`` (MONAI's own runner)."""
    from monai.bundle import run

    bundle = make_bundle(tmp_path / "bundle")
    run(run_id="run", meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"), datalist=[{"image": str(scan)}])


def _bad(tmp_path: Path, name: str) -> Path:
    if name == "no network_def":
        return make_bundle(tmp_path / name, {k: v for k, v in INFERENCE.items() if k != "network_def"})
    if name == "network_def does not build":
        return make_bundle(tmp_path / name, {**INFERENCE, "network_def": {**NETWORK, "block_config": "abc"}})
    weights = {k: v[..., :1] if v.ndim > 1 else v for k, v in _network().state_dict().items()}
    return make_bundle(tmp_path / name, weights=weights)


@pytest.mark.parametrize("name", ["no network_def", "network_def does not build", "weights do not match"])
def test_bad_bundles_exit_2_one_line_nothing_written(tmp_path, scan, capsys, name):
    bundle = _bad(tmp_path, name)
    out = tmp_path / "out"
    assert main(["explain", str(scan), "--bundle", str(bundle), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("medcam3d: error:") and str(bundle) in err, err
    assert not out.exists()


def test_config_accepts_dictionary_transforms_and_short_targets():
    cfg = Config.from_dict({
        "name": "t", "model": {"_target_": "DenseNet121", "spatial_dims": 3, "in_channels": 1, "out_channels": 2},
        "labels": ["a", "b"],
        "preprocessing": [{"_target_": "Orientationd", "keys": ["image"], "axcodes": "SPL"},
                          {"_target_": "Spacingd", "keys": "image", "pixdim": [2, 2, 2], "allow_missing_keys": True}],
    })
    assert cfg.model["_target_"] == "monai.networks.nets.densenet.DenseNet121"
    from medcam3d.preprocess import Preprocessor

    names = [type(t).__name__ for t in Preprocessor.from_config(cfg).transforms]
    assert names[-2:] == ["Orientation", "Spacing"] or names == ["Orientation", "Spacing"]
    assert full_target("monai.networks.nets.DenseNet121") == "monai.networks.nets.DenseNet121"


def test_readme_bundle_commands(tmp_path, scan, monkeypatch):
    """The README's ``--bundle`` command lines, run as written (in a folder holding scan.nii.gz, scans/ and
    my_bundle/; the batch line in one process, ``--shard 0/1``, to keep the test short)."""
    import re
    import shlex
    import shutil

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Use in a MONAI pipeline"):]
    explain, batch = [line for line in re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0].splitlines() if line]
    make_bundle(tmp_path / "my_bundle")
    shutil.copy(scan, tmp_path / "scan.nii.gz")
    (tmp_path / "scans").mkdir()
    shutil.copy(scan, tmp_path / "scans" / "case1.nii.gz")
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(explain)
    assert argv[:2] == ["medcam3d", "explain"]
    assert main([*argv[1:], "--quiet"]) == 0
    assert {c.label for c in load_summary(tmp_path / "scan_maps").classes} == {"no_nodule", "nodule"}
    argv = shlex.split(batch)
    assert argv[:2] == ["medcam3d", "batch"]
    assert main([*argv[1:], "--quiet", "--shard", "0/1", "--no-report"]) == 0
    got = {c.label: c.score for c in load_summary(tmp_path / "audit" / "scans" / "case1").classes}
    want = {c.label: c.score for c in load_summary(tmp_path / "scan_maps").classes}
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_bundle_postprocessing_sets_softmax_and_threshold(tmp_path, scan):
    """``postprocessing: Activationsd(softmax=True), AsDiscreted(threshold=0.7)`` -> softmax probabilities (summing to
    1 over the two classes, equal to softmax of the bundle network's scores) and the 0.7 threshold."""
    post = {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.7},
    ]}
    bundle = make_bundle(tmp_path / "bundle", {**INFERENCE, "postprocessing": post})
    out = tmp_path / "out"
    assert main(["explain", str(scan), "--bundle", str(bundle), "--out", str(out), "--quiet"]) == 0
    summary = load_summary(out)
    assert summary.probability == "softmax"
    assert summary.threshold == pytest.approx(0.7)
    want = _direct_scores(bundle, scan)
    softmax = np.exp(want - want.max()) / np.exp(want - want.max()).sum()
    got = [c.probability for c in summary.classes]
    np.testing.assert_allclose(got, softmax, rtol=1e-4, atol=1e-6)
    assert [c.predicted for c in summary.classes] == [bool(p >= 0.7) for p in softmax]
