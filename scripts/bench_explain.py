"""Benchmark: all-class explanation vs plain inference vs per-class baselines, side by side in one run.

Models:
  * resnet18_3d -- MONAI 3-D ResNet-18 without global pooling (flatten + one FC), explained at ``layer4``;
  * axialnet    -- medcam3d's AxialNet (slices in the batch axis), explained at ``conv2d.7``.

For each model this prints, measured in this run on this machine:
  * plain inference (``model(x)`` under ``torch.inference_mode``),
  * medcam3d: HiResCAM + Grad-CAM for all classes, with the faithfulness certificate, and its ratio to inference,
  * per-class baselines, as Grad-CAM libraries compute them:
      - ``hooks+backward``: forward hooks on the layer, one forward, then ``loss.backward(retain_graph=True)``
        per class (pytorch-grad-cam's scheme; fills every parameter's .grad),
      - ``monai.GradCAM``: one ``GradCAM(...)(x, class_idx=k)`` call per class,
      - ``captum.LayerGradCam``: one ``attribute(x, target=k)`` call per class (when Captum is installed),
    timed on ``--baseline-classes`` classes and scaled to all classes (MONAI and Captum repeat the whole call per
    class, so linearly; hooks+backward as one forward + M backwards; use ``--baseline-classes 80`` to time every
    class), and medcam3d's speed-up over each,
  * the cost of the map placement (issue 14: declared or derived receptive-field centres, ``map_geometry="auto"``):
    the time the first (cold) call spent on it, and the time of a derivation from scratch (a fresh fx trace and
    walk; for AxialNet, which declares its placement, of its in-plane ResNet + conv2d layers, i.e. what an
    undeclared model of the same size would cost), each as a share of the explain time (target <= 5 %).

Usage: python scripts/bench_explain.py [--quick] [--models resnet18_3d axialnet] [--baseline-classes 3]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from medcam3d import Explainer
from medcam3d import placement as placement_mod
from medcam3d.models import AxialNet
from medcam3d.placement import Placement

BASELINES = ("hooks", "monai", "captum")


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` runs after one warm-up run (seconds)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class ResNet18NoGAP(nn.Module):
    """MONAI's 3-D ResNet-18 with global average pooling replaced by flatten + one FC layer."""

    def __init__(self, classes: int, input_size: tuple[int, int, int]) -> None:
        super().__init__()
        from monai.networks.nets import resnet18  # lazy: MONAI takes seconds to import, only this model needs it

        net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=classes)
        self.conv1, self.bn1, self.act, self.maxpool = net.conv1, net.bn1, net.act, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        with torch.no_grad():
            n = self.features(torch.zeros(1, 1, *input_size)).numel()
        self.fc = nn.Linear(n, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def build(name: str, classes: int, quick: bool) -> tuple[nn.Module, str, torch.Tensor]:
    torch.manual_seed(0)
    if name == "resnet18_3d":
        size = (32, 64, 64) if quick else (64, 128, 128)
        return ResNet18NoGAP(classes, size).eval(), "layer4", torch.randn(1, 1, *size)
    if name == "axialnet":
        size = (60, 128, 128) if quick else (405, 420, 420)
        kw = {"width": 16, "feature_stride": 8} if quick else {}
        return AxialNet(n_outputs=classes, in_plane=size[1:], **kw).eval(), "conv2d.7", torch.randn(1, 1, *size)
    raise SystemExit(f"unknown model {name}")


def per_class_hooks_backward(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int]
) -> tuple[float, float]:
    """pytorch-grad-cam's scheme: hooks, one forward, one full backward per class (parameter grads filled).

    Returns: (seconds for the one forward pass, seconds per class for the backward passes), so that the total for
    M classes is ``forward + M * per_class`` (the forward is not repeated per class)."""
    store: dict[str, torch.Tensor] = {}
    h1 = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: store.__setitem__("g", go[0]))
    try:
        t0 = time.perf_counter()
        out = model(x)
        t_forward = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k in classes:
            model.zero_grad(set_to_none=True)
            out[:, k].sum().backward(retain_graph=True)
            a, g = store["a"].detach(), store["g"]
            _ = (g * a).sum(1)  # HiResCAM map
        return t_forward, (time.perf_counter() - t0) / len(classes)
    finally:
        h1.remove()
        h2.remove()
        model.zero_grad(set_to_none=True)


