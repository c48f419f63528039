"""Benchmark: what ``Explaind`` costs in a MONAI pipeline, in forward passes and seconds.

For a small 3-D DenseNet and a 3-D ResNet-18 (MONAI nets), on one preprocessed image:

  * plain ``Compose`` + model call (``model(x)``),
  * ``Explainer(model)(x)`` called directly (HiResCAM + Grad-CAM, all classes, with the certificate),
  * ``Compose([..., Explaind(...)])`` on the same image,

each with the number of forward passes counted by a forward hook on the network's first layer (a pass through
the backbone; head evaluations of the certificate on the fx head run after the explained layer and are not
backbone passes) and the wall time (median of ``--repeats``). ``Explaind`` adds no forward pass beyond the
explainer's own: its count equals the direct call's.

Usage: python scripts/bench_monai.py [--repeats 3] [--size 48]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.data import MetaTensor
from monai.networks.nets import DenseNet, resnet18
from monai.transforms import Compose, ScaleIntensityd

from medcam3d import Explainer
from medcam3d.monai import Explaind


def first_layer(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)))


def measure(fn, layer: torch.nn.Module, repeats: int) -> tuple[int, float]:
    """(forward passes of one call, median seconds per call)."""
    calls = [0]
    handle = layer.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        fn()
        passes = calls[0]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        handle.remove()
    return passes, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=48)
    args = ap.parse_args()
    torch.manual_seed(0)
    models = {
        "densenet_small_3d": (DenseNet(spatial_dims=3, in_channels=1, out_channels=3, init_features=8,
                                       growth_rate=8, block_config=(2, 2, 2)), "class_layers.relu"),
        "resnet18_3d": (resnet18(spatial_dims=3, n_input_channels=1, num_classes=3), "layer4"),
    }
    s = args.size
    print(f"torch {torch.__version__}, image [1, {s}, {s}, {s}], median of {args.repeats}")
    print(f"{'model':<20} {'pipeline':<28} {'forward passes':>14} {'seconds':>9}")
    for name, (model, layer) in models.items():
        model.eval()
        image = MetaTensor(torch.rand(1, s, s, s))
        pre = Compose([ScaleIntensityd("image")])
        explainer = Explainer(model, layer, ("hirescam", "gradcam"))
        with_explaind = Compose([pre, Explaind("image", explainer=explainer)])

        def plain() -> None:
            with torch.no_grad():
                model(pre({"image": image})["image"][None])

        rows = {
            "Compose + model(x)": plain,
            "Explainer(model)(x)": lambda: explainer(pre({"image": image})["image"][None]),
            "Compose + Explaind": lambda: with_explaind({"image": image}),
        }
        counts = {}
        for label, fn in rows.items():
            passes, sec = measure(fn, first_layer(model), args.repeats)
            counts[label] = passes
            print(f"{name:<20} {label:<28} {passes:>14d} {sec:>9.3f}")
        extra = counts["Compose + Explaind"] - counts["Explainer(model)(x)"]
        print(f"{name:<20} Explaind adds {extra} forward pass(es) beyond the explainer's own")


if __name__ == "__main__":
    main()
