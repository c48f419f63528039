"""Segmentation networks: MONAI UNet, SegResNet and DynUNet explained per region, the automatic layer (the one
feeding the output convolution), the placement through upsampling, transposed convolutions and skip
concatenations, and skip tensors held constant in the head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks import nets
from scipy import ndimage
from torch import nn

from medcam3d import Explainer
from medcam3d.autolayer import spatial_candidates
from medcam3d.layouts import resolve_layout
from medcam3d.targets import SegmentationRegions

SIZE = 32


def _snapshot(model: nn.Module):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [b.clone() for b in model.buffers()],
    )


def _assert_as_found(model: nn.Module, snap) -> None:
    training, req, bufs = snap
    assert [m.training for m in model.modules()] == training
    assert [p.requires_grad for p in model.parameters()] == req
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), bufs))
    assert all(p.grad is None for p in model.parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()) == 0


def _unet(res_units: int = 0) -> nn.Module:
    return nets.UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=res_units)


def _segresnet() -> nn.Module:
    return nets.SegResNet(3, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 1), blocks_up=(1,))


def _dynunet() -> nn.Module:
    return nets.DynUNet(3, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                        filters=[4, 8, 16])


# (name, build, the module whose output feeds the output convolution, that convolution, certificate kind)
NETS = [
    ("UNet", lambda: _unet(0), "model.1", "model.2.conv", "affine-head"),  # a transposed conv after the skip cat
    ("UNet-res", lambda: _unet(1), "model.1", "model.2.0.conv", "none"),  # + norm, PReLU, residual unit
    ("SegResNet", _segresnet, "act_mod", "conv_final.2", "affine-head"),  # norm, act, 1x1x1 conv
    ("DynUNet", _dynunet, "skip_layers", "output_block.conv.conv", "affine-head"),  # 1x1x1 conv
]


def _input(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, SIZE, SIZE, SIZE, generator=g)


def _feeding(model: nn.Module, conv: str, x: torch.Tensor) -> torch.Tensor:
    """The tensor the output convolution receives (a pre-hook: independent of medcam3d)."""
    got = {}
    handle = model.get_submodule(conv).register_forward_pre_hook(lambda m, i: got.setdefault("x", i[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return got["x"]


@pytest.mark.parametrize(("name", "build", "layer", "conv", "kind"), NETS, ids=[n[0] for n in NETS])
def test_candidates_end_at_the_layer_feeding_the_output_convolution(name, build, layer, conv, kind):
    torch.manual_seed(0)
    model, x = build().eval(), _input()
    names = spatial_candidates(model, x, resolve_layout(None))
    assert names[-1] == layer and len(names) == 3
    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.setdefault("y", o))
    try:
        fed = _feeding(model, conv, x)
    finally:
        handle.remove()
    torch.testing.assert_close(captured["y"], fed, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "build", "layer", "conv", "kind"), NETS, ids=[n[0] for n in NETS])
def test_monai_segmentation_nets_explained(name, build, layer, conv, kind):
    """All components of the predicted class 1, target layer "auto": the layer feeding the output convolution,
    maps on the input grid, the certificate kind stated, the model left as found (it was in training mode)."""
    torch.manual_seed(0)
    model, x = build(), _input()
    model.train()
    snap = _snapshot(model)
    exp = Explainer(model, targets=SegmentationRegions(1, "components", max_targets=3))(x)
    _assert_as_found(model, snap)
    assert exp.layer.name == layer, exp.layer.reason
    assert exp.certificate.kind == kind
    t = len(exp.targets)
    assert t >= 1 and all(i.region == "component" and i.cls == 1 for i in exp.targets)
    for method in ("hirescam", "gradcam"):
        hm = exp.heatmap(method)
        assert hm.shape == (1, t, SIZE, SIZE, SIZE)
        assert bool(torch.isfinite(hm).all()) and float(hm.max()) <= 1.0
    # the regions by hand: argmax == 1 on the model's own (eval) output, 26-connected, largest first
    with torch.no_grad():
        predicted = (model.eval()(x).argmax(1)[0] == 1).numpy()
    model.train()
    lab, n = ndimage.label(predicted, structure=np.ones((3, 3, 3)))
    sizes = sorted(np.bincount(lab.ravel())[1:].tolist(), reverse=True)[:3]
    assert [i.voxels for i in exp.targets] == sizes
    if kind == "affine-head":  # exact per target: completeness residual within the tolerance
        assert float(exp.certificate.relative_residual.abs().max()) <= exp.certificate.tolerance


@pytest.mark.slow
def test_unet_hirescam_exact_against_zero_activations():
    """MONAI UNet without residual units, explained at ``model.1`` (the skip concatenation): the head is one
    transposed convolution, so Σ HiResCAM = s(A) − s(0), with s(0) computed here by replacing the layer's output
    by zeros (a forward hook) and summing class 1's logits over the predicted region by hand."""
    torch.manual_seed(0)
    model, x = _unet(0).eval(), _input(1)
    with torch.no_grad():
        y = model(x)
        region = y.argmax(1)[0] == 1
        handle = model.get_submodule("model.1").register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        try:
            y0 = model(x)
        finally:
            handle.remove()
    s, s0 = y[0, 1][region].double().sum(), y0[0, 1][region].double().sum()
    exp = Explainer(model, "model.1", targets=SegmentationRegions(1))(x)
    assert exp.scores[0, 0].item() == pytest.approx(float(s), rel=1e-5)
    total = exp.raw["hirescam"][0, 0].double().sum()
    assert float(total) == pytest.approx(float(s - s0), rel=1e-4)
    assert exp.certificate.kind == "affine-head"


