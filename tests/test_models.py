"""Tests for medcam3d.models: shapes, the authors' key names, head linearity, tracing, loading and its errors.

Expected values come from the architecture definitions (hand-computed sizes, an independently written list of
ResNet-18 parameter names and shapes, independent re-implementations of the heads), never from the code under
test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import Tensor

from medcam3d.errors import InputError
from medcam3d.layouts import SlicesAsBatch
from medcam3d.models import (
    AxialNet,
    CAMNet3d,
    DenseNet121v,
    ResNet34v,
    build_model,
    declare_model,
    load_checkpoint,
    load_demo,
    load_model_spec,
    load_resnet18_weights,
    resnet_feature_size,
    resolve_weights,
)

torch.manual_seed(0)


# --------------------------------------------------------------------------------------------------------------
# Independent description of the authors' AxialNet parameters (ResNet-18 children[:-2], conv2d stack, fc)
# --------------------------------------------------------------------------------------------------------------
def _bn(shapes: dict[str, tuple[int, ...]], prefix: str, c: int, tracked: bool = True) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.{name}"] = (c,)
    if tracked:
        shapes[f"{prefix}.num_batches_tracked"] = ()


def resnet18_shapes(torchvision_names: bool, tracked: bool = True) -> dict[str, tuple[int, ...]]:
    """ResNet-18 (He et al.; torchvision's layout) parameter and buffer shapes, written out from its definition:
    conv1 7x7x3->64, bn1, then four stages of two BasicBlocks with 64/128/256/512 channels, a 1x1 downsample
    in the first block of stages 2-4. ``torchvision_names`` -> ``conv1/bn1/layerK``; else ``features.0/1/K+3``."""
    shapes: dict[str, tuple[int, ...]] = {}
    conv1, bn1 = ("conv1", "bn1") if torchvision_names else ("features.0", "features.1")
    shapes[f"{conv1}.weight"] = (64, 3, 7, 7)
    _bn(shapes, bn1, 64, tracked)
    inplanes = 64
    for stage, planes in enumerate((64, 128, 256, 512)):
        layer = f"layer{stage + 1}" if torchvision_names else f"features.{stage + 4}"
        for block in range(2):
            p = f"{layer}.{block}"
            cin = inplanes if block == 0 else planes
            shapes[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            _bn(shapes, f"{p}.bn1", planes, tracked)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            _bn(shapes, f"{p}.bn2", planes, tracked)
            if block == 0 and stage > 0:
                shapes[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1)
                _bn(shapes, f"{p}.downsample.1", planes, tracked)
        inplanes = planes
    if torchvision_names:
        shapes["fc.weight"] = (1000, 512)
        shapes["fc.bias"] = (1000,)
    return shapes


def authors_axialnet_shapes(n_outputs: int = 80, fc_kernel: int = 6) -> dict[str, tuple[int, ...]]:
    """The state_dict of the authors' ``AxialNet(n_outputs, slices)`` (custom_models_base.py / components.py)."""
    shapes = resnet18_shapes(torchvision_names=False)
    for idx, (cout, cin) in zip((0, 2, 4, 6), ((64, 512), (32, 64), (16, 32), (16, 16))):
        shapes[f"conv2d.{idx}.weight"] = (cout, cin, 3, 3)
        shapes[f"conv2d.{idx}.bias"] = (cout,)
    shapes["fc.weight"] = (n_outputs, 16, fc_kernel, fc_kernel)
    shapes["fc.bias"] = (n_outputs,)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7, dtype=torch.long)
        elif k.endswith("running_var"):
            out[k] = torch.rand(s, generator=g) + 0.5
        else:
            out[k] = torch.randn(s, generator=g)
    return out


def small_axialnet(n_outputs: int = 3) -> AxialNet:
    """96x96 slices, width 8, stride 8: 96 -> 48 -> 24 -> 12 (ResNet map) -> 4x4 explained map."""
    return AxialNet(n_outputs, in_plane=96, width=8, feature_stride=8).eval()


def capture(module: torch.nn.Module, store: dict[str, Tensor], key: str):
    return module.register_forward_hook(lambda m, i, o: store.__setitem__(key, o))


