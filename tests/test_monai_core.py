"""Issue 16, core: forward keyword arguments, MONAI-style checkpoints, ``target_layer="auto"``."""

from __future__ import annotations

import pytest
import torch
from core_nets import ConvFC, ConvGAP
from torch import nn

from medcam3d import Explainer
from medcam3d.autolayer import spatial_candidates
from medcam3d.errors import InputError
from medcam3d.layouts import resolve_layout
from medcam3d.models import AxialNet, load_checkpoint, read_state_dict
from medcam3d.outputs import ModelRecord

nets = pytest.importorskip("monai.networks.nets")


# --- item 7: forward keyword arguments ---------------------------------------------------------------------------
class Covariate(nn.Module):
    """conv -> ReLU -> GAP -> Linear, plus ``w * age`` (a clinical covariate) added to every score."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x: torch.Tensor, age: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return scale * self.fc(self.act(self.conv(x)).flatten(2).mean(2)) + age[:, None] * self.w


class Bound(nn.Module):
    """The same model with the covariates bound (an independent way to run it on the image alone)."""

    def __init__(self, inner: Covariate, age: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.inner, self.age, self.scale = inner, age, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, self.age, self.scale)


class Adjoint(ConvGAP):
    """MONAI's Grad-CAM test model shape: ``model(x, adjoint_info=42)`` refuses any other value."""

    def forward(self, x, adjoint_info=None):  # noqa: D102
        if adjoint_info != 42:
            raise ValueError("adjoint_info must be 42")
        return super().forward(x)


@pytest.mark.parametrize("head", ["auto", "rerun"])
def test_forward_kwargs_reach_every_forward(head):
    torch.manual_seed(0)
    model, x, age = Covariate(), torch.randn(2, 1, 6, 6, 6), torch.tensor([60.0, 45.0])
    got = Explainer(model, "act", head=head)(x, age=age, scale=2.0)
    want = Explainer(Bound(model, age, 2.0), "inner.act", head=head)(x)
    torch.testing.assert_close(got.scores, want.scores)
    torch.testing.assert_close(got.scores, model(x, age, 2.0))
    for m in got.methods:
        torch.testing.assert_close(got.raw[m], want.raw[m])
    # the covariate is a constant of the head: HiResCAM still sums to s - s(0) (exact, GAP + linear)
    assert got.certificate.kind == "cam"
    torch.testing.assert_close(got.raw["hirescam"].flatten(2).sum(2),
                               got.scores - got.certificate.baseline.to(got.scores), atol=1e-4, rtol=1e-4)


def test_forward_kwarg_non_tensor_and_auto_layer():
    torch.manual_seed(0)
    model, x = Adjoint(), torch.randn(1, 1, 5, 5, 5)
    with pytest.raises(ValueError):
        model(x)
    exp = Explainer(model)(x, adjoint_info=42)  # target_layer="auto" also passes the argument
    assert exp.layer is not None and exp.layer.name == "act" and exp.certificate.kind == "cam"
    torch.testing.assert_close(exp.scores, model(x, adjoint_info=42))


# --- item 6: checkpoints as MONAI users save them ------------------------------------------------------------------
@pytest.mark.parametrize("key", ["net", "network"])
def test_checkpoint_under_net_or_network(tmp_path, key):
    torch.manual_seed(0)
    src, dst = ConvFC(), ConvFC()
    path = tmp_path / "ckpt.pt"
    torch.save({key: src.state_dict(), "opt": {"lr": 0.1, "step": 3}}, path)
    load_checkpoint(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_torchscript_model_ts(tmp_path):
    torch.manual_seed(0)
    src = ConvFC().eval()
    path = tmp_path / "model.ts"
    torch.jit.script(src).save(str(path))
    state = read_state_dict(path)
    assert set(state) == set(src.state_dict())
    dst = load_checkpoint(ConvFC(), path).eval()
    x = torch.randn(2, 2, 4, 4, 4)
    torch.testing.assert_close(dst(x), src(x))


def test_unknown_keys_still_named(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"weights_of_net": ConvFC().state_dict(), "opt": {}}, path)
    with pytest.raises(InputError, match="weights_of_net"):
        load_checkpoint(ConvFC(), path)


