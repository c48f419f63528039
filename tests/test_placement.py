"""Map placement (issue 14): receptive-field centres declared, derived from the layers, or the field as a fallback;
display maps that are 0 where no cell sits.

Every expected centre below is computed by hand from the layers, in the comments next to it: a layer with kernel
k, stride s, padding p, dilation d centres its output j at input ``s j - p + d (k - 1) / 2``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_nets import ConvFC
from torch import nn

from medcam3d import Explainer, InputError, SlicesAsBatch
from medcam3d import placement as placement_mod
from medcam3d.explanation import Explanation
from medcam3d.geometry import (
    MapGeometry,
    cell_weights,
    covered_box,
    covered_region,
    interpolation_matrix,
    resample,
)
from medcam3d.models import AxialNet
from medcam3d.placement import (
    Placement,
    derive_geometry,
    find_receptive,
    resolve_placement,
)

# ------------------------------------------------------------------------------------------------ helpers


class Scored(nn.Module):
    """``body`` (explained at ``body.<last>``) -> flatten -> Linear: a model returning raw scores."""

    def __init__(self, body: nn.Module, x: torch.Tensor, classes: int = 2) -> None:
        super().__init__()
        self.body = body
        with torch.no_grad():
            n = body(x).numel() // x.shape[0]
        self.fc = nn.Linear(n, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(x), 1))


class Residual(nn.Module):
    """``main(x) + shortcut(x)`` (shortcut None: the identity)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x):
        return self.main(x) + (x if self.shortcut is None else self.shortcut(x))


def centres(offset: float, stride: float, n: int) -> list[float]:
    return [offset + stride * i for i in range(n)]


# ------------------------------------------------------------------------------------------------ AxialNet


def test_axialnet_paper_size_declared_and_derived_in_plane_match_the_hand_computation():
    """420 px: conv1 k7 s2 p3 (cell j at 2j), maxpool k3 s2 p1 (4j), layer1 3x3 p1 (4j), layer2/3/4 first conv
    3x3 s2 p1 (8j, 16j, 32j; their 1x1 s2 downsample also at 2j); then four valid 3x3 convs, each +1 cell of
    stride 32: 32 i + 128. Sizes 420 -> 210 -> 105 -> 53 -> 27 -> 14, minus 8 -> 6 cells: 128, 160, ..., 288."""
    model = AxialNet(80)
    hand = [128.0, 160.0, 192.0, 224.0, 256.0, 288.0]
    found = find_receptive(model, "conv2d.7", (405, 420, 420), (135, 6, 6), SlicesAsBatch())
    assert isinstance(found, Placement) and found.source == "declared"
    assert found.offset == (1.0, 128.0, 128.0) and found.stride == (3.0, 32.0, 32.0)  # slice group t at 3t + 1
    assert found.geometry.centres(1, 6).tolist() == hand
    # the in-plane part (ResNet features + the four convs) is an ordinary channels-first 2-D net: derived
    in_plane = nn.Sequential(model.features, model.conv2d)
    offset, stride = derive_geometry(in_plane, "1.7", nd=2)
    assert centres(offset[0], stride[0], 6) == hand and centres(offset[1], stride[1], 6) == hand


def test_axialnet_demo_size_explained_with_its_declared_placement():
    """128 px at feature stride 8: conv1 s2, maxpool s2, layer2 s2 (8j), four valid 3x3 convs +4 cells: 8 i + 32,
    8 cells (128 -> 64 -> 32 -> 16 -> 16 - 8)."""
    torch.manual_seed(0)
    model = AxialNet(3, in_plane=(128, 128), width=4, feature_stride=8).eval()
    exp = Explainer(model, methods=("hirescam",))(torch.randn(1, 1, 6, 128, 128))
    assert exp.map_size == (2, 8, 8)
    assert exp.placement is not None and exp.placement.source == "declared" and exp.placement.kind == "receptive"
    assert exp.placement.geometry.centres(1, 8).tolist() == [32.0, 40.0, 48.0, 56.0, 64.0, 72.0, 80.0, 88.0]
    assert exp.placement.offset == (1.0, 32.0, 32.0) and exp.placement.stride == (3.0, 8.0, 8.0)
    offset, stride = derive_geometry(nn.Sequential(model.features, model.conv2d), "1.7", nd=2)
    assert (offset, stride) == ((32.0, 32.0), (8.0, 8.0))