def print_placement_cost(
    model: nn.Module, layer_name: str, x: torch.Tensor, placement: Placement | None, t_cold: float, t_exp: float
) -> None:
    """Cost of the map placement: on the cold call, and derived from scratch (a fresh fx trace and walk)."""
    print(placement.note() if placement is not None else "map placement: none")
    print(f"{'  resolved on the cold call':40s} {t_cold * 1e3:9.1f} ms = {100 * t_cold / t_exp:6.2f} % of explain time")
    features, conv2d = getattr(model, "features", None), getattr(model, "conv2d", None)
    net: nn.Module = model
    what, name, nd = "derived from scratch (fresh fx trace)", layer_name, x.ndim - 2
    if isinstance(features, nn.Module) and isinstance(conv2d, nn.Module):  # AxialNet declares: derive in-plane
        net, what, name, nd = nn.Sequential(features, conv2d), "derived from scratch (in-plane layers)", "1.7", 2
    placement_mod.clear_cache()
    t = time.perf_counter()
    offset, stride = placement_mod.derive_geometry(net, name, nd)
    t_derive = time.perf_counter() - t
    print(f"{'  ' + what:40s} {t_derive * 1e3:9.1f} ms = {100 * t_derive / t_exp:6.2f} % of explain time "
          f"(cells at {offset} + {stride} i)")


def bench_model(
    name: str, classes: int, quick: bool, baseline_classes: int, repeat: int, which: tuple[str, ...] = BASELINES
) -> None:
    model, layer_name, x = build(name, classes, quick)
    layer = model.get_submodule(layer_name)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n== {name}: input {tuple(x.shape)}, {classes} classes, {n_params / 1e6:.1f} M parameters, "
          f"layer {layer_name}")

    def infer() -> None:
        with torch.inference_mode():
            model(x)

    t_inf = timed(infer, repeat)
    placement_mod.clear_cache()
    explainer = Explainer(model, layer_name, methods=("hirescam", "gradcam"))
    exp = explainer(x)  # cold: the placement is resolved (and derived, when not declared) here
    t_cold_placement = exp.timings["placement"]
    t_exp = timed(lambda: explainer(x), repeat)
    print(f"plain inference                        {t_inf:9.2f} s")
    print(
        f"medcam3d all {classes} classes (HiResCAM+Grad-CAM, certificate '{exp.certificate.kind}', head "
        f"{exp.certificate.head}) {t_exp:9.2f} s   ratio to inference {t_exp / t_inf:5.2f}x"
    )
    print_placement_cost(model, layer_name, x, exp.placement, t_cold_placement, t_exp)
    sub = list(range(min(baseline_classes, classes)))
    if "hooks" in which:
        t_fwd, t_bwd = per_class_hooks_backward(model, layer, x, sub)
        total = t_fwd + classes * t_bwd
        print(
            f"{'hooks+backward (pytorch-grad-cam scheme)':40s} {t_fwd:9.2f} s forward + {t_bwd:.2f} s/class x "
            f"{classes} = {total:9.1f} s (timed {len(sub)} classes)   medcam3d speed-up {total / t_exp:7.1f}x"
        )
    baselines: dict[str, Callable[[], None]] = {}
    try:
        if "monai" not in which:
            raise ImportError
        from monai.visualize import GradCAM

        cam = GradCAM(nn_module=model, target_layers=layer_name)

        def monai_run() -> None:
            for k in sub:
                cam(x, class_idx=k)

        baselines["monai.visualize.GradCAM"] = monai_run
    except ImportError:
        pass
    try:
        if "captum" not in which:
            raise ImportError
        from captum.attr import LayerGradCam

        lgc = LayerGradCam(model, layer)

        def captum_run() -> None:
            for k in sub:
                lgc.attribute(x, target=k, relu_attributions=False)

        baselines["captum.LayerGradCam"] = captum_run
    except ImportError:
        pass
    for label, fn in baselines.items():
        t = time.perf_counter()
        try:
            fn()
        except ValueError as exc:  # e.g. MONAI's GradCAM on AxialNet: its layer output is [B*S, F, h, w]
            print(f"{label:40s} cannot run on this model: {str(exc).splitlines()[0][:110]}")
            continue
        per_class = (time.perf_counter() - t) / len(sub)
        total = per_class * classes
        print(
            f"{label:40s} {per_class:9.2f} s/class x {classes} = {total:9.1f} s "
            f"(timed {len(sub)} classes)   medcam3d speed-up {total / t_exp:7.1f}x"
        )
    model.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18_3d", "axialnet"])
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--baseline-classes", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smaller inputs (minutes less, same comparison)")
    ap.add_argument("--baselines", nargs="+", choices=BASELINES, default=list(BASELINES),
                    help="which per-class baselines to time (a full-size AxialNet run may need them one at a time)")
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"device cpu"
    )
    for name in args.models:
        bench_model(name, args.classes, args.quick, args.baseline_classes, args.repeat, tuple(args.baselines))


if __name__ == "__main__":
    main()
