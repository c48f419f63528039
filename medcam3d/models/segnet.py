"""A small 3-D UNet-style segmentation network whose output is a 1x1x1 convolution: exact HiResCAM per region.

``SegNet3d`` maps a CT volume ``x [B, 1, S, H, W]`` to per-voxel class logits ``[B, C, S, H, W]`` (softmax over
the C channels, prediction = argmax; channel 0 is the background). It is the demo segmentation model
(``configs/demo_segnet.yaml``, trained on the synthetic phantoms' lesion masks by ``scripts/train_seg_demo.py``).

Layout (``w`` = ``width``; sizes for the demo grid ``S, H, W = 60, 128, 128`` at 5 x 2.5 x 2.5 mm)::

    window       x and its soft-tissue window                   [B,  2, 60, 128, 128]
    stem         3x3x3 conv 2 -> w                              [B,  w, 60, 128, 128]
    enc1         pool (1,2,2), 3x3x3 conv w -> 2w               [B, 2w, 60,  64,  64]  (5 x 5 x 5 mm voxels)
    enc2         pool (2,2,2), two 3x3x3 convs 2w -> 4w         [B, 4w, 30,  32,  32]
    bottom       pool (2,2,2), two 3x3x3 convs 4w -> 8w         [B, 8w, 15,  16,  16]
    up2          up x2 (transposed conv) to 4w, + enc2, 3x3x3   [B, 4w, 30,  32,  32]
    up1          up x2 (transposed conv) to 2w, + enc1, 3x3x3   [B, 2w, 60,  64,  64]
    upsample     up (1,2,2) (transposed conv) 2w -> 2w          [B, 2w, 60, 128, 128]
    decoder_out  concat stem, 1x1x1 conv 3w -> 2w, BN, ReLU     [B, 2w, 60, 128, 128]  <- medcam3d_target_layer
    out          1x1x1 conv 2w -> C (the logits)                [B,  C, 60, 128, 128]

The window channel ``clamp((x - low) / (high - low), 0, 1)`` spreads the soft-tissue range over [0, 1]: the
lesion types differ by a few tens of HU (a few hundredths of the network input's range), which a net trained
for minutes on a CPU does not learn to resolve from the full-range input alone. Pooling is in-plane first (the
slices are twice as thick as the pixels are wide), then isotropic; the transposed convolutions have kernel =
stride (no overlap). The full-resolution block is pointwise to keep training on a CPU cheap: the coarse levels
carry the context, the stem the edges. Every convolution but the transposed ones and ``out`` is followed by
BatchNorm and ReLU. Spatial sizes must be multiples of (4, 8, 8).

The explained layer ``decoder_out`` feeds only ``out``, so the head after it is affine: the score of class ``c``
summed over a region ``R`` is ``sum_{v in R} (W_c . A_v + b_c)``, and HiResCAM at ``decoder_out`` (activations
times gradients, summed over channels) sums to that score minus ``|R| b_c`` -- the certificate's
``affine-head`` kind. Explaining a deeper layer (``up1``, ``bottom``) goes through the nonlinear decoder and
gets no such guarantee.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import InputError
from .loading import declare_model
from .resnet import _is_tracing

__all__ = ["SEG_DEMO_LABELS", "SOFT_TISSUE_WINDOW", "SegNet3d", "Window"]

SEG_DEMO_LABELS: tuple[str, ...] = (
    "background",
    "nodule",
    "mass",
    "consolidation",
    "atelectasis",
    "pleural_effusion",
    "pericardial_effusion",
)
"""Output channels of the demo segmentation model: background, then one class per phantom lesion type (left and
right merged: laterality is where the component lies)."""

#: how much each spatial axis shrinks from the input to the bottleneck; input sizes must be multiples of it
DOWNSAMPLING: tuple[int, int, int] = (4, 8, 8)


def _conv_block(c_in: int, c_out: int, kernel: int = 3) -> nn.Sequential:
    """Conv3d (``kernel``, same padding, no bias) -> BatchNorm3d -> ReLU: ``[B, c_in, *s]`` -> ``[B, c_out, *s]``.

    The ReLU is not in place, so that a hook on any inner layer (an explained BatchNorm, say) sees its own output."""
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(),
    )


def _upsample(c_in: int, c_out: int, scale: tuple[int, int, int]) -> nn.ConvTranspose3d:
    """Learned upsampling: a transposed convolution with kernel = stride = ``scale`` (each coarse voxel paints its
    own ``scale`` block; no overlap), ``[B, c_in, *s]`` -> ``[B, c_out, *(s * scale)]``."""
    return nn.ConvTranspose3d(c_in, c_out, scale, stride=scale)


class _Up(nn.Module):
    """Decoder level: ``coarse [B, c_in, *s]`` -> upsample by ``scale`` to ``c_out`` channels -> add
    ``skip [B, c_out, *(s * scale)]`` -> 3x3x3 conv block -> ``[B, c_out, *(s * scale)]``."""

    def __init__(self, c_in: int, c_out: int, scale: tuple[int, int, int]) -> None:
        super().__init__()
        self.upsample = _upsample(c_in, c_out, scale)
        self.conv = _conv_block(c_out, c_out)

    def forward(self, coarse: Tensor, skip: Tensor) -> Tensor:
        return self.conv(self.upsample(coarse) + skip)


#: (-100, 100) HU in the demo preprocessing's units (HU clipped to [-1000, 800], scaled to [0, 1], minus 0.449)
SOFT_TISSUE_WINDOW: tuple[float, float] = (900 / 1800 - 0.449, 1100 / 1800 - 0.449)


class Window(nn.Module):
    """``x [B, 1, *s]`` -> ``[B, 2, *s]``: ``x`` and ``clamp((x - low) / (high - low), 0, 1)`` (fixed, no weights)."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        if not high > low:
            raise InputError(f"SegNet3d window: need low < high, got ({low}, {high})")
        self.low, self.high = float(low), float(high)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, ((x - self.low) / (self.high - self.low)).clamp(0.0, 1.0)], dim=1)

    def extra_repr(self) -> str:
        return f"low={self.low:.4f}, high={self.high:.4f}"


