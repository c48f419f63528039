"""Train the demo segmentation model: a small 3-D UNet-style net on the synthetic phantoms' lesion masks (CPU).

    python scripts/train_seg_demo.py                 # the shipped model -> medcam3d/weights/demo_segnet.{pt,json}
    python scripts/train_seg_demo.py --steps 60 --n-train 24 --n-test 8 --out /tmp/seg.pt   # a quick try

Data: phantoms from :mod:`medcam3d.data`, training seeds ``[base, base + n_train)`` and held-out seeds
``[base + 500_000, ...)`` with ``base = 20_000_000 + seed * 1_000_000`` (disjoint from each other and from the
demo AxialNet's ranges), preprocessed with the config's own MONAI pipeline (``configs/demo_segnet.yaml``, the
demo AxialNet's grid) so that training and ``medcam3d explain`` see identical inputs. The phantoms are rendered
on that grid, so their lesion masks are the per-voxel targets as they are. Classes: background plus one class per
lesion type (``--classes``), left and right merged (``mass_right_lung`` and ``mass_left_lung`` -> ``mass``);
lesion masks never overlap (a later-painted lesion takes the voxel), so each voxel has one class. Cardiomegaly
(the whole, enlarged heart) and emphysema (low-attenuation upper lung) are known types but not default classes:
they are changes of an organ rather than focal lesions, and their voxels stay background.

Training: random crops of ``--crop`` voxels (two thirds of them centred on a voxel of a lesion type present in
the phantom, the type drawn uniformly, as nnU-Net oversamples foreground), a small intensity shift, no flips;
MONAI's ``DiceCELoss`` (softmax, Dice without the background, pooled over the batch) with AdamW and a one-cycle
learning rate; bfloat16 autocast on channels-last tensors (about twice as fast as float32 on CPUs with AMX or
AVX-512 BF16; the weights stay float32). Evaluation: whole held-out volumes in float32, argmax; per lesion type
the Dice on each phantom that shows it (mean over those phantoms, and pooled over all of them) and the
false-positive voxels on the phantoms that do not.

Trials (60 training, 12 held-out phantoms): in float32, 200 steps (about 8 CPU minutes), the net learnt
consolidation only (without the model's soft-tissue window channel, with a 5 % intensity-scale jitter that drowned
the few tens of HU between lesion types), then consolidation and pericardial effusion (with the window and a small
shift); masses and effusions stayed at Dice 0 both times. bfloat16 doubled the steps per CPU minute: 400 steps
(and a 2w-channel decoder_out) gave Dice 0.80 for masses and 0.85 for effusions; the shipped recipe is that one
with 240 phantoms and 750 steps.

Refuses an unknown lesion type with a one-line error. Reports CPU minutes (this process's CPU time) and wall
minutes separately: on a shared machine wall time says little.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import Tensor, nn

from medcam3d.config import Config, load_config
from medcam3d.data import LABELS, make_phantom
from medcam3d.files import atomic_path, write_json_atomic
from medcam3d.io import Volume
from medcam3d.models import build_model
from medcam3d.preprocess import Preprocessor

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "medcam3d" / "weights"
_SIDES = ("_right_lung", "_left_lung", "_right", "_left")
DEFAULT_CLASSES = ("nodule", "mass", "consolidation", "atelectasis", "pleural_effusion", "pericardial_effusion")
FOREGROUND_CROPS = 2 / 3
#: intensity shift per crop (SD, network-input units; 0.002 = 3.6 HU): small, the lesion types differ by tens of HU
JITTER = 0.002


def lesion_type(label: str) -> str:
    """A phantom label without its side: ``"mass_left_lung"`` -> ``"mass"``, ``"cardiomegaly"`` unchanged."""
    for suffix in _SIDES:
        if label.endswith(suffix):
            return label[: -len(suffix)]
    return label


LESION_TYPES: tuple[str, ...] = tuple(dict.fromkeys(lesion_type(label) for label in LABELS))


def class_codes(classes: list[str]) -> dict[str, int]:
    """Phantom label -> output channel (1 + the index of its type in ``classes``); labels of other types map to
    nothing (background). Exits with one line naming an unknown or repeated type."""
    unknown = [c for c in classes if c not in LESION_TYPES]
    if unknown:
        raise SystemExit(f"train_seg_demo.py: --classes: unknown lesion type(s) {', '.join(map(repr, unknown))}; "
                         f"expected some of {', '.join(LESION_TYPES)}")
    if len(set(classes)) != len(classes) or not classes:
        raise SystemExit(f"train_seg_demo.py: --classes: give each lesion type once, got {','.join(classes)!r}")
    return {label: 1 + classes.index(lesion_type(label)) for label in LABELS if lesion_type(label) in classes}


def draw_set(n: int, first_seed: int, pre: Preprocessor, codes: dict[str, int],
             prevalence: float) -> tuple[Tensor, Tensor]:
    """Phantoms ``first_seed ... first_seed + n - 1`` -> (``x [n, 1, S, H, W]`` float16 network inputs,
    ``y [n, S, H, W]`` uint8 class codes, 0 = background)."""
    xs, ys = [], []
    for i in range(n):
        ph = make_phantom(first_seed + i, prevalence=prevalence)
        grid = pre(Volume(ph.hu, ph.affine, f"phantom {first_seed + i}"))
        if tuple(grid.shape[1:]) != ph.hu.shape:
            raise SystemExit("train_seg_demo.py: phantoms must be rendered on the config's network grid")
        y = np.zeros(ph.hu.shape, np.uint8)
        for label, mask in ph.lesion_masks.items():
            if label in codes:
                y[mask] = codes[label]
        xs.append(grid.as_tensor().to(torch.float16))
        ys.append(torch.from_numpy(y))
    return torch.stack(xs), torch.stack(ys)


def crop_starts(y: Tensor, crop: tuple[int, int, int], gen: torch.Generator) -> tuple[int, ...]:
    """Corner of a ``crop`` in one label volume ``y [S, H, W]``: with probability :data:`FOREGROUND_CROPS` centred
    on a random voxel of a random class present (classes drawn uniformly), else uniform."""
    shape = y.shape
    present = [c for c in torch.unique(y).tolist() if c != 0]
    if present and torch.rand((), generator=gen) < FOREGROUND_CROPS:
        cls = present[int(torch.randint(len(present), (), generator=gen))]
        voxels = (y == cls).nonzero()
        centre = voxels[int(torch.randint(len(voxels), (), generator=gen))].tolist()
        return tuple(min(max(c - k // 2, 0), n - k) for c, k, n in zip(centre, crop, shape))
    return tuple(int(torch.randint(n - k + 1, (), generator=gen)) for k, n in zip(crop, shape))


def batch_of(x: Tensor, y: Tensor, crop: tuple[int, int, int], batch: int,
             gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch`` random crops: (``x [batch, 1, *crop]`` float32 with an intensity shift, ``y [batch, 1, *crop]``)."""
    xs, ys = [], []
    for i in torch.randint(len(x), (batch,), generator=gen).tolist():
        s, h, w = crop_starts(y[i], crop, gen)
        region = (slice(s, s + crop[0]), slice(h, h + crop[1]), slice(w, w + crop[2]))
        shift = JITTER * torch.randn((), generator=gen)
        xs.append(x[i][(slice(None), *region)].float() + shift)
        ys.append(y[i][region][None].long())
    return torch.stack(xs), torch.stack(ys)


