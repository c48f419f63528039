"""Sanity checks by parameter randomisation (Adebayo et al., "Sanity checks for saliency maps"), in 3-D.

A map that explains the model must change when the model's learned parameters are destroyed.

* **Layers.** :func:`randomization_groups` lists the modules holding parameters in reverse execution order (the
  output layer first), found by one forward pass with hooks; ``depth`` merges consecutive modules whose dotted
  names share their first ``depth`` parts (``depth=2`` on AxialNet: ``fc``, ``conv2d.6``, ..., ``features.7``, ...).
* **Cascading** randomisation re-initialises the groups one after another from the top, keeping the earlier ones
  randomised; **independent** randomisation re-initialises one group at a time in an otherwise trained model.
* **Re-initialisation** calls each module's ``reset_parameters()`` (PyTorch's default initialisation; normalisation
  layers get an identity affine and reset running statistics); parameters of modules without it are drawn from
  ``N(0, 0.02²)``. The global RNG is left untouched (seeded fork).
* **Similarity** of each randomised map to the original one, per (scan, class): Spearman rank correlation of the
  raw maps and of their absolute values, and 3-D SSIM of the display-normalised maps (ReLU + whole-map min-max, in
  [0, 1]) -- :func:`medcam3d.evaluate.metrics.spearman`, :func:`~medcam3d.evaluate.metrics.ssim`. Curves start at
  the trained model (similarity 1).

**Cost:** one explanation (a forward pass + the head's batched backward, all classes at once) per (scan, layer
group, mode), plus a deep copy of the model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..explainer import Explainer
from ..heatmaps import normalize
from .metrics import spearman, ssim

__all__ = ["group_label", "map_similarity", "randomization_curves", "randomization_groups", "randomized_models",
           "reinitialize_"]

SIMILARITIES = ("spearman", "spearman_abs", "ssim")


def randomization_groups(model: nn.Module, x: Tensor, depth: int | None = None) -> list[list[str]]:
    """Parameterised modules in reverse execution order (output first), optionally merged by name prefix.

    Args:
        model: the model.
        x: one input batch (run once under ``torch.no_grad`` to record the execution order).
        depth: merge consecutive modules sharing the first ``depth`` dotted-name parts (None: one module per group).

    Returns: groups of dotted module names, output-side group first."""
    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def hook(mod: nn.Module, *_: Any) -> None:
        n = names[mod]
        if n not in order:
            order.append(n)

    for n, m in model.named_modules():
        if n and any(True for _ in m.parameters(recurse=False)):
            hooks.append(m.register_forward_hook(hook))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    key_of = (lambda n: ".".join(n.split(".")[:depth])) if depth else (lambda n: n)
    for n in reversed(order):
        if groups and key_of(groups[-1][-1]) == key_of(n):
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def reinitialize_(modules: Sequence[nn.Module], seed: int) -> None:
    """Re-initialise the parameters (and normalisation statistics) of ``modules`` in place, reproducibly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        with torch.no_grad():
            for m in modules:
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
                else:
                    for p in m.parameters(recurse=False):
                        p.normal_(0.0, 0.02)


def group_label(group: Sequence[str]) -> str:
    """A group's name: its only module, or the dotted prefix its modules share (``features.7``)."""
    if len(group) == 1:
        return group[0]
    parts = [n.split(".") for n in group]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common) if common else f"{group[-1]}..{group[0]}"


def randomized_models(
    model: nn.Module, groups: Sequence[Sequence[str]], mode: str = "cascading", seed: int = 0
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(group label, randomised copy)`` for each group: cascading (top-down, cumulative) or independent.

    The original model is never modified. The label is :func:`group_label`."""
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode={mode!r}: expected 'cascading' or 'independent'")
    current = copy.deepcopy(model) if mode == "cascading" else None
    for i, group in enumerate(groups):
        target = current if current is not None else copy.deepcopy(model)
        mods = dict(target.named_modules())
        reinitialize_([mods[n] for n in group], seed + 1000 * i)
        yield group_label(group), target


def map_similarity(original: Tensor, randomised: Tensor) -> dict[str, Tensor]:
    """Similarity of ``[B, K, *S]`` raw maps: ``spearman``, ``spearman_abs`` (of raw maps) and ``ssim`` (of the
    display-normalised maps), each float64 ``[B, K]``."""
    nd = original.ndim - 2
    return {
        "spearman": spearman(original, randomised, nd),
        "spearman_abs": spearman(original, randomised, nd, absolute=True),
        "ssim": ssim(normalize(original.double()), normalize(randomised.double()), nd, data_range=1.0),
    }


def randomization_curves(
    model: nn.Module,
    x: Tensor,
    explainer_kwargs: dict[str, Any],
    classes: Sequence[int] | None = None,
    mode: str = "cascading",
    groups: Sequence[Sequence[str]] | None = None,
    depth: int | None = 2,
    seed: int = 0,
    original: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Similarity curves of the maps of ``x`` under cascading or independent randomisation.

    Args:
        model: the trained model (left unchanged).
        x: ``[B, C, *S]`` inputs.
        explainer_kwargs: keyword arguments of :class:`medcam3d.Explainer` (``target_layer``, ``methods``,
            ``layout``...). ``certify`` defaults to False here (not needed for the maps).
        classes: output indices to explain (default all).
        mode: ``"cascading"`` or ``"independent"``.
        groups: layer groups (default :func:`randomization_groups` with ``depth``).
        seed: re-initialisation seed.
        original: the trained model's raw maps ``method -> [B, K, *s]`` if already computed.

    Returns:
        ``{"mode", "layers": [label, ...], "passes": int, "similarity": {method: {metric: [B, K, G+1] float64}}}``
        where index 0 is the trained model (similarity 1 by definition) and index g+1 the g-th group randomised.
    """
    kwargs = {"certify": False, **explainer_kwargs}
    if groups is None:
        groups = randomization_groups(model, x, depth)

    def maps(m: nn.Module) -> dict[str, Tensor]:
        with Explainer(m, **kwargs) as ex:
            e = ex(x, classes)
        return {k: v.detach().cpu() for k, v in e.raw.items()}

    passes = 0
    if original is None:
        original = maps(model)
        passes += 1
    curves: dict[str, dict[str, list[Tensor]]] = {
        m: {s: [torch.ones(r.shape[:2], dtype=torch.float64)] for s in SIMILARITIES} for m, r in original.items()
    }
    labels = []
    for label, rnd in randomized_models(model, groups, mode, seed):
        labels.append(label)
        new = maps(rnd)
        passes += 1
        for m, r in original.items():
            sim = map_similarity(r, new[m])
            for s in SIMILARITIES:
                curves[m][s].append(sim[s])
    return {
        "mode": mode,
        "layers": labels,
        "passes": passes,
        "similarity": {m: {s: torch.stack(v, dim=-1) for s, v in per.items()} for m, per in curves.items()},
    }