def test_slices_as_batch_without_a_declaration_falls_back_to_the_field():
    class Undeclared(AxialNet):
        medcam3d_map_geometry = None  # type: ignore[assignment]

    torch.manual_seed(0)
    model = Undeclared(3, in_plane=(96, 96), width=4, feature_stride=8).eval()
    exp = Explainer(model, methods=("hirescam",))(torch.randn(1, 1, 3, 96, 96))
    assert exp.placement is not None and exp.placement.kind == "field" and exp.geometry is None
    assert exp.placement.source.startswith("fallback: layout SlicesAsBatch")
    # the field: 96 px among 4 cells, stride 24, cell 0 at 11.5
    assert exp.placement.offset == (1.0, 11.5, 11.5) and exp.placement.stride == (3.0, 24.0, 24.0)


# ------------------------------------------------------------------------------------------------ chains


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
def test_chain_with_valid_same_stride_dilation_pools_transposed_and_upsample():
    chain = nn.Sequential(
        nn.Conv1d(1, 2, 7, stride=2, padding=3),  # j -> 2j                      offset 0,  stride 2
        nn.MaxPool1d(3, 2, 1),  # j -> 2j                                        offset 0,  stride 4
        nn.Conv1d(2, 2, 3),  # valid: j -> j + 1                                 offset 4,  stride 4
        nn.AvgPool1d(2),  # j -> 2j + 0.5                                        offset 6,  stride 8
        nn.Conv1d(2, 2, 3, padding="same", dilation=2),  # pads 2 left: j -> j   offset 6,  stride 8
        nn.Conv1d(2, 2, 2, padding="same"),  # total 1, left 0: j -> j + 0.5     offset 10, stride 8
        nn.ConvTranspose1d(2, 2, 2, stride=2),  # j -> (j - 0.5) / 2             offset 8,  stride 4
        nn.Upsample(scale_factor=2, mode="linear"),  # j -> (j + 0.5) / 2 - 0.5  offset 7,  stride 2
        nn.ReLU(),
    )
    assert derive_geometry(chain, "8", nd=1) == ((7.0,), (2.0,))
    # the same chain explained: the Explainer records it as derived
    x = torch.randn(1, 1, 64)
    exp = Explainer(Scored(chain, x), "body.8", methods=("hirescam",))(x)
    assert exp.placement is not None and exp.placement.source == "derived"
    assert exp.placement.offset == (7.0,) and exp.placement.stride == (2.0,)


def test_more_padding_kinds_and_anisotropic_3d():
    # valid dilated conv: k3 d3 centres j at j + 3; zero-padded k5 p2 at j; "valid" string at j + 1
    assert derive_geometry(nn.Sequential(nn.Conv1d(1, 1, 3, dilation=3), nn.Conv1d(1, 1, 5, padding=2),
                                         nn.Conv1d(1, 1, 3, padding="valid")), "2", nd=1) == ((4.0,), (1.0,))
    # transposed k3 s2 p1: input i writes 2i-1..2i+1, so output j sits at j / 2
    assert derive_geometry(nn.Sequential(nn.ConvTranspose1d(1, 1, 3, 2, 1, output_padding=1)), "0", nd=1) == (
        (0.0,), (0.5,))
    # 3-D, per axis: kernel (1, 3, 5) stride (1, 2, 1) padding (0, 1, 0): axis 0 j, axis 1 2j, axis 2 j + 2;
    # then MaxPool3d((1, 2, 2)): axis 0 j, axis 1 2(2j + 0.5) = 4j + 1, axis 2 (2j + 0.5) + 2 = 2j + 2.5
    net = nn.Sequential(nn.Conv3d(1, 1, (1, 3, 5), (1, 2, 1), (0, 1, 0)), nn.BatchNorm3d(1), nn.MaxPool3d((1, 2, 2)))
    assert derive_geometry(net, "2", nd=3) == ((0.0, 1.0, 2.5), (1.0, 4.0, 2.0))


