"""Agreement with Captum, an independent implementation (test-only dependency)."""

import pytest
import torch
from core_nets import ConvFC, ConvMLP, TinyAxial
from torch import nn

from medcam3d import explain

captum_attr = pytest.importorskip("captum.attr")


def seeded(model, seed=0):
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model.eval()


CASES = [
    ("conv_fc_2d", lambda: ConvFC(nd=2, size=5, classes=6), (3, 2, 5, 5)),
    ("conv_fc_3d", lambda: ConvFC(nd=3, size=4, classes=6), (2, 2, 4, 4, 4)),
    ("conv_mlp_2d", lambda: ConvMLP(nd=2, size=4, classes=4), (2, 1, 4, 4)),
    ("conv_fc_1d", lambda: ConvFC(nd=1, size=7, classes=3), (2, 2, 7)),
]


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_hirescam_and_gradcam_match_captum(name, make, shape):
    net = seeded(make(), seed=len(name))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    exp = explain(net, x, "act", methods=("hirescam", "gradcam"))
    gxa = captum_attr.LayerGradientXActivation(net, net.act)
    gc = captum_attr.LayerGradCam(net, net.act)
    for k in range(exp.scores.shape[1]):
        hires = gxa.attribute(x, target=k).sum(dim=1)  # channel-summed gradient x activation
        grad = gc.attribute(x, target=k, relu_attributions=False).squeeze(1)
        assert torch.allclose(exp.raw["hirescam"][:, k], hires, atol=1e-5, rtol=1e-5)
        assert torch.allclose(exp.raw["gradcam"][:, k], grad, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in net.parameters())


def test_axialnet_layout_hirescam_matches_captum_per_slice_rows():
    """With slices in the batch axis, Captum's per-row gradient x activation, re-stacked, is HiResCAM."""
    net = seeded(TinyAxial(hw=6, feats=4, classes=3), seed=5)
    x = torch.randn(1, 1, 9, 6, 6, generator=torch.Generator().manual_seed(4))
    exp = explain(net, x, methods=("hirescam",))
    gxa = captum_attr.LayerGradientXActivation(net, net.act)
    for k in range(3):
        rows = gxa.attribute(x, target=k).sum(dim=1)  # [S, h, w] (slices as rows)
        assert torch.allclose(exp.raw["hirescam"][0, k], rows, atol=1e-6)
