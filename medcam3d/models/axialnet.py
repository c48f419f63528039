"""AxialNet (Draelos & Carin): a 2-D ResNet-18 over groups of three axial slices, a per-slice FC, slice mean.

This follows the authors' code (``rachellea/explainable-ct-ai``, ``src/models/custom_models_base.py`` and
``components.py``; ``rachellea/hirescam``, ``attn_analysis/model_outputs_classes.py``): the same module names
(``features``, ``conv2d``, ``fc``) and parameter shapes, so a state_dict saved by their code loads with
``load_state_dict(strict=True)`` (their checkpoints wrap it as ``{"params": state_dict, "optimizer": ...}``;
:func:`medcam3d.models.load_checkpoint` unwraps that).

Data flow for an input ``[B, 1, S, H, W]`` (S divisible by 3, T = S/3; full size S, H, W = 405, 420, 420)::

    reshape                  [B*T, 3, H, W]       slices 3t, 3t+1, 3t+2 become the RGB channels of image t
    features (ResNet-18)     [B*T, 8w, h0, w0]    [135, 512, 14, 14] at full size
    conv2d (4x conv3x3+ReLU) [B*T, 16, h, w]      h = h0 - 8: [135, 16, 6, 6]; conv2d.7 is the explained layer
    fc (Conv2d, kernel h x w)[B*T, M, 1, 1]       a per-slice fully connected layer
    reshape, mean over T     [B, M]               raw scores (logits); no sigmoid

The head after the explained layer (``fc`` + slice mean) is affine in the explained activations, so HiResCAM
on ``conv2d.7`` is exact (the paper's Section 4). The explained layer emits slices in the batch axis; the model
declares :class:`medcam3d.layouts.SlicesAsBatch` so explanations come out as volumes ``[B, F, T, h, w]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

from torch import Tensor, nn

from ..errors import InputError
from ..geometry import MapGeometry, conv_chain_geometry
from ..layouts import SlicesAsBatch
from .resnet import (
    _is_tracing,
    load_torchvision_resnet_weights,
    resnet_feature_size,
    resnet_features,
)

__all__ = ["AxialNet", "final_conv", "load_resnet18_weights"]


def final_conv(in_channels: int = 512) -> nn.Sequential:
    """The authors' four valid 3x3 convolutions: ``[N, in_channels, h0, w0] -> [N, 16, h0-8, w0-8]``.

    Modules ``0, 2, 4, 6`` are Conv2d (512->64->32->16->16 at full width, stride 1, no padding) and ``1, 3, 5, 7``
    ReLU (non-inplace here; the authors' inplace flag does not change the state_dict)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=0),
        nn.ReLU(),
        nn.Conv2d(64, 32, kernel_size=3, stride=1, padding=0),
        nn.ReLU(),
        nn.Conv2d(32, 16, kernel_size=3, stride=1, padding=0),
        nn.ReLU(),
        nn.Conv2d(16, 16, kernel_size=3, stride=1, padding=0),
        nn.ReLU(),
    )


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    items = tuple(value)
    if len(items) != 2 or not all(isinstance(v, int) for v in items):
        raise InputError(f"{name}={value!r}: expected an int or a pair of ints (H, W)")
    return items[0], items[1]