def test_functional_layers_are_placed_like_modules():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 1, 3, 3))
            self.out = nn.Identity()

        def forward(self, x):
            y = F.conv2d(x, self.w, stride=2, padding=1)  # j -> 2j                      offset 0, stride 2
            y = F.max_pool2d(y, 2)  # j -> 2j + 0.5                                      offset 1, stride 4
            y = F.pad(y, (0, 0, 2, 0))  # rows padded 2 on top: j -> j - 2 on axis 0     offset -7, stride 4
            y = F.interpolate(y, scale_factor=2, mode="bilinear")  # j -> j / 2 - 0.25   offset -8 / 0, stride 2
            y = torch.relu(y) * 2.0
            return self.out(y)

    assert derive_geometry(Functional(), "out", nd=2) == ((-8.0, 0.0), (2.0, 2.0))


def test_residual_and_concatenation_need_agreeing_inputs():
    # a ResNet-style block: main 3x3 s2 p1 at 2j, shortcut 1x1 s2 at 2j -> they agree
    block = Residual(nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3, 1, 1)),
                     nn.Conv2d(1, 2, 1, 2))
    assert derive_geometry(nn.Sequential(block, nn.ReLU()), "1", nd=2) == ((0.0, 0.0), (2.0, 2.0))

    class Dense(nn.Module):  # DenseNet-style: cat([x, conv(x)]) along channels
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding="same")
            self.out = nn.ReLU()

        def forward(self, x):
            return self.out(torch.cat([x, self.conv(x)], dim=1))

    assert derive_geometry(Dense(), "out", nd=2) == ((0.0, 0.0), (1.0, 1.0))
    # a shortcut at 2j + 0.5 (AvgPool 2) against a main path at 2j: the same shape, different places
    bad = nn.Sequential(Residual(nn.Conv2d(1, 1, 3, 2, 1), nn.AvgPool2d(2)), nn.ReLU())
    with pytest.raises(placement_mod.PlacementError, match="sit at different places"):
        derive_geometry(bad, "1", nd=2)


def test_squeeze_excitation_broadcast_keeps_the_placement():
    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, 2)  # valid, stride 2: j -> 2j + 1
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 4)
            self.out = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            w = torch.sigmoid(self.fc(self.pool(y).flatten(1))).view(-1, 4, 1, 1)
            return self.out(y * w)

    assert derive_geometry(SE(), "out", nd=2) == ((1.0, 1.0), (2.0, 2.0))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
def test_derived_centre_is_the_centre_of_the_receptive_field_found_by_gradients():
    """All-ones weights, no nonlinearity, zero input: the input gradient of one interior output cell is non-zero
    exactly on its receptive field (a residual branch adds a field with the same middle); its middle is the
    derived centre."""
    net = nn.Sequential(
        nn.Conv2d(1, 1, 5, 2, 2),
        nn.AvgPool2d(2),
        Residual(nn.Sequential(nn.Conv2d(1, 1, 3, padding="same"), nn.Conv2d(1, 1, 3, padding=1))),
        nn.Conv2d(1, 1, 3, dilation=2),
        nn.Conv2d(1, 1, 4, padding="same"),
    )
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    offset, stride = derive_geometry(net, "4", nd=2)
    # by hand: 2j; 2(2j + 0.5) = 4j + 1; residual unchanged; +2 cells of 4: 4j + 9; k4 same: +0.5 cell: 4j + 11
    assert (offset, stride) == ((11.0, 11.0), (4.0, 4.0))
    x = torch.zeros(1, 1, 101, 101, requires_grad=True)
    out = net(x)
    for i, j in [(5, 7), (10, 9)]:
        (g,) = torch.autograd.grad(out[0, 0, i, j], x, retain_graph=True)
        rows = g[0, 0].abs().sum(1).nonzero()[:, 0]
        cols = g[0, 0].abs().sum(0).nonzero()[:, 0]
        assert rows.min() > 0 and rows.max() < 100 and cols.min() > 0 and cols.max() < 100  # not clipped
        assert float(rows.min() + rows.max()) / 2 == offset[0] + stride[0] * i
        assert float(cols.min() + cols.max()) / 2 == offset[1] + stride[1] * j


