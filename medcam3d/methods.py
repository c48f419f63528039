"""The explanation methods: pure tensor functions of (activations, gradients).

This module is the math of medcam3d and nothing else. Every method maps

* ``activations`` ``A``: ``[B, F, *spatial]`` -- the explained layer's output for a batch of B samples
  (F feature maps, 1-3 spatial axes), and
* ``gradients`` ``G``: ``[B, K, F, *spatial]`` -- ``∂s_k/∂A`` of the raw score ``s_k`` (before sigmoid/softmax)
  of each of the K explained classes, for each sample,

to a signed raw map ``[B, K, *spatial]`` (no ReLU, no normalisation: see :mod:`medcam3d.heatmaps`).

Notation as in Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of convolutional
neural networks": ``A^f`` is feature map f, ``⊙`` the element-wise product, ``Σ_f`` a sum over features and
``mean_space`` a mean over all spatial positions.

Methods are registered by name in :data:`METHODS`; :func:`register_method` adds your own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "BUILTIN_METHODS",
    "DEFAULT_METHODS",
    "METHODS",
    "METHOD_TITLES",
    "Method",
    "cam",
    "get_method",
    "gradcam",
    "gradcampp",
    "hirescam",
    "layercam",
    "method_title",
    "register_method",
    "xgradcam",
]

Method = Callable[[Tensor, Tensor], Tensor]
"""``method(activations [B, F, *S], gradients [B, K, F, *S]) -> raw [B, K, *S]``."""

METHODS: dict[str, Method] = {}

DEFAULT_METHODS: tuple[str, ...] = ("hirescam", "gradcam")
"""The methods computed when none are named: the faithful one and the one it is compared with."""

METHOD_TITLES: dict[str, str] = {
    "hirescam": "HiResCAM", "gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM", "cam": "CAM",
}
"""How each built-in method is written for people."""

_EPS = 1e-12


BUILTIN_METHODS: tuple[str, ...] = ("hirescam", "gradcam", "cam", "gradcampp", "xgradcam", "layercam")
"""The methods defined in this module; :func:`register_method` never replaces them."""


def register_method(name: str, *, overwrite: bool = False) -> Callable[[Method], Method]:
    """Decorator registering ``fn(activations, gradients) -> raw`` under ``name``.

    A name that is taken raises ValueError instead of replacing the method silently: a built-in method
    (:data:`BUILTIN_METHODS`) is never replaced; a method registered earlier is replaced only with
    ``overwrite=True`` (e.g. when a notebook cell defining it runs again).

    Example::

        @register_method("abs_hirescam")
        def abs_hirescam(activations, gradients):  # [B, F, *S], [B, K, F, *S] -> [B, K, *S]
            return (gradients * activations.unsqueeze(1)).sum(dim=2).abs()
    """

    def decorate(fn: Method) -> Method:
        if name in METHODS:
            if name in BUILTIN_METHODS:
                raise ValueError(f"method {name!r} is built in and cannot be replaced; "
                                 "register yours under another name")
            if not overwrite:
                raise ValueError(f"method {name!r} is already registered; pass overwrite=True to replace it")
        METHODS[name] = fn
        return fn

    return decorate


def get_method(name: str) -> Method:
    """The registered method called ``name`` (ValueError listing the known names otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


def method_title(method: str) -> str:
    """How a method is written for people (``"hirescam"`` -> ``"HiResCAM"``; unknown names unchanged)."""
    return METHOD_TITLES.get(method, method)


def _spatial_dims(gradients: Tensor) -> tuple[int, ...]:
    """The spatial axes of a ``[B, K, F, *S]`` tensor."""
    return tuple(range(3, gradients.ndim))


def _weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """``Σ_f w_{b,k,f} A^f_b``: weights ``[B, K, F]``, activations ``[B, F, *S]`` -> ``[B, K, *S]``."""
    a = activations.flatten(2)  # [B, F, N]
    return torch.bmm(weights, a).reshape(*weights.shape[:2], *activations.shape[2:])


@register_method("hirescam")
def hirescam(activations: Tensor, gradients: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin, eq. 4): ``Σ_f ∂s/∂A^f ⊙ A^f``.

    The gradient multiplies the activation element-wise *before* the sum over features, so every position keeps
    its own gradient. When everything after the explained layer is one affine map ``s = Σ W ⊙ A + b``, the map
    sums exactly to ``s − b`` (completeness) and shows the locations the model used.

    Shapes: activations ``[B, F, *S]``, gradients ``[B, K, F, *S]`` -> ``[B, K, *S]``.
    """
    return (gradients * activations.unsqueeze(1)).sum(dim=2)


@register_method("gradcam")
def gradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al.; Draelos & Carin eq. 2): ``Σ_f mean_space(∂s/∂A^f) A^f``.

    The gradient of each feature is averaged over all spatial positions first (``α_f``), so Grad-CAM can
    highlight positions whose own gradient is zero or of the opposite sign. For AxialNet-style models use a
    layout that puts the slices in a spatial axis, so ``α_f`` is the mean over the whole volume.

    Shapes: activations ``[B, F, *S]``, gradients ``[B, K, F, *S]`` -> ``[B, K, *S]``.
    """
    alpha = gradients.mean(dim=_spatial_dims(gradients))  # [B, K, F]
    return _weighted_sum(alpha, activations)


@register_method("cam")
def cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """CAM (Zhou et al.; Draelos & Carin eq. 1): ``Σ_f w_f A^f``.

    Defined only for a global-average-pool + linear head ``s = Σ_f w_f mean_space(A^f) + b``. There
    ``∂s/∂A^f`` equals ``w_f / N`` at every position (N spatial positions), so ``w_f = Σ_space ∂s/∂A^f``.
    The explainer refuses this method unless the certificate shows such a head. On it,
    ``cam = N · gradcam = N · hirescam``.

    Shapes: activations ``[B, F, *S]``, gradients ``[B, K, F, *S]`` -> ``[B, K, *S]``.
    """
    w = gradients.sum(dim=_spatial_dims(gradients))  # [B, K, F]
    return _weighted_sum(w, activations)


@register_method("gradcampp")
def gradcampp(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al., eq. 19 with the exponential-score closed form): ``Σ_f w_f A^f`` with

    ``w_f = Σ_space α^f ⊙ relu(∂s/∂A^f)``,
    ``α^f = g² / (2 g² + Σ_space(A^f) · g³)`` where ``g = ∂s/∂A^f`` (``α = 0`` where ``g = 0``).

    Shapes: activations ``[B, F, *S]``, gradients ``[B, K, F, *S]`` -> ``[B, K, *S]``.
    """
    dims = _spatial_dims(gradients)
    g2 = gradients.pow(2)
    g3 = g2 * gradients
    a_sum = activations.sum(dim=tuple(d - 1 for d in dims), keepdim=True).unsqueeze(1)  # [B, 1, F, 1...]
    denom = 2 * g2 + a_sum * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0)
    w = (alpha * torch.relu(gradients)).sum(dim=dims)  # [B, K, F]
    return _weighted_sum(w, activations)


@register_method("xgradcam")
def xgradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al.): ``Σ_f w_f A^f`` with ``w_f = Σ_space (A^f / Σ_space A^f) ⊙ ∂s/∂A^f``.

    Shapes: activations ``[B, F, *S]``, gradients ``[B, K, F, *S]`` -> ``[B, K, *S]``.
    """
    dims = _spatial_dims(gradients)
    a = activations.unsqueeze(1)  # [B, 1, F, *S]
    a_norm = a / (a.sum(dim=dims, keepdim=True) + _EPS)
    w = (a_norm * gradients).sum(dim=dims)  # [B, K, F]
    return _weighted_sum(w, activations)


@register_method("layercam")
def layercam(activations: Tensor, gradients: Tensor) -> Tensor:
    """LayerCAM (Jiang et al.): ``Σ_f relu(∂s/∂A^f) ⊙ A^f`` (HiResCAM with only positive gradients).

    Shapes: activations ``[B, F, *S]``, gradients ``[B, K, F, *S]`` -> ``[B, K, *S]``.
    """
    return (torch.relu(gradients) * activations.unsqueeze(1)).sum(dim=2)
