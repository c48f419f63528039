"""Region targets on a pointwise head: every target's maps and certificate evidence from one gradient per class.

When the head after the explained layer computes each output voxel from the same voxel of the explained layer
only (a 1×1×1 output convolution, activations, ...) and the targets are regions of one output channel
(:class:`medcam3d.targets.SegmentationRegions`), the regions of a class are disjoint and target t's gradient is
the class's gradient restricted to its region::

    g_t = G ⊙ 1[R_t],    G = ∂ (Σ_{t of the class} s_t) / ∂A    (one backward pass per class)

Everything per target is then a segment reduction of class-level tensors over the label map ``L`` (``L(x) = t + 1``
on ``R_t``, 0 elsewhere), and no ``[B, T, F, *S]`` tensor is made:

* HiResCAM (:func:`medcam3d.methods.hirescam` of ``g_t``): ``1[R_t] · Σ_f G^f ⊙ A^f``;
* Grad-CAM (:func:`medcam3d.methods.gradcam` of ``g_t``): ``Σ_f α_{t,f} A^f`` with
  ``α_{t,f} = Σ_{x ∈ R_t} G^f(x) / N`` (N positions);
* the certificate's evidence (:class:`medcam3d.certificate.GradientSummary`): ``Σ g_t ⊙ A`` and ``Σ |g_t ⊙ A|``,
  the spatial variation and ``max |g_t|`` (the zeros outside the region counted), ``Σ g_t ⊙ P`` at each probe
  point, and the Jacobian sketch ``Σ_t v_t g_t = G ⊙ v[L]``.

Sums over space are taken in float64. Pure torch (layer 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .certificate import GradientSummary

__all__ = ["REGION_METHODS", "ClassGradient", "feature_sums", "segment_sum"]

#: The methods computed here from one gradient per class (others need the per-target gradients).
REGION_METHODS = ("hirescam", "gradcam")


def segment_sum(values: Tensor, labels: Tensor, size: int) -> Tensor:
    """``values [B, ..., N]`` summed per label ``labels [B, N]`` (0..size−1) -> ``[B, ..., size]`` float64 (one
    ``bincount`` over every row, each row's labels offset by ``size``)."""
    rows = values.shape[:-1]
    n_rows = math.prod(rows)
    index = labels.view(labels.shape[0], *([1] * (values.ndim - 2)), labels.shape[1]).expand(values.shape)
    offset = torch.arange(n_rows, device=values.device).view(*rows, 1) * size
    sums = torch.bincount((index + offset).flatten(), weights=values.flatten().double(), minlength=n_rows * size)
    return sums.view(*rows, size)


def feature_sums(g: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ_f g_f ⊙ x_f, Σ_f |g_f ⊙ x_f|)`` of ``[B, F, N]`` tensors -> two ``[B, N]``, feature by feature
    (contiguous passes: a reduction over the strided feature axis is slow on the CPU)."""
    signed = torch.zeros((g.shape[0], g.shape[2]), dtype=g.dtype, device=g.device)
    magnitude = torch.zeros_like(signed)
    for f in range(g.shape[1]):
        prod = g[:, f] * x[:, f]
        signed += prod
        magnitude += prod.abs_()
    return signed, magnitude


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0/0 = 0 and x/0 = inf (as the certificate's ratios)."""
    safe = num / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, safe, torch.where(num > 0, torch.full_like(num, torch.inf), torch.zeros_like(num)))