# ------------------------------------------------------------------------------------------------ MONAI


def test_monai_resnet18_3d_is_derived_without_a_declaration():
    """MONAI's resnet18: conv1 k7 s1 p3 (conv1_t_stride=1 by default: j), maxpool k3 s2 p1 (2j), layer1 (2j),
    layer2/3/4 conv 3x3 s2 p1 with a 1x1 s2 downsample (4j, 8j, 16j): 16 i. With conv1_t_stride=2: 32 i."""
    from monai.networks.nets import resnet18

    torch.manual_seed(0)
    net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2).eval()
    exp = Explainer(net, "layer4", methods=("hirescam",))(torch.randn(1, 1, 32, 32, 48))
    assert exp.map_size == (2, 2, 3)
    assert exp.placement is not None and exp.placement.source == "derived" and exp.placement.kind == "receptive"
    assert exp.placement.geometry.centres(2, 3).tolist() == [0.0, 16.0, 32.0]
    assert exp.geometry == exp.placement.geometry
    strided = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, conv1_t_stride=2)
    assert derive_geometry(strided, "layer4", nd=3) == ((0.0,) * 3, (32.0,) * 3)


def test_monai_densenet121_3d_is_derived_without_a_declaration():
    """MONAI's DenseNet121: conv0 k7 s2 p3 (2j), pool0 k3 s2 p1 (4j), dense layers 1x1 and 3x3 p1 concatenated
    with their input (4j), each transition ends in AvgPool k2 s2 (output j at 2j + 0.5): 8j + 2, 16j + 6,
    32j + 14; norm5 and class_layers.relu keep it: 32 i + 14."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()
    exp = Explainer(net, "class_layers.relu", methods=("hirescam",))(torch.randn(1, 1, 64, 32, 32))
    assert exp.map_size == (2, 1, 1)
    assert exp.placement is not None and exp.placement.source == "derived"
    assert exp.placement.geometry.centres(0, 2).tolist() == [14.0, 46.0]
    assert exp.placement.offset == (14.0, 14.0, 14.0) and exp.placement.stride == (32.0, 32.0, 32.0)
    assert derive_geometry(net, "features.norm5", nd=3) == ((14.0,) * 3, (32.0,) * 3)
    # after the global pooling there is no place
    with pytest.raises(placement_mod.PlacementError, match="global pooling"):
        derive_geometry(net, "class_layers.flatten", nd=3)


# ------------------------------------------------------------------------------------------------ fallbacks


class Attention2d(nn.Module):
    """conv -> self-attention over the spatial tokens -> back to a map -> ReLU (explained ``act``) -> FC."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        y = self.conv(x)
        tokens = y.flatten(2).transpose(1, 2)
        z = self.attn(tokens, tokens, tokens)[0].transpose(1, 2).reshape(y.shape)
        return self.fc(self.act(z).flatten(1))


class Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.inner = ConvFC(nd=2, c_in=1)

    def forward(self, x):
        return self.inner(self.pool(x))