# --------------------------------------------------------------------------------------------------------------
# AxialNet shapes
# --------------------------------------------------------------------------------------------------------------
def test_axialnet_full_size_shapes_on_meta_device() -> None:
    with torch.device("meta"):
        model = AxialNet(80).eval()
        seen: dict[str, Tensor] = {}
        capture(model.features, seen, "features")
        capture(model.get_submodule("conv2d.7"), seen, "explained")
        out = model(torch.empty(1, 1, 405, 420, 420))
    assert tuple(seen["features"].shape) == (135, 512, 14, 14)
    assert tuple(seen["explained"].shape) == (135, 16, 6, 6)
    assert tuple(model.fc.weight.shape) == (80, 16, 6, 6)
    assert tuple(out.shape) == (1, 80)
    assert model.explained_size == (6, 6)


@pytest.mark.parametrize(
    ("n", "stride", "expected"),
    [(420, 32, 14), (128, 32, 4), (128, 16, 8), (128, 8, 16), (96, 8, 12), (224, 32, 7), (97, 16, 7)],
)
def test_resnet_feature_size_hand_values_and_real_run(n: int, stride: int, expected: int) -> None:
    # hand values: 420 -> 210 -> 105 -> 53 -> 27 -> 14; 97 -> 49 -> 25 -> 13 -> 7 -> 7 (stride 16)
    assert resnet_feature_size(n, stride) == expected
    with torch.device("meta"):
        model = AxialNet(2, in_plane=max(n, 72 * stride // 8), width=8, feature_stride=stride)
        assert tuple(model.features(torch.empty(1, 3, n, n)).shape) == (1, 64, expected, expected)


def test_axialnet_demo_config_shapes() -> None:
    model = AxialNet(13, in_plane=(128, 128), width=16, feature_stride=8).eval()
    seen: dict[str, Tensor] = {}
    capture(model.features, seen, "features")
    capture(model.get_submodule(model.medcam3d_target_layer), seen, "explained")
    with torch.no_grad():
        out = model(torch.randn(1, 1, 60, 128, 128))
    assert tuple(seen["features"].shape) == (20, 128, 16, 16)
    assert tuple(seen["explained"].shape) == (20, 16, 8, 8)
    assert tuple(out.shape) == (1, 13)
    assert torch.isfinite(out).all()
    assert tuple(model.conv2d[0].weight.shape) == (64, 128, 3, 3)  # 8 * width input channels


def test_axialnet_declares_target_layer_layout_labels() -> None:
    model = AxialNet(2, in_plane=96, width=8, feature_stride=8, labels=["nodule", "effusion"])
    assert model.medcam3d_target_layer == "conv2d.7"
    assert isinstance(model.get_submodule("conv2d.7"), torch.nn.ReLU)
    assert isinstance(model.medcam3d_layout, SlicesAsBatch)
    assert model.medcam3d_labels == ["nodule", "effusion"]
    assert not hasattr(AxialNet(2, in_plane=96, width=8, feature_stride=8), "medcam3d_labels")


def test_axialnet_slices_grouped_three_consecutive_as_rgb() -> None:
    """Slices 3t..3t+2 of the input must reach features.0 as the 3 channels of image t."""
    model = small_axialnet()
    seen: dict[str, Tensor] = {}
    model.features[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0]))
    x = torch.randn(2, 1, 9, 96, 96)
    with torch.no_grad():
        model(x)
    images = seen["in"]
    assert tuple(images.shape) == (6, 3, 96, 96)
    for b in range(2):
        for t in range(3):
            for c in range(3):
                assert torch.equal(images[b * 3 + t, c], x[b, 0, 3 * t + c])


def test_axialnet_batch_samples_do_not_mix() -> None:
    model = small_axialnet()
    x = torch.randn(2, 1, 6, 96, 96)
    x[1] = x[1] * 3 + 1  # clearly different samples
    with torch.no_grad():
        both = model(x)
        alone = torch.cat([model(x[:1]), model(x[1:])])
    assert tuple(both.shape) == (2, 3)
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_axialnet_output_is_mean_of_per_slice_fc() -> None:
    """Independent head: score_k = mean_t (sum_{c,i,j} W[k,c,i,j] A[t,c,i,j]) + b_k."""
    model = small_axialnet().double()
    seen: dict[str, Tensor] = {}
    capture(model.get_submodule("conv2d.7"), seen, "a")
    with torch.no_grad():
        out = model(torch.randn(1, 1, 12, 96, 96, dtype=torch.float64))
    a = seen["a"]  # [4, 16, 4, 4]
    w, b = model.fc.weight, model.fc.bias  # [3, 16, 4, 4], [3]
    expected = torch.einsum("tcij,kcij->tk", a, w).mean(0) + b
    torch.testing.assert_close(out[0], expected)


