"""The paper's explanation-friendly variants (2-D or 3-D) and a CAM-architecture 3-D net.

``ResNet34v`` and ``DenseNet121v`` follow Section 5.1 of Draelos & Carin: the convolutional backbone, then ONE
convolution with 512 filters of kernel size 2 (stride 1, no padding), then ONE fully connected layer on the
flattened maps; no global pooling. The head after the explained layer (flatten + Linear) is linear, so HiResCAM
on that layer is exact and Grad-CAM is not (it averages the position-specific FC weights away). The paper does
not mention an activation after the 512-filter convolution, so by default there is none and the explained layer
is the convolution itself (``"conv"``); ``conv_relu=True`` adds a ReLU and explains its output (``"relu"``).

``CAMNet3d`` is the CAM architecture (backbone, global average pooling, Linear), for which CAM, HiResCAM and
Grad-CAM coincide (the gradient of a score w.r.t. the last maps is the FC weight divided by the number of
positions, the same at every position).

All input sizes are constructor arguments because the FC size depends on them; a wrong input size raises
:class:`medcam3d.errors.InputError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import InputError
from .loading import declare_model
from .resnet import (
    _conv,
    _is_tracing,
    conv_out_size,
    resnet_feature_size,
    resnet_features,
)

__all__ = ["CAMNet3d", "DenseNet121v", "ResNet34v", "densenet_feature_size"]


def _sizes(input_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims={spatial_dims!r}: expected 2 or 3")
    if isinstance(input_size, int):
        return (input_size,) * spatial_dims
    sizes = tuple(input_size)
    if len(sizes) != spatial_dims or not all(isinstance(n, int) and n > 0 for n in sizes):
        raise InputError(f"input_size={input_size!r}: expected {spatial_dims} positive ints (spatial size)")
    return sizes


def _set_labels(model: nn.Module, labels: Sequence[str] | None, n_outputs: int) -> None:
    if labels is None:
        return
    names = [str(label) for label in labels]
    if len(names) != n_outputs:
        raise InputError(f"labels: got {len(names)} names for n_outputs={n_outputs}")
    declare_model(model, labels=names)


def _check_nd_input(name: str, x: Tensor, in_channels: int, spatial: tuple[int, ...] | None) -> None:
    nd = 2 + (len(spatial) if spatial is not None else 3)
    axes = "[B, C, " + ", ".join("DHW"[-(nd - 2) :]) + "]"
    if x.ndim != nd or x.shape[1] != in_channels:
        raise InputError(f"{name} input has shape {tuple(x.shape)}; expected {axes} with C={in_channels}")
    if spatial is not None and tuple(int(n) for n in x.shape[2:]) != spatial:
        raise InputError(
            f"{name} input has spatial size {tuple(int(n) for n in x.shape[2:])} but the model was built for "
            f"input_size={spatial} (its fully connected layer depends on it); resample the input"
        )


def densenet_feature_size(n: int) -> int:
    """Length along one axis of the DenseNet-121 feature maps for an input of length ``n`` (stride 32)."""
    n = conv_out_size(conv_out_size(n, 7, 2, 3), 3, 2, 1)  # conv0, pool0
    for _ in range(3):  # transition1..3: AvgPool(2, stride 2)
        n = conv_out_size(n, 2, 2, 0)
    return n


class _ConvFCVariant(nn.Module):
    """``features`` -> ``conv`` (512 filters, kernel 2, stride 1, no padding) [-> ``relu``] -> flatten -> ``fc``."""

    name = "model"
    # set by the subclasses' constructors (``relu`` only with ``conv_relu``)
    input_size: tuple[int, ...]
    in_channels: int
    conv_relu: bool
    features: nn.Module
    relu: nn.Module

    def _build_head(
        self,
        n_outputs: int,
        feature_channels: int,
        feature_size: tuple[int, ...],
        spatial_dims: int,
        conv_relu: bool,
    ) -> None:
        explained = tuple(n - 1 for n in feature_size)
        if min(explained) < 1:
            raise InputError(
                f"input_size={self.input_size}: the backbone map is {'x'.join(map(str, feature_size))}, too small "
                "for the 2-wide convolution; use a larger input_size"
            )
        #: spatial size of the explained maps (the 512-filter convolution's output)
        self.explained_size = explained
        self.conv = _conv(spatial_dims)(feature_channels, 512, kernel_size=2, stride=1, padding=0)
        if conv_relu:
            self.relu = nn.ReLU()
        self.fc = nn.Linear(512 * math.prod(explained), n_outputs)
        self.medcam3d_target_layer = "relu" if conv_relu else "conv"

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, *input_size]`` -> scores ``[B, n_outputs]``."""
        if not _is_tracing(x):
            _check_nd_input(self.name, x, self.in_channels, self.input_size)
        x = self.conv(self.features(x))  # [B, 512, *explained_size]
        if self.conv_relu:
            x = self.relu(x)
        return self.fc(x.flatten(1))  # [B, n_outputs]


