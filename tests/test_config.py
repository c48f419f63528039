"""medcam3d.config: the YAML schema, strict validation, the shipped configs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

import medcam3d.config as config_module
import medcam3d.models.loading as loading_module
from medcam3d.config import Config, available_configs, load_config, resolve_package_path
from medcam3d.errors import InputError
from medcam3d.io import Volume
from medcam3d.preprocess import Preprocessor

MINIMAL = {
    "name": "tiny",
    "model": {"_target_": "medcam3d.models.AxialNet", "n_outputs": 2},
    "labels": ["a", "b"],
    "preprocessing": [
        {"_target_": "Orientation", "axcodes": "SPL"},
        {"_target_": "Spacing", "pixdim": [2.0, 2.0, 2.0]},
        {"_target_": "ResizeWithPadOrCrop", "spatial_size": [6, 9, 9]},
    ],
    "input_size": [6, 9, 9],
}


def _write(tmp: Path, data, name: str = "cfg.yaml") -> Path:
    p = tmp / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


def _with(**changes):
    d = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in MINIMAL.items()}
    d.update(changes)
    return d


# --- shipped configs -------------------------------------------------------------------------------------------------
def test_shipped_configs_are_listed_and_valid():
    assert {"axialnet_chestct", "demo_axialnet"} <= set(available_configs())
    for name in available_configs():
        cfg = load_config(name)
        assert cfg.path is not None and cfg.path.name == f"{name}.yaml"
        assert cfg.preprocessing[0] == {"_target_": "Orientation", "axcodes": "SPL"}


def test_paper_config_is_the_papers_preprocessing():
    cfg = load_config("axialnet_chestct")
    assert cfg.n_outputs == 80 and len(set(cfg.labels)) == 80
    assert cfg.model["_target_"] == "medcam3d.models.AxialNet" and cfg.model["n_outputs"] == 80
    assert cfg.input_size == (405, 420, 420)
    assert (cfg.target_layer, cfg.layout, cfg.probability) == ("conv2d.7", "slices_as_batch", "sigmoid")
    pre = {s["_target_"]: s for s in cfg.preprocessing}
    assert pre["Spacing"]["pixdim"] == [0.8, 0.8, 0.8]
    assert (pre["ScaleIntensityRange"]["a_min"], pre["ScaleIntensityRange"]["a_max"]) == (-1000.0, 800.0)
    assert pre["ScaleIntensityRange"]["clip"] is True
    assert pre["ResizeWithPadOrCrop"]["spatial_size"] == [405, 420, 420]
    assert pre["ShiftIntensity"]["offset"] == -0.449


def test_paper_preprocessing_values_by_hand():
    """HU -> (clip(HU, -1000, 800) + 1000) / 1800 - 0.449 on the 405 x 420 x 420 grid."""
    cfg = load_config("axialnet_chestct")
    pre = Preprocessor.from_config(cfg)
    shape = (140, 140, 70)  # 0.8 mm isotropic already, RAS: only reorientation and padding happen
    a = np.diag([0.8, 0.8, 0.8, 1.0])
    arr = np.full(shape, -1200.0, np.float32)  # below the clip
    arr[20:120, 20:120, 10:60] = -100.0
    arr[60:80, 60:80, 30:40] = 2000.0  # above the clip
    x = pre(Volume(arr, a, "scan"))
    assert tuple(x.shape) == (1, 405, 420, 420)
    vals = np.unique(x.numpy()).astype(np.float64)
    for expected in (0.0 - 0.449, 900 / 1800 - 0.449, 1.0 - 0.449):  # air (and padding), -100 HU, bone
        assert np.isclose(vals, expected, atol=1e-5).any(), expected
    assert vals.min() == pytest.approx(-0.449, abs=1e-5) and vals.max() == pytest.approx(0.551, abs=1e-5)


def test_demo_config_draft():
    cfg = load_config("demo_axialnet")
    assert cfg.labels[:2] == ["nodule_right_lung", "nodule_left_lung"] and cfg.labels[-1] == "emphysema"
    assert cfg.n_outputs == 13 == cfg.model["n_outputs"]
    assert cfg.input_size == (60, 128, 128)
    assert next(s for s in cfg.preprocessing if s["_target_"] == "Spacing")["pixdim"] == [5.0, 2.5, 2.5]
    assert cfg.weights_path == Path(__file__).resolve().parents[1] / "medcam3d" / "weights" / "demo_axialnet.pt"
    assert cfg.allowed_regions["nodule_left_lung"] == ["left_lung"]
    assert cfg.allowed_regions["cardiomegaly"] == ["heart"]
    assert set(cfg.allowed_regions) <= set(cfg.labels)


def test_load_by_path_package_and_name_agree(tmp_path):
    by_name = load_config("demo_axialnet")
    by_pkg = load_config("package:medcam3d/configs/demo_axialnet.yaml")
    by_path = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo_axialnet.yaml")
    assert by_name.to_dict() == by_pkg.to_dict() == by_path.to_dict()
    # round trip through YAML
    p = _write(tmp_path, by_name.to_dict())
    assert load_config(p).to_dict() == by_name.to_dict()


def test_orientation_gets_ras_labels_and_no_monai_future_warning():
    cfg = Config.from_dict(_with(), path="x.yaml")
    pre = Preprocessor.from_config(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        x = pre(Volume(np.zeros((10, 12, 8), np.float32), np.diag([-1.0, 1.0, 1.5, 1.0]), "scan"))
    assert tuple(x.shape) == (1, 6, 9, 9)


# --- weights and model ---------------------------------------------------------------------------------------------
def test_weights_paths_resolve_relative_to_the_config(tmp_path):
    p = _write(tmp_path, _with(weights="w/model.pt"))
    assert load_config(p).weights_path == tmp_path / "w" / "model.pt"
    p = _write(tmp_path, _with(weights="package:medcam3d/weights/x.pt"), "c2.yaml")
    assert load_config(p).weights_path.parts[-3:] == ("medcam3d", "weights", "x.pt")


def test_one_package_path_resolver_for_configs_and_model_weights(tmp_path):
    # config re-exports the resolver of the models layer (one implementation of ``package:`` paths)
    assert resolve_package_path is loading_module.resolve_package_path
    here = Path(config_module.__file__).resolve()
    assert resolve_package_path("package:medcam3d/config.py").resolve() == here
    assert loading_module.resolve_weights("package:medcam3d/config.py").resolve() == here
    p = _write(tmp_path, _with(weights="package:no_such_package_xyz/w.pt"))
    with pytest.raises(InputError, match=r"cfg\.yaml: package path .*no installed package 'no_such_package_xyz'"):
        _ = load_config(p).weights_path
    with pytest.raises(InputError, match="must look like 'package:PKG/relative/path'"):
        resolve_package_path("package:medcam3d")


def test_build_model_passes_spec_and_declares_config_attributes(tmp_path, monkeypatch):
    calls = {}

    class Net:
        pass

    def fake_build_model(spec, weights=None, base_dir=None):
        calls.update(spec=spec, weights=weights, base_dir=base_dir)
        return Net()

    monkeypatch.setattr(config_module, "build_model", fake_build_model)
    (tmp_path / "w.pt").write_bytes(b"")
    cfg = load_config(_write(tmp_path, _with(weights="w.pt", target_layer="conv2d.7", layout="slices_as_batch")))
    model = cfg.build_model()
    assert calls == {"spec": MINIMAL["model"], "weights": tmp_path / "w.pt", "base_dir": tmp_path}
    assert model.medcam3d_labels == ["a", "b"] and model.medcam3d_target_layer == "conv2d.7"
    assert type(model.medcam3d_layout).__name__ == "SlicesAsBatch"
    missing = load_config(_write(tmp_path, _with(weights="nope.pt"), "c3.yaml"))
    with pytest.raises(InputError, match=r"c3\.yaml: weights file .*nope\.pt not found"):
        missing.build_model()


# --- every bad config: one-line InputError naming the file, nothing written -------------------------------------------
BAD = {
    "unknown top-level key": (_with(colour="blue"), "unknown key 'colour'"),
    "unknown transform": (_with(preprocessing=[{"_target_": "Sharpen"}]), "unknown transform 'Sharpen'"),
    "not a monai transform": (_with(preprocessing=[{"_target_": "os.system"}]), "unknown transform 'os.system'"),
    # issue 16: a dictionary transform stands for its array version (Spacingd -> Spacing); one without is refused
    "dictionary transform": (_with(preprocessing=[{"_target_": "CopyItemsd", "keys": ["image"], "times": 1}]),
                             "dictionary transform"),
    "random transform": (_with(preprocessing=[{"_target_": "RandFlip", "prob": 0.5}]), "random"),
    "io transform": (_with(preprocessing=[{"_target_": "SaveImage"}]), "not allowed"),
    "unknown transform argument": (_with(preprocessing=[{"_target_": "Spacing", "pixdm": [1, 1, 1]}]),
                                   "unknown argument 'pixdm'"),
    "unknown pad argument": (_with(preprocessing=[{"_target_": "ResizeWithPadOrCrop", "spatial_size": [6, 9, 9],
                                                   "colour": 1}]), "unknown argument 'colour'"),
    "missing transform argument": (_with(preprocessing=[{"_target_": "ScaleIntensityRange", "a_min": 0}]),
                                   "bad arguments"),
    "bad transform value": (_with(preprocessing=[{"_target_": "Spacing", "pixdim": "abc"}]), "bad arguments"),
    "bad axcodes": (_with(preprocessing=[{"_target_": "Orientation", "axcodes": "XYZ"}]), "axcodes 'XYZ'"),
    "transform without _target_": (_with(preprocessing=[{"pixdim": [1, 1, 1]}]), "no _target_"),
    "missing required key": ({k: v for k, v in MINIMAL.items() if k != "labels"}, "missing required key 'labels'"),
    "labels vs n_outputs": (_with(labels=["a", "b", "c"]), "3 labels but model.n_outputs is 2"),
    "duplicate labels": (_with(labels=["a", "a"]), "duplicate labels"),
    "unknown layout": (_with(layout="sideways"), "unknown layout 'sideways'"),
    "bad probability": (_with(probability="relu"), "probability must be one of"),
    "bad threshold": (_with(threshold=1.5), "threshold must be a number in"),
    "bad input_size": (_with(input_size=[6, 9]), "input_size must be a list of 3"),
    "input_size vs crop": (_with(input_size=[6, 9, 10]), "differs from the last crop/pad"),
    "allowed_regions label": (_with(allowed_regions={"zzz": ["heart"]}), "unknown label 'zzz'"),
    "model without _target_": (_with(model={"n_outputs": 2}), "model must be a mapping with a _target_"),
    "not a mapping": ([1, 2, 3], "must be a YAML mapping"),
    "invalid YAML": ("name: [unclosed\n", "not valid YAML"),
    "duplicate YAML key": ("name: a\nname: b\n", "duplicate key 'name'"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_config_one_line_error_naming_the_file_nothing_written(tmp_path, case):
    data, pattern = BAD[case]
    p = _write(tmp_path, data, "bad_config.yaml")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError) as e:
        Preprocessor.from_config(load_config(p))
    msg = str(e.value)
    assert "bad_config.yaml" in msg and pattern in msg and "\n" not in msg, msg
    assert list(out.iterdir()) == []


def test_missing_config_and_unknown_name(tmp_path):
    with pytest.raises(InputError, match=r"nope\.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="no shipped config of that name"):
        load_config("no_such_config_name")


def test_runtime_transform_failure_names_config_and_scan(tmp_path):
    # a pad mode numpy/torch do not know is only found when the transform runs
    cfg = load_config(_write(tmp_path, _with(preprocessing=[
        {"_target_": "ResizeWithPadOrCrop", "spatial_size": [6, 9, 9], "mode": "no_such_mode"}])))
    pre = Preprocessor.from_config(cfg)
    with pytest.raises(InputError, match=r"cfg\.yaml: preprocessing\[0\] \(ResizeWithPadOrCrop\) failed on scan7"):
        pre(Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), "scan7"))


def test_demo_config_agrees_with_the_phantoms():
    data = pytest.importorskip("medcam3d.data")
    cfg = load_config("demo_axialnet")
    assert tuple(cfg.labels) == tuple(data.LABELS)
    organs = {o for regions in cfg.allowed_regions.values() for o in regions}
    assert organs <= set(data.ORGANS)