@dataclass
class Recipe:
    """What the training loop needs from the command line."""

    steps: int
    batch: int
    crop: tuple[int, int, int]
    lr: float
    seed: int


def train(model: nn.Module, x: Tensor, y: Tensor, recipe: Recipe) -> list[float]:
    """Train ``model`` in place on crops of ``x [n, 1, S, H, W]``, ``y [n, S, H, W]``; returns the loss per step."""
    gen = torch.Generator().manual_seed(recipe.seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    losses = []
    model.train()
    # with bfloat16, about twice as fast on CPUs with AMX/AVX-512 (torch supports memory_format on Module.to; its
    # type stubs do not list it)
    model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    for step in range(recipe.steps):
        xb, yb = batch_of(x, y, recipe.crop, recipe.batch, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(xb.contiguous(memory_format=torch.channels_last_3d))
        loss = loss_fn(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == recipe.steps - 1:
            recent = np.mean(losses[-20:])
            print(f"step {step + 1}/{recipe.steps} loss {recent:.4f} cpu {time.process_time() / 60:.1f} min",
                  flush=True)
    return losses


def predict(model: nn.Module, x: Tensor, batch: int = 2) -> Tensor:
    """Argmax segmentation ``[n, S, H, W]`` uint8 of ``x [n, 1, S, H, W]`` (eval mode, float32)."""
    model.eval().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    with torch.inference_mode():
        return torch.cat([model(x[i : i + batch].float()).argmax(1).to(torch.uint8) for i in range(0, len(x), batch)])


def dice_table(pred: Tensor, y: Tensor, classes: list[str]) -> dict[str, dict[str, Any]]:
    """Per lesion type: Dice on the phantoms that show it (mean, median, min, pooled), their voxel counts, and the
    predicted voxels of that type on the phantoms that do not show it (false positives)."""
    out = {}
    for code, name in enumerate(classes, start=1):
        p, t = (pred == code).flatten(1), (y == code).flatten(1)  # [n, V]
        inter, n_pred, n_true = (p & t).sum(1).double(), p.sum(1).double(), t.sum(1).double()
        shown = n_true > 0
        dice = (2 * inter[shown] / (n_pred[shown] + n_true[shown])).numpy()
        out[name] = {
            "n_phantoms": int(shown.sum()),
            "dice_mean": round(float(dice.mean()), 4) if len(dice) else None,
            "dice_median": round(float(np.median(dice)), 4) if len(dice) else None,
            "dice_min": round(float(dice.min()), 4) if len(dice) else None,
            "dice_pooled": round(float(2 * inter[shown].sum() / (n_pred[shown] + n_true[shown]).sum()), 4)
            if len(dice) else None,
            "true_voxels_mean": round(float(n_true[shown].mean()), 1) if len(dice) else None,
            "predicted_voxels_mean": round(float(n_pred[shown].mean()), 1) if len(dice) else None,
            "n_phantoms_without": int((~shown).sum()),
            "false_positive_voxels_mean_without": round(float(n_pred[~shown].mean()), 1) if (~shown).any() else None,
        }
    return out


def model_spec(cfg: Config, labels: list[str]) -> dict[str, Any]:
    """The config's model spec, with the labels added when they are not the config's (non-default ``--classes``)."""
    return dict(cfg.model) if labels == cfg.labels else {**cfg.model, "labels": labels}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                    help=f"comma-separated lesion types (known: {', '.join(LESION_TYPES)})")
    ap.add_argument("--n-train", type=int, default=240)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--prevalence", type=float, default=0.5, help="label prevalence of the training phantoms")
    ap.add_argument("--test-prevalence", type=float, default=0.5, help="label prevalence of the held-out phantoms")
    ap.add_argument("--steps", type=int, default=750)
    ap.add_argument("--batch", type=int, default=4, help="crops per step")
    ap.add_argument("--crop", type=int, nargs=3, default=[32, 96, 96], help="crop size (S, H, W)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU minutes count every thread)")
    ap.add_argument("--config", default="demo_segnet", help="config (model, preprocessing, labels)")
    ap.add_argument("--out", type=Path, default=WEIGHTS / "demo_segnet.pt", help="weights file (card: .json)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    codes = class_codes(classes)  # refuses unknown types before anything is drawn
    labels = ["background", *classes]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    cfg = load_config(args.config)
    pre = Preprocessor.from_config(cfg)
    base = 20_000_000 + args.seed * 1_000_000
    x_tr, y_tr = draw_set(args.n_train, base, pre, codes, args.prevalence)
    x_te, y_te = draw_set(args.n_test, base + 500_000, pre, codes, args.test_prevalence)
    data = (time.perf_counter() - wall0, time.process_time() - cpu0)
    print(f"data: {len(x_tr)} training, {len(x_te)} held-out phantoms in {data[0] / 60:.1f} min", flush=True)

    spec = model_spec(cfg, labels)
    model = build_model(spec)
    recipe = Recipe(args.steps, args.batch, tuple(args.crop), args.lr, args.seed)
    wall1, cpu1 = time.perf_counter(), time.process_time()
    losses = train(model, x_tr, y_tr, recipe)
    training = (time.perf_counter() - wall1, time.process_time() - cpu1)
    table = dice_table(predict(model, x_te), y_te, classes)

    with atomic_path(args.out) as tmp:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp)
    card = make_card(args, cfg, spec, labels, codes, recipe, losses, data, training, table, base)
    card["size_bytes"] = args.out.stat().st_size
    write_json_atomic(card, args.out.with_suffix(".json"))
    print({k: v["dice_mean"] for k, v in table.items()})
    print(f"wrote {args.out} ({card['size_bytes'] / 1e6:.2f} MB) and its model card; training "
          f"{training[1] / 60:.1f} CPU min, {training[0] / 60:.1f} wall min")


def make_card(args: argparse.Namespace, cfg: Config, spec: dict[str, Any], labels: list[str],
              codes: dict[str, int], recipe: Recipe, losses: list[float], data: tuple[float, float],
              training: tuple[float, float], table: dict[str, dict[str, Any]], base: int) -> dict[str, Any]:
    """The model card (keys as in ``demo_axialnet.json``, plus the segmentation's own)."""
    n_params = sum(p.numel() for p in build_model(spec).parameters())
    headline = [c for c in ("mass", "pleural_effusion") if c in table and table[c]["dice_mean"] is not None]
    return {
        "name": args.out.stem,
        "synthetic_data_only": True,
        "warning": "Trained on synthetic chest-CT phantoms only. Its segmentations mean nothing clinically.",
        "task": "segmentation",
        "model": spec,
        "labels": labels,
        "config": args.config,
        "target_layer": cfg.target_layer,
        "probability": "softmax (argmax over channels; channel 0 is the background)",
        "parameters": n_params,
        "input_size": list(cfg.input_size or ()),
        "spacing_mm": [5.0, 2.5, 2.5],
        "preprocessing": cfg.preprocessing,
        "classes": {name: sorted(k for k, v in codes.items() if v == c) for c, name in enumerate(labels) if c},
        "training": {
            "script": "scripts/train_seg_demo.py",
            "seed": args.seed,
            "n_train": args.n_train,
            "prevalence": args.prevalence,
            "train_seeds": [base, base + args.n_train - 1],
            "steps": recipe.steps,
            "batch_crops": recipe.batch,
            "crop": list(recipe.crop),
            "foreground_crops": round(FOREGROUND_CROPS, 4),
            "augmentation": f"intensity + {JITTER} N per crop (network-input units); no flips",
            "loss": "monai.losses.DiceCELoss(to_onehot_y, softmax, include_background=False, batch=True)",
            "precision": "bfloat16 autocast, channels-last (training only; the weights are float32)",
            "optimizer": {"name": "AdamW", "peak_lr": recipe.lr, "weight_decay": 1e-4, "schedule": "one-cycle"},
            "loss_first_20_steps": round(float(np.mean(losses[:20])), 4),
            "loss_last_20_steps": round(float(np.mean(losses[-20:])), 4),
            "minutes_data": round(data[0] / 60, 2),
            "cpu_minutes_training": round(training[1] / 60, 2),
            "minutes_training": round(training[0] / 60, 2),
            "threads": torch.get_num_threads(),
            "machine": f"{os.cpu_count()} CPU cores shared with other jobs (load average {os.getloadavg()[0]:.1f} at "
                       "the end); CPU minutes are this process's CPU time, wall minutes include waiting for a core",
        },
        "held_out": {
            "n": args.n_test,
            "prevalence": args.test_prevalence,
            "seeds": [base + 500_000, base + 500_000 + args.n_test - 1],
            "prediction": "argmax over channels on the whole 60 x 128 x 128 volume",
            "dice": table,
            "mean_dice": round(float(np.mean([v["dice_mean"] for v in table.values() if v["dice_mean"] is not None])),
                               4),
            "headline": {c: table[c]["dice_mean"] for c in headline},
        },
    }


if __name__ == "__main__":
    main()
