"""Map geometry: where explained cells sit on the input, and resampling that respects it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_nets import ConvFC
from torch import nn

from medcam3d import Explainer, InputError
from medcam3d.geometry import (
    MapGeometry,
    cell_fractions,
    conv_chain_geometry,
    interpolation_matrix,
    resample,
)
from medcam3d.models import AxialNet

MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


@pytest.mark.parametrize(("shape", "size"),
                         [((5,), (17,)), ((3, 4), (9, 13)), ((2, 3, 4), (6, 7, 11)), ((4, 4), (4, 4))])
def test_field_geometry_is_align_corners_false(shape, size):
    maps = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(maps, size=size, mode=MODES[len(shape)], align_corners=False)
    out = resample(maps, size, MapGeometry.field(shape, size))
    assert torch.allclose(out, ref, atol=1e-6)


def test_interpolation_matrix_hand_computed():
    # two cells centred at voxels 1 and 3 of a 5-voxel axis: hold, hold, halfway, hold, hold
    w = interpolation_matrix(2, 5, offset=1.0, stride=2.0)
    assert w.tolist() == [[1, 0], [1, 0], [0.5, 0.5], [0, 1], [0, 1]]


def test_conv_chain_geometry_hand_computed():
    # conv k7 s2 p3 centres output j at 2j; maxpool k3 s2 p1 at 2j -> 4j; an unpadded 3x3 at j + 1 -> 4j + 4
    chain = [nn.Conv2d(1, 1, 7, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(1, 1, 3)]
    assert conv_chain_geometry(chain, nd=2) == ((4.0, 4.0), (4.0, 4.0))
    # dilation and anisotropic kernels
    assert conv_chain_geometry([nn.Conv3d(1, 1, (1, 3, 5), 1, 0, dilation=(1, 2, 1))], nd=3) == (
        (0.0, 2.0, 2.0), (1.0, 1.0, 1.0))


def test_conv_chain_geometry_matches_the_receptive_field_found_by_gradients():
    """With all-ones weights and no nonlinearity, the input gradient of one output cell is non-zero exactly on its
    receptive field; the field's middle is the centre the composition predicts."""
    net = nn.Sequential(nn.Conv2d(1, 1, 7, 2, 3), nn.AvgPool2d(3, 2, 1), nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3, 2))
    for m in net:
        if isinstance(m, nn.Conv2d):
            assert m.bias is not None
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    x = torch.zeros(1, 1, 97, 97, requires_grad=True)
    out = net(x)
    (offset, stride) = conv_chain_geometry(net, nd=2)
    for i, j in [(1, 2), (3, 3)]:  # interior cells (padding does not clip their fields)
        (g,) = torch.autograd.grad(out[0, 0, i, j], x, retain_graph=True)
        rows = g[0, 0].abs().sum(1).nonzero()[:, 0]
        cols = g[0, 0].abs().sum(0).nonzero()[:, 0]
        assert float(rows.min() + rows.max()) / 2 == offset[0] + stride[0] * i
        assert float(cols.min() + cols.max()) / 2 == offset[1] + stride[1] * j


def test_axialnet_declares_its_receptive_field_centres():
    demo = AxialNet(13, in_plane=(128, 128), width=4, feature_stride=8)
    g = demo.medcam3d_map_geometry((60, 128, 128), (20, 8, 8))
    # slice group t -> slice 3t+1; in-plane stride 8: ResNet cell j at 8j, four unpadded 3x3 convs -> 8(i+4)
    assert (g.offset, g.stride, g.kind) == ((1.0, 32.0, 32.0), (3.0, 8.0, 8.0), "receptive")
    paper = AxialNet(80).medcam3d_map_geometry((405, 420, 420), (135, 6, 6))
    assert (paper.offset, paper.stride) == ((1.0, 128.0, 128.0), (3.0, 32.0, 32.0))  # 128..288 of 420


