"""medcam3d.train: the allowed-region loss on hand-computed 2x2x2 maps, training-mode HiResCAM, bad configs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medcam3d import Explainer
from medcam3d.config import load_config
from medcam3d.data import CleverHans
from medcam3d.errors import InputError
from medcam3d.geometry import MapGeometry
from medcam3d.models import AxialNet, build_model
from medcam3d.preprocess import Preprocessor
from medcam3d.train import (
    affine_head_cams,
    allowed_cells,
    allowed_region_loss,
    check_allowed_regions,
    gradient_cams,
    outside_share,
)

ROOT = Path(__file__).resolve().parents[1]

# one 2x2x2 map: slice 0 = [[1, -2], [3, 0]], slice 1 = [[2, 1], [-1, 4]]
MAP = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[2.0, 1.0], [-1.0, 4.0]]])
SLICE0 = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])  # allowed: slice 0 only


def test_present_label_share_is_positive_outside_over_positive_total():
    # positive values: 1, 3 in slice 0 (inside) and 2, 1, 4 in slice 1 (outside): 7 / 11
    share = outside_share(MAP[None, None], SLICE0[None, None], torch.tensor([[True]]))
    assert share.item() == pytest.approx(7 / 11, abs=1e-6)
    # fractional region: half of every cell allowed -> half of the positive contribution is outside
    half = outside_share(MAP[None, None], torch.full((1, 1, 2, 2, 2), 0.5), torch.tensor([[True]]))
    assert half.item() == pytest.approx(0.5, abs=1e-6)
    # all allowed -> 0; nothing positive -> 0
    assert outside_share(MAP[None, None], torch.ones(1, 1, 2, 2, 2), torch.tensor([[True]])).item() == 0
    assert outside_share(-MAP.abs()[None, None], SLICE0[None, None], torch.tensor([[True]])).item() == 0


def test_absent_label_counts_all_positive_contribution():
    # no region allowed: positive 11 over absolute 1+2+3+0+2+1+1+4 = 14, whatever the mask
    share = outside_share(MAP[None, None], SLICE0[None, None], torch.tensor([[False]]))
    assert share.item() == pytest.approx(11 / 14, abs=1e-6)


def test_loss_weights_lambda_and_absent_weight():
    maps = torch.stack([MAP, MAP])[None]  # [1, 2, 2, 2, 2]: class 0 present, class 1 absent
    allowed = torch.stack([SLICE0, SLICE0])[None]
    present = torch.tensor([[True, False]])
    loss = allowed_region_loss(maps, allowed, present, lam=2.0, absent_weight=0.5)
    assert loss.item() == pytest.approx(2.0 * (7 / 11 + 0.5 * 11 / 14) / 2, abs=1e-6)
    only_present = allowed_region_loss(maps, allowed, present, lam=1.0, absent_weight=0.0)
    assert only_present.item() == pytest.approx(7 / 11 / 2, abs=1e-6)
    custom = allowed_region_loss(maps, allowed, present, weight=lambda p: torch.tensor([[0.0, 1.0]]))
    assert custom.item() == pytest.approx(11 / 14 / 2, abs=1e-6)


def test_loss_gradient_moves_evidence_inside():
    maps = MAP[None, None].clone().requires_grad_(True)
    allowed_region_loss(maps, SLICE0[None, None], torch.tensor([[True]])).backward()
    g = maps.grad[0, 0]
    # d/dv of out/total: inside positive cells (1, 3) get -out/total^2 = -7/121, outside positive ones
    # (2, 1, 4) get (total - out)/total^2 = 4/121; non-positive cells get 0
    assert g[0, 0, 0].item() == pytest.approx(-7 / 121, abs=1e-6)
    assert g[1, 1, 1].item() == pytest.approx(4 / 121, abs=1e-6)
    assert g[0, 0, 1].item() == 0 and g[1, 1, 0].item() == 0


def test_allowed_cells_union_with_field_and_receptive_placement():
    shape = (4, 4, 4)
    lung = torch.zeros(shape, dtype=torch.bool)
    lung[..., :2] = True  # columns 0, 1
    heart = torch.zeros(shape, dtype=torch.bool)
    heart[0, 0, 3] = True
    organs = {"lung": lung, "heart": heart}
    regions = {"a": ["lung"], "b": ["lung", "heart"]}
    field = allowed_cells(organs, regions, ["a", "b"], (2, 2, 2), None)
    assert field.shape == (2, 2, 2, 2)
    assert torch.equal(field[0, ..., 0], torch.ones(2, 2)) and torch.equal(field[0, ..., 1], torch.zeros(2, 2))
    assert field[1, 0, 0, 1].item() == pytest.approx(1 / 8) and field[1, 1, 1, 1].item() == 0
    # receptive cells at 0 and 2 (stride 2): column 0 is nearest cell 0, columns 1-3 nearest cell 1 (edge cell)
    geo = MapGeometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), "receptive")
    rec = allowed_cells(organs, regions, ["a"], (2, 2, 2), geo)
    assert rec[0, 0, 0, 0].item() == pytest.approx(1.0) and rec[0, 0, 0, 1].item() == pytest.approx(1 / 3)


def test_affine_head_cams_sum_to_the_fc_score():
    torch.manual_seed(0)
    act = torch.randn(3, 4, 2, 2)
    fc = torch.nn.Conv2d(4, 5, kernel_size=2)
    with torch.no_grad():
        cams = affine_head_cams(act, fc.weight, scale=0.5)
        score = fc(act).flatten(1)  # conv = the affine head, an independent computation
    assert cams.shape == (3, 5, 2, 2)
    assert torch.allclose(cams.sum((2, 3)) * 2, score - fc.bias, atol=1e-5)
    # one cell by hand
    assert cams[1, 2, 0, 1].item() == pytest.approx(0.5 * float((act[1, :, 0, 1] * fc.weight[2, :, 0, 1]).sum()))


def test_gradient_cams_match_the_affine_path_and_the_explainer_and_train():
    torch.manual_seed(1)
    model = AxialNet(3, in_plane=(96, 96), width=4, feature_stride=8).eval()
    x = torch.randn(2, 1, 6, 96, 96)
    scores, maps = gradient_cams(model, model.conv2d, x)  # [B*T, K, h, w]
    act = model.conv2d(model.features(x.reshape(-1, 3, 96, 96)))
    affine = affine_head_cams(act, model.fc.weight, 1 / 2)
    assert torch.allclose(maps, affine, atol=1e-5)
    exp = Explainer(model, methods=["hirescam"])(x)
    volume = maps.reshape(2, 2, 3, *maps.shape[2:]).transpose(1, 2)  # [B, K, T, h, w]
    assert torch.allclose(volume, exp.raw["hirescam"].float(), atol=1e-5)
    # the loss back-propagates to the backbone through the gradient (double backward)
    allowed = torch.zeros_like(maps)
    allowed_region_loss(maps, allowed, torch.ones(4, 3, dtype=torch.bool)).backward()
    assert model.features[0].weight.grad is not None and model.features[0].weight.grad.abs().sum() > 0


def test_check_allowed_regions_one_line_errors():
    organs = ("body", "right_lung", "heart")
    check_allowed_regions({"a": ["right_lung"], "b": ["heart", "body"]}, ["a", "b"], organs)
    with pytest.raises(InputError, match="no entry for b"):
        check_allowed_regions({"a": ["right_lung"]}, ["a", "b"], organs)
    with pytest.raises(InputError, match="'pleura'"):
        check_allowed_regions({"a": ["pleura"], "b": ["heart"]}, ["a", "b"], organs)


@pytest.mark.parametrize("change", ["unknown_organ", "missing_label"])
def test_train_demo_refuses_bad_allowed_regions_before_training(tmp_path, change):
    cfg = yaml.safe_load((ROOT / "medcam3d" / "configs" / "demo_axialnet.yaml").read_text())
    cfg["weights"] = None
    if change == "unknown_organ":
        cfg["allowed_regions"]["pleural_effusion_left"] = ["pleural_space_left"]
        expect = "pleural_space_left"
    else:
        del cfg["allowed_regions"]["emphysema"]
        expect = "emphysema"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--guided", "--config", str(path),
         "--n-train", "2", "--n-test", "2", "--out", str(tmp_path / "x.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "x.pt").exists()


def test_train_demo_draws_the_same_phantoms_in_worker_processes(monkeypatch):
    """``--workers`` only splits the drawing: the training data (inputs, labels, marker slabs, lesion cells, allowed
    regions) are the same tensors, in the same order, as drawn in one process."""
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "scripts" / "train_demo.py")
    train_demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_demo", train_demo)  # the workers' function is pickled by module name
    spec.loader.exec_module(train_demo)  # a script, not a module of the package
    cfg = load_config("demo_axialnet")
    model = build_model(cfg.model)
    regions = train_demo.guided_regions(cfg, model, tuple(cfg.input_size))
    marker = CleverHans(label="nodule_right_lung", p_with=1.0, p_without=1.0)
    pre = Preprocessor.from_config(cfg)
    one, two = (train_demo.make_set(3, 4_000_000, pre, marker, "test", 0.5, tuple(model.feature_size), regions,
                                    workers=w) for w in (1, 2))
    assert one[0].shape == (3, 1, 60, 128, 128) and one[4] is not None and bool(one[2].any())
    for a, b in zip(one, two):
        assert torch.equal(a, b)