def test_axialnet_head_is_affine_in_explained_layer() -> None:
    """output(A) - output(0) = sum(d out / dA * A), and d out / dA does not depend on A."""
    model = small_axialnet().double()
    x = torch.randn(1, 1, 6, 96, 96, dtype=torch.float64)
    layer = model.get_submodule("conv2d.7")

    def run_with(a: Tensor) -> Tensor:
        handle = layer.register_forward_hook(lambda m, i, o: a)
        try:
            return model(x)
        finally:
            handle.remove()

    a1 = torch.rand(2, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    a2 = (torch.rand(2, 16, 4, 4, dtype=torch.float64) * 5).requires_grad_()
    out1, out2 = run_with(a1), run_with(a2)
    out0 = run_with(torch.zeros(2, 16, 4, 4, dtype=torch.float64))
    for k in range(3):
        (g1,) = torch.autograd.grad(out1[0, k], a1, retain_graph=True)
        (g2,) = torch.autograd.grad(out2[0, k], a2, retain_graph=True)
        torch.testing.assert_close(g1, g2)
        torch.testing.assert_close(out1[0, k] - out0[0, k], (g1 * a1).sum())
        assert g1.abs().sum() > 0


def test_axialnet_fx_trace_matches_eager() -> None:
    model = small_axialnet()
    traced = torch.fx.symbolic_trace(model)
    names = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert "conv2d.7" in names
    x = torch.randn(2, 1, 9, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_axialnet_input_errors() -> None:
    model = small_axialnet()
    with pytest.raises(InputError, match="multiple of 3"):
        model(torch.randn(1, 1, 7, 96, 96))
    with pytest.raises(InputError, match="in_plane"):
        model(torch.randn(1, 1, 6, 96, 80))
    with pytest.raises(InputError, match=r"\[B, 1, S, H, W\]"):
        model(torch.randn(1, 6, 96, 96))
    with pytest.raises(InputError, match=r"\[B, 1, S, H, W\]"):
        model(torch.randn(1, 3, 6, 96, 96))
    with pytest.raises(InputError, match="9x9"):
        AxialNet(3, in_plane=128, feature_stride=32)  # 4x4 ResNet map
    with pytest.raises(InputError, match="labels"):
        AxialNet(3, in_plane=96, width=8, feature_stride=8, labels=["a"])
    with pytest.raises(InputError, match="feature_stride"):
        AxialNet(3, feature_stride=4)


# --------------------------------------------------------------------------------------------------------------
# The authors' key names; torchvision ResNet-18 weights
# --------------------------------------------------------------------------------------------------------------
def test_authors_state_dict_loads_strictly() -> None:
    expected = authors_axialnet_shapes(80, 6)
    model = AxialNet(80)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    state = random_state(expected)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.features[4][0].bn1.running_mean, state["features.4.0.bn1.running_mean"])
    assert torch.equal(model.features[6][0].downsample[0].weight, state["features.6.0.downsample.0.weight"])
    assert torch.equal(model.fc.weight, state["fc.weight"])


def test_authors_checkpoint_format_via_load_checkpoint(tmp_path: Path) -> None:
    """Their training code saves {'params': state_dict, 'optimizer': ...}; DataParallel adds 'module.'."""
    state = random_state(authors_axialnet_shapes(83, 6))
    ckpt = {
        "params": {f"module.{k}": v for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
    }
    path = tmp_path / "AxialNet_epoch34"
    torch.save(ckpt, path)
    model = load_checkpoint(AxialNet(83), path)
    assert torch.equal(model.conv2d[6].weight, state["conv2d.6.weight"])
    assert torch.equal(model.features[1].running_var, state["features.1.running_var"])


@pytest.mark.parametrize("tracked", [True, False])
def test_torchvision_resnet18_weights_load_into_features(tmp_path: Path, tracked: bool) -> None:
    state = random_state(resnet18_shapes(torchvision_names=True, tracked=tracked), seed=3)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(state, path)
    model = AxialNet(5, in_plane=128, feature_stride=8)  # strides do not change parameter shapes
    fc_before = model.fc.weight.clone()
    load_resnet18_weights(model, path)
    assert torch.equal(model.features[0].weight, state["conv1.weight"])
    assert torch.equal(model.features[1].bias, state["bn1.bias"])
    assert torch.equal(model.features[5][0].downsample[1].running_mean, state["layer2.0.downsample.1.running_mean"])
    assert torch.equal(model.features[7][1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(model.fc.weight, fc_before)  # the ImageNet fc is dropped, AxialNet's fc untouched
    model2 = AxialNet(5, in_plane=128, feature_stride=8, pretrained_path=path)
    assert torch.equal(model2.features[4][1].bn2.weight, state["layer1.1.bn2.weight"])


def test_torchvision_weights_into_narrow_backbone_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(random_state(resnet18_shapes(torchvision_names=True)), path)
    with pytest.raises(InputError, match="resnet18.pth.*shape mismatches"):
        load_resnet18_weights(AxialNet(5, in_plane=128, width=16, feature_stride=8), path)


# --------------------------------------------------------------------------------------------------------------
# Paper variants and the CAM architecture
# --------------------------------------------------------------------------------------------------------------
def test_resnet34v_2d_shapes_and_linear_head() -> None:
    # 96x64 -> ResNet map 3x2 (96->48->24->12->6->3, 64->32->16->8->4->2) -> 2x1 after the 2-wide conv
    model = ResNet34v(4, input_size=(96, 64), spatial_dims=2, in_channels=3).eval()
    assert model.medcam3d_target_layer == "conv"
    assert tuple(model.fc.weight.shape) == (4, 512 * 2 * 1)
    blocks = [len(model.features[i]) for i in range(4, 8)]
    assert blocks == [3, 4, 6, 3]  # ResNet-34
    seen: dict[str, Tensor] = {}
    capture(model.get_submodule(model.medcam3d_target_layer), seen, "a")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 64))
    assert tuple(seen["a"].shape) == (2, 512, 2, 1)
    torch.testing.assert_close(out, seen["a"].reshape(2, -1) @ model.fc.weight.T + model.fc.bias)
    with pytest.raises(InputError, match="input_size"):
        model(torch.randn(1, 3, 64, 64))


def test_densenet121v_2d_shapes_conv_relu_and_trace() -> None:
    model = DenseNet121v(3, input_size=64, spatial_dims=2, in_channels=1, conv_relu=True).eval()
    assert model.medcam3d_target_layer == "relu"
    traced = torch.fx.symbolic_trace(model)  # before adding hooks (hooks would see the tracing Proxies)
    seen: dict[str, Tensor] = {}
    capture(model.get_submodule("relu"), seen, "a")
    capture(model.features, seen, "f")
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        out = model(x)
        traced_out = traced(x)
    assert tuple(seen["f"].shape) == (2, 1024, 2, 2)  # 64 / 32
    assert tuple(seen["a"].shape) == (2, 512, 1, 1)
    assert (seen["a"] >= 0).all()
    assert tuple(out.shape) == (2, 3)
    torch.testing.assert_close(traced_out, out)


@pytest.mark.parametrize("cls", [ResNet34v, DenseNet121v])
def test_variants_3d_shapes_on_meta(cls: type) -> None:
    with torch.device("meta"):
        model = cls(5, input_size=(64, 96, 64), spatial_dims=3, in_channels=1).eval()
        seen: dict[str, Tensor] = {}
        capture(model.get_submodule(model.medcam3d_target_layer), seen, "a")
        out = model(torch.empty(2, 1, 64, 96, 64))
    assert tuple(seen["a"].shape) == (2, 512, 1, 2, 1)  # map 2x3x2 -> 1x2x1
    assert tuple(model.fc.weight.shape) == (5, 1024)
    assert tuple(out.shape) == (2, 5)


def test_variant_input_size_too_small() -> None:
    with pytest.raises(InputError, match="too small"):
        ResNet34v(2, input_size=32)  # 1x1 ResNet map


def test_camnet3d_is_gap_plus_linear() -> None:
    model = CAMNet3d(3, in_channels=1, width=8).eval().double()
    assert model.medcam3d_target_layer == "features.7"
    seen: dict[str, Tensor] = {}
    layer = model.get_submodule("features.7")
    capture(layer, seen, "a")
    x = torch.randn(2, 1, 40, 48, 40, dtype=torch.float64)
    out = model(x)
    a = seen["a"]  # [2, 64, 2, 2, 2]
    assert tuple(a.shape) == (2, 64, 2, 2, 2)
    torch.testing.assert_close(out, a.mean(dim=(2, 3, 4)) @ model.fc.weight.T + model.fc.bias)
    # CAM architecture: d score_k / dA[c, p] = W[k, c] / N at every position p
    (g,) = torch.autograd.grad(out[0, 1], a)
    expected = (model.fc.weight[1] / 8).reshape(64, 1, 1, 1).expand(64, 2, 2, 2)
    torch.testing.assert_close(g[0], expected)
    assert torch.count_nonzero(g[1]) == 0
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), out.detach())