class Branchy(nn.Module):
    """Python control flow on a tensor value: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ConvFC(nd=2, size=8, c_in=1)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.inner(x)


# the field on 8 px: 8 cells -> stride 1, cell 0 at 0; 4 cells (after pooling to 4) -> stride 2, cell 0 at 0.5
@pytest.mark.parametrize(("model", "layer", "why", "offset", "stride"), [
    (Attention2d(), "act", "flatten", 0.0, 1.0),  # the tokens are made by flattening the spatial axes
    (Pooled(), "inner.act", "pools to a fixed size", 0.5, 2.0),
    (Branchy(), "inner.act", "torch.fx cannot trace", 0.0, 1.0),
])
def test_underivable_models_fall_back_to_the_field_with_a_reason(model, layer, why, offset, stride):
    torch.manual_seed(0)
    exp = Explainer(model.eval(), layer, methods=("hirescam",))(torch.randn(1, 1, 8, 8) + 1.0)
    p = exp.placement
    assert p is not None and p.kind == "field" and p.fallback and why in p.source and exp.geometry is None
    assert p.note().startswith("map placement: field (fallback: ")
    assert p.as_dict()["source"] == p.source
    assert p.offset == (offset, offset) and p.stride == (stride, stride)
    assert torch.allclose(exp.heatmap("hirescam"), exp.heatmap("hirescam", geometry="field"))
    with pytest.raises(InputError, match=f"declares no medcam3d_map_geometry.* none could be derived .*{why}"):
        exp.heatmap("hirescam", geometry="receptive")
    with pytest.raises(InputError, match="declares no medcam3d_map_geometry"):
        Explainer(model, layer, methods=("hirescam",), map_geometry="receptive")(torch.randn(1, 1, 8, 8) + 1.0)


def test_map_geometry_choices():
    net = ConvFC(nd=2, size=4)
    x = torch.randn(1, 2, 4, 4)
    auto = Explainer(net, "act")(x)
    # ConvFC: one 3x3 conv with padding 1 -> cell j at j, the field's own placement at this size
    assert auto.placement is not None and auto.placement.source == "derived"
    assert auto.placement.offset == (0.0, 0.0) and auto.placement.stride == (1.0, 1.0)
    field = Explainer(net, "act", map_geometry="field")(x)
    assert field.placement is not None and field.placement.source == "requested" and field.placement.kind == "field"
    assert field.geometry == auto.geometry  # the receptive geometry is kept whichever placement is chosen
    with pytest.raises(InputError, match="map_geometry must be one of"):
        Explainer(net, "act", map_geometry="centre")
    # an explanation built by hand: "auto" is the geometry when known, else the field
    bare = Explanation(auto.scores, auto.classes, auto.raw, auto.certificate, auto.input_size)
    assert bare.map_geometry("auto") == MapGeometry.field((4, 4), (4, 4))


def test_derivations_are_cached_per_model_layer_and_input_size(monkeypatch):
    calls = []
    real = placement_mod.derive_geometry

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(placement_mod, "derive_geometry", counting)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    for _ in range(2):
        assert resolve_placement(net, "1", (8, 8), (6, 6)).offset == (1.0, 1.0)
    assert len(calls) == 1
    resolve_placement(net, "1", (10, 10), (8, 8))
    assert len(calls) == 2
    placement_mod.clear_cache()
    resolve_placement(net, "1", (8, 8), (6, 6))
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------------ uncovered


def test_cell_weights_hand_computed():
    pos = torch.tensor([-0.6, -0.5, -0.2, 0.0, 0.25, 1.0, 1.5, 2.0, 2.5, 2.6, float("nan")])
    expected = [
        [0, 0, 0],  # more than half a cell before centre 0: uncovered
        [1, 0, 0],  # exactly half a cell before: the edge value
        [1, 0, 0],
        [1, 0, 0],  # centre 0
        [0.75, 0.25, 0],
        [0, 1, 0],
        [0, 0.5, 0.5],
        [0, 0, 1],
        [0, 0, 1],  # half a cell after the last centre
        [0, 0, 0],
        [0, 0, 0],  # NaN
    ]
    assert cell_weights(pos, 3).tolist() == expected
    assert cell_weights(torch.tensor([-0.51, -0.5, 0.0, 0.5, 0.51]), 1).tolist() == [[0], [1], [1], [1], [0]]
    # a regular grid is interpolation_matrix: cells at 1 and 3 of 6 voxels, stride 2 -> voxel 5 is uncovered
    assert interpolation_matrix(2, 6, 1.0, 2.0).tolist() == [[1, 0], [1, 0], [0.5, 0.5], [0, 1], [0, 1], [0, 0]]


def test_covered_region_hand_computed():
    demo = MapGeometry((32.0,), (8.0,))  # AxialNet demo in-plane: 8 cells at 32 .. 88 of 128
    assert covered_box(demo, (8,)) == ((28.0, 92.0),)
    mask = covered_region(demo, (8,), (128,))
    assert mask.nonzero()[:, 0].tolist() == list(range(28, 93))
    field = MapGeometry.field((8,), (128,))
    assert covered_box(field, (8,)) == ((-0.5, 127.5),) and covered_region(field, (8,), (128,)).all()
    two = covered_region(MapGeometry((1.0, 3.0), (2.0, 4.0)), (2, 2), (5, 12))  # rows 0..4, columns 1..9
    assert two.shape == (5, 12) and two[:, 1:10].all() and not two[:, 0].any() and not two[:, 10:].any()


def test_heatmap_is_zero_beyond_half_a_stride_and_the_edge_value_within():
    """Demo AxialNet: in-plane cells at 8 i + 32 (i = 0..7); the map is held for 4 px beyond 32 and 88 and is 0
    outside 28 .. 92. Raw cell values 1 + 64 t + 8 i + j normalise to (64 t + 8 i + j) / 127."""
    torch.manual_seed(0)
    model = AxialNet(1, in_plane=(128, 128), width=4, feature_stride=8).eval()
    exp = Explainer(model, methods=("hirescam",))(torch.randn(1, 1, 6, 128, 128))
    t, i, j = torch.meshgrid(torch.arange(2), torch.arange(8), torch.arange(8), indexing="ij")
    exp.raw["hirescam"] = (1.0 + 64 * t + 8 * i + j).double()[None, None]
    hm = exp.heatmap("hirescam", dtype=torch.float64)[0, 0]  # [6, 128, 128], default "auto" = declared
    # slice 1 is group 0's centre; column 40 is cell 1's centre; rows 28 .. 32 hold row 0's value 1 / 127
    assert hm[1, 28:33, 40].tolist() == pytest.approx([1 / 127] * 5)
    assert hm[1, 88:93, 40].tolist() == pytest.approx([(8 * 7 + 1) / 127] * 5)  # row 7, held to 92
    assert hm[1, :28].eq(0).all() and hm[1, 93:].eq(0).all() and hm[:, :, :28].eq(0).all() and hm[:, :, 93:].eq(0).all()
    assert hm[4, 92, 92] == pytest.approx(1.0)  # group 1, row 7, column 7, held at the covered box's corner
    assert hm[4, 36, 44] == pytest.approx((64 + 8 * 0.5 + 1.5) / 127)  # halfway between centres, both axes
    assert torch.equal(hm != 0, exp.covered_region() & (hm != 0)) and exp.covered_region()[:, 28:93, 28:93].all()
    # the field covers everything: cells 16 px apart, cell 0 at 7.5 in-plane, group 0 at slice 1; the only zeros
    # are where the smallest cell (value 0 after min-max) is held: slices 0-1, rows 0-7, columns 0-7
    field = exp.heatmap("hirescam", geometry="field", dtype=torch.float64)[0, 0]
    zeros = torch.zeros(6, 128, 128, dtype=torch.bool)
    zeros[:2, :8, :8] = True
    assert torch.equal(field == 0, zeros) and exp.covered_region(geometry="field").all()
    ref = F.interpolate(((exp.raw["hirescam"] - 1) / 127), size=(6, 128, 128), mode="trilinear", align_corners=False)
    assert torch.allclose(field, ref[0, 0])


def test_field_resample_is_unchanged_and_covers_everything():
    maps = torch.rand(1, 1, 3, 5, generator=torch.Generator().manual_seed(4))
    geo = MapGeometry.field((3, 5), (7, 16))
    out = resample(maps, (7, 16), geo)
    assert torch.allclose(out, F.interpolate(maps, size=(7, 16), mode="bilinear", align_corners=False), atol=1e-6)
    assert covered_region(geo, (3, 5), (7, 16)).all()