def test_receptive_heatmap_puts_a_cell_at_its_centre():
    torch.manual_seed(0)
    model = AxialNet(3, in_plane=(96, 96), width=4, feature_stride=8).eval()  # explained map 4x4
    exp = Explainer(model, methods=("hirescam",))(torch.randn(1, 1, 6, 96, 96))
    assert exp.map_size == (2, 4, 4) and exp.geometry is not None
    one = torch.zeros(1, 1, 2, 4, 4)
    one[0, 0, 1, 0, 3] = 1.0  # slice group 1, row 0, column 3
    exp.raw["hirescam"] = one.expand(1, 3, 2, 4, 4).clone()
    field = exp.heatmap("hirescam", geometry="field")[0, 0]
    rec = exp.heatmap("hirescam", geometry="receptive")[0, 0]
    assert rec.shape == field.shape == (6, 96, 96)
    assert torch.equal(exp.heatmap("hirescam")[0, 0], rec)  # "auto": AxialNet declares its geometry
    # receptive: row 0 of the map is centred at pixel 32, column 3 at 8*3 + 32 = 56, group 1 at slice 4
    assert rec[4, 32, 56] == 1.0 and rec[4, 32, 48] == 0.0 and rec[4, 40, 56] == 0.0
    # held for half a stride (4 px) beyond the first centre, uncovered (exactly 0) further out (issue 14; this
    # asserted the old hold-to-the-border rule, rec[4, :32, 56] == 1, before)
    assert rec[4, 28:32, 56].eq(1.0).all() and rec[4, :28, 56].eq(0.0).all()
    # field: the 96 pixels divided among 4 cells, row 0 centred at 11.5, column 3 at 83.5 -- and nothing where
    # the cell's receptive field is centred
    assert field[4, 11, 84] == 1.0 and field[4, 0, 95] == 1.0 and field[4, 32, 56] == 0.0
    assert abs(float(field[4, 12, 83]) - (1 - 1 / 48) ** 2) < 1e-5  # 1/48 of a cell from both centres
    # a grid of half the size covering the same field: the centres move to (x + 0.5) / 2 - 0.5
    g = exp.map_geometry("receptive").rescaled((6, 96, 96), (6, 48, 48))
    assert (g.offset, g.stride) == ((1.0, 15.75, 15.75), (3.0, 4.0, 4.0))
    half = exp.heatmap("hirescam", size=(6, 48, 48), geometry="receptive")[0, 0]
    assert half[4, 15, 28] == 1.0 and half[4, 15, 24] < 0.1 and half[4, 20, 28] < 0.1


class PooledConvFC(nn.Module):
    """ConvFC with an adaptive pooling before the explained layer: cells whose place depends on the input size."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.inner = ConvFC(nd=2)

    def forward(self, x):
        return self.inner(self.pool(x))


def test_receptive_geometry_needs_a_declaration_or_a_derivation():
    # (ConvFC itself is derived since issue 14, so the net without a receptive geometry pools adaptively first)
    net = PooledConvFC()
    exp = Explainer(net, "inner.act")(torch.randn(1, 2, 8, 8))
    assert exp.geometry is None
    with pytest.raises(InputError, match="declares no medcam3d_map_geometry"):
        exp.heatmap("hirescam", geometry="receptive")
    with pytest.raises(InputError, match="map geometry must be one of"):
        exp.heatmap("hirescam", geometry="middle")


def test_cell_fractions_field_blocks_and_receptive_cells():
    mask = torch.rand(2, 6, 12, 8, generator=torch.Generator().manual_seed(3)) > 0.5
    field = cell_fractions(mask, (3, 4, 2), MapGeometry.field((3, 4, 2), (6, 12, 8)))
    ref = F.avg_pool3d(mask.double().unsqueeze(1), kernel_size=(2, 3, 4)).squeeze(1)  # even blocks
    assert torch.allclose(field, ref)
    # receptive cells centred at 2 and 6 of 10 voxels: cell 0 owns 0-3 (4 voxels), cell 1 owns 4-9 (6 voxels)
    line = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    assert cell_fractions(line, (2,), MapGeometry((2.0,), (4.0,))).tolist() == [0.25, 0.5]
