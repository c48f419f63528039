"""A hand-written ResNet backbone (2-D or 3-D) with torchvision's parameter names.

The backbone is an :class:`torch.nn.Sequential` of the ResNet children without ``avgpool``/``fc``, in
torchvision's order, so that its state_dict keys read ``0.weight`` (conv1), ``1.*`` (bn1), ``4.0.conv1.weight``
(layer1, block 0), ``6.0.downsample.0.weight`` and so on. Inside a model that stores it as ``features`` the keys
are ``features.0.weight``, ``features.4.0.bn1.running_mean``, ... exactly as in the code of Draelos & Carin
(``nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])``).

Index  torchvision name   module
  0    conv1              Conv(in_channels, w, 7, stride 2, padding 3, no bias)
  1    bn1                BatchNorm(w)
  2    relu               ReLU
  3    maxpool            MaxPool(3, stride 2, padding 1)
  4    layer1             BasicBlock x n1, w channels, stride 1
  5    layer2             BasicBlock x n2, 2w channels, stride 2
  6    layer3             BasicBlock x n3, 4w channels, stride 2 (1 when feature_stride <= 8)
  7    layer4             BasicBlock x n4, 8w channels, stride 2 (1 when feature_stride <= 16)

No weights are ever downloaded; :func:`load_torchvision_resnet_weights` reads a torchvision-style state_dict
(``conv1.weight``, ``layer1.0.conv1.weight``, ..., ``fc.*``) from a local file.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import InputError
from .loading import load_state_dict_checked, read_state_dict

__all__ = [
    "RESNET_LAYERS",
    "BasicBlock",
    "conv_out_size",
    "load_torchvision_resnet_weights",
    "resnet_feature_size",
    "resnet_features",
    "resnet_layer_strides",
]

#: Blocks per stage of the BasicBlock ResNets.
RESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

_TORCHVISION_TO_INDEX = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


def _conv(spatial_dims: int) -> type[nn.Module]:
    if spatial_dims == 2:
        return nn.Conv2d
    if spatial_dims == 3:
        return nn.Conv3d
    raise InputError(f"spatial_dims={spatial_dims!r}: expected 2 or 3")


def _bn(spatial_dims: int) -> type[nn.Module]:
    return nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d


def _maxpool(spatial_dims: int) -> type[nn.Module]:
    return nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d


def conv_out_size(n: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution or pooling along one axis of length ``n`` (no dilation, floor mode)."""
    return (n + 2 * padding - kernel) // stride + 1