# --------------------------------------------------------------------------------------------------------------
# build_model / load_model_spec
# --------------------------------------------------------------------------------------------------------------
AXIAL_SPEC = {
    "_target_": "medcam3d.models.AxialNet",
    "n_outputs": 2,
    "in_plane": [96, 96],
    "width": 8,
    "feature_stride": 8,
}


def test_build_model_axialnet_with_relative_weights(tmp_path: Path) -> None:
    reference = build_model(AXIAL_SPEC)
    assert isinstance(reference, AxialNet) and reference.explained_size == (4, 4)
    (tmp_path / "w").mkdir()
    torch.save(reference.state_dict(), tmp_path / "w" / "model.pt")
    model = build_model(AXIAL_SPEC, weights="w/model.pt", base_dir=tmp_path)
    assert not model.training
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_load_model_spec_yaml_axialnet_and_monai(tmp_path: Path) -> None:
    reference = AxialNet(2, in_plane=96, width=8, feature_stride=8).eval()
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "axial.pt")
    (tmp_path / "axial.yaml").write_text(
        "model:\n"
        "  _target_: medcam3d.models.AxialNet\n"
        "  n_outputs: 2\n  in_plane: [96, 96]\n  width: 8\n  feature_stride: 8\n"
        "weights: axial.pt\n"
        "labels: [nodule, effusion]\n"
    )
    with pytest.deprecated_call(match="load_config"):  # the config's is the one model YAML format
        model = load_model_spec(tmp_path / "axial.yaml")
    assert model.medcam3d_labels == ["nodule", "effusion"]
    x = torch.randn(1, 1, 6, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))

    (tmp_path / "monai.yaml").write_text(
        "model:\n"
        "  _target_: monai.networks.nets.DenseNet121\n"
        "  spatial_dims: 2\n  in_channels: 1\n  out_channels: 4\n"
        "target_layer: features.norm5\n"
        "layout: channels_first\n"
    )
    with pytest.deprecated_call():
        net = load_model_spec(tmp_path / "monai.yaml")
    assert type(net).__name__ == "DenseNet121"
    assert net.medcam3d_target_layer == "features.norm5"
    with torch.no_grad():
        assert tuple(net.eval()(torch.randn(1, 1, 64, 64)).shape) == (1, 4)


