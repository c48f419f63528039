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
    assert card["training"]["minutes_data"] + card["training"]["minutes_training"] <= 15.0
    size = (ROOT / "medcam3d" / "weights" / "demo_axialnet.pt").stat().st_size
    assert size <= 10e6
    ch = load_demo("demo_axialnet_cleverhans").medcam3d_model_card
    assert ch["synthetic_data_only"] is True and ch["labels"] == list(LABELS) and ch["model"] == cfg.model
    assert ch["training"]["clever_hans"]["label"] in LABELS and "marker_effect" in ch["held_out"]


def test_demo_model_reaches_its_auroc_on_fresh_phantoms(pre):
    model = load_demo()
    xs, ys = [], []
    for s in FRESH_SEEDS:
        ph = make_phantom(s, prevalence=0.5)
        xs.append(grid_of(ph, pre))
        ys.append(ph.labels)
    with torch.inference_mode():
        scores = torch.cat([model(torch.cat(xs[i : i + 8])) for i in range(0, len(xs), 8)]).numpy()
    y = np.stack(ys)
    aucs = [auroc(y[:, k], scores[:, k]) for k in range(len(LABELS))]
    print("fresh-phantom AUROC:", {lab: round(a, 3) for lab, a in zip(LABELS, aucs)})
    assert np.nanmean(aucs) >= AUROC_FLOOR


def test_hirescam_on_the_demo_axialnet_is_exact(pre):
    model = load_demo()
    x = grid_of(make_phantom(9_100_000, present={"pleural_effusion_left": True}), pre)
    exp = Explainer(model)(x)  # target layer and slices-as-batch layout declared by the model
    cert = exp.certificate
    assert cert.kind == "affine-head" and cert.head == "fx"
    assert exp.raw["hirescam"].shape == (1, len(LABELS), 20, 8, 8)
    resid = cert.completeness_residual.abs()
    assert torch.all(resid <= 1e-5 * exp.scores.abs().double() + 1e-7)


def _block_fraction(mask: np.ndarray, map_shape: tuple[int, ...]) -> np.ndarray:
    """Fraction of each feature-resolution block covered by a network-grid mask."""
    t = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    return F.adaptive_avg_pool3d(t, map_shape)[0, 0].numpy()


def test_clever_hans_marker_carries_the_hirescam_evidence(pre):
    """The marker-trained model uses the marker, and HiResCAM finds it: on scans with the marker but not the
    finding, removing the marker drops the label's raw score by more than 2, and HiResCAM's share of positive
    contribution on the marker's blocks is over 20x chance and above Grad-CAM's. (The issue asked for "most of the
    positive contribution": measured 0.12 -- the rest is spread thinly over the volume -- so that is not claimed.)"""
    model = load_demo("demo_axialnet_cleverhans")
    k = LABELS.index(model.medcam3d_model_card["training"]["clever_hans"]["label"])
    explainer = Explainer(model, methods=("hirescam", "gradcam"))
    shares = {"hirescam": [], "gradcam": [], "chance": [], "drop": []}
    for s in range(9_200_000, 9_200_006):
        ph = make_phantom(s, prevalence=0.0, clever_hans=CleverHans(LABELS[k], p_with=1.0, p_without=1.0))
        assert ph.marker_mask is not None and ph.labels[k] == 0  # the marker without the finding
        grid = pre(Volume(ph.hu, ph.affine, "p"))
        marker = pre.preprocess_labels(Volume(ph.marker_mask.astype(np.float32), ph.affine, "m"), like=grid)
        exp = explainer(grid.as_tensor()[None], classes=[k])
        bare = make_phantom(s, prevalence=0.0, exclude=("marker",),
                            clever_hans=CleverHans(LABELS[k], p_with=1.0, p_without=1.0))
        with torch.inference_mode():
            shares["drop"].append(float(exp.scores[0, k] - model(grid_of(bare, pre))[0, k]))
        near = _block_fraction(np.asarray(marker[0]) > 0.5, exp.map_size) > 0  # blocks that hold the marker
        shares["chance"].append(near.mean())
        for m in ("hirescam", "gradcam"):
            pos = torch.relu(exp.raw[m][0, 0]).numpy()
            shares[m].append(pos[near].sum() / max(pos.sum(), 1e-12))
    mean = {m: float(np.mean(v)) for m, v in shares.items()}
    print(f"share of positive contribution on the marker's blocks for {LABELS[k]}: {mean}")
    assert mean["drop"] > 2.0  # the model uses the marker
    assert mean["hirescam"] > 20 * mean["chance"] and mean["hirescam"] > mean["gradcam"]


def test_training_smoke(tmp_path):
    out = tmp_path / "tiny.pt"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--n-train", "4", "--n-test", "4", "--slab-steps", "2",
         "--slab-batch", "4", "--volume-steps", "1", "--batch", "2", "--out", str(out)],
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