class BasicBlock(nn.Module):
    """The ResNet-18/34 residual block, ``[N, C_in, *s] -> [N, planes, *s/stride]``.

    Parameter names follow torchvision (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample.0``,
    ``downsample.1``). Unlike torchvision, the two ReLUs are separate, non-inplace modules (``relu1`` inside,
    ``relu`` on the block output) so that a forward hook on either fires once per forward pass; neither holds
    parameters, so the state_dict is unchanged.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, spatial_dims: int = 2) -> None:
        super().__init__()
        conv, bn = _conv(spatial_dims), _bn(spatial_dims)
        self.conv1 = conv(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = bn(planes)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            shortcut = conv(inplanes, planes, kernel_size=1, stride=stride, bias=False)
            self.downsample = nn.Sequential(shortcut, bn(planes))

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, C_in, *s]`` -> ``[N, planes, *s']``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def resnet_layer_strides(feature_stride: int) -> tuple[int, int, int, int]:
    """Strides of layer1..layer4 giving a total downsampling of ``feature_stride`` (8, 16 or 32)."""
    table = {8: (1, 2, 1, 1), 16: (1, 2, 2, 1), 32: (1, 2, 2, 2)}
    if feature_stride not in table:
        raise InputError(f"feature_stride={feature_stride!r}: expected 8, 16 or 32")
    return table[feature_stride]


def resnet_features(
    depth: int = 18,
    width: int = 64,
    in_channels: int = 3,
    spatial_dims: int = 2,
    feature_stride: int = 32,
) -> nn.Sequential:
    """Build the ResNet children without avgpool/fc: ``[N, in_channels, *s] -> [N, 8*width, *s/feature_stride]``.

    Args:
        depth: 18 or 34 (BasicBlock ResNets).
        width: channels of conv1/layer1 (64 in the standard ResNet); layers 2-4 have 2, 4 and 8 times as many.
        in_channels: input channels (3 for RGB / AxialNet's three-slice groups).
        spatial_dims: 2 or 3.
        feature_stride: total downsampling, 8, 16 or 32 (standard). Lower strides set the stride of layer3 and/or
            layer4 to 1; the parameter shapes and names do not change.
    """
    if depth not in RESNET_LAYERS:
        raise InputError(f"depth={depth!r}: expected one of {sorted(RESNET_LAYERS)}")
    if not isinstance(width, int) or width < 1:
        raise InputError(f"width={width!r}: expected a positive integer")
    conv, bn, pool = _conv(spatial_dims), _bn(spatial_dims), _maxpool(spatial_dims)
    strides = resnet_layer_strides(feature_stride)
    children: list[nn.Module] = [
        conv(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False),
        bn(width),
        nn.ReLU(),
        pool(kernel_size=3, stride=2, padding=1),
    ]
    inplanes = width
    for stage, (n_blocks, stride) in enumerate(zip(RESNET_LAYERS[depth], strides)):
        planes = width * 2**stage
        blocks = [BasicBlock(inplanes, planes, stride, spatial_dims)]
        blocks += [BasicBlock(planes, planes, 1, spatial_dims) for _ in range(n_blocks - 1)]
        children.append(nn.Sequential(*blocks))
        inplanes = planes
    features = nn.Sequential(*children)
    for m in features.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return features


def resnet_feature_size(n: int, feature_stride: int = 32) -> int:
    """Length along one spatial axis of :func:`resnet_features`' output for an input of length ``n``.

    Example: 420 -> 210 (conv1) -> 105 (maxpool) -> 53 -> 27 -> 14 for feature_stride 32."""
    n = conv_out_size(n, 7, 2, 3)  # conv1
    n = conv_out_size(n, 3, 2, 1)  # maxpool
    for stride in resnet_layer_strides(feature_stride):
        n = conv_out_size(n, 3, stride, 1)  # first 3x3 conv of the stage (the 1x1 downsample agrees)
    return n


def load_torchvision_resnet_weights(
    features: nn.Sequential,
    source: str | PathLike[str] | Mapping[str, Tensor],
) -> nn.Sequential:
    """Copy a torchvision-style ResNet state_dict (e.g. ImageNet resnet18 weights saved to a local file) into a
    backbone built by :func:`resnet_features`.

    Keys are mapped ``conv1.* -> 0.*``, ``bn1.* -> 1.*``, ``layerK.* -> (K+3).*``; ``fc.*`` is dropped. Keys that
    are already in index form (``0.weight``, or ``features.0.weight``) are accepted too. Missing
    ``num_batches_tracked`` buffers (old torchvision files) are allowed. Nothing is ever downloaded.

    Args:
        features: the backbone (``model.features``).
        source: a path to a ``torch.save``'d state_dict (read with ``weights_only=True``) or the state_dict.

    Raises:
        InputError: unreadable file, missing/unexpected keys or shape mismatches (for instance ImageNet weights
            into a backbone of width != 64).
    """
    if isinstance(source, Mapping):
        state, where = dict(source), "resnet state_dict"
    else:
        state, where = read_state_dict(source), str(Path(source))
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        key = key.removeprefix("features.")
        head, _, rest = key.partition(".")
        if head == "fc":
            continue
        mapped[f"{_TORCHVISION_TO_INDEX.get(head, head)}.{rest}"] = value
    load_state_dict_checked(features, mapped, where)
    return features


def _is_tracing(x: object) -> bool:
    """True while ``torch.fx.symbolic_trace`` runs the forward (input checks must be skipped then)."""
    return isinstance(x, torch.fx.Proxy)
