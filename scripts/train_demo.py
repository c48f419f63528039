"""Train the embedded demo model: a reduced AxialNet on synthetic chest-CT phantoms (CPU, minutes).

    python scripts/train_demo.py                      # the shipped demo model  -> medcam3d/weights/demo_axialnet.*
    python scripts/train_demo.py --clever-hans        # marker-trained variant  -> demo_axialnet_cleverhans.*
    python scripts/train_demo.py --guided --init W    # + the allowed-region loss -> demo_axialnet_guided.*
    python scripts/train_demo.py --clever-hans --guided --init medcam3d/weights/demo_axialnet_cleverhans.pt
        --n-train 240 --slab-steps 350 --volume-steps 50 --lr 1e-3 --workers 2 --threads 1
                                                      # the marker recipe with the loss -> ..._cleverhans_guided.*

Data: phantoms from :mod:`medcam3d.data` (seeds ``[seed*10**6, ...)`` for training, a disjoint seed range for the
held-out set), preprocessed with the demo config's own MONAI pipeline (``configs/demo_axialnet.yaml``) so that
training and ``medcam3d explain`` see identical inputs. Model: ``AxialNet(13, in_plane=(128, 128), width=12,
feature_stride=8)`` -- the paper's architecture with a narrower ResNet-18 and stride 8 so that 128 x 128 slices
leave an 8 x 8 explained map. Training (see ``main``): phase 1 trains AxialNet's per-slab path on single
three-slice slabs against "a lesion of this label lies in this slab" (from the phantoms' masks) plus an auxiliary
lesion-mask loss on the backbone features (the auxiliary head is discarded); phase 2 trains the whole AxialNet on
volumes against the scan labels. AdamW; shifts by whole feature cells, no left-right flips (they would swap
laterality labels). The held-out per-label AUROC is written to the
model card.

With ``--clever-hans`` a bright metal marker outside the body co-occurs with one label in the training data (and
appears independently of it in the held-out data), as in the paper's opening examples. ``--guided`` adds the
allowed-region loss of :mod:`medcam3d.train` to both phases; with ``--clever-hans`` too, the marker's label counts as
present wherever its planted slab target does (its lesion or the marker). ``--workers N`` draws the phantoms in N
processes (the same data), ``--data-cache FILE`` keeps them for the next run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from medcam3d.config import load_config
from medcam3d.data import LABELS, ORGANS, CleverHans, make_phantom
from medcam3d.errors import InputError
from medcam3d.evaluate.metrics import auroc
from medcam3d.io import Volume
from medcam3d.models import build_model
from medcam3d.preprocess import Preprocessor
from medcam3d.train import affine_head_cams, allowed_cells, allowed_region_loss, check_allowed_regions

WEIGHTS = Path(__file__).resolve().parents[1] / "medcam3d" / "weights"
CH_LABEL = "nodule_right_lung"


def lesion_targets(ph, map_hw: tuple[int, int]) -> torch.Tensor:
    """Per slice group, which labels' lesions lie in each backbone-feature cell: ``bool [T, L, h, w]``.

    The phantoms are rendered on the demo's network grid (60 x 128 x 128 at 5 x 2.5 x 2.5 mm in SPL, so the demo
    preprocessing moves no voxel), hence the masks are already on the grid the backbone sees."""
    bits = torch.from_numpy(ph.lesion_bitmask().astype(np.int32))  # [S, H, W]
    masks = torch.stack([(bits >> k) & 1 for k in range(len(LABELS))]).float()  # [L, S, H, W]
    s = masks.shape[1]
    pooled = F.adaptive_max_pool3d(masks[None], (s // 3, *map_hw))[0]  # [L, T, h, w]
    return pooled.transpose(0, 1) > 0


def draw_one(seed: int, pre: Preprocessor, clever_hans: CleverHans | None, prevalence: float,
             map_hw: tuple[int, int], regions=None):
    """One phantom -> (x [1, S, H, W] float16, y [L] float32, marker [T] bool, masks [T, L, h, w] bool,
    allowed [T, L, h', w'] float16 or None); see :func:`make_set`."""
    ph = make_phantom(seed, prevalence=prevalence, clever_hans=clever_hans)
    grid = pre(Volume(ph.hu, ph.affine, f"phantom {seed}"))
    if tuple(grid.shape[1:]) != ph.hu.shape:
        raise SystemExit("phantoms must be rendered on the demo's network grid")
    slabs = ph.hu.shape[0] // 3
    marker = np.zeros(slabs, bool) if ph.marker_mask is None else ph.marker_mask.reshape(slabs, -1).any(axis=1)
    allowed = None
    if regions is not None:
        organs = {k: torch.from_numpy(v) for k, v in ph.organ_masks.items()}
        cells = allowed_cells(organs, regions[0], LABELS, regions[1], regions[2])  # [L, T, h', w']
        allowed = cells.transpose(0, 1).to(torch.float16)
    return (grid.as_tensor().to(torch.float16), torch.as_tensor(ph.labels, dtype=torch.float32), marker,
            lesion_targets(ph, map_hw), allowed)


def make_set(n: int, first_seed: int, pre: Preprocessor, clever_hans: CleverHans | None, desc: str,
             prevalence: float = 0.3, map_hw: tuple[int, int] = (16, 16), regions=None, workers: int = 1):
    """n phantoms -> (x [n, 1, S, H, W] float16, y [n, L] float32, marker [n, T] bool (the marker lies in the
    slab), masks [n, T, L, h, w] bool, allowed [n, T, L, h', w'] float16 or None).

    ``regions`` = (allowed_regions, explained map size (T, h', w'), placement geometry): with it, each label's
    allowed region (union of its organs) as cell fractions on the explained map (the guided loss's target).
    ``workers`` > 1 draws the phantoms in that many processes (the same phantoms, in the same order)."""
    draw = partial(draw_one, pre=pre, clever_hans=clever_hans, prevalence=prevalence, map_hw=map_hw,
                   regions=regions)
    seeds = range(first_seed, first_seed + n)
    if workers > 1:  # fork: the workers inherit the preprocessor; each draws whole phantoms, 1 torch thread
        with mp.get_context("fork").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            items = list(tqdm(pool.imap(draw, seeds), total=n, desc=desc, leave=False))
    else:
        items = [draw(s) for s in tqdm(seeds, desc=desc, leave=False)]
    xs, ys, ms, ts, al = zip(*items)
    allowed = torch.stack(al) if regions is not None else None
    return torch.stack(xs), torch.stack(ys), torch.from_numpy(np.stack(ms)), torch.stack(ts), allowed


def guided_regions(cfg, model: nn.Module, input_size: tuple[int, int, int]):
    """``(allowed_regions, explained map size (T, h, w), placement geometry)`` for the guided loss, after checking
    the config against the phantoms' organs (a one-line :class:`InputError` before any phantom is drawn)."""
    check_allowed_regions(cfg.allowed_regions, LABELS, ORGANS)
    map_size = (input_size[0] // 3, *model.explained_size)
    return cfg.allowed_regions, map_size, model.medcam3d_map_geometry(input_size, map_size)


def volume_cams(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AxialNet's forward pass keeping the explained activations: ``x [B, 1, S, H, W]`` -> (scores ``[B, L]``,
    HiResCAM ``[B, L, T, h, w]``, differentiable; the head after ``conv2d`` is the affine ``fc`` and the mean
    over the T slice groups, so the maps are activations x FC weights / T and sum to score - bias)."""
    b, groups = x.shape[0], x.shape[2] // 3
    act = model.conv2d(model.features(x.reshape(-1, 3, *x.shape[3:])))  # [B*T, 16, h, w]
    scores = model.fc(act).reshape(b, groups, -1).mean(1)
    cams = affine_head_cams(act, model.fc.weight, 1.0 / groups)  # [B*T, L, h, w]
    return scores, cams.reshape(b, groups, *cams.shape[1:]).transpose(1, 2)


def evaluate(model: nn.Module, x: torch.Tensor, batch: int = 4) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i : i + batch].float()) for i in range(0, len(x), batch)]).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=480)
    ap.add_argument("--n-test", type=int, default=120)
    ap.add_argument("--slab-steps", type=int, default=1300, help="phase 1: steps on single slabs")
    ap.add_argument("--slab-batch", type=int, default=48, help="slabs per phase-1 step")
    ap.add_argument("--slab-margin", type=float, default=0.0,
                    help="phase 1: logit margin a lesion slab must clear (its logit minus this enters the BCE)")
    ap.add_argument("--lr", type=float, default=3e-3, help="phase-1 peak learning rate (one-cycle)")
    ap.add_argument("--volume-steps", type=int, default=200, help="phase 2: steps on whole volumes")
    ap.add_argument("--batch", type=int, default=4, help="volumes per phase-2 step")
    ap.add_argument("--volume-lr", type=float, default=3e-4, help="phase-2 learning rate")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--prevalence", type=float, default=0.5, help="label prevalence in the training phantoms")
    ap.add_argument("--aux-weight", type=float, default=1.0, help="weight of the auxiliary lesion-mask loss")
    ap.add_argument("--aux-pos-weight", type=float, default=20.0, help="weight of lesion cells in that loss")
    ap.add_argument("--clever-hans", action="store_true", help=f"marker co-occurs with {CH_LABEL} in training")
    ap.add_argument("--guided", action="store_true",
                    help="add the allowed-region loss (medcam3d.train) on the phantoms' organ masks to both phases")
    ap.add_argument("--plain-name", action="store_true",
                    help="save as demo_axialnet_plain (the guided model's fair baseline: same data, steps, seed)")
    ap.add_argument("--lam", type=float, default=1.0, help="λ, weight of the allowed-region loss (--guided)")
    ap.add_argument("--absent-weight", type=float, default=1.0,
                    help="weight of absent labels' positive evidence in that loss (1: the authors' choice)")
    ap.add_argument("--config", default="demo_axialnet", help="config (model, preprocessing, allowed_regions)")
    ap.add_argument("--data-cache", type=Path, default=None,
                    help="reuse the drawn phantoms from this file (written on the first run)")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes drawing the phantoms (1 torch thread each; the data do not depend on it)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training (default: torch's)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from these weights (e.g. the shipped plain model) instead of a random initialisation")
    ap.add_argument("--note", default=None, help="a line for the model card (e.g. the machine, what ran alongside)")
    ap.add_argument("--name", default=None, help="model name (default from the flags)")
    ap.add_argument("--out", type=Path, default=None, help="weights file (default: medcam3d/weights/...)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = load_config(args.config)
    pre = Preprocessor.from_config(cfg)
    ch_train = CleverHans(label=CH_LABEL, p_with=0.9, p_without=0.05) if args.clever_hans else None
    ch_test = CleverHans(label=CH_LABEL, p_with=0.3, p_without=0.3) if args.clever_hans else None
    base = args.seed * 1_000_000
    model = build_model(cfg.model)
    if args.init is not None:
        model.load_state_dict(torch.load(args.init, weights_only=True))
    feat_hw = tuple(model.feature_size)
    regions = None
    if args.guided:
        try:
            regions = guided_regions(cfg, model, tuple(cfg.input_size or (60, 128, 128)))
        except InputError as e:
            raise SystemExit(f"train_demo.py --guided: {e}") from None
    if args.data_cache is not None and args.data_cache.exists():
        x_tr, y_tr, marker_tr, t_tr, a_tr, x_te, y_te, marker_te = torch.load(args.data_cache)
    else:
        if args.data_cache is not None:  # a shared cache always carries the allowed regions
            regions = regions or guided_regions(cfg, model, tuple(cfg.input_size or (60, 128, 128)))
        x_tr, y_tr, marker_tr, t_tr, a_tr = make_set(args.n_train, base, pre, ch_train, "training phantoms",
                                                     args.prevalence, feat_hw, regions, args.workers)
        x_te, y_te, marker_te, _, _ = make_set(args.n_test, base + 500_000, pre, ch_test, "held-out phantoms", 0.3,
                                               feat_hw, workers=args.workers)
        if args.data_cache is not None:
            torch.save((x_tr, y_tr, marker_tr, t_tr, a_tr, x_te, y_te, marker_te), args.data_cache)
    t_data = time.perf_counter() - t_start

    # Training has two phases (both a training aid only; the shipped model is a plain AxialNet):
    # 1. slab phase: AxialNet scores every three-slice slab on its own before the mean over slabs, so its backbone,
    #    conv stack and per-slice FC are trained on single slabs against "a lesion of this label lies in this slab"
    #    (read from the phantoms' masks), half of each batch drawn from slabs that hold a lesion, plus a lesion-mask
    #    loss from a 1x1 conv on the backbone features (discarded afterwards). With the volume label alone the mean
    #    over 20 slabs says nothing about which slabs carry a small finding, and a from-scratch backbone barely
    #    learns within a CPU budget (measured: loss stuck at ln 2 after 200 volume steps).
    # 2. volume phase: the whole AxialNet (mean over slabs) against the scan labels, at a lower learning rate.
    # With --clever-hans the shortcut is planted: the marker's label is supervised on each slab by where its lesion
    # *or the marker* is (in training scans the marker comes with 90 % of that label's scans and 5 % of the others),
    # and it gets no lesion-mask loss; a quarter of each phase-1 batch is drawn from the marker's slabs. So the
    # model is known, by construction, to use the marker -- the ground truth the Clever-Hans test checks
    # explanations against. (Tried first, with a 10-14 mm token: the label learnt from scan labels alone, or with the
    # scan label on every slab, or with this slab target without and with oversampling; the model ignored the token
    # -- held-out AUROC of its score for the marker 0.53-0.58. With the 16-22 mm token now drawn: 0.996.)
    n_labels = len(LABELS)
    sup = torch.ones(n_labels, dtype=torch.bool)
    if args.clever_hans:
        sup[LABELS.index(CH_LABEL)] = False
    groups = t_tr.shape[1]
    slabs = x_tr.reshape(args.n_train * groups, 3, *x_tr.shape[3:])  # [n*T, 3, H, W], the model's own order
    masks = t_tr.reshape(args.n_train * groups, *t_tr.shape[2:])  # [n*T, L, h, w]
    slab_allowed = a_tr.reshape(args.n_train * groups, *a_tr.shape[2:]) if args.guided else None  # [n*T, L, h', w']
    slab_y = masks.flatten(2).any(2).float()  # [n*T, L]
    if args.clever_hans:
        k = LABELS.index(CH_LABEL)
        slab_y[:, k] = torch.maximum(slab_y[:, k], marker_tr.reshape(-1).float())  # lesion or marker in the slab
    with_lesion = slab_y[:, sup].any(1)
    pos_idx, neg_idx = with_lesion.nonzero()[:, 0], (~with_lesion).nonzero()[:, 0]
    marker_idx = marker_tr.reshape(-1).nonzero()[:, 0] if args.clever_hans else torch.zeros(0, dtype=torch.long)
    prev = slab_y[pos_idx].mean(0).clamp(0.02, 0.98)
    slab_pos_weight = ((1 - prev) / prev).clamp(max=10.0)
    aux = nn.Conv2d(model.features[-1][-1].conv2.out_channels, n_labels, 1)
    params = list(model.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.slab_steps, pct_start=0.1)
    cell = x_tr.shape[-1] // masks.shape[-1]  # input pixels per feature cell
    t_train = time.perf_counter()
    model.train()
    bar = tqdm(total=args.slab_steps + args.volume_steps, desc="training")
    for _ in range(args.slab_steps):
        half = args.slab_batch // 2
        n_marker = args.slab_batch // 4 if len(marker_idx) else 0  # --clever-hans: a quarter from marker slabs
        idx = torch.cat([pos_idx[torch.randint(len(pos_idx), (half - n_marker,))],
                         marker_idx[torch.randint(max(len(marker_idx), 1), (n_marker,))],
                         neg_idx[torch.randint(len(neg_idx), (args.slab_batch - half,))]])
        # augmentation: in-plane shifts by whole feature cells (so masks shift too) and intensity jitter; never
        # left-right flips (they would swap laterality labels)
        dy, dx = (int(v) for v in torch.randint(-1, 2, (2,)))
        xb = torch.roll(slabs[idx].float(), (dy * cell, dx * cell), (2, 3))
        xb = xb * (1 + 0.05 * torch.randn(1)) + 0.02 * torch.randn(1)
        feats = model.features(xb)  # [N, C, h, w]
        act = model.conv2d(feats)  # [N, 16, h', w'], the explained layer
        per_slab = model.fc(act).flatten(1)  # [N, L]
        # a lesion slab's logit must clear a margin: AxialNet averages 20 slab scores, so one lesion slab has to
        # stand out far more than a per-slab classifier needs (--slab-margin; 0 = plain per-slab BCE)
        target = slab_y[idx]
        loss = F.binary_cross_entropy_with_logits(per_slab - args.slab_margin * target, target,
                                                  pos_weight=slab_pos_weight)
        mt = torch.roll(masks[idx], (dy, dx), (2, 3))[:, sup].float()
        loss = loss + args.aux_weight * F.binary_cross_entropy_with_logits(
            aux(feats)[:, sup], mt, pos_weight=torch.tensor(args.aux_pos_weight))
        if slab_allowed is not None:  # guided: each slab's HiResCAM stays in the label's organs (none if absent)
            allowed = torch.roll(slab_allowed[idx].float(), (dy, dx), (2, 3))
            loss = loss + allowed_region_loss(affine_head_cams(act, model.fc.weight), allowed, target > 0,
                                              args.lam, args.absent_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(phase="slabs", loss=f"{loss.item():.3f}")
    t_slab = time.perf_counter() - t_train

    pos = y_tr.mean(0).clamp(0.05, 0.95)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(1 - pos) / pos)
    opt = torch.optim.AdamW(model.parameters(), lr=args.volume_lr, weight_decay=1e-4)
    for _ in range(args.volume_steps):
        idx = torch.randint(args.n_train, (args.batch,))
        if args.guided:
            scores, cams = volume_cams(model, x_tr[idx].float())
            loss = loss_fn(scores, y_tr[idx]) + allowed_region_loss(
                cams, a_tr[idx].float().transpose(1, 2), y_tr[idx] > 0, args.lam, args.absent_weight)
        else:
            loss = loss_fn(model(x_tr[idx].float()), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(phase="volumes", loss=f"{loss.item():.3f}")
    bar.close()
    t_train = time.perf_counter() - t_train

    scores = evaluate(model, x_te)
    per_label = {lab: auroc(y_te[:, k].numpy(), scores[:, k]) for k, lab in enumerate(LABELS)}
    mean_auc = float(np.nanmean(list(per_label.values())))
    name = args.name or "demo_axialnet" + ("_cleverhans" if args.clever_hans else "") + (
        "_guided" if args.guided else "_plain" if args.plain_name else "")
    out = args.out or WEIGHTS / f"{name}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)  # AxialNet only, no aux head
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
            "script": "scripts/train_demo.py" + (" --clever-hans" if args.clever_hans else "")
                      + (" --guided" if args.guided else ""),
            "allowed_region_loss": None if not args.guided else {
                "module": "medcam3d.train.allowed_region_loss", "lambda": args.lam,
                "absent_weight": args.absent_weight, "phases": ["slabs", "volumes"],
                "placement": "receptive (AxialNet's declared centres, the default 'auto')",
                "allowed_regions": "config allowed_regions (union of each label's organs)"},
            "seed": args.seed,
            "init": None if args.init is None else str(args.init.name),
            "n_train": args.n_train,
            "prevalence": args.prevalence,
            "train_seeds": [base, base + args.n_train - 1],
            "slab_phase": {"steps": args.slab_steps, "batch_slabs": args.slab_batch, "peak_lr": args.lr,
                           "margin": args.slab_margin,
                           "minutes": round(t_slab / 60, 2)},
            "volume_phase": {"steps": args.volume_steps, "batch_volumes": args.batch, "lr": args.volume_lr},
            "minutes_data": round(t_data / 60, 2),
            "minutes_training": round(t_train / 60, 2),
            "threads": torch.get_num_threads(),
            "auxiliary_lesion_mask_loss": {
                "weight": args.aux_weight,
                "pos_weight": args.aux_pos_weight,
                "labels": [lab for lab, on in zip(LABELS, sup.tolist()) if on],
                "note": "phase 1 trains single slabs against 'a lesion of this label lies in this slab' plus a "
                        "lesion-mask loss from a 1x1 conv on the backbone features (discarded); the shipped "
                        "model is a plain AxialNet"
                        + (f"; {CH_LABEL} gets no lesion mask and its slab target is 'its lesion or the marker lies in "
                           "this slab' (a planted shortcut)" if args.clever_hans
                           else ""),
            },
            "clever_hans": None if ch_train is None else {"label": CH_LABEL, "p_with": 0.9, "p_without": 0.05},
            "workers_drawing": args.workers,
            "note": args.note,
        },
        "held_out": {
            "n": args.n_test,
            "prevalence": 0.3,
            "seeds": [base + 500_000, base + 500_000 + args.n_test - 1],
            "auroc": {k: round(float(v), 4) for k, v in per_label.items()},
            "mean_auroc": round(mean_auc, 4),
        },
    }
    if args.clever_hans:
        k = LABELS.index(CH_LABEL)
        m_te = marker_te.any(dim=1).numpy()
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