def test_build_model_monai_factory_function() -> None:
    net = build_model({"_target_": "monai.networks.nets.resnet10", "spatial_dims": 3, "n_input_channels": 1,
                       "num_classes": 2})
    assert isinstance(net, torch.nn.Module)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"_target_": "os.system", "command": "echo hi"}, "only nn.Module classes"),
        ({"_target_": "collections.OrderedDict"}, "not a torch.nn.Module"),
        ({"_target_": "no_such_package_xyz.Net"}, "cannot import"),
        ({"_target_": "medcam3d.models.NoSuchNet"}, "no attribute"),
        ({"_target_": "medcam3d.models.AxialNet", "n_outputs": 2, "bogus": 1}, "bogus"),
        ({"_target_": "medcam3d.models.AxialNet", "n_outputs": 0}, "n_outputs"),
        ({"n_outputs": 2}, "_target_"),
        ({"_target_": "$monai.networks.nets.UNet"}, "not supported"),
    ],
)
def test_build_model_errors(spec: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        build_model(spec)


def test_load_model_spec_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  _target_: medcam3d.models.AxialNet\nextra: 1\n")
    with pytest.raises(InputError, match=r"bad\.yaml.*unknown keys"), pytest.deprecated_call():
        load_model_spec(bad)
    missing_w = tmp_path / "m.yaml"
    missing_w.write_text("model:\n  _target_: medcam3d.models.CAMNet3d\n  n_outputs: 2\nweights: nope.pt\n")
    with pytest.raises(InputError, match=r"nope\.pt.*not found"), pytest.deprecated_call():
        load_model_spec(missing_w)
    layer = tmp_path / "l.yaml"
    layer.write_text("model:\n  _target_: medcam3d.models.CAMNet3d\n  n_outputs: 2\ntarget_layer: nowhere\n")
    with pytest.raises(InputError, match=r"l\.yaml.*nowhere"), pytest.deprecated_call():
        load_model_spec(layer)


def test_declare_model_sets_instance_attributes_over_the_class_ones() -> None:
    model = AxialNet(2, in_plane=96, width=8, feature_stride=8)
    assert declare_model(model) is model
    assert model.medcam3d_target_layer == "conv2d.7" and isinstance(model.medcam3d_layout, SlicesAsBatch)
    assert "medcam3d_target_layer" not in vars(model)  # None left the class's declarations alone
    declare_model(model, labels=("nodule", 7), target_layer="conv2d.4", layout="channels_first")
    assert model.medcam3d_labels == ["nodule", "7"]
    assert model.medcam3d_target_layer == "conv2d.4" and AxialNet.medcam3d_target_layer == "conv2d.7"
    assert type(model.medcam3d_layout).__name__ == "ChannelsFirst"
    with pytest.raises(InputError, match="unknown layout 'sideways'"):
        declare_model(model, layout="sideways")


def test_resolve_weights_forms(tmp_path: Path) -> None:
    import medcam3d.models.loading as loading_module

    assert resolve_weights("a/b.pt", tmp_path) == tmp_path / "a" / "b.pt"
    assert resolve_weights(tmp_path / "x.pt", "/elsewhere") == tmp_path / "x.pt"
    assert resolve_weights("package:medcam3d.models/loading.py") == Path(loading_module.__file__)
    assert resolve_weights("package:medcam3d/weights/demo.pt").parts[-2:] == ("weights", "demo.pt")
    with pytest.raises(InputError, match="package"):
        resolve_weights("package:no_such_package_xyz/w.pt")


# --------------------------------------------------------------------------------------------------------------
# load_checkpoint errors and safety
# --------------------------------------------------------------------------------------------------------------
def test_load_checkpoint_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"absent\.pt.*not found"):
        load_checkpoint(CAMNet3d(2, width=8), tmp_path / "absent.pt")


