"""Train the embedded demo model: a reduced AxialNet on synthetic chest-CT phantoms (CPU, minutes).

    python scripts/train_demo.py                      # the shipped demo model  -> medcam3d/weights/demo_axialnet.*
    python scripts/train_demo.py --clever-hans        # marker-trained variant  -> demo_axialnet_cleverhans.*

Data: phantoms from :mod:`medcam3d.data` (seeds ``[seed*10**6, ...)`` for training, a disjoint seed range for the
held-out set), preprocessed with the demo config's own MONAI pipeline (``configs/demo_axialnet.yaml``) so that
training and ``medcam3d explain`` see identical inputs. Model: ``AxialNet(13, in_plane=(128, 128), width=16,
feature_stride=8)`` -- the paper's architecture with a narrower ResNet-18 and stride 8 so that 128 x 128 slices
leave an 8 x 8 explained map. Loss: BCE with logits (multi-label); AdamW with a one-cycle schedule; no left-right
flips (they would swap laterality labels). The held-out per-label AUROC is written to the model card.

With ``--clever-hans`` a bright metal marker outside the body co-occurs with one label in the training data (and
appears independently of it in the held-out data), as in the paper's opening examples.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medcam3d.config import load_config
from medcam3d.data import LABELS, CleverHans, make_phantom
from medcam3d.evaluate.metrics import auroc
from medcam3d.io import Volume
from medcam3d.models import build_model
from medcam3d.preprocess import Preprocessor

WEIGHTS = Path(__file__).resolve().parents[1] / "medcam3d" / "weights"
CH_LABEL = "nodule_right_lung"


def make_set(n: int, first_seed: int, pre: Preprocessor, clever_hans: CleverHans | None, desc: str):
    """n phantoms -> (x [n, 1, S, H, W] float16, y [n, L] float32, marker [n] bool)."""
    xs, ys, ms = [], [], []
    for i in tqdm(range(n), desc=desc, leave=False):
        ph = make_phantom(first_seed + i, clever_hans=clever_hans)
        grid = pre(Volume(ph.hu, ph.affine, f"phantom {first_seed + i}"))
        xs.append(grid.as_tensor().to(torch.float16))
        ys.append(torch.as_tensor(ph.labels, dtype=torch.float32))
        ms.append(ph.marker_mask is not None)
    return torch.stack(xs), torch.stack(ys), np.array(ms)


def evaluate(model: nn.Module, x: torch.Tensor, batch: int = 4) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i : i + batch].float()) for i in range(0, len(x), batch)]).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=480)
    ap.add_argument("--n-test", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--clever-hans", action="store_true", help=f"marker co-occurs with {CH_LABEL} in training")
    ap.add_argument("--out", type=Path, default=None, help="weights file (default: medcam3d/weights/...)")
    ap.add_argument("--max-minutes", type=float, default=15.0, help="stop training when this budget is spent")
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    cfg = load_config("demo_axialnet")
    pre = Preprocessor.from_config(cfg)
    ch_train = CleverHans(label=CH_LABEL, p_with=0.9, p_without=0.05) if args.clever_hans else None
    ch_test = CleverHans(label=CH_LABEL, p_with=0.3, p_without=0.3) if args.clever_hans else None
    base = args.seed * 1_000_000
    x_tr, y_tr, _ = make_set(args.n_train, base, pre, ch_train, "training phantoms")
    x_te, y_te, m_te = make_set(args.n_test, base + 500_000, pre, ch_test, "held-out phantoms")
    t_data = time.perf_counter() - t_start

    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * math.ceil(args.n_train / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    pos = y_tr.mean(0).clamp(0.05, 0.95)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(1 - pos) / pos)
    budget = args.max_minutes * 60 - t_data
    t_train = time.perf_counter()
    bar = tqdm(total=steps, desc="training")
    done_epochs = 0
    for epoch in range(args.epochs):
        t_epoch = time.perf_counter()
        model.train()
        perm = torch.randperm(args.n_train)
        for i in range(0, args.n_train, args.batch):
            idx = perm[i : i + args.batch]
            x = x_tr[idx].float()
            # augmentation: small in-plane shifts and intensity jitter (never left-right flips)
            dy, dx = (int(v) for v in torch.randint(-6, 7, (2,)))
            x = torch.roll(x, shifts=(dy, dx), dims=(3, 4)) * (1 + 0.05 * torch.randn(1)) + 0.02 * torch.randn(1)
            loss = loss_fn(model(x), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        done_epochs = epoch + 1
        spent, per_epoch = time.perf_counter() - t_train, time.perf_counter() - t_epoch
        if done_epochs < args.epochs and spent + per_epoch > budget:
            print(f"stopping after {done_epochs} epochs: another would overrun the {args.max_minutes} min budget")
            break
    bar.close()
    t_train = time.perf_counter() - t_train

    scores = evaluate(model, x_te)
    per_label = {lab: auroc(y_te[:, k].numpy(), scores[:, k]) for k, lab in enumerate(LABELS)}
    mean_auc = float(np.nanmean(list(per_label.values())))
    name = "demo_axialnet_cleverhans" if args.clever_hans else "demo_axialnet"
    out = args.out or WEIGHTS / f"{name}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    card = {
        "name": name,
        "synthetic_data_only": True,
        "warning": "Trained on synthetic chest-CT phantoms only. Its scores mean nothing clinically.",
        "model": cfg.model,
        "labels": list(LABELS),
        "config": "demo_axialnet",
        "input_size": list(cfg.input_size or ()),
        "spacing_mm": [5.0, 2.5, 2.5],
        "preprocessing": cfg.preprocessing,
        "training": {
            "script": "scripts/train_demo.py" + (" --clever-hans" if args.clever_hans else ""),
            "seed": args.seed,
            "n_train": args.n_train,
            "train_seeds": [base, base + args.n_train - 1],
            "epochs": done_epochs,
            "batch": args.batch,
            "lr": args.lr,
            "minutes_data": round(t_data / 60, 2),
            "minutes_training": round(t_train / 60, 2),
            "threads": torch.get_num_threads(),
            "clever_hans": None if ch_train is None else {"label": CH_LABEL, "p_with": 0.9, "p_without": 0.05},
        },
        "held_out": {
            "n": args.n_test,
            "seeds": [base + 500_000, base + 500_000 + args.n_test - 1],
            "auroc": {k: round(float(v), 4) for k, v in per_label.items()},
            "mean_auroc": round(mean_auc, 4),
        },
    }
    if args.clever_hans:
        k = LABELS.index(CH_LABEL)
        with_m, without = scores[m_te, k], scores[~m_te, k]
        card["held_out"]["marker_effect"] = {
            "label": CH_LABEL,
            "mean_score_with_marker": round(float(with_m.mean()), 4),
            "mean_score_without_marker": round(float(without.mean()), 4),
            "auroc_marker_as_target": round(float(auroc(m_te.astype(float), scores[:, k])), 4),
        }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    size_mb = out.stat().st_size / 1e6
    print(json.dumps(card["held_out"], indent=2))
    print(f"wrote {out} ({size_mb:.2f} MB) and its model card; data {t_data / 60:.1f} min, training "
          f"{t_train / 60:.1f} min, total {(time.perf_counter() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