class SegNet3d(nn.Module):
    """Small 3-D UNet-style segmentation net; logits ``[B, C, S, H, W]`` for ``x [B, 1, S, H, W]`` (C = labels).

    Args:
        labels: output channel names, background first (default :data:`SEG_DEMO_LABELS`); set as
            ``medcam3d_labels``.
        width: channels of the full-resolution levels (``w`` in the module docstring); the levels have w, 2w, 4w
            and 8w channels.
        window: ``(low, high)`` of the soft-tissue window channel, in the network input's units (default
            :data:`SOFT_TISSUE_WINDOW`, -100 to 100 HU under the demo preprocessing).

    Declares ``medcam3d_target_layer = "decoder_out"`` (the last decoder block, which feeds only the 1x1x1
    ``out`` convolution: HiResCAM there is exact), ``medcam3d_labels`` and ``medcam3d_task = "segmentation"``.

    Example::

        net = SegNet3d().eval()
        logits = net(torch.zeros(1, 1, 60, 128, 128))   # [1, 7, 60, 128, 128]
        prediction = logits.argmax(1)                   # [1, 60, 128, 128], 0 = background
    """

    medcam3d_target_layer: str = "decoder_out"
    medcam3d_task: str = "segmentation"

    def __init__(self, labels: Sequence[str] = SEG_DEMO_LABELS, width: int = 8,
                 window: Sequence[float] = SOFT_TISSUE_WINDOW) -> None:
        super().__init__()
        names = [str(x) for x in labels]
        if len(names) < 2 or len(set(names)) != len(names):
            raise InputError(f"SegNet3d labels: need at least two unique names (background first), got {names}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise InputError(f"SegNet3d width: expected a positive int, got {width!r}")
        if len(window) != 2:
            raise InputError(f"SegNet3d window: expected (low, high), got {window!r}")
        w = width
        self.window = Window(*window)
        self.stem = _conv_block(2, w)
        self.enc1 = nn.Sequential(nn.MaxPool3d((1, 2, 2)), _conv_block(w, 2 * w))
        self.enc2 = nn.Sequential(nn.MaxPool3d(2), _conv_block(2 * w, 4 * w), _conv_block(4 * w, 4 * w))
        self.bottom = nn.Sequential(nn.MaxPool3d(2), _conv_block(4 * w, 8 * w), _conv_block(8 * w, 8 * w))
        self.up2 = _Up(8 * w, 4 * w, (2, 2, 2))
        self.up1 = _Up(4 * w, 2 * w, (2, 2, 2))
        self.upsample = _upsample(2 * w, 2 * w, (1, 2, 2))
        self.decoder_out = _conv_block(3 * w, 2 * w, kernel=1)
        self.out = nn.Conv3d(2 * w, len(names), 1)
        declare_model(self, labels=names)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, 1, S, H, W]`` (S a multiple of 4, H and W of 8) -> logits ``[B, C, S, H, W]``."""
        if not _is_tracing(x):
            _check_input(x)
        s0 = self.stem(self.window(x))  # [B, w, S, H, W]
        s1 = self.enc1(s0)  # [B, 2w, S, H/2, W/2]
        s2 = self.enc2(s1)  # [B, 4w, S/2, H/4, W/4]
        d1 = self.up1(self.up2(self.bottom(s2), s2), s1)  # [B, 2w, S, H/2, W/2]
        features = self.decoder_out(torch.cat([self.upsample(d1), s0], dim=1))  # [B, 2w, S, H, W]
        return self.out(features)


def _check_input(x: Tensor) -> None:
    """One-line :class:`InputError` for an input that is not ``[B, 1, S, H, W]`` with sizes the net can pool."""
    if x.ndim != 5 or x.shape[1] != 1:
        raise InputError(f"SegNet3d input has shape {tuple(x.shape)}; expected [B, 1, S, H, W]")
    spatial = tuple(int(n) for n in x.shape[2:])
    if any(n % d for n, d in zip(spatial, DOWNSAMPLING)):
        raise InputError(
            f"SegNet3d input has spatial size {spatial}; each axis must be a multiple of {DOWNSAMPLING} "
            "(pad or crop it, e.g. with ResizeWithPadOrCrop)"
        )
