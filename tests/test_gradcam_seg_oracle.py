"""pytorch-grad-cam as an oracle: its Grad-CAM with ``SemanticSegmentationTarget`` on a 2-D segmentation net agrees
with medcam3d's Grad-CAM for the same region targets.

Compared before their resize: after their call, their own ``get_cam_image`` is applied to the activations and
gradients their hooks captured (at the explained layer's resolution, before their ReLU, min-max scaling and
``cv2.resize``); each map is divided by its maximum. Needs the ``grad-cam`` package (a test-only dependency in
the ``dev`` extra, installed without its dependencies; see ``_torchvision_stand_in``).
"""

from __future__ import annotations

import copy
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn


def _torchvision_stand_in() -> None:
    """pytorch-grad-cam imports torchvision at module level only for helpers this test never calls (image
    preprocessing transforms, ``resize`` in its SESS wrapper, box IoU for detection targets). PyPI has no CPU build
    of torchvision for this CPU-only torch, so when torchvision cannot be imported a stand-in module whose names
    raise if used is registered; the code under comparison (``BaseCAM``, ``GradCAM``, ``SemanticSegmentationTarget``)
    does not touch it."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - absent, or a CUDA build that fails to load with CPU torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision stand-in: not available in this test environment")

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    transforms.Compose = transforms.Normalize = transforms.ToTensor = unavailable
    functional.resize = unavailable
    ops.box_iou = unavailable
    tv.transforms, transforms.functional, tv.ops = transforms, functional, ops
    sys.modules.update({"torchvision": tv, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional, "torchvision.ops": ops})


_torchvision_stand_in()
from pytorch_grad_cam import GradCAM  # noqa: E402  (after the stand-in)
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget  # noqa: E402

from medcam3d import Explainer  # noqa: E402
from medcam3d.targets import SegmentationRegions  # noqa: E402


class Seg2d(nn.Module):
    """A small 2-D encoder-decoder: full-resolution encoder (skip), stride-2 ``feat``, transposed-conv up, cat with
    the skip, ``dec`` (full resolution), 1x1 conv to 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 6, 3, padding=1)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.feat = nn.ReLU()
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.mix = nn.Conv2d(12, 6, 3, padding=1)
        self.dec = nn.ReLU()
        self.out = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        e = torch.relu(self.enc(x))
        u = torch.relu(self.up(self.feat(self.down(e))))
        return self.out(self.dec(self.mix(torch.cat([u, e], dim=1))))


def _theirs(model: nn.Module, layer: str, x: torch.Tensor, cls: int, mask: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's Grad-CAM for one region target, unresized and before their ReLU: ``[h, w]``."""
    theirs = copy.deepcopy(model)  # they call model.eval() and backward() (writing .grad): a copy of ours
    target_layer = theirs.get_submodule(layer)
    targets = [SemanticSegmentationTarget(cls, mask.astype(np.float32))]
    with GradCAM(model=theirs, target_layers=[target_layer]) as cam:
        cam(input_tensor=x, targets=targets)
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        grads = cam.activations_and_grads.gradients[0].cpu().numpy()
        raw = cam.get_cam_image(x, target_layer, targets, acts, grads)
    return raw[0]


def _max_normalised(m: np.ndarray) -> np.ndarray:
    assert m.max() > 0
    return m / m.max()


@pytest.mark.parametrize("layer", ["feat", "dec"])  # half resolution (before the up path) and full resolution
def test_gradcam_agrees_with_pytorch_grad_cam(layer):
    torch.manual_seed(0)
    model = Seg2d().eval()
    x = torch.randn(1, 3, 24, 20)
    with torch.no_grad():
        predicted = model(x).argmax(1)[0]
    cls = int(torch.bincount(predicted.flatten(), minlength=4).argmax())  # the class predicted most
    box = torch.zeros(24, 20, dtype=torch.bool)
    box[3:15, 6:18] = True
    regions = {"predicted": (predicted == cls).numpy(), "box": box.numpy()}
    for name, mask in regions.items():
        exp = Explainer(model, layer, ("gradcam",), targets=SegmentationRegions(cls, torch.from_numpy(mask)))(x)
        ours = exp.raw["gradcam"][0, 0].double().numpy()
        ref = _theirs(model, layer, x, cls, mask).astype(np.float64)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(_max_normalised(ours), _max_normalised(ref), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{layer}, {name}")
    assert all(p.grad is None for p in model.parameters())  # only their copy got gradients
