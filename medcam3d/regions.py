"""Region targets on a pointwise head: every target's maps and certificate evidence from the regions' voxels.

When the head after the explained layer computes each output voxel from the same voxel of the explained layer
only (a 1×1×1 output convolution, activations, ...) and the targets are regions of output channels
(:class:`medcam3d.targets.SegmentationRegions`), two things hold exactly:

* the target scores depend on the explained activations ``A`` at the regions' voxels only, so the head needs to be
  evaluated -- and differentiated, and probed by the certificate -- on those ``n`` voxels alone (``n`` is often a
  few per cent of the grid; :class:`RegionHead`), and every gradient is zero elsewhere;
* the regions of one class are disjoint, so target t's gradient is the class's gradient restricted to its region::

      g_t = G ⊙ 1[R_t],    G = ∂ (Σ_{t of the class} s_t) / ∂A    (one backward pass per class)

Everything per target is then a segment reduction of class-level tensors over the label map ``L`` (``L(x) = t + 1``
on ``R_t``, 0 elsewhere) at the ``n`` voxels (:class:`ClassGradient`), and no ``[B, T, F, *S]`` tensor is made:

* HiResCAM (:func:`medcam3d.methods.hirescam` of ``g_t``): ``1[R_t] · Σ_f G^f ⊙ A^f``;
* Grad-CAM (:func:`medcam3d.methods.gradcam` of ``g_t``): ``Σ_f α_{t,f} A^f`` over the whole grid, with
  ``α_{t,f} = Σ_{x ∈ R_t} G^f(x) / N`` (N positions of the grid);
* the certificate's evidence (:class:`medcam3d.certificate.GradientSummary`): ``Σ g_t ⊙ A`` and ``Σ |g_t ⊙ A|``,
  the spatial variation and ``max |g_t|`` (the zeros outside the region counted), ``Σ g_t ⊙ P`` at each probe
  point, and the Jacobian sketch ``Σ_t v_t g_t = G ⊙ v[L]``. Probe points are drawn on the ``n`` voxels: the
  scores cannot see a probe anywhere else.

Sums over space are taken in float64. Pure torch (layer 1): the head comes in as a callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .certificate import GradientSummary

__all__ = ["REGION_METHODS", "ClassGradient", "RegionHead", "feature_sums", "segment_sum"]

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


def _grad(scores: Tensor, leaf: Tensor, weights: Tensor) -> Tensor:
    """``∂ Σ_t weights[b, t] scores[b, t] / ∂ leaf`` (one backward; zeros where nothing depends on ``leaf``)."""
    if not scores.requires_grad:
        return torch.zeros_like(leaf)
    (g,) = torch.autograd.grad(scores, leaf, grad_outputs=weights, retain_graph=True, allow_unused=True)
    return torch.zeros_like(leaf) if g is None else g


class RegionHead:
    """The head's region-target scores, differentiated at the regions' voxels (a
    :class:`medcam3d.certificate.ProbedHead` whose tensors are ``[B, F, n]``: the n voxels instead of the grid).

    Args:
        scores_of: activations shaped like ``leaf`` -> ``[B, T]`` target scores (autograd graph from them).
        leaf: the real activations at the voxels, a leaf that requires grad, ``[B, F, 1, ..., n]`` (axes of size 1
            so that the head takes it) or the whole grid ``[B, F, *S]`` (n = N).
        scores: ``[B, T]`` ``scores_of(leaf)`` (graph kept).
        labels: class -> ``[B, n]`` int64 label map at the voxels (t + 1 on target t's region, 0 elsewhere).
        target_class: the class of each of the T targets.
        probes: probe activations shaped like ``leaf`` (leaves; :func:`medcam3d.certificate.probe_points`).
        positions: ``[n]`` flat indices of the voxels on the explained grid; None when ``leaf`` is the whole grid.
    """

    def __init__(self, scores_of: Callable[[Tensor], Tensor], leaf: Tensor, scores: Tensor,
                 labels: dict[int, Tensor], target_class: Sequence[int], probes: Sequence[Tensor] = (),
                 positions: Tensor | None = None) -> None:
        self.scores_of = scores_of
        self.positions = positions
        self.leaf = leaf
        self.scores = scores
        self.labels = labels
        self.target_class = list(target_class)
        self.probes = list(probes)
        self.point_scores = [scores_of(p) for p in self.probes]
        self.points = [p.detach().flatten(2) for p in self.probes]
        self.activations = leaf.detach().flatten(2)  # [B, F, n]
        self._real: dict[int, Tensor] = {}  # class -> its gradient at the real activations

    def class_gradient(self, cls: int, probe: int | None = None) -> Tensor:
        """``[B, F, n]`` gradient of the summed scores of class ``cls``'s targets (one backward pass), at the real
        activations (cached) or at probe point number ``probe``."""
        if probe is None and cls in self._real:
            return self._real[cls]
        scores, leaf = (self.scores, self.leaf) if probe is None else (self.point_scores[probe], self.probes[probe])
        v = torch.zeros_like(scores)
        v[:, [t for t, c in enumerate(self.target_class) if c == cls]] = 1.0
        g = _grad(scores, leaf, v).detach().flatten(2)
        if probe is None:
            self._real[cls] = g
        return g

    def gradients(self, classes: Sequence[int], probe: int | None = None) -> Tensor:
        """``[B, k, F, n]`` per-target gradients of the targets ``classes`` (their class's gradient on their
        region), at the real activations or at probe point number ``probe``."""
        sums: dict[int, Tensor] = {}
        out = []
        for t in classes:
            cls = self.target_class[t]
            if cls not in sums:
                sums[cls] = self.class_gradient(cls, probe)
            out.append(sums[cls] * (self.labels[cls] == t + 1).unsqueeze(1))
        return torch.stack(out, dim=1)

    def combined_gradient(self, weights: Tensor, probe: int) -> Tensor:
        """``[B, F, n]`` gradient of ``Σ_t weights[b, t] s_t`` (``weights`` ``[B, T]``) at probe ``probe``."""
        return _grad(self.point_scores[probe], self.probes[probe], weights).detach().flatten(2)

    def class_runs(self, targets: Sequence[int]) -> list[tuple[int, list[int]]]:
        """``targets`` cut into runs of consecutive targets of one class: ``(class, run)`` in order."""
        runs: list[tuple[int, list[int]]] = []
        for t in targets:
            cls = self.target_class[t]
            if runs and runs[-1][0] == cls:
                runs[-1][1].append(t)
            else:
                runs.append((cls, [t]))
        return runs


class ClassGradient:
    """One class's gradient ``G`` at the regions' voxels and the label map of its targets' regions there.

    Args:
        gradient: ``[B, F, n]`` ``∂ (Σ_t s_t) / ∂A`` over the class's targets at the n voxels (zero elsewhere on
            the grid), at the real activations; or ``[B, F, *S]`` on the whole grid.
        labels: ``[B, n]`` (or ``[B, *S]``) int64, ``t + 1`` on target t's region (t indexes all T targets), 0
            elsewhere.
        n_targets: T.
        grid: the explained grid ``S``; default ``gradient.shape[2:]`` (the whole grid).
        positions: ``[n]`` flat indices of the voxels on the grid; default every voxel, in order.
    """

    def __init__(self, gradient: Tensor, labels: Tensor, n_targets: int, grid: Sequence[int] | None = None,
                 positions: Tensor | None = None) -> None:
        self.grid = tuple(gradient.shape[2:]) if grid is None else tuple(grid)
        self.g = gradient.flatten(2)  # [B, F, n]
        self.labels = labels.flatten(1).to(gradient.device)  # [B, n]
        self.size = n_targets + 1
        self.n = math.prod(self.grid)  # N, the positions of the whole grid
        self.positions = positions
        self._g_sums: Tensor | None = None

    @property
    def g_sums(self) -> Tensor:
        """``[B, F, T + 1]`` float64: ``Σ_{x ∈ R_t} G^f(x)`` (column 0: outside every region)."""
        if self._g_sums is None:
            self._g_sums = segment_sum(self.g, self.labels, self.size)
        return self._g_sums

    def _ids(self, targets: Sequence[int]) -> Tensor:
        return torch.as_tensor(list(targets), device=self.g.device) + 1

    def _spread(self, values: Tensor, targets: Sequence[int]) -> Tensor:
        """``[B, k, N]``: ``values [B, n]`` on target t's region in row t, 0 elsewhere on the grid."""
        lookup = torch.full((self.size,), -1, dtype=torch.int64, device=self.labels.device)
        lookup[self._ids(targets)] = torch.arange(len(targets), device=self.labels.device)
        row = lookup[self.labels]  # [B, n]: the target's row, -1 outside the targets
        b, j = torch.nonzero(row >= 0, as_tuple=True)
        out = torch.zeros((values.shape[0], len(targets), self.n), dtype=values.dtype, device=values.device)
        where = j if self.positions is None else self.positions.to(j.device)[j]
        out[b, row[b, j], where] = values[b, j]
        return out

    def maps(self, method: str, activations: Tensor, targets: Sequence[int], grid: Tensor | None = None) -> Tensor:
        """``[B, k, *S]`` raw maps of ``method`` (one of :data:`REGION_METHODS`) for ``targets``, equal to the method
        of the dense gradients ``g_t`` (module docstring). ``activations``: ``[B, F, n]`` at the voxels (or
        ``[B, F, *S]``); ``grid``: ``[B, F, *S]`` on the whole grid, for Grad-CAM (default ``activations``)."""
        if method == "hirescam":
            a = activations.flatten(2).to(self.g.dtype)
            out = self._spread(feature_sums(self.g, a)[0], targets)
        elif method == "gradcam":
            whole = (activations if grid is None else grid).flatten(2)
            alpha = self.g_sums[..., self._ids(targets)] / self.n  # [B, F, k]
            out = torch.bmm(alpha.transpose(1, 2).to(whole.dtype), whole)  # [B, k, N]
        else:
            raise ValueError(f"method {method!r} needs the per-target gradients (region methods: {REGION_METHODS})")
        return out.reshape(*out.shape[:2], *self.grid)

    def _sums(self, other: Tensor, targets: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(Σ g_t ⊙ X, Σ |g_t ⊙ X|)`` per target, ``X`` ``[B, F, n]``: two ``[B, k]`` float64. The F products at a
        voxel are summed in the gradients' dtype, the voxels in float64: the error stays within F + 1 epsilons of
        ``Σ |g_t ⊙ X|``, far inside the certificate's tolerance (1000 epsilons)."""
        signed, magnitude = feature_sums(self.g, other.flatten(2).to(self.g.dtype))
        ids = self._ids(targets)
        return (segment_sum(signed, self.labels, self.size)[:, ids],
                segment_sum(magnitude, self.labels, self.size)[:, ids])

    def _stats(self, targets: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(spatial variation, max |g_t|)`` per target (:func:`medcam3d.certificate.gradient_stats` of the dense
        ``g_t`` on the whole grid, whose zeros outside the region count): two ``[k]`` tensors."""
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
        """The per-target gradients at the voxels, ``[B, k, F, n]`` (for per-class Jacobian comparisons only)."""
        inside = self.labels.unsqueeze(1) == self._ids(targets).view(1, -1, 1)  # [B, k, n]
        return self.g.unsqueeze(1) * inside.unsqueeze(2)

    def summary(self, activations: Tensor, targets: Sequence[int], points: Sequence[Tensor]) -> GradientSummary:
        """The certificate's evidence for ``targets`` (:class:`~medcam3d.certificate.GradientSummary`, its tensors
        at the voxels): ``activations`` and each probe point ``[B, F, n]``."""
        signed, magnitude = self._sums(activations, targets)
        variation, gmax = self._stats(targets)
        ids = self._ids(targets)

        def combine(coef: Tensor) -> Tensor:
            per_label = torch.zeros(self.size, dtype=self.g.dtype, device=self.g.device)
            per_label[ids] = coef.to(self.g.device, self.g.dtype)
            return self.g * per_label[self.labels].unsqueeze(1)

        return GradientSummary(signed, magnitude, variation, gmax, [self._sums(p, targets) for p in points],
                               combine, lambda: self.dense(targets))