# --- item 4: target_layer="auto" -----------------------------------------------------------------------------------
def _auto(model: nn.Module, x: torch.Tensor):
    torch.manual_seed(0)
    exp = Explainer(model, methods=("hirescam",))(x)
    assert exp.layer is not None
    return exp


def test_auto_on_known_heads():
    """Hand-known answers: GAP + linear after ``act`` is a cam head; FC after ``act`` is affine."""
    torch.manual_seed(0)
    gap = _auto(ConvGAP(), torch.randn(1, 1, 5, 5, 5))
    assert gap.layer.name == "act" and "cam" in gap.layer.reason and gap.certificate.kind == "cam"
    fc = _auto(ConvFC(size=4), torch.randn(1, 2, 4, 4, 4))
    assert fc.layer.name == "act" and fc.certificate.kind == "affine-head"
    assert dict(fc.layer.candidates)["act"] == "affine-head"


def test_explicit_name_wins_and_declared_reason():
    torch.manual_seed(0)
    model, x = ConvGAP(), torch.randn(1, 1, 5, 5, 5)
    e = Explainer(model, "conv")
    assert e.layer_name == "conv" and e.layer_choice.reason == "given"
    assert e(x).layer.name == "conv"
    model.medcam3d_target_layer = "conv"
    assert Explainer(model).layer_choice.reason.startswith("declared")


def test_candidates_exclude_final_conv_of_a_segmentation_net():
    """A dense-output net: the layer feeding the final output convolution, not that convolution."""
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    names = spatial_candidates(net, torch.randn(1, 1, 6, 6, 6), resolve_layout(None))
    assert names == ["0", "1"]


def test_summary_model_record_has_reason():
    rec = ModelRecord(target_layer="class_layers.relu", target_layer_reason="auto: ...")
    assert rec.target_layer_reason == "auto: ..."
    assert ModelRecord().target_layer_reason is None  # an older summary without the field still reads


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "build", "size", "layer", "kind"),
    [
        ("DenseNet121", lambda: nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=3), 64,
         "class_layers.relu", "cam"),
        ("resnet18", lambda: nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=3), 64, "layer4.1", "cam"),
        ("resnet50", lambda: nets.resnet50(spatial_dims=3, n_input_channels=1, num_classes=3), 64, "layer4.2", "cam"),
        ("SEResNet50", lambda: nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=3), 64, "layer4.2.act",
         "cam"),
        ("EfficientNetBN", lambda: nets.EfficientNetBN("efficientnet-b0", spatial_dims=3, in_channels=1,
                                                      num_classes=3, pretrained=False), 64, "_bn1", "cam"),
        ("Classifier", lambda: nets.Classifier(in_shape=(1, 16, 16, 16), classes=3, channels=(4, 8),
                                                strides=(2, 2)), 16, None, "affine-head"),
    ],
)
def test_auto_on_monai_nets(name, build, size, layer, kind):
    """The strongest certificate among the last spatial layers; the full certificate of the explanation agrees."""
    torch.manual_seed(0)
    exp = _auto(build(), torch.randn(1, 1, size, size, size))
    assert exp.certificate.kind == kind, exp.layer.reason
    if layer is not None:
        assert exp.layer.name == layer, exp.layer.reason
    assert dict(exp.layer.candidates)[exp.layer.name] == kind


def test_auto_on_axialnet():
    """AxialNet's slices ride in the batch axis (its layout): the per-slice FC after ``conv2d.7`` is affine."""
    torch.manual_seed(0)
    model = AxialNet(n_outputs=3, width=8, feature_stride=8, in_plane=(96, 96)).eval()
    exp = Explainer(model, target_layer="auto", methods=("hirescam",))(torch.randn(1, 1, 6, 96, 96))
    assert exp.layer.name == "conv2d.7" and exp.certificate.kind == "affine-head", exp.layer.reason