class AxialNet(nn.Module):
    """AxialNet: ``[B, 1, S, H, W] -> [B, n_outputs]`` raw multi-label scores.

    Args:
        n_outputs: number of outputs M (80 in the paper's final model, 83 in some of the authors' runs).
        in_plane: axial slice size (H, W) the model is built for, or one int for square slices. The per-slice FC
            is a Conv2d whose kernel covers the whole explained map, so H and W are fixed by the weights; the
            number of slices S is free (any multiple of 3).
        width: ResNet base width (64 = ResNet-18, the paper). The conv2d stack then takes ``8*width`` channels.
        feature_stride: ResNet downsampling, 32 (paper), 16 or 8. For example a 128x128 slice gives a 16x16
            backbone map at stride 8 and an 8x8 explained map; at stride 32 it would give 4x4, too small.
        labels: optional output names (``len == n_outputs``), stored as ``medcam3d_labels``.
        pretrained_path: optional local file with a torchvision-style ImageNet ResNet-18 state_dict to load into
            ``features`` (see :func:`load_resnet18_weights`; ``width`` must be 64). Nothing is downloaded.

    Shapes (full size, ``AxialNet(80)``, input ``[1, 1, 405, 420, 420]``): features ``[135, 512, 14, 14]``,
    explained layer ``conv2d.7`` ``[135, 16, 6, 6]``, ``fc`` kernel 6x6, output ``[1, 80]``.
    """

    medcam3d_target_layer = "conv2d.7"
    medcam3d_layout = SlicesAsBatch()

    def __init__(
        self,
        n_outputs: int = 80,
        in_plane: int | Sequence[int] = (420, 420),
        width: int = 64,
        feature_stride: int = 32,
        labels: Sequence[str] | None = None,
        pretrained_path: str | PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(n_outputs, int) or n_outputs < 1:
            raise InputError(f"n_outputs={n_outputs!r}: expected a positive integer")
        self.n_outputs = n_outputs
        self.in_plane = _pair(in_plane, "in_plane")
        self.width = width
        self.feature_stride = feature_stride
        backbone = tuple(resnet_feature_size(n, feature_stride) for n in self.in_plane)
        explained = tuple(n - 8 for n in backbone)
        if min(explained) < 1:
            raise InputError(
                f"in_plane={self.in_plane}: slices this small give a {backbone[0]}x{backbone[1]} ResNet map at "
                f"feature_stride={feature_stride}, but the four 3x3 convolutions need at least 9x9; use larger "
                "slices or a smaller feature_stride"
            )
        #: ``(h0, w0)`` of the ResNet output and ``(h, w)`` of the explained layer for ``in_plane`` slices.
        self.feature_size: tuple[int, int] = (backbone[0], backbone[1])
        self.explained_size: tuple[int, int] = (explained[0], explained[1])
        self.features = resnet_features(18, width=width, in_channels=3, spatial_dims=2, feature_stride=feature_stride)
        self.conv2d = final_conv(8 * width)
        self.fc = nn.Conv2d(16, n_outputs, kernel_size=self.explained_size, stride=self.explained_size, padding=0)
        if labels is not None:
            labels = [str(label) for label in labels]
            if len(labels) != n_outputs:
                raise InputError(f"labels: got {len(labels)} names for n_outputs={n_outputs}")
            self.medcam3d_labels = labels
        if pretrained_path is not None:
            load_resnet18_weights(self, pretrained_path)

    def medcam3d_map_geometry(self, input_size: Sequence[int], map_size: Sequence[int]) -> MapGeometry:
        """Where the explained cells ``[S/3, h, w]`` sit on the input ``[S, H, W]``: slice group t is centred on
        slice 3t + 1; in-plane, the receptive-field centres of the ResNet and the four unpadded 3x3 convolutions
        (for feature stride s: pixel s (i + 4), e.g. 32 i + 128 of 420 at the paper's size)."""
        chain = [m for name, m in self.features.named_modules() if "downsample" not in name]
        offset, stride = conv_chain_geometry([*chain, *self.conv2d], nd=2)
        return MapGeometry((1.0, *offset), (3.0, *stride), "receptive")

    def check_input(self, x: Tensor) -> None:
        """Raise :class:`InputError` unless ``x`` is ``[B, 1, S, H, W]`` with S a multiple of 3 and (H, W) equal to
        ``in_plane``."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise InputError(f"AxialNet input has shape {tuple(x.shape)}; expected [B, 1, S, H, W]")
        s, h, w = (int(v) for v in x.shape[2:])
        if s == 0 or s % 3 != 0:
            raise InputError(
                f"AxialNet input has S={s} slices; S must be a positive multiple of 3 (three consecutive axial "
                "slices form one RGB image)"
            )
        if (h, w) != self.in_plane:
            raise InputError(
                f"AxialNet input slices are {h}x{w} but the model was built for in_plane={self.in_plane} (its "
                f"per-slice FC covers a {self.explained_size[0]}x{self.explained_size[1]} map); resample the scan "
                "to the model's input size"
            )

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, 1, S, H, W]`` -> scores ``[B, n_outputs]`` (mean over the S/3 slice groups of per-slice scores)."""
        if not _is_tracing(x):
            self.check_input(x)
        groups = x.shape[2] // 3  # T = S/3 slice groups per sample
        x = x.reshape(-1, 3, x.shape[3], x.shape[4])  # [B*T, 3, H, W], sample-major
        x = self.features(x)  # [B*T, 8w, h0, w0]
        x = self.conv2d(x)  # [B*T, 16, h, w]; conv2d.7 is the explained layer
        x = self.fc(x)  # [B*T, M, 1, 1]
        x = x.reshape(-1, groups, self.n_outputs)  # [B, T, M]; depends on T only, so replicated rows stay apart
        return x.mean(dim=1)  # [B, M]


def load_resnet18_weights(model: AxialNet, path: str | PathLike[str]) -> AxialNet:
    """Load a torchvision-style ImageNet ResNet-18 state_dict from the local file ``path`` into ``model.features``.

    Keys ``conv1.*, bn1.*, layer1.*..layer4.*`` map to ``features.0, 1, 4..7``; ``fc.*`` is dropped. Requires
    ``width=64`` (any ``feature_stride``: strides do not change parameter shapes). Returns ``model``.

    Raises:
        InputError: unreadable file or keys/shapes that do not match (message names the file).
    """
    load_torchvision_resnet_weights(model.features, path)
    return model