class ResNet34v(_ConvFCVariant):
    """ResNet-34 convolutions, a 512-filter 2-wide convolution, one Linear: ``[B, C, *input_size] -> [B, M]``.

    Args:
        n_outputs: number of outputs M.
        input_size: spatial input size (an int for a square/cubic input); e.g. 224 gives a 7x7 ResNet map, 6x6
            explained maps and ``fc = Linear(512*36, M)``.
        spatial_dims: 2 (images) or 3 (volumes).
        in_channels: input channels (3 for RGB images as in the paper's PASCAL VOC experiments, 1 for CT).
        conv_relu: add a ReLU after the 512-filter convolution (then the explained layer is ``"relu"``).
        labels: optional output names, stored as ``medcam3d_labels``.

    Modules: ``features`` (torchvision ResNet-34 children without avgpool/fc: ``features.0`` conv1 ...
    ``features.7`` layer4, so 2-D torchvision weights load with
    :func:`medcam3d.models.load_torchvision_resnet_weights`), ``conv``, optional ``relu``, ``fc``.
    """

    name = "ResNet34v"

    def __init__(
        self,
        n_outputs: int,
        input_size: int | Sequence[int],
        spatial_dims: int = 2,
        in_channels: int = 1,
        conv_relu: bool = False,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.input_size = _sizes(input_size, spatial_dims)
        self.in_channels = in_channels
        self.conv_relu = conv_relu
        self.features = resnet_features(34, 64, in_channels, spatial_dims)
        size = tuple(resnet_feature_size(n) for n in self.input_size)
        self._build_head(n_outputs, 512, size, spatial_dims, conv_relu)
        _set_labels(self, labels, n_outputs)


class DenseNet121v(_ConvFCVariant):
    """DenseNet-121 features, ReLU, a 512-filter 2-wide convolution, one Linear: ``[B, C, *input_size] -> [B, M]``.

    The backbone is MONAI's ``DenseNet121(...).features`` (torchvision-style names ``features.conv0``,
    ``features.denseblock1.denselayer1.layers.norm1``, ... ``features.norm5``) with a ReLU appended as
    ``features.relu5`` (DenseNet's ``norm5`` output is pre-activation; its own head applies the ReLU too).
    Arguments as :class:`ResNet34v`; the feature map has stride 32 and 1024 channels.
    """

    name = "DenseNet121v"

    def __init__(
        self,
        n_outputs: int,
        input_size: int | Sequence[int],
        spatial_dims: int = 2,
        in_channels: int = 1,
        conv_relu: bool = False,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        from monai.networks.nets import DenseNet121  # lazy: MONAI is slow to import

        self.input_size = _sizes(input_size, spatial_dims)
        self.in_channels = in_channels
        self.conv_relu = conv_relu
        densenet = DenseNet121(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1, act=("relu", {"inplace": False})
        )
        features = densenet.features
        features.add_module("relu5", nn.ReLU())
        self.features = features
        size = tuple(densenet_feature_size(n) for n in self.input_size)
        self._build_head(n_outputs, 1024, size, spatial_dims, conv_relu)
        _set_labels(self, labels, n_outputs)


class CAMNet3d(nn.Module):
    """A CAM-architecture 3-D CNN: ResNet backbone, global average pooling, Linear: ``[B, C, D, H, W] -> [B, M]``.

    Args:
        n_outputs: number of outputs M.
        in_channels: input channels (1 for CT).
        width: ResNet base width (last maps have ``8*width`` channels); 16 keeps it small.
        depth: 18 or 34.
        feature_stride: 8, 16 or 32 (see :func:`medcam3d.models.resnet_features`).
        labels: optional output names, stored as ``medcam3d_labels``.

    The explained layer is ``features.7`` (layer4, after its final ReLU): ``[B, 8*width, d, h, w]``. Any input
    size works (global pooling); with stride 32 each spatial axis must be at least 33 voxels to leave a map.
    """

    medcam3d_target_layer = "features.7"

    def __init__(
        self,
        n_outputs: int,
        in_channels: int = 1,
        width: int = 16,
        depth: int = 18,
        feature_stride: int = 32,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.features = resnet_features(depth, width, in_channels, spatial_dims=3, feature_stride=feature_stride)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(8 * width, n_outputs)
        _set_labels(self, labels, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, D, H, W]`` -> scores ``[B, n_outputs]`` = ``fc(mean over positions of features.7)``."""
        if not _is_tracing(x):
            _check_nd_input("CAMNet3d", x, self.in_channels, None)
        x = self.features(x)  # [B, 8w, d, h, w]
        return self.fc(self.pool(x).flatten(1))  # [B, M]
