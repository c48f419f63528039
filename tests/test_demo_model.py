"""The embedded demo models: accuracy on fresh phantoms, exactness, the Clever-Hans marker, training, `demo`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medcam3d import Explainer
from medcam3d.cli import main
from medcam3d.config import load_config
from medcam3d.data import LABELS, CleverHans, make_phantom
from medcam3d.evaluate.metrics import auroc
from medcam3d.io import Volume
from medcam3d.models import load_demo
from medcam3d.preprocess import Preprocessor

ROOT = Path(__file__).resolve().parents[1]
FRESH_SEEDS = range(9_000_000, 9_000_064)  # disjoint from the training and held-out seeds in the model card
# The shipped demo model's measured level, guarded against regression. Issue 3's target is a mean AUROC >= 0.90;
# the model trained in 15 CPU minutes reaches 0.845 on its held-out set (see the README), so the target itself is
# not asserted here -- it is reported as not met.
AUROC_FLOOR = 0.80
# Issue 17 dropped the AUROC target for the default demo model: it must be one whose explanations are worth looking
# at, shipped when its mean AUROC is within 0.05 of the plain model trained with the same data, steps and seed (checked
# below on these phantoms). The guided default's card: held-out mean AUROC 0.818 on 120 phantoms (prevalence 0.3),
# per label 0.64-1.00. On these 64 fresh phantoms (prevalence 0.5) it measures 0.782 (per label 0.50-1.00, SD over
# labels 0.15; bootstrap SE of the mean over phantoms 0.015), its plain baseline 0.763. The floor is the card's mean
# less 3 such SEs, 0.818 - 0.045 ~ 0.77: a fall below it is a regression, not the sampling difference between the two
# phantom sets. The test is deterministic (fixed weights, seeded phantoms), so the 0.012 margin only has to absorb
# floating-point differences between machines.
GUIDED_AUROC_FLOOR = 0.77


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    return Preprocessor.from_config(load_config("demo_axialnet"))


def grid_of(ph, pre: Preprocessor) -> torch.Tensor:
    return pre(Volume(ph.hu, ph.affine, f"phantom {ph.seed}")).as_tensor()[None]


def test_model_card_says_synthetic_and_matches_the_config():
    model = load_demo()
    card = model.medcam3d_model_card
    cfg = load_config("demo_axialnet")
    assert card["synthetic_data_only"] is True and "synthetic" in card["warning"].lower()
    assert card["labels"] == list(LABELS) == cfg.labels
    assert card["model"] == cfg.model and card["preprocessing"] == cfg.preprocessing
    assert card["held_out"]["mean_auroc"] >= AUROC_FLOOR
    # the plain recipe's budget was 15 CPU minutes (issue 3); guided training's is 45 (issue 17)
    budget = 45.0 if card["training"].get("allowed_region_loss") else 15.0
    assert card["training"]["minutes_training"] <= budget
    size = (ROOT / "medcam3d" / "weights" / "demo_axialnet.pt").stat().st_size
    assert size <= 10e6
    ch = load_demo("demo_axialnet_cleverhans").medcam3d_model_card
    assert ch["synthetic_data_only"] is True and ch["labels"] == list(LABELS) and ch["model"] == cfg.model
    assert ch["training"]["clever_hans"]["label"] in LABELS and "marker_effect" in ch["held_out"]


def _fresh_auroc(model, xs, y) -> list[float]:
    with torch.inference_mode():
        scores = torch.cat([model(torch.cat(xs[i : i + 8])) for i in range(0, len(xs), 8)]).numpy()
    return [auroc(y[:, k], scores[:, k]) for k in range(len(LABELS))]


def test_demo_model_reaches_its_auroc_on_fresh_phantoms(pre):
    model = load_demo()
    xs, ys = [], []
    for s in FRESH_SEEDS:
        ph = make_phantom(s, prevalence=0.5)
        xs.append(grid_of(ph, pre))
        ys.append(ph.labels)
    y = np.stack(ys)
    aucs = _fresh_auroc(model, xs, y)
    print("fresh-phantom AUROC:", {lab: round(a, 3) for lab, a in zip(LABELS, aucs)})
    if model.medcam3d_model_card["training"].get("allowed_region_loss") is None:
        assert np.nanmean(aucs) >= AUROC_FLOOR
        return
    plain = _fresh_auroc(load_demo("demo_axialnet_plain"), xs, y)
    print("plain baseline:", round(float(np.nanmean(plain)), 4), "guided:", round(float(np.nanmean(aucs)), 4))
    assert np.nanmean(aucs) >= GUIDED_AUROC_FLOOR
    assert np.nanmean(aucs) >= np.nanmean(plain) - 0.05  # issue 17's shipping rule, on these phantoms


def test_hirescam_on_the_demo_axialnet_is_exact(pre):
    model = load_demo()
    x = grid_of(make_phantom(9_100_000, present={"pleural_effusion_left": True}), pre)
    exp = Explainer(model)(x)  # target layer and slices-as-batch layout declared by the model
    cert = exp.certificate
    assert cert.kind == "affine-head" and cert.head == "fx"
    assert exp.raw["hirescam"].shape == (1, len(LABELS), 20, 8, 8)
    resid = cert.completeness_residual.abs()
    assert torch.all(resid <= 1e-5 * exp.scores.abs().double() + 1e-7)


@pytest.mark.parametrize("name", ["demo_axialnet_plain", "demo_axialnet_guided"])
def test_guided_and_plain_models_are_exact_and_documented(pre, name):
    """Guided training changes the weights, not the architecture: HiResCAM still sums to the score minus the FC
    bias (the score at zero activations), and both cards carry the issue-17 numbers."""
    model = load_demo(name)
    card = model.medcam3d_model_card
    assert card["synthetic_data_only"] is True and card["labels"] == list(LABELS)
    assert (card["training"]["allowed_region_loss"] is not None) == (name == "demo_axialnet_guided")
    held = card["explanations_held_out"]
    assert held["max_relative_completeness_residual"] <= 1e-5
    assert 0.0 <= held["hirescam"]["display_mass_share_in_allowed_organs"] <= 1.0
    x = grid_of(make_phantom(9_100_001, present={"nodule_left_lung": True}), pre)
    exp = Explainer(model, methods=["hirescam"])(x)
    total = exp.raw["hirescam"][0].double().flatten(1).sum(1) + model.fc.bias.double()
    assert torch.allclose(total, exp.scores[0].double(), rtol=1e-5, atol=1e-5)


def _block_fraction(mask: np.ndarray, map_shape: tuple[int, ...]) -> np.ndarray:
    """Fraction of each feature-resolution block covered by a network-grid mask."""
    t = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    return F.adaptive_avg_pool3d(t, map_shape)[0, 0].numpy()


def _near(blocks: np.ndarray, cells: int) -> np.ndarray:
    """``blocks`` ([T, h, w] bool) grown by ``cells`` feature cells in-plane (same slabs); ``cells=0`` is itself."""
    t = torch.as_tensor(blocks, dtype=torch.float32)[:, None]
    k = 2 * cells + 1
    return (F.max_pool2d(t, k, stride=1, padding=cells)[:, 0] > 0).numpy()


def test_clever_hans_marker_carries_the_hirescam_evidence(pre):
    """The marker-trained model uses the marker, and HiResCAM puts most of its positive contribution there.

    On six scans with the marker but not the finding: removing the marker drops the label's raw score by more than 2
    (the model uses it). Where is the positive contribution? On the marker's own blocks (the feature cells its
    voxels fall in under the whole-field block mapping) HiResCAM has 12 % of it, 50x chance -- but the explained layer
    follows four 3x3 convolutions, and the block mapping is known to be off by up to about two cells near the edge of
    the field of view (README, "Known limitations"), so the marker's cell is only known to within two cells. Within
    two cells in-plane of its blocks (same slabs; 2.4 % of the map) HiResCAM puts most of its positive contribution,
    Grad-CAM less than half (measured 0.73 vs 0.46; one cell: 0.49 vs 0.31)."""
    model = load_demo("demo_axialnet_cleverhans")
    k = LABELS.index(model.medcam3d_model_card["training"]["clever_hans"]["label"])
    explainer = Explainer(model, methods=("hirescam", "gradcam"))
    shares: dict[str, list[float]] = {}
    for s in range(9_200_000, 9_200_006):
        ph = make_phantom(s, prevalence=0.0, clever_hans=CleverHans(LABELS[k], p_with=1.0, p_without=1.0))
        assert ph.marker_mask is not None and ph.labels[k] == 0  # the marker without the finding
        grid = pre(Volume(ph.hu, ph.affine, "p"))
        marker = pre.preprocess_labels(Volume(ph.marker_mask.astype(np.float32), ph.affine, "m"), like=grid)
        exp = explainer(grid.as_tensor()[None], classes=[k])
        bare = make_phantom(s, prevalence=0.0, exclude=("marker",),
                            clever_hans=CleverHans(LABELS[k], p_with=1.0, p_without=1.0))
        with torch.inference_mode():
            shares.setdefault("drop", []).append(float(exp.scores[0, k] - model(grid_of(bare, pre))[0, k]))
        blocks = _block_fraction(np.asarray(marker[0]) > 0.5, exp.map_size) > 0  # blocks that hold the marker
        for cells in (0, 2):
            near = _near(blocks, cells)
            shares.setdefault(f"chance{cells}", []).append(float(near.mean()))
            for m in ("hirescam", "gradcam"):
                pos = torch.relu(exp.raw[m][0, 0]).numpy()
                shares.setdefault(f"{m}{cells}", []).append(float(pos[near].sum() / max(pos.sum(), 1e-12)))
    mean = {m: float(np.mean(v)) for m, v in shares.items()}
    print(f"share of positive contribution on / within 2 cells of the marker's blocks for {LABELS[k]}: {mean}")
    assert mean["drop"] > 2.0  # the model uses the marker
    assert mean["hirescam0"] > 20 * mean["chance0"] and mean["hirescam0"] > mean["gradcam0"]
    assert mean["chance2"] < 0.05
    assert mean["hirescam2"] > 0.5  # most of HiResCAM's positive contribution is at the marker
    assert mean["gradcam2"] < mean["hirescam2"] - 0.1  # Grad-CAM puts clearly less there


def test_clever_hans_guided_model_is_documented_and_exact(pre):
    """The marker recipe fine-tuned with the allowed-region loss (issue 17): its card states the loss, the planted
    marker, the budget and the held-out marker effect next to its same-budget control; the loss changed the weights,
    not the architecture, so HiResCAM still sums to the score minus the FC bias."""
    model = load_demo("demo_axialnet_cleverhans_guided")
    card = model.medcam3d_model_card
    cfg = load_config("demo_axialnet")
    assert card["synthetic_data_only"] is True and card["labels"] == list(LABELS) and card["model"] == cfg.model
    training = card["training"]
    assert training["allowed_region_loss"]["lambda"] > 0 and training["clever_hans"]["label"] == "nodule_right_lung"
    assert training["minutes_training"] <= 45.0  # issue 17's training budget
    for held in (card["held_out"], training["same_budget_control"]["held_out"]):
        assert 0.0 <= held["marker_effect"]["auroc_marker_as_target"] <= 1.0 and 0.0 <= held["mean_auroc"] <= 1.0
    ph = make_phantom(9_100_002, prevalence=0.3, clever_hans=CleverHans("nodule_right_lung", p_with=1.0, p_without=1.0))
    exp = Explainer(model, methods=["hirescam"])(grid_of(ph, pre))
    assert exp.certificate.kind == "affine-head"
    total = exp.raw["hirescam"][0].double().flatten(1).sum(1) + model.fc.bias.double()
    assert torch.allclose(total, exp.scores[0].double(), rtol=1e-5, atol=1e-5)


def test_training_smoke(tmp_path):
    out = tmp_path / "tiny.pt"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--n-train", "4", "--n-test", "4",
         "--slab-steps", "2", "--slab-batch", "4", "--volume-steps", "1", "--batch", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["synthetic_data_only"] and card["training"]["n_train"] == 4
    assert card["training"]["slab_phase"]["steps"] == 2 and card["training"]["volume_phase"]["steps"] == 1
    sd = torch.load(out, weights_only=True)
    assert "conv2d.6.weight" in sd and "fc.weight" in sd


def test_medcam3d_demo_command(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    exp_dir = tmp_path / "demo" / "explanation"
    summary = json.loads((exp_dir / "summary.json").read_text())
    assert summary["model"]["synthetic_data_only"] is True
    assert summary["demo"]["planted"] == ["cardiomegaly", "nodule_right_lung", "pleural_effusion_left"]
    assert list(exp_dir.glob("montage_*.png")) and (tmp_path / "demo" / "scan" / "phantom.nii.gz").is_file()
    main(["demo", "--out", str(tmp_path / "demo2")])
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and "medcam3d view" in printed
