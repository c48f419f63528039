"""The paper's step-by-step figure (Draelos & Carin, Figure 7) for one scan and one class, in 3-D.

Both maps are sums over the F feature maps ``A^f`` of the explained layer:

* Grad-CAM: ``Σ_f α_f A^f`` with the scalar weight ``α_f = mean_space(∂s/∂A^f)``;
* HiResCAM: ``Σ_f (∂s/∂A^f) ⊙ A^f`` with the gradient *map* as weight.

:func:`step_by_step` ranks the features of each method by their total contribution ``Σ_space (weight ⊙ A^f)`` (the
top ``n`` by absolute value), keeps their activation maps, weights and contributions, and adds the sum of all other
features, so that the parts add up exactly to the final map (:func:`medcam3d.methods.gradcam` /
:func:`~medcam3d.methods.hirescam`). :func:`plot_step_by_step` draws one axial slice of each (matplotlib, PNG).
Cost: 0 extra model passes (it reads ``Explanation.activations`` and ``.gradients``, kept with
``Explainer(..., keep_gradients=True)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..files import atomic_path
from ..methods import method_title

__all__ = ["FeatureBreakdown", "plot_step_by_step", "step_by_step"]


@dataclass
class FeatureBreakdown:
    """One method's map as a sum over features.

    Attributes:
        method: ``"gradcam"`` or ``"hirescam"``.
        features: ``[n]`` indices of the top features (by absolute total contribution).
        activations: ``[n, *S]`` their activation maps ``A^f``.
        weights: ``[n, *S]`` their weights (Grad-CAM: the scalar ``α_f`` broadcast; HiResCAM: ``∂s/∂A^f``).
        scalar_weights: ``[n]`` ``α_f`` for Grad-CAM, the spatial mean of the gradient for HiResCAM.
        contributions: ``[n, *S]`` ``weight ⊙ A^f``.
        totals: ``[n]`` ``Σ_space contribution``.
        rest: ``[*S]`` the sum of the contributions of the other ``F − n`` features.
        final: ``[*S]`` the method's map (``contributions.sum(0) + rest``).
    """

    method: str
    features: Tensor
    activations: Tensor
    weights: Tensor
    scalar_weights: Tensor
    contributions: Tensor
    totals: Tensor
    rest: Tensor
    final: Tensor


def step_by_step(activations: Tensor, gradients: Tensor, top: int = 4) -> dict[str, FeatureBreakdown]:
    """Break both maps of one (scan, class) into per-feature parts.

    Args:
        activations: ``[F, *S]`` (``Explanation.activations[b]``).
        gradients: ``[F, *S]`` ``∂s_k/∂A`` (``Explanation.gradients[b, k]``).
        top: features kept per method.

    Returns: ``{"gradcam": FeatureBreakdown, "hirescam": FeatureBreakdown}`` (float64)."""
    a = activations.detach().double().cpu()
    g = gradients.detach().double().cpu()
    if a.shape != g.shape:
        raise ValueError(f"activations {tuple(a.shape)} and gradients {tuple(g.shape)} must both be [F, *S]")
    dims = tuple(range(1, a.ndim))
    alpha = g.mean(dim=dims)  # [F]
    shape = (-1,) + (1,) * (a.ndim - 1)
    parts = {
        "gradcam": (alpha.reshape(shape).expand_as(a), alpha),
        "hirescam": (g, alpha),
    }
    out = {}
    n = min(int(top), a.shape[0])
    for method, (w, scalar) in parts.items():
        contrib = w * a  # [F, *S]
        totals = contrib.sum(dim=dims)
        idx = torch.argsort(totals.abs(), descending=True, stable=True)[:n]
        others = torch.ones(a.shape[0], dtype=torch.bool)
        others[idx] = False
        out[method] = FeatureBreakdown(
            method=method,
            features=idx,
            activations=a[idx],
            weights=w[idx].clone(),
            scalar_weights=scalar[idx],
            contributions=contrib[idx],
            totals=totals[idx],
            rest=contrib[others].sum(0),
            final=contrib.sum(0),
        )
    return out


def _slice(t: Tensor, index: int) -> np.ndarray:
    """An axial slice of a ``[*S]`` map (first axis = slices), or the map itself in 2-D; 1-D maps become a row."""
    arr = t.numpy()
    if arr.ndim == 3:
        return arr[index]
    if arr.ndim == 1:
        return arr[None]
    return arr


def plot_step_by_step(
    parts: dict[str, FeatureBreakdown],
    path: str | os.PathLike[str],
    slice_index: int | None = None,
    title: str = "",
    dpi: int = 110,
) -> Path:
    """Draw the breakdown as a PNG, written atomically.

    Layout: for each method three rows -- activation ``A^f``, weight (Grad-CAM: the scalar ``α_f``; HiResCAM: the
    gradient map), contribution ``weight ⊙ A^f`` -- with one column per top feature, then "other features" and
    "= map". One axial slice is shown (default: through the maximum of the HiResCAM map).

    Returns: the written path."""
    import matplotlib  # lazy: matplotlib is heavy and only the figure needs it

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    hi = parts["hirescam"].final
    if slice_index is None:
        slice_index = int(np.unravel_index(int(torch.argmax(hi)), tuple(hi.shape))[0]) if hi.ndim == 3 else 0
    n = max(len(p.features) for p in parts.values())
    cols = n + 2
    methods = [m for m in ("gradcam", "hirescam") if m in parts]
    fig, axes = plt.subplots(3 * len(methods), cols, figsize=(1.9 * cols, 1.9 * 3 * len(methods)), squeeze=False)
    for mi, m in enumerate(methods):
        p = parts[m]
        lim = float(max(p.final.abs().max(), p.contributions.abs().max() if p.contributions.numel() else 0.0,
                        p.rest.abs().max(), 1e-12))
        for j in range(cols):
            for r in range(3):
                axes[3 * mi + r, j].axis("off")
        for j in range(len(p.features)):
            f = int(p.features[j])
            ax = axes[3 * mi, j]
            ax.imshow(_slice(p.activations[j], slice_index), cmap="gray")
            ax.set_title(f"{method_title(m)} #{j + 1}: A^{f}", fontsize=7)
            ax = axes[3 * mi + 1, j]
            if m == "gradcam":
                ax.text(0.5, 0.5, f"α = {float(p.scalar_weights[j]):+.3g}", ha="center", va="center", fontsize=9,
                        transform=ax.transAxes)
                ax.set_title("× scalar weight", fontsize=7)
            else:
                w = _slice(p.weights[j], slice_index)
                wl = float(np.abs(w).max()) or 1.0
                ax.imshow(w, cmap="RdBu_r", vmin=-wl, vmax=wl)
                ax.set_title("⊙ gradient map", fontsize=7)
            ax = axes[3 * mi + 2, j]
            ax.imshow(_slice(p.contributions[j], slice_index), cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"Σ = {float(p.totals[j]):+.3g}", fontsize=7)
        ax = axes[3 * mi + 2, n]
        ax.imshow(_slice(p.rest, slice_index), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"+ other features\nΣ = {float(p.rest.sum()):+.3g}", fontsize=7)
        ax = axes[3 * mi + 2, n + 1]
        ax.imshow(_slice(p.final, slice_index), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"= {method_title(m)}\nΣ = {float(p.final.sum()):+.3g}", fontsize=7)
    where = f"axial slice {slice_index} of the feature grid; red +, blue −"
    fig.suptitle(f"{title}\n({where})" if title else f"Step by step ({where})", fontsize=9)
    fig.tight_layout()
    dest = Path(path)
    try:
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return dest
