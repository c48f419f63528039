"""MONAI's own Grad-CAM / Grad-CAM++ test cases (``tests/test_vis_gradcam.py`` of MONAI), medcam3d against MONAI.

Tested with MONAI 1.6.1 (pyproject allows >= 1.3). One sample at a time (MONAI sums the score over the batch),
MONAI's ``compute_map`` (ReLU'd, no upsampling or post-processing) against medcam3d's raw map for the same class
after a ReLU, each divided by its maximum: equal to 1e-4 for Grad-CAM and 2e-3 for Grad-CAM++ (MONAI computes in
float32 with a ``+1e-7`` in the Grad-CAM++ denominator; where gradients are so small that this epsilon moves
MONAI's map by more than 2e-3 -- the small 3-D DenseNet, ~3e-3 -- medcam3d is compared with MONAI's formula
on MONAI's own hooked activations and gradients without the epsilon). MONAI's Grad-CAM++ takes
``Σ_space(A ⊙ g³)`` where the paper (and medcam3d) take ``Σ_space(A) · g³``; on these global-average-pool heads
``g`` is constant over space and the two agree. Frozen features: MONAI's hooks raise, medcam3d explains (its
head-only gradients never need the backbone's parameters to require grad).
"""

from __future__ import annotations

import copy

import pytest
import torch

from medcam3d import Explainer

monai = pytest.importorskip("monai")
from monai.networks.nets import DenseNet, DenseNet121, SEResNet50  # noqa: E402
from monai.visualize import GradCAM, GradCAMpp  # noqa: E402


class DenseNetAdjoint(DenseNet121):
    """MONAI's extra-argument test model: ``model(x, adjoint_info=42)``."""

    def __call__(self, x, adjoint_info):
        if adjoint_info != 42:
            raise ValueError("adjoint_info must be 42")
        return super().__call__(x)


CASES = {
    "densenet2d": (lambda: DenseNet121(spatial_dims=2, in_channels=1, out_channels=3), (2, 1, 48, 64),
                   "class_layers.relu"),
    "densenet3d": (lambda: DenseNet(spatial_dims=3, in_channels=1, out_channels=3, init_features=2, growth_rate=2,
                                    block_config=(6,)), (2, 1, 6, 6, 6), "class_layers.relu"),
    "senet2d": (lambda: SEResNet50(spatial_dims=2, in_channels=3, num_classes=4), (2, 3, 64, 64), "layer4"),
    "senet3d": (lambda: SEResNet50(spatial_dims=3, in_channels=3, num_classes=4), (2, 3, 8, 8, 48), "layer4"),
    "binary2d": (lambda: DenseNet121(spatial_dims=2, in_channels=1, out_channels=1), (2, 1, 48, 64),
                 "class_layers.relu"),
    "adjoint": (lambda: DenseNetAdjoint(spatial_dims=2, in_channels=1, out_channels=3), (2, 1, 48, 64),
                "class_layers.relu"),
}
TOLERANCE = {"gradcam": 1e-4, "gradcampp": 2e-3}
MONAI_CAM = {"gradcam": GradCAM, "gradcampp": GradCAMpp}


def _unit(m: torch.Tensor) -> torch.Tensor:
    m = m.double()
    top = m.max()
    return m / top if top > 0 else m


def _monai_gradcampp_without_epsilon(cam, x: torch.Tensor, c: int, **kwargs) -> torch.Tensor:
    """MONAI's Grad-CAM++ formula on MONAI's own hooked activations and gradients, in float64, without the
    ``+1e-7`` MONAI adds to the denominator (it matters where gradients are ~1e-2 or smaller)."""
    _, acti, grad = cam.nn_module(x, class_idx=c, **kwargs)
    a, g = acti[-1][0].double(), grad[-1][0].double()  # [F, *S]
    nd = a.ndim - 1
    dr = 2 * g**2 + (a * g**3).flatten(1).sum(1).view(-1, *[1] * nd)
    alpha = g**2 / torch.where(dr != 0, dr, torch.ones_like(dr))
    w = (alpha * torch.relu(g)).flatten(1).sum(1).view(-1, *[1] * nd)
    return torch.relu((w * a).sum(0))


def _classes(n: int) -> list[int]:
    return sorted({0, n - 1})  # the first and last class keep the 2 x 2 x (M <= 4) comparisons cheap on CPU


SLOW = ("senet2d", "senet3d", "densenet2d", "adjoint")  # DenseNet121 / SEResNet50: 30-90 s each on 2 CPU cores


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_same_maps_as_monai(case):
    build, shape, layer = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.rand(shape)
    kwargs = {"adjoint_info": 42} if case == "adjoint" else {}
    exp = Explainer(model, layer, methods=("gradcam", "gradcampp"))(x, **kwargs)
    for method, tol in TOLERANCE.items():
        cam = MONAI_CAM[method](nn_module=copy.deepcopy(model), target_layers=layer)  # MONAI flips inplace flags
        for b in range(shape[0]):
            for c in _classes(exp.scores.shape[1]):
                theirs = cam.compute_map(x[b : b + 1], class_idx=c, **kwargs)[0, 0]
                ours = torch.relu(exp.raw[method][b, exp.index(c)])
                assert theirs.shape == ours.shape
                err = (_unit(theirs) - _unit(ours)).abs().max().item()
                where = f"{case} {method} sample {b} class {c}: {err:.2e} (MONAI {monai.__version__})"
                if method == "gradcampp" and err > tol:  # MONAI's epsilon, not a different map: show it
                    exact = _monai_gradcampp_without_epsilon(cam, x[b : b + 1], c, **kwargs)
                    err = (_unit(exact) - _unit(ours)).abs().max().item()
                    where += f"; {err:.2e} against MONAI's formula without its +1e-7"
                assert err <= tol, where


def test_frozen_features_medcam3d_explains_where_monai_cannot():
    torch.manual_seed(0)
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3).eval()
    x = torch.rand(2, 1, 48, 64)
    free = Explainer(model, "class_layers.relu", methods=("gradcam",))(x)
    for name, p in model.named_parameters():
        if "features" in name:
            p.requires_grad = False
    with pytest.raises(Exception):  # noqa: B017 - MONAI's failure type varies by version (IndexError in 1.6.1)
        GradCAM(nn_module=copy.deepcopy(model), target_layers="class_layers.relu")(x)
    frozen = Explainer(model, "class_layers.relu", methods=("gradcam",))(x)
    torch.testing.assert_close(frozen.raw["gradcam"], free.raw["gradcam"])
    assert all(not p.requires_grad for n, p in model.named_parameters() if "features" in n)  # left as found