def test_load_checkpoint_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(InputError, match=r"corrupt\.pt.*not a readable PyTorch checkpoint"):
        load_checkpoint(CAMNet3d(2, width=8), path)


def test_load_checkpoint_wrong_keys_lists_them(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    state = CAMNet3d(2, width=8).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    torch.save(state, path)
    with pytest.raises(InputError, match=r"other\.pt.*missing keys: fc\.bias.*unexpected keys: extra\.weight"):
        load_checkpoint(CAMNet3d(2, width=8), path)
    torch.save(CAMNet3d(3, width=8).state_dict(), path)  # right names, wrong fc shape
    with pytest.raises(InputError, match=r"other\.pt.*shape mismatches: fc\.weight"):
        load_checkpoint(CAMNet3d(2, width=8), path)


def test_load_checkpoint_without_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "notes": "no weights"}, path)
    with pytest.raises(InputError, match=r"meta\.pt.*no state_dict"):
        load_checkpoint(CAMNet3d(2, width=8), path)


def test_load_checkpoint_refuses_pickled_objects(tmp_path: Path) -> None:
    """A checkpoint carrying a reference to a Python callable must not be unpickled (weights_only=True)."""
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": CAMNet3d(2, width=8).state_dict(), "hook": os.getcwd}, path)
    with pytest.raises(InputError, match=r"evil\.pt.*pickled Python objects"):
        load_checkpoint(CAMNet3d(2, width=8), path)


def test_load_demo_reports_missing_demo() -> None:
    with pytest.raises(InputError, match="demo model 'no_such_demo' is not installed"):
        load_demo("no_such_demo")
