"""The demo segmentation model (issue 19, part 4): it loads from its config, segments masses and effusions on fresh
phantoms, and its declared layer feeds only the 1x1x1 output convolution (exact HiResCAM per region)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medcam3d import Explainer
from medcam3d.config import load_config
from medcam3d.data import make_phantom
from medcam3d.errors import InputError
from medcam3d.io import Volume
from medcam3d.models import load_demo
from medcam3d.models.segnet import SEG_DEMO_LABELS, SegNet3d
from medcam3d.preprocess import Preprocessor

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "demo_segnet"
# training seeds start at 21_000_000 and the card's held-out ones at 21_500_000 (scripts/train_seg_demo.py, seed 1)
FRESH_SEEDS = range(29_000_000, 29_000_004)
# each fresh phantom shows a mass and a pleural effusion, on alternating sides
FRESH_PRESENT = [
    {"mass_right_lung": True, "pleural_effusion_left": True},
    {"mass_left_lung": True, "pleural_effusion_right": True},
    {"mass_right_lung": True, "pleural_effusion_right": True},
    {"mass_left_lung": True, "pleural_effusion_left": True},
]
# Floors for the mean Dice over these 4 fresh phantoms. The card's held-out set (60 phantoms, 43 with a mass, 49 with
# an effusion) measured per-phantom Dice mean 0.93 (median 0.98, worst 0.31) for masses and mean 0.89 (worst 0.77)
# for pleural effusions. A 4-phantom mean scatters with about half the per-phantom spread (roughly 0.07 for masses,
# 0.03 for effusions), so 0.70 sits more than 3 of those below each card mean -- and below the worst single held-out
# effusion -- while staying above the target of 0.5. Falling under it means the model regressed.
DICE_FLOOR = {"mass": 0.70, "pleural_effusion": 0.70}
# the phantom label prefixes of each lesion type (left and right merged), written out independently of the script
TYPE_OF_LABEL = {
    "mass": ("mass_right_lung", "mass_left_lung"),
    "pleural_effusion": ("pleural_effusion_right", "pleural_effusion_left"),
}


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG)


@pytest.fixture(scope="module")
def model(cfg) -> nn.Module:
    return cfg.build_model().eval()


@pytest.fixture(scope="module")
def fresh(cfg):
    """The fresh phantoms as network inputs ``[1, 1, 60, 128, 128]`` and their phantoms."""
    pre = Preprocessor.from_config(cfg)
    out = []
    for seed, present in zip(FRESH_SEEDS, FRESH_PRESENT):
        ph = make_phantom(seed, prevalence=0.3, present=present)
        out.append((pre(Volume(ph.hu, ph.affine, f"phantom {seed}")).as_tensor()[None], ph))
    return out


def test_config_card_and_model_agree(cfg, model):
    demo = load_demo(CONFIG)  # the card's spec with the shipped weights
    card = demo.medcam3d_model_card
    assert card["synthetic_data_only"] is True and "synthetic" in card["warning"].lower()
    assert cfg.labels == card["labels"] == list(SEG_DEMO_LABELS) == model.medcam3d_labels == demo.medcam3d_labels
    assert cfg.labels[0] == "background" and cfg.probability == "softmax"
    assert card["model"] == cfg.model and card["preprocessing"] == cfg.preprocessing
    # the same grid and preprocessing as the demo AxialNet, so the same phantoms and scans can be used
    axial = load_config("demo_axialnet")
    assert cfg.preprocessing == axial.preprocessing and cfg.input_size == axial.input_size == (60, 128, 128)
    assert isinstance(model, SegNet3d) and model.medcam3d_task == "segmentation" == card["task"]
    assert cfg.target_layer == model.medcam3d_target_layer == card["target_layer"] == "decoder_out"
    for name, p in model.state_dict().items():
        assert torch.equal(p, demo.state_dict()[name]), name
    size = (ROOT / "medcam3d" / "weights" / "demo_segnet.pt").stat().st_size
    assert size <= 10e6 and card["size_bytes"] == size
    assert card["training"]["cpu_minutes_training"] <= 20.0  # the budget
    held = card["held_out"]
    assert held["n"] >= 30 and min(held["dice"][c]["n_phantoms"] for c in DICE_FLOOR) >= 30
    assert held["seeds"][0] > card["training"]["train_seeds"][1]  # disjoint seed ranges


def test_output_is_one_logit_per_label_on_the_input_grid(model, fresh):
    x, _ = fresh[0]
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (1, len(SEG_DEMO_LABELS), 60, 128, 128) and y.dtype == torch.float32


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))


def test_masses_and_effusions_are_segmented_on_fresh_phantoms(model, fresh):
    dice: dict[str, list[float]] = {c: [] for c in DICE_FLOOR}
    for x, ph in fresh:
        with torch.inference_mode():
            pred = model(x).argmax(1)[0].numpy()
        for cls, labels in TYPE_OF_LABEL.items():
            truth = np.zeros(ph.hu.shape, bool)
            for label in labels:
                truth |= ph.lesion_masks.get(label, truth)
            assert truth.any()
            dice[cls].append(_dice(pred == SEG_DEMO_LABELS.index(cls), truth))
    print("fresh-phantom Dice:", {c: [round(d, 3) for d in v] for c, v in dice.items()})
    for cls, floor in DICE_FLOOR.items():
        assert np.mean(dice[cls]) >= floor, (cls, dice[cls])


class _LayerAsLeaf(torch.fx.Tracer):
    """Traces the model with one submodule kept whole (a single node)."""

    def __init__(self, leaf: nn.Module) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is self.leaf or super().is_leaf_module(m, module_qualified_name)


def test_the_declared_layer_feeds_only_the_output_convolution(model):
    layer_name = model.medcam3d_target_layer
    graph = _LayerAsLeaf(model.get_submodule(layer_name)).trace(model)
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    layer, out = nodes[layer_name], nodes["out"]
    assert list(layer.users) == [out] and [u.op for u in out.users] == ["output"]
    assert isinstance(model.out, nn.Conv3d) and model.out.kernel_size == (1, 1, 1)


def test_hirescam_at_the_declared_layer_is_exact_for_region_sums(model, fresh):
    """Score of class c summed over its predicted region R_c (held fixed) = sum_{v in R_c} (W_c . A_v + b_c):
    HiResCAM at ``decoder_out`` sums to it minus |R_c| b_c, and the certificate says "affine-head" (the gradient
    is W_c inside R_c and 0 outside, so not constant over space: not "cam"). Masses and effusions only (speed)."""
    x, _ = fresh[0]
    channels = [SEG_DEMO_LABELS.index(c) for c in ("mass", "pleural_effusion")]
    with torch.inference_mode():
        pred = model(x).argmax(1)  # [1, S, H, W]
    regions = torch.stack([pred == c for c in channels], 1).float()  # [1, 2, S, H, W]
    sizes = regions[0].flatten(1).sum(1).double()
    assert sizes.min() > 100
    explainer = Explainer(model, output=lambda y: (y[:, channels] * regions).flatten(2).sum(2),
                          labels=["mass", "pleural_effusion"], methods=["hirescam"])
    exp = explainer(x)
    assert exp.certificate.kind == "affine-head"
    raw = exp.raw["hirescam"][0].double()  # [2, S, H, W]
    assert raw.shape == (2, 60, 128, 128)
    expected = exp.scores[0].double() - sizes * model.out.bias[channels].double()
    # float32 sums over thousands of voxels: measured residuals about 1e-7 of the score
    assert torch.allclose(raw.flatten(1).sum(1), expected, rtol=1e-6, atol=1e-3)
    assert (raw * (1 - regions[0].double())).abs().max() == 0  # no gradient outside the region


def test_bad_input_is_one_line():
    net = SegNet3d()
    with pytest.raises(InputError, match="multiple of"):
        net(torch.zeros(1, 1, 60, 100, 128))
    with pytest.raises(InputError, match="labels"):
        SegNet3d(labels=["background"])


def test_training_script_refuses_an_unknown_lesion_type(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("train_seg_demo", ROOT / "scripts" / "train_seg_demo.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_seg_demo", script)  # its dataclass looks itself up there
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["train_seg_demo.py", "--classes", "mass,tumour", "--out", "/nonexistent/x.pt"])
    with pytest.raises(SystemExit) as stop:
        script.main()  # refuses before drawing a phantom or writing anything
    message = str(stop.value.code)
    assert len(message.splitlines()) == 1 and "'tumour'" in message and "pleural_effusion" in message
