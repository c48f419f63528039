"""Issue 16: the Ignite handler on MONAI's SupervisedEvaluator."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from test_monai_pipeline import TinyNet

from medcam3d import Explainer

pytest.importorskip("ignite")
from monai.data import DataLoader, MetaTensor, pad_list_data_collate  # noqa: E402
from monai.engines import SupervisedEvaluator  # noqa: E402
from monai.handlers import MeanSquaredError, from_engine  # noqa: E402

from medcam3d.monai import ExplainHandler  # noqa: E402


def _phantoms() -> list[dict]:
    """Three cases of different sizes (the padding collate makes one batch of the first two)."""
    rng = np.random.default_rng(1)
    out = []
    for i, shape in enumerate([(20, 18, 16), (16, 16, 16), (18, 20, 14)]):
        aff = np.diag([1.0 + i, 1.5, 2.0, 1.0])
        img = MetaTensor(torch.from_numpy(rng.normal(0, 1, (1, *shape)).astype(np.float32)), affine=aff,
                         meta={"filename_or_obj": f"/data/phantom_{i}.nii.gz"})
        out.append({"image": img, "label": torch.tensor([1.0, 0.0, 1.0])})
    return out


def _evaluator(model, handler=None):
    loader = DataLoader(_phantoms(), batch_size=2, collate_fn=pad_list_data_collate)
    ev = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=model,
        key_val_metric={"mse": MeanSquaredError(output_transform=from_engine(["pred", "label"]))},
    )
    outputs = []
    ev.add_event_handler(__import__("ignite").engine.Events.ITERATION_COMPLETED,
                         lambda e: outputs.extend([o["pred"].clone() for o in e.state.output]))
    if handler is not None:
        handler.attach(ev)
    ev.run()
    return ev.state.metrics, outputs


def test_evaluator_writes_three_complete_outputs(tmp_path):
    torch.manual_seed(0)
    model = TinyNet().eval()
    handler = ExplainHandler(tmp_path / "maps", classes="all", labels=["a", "b", "c"])
    metrics, outputs = _evaluator(model, handler)
    plain_metrics, plain_outputs = _evaluator(model)
    assert metrics == plain_metrics  # evaluator metrics and outputs untouched
    for a, b in zip(outputs, plain_outputs):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["phantom_0", "phantom_1", "phantom_2"]
    for i, shape in enumerate([(20, 18, 16), (16, 16, 16), (18, 20, 14)]):
        folder = tmp_path / "maps" / f"phantom_{i}"
        rec = json.loads((folder / "scores.json").read_text())
        x = _phantoms()[i]["image"].as_tensor()[None]
        np.testing.assert_allclose(rec["scores"], model(x)[0].detach().numpy(), rtol=1e-5, atol=1e-6)
        assert rec["classes"] == ["a", "b", "c"] and rec["target_layer"] == "a2"
        for m in ("hirescam", "gradcam"):
            img = nib.load(str(folder / f"{m}.nii.gz"))
            assert img.shape[:3] == shape and 3 in img.shape[3:]  # own size, not the padded one; K = 3 channels
            np.testing.assert_allclose(img.affine, np.diag([1.0 + i, 1.5, 2.0, 1.0]), atol=1e-6)


class Flaky(Explainer):
    """Fails on its second call (an exception in one case)."""

    calls = 0

    def __call__(self, x, classes=None, **kw):
        Flaky.calls += 1
        if Flaky.calls == 2:
            raise RuntimeError("boom")
        return super().__call__(x, classes, **kw)


def test_exception_in_one_case_is_logged_and_run_continues(tmp_path, caplog):
    torch.manual_seed(0)
    model = TinyNet().eval()
    handler = ExplainHandler(tmp_path / "maps", explainer=Flaky(model, "a2"), classes="positive", max_cases=3)
    with caplog.at_level(logging.ERROR, logger="medcam3d.monai"):
        _evaluator(model, handler)
    assert handler.failed == ["phantom_1"] and "boom" in caplog.text
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["phantom_0", "phantom_2"]  # nothing partial
    for name in ("phantom_0", "phantom_2"):
        rec = json.loads((tmp_path / "maps" / name / "scores.json").read_text())
        probs = np.asarray(rec["probabilities"])
        assert rec["classes"] == [f"class_{i}" for i in np.argsort(-np.asarray(rec["scores"])) if probs[i] >= 0.5]


def test_max_cases(tmp_path):
    torch.manual_seed(0)
    handler = ExplainHandler(tmp_path / "maps", classes="all", max_cases=2)
    _evaluator(TinyNet().eval(), handler)
    assert len(handler.written) == 2 and handler.seen == 2


def test_readme_handler_snippet(tmp_path, monkeypatch):
    """The README's handler snippet, run on an evaluator over NIfTI files read by the README's preprocessing."""
    from monai.data import Dataset
    from test_monai_pipeline import readme_snippets

    rng = np.random.default_rng(2)
    files = []
    for i, shape in enumerate([(20, 22, 18), (24, 18, 16), (18, 18, 22)]):
        aff = np.diag([1.2, 1.4, 2.0 + i, 1.0])
        nib.save(nib.Nifti1Image(rng.normal(0, 300, shape).astype(np.float32), aff), str(tmp_path / f"s{i}.nii.gz"))
        files.append({"image": str(tmp_path / f"s{i}.nii.gz")})
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([8.0, -8.0, 8.0]))  # classes 0 and 2 positive, class 1 not
    env = {"model": model, "out_dir": str(tmp_path / "unused"), "files": files}
    exec(readme_snippets()[0], env)
    loader = DataLoader(Dataset(files, transform=env["pre"]), batch_size=2, collate_fn=pad_list_data_collate)
    env["evaluator"] = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=model)
    monkeypatch.chdir(tmp_path)
    exec(readme_snippets()[3], env)
    handler_dirs = sorted(p.name for p in (tmp_path / "validation_maps").iterdir())
    assert handler_dirs == ["s0", "s1", "s2"]
    for i in range(3):
        src = nib.load(str(tmp_path / f"s{i}.nii.gz"))
        rec = json.loads((tmp_path / "validation_maps" / f"s{i}" / "scores.json").read_text())
        assert rec["classes"] == ["class_0", "class_2"]
        img = nib.load(str(tmp_path / "validation_maps" / f"s{i}" / "hirescam.nii.gz"))
        assert img.shape[:3] == src.shape and 2 in img.shape[3:]  # the scan's grid, the 2 positive classes
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-4)
