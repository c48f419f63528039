"""Benchmark: explaining every connected component of a segmentation at once, against one inference.

A 3-D UNet at 128³ on the CPU (a small custom one or MONAI's ``DynUNet``, both with a 1×1×1 output convolution, or
MONAI's ``UNet``, whose last layer is a transposed convolution, so no layer feeds a pointwise head), one input
holding a few bright blobs in noise. The predicted mask of class 1 is split into its 26-connected components (at
most ``--max-targets``, largest first) and all of them are explained together (HiResCAM + Grad-CAM, with the
certificate), at

* the layer feeding the output convolution (the default of ``target_layer="auto"`` for segmentation nets), with
  and without the certificate (``certify=False``), and
* the bottleneck (the deepest layer: its head is most of the network).

Printed: seconds of one inference (``model(x)`` without a graph), of each explanation, and their ratio -- median of
``--repeats`` (the bottleneck, slow, of ``--bottleneck-repeats`` after no warm-up), measured side by side in one run,
plus the explanation's own stage timings. Target: ≤ 1.5× one inference at the layer feeding the output
convolution.

Usage: python scripts/bench_seg.py [--net custom|dynunet|monai] [--size 128] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from medcam3d import Explainer
from medcam3d.targets import SegmentationRegions


class SmallUNet(nn.Module):
    """Three levels, ``c`` channels at full resolution doubling per level, transposed-conv up path with skip
    concatenations, a 1×1×1 output convolution (like DynUNet and SegResNet)."""

    def __init__(self, c: int = 8, classes: int = 3) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv3d(i, o, 3, stride=stride, padding=1), nn.InstanceNorm3d(o), nn.ReLU())

        self.enc1 = block(1, c)
        self.enc2 = block(c, 2 * c, 2)
        self.bottleneck = block(2 * c, 4 * c, 2)
        self.up2 = nn.ConvTranspose3d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = block(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose3d(2 * c, c, 2, stride=2)
        self.dec1 = block(2 * c, c)
        self.out = nn.Conv3d(c, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottleneck(e2)
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        return self.out(self.dec1(torch.cat([self.up1(d2), e1], dim=1)))


def build(name: str) -> tuple[nn.Module, str, str]:
    """(model, layer feeding the output convolution, bottleneck layer)."""
    if name == "custom":
        return SmallUNet(), "dec1.2", "bottleneck.2"
    if name == "dynunet":  # MONAI's nnU-Net: a 1x1x1 output block after the decoder (skip_layers' output)
        from monai.networks.nets import DynUNet

        net = DynUNet(3, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                      filters=[8, 16, 32])
        return net, "skip_layers", "bottleneck"
    from monai.networks.nets import UNet  # lazy: only for --net monai (its last layer is not 1x1x1)

    net = UNet(3, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1)
    return net, "model.1", "model.1.submodule.1.submodule.1.submodule"


def blobs(size: int, seed: int = 0) -> torch.Tensor:
    """``[1, 1, s, s, s]``: a few bright spheres in noise."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    x = 0.3 * torch.randn(size, size, size, generator=g)
    for _ in range(6):
        centre = torch.rand(3, generator=g) * size * 0.8 + size * 0.1
        radius = float(torch.rand(1, generator=g)) * size * 0.08 + size * 0.04
        x += 2.0 * (((grid - centre.view(3, 1, 1, 1)) ** 2).sum(0) <= radius**2).float()
    return x[None, None]


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", choices=("custom", "dynunet", "monai"), default="custom")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bottleneck-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-targets", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, feeding, bottleneck = build(args.net)
    model.eval()
    x = blobs(args.size)
    targets = SegmentationRegions(1, "components", max_targets=args.max_targets)

    def infer() -> None:
        with torch.no_grad():
            model(x)

    infer()  # warm-up
    t_inf = median_time(infer, args.repeats)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.net} UNet, input [1, 1, {args.size}]^3, "
          f"median of {args.repeats}")
    print(f"one inference: {t_inf:.3f} s")
    runs = (("layer feeding the output conv", feeding, args.repeats, True),
            ("layer feeding the output conv, certify=False", feeding, args.repeats, False),
            ("bottleneck", bottleneck, args.bottleneck_repeats, True))
    for label, layer, repeats, certify in runs:
        if repeats < 1:
            continue
        explainer = Explainer(model, layer, ("hirescam", "gradcam"), targets=targets, certify=certify)
        if label != "bottleneck":
            explainer(x)  # warm-up (fx trace, placement)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            exp = explainer(x)  # the stage timings printed are the last call's
            times.append(time.perf_counter() - t0)
        t_exp = statistics.median(times)
        stages = ", ".join(f"{k} {v:.2f}" for k, v in exp.timings.items())
        print(f"{label} ({layer}): {len(exp.targets)} targets, map {tuple(exp.map_size)}, "
              f"certificate {exp.certificate.kind}; explain {t_exp:.3f} s = {t_exp / t_inf:.2f}x one inference "
              f"[{stages}]")
        explainer.close()


if __name__ == "__main__":
    main()
