"""Training-mode HiResCAM and the allowed-region loss ("guided" training, issue 17).

The Explainer runs the backbone without a graph and leaves the model as it found it; training needs the opposite:
HiResCAM maps that stay differentiable w.r.t. the model's parameters. This module computes them in two ways:

* :func:`affine_head_cams` -- for AxialNet-style heads that are affine in the explained activations (the per-slice
  ``fc`` of :class:`~medcam3d.models.AxialNet`): HiResCAM is exactly ``activations x FC weights`` summed over
  channels, one forward pass, no double backward.
* :func:`gradient_cams` -- for any model the Explainer works on: HiResCAM ``Σ_c A ⊙ ∂y/∂A`` with the gradient
  taken with ``create_graph=True`` (one extra backward per class; the loss then back-propagates through it).

The loss (:func:`allowed_region_loss`), per (scan, class) with signed map ``v`` and allowed region ``m`` (the
fraction of each cell inside the union of the class's organs, :func:`allowed_cells`)::

    present label:  Σ relu(v) (1 - m) / Σ relu(v)        positive contribution outside the allowed region, as a
                                                         share of the total positive contribution, in [0, 1]
    absent label:   Σ relu(v) / Σ |v|                    no region is allowed: all positive contribution counts,
                                                         normalised by the total absolute contribution, in [0, 1]
                                                         (a share of the positive part; with the present-label
                                                         normalisation it would be constantly 1, with no gradient)

and ``loss = λ · mean over (scan, class) of w · share`` with ``w = 1`` for present and ``absent_weight`` for absent
labels (the authors penalise absent labels' positive evidence too: ``absent_weight=1``; 0 ignores them). ``λ``
(``lam``) weighs the loss against the classification loss; ``scripts/train_demo.py --guided`` uses ``λ = 1``
(both losses are O(1) there). A map with no positive value contributes 0 (nothing lies outside).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import InputError
from .geometry import MapGeometry, block_fractions

__all__ = [
    "affine_head_cams",
    "allowed_cells",
    "allowed_region_loss",
    "check_allowed_regions",
    "gradient_cams",
    "outside_share",
]


def check_allowed_regions(
    allowed_regions: Mapping[str, Sequence[str]], labels: Sequence[str], organs: Sequence[str]
) -> None:
    """Raise a one-line :class:`InputError` unless every label has an entry in ``allowed_regions`` and every organ
    named there is one of ``organs`` (e.g. :data:`medcam3d.data.ORGANS`). Call it before training starts."""
    missing = [lab for lab in labels if lab not in allowed_regions]
    if missing:
        raise InputError(f"allowed_regions has no entry for {', '.join(missing)}; the allowed-region loss needs "
                         "one organ list per label")
    for lab in labels:
        unknown = [o for o in allowed_regions[lab] if o not in organs]
        if unknown:
            raise InputError(f"allowed_regions[{lab!r}] names {', '.join(map(repr, unknown))}, which the data has "
                             f"no mask for (organs: {', '.join(organs)})")
        if not allowed_regions[lab]:
            raise InputError(f"allowed_regions[{lab!r}] is empty; name at least one organ")


def allowed_cells(
    organ_masks: Mapping[str, Tensor],
    allowed_regions: Mapping[str, Sequence[str]],
    labels: Sequence[str],
    map_size: Sequence[int],
    geometry: MapGeometry | None,
) -> Tensor:
    """Per label, the fraction of each map cell inside the union of its allowed organs.

    Args:
        organ_masks: organ name -> bool mask ``[*in_size]`` on the model's input grid.
        allowed_regions: label -> organ names (the config's ``allowed_regions``; see :func:`check_allowed_regions`).
        labels: the model's output order.
        map_size: the explained map's spatial size (volume layout, e.g. ``(T, h, w)`` for AxialNet).
        geometry: the model's map placement (e.g. ``Explainer(...).placement.geometry``); None or ``"field"``
            kind uses even blocks (:func:`~medcam3d.geometry.block_fractions`).

    Returns: float32 ``[len(labels), *map_size]`` in [0, 1].
    """
    cache: dict[tuple[str, ...], Tensor] = {}
    out = []
    for lab in labels:
        key = tuple(sorted(allowed_regions[lab]))
        if key not in cache:
            union = torch.zeros_like(torch.as_tensor(organ_masks[key[0]]), dtype=torch.bool)
            for organ in key:
                union |= torch.as_tensor(organ_masks[organ]).bool()
            cache[key] = block_fractions(union, map_size, geometry).to(torch.float32)
        out.append(cache[key])
    return torch.stack(out)


def affine_head_cams(activations: Tensor, fc_weight: Tensor, scale: float = 1.0) -> Tensor:
    """HiResCAM of a head that is affine in the activations: ``Σ_c A[n, c, ...] W[k, c, ...] · scale``.

    Args:
        activations: explained activations ``[N, C, *s]`` (AxialNet: ``conv2d`` output ``[B*T, C, h, w]``).
        fc_weight: ``[K, C, *s]``, the weights of a fully connected layer over the whole map (AxialNet's ``fc``
            Conv2d kernel covers the map); ``score_k = scale · Σ_{c, cells} A W_k + bias`` per row.
        scale: the head's linear factor after the FC (AxialNet: ``1/T`` from the mean over slice groups; any
            positive value leaves the loss unchanged).

    Returns: ``[N, K, *s]`` maps whose cells sum to each row's score minus its bias (differentiable w.r.t. both).
    """
    if activations.shape[1:] != fc_weight.shape[1:]:
        raise ValueError(f"activations {tuple(activations.shape)} do not match FC weights {tuple(fc_weight.shape)}")
    return torch.einsum("nc...,kc...->nk...", activations, fc_weight) * scale


def gradient_cams(
    model: nn.Module, layer: nn.Module, x: Tensor, classes: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """HiResCAM maps that can be back-propagated through, for any differentiable model.

    Args:
        model: ``x -> scores [B, K]``.
        layer: the explained module (its output ``A`` is captured with a forward hook).
        x: input batch.
        classes: class indices to explain (default: all K).

    Returns: ``(scores [B, K], maps [N, len(classes), *s])`` with ``maps[:, j] = Σ_c A ⊙ ∂(Σ_b y_b,k)/∂A``, in the
    layer's own layout (``N = B`` for channels-first layers; map them to volumes with the model's layout). The
    gradients are taken with ``create_graph=True`` so a loss on the maps trains the parameters (double backward).
    Summing the scores over the batch gives per-sample gradients when samples do not interact (eval-mode norms).
    """
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        scores = model(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"the explained layer ran {len(captured)} times in one forward pass; expected once")
    act = captured[0]
    ks = range(scores.shape[1]) if classes is None else classes
    maps = []
    for k in ks:
        (grad,) = torch.autograd.grad(scores[:, k].sum(), act, create_graph=True)
        maps.append((act * grad).sum(1))
    return scores, torch.stack(maps, 1)


def outside_share(maps: Tensor, allowed: Tensor, present: Tensor, eps: float = 1e-8) -> Tensor:
    """Per (row, class), the share the loss penalises (module docstring).

    Args:
        maps: signed HiResCAM maps ``[N, K, *s]``.
        allowed: allowed-region fractions ``[N, K, *s]`` in [0, 1] (broadcastable).
        present: ``[N, K]`` bool or 0/1: the label is present in that row.
        eps: added to the denominators (a map with no positive value gives 0).

    Returns: ``[N, K]`` in [0, 1], differentiable w.r.t. ``maps``.
    """
    pos = maps.clamp(min=0).flatten(2)
    total = pos.sum(-1)
    outside = (pos * (1 - allowed.expand_as(maps).flatten(2))).sum(-1)
    share_present = outside / (total + eps)
    share_absent = total / (maps.abs().flatten(2).sum(-1) + eps)
    return torch.where(present.bool(), share_present, share_absent)


def allowed_region_loss(
    maps: Tensor,
    allowed: Tensor,
    present: Tensor,
    lam: float = 1.0,
    absent_weight: float = 1.0,
    weight: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``λ · mean_{rows, classes} w · share`` (module docstring): the allowed-region loss, a scalar.

    Args:
        maps, allowed, present: as :func:`outside_share`.
        lam: λ, the loss weight against the classification loss.
        absent_weight: w for absent labels (1: the authors' choice; 0: only present labels count).
        weight: optional ``present [N, K] -> w [N, K]`` overriding the present/absent weighting.
    """
    share = outside_share(maps, allowed, present)
    p = present.to(share.dtype)
    w = weight(present) if weight is not None else p + absent_weight * (1 - p)
    if not torch.is_floating_point(w) or w.shape != share.shape:
        raise InputError(f"weight must give a float tensor of shape {tuple(share.shape)}")
    return lam * (w * share).mean()
