"""A small 3-D ResNet-34v-style model trained on small phantoms, for the reproduction scripts.

The paper's ResNet-34v (Section 5.1; :class:`medcam3d.models.ResNet34v`) is the ResNet-34 backbone, then ONE
convolution of 512 maps with kernel 2, then ONE fully connected layer on the flattened maps. At width 64 and stride
32 in 3-D it is far too heavy to train on two CPU cores in minutes, so :class:`PhantomResNet34v` keeps the
structure that matters for explanations -- ResNet-34's block layout (3, 4, 6, 3), the 512-map kernel-2 convolution
(the explained layer, ``conv``) and one ``Linear`` head (affine: HiResCAM exact, Grad-CAM not) -- with a narrower
backbone (``width``) and stride 8, on phantoms rendered directly at (30, 64, 64) voxels (10 x 5 x 5 mm).

:func:`train_phantom_resnet` trains it (BCE with logits, multi-label, AdamW, one-cycle schedule, small in-plane
shifts, no left-right flips) and returns the model and a model card with the held-out AUROC per label.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import LABELS, render
from ..data.dataset import PhantomDataset
from ..models import resnet_feature_size, resnet_features
from .metrics import auroc
from .perturbation import demo_hu_to_input

__all__ = ["SMALL_SHAPE", "PhantomResNet34v", "phantom_tensors", "train_phantom_resnet"]

#: Phantom grid of the small model: (slices, rows, columns) = 300 x 320 x 320 mm at 10 x 5 x 5 mm.
SMALL_SHAPE: tuple[int, int, int] = (30, 64, 64)


class PhantomResNet34v(nn.Module):
    """``[B, 1, *input_size] -> [B, n_outputs]``: ResNet-34 blocks (width ``width``, stride 8), a 512-map
    convolution of kernel 2 (``conv``, the explained layer), flatten, one ``Linear`` (``fc``).

    With ``input_size = (30, 64, 64)`` the backbone map is 4 x 8 x 8 and the explained maps 3 x 7 x 7."""

    medcam3d_target_layer = "conv"

    def __init__(self, n_outputs: int = len(LABELS), input_size: Sequence[int] = SMALL_SHAPE, width: int = 8,
                 labels: Sequence[str] | None = None) -> None:
        super().__init__()
        self.input_size = tuple(int(n) for n in input_size)
        self.width = int(width)
        self.features = resnet_features(34, self.width, in_channels=1, spatial_dims=3, feature_stride=8)
        size = tuple(resnet_feature_size(n, 8) for n in self.input_size)
        self.explained_size = tuple(n - 1 for n in size)
        if min(self.explained_size) < 1:
            raise ValueError(f"input_size {self.input_size} is too small for PhantomResNet34v")
        self.conv = nn.Conv3d(8 * self.width, 512, kernel_size=2)
        self.fc = nn.Linear(512 * math.prod(self.explained_size), n_outputs)
        self.medcam3d_labels = list(labels) if labels is not None else list(LABELS)[:n_outputs]

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, 1, *input_size]`` -> raw scores ``[B, n_outputs]``."""
        return self.fc(self.conv(self.features(x)).flatten(1))


def phantom_tensors(n: int, seed: int, shape: Sequence[int] = SMALL_SHAPE,
                    hu_to_input: Callable[[Any], Any] = demo_hu_to_input,
                    progress: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """``n`` phantoms drawn from seeds ``(seed, i)`` rendered at ``shape``: (x ``[n, 1, *shape]`` float16,
    y ``[n, len(LABELS)]`` float32)."""
    ds = PhantomDataset(n, seed, grid={"shape": tuple(shape)})
    xs, ys = [], []
    for i in range(n):
        ph = render(ds.spec(i), tuple(shape))
        xs.append(hu_to_input(torch.from_numpy(ph.hu)).to(torch.float16)[None])
        ys.append(torch.as_tensor(ph.labels, dtype=torch.float32))
        if progress is not None:
            progress(i)
    return torch.stack(xs), torch.stack(ys)


def train_phantom_resnet(
    n_train: int = 600,
    n_test: int = 150,
    epochs: int = 12,
    batch: int = 8,
    lr: float = 2e-3,
    seed: int = 1,
    width: int = 8,
    max_minutes: float = 10.0,
    log: Callable[[str], None] | None = None,
) -> tuple[PhantomResNet34v, dict[str, Any]]:
    """Train :class:`PhantomResNet34v` on phantoms (training seeds ``(seed*1000+1, i)``, held-out ``(seed*1000+2,
    i)``; evaluation scripts use other dataset seeds). Stops early when another epoch would overrun
    ``max_minutes`` (data rendering included).

    Returns: (model in eval mode, model card dict with the held-out per-label AUROC)."""
    say = log or (lambda s: None)
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    x_tr, y_tr = phantom_tensors(n_train, seed * 1000 + 1)
    x_te, y_te = phantom_tensors(n_test, seed * 1000 + 2)
    t_data = time.perf_counter() - t_start
    say(f"rendered {n_train} + {n_test} phantoms in {t_data:.0f} s")
    model = PhantomResNet34v(width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(n_train / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    pos = y_tr.mean(0).clamp(0.05, 0.95)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(1 - pos) / pos)
    budget = max_minutes * 60 - t_data
    t_train = time.perf_counter()
    done = 0
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        model.train()
        perm = torch.randperm(n_train)
        total = 0.0
        for i in range(0, n_train, batch):
            idx = perm[i : i + batch]
            x = x_tr[idx].float()
            dy, dx = (int(v) for v in torch.randint(-3, 4, (2,)))
            x = torch.roll(x, shifts=(dy, dx), dims=(3, 4)) * (1 + 0.05 * torch.randn(1)) + 0.02 * torch.randn(1)
            loss = loss_fn(model(x), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        done = epoch + 1
        spent, per_epoch = time.perf_counter() - t_train, time.perf_counter() - t_epoch
        say(f"epoch {done}/{epochs}: loss {total / n_train:.3f} ({per_epoch:.0f} s)")
        if done < epochs and spent + per_epoch > budget:
            say(f"stopping after {done} epochs: another would overrun the {max_minutes} min budget")
            break
    t_train = time.perf_counter() - t_train
    model.eval()
    with torch.inference_mode():
        scores = torch.cat([model(x_te[i : i + 16].float()) for i in range(0, n_test, 16)]).numpy()
    per_label = {lab: auroc(y_te[:, k].numpy(), scores[:, k]) for k, lab in enumerate(LABELS)}
    card = {
        "name": "phantom_resnet34v",
        "synthetic_data_only": True,
        "model": {"class": "medcam3d.evaluate.small_models.PhantomResNet34v", "width": width,
                  "input_size": list(SMALL_SHAPE)},
        "training": {"seed": seed, "n_train": n_train, "train_seeds": f"({seed * 1000 + 1}, 0..{n_train - 1})",
                     "epochs": done, "epochs_planned": epochs, "batch": batch, "lr": lr,
                     "minutes_data": round(t_data / 60, 2), "minutes_training": round(t_train / 60, 2),
                     "threads": torch.get_num_threads()},
        "held_out": {"n": n_test, "seeds": f"({seed * 1000 + 2}, 0..{n_test - 1})",
                     "auroc": {k: (round(float(v), 4) if np.isfinite(v) else None) for k, v in per_label.items()},
                     "mean_auroc": round(float(np.nanmean(list(per_label.values()))), 4)},
    }
    return model, card