class ClassGradient:
    """One class's gradient ``G`` and the label map of its targets' regions.

    Args:
        gradient: ``[B, F, *S]`` ``∂ (Σ_t s_t) / ∂A`` over the class's targets, at the real activations.
        labels: ``[B, *S]`` int64, ``t + 1`` on target t's region (t indexes all T targets), 0 elsewhere.
        n_targets: T.
    """

    def __init__(self, gradient: Tensor, labels: Tensor, n_targets: int) -> None:
        self.spatial = tuple(gradient.shape[2:])
        self.g = gradient.flatten(2)  # [B, F, N]
        self.labels = labels.flatten(1).to(gradient.device)  # [B, N]
        self.size = n_targets + 1
        self.n = self.g.shape[2]
        self._g_sums: Tensor | None = None

    @property
    def g_sums(self) -> Tensor:
        """``[B, F, T + 1]`` float64: ``Σ_{x ∈ R_t} G^f(x)`` (column 0: outside every region)."""
        if self._g_sums is None:
            self._g_sums = segment_sum(self.g, self.labels, self.size)
        return self._g_sums

    def _ids(self, targets: Sequence[int]) -> Tensor:
        return torch.as_tensor(list(targets), device=self.g.device) + 1

    def _inside(self, targets: Sequence[int]) -> Tensor:
        """``[B, k, N]`` bool: target t's region."""
        return self.labels.unsqueeze(1) == self._ids(targets).view(1, -1, 1)

    def _spread(self, values: Tensor, targets: Sequence[int]) -> Tensor:
        """``[B, k, N]``: ``values [B, N]`` on target t's region in row t, 0 elsewhere (written at the labelled voxels
        only)."""
        lookup = torch.full((self.size,), -1, dtype=torch.int64, device=self.labels.device)
        lookup[self._ids(targets)] = torch.arange(len(targets), device=self.labels.device)
        row = lookup[self.labels]  # [B, N]: the target's row, -1 outside the targets
        b, n = torch.nonzero(row >= 0, as_tuple=True)
        out = torch.zeros((values.shape[0], len(targets), values.shape[1]), dtype=values.dtype, device=values.device)
        out[b, row[b, n], n] = values[b, n]
        return out

    def maps(self, method: str, activations: Tensor, targets: Sequence[int]) -> Tensor:
        """``[B, k, *S]`` raw maps of ``method`` (one of :data:`REGION_METHODS`) for ``targets``, equal to the method
        of the dense gradients ``g_t`` (module docstring). ``activations``: ``[B, F, *S]``."""
        a = activations.flatten(2)
        if method == "hirescam":
            out = self._spread(feature_sums(self.g, a.to(self.g.dtype))[0], targets)
        elif method == "gradcam":
            alpha = self.g_sums[..., self._ids(targets)] / self.n  # [B, F, k]
            out = torch.bmm(alpha.transpose(1, 2).to(a.dtype), a)  # [B, k, N]
        else:
            raise ValueError(f"method {method!r} needs the per-target gradients (region methods: {REGION_METHODS})")
        return out.reshape(*out.shape[:2], *self.spatial)

    def _sums(self, other: Tensor, targets: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(Σ g_t ⊙ X, Σ |g_t ⊙ X|)`` per target, ``X`` ``[B, F, *S]``: two ``[B, k]`` float64. The F products at a
        voxel are summed in the gradients' dtype, the voxels in float64: the error stays within F + 1 epsilons of
        ``Σ |g_t ⊙ X|``, far inside the certificate's tolerance (1000 epsilons)."""
        signed, magnitude = feature_sums(self.g, other.flatten(2).to(self.g.dtype))
        ids = self._ids(targets)
        return (segment_sum(signed, self.labels, self.size)[:, ids],
                segment_sum(magnitude, self.labels, self.size)[:, ids])

    def _stats(self, targets: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(spatial variation, max |g_t|)`` per target (:func:`medcam3d.certificate.gradient_stats` of the dense
        ``g_t``, whose zeros outside the region count): two ``[k]`` tensors."""
        index = self.labels.unsqueeze(1).expand(self.g.shape)
        shape = (*self.g.shape[:2], self.size)
        g = self.g
        hi = torch.full(shape, -torch.inf, dtype=g.dtype, device=g.device).scatter_reduce(2, index, g, "amax").double()
        lo = torch.full(shape, torch.inf, dtype=g.dtype, device=g.device).scatter_reduce(2, index, g, "amin").double()
        count = segment_sum(torch.ones_like(self.labels, dtype=torch.float64), self.labels, self.size)
        outside = (count < self.n).unsqueeze(1)  # the region leaves zeros elsewhere
        hi = torch.where(outside, hi.clamp_min(0.0), hi)
        lo = torch.where(outside, lo.clamp_max(0.0), lo)
        mean = self.g_sums / self.n
        ids = self._ids(targets)
        dev = torch.maximum(hi - mean, mean - lo)[..., ids].amax(dim=(0, 1))
        scale = torch.maximum(hi, -lo)[..., ids].amax(dim=(0, 1))
        return _ratio(dev, scale).to(self.g.dtype), scale.to(self.g.dtype)

    def dense(self, targets: Sequence[int]) -> Tensor:
        """The per-target gradients ``[B, k, F, *S]`` (for per-class Jacobian comparisons only)."""
        inside = self._inside(targets).unsqueeze(2)  # [B, k, 1, N]
        out = self.g.unsqueeze(1) * inside
        return out.reshape(*out.shape[:3], *self.spatial)

    def summary(self, activations: Tensor, targets: Sequence[int], points: Sequence[Tensor]) -> GradientSummary:
        """The certificate's evidence for ``targets`` (:class:`~medcam3d.certificate.GradientSummary`):
        ``activations`` and each probe point ``[B, F, *S]``."""
        signed, magnitude = self._sums(activations, targets)
        variation, gmax = self._stats(targets)
        ids = self._ids(targets)

        def combine(coef: Tensor) -> Tensor:
            per_label = torch.zeros(self.size, dtype=self.g.dtype, device=self.g.device)
            per_label[ids] = coef.to(self.g.device, self.g.dtype)
            out = self.g * per_label[self.labels].unsqueeze(1)
            return out.reshape(*out.shape[:2], *self.spatial)

        return GradientSummary(signed, magnitude, variation, gmax, [self._sums(p, targets) for p in points],
                               combine, lambda: self.dense(targets))