# --- skip connections: the head takes the skip tensors as constants ------------------------------------------------
class SkipUNet(nn.Module):
    """enc (full res) -> down (stride 2) -> ``mid`` (explained bottleneck) -> transposed conv up -> cat with the
    encoder's skip tensor -> conv -> ReLU -> 1x1x1 conv (3 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv3d(1, 4, 3, padding=1)
        self.down = nn.Conv3d(4, 6, 3, stride=2, padding=1)
        self.mid = nn.ReLU()
        self.up = nn.ConvTranspose3d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.dec = nn.Conv3d(8, 4, 3, padding=1)
        self.out = nn.Conv3d(4, 3, 1)

    def encode(self, x):
        e = torch.relu(self.enc(x))
        return e, self.mid(self.down(e))

    def decode(self, e, m):
        return self.out(torch.relu(self.dec(torch.cat([self.up(m), e], dim=1))))

    def forward(self, x):
        e, m = self.encode(x)
        return self.decode(e, m)


@pytest.mark.parametrize("head", ["fx", "rerun"])
def test_skip_tensors_are_constants_of_the_head(head):
    """Gradients flow only through the explained layer: ∂s/∂A equals torch.autograd's on a copy of the model whose
    skip tensor is a detached constant, and HiResCAM = Σ_f ∂s/∂A ⊙ A."""
    torch.manual_seed(0)
    model, x = SkipUNet().eval(), torch.randn(1, 1, 8, 8, 8)
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[2:6, 1:5, 3:7] = True
    exp = Explainer(model, "mid", targets=SegmentationRegions(2, mask), keep_gradients=True, head=head)(x)
    with torch.no_grad():
        e, m = model.encode(x)
    a = m.clone().requires_grad_(True)
    score = model.decode(e.detach(), a)[0, 2][mask].sum()
    (g,) = torch.autograd.grad(score, a)
    torch.testing.assert_close(exp.gradients[:, 0], g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exp.raw["hirescam"][:, 0], (g * m).sum(1), rtol=1e-5, atol=1e-6)
    assert exp.scores[0, 0].item() == pytest.approx(float(score.detach()), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
    assert exp.certificate.kind == "none"  # ReLU after the decoder convolution


def test_skip_path_perturbation_changes_nothing_upstream():
    """Changing the encoder weights after the call leaves the maps as computed (no graph kept into the skip path),
    and explaining again with the original weights gives the same maps."""
    torch.manual_seed(0)
    model, x = SkipUNet().eval(), torch.randn(1, 1, 8, 8, 8)
    targets = SegmentationRegions(1, ((0, 0, 0), (4, 4, 4)))
    first = Explainer(model, "mid", targets=targets)(x)
    kept = first.raw["hirescam"].clone()
    with torch.no_grad():
        model.enc.weight.mul_(-1.0)
    torch.testing.assert_close(first.raw["hirescam"], kept, rtol=0, atol=0)
    with torch.no_grad():
        model.enc.weight.mul_(-1.0)
    again = Explainer(model, "mid", targets=targets)(x)
    torch.testing.assert_close(again.raw["hirescam"], kept, rtol=0, atol=0)


# --- placement through upsampling, transposed convolutions and skip concatenations ---------------------------------
class UpNet(nn.Module):
    """stride-2 conv (cells at 2i) -> ``up`` -> cat with the full-resolution input features -> ``fuse`` -> 1x1x1."""

    def __init__(self, up: nn.Module, skip: bool = True) -> None:
        super().__init__()
        self.enc = nn.Conv3d(1, 2, 3, padding=1)
        self.down = nn.Conv3d(2, 4, 3, stride=2, padding=1)
        self.up = up
        self.skip = skip
        self.fuse = nn.ReLU()
        self.out = nn.Conv3d(4 + (2 if skip else 0), 2, 1)

    def forward(self, x):
        e = self.enc(x)
        u = self.up(self.down(e))
        return self.out(self.fuse(torch.cat([u, e], dim=1) if self.skip else u))


def _placement(up: nn.Module, skip: bool, layer: str = "fuse"):
    torch.manual_seed(0)
    exp = Explainer(UpNet(up, skip), layer, targets=SegmentationRegions(1, ((0, 0, 0), (8, 8, 8))))(
        torch.randn(1, 1, 8, 8, 8))
    return exp.placement


def test_placement_transposed_conv_and_skip_concat_derived():
    """Transposed conv k3 s2 p1 op1 on cells at 2i: output j sits at (j + 1 − 1)/2 · 2 = j, the skip's place: the
    concatenation is placed, offset 0 and stride 1 on the input grid."""
    p = _placement(nn.ConvTranspose3d(4, 4, 3, stride=2, padding=1, output_padding=1), skip=True)
    assert p.kind == "receptive" and "derived" in p.as_dict()["source"]
    assert p.offset == pytest.approx((0.0, 0.0, 0.0)) and p.stride == pytest.approx((1.0, 1.0, 1.0))


def test_placement_upsample_derived_alone():
    """×2 linear upsampling (align_corners=False) of cells at 2i: output j at input (j + ½)/2 − ½ of the coarse grid,
    i.e. 2((j + ½)/2 − ½) = j − ½ on the input grid: offset −½, stride 1."""
    p = _placement(nn.Upsample(scale_factor=2, mode="trilinear"), skip=False)
    assert p.kind == "receptive"
    assert p.offset == pytest.approx((-0.5, -0.5, -0.5)) and p.stride == pytest.approx((1.0, 1.0, 1.0))


@pytest.mark.parametrize("up", [nn.Upsample(scale_factor=2, mode="nearest"),
                                nn.ConvTranspose3d(4, 4, 2, stride=2)], ids=["upsample", "transposed-k2"])
def test_placement_mismatched_skip_falls_back_to_field_with_reason(up):
    """Upsampled cells at j − ½ concatenated with full-resolution cells at j: no single placement, so the field,
    with the reason naming the concatenation."""
    p = _placement(up, skip=True)
    assert p.kind == "field" and p.fallback
    assert "cat" in p.reason and "different places" in p.reason
