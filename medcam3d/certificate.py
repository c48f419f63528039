"""What is proven about a set of maps: the faithfulness certificate, and method-disagreement metrics.

Pure tensor code (torch only): the :class:`Certificate` record, the evidence it is decided from, and the
:class:`Prober` that gathers that evidence from gradients of the head (everything after the explained layer) taken
at the real activations and at random probe points.

Certificate kinds (Draelos & Carin, Section 4):

* ``"cam"`` -- the head is affine in the activations *and* its gradient is constant over space (global average
  pooling + linear). CAM = HiResCAM = Grad-CAM up to a positive factor; all three are exact.
* ``"affine-head"`` -- the head is affine (e.g. one fully connected layer, or AxialNet's per-slice FC + mean over
  slices). HiResCAM is exact: the map sums to ``s − s(0)`` (``s(0) = b``, the bias). Grad-CAM is not.
* ``"none"`` -- the head is not affine (e.g. FC–ReLU–FC). No method here is proven faithful; HiResCAM is then
  a first-order (gradient × activation) attribution only.
* ``"unchecked"`` -- certification was switched off.

Evidence: the largest relative difference between the Jacobian at the real activations and at the probe points,
the secant residual at those points, the completeness residual ``s − s(0) − Σ HiResCAM`` per (sample, class), and
the spatial variation of the gradient.

How it is gathered: the explainer draws :func:`probe_points`, evaluates the head there and hands a
:class:`ProbedHead` (gradients at the real activations and at the probe points) to a :class:`Prober`. The prober is
fed the real gradients a chunk of classes at a time (:meth:`Prober.add`), as the maps are computed, and
:meth:`Prober.finish` turns what it collected into one :class:`Evidence` record, which :func:`certify` decides.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .heatmaps import normalize

__all__ = [
    "Certificate",
    "Evidence",
    "GradientSummary",
    "ProbedHead",
    "Prober",
    "certify",
    "contribution_sums",
    "default_tolerance",
    "disagreement",
    "gradient_stats",
    "jacobian_difference",
    "jacobian_sketch_difference",
    "l2_distance",
    "pearson",
    "probe_points",
    "secant_from_sums",
    "secant_residual",
    "spatial_variation",
    "top_overlap",
]

KINDS = ("cam", "affine-head", "none", "unchecked")


def _per_class_max(t: Tensor) -> Tensor:
    """Max over every axis but the class axis of a ``[B, K, ...]`` tensor -> ``[K]``."""
    return t.transpose(0, 1).flatten(1).amax(dim=1)


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0/0 = 0 and x/0 = inf."""
    out = num / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, out, torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num)))


def jacobian_difference(reference: Tensor, probe: Tensor) -> Tensor:
    """Relative difference ``max|J_probe − J_ref| / max|J_ref|`` per class.

    Args: reference, probe: ``[B, K, F, *S]`` gradients of the K class scores at two activation points.
    Returns: ``[K]`` (0 when both are zero; inf when only the probe's is non-zero)."""
    num = _per_class_max((probe - reference).abs())
    den = _per_class_max(reference.abs())
    return _safe_ratio(num, den)


def jacobian_sketch_difference(reference: Tensor, probe: Tensor) -> Tensor:
    """Relative difference ``max|v·J_probe − v·J_ref| / max|v·J_ref|`` of one combination ``v`` of the class
    Jacobians (the explainer scales each class to unit gradient before combining, so no class hides behind a
    larger one). Args: ``[B, F, *S]`` each. Returns: a 0-d tensor (0 when both are zero)."""
    return _safe_ratio((probe - reference).abs().amax(), reference.abs().amax())


def secant_residual(gradients: Tensor, probes: list[Tensor], probe_scores: list[Tensor], baseline: Tensor) -> Tensor:
    """Per-class secant test of affinity at each probe point ``P``: ``s(P) − s(0) − Σ ∂s/∂A|_A ⊙ P``.

    For an affine head ``s(P) = s(0) + J·P`` exactly, with ``J`` the Jacobian at the real activations; any
    curvature between 0 and ``P`` shows up here. Costs no backward pass (the head is evaluated at ``P`` anyway).

    Args:
        gradients: ``[B, k, F, *S]`` Jacobian rows at the real activations.
        probes: probe activations, each ``[B, F, *S]`` (volume layout).
        probe_scores: ``s(P)`` of the k classes for each probe, each ``[B, k]``.
        baseline: ``s(0)``, ``[B, k]``.
    Returns: ``[k]`` float64, the largest residual over samples and probes relative to
    ``|s(P)| + |s(0)| + Σ|∂s/∂A ⊙ P|``.
    """
    return secant_from_sums([contribution_sums(p, gradients) for p in probes], probe_scores, baseline)


def secant_from_sums(sums: Sequence[tuple[Tensor, Tensor]], probe_scores: Sequence[Tensor], baseline: Tensor) -> Tensor:
    """:func:`secant_residual` from ``(Σ ∂s/∂A|_A ⊙ P, Σ |∂s/∂A|_A ⊙ P|)`` at each probe point (each ``[B, k]``,
    e.g. from :func:`contribution_sums`), the scores ``s(P)`` there (each ``[B, k]``) and ``s(0)`` ``[B, k]``.
    Returns: ``[k]`` float64."""
    out = torch.zeros(baseline.shape[1], dtype=torch.float64)
    s0 = baseline.detach().double().cpu()
    for (lin, mag), sp in zip(sums, probe_scores):
        sp = sp.detach().double().cpu()
        res = (sp - s0 - lin.cpu()).abs()
        rel = _safe_ratio(res, sp.abs() + s0.abs() + mag.cpu())
        out = torch.maximum(out, rel.amax(dim=0))
    return out


def spatial_variation(gradients: Tensor) -> Tensor:
    """How far the gradient is from constant over space, ``max|g − mean_space g| / max|g|`` per class.

    Zero for a global-average-pool + linear head. Args: ``[B, K, F, *S]``. Returns: ``[K]``."""
    return gradient_stats(gradients)[0]


def gradient_stats(gradients: Tensor) -> tuple[Tensor, Tensor]:
    """``(spatial_variation, max|g|)`` per class from one min/max pass and one mean pass over the gradients
    (``max|g − m| = max(max g − m, m − min g)``, so no ``[B, K, F, *S]`` temporary is made).

    Args: ``[B, K, F, *S]``. Returns: two ``[K]`` tensors."""
    flat = gradients.flatten(3)  # [B, K, F, N]
    lo, hi = torch.aminmax(flat, dim=3)
    mean = flat.mean(dim=3)
    dev = torch.maximum(hi - mean, mean - lo)
    scale = torch.maximum(hi, -lo)
    scale_k = _per_class_max(scale)
    return _safe_ratio(_per_class_max(dev), scale_k), scale_k


def contribution_sums(activations: Tensor, gradients: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ g ⊙ A, Σ |g ⊙ A|)`` over features and space.

    The first is the sum of the HiResCAM map, computed as a float64 matrix product (it is compared with
    ``s − s(0)`` at a tolerance of 1000 float32 epsilons); the second, the scale of its rounding error, as
    ``Σ |g| |A|`` in the gradients' dtype. Args: activations ``[B, F, *S]``, gradients ``[B, K, F, *S]``.
    Returns: two ``[B, K]`` float64 tensors."""
    g = gradients.flatten(2)  # [B, K, F*S]
    a = activations.flatten(1).unsqueeze(2)  # [B, F*S, 1]
    signed = torch.bmm(g.double(), a.double())[..., 0]
    magnitude = torch.bmm(g.abs(), a.abs().to(g.dtype))[..., 0].double()
    return signed, magnitude


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for the affinity tests: 1000 machine epsilons of the activations' dtype."""
    return 1000.0 * torch.finfo(dtype).eps


@dataclass
class Certificate:
    """What is proven about the maps of one explanation call.

    Attributes:
        kind: ``"cam"``, ``"affine-head"``, ``"none"`` or ``"unchecked"`` (weakest over the explained classes).
        classes: the K explained class indices.
        per_class: kind per explained class, ``list[str]`` of length K.
        jacobian_difference: ``[K]`` largest relative Jacobian difference between the real activations and the
            probe points. With ``jacobian_test="sketch"`` it is measured along one random, class-scaled
            combination of the K Jacobians (one backward pass per probe) and every class carries that value;
            when the sketch differs, the explainer compares every class on its own.
        spatial_variation: ``[K]`` relative deviation of the gradient from its spatial mean.
        baseline: ``[B, K]`` head output at zero activations, ``s(0)`` (the bias ``b`` for an affine head).
        completeness_residual: ``[B, K]`` ``s − s(0) − Σ HiResCAM`` (≈ 0 for an affine head).
        relative_residual: ``[B, K]`` residual divided by ``|s| + |s(0)| + Σ|∂s/∂A ⊙ A|``.
        tolerance: relative tolerance used for the decisions.
        n_probes: number of random probe points.
        head: how the head was evaluated: ``"fx"`` (traced head only) or ``"rerun"`` (model re-run with the
            explained layer's output replaced).
        probe_residual: ``[K]`` largest relative secant residual ``s(P) − s(0) − Σ ∂s/∂A ⊙ P`` over the probe
            points (0 up to rounding for an affine head; per class, no backward pass).
        jacobian_test: ``"sketch"`` or ``"per-class"`` (see ``jacobian_difference``).
    """

    kind: str
    classes: list[int]
    per_class: list[str]
    jacobian_difference: Tensor
    spatial_variation: Tensor
    baseline: Tensor
    completeness_residual: Tensor
    relative_residual: Tensor
    tolerance: float
    n_probes: int
    head: str
    probe_residual: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    jacobian_test: str = "per-class"
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when HiResCAM is proven exact for every explained class."""
        return self.kind in ("cam", "affine-head")

    def summary(self) -> str:
        """One plain-language paragraph for people."""
        if self.kind == "unchecked":
            return "Not checked: certification was switched off, so nothing is proven about these maps."
        jd = float(self.jacobian_difference.max()) if self.jacobian_difference.numel() else 0.0
        rr = float(self.relative_residual.abs().max()) if self.relative_residual.numel() else 0.0
        pr = float(self.probe_residual.max()) if self.probe_residual.numel() else 0.0
        how = "a random combination of the classes" if self.jacobian_test == "sketch" else "every class"
        ev = (
            f"max relative Jacobian difference over {self.n_probes} random probe points {jd:.2e} ({how}), "
            f"max relative secant residual at those points {pr:.2e}, "
            f"max relative completeness residual {rr:.2e} (tolerance {self.tolerance:.1e})"
        )
        if self.kind == "cam":
            text = (
                "CAM architecture: the head after the explained layer is global average pooling + one linear "
                "layer, so CAM, HiResCAM and Grad-CAM coincide and are exact"
            )
        elif self.kind == "affine-head":
            text = (
                "Affine head: everything after the explained layer is affine in its activations, so HiResCAM is "
                "exact (each map sums to the class score minus the head's bias); Grad-CAM is not guaranteed to "
                "show the locations the model used"
            )
        else:
            bad = [c for c, k in zip(self.classes, self.per_class) if k == "none"]
            text = (
                f"Not proven: the head is not affine in the activations for {len(bad)} of {len(self.classes)} "
                "classes, so no map here is guaranteed to show the locations the model used (HiResCAM is a "
                "first-order gradient x activation attribution)"
            )
        return f"{text}. Evidence: {ev}."

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record (tensors become nested lists)."""
        return {
            "kind": self.kind,
            "exact": self.exact,
            "summary": self.summary(),
            "classes": list(self.classes),
            "per_class": list(self.per_class),
            "jacobian_difference": self.jacobian_difference.tolist(),
            "spatial_variation": self.spatial_variation.tolist(),
            "baseline": self.baseline.tolist(),
            "completeness_residual": self.completeness_residual.tolist(),
            "relative_residual": self.relative_residual.tolist(),
            "tolerance": self.tolerance,
            "n_probes": self.n_probes,
            "head": self.head,
            "probe_residual": self.probe_residual.tolist(),
            "jacobian_test": self.jacobian_test,
            "notes": list(self.notes),
        }

    def __repr__(self) -> str:
        return f"Certificate(kind={self.kind!r}, classes={len(self.classes)}, head={self.head!r})"


@dataclass
class Evidence:
    """Everything :func:`certify` decides from (K explained classes, B samples).

    Attributes:
        classes: the K explained class indices.
        scores: ``[B, K]`` raw scores ``s`` of the explained classes.
        baseline: ``[B, K]`` head output at zero activations ``s(0)`` (NaN when unchecked).
        contribution: ``[B, K]`` ``Σ ∂s/∂A ⊙ A`` (the HiResCAM sums), float64.
        abs_contribution: ``[B, K]`` ``Σ |∂s/∂A ⊙ A|``, the scale of the sums' rounding error.
        jacobian_difference: ``[K]`` max relative Jacobian difference over the probe points.
        spatial_variation: ``[K]`` spatial variation of the gradient at the real activations.
        probe_residual: ``[K]`` secant residuals at the probe points (:func:`secant_residual`).
        tolerance: relative tolerance of the decisions.
        n_probes: number of probe points used.
        head: how the head was evaluated, ``"fx"`` or ``"rerun"``.
        checked: False when certification was switched off (kind ``"unchecked"``).
        jacobian_test: ``"sketch"`` or ``"per-class"``, how ``jacobian_difference`` was measured.
        notes: remarks carried onto the certificate.
    """

    classes: list[int]
    scores: Tensor
    baseline: Tensor
    contribution: Tensor
    abs_contribution: Tensor
    jacobian_difference: Tensor
    spatial_variation: Tensor
    probe_residual: Tensor
    tolerance: float
    n_probes: int
    head: str
    checked: bool = True
    jacobian_test: str = "per-class"
    notes: list[str] = field(default_factory=list)


def certify(evidence: Evidence) -> Certificate:
    """Decide the certificate from the evidence.

    A class is ``"affine-head"`` when its Jacobian difference, its secant residual and its relative completeness
    residual (over every sample) are all within the tolerance; ``"cam"`` when, in addition, its gradient is
    constant over space; ``"none"`` otherwise. The call's kind is the weakest class's. With
    ``evidence.checked`` False every kind is ``"unchecked"`` and the Jacobian and secant evidence is NaN.
    """
    ev = evidence
    # evidence is small ([K] or [B, K]): decide on the CPU whatever device the maps were computed on
    jac_diff, spat_var = ev.jacobian_difference.detach().cpu(), ev.spatial_variation.detach().cpu()
    s = ev.scores.detach().cpu().double()
    s0 = ev.baseline.detach().cpu().double()
    residual = s - s0 - ev.contribution.detach().cpu()
    rel = _safe_ratio(residual.abs(), s.abs() + s0.abs() + ev.abs_contribution.detach().cpu())
    complete = (rel <= ev.tolerance).all(dim=0)  # [K]
    probe_residual = ev.probe_residual.detach().cpu()
    affine = (jac_diff <= ev.tolerance) & complete & (probe_residual <= ev.tolerance)
    constant = spat_var <= ev.tolerance
    per_class = ["cam" if a and c else "affine-head" if a else "none"
                 for a, c in zip(affine.tolist(), constant.tolist())]
    kind = "none" if "none" in per_class else "affine-head" if "affine-head" in per_class else "cam"
    if not ev.checked:
        per_class = ["unchecked"] * len(per_class)
        kind = "unchecked"
        jac_diff = torch.full_like(jac_diff, math.nan)
        probe_residual = torch.full_like(probe_residual, math.nan)
    return Certificate(
        kind=kind,
        classes=list(ev.classes),
        per_class=per_class,
        jacobian_difference=jac_diff,
        spatial_variation=spat_var,
        baseline=ev.baseline.detach().cpu(),
        completeness_residual=residual,
        relative_residual=residual.sign() * rel,
        tolerance=ev.tolerance,
        n_probes=ev.n_probes,
        head=ev.head,
        probe_residual=probe_residual,
        jacobian_test=ev.jacobian_test,
        notes=list(ev.notes),
    )


# ---------------------------------------------------------------------------------------------------------------
# Gathering the evidence: probe points, and a prober fed the gradients chunk by chunk
# ---------------------------------------------------------------------------------------------------------------


def probe_points(activations: Tensor, n: int, seed: int) -> list[Tensor]:
    """Random activations far from the real ones, where the head is tested: alternately pure noise and the real
    point plus noise, each ~4 standard deviations of the activations, with both signs.

    Args:
        activations: the explained layer's output, detached, in any layout (``[N, ...]``).
        n: number of points.
        seed: seed of the noise.
    Returns: ``n`` tensors shaped like ``activations`` that require grad (leaves for the head's graph).
    """
    gen = torch.Generator().manual_seed(seed)
    scale = float(activations.float().std()) if activations.numel() > 1 else 1.0
    scale = scale if scale > 0 else 1.0
    points = []
    for i in range(n):
        noise = torch.randn(activations.shape, generator=gen).to(activations.device, activations.dtype) * (4 * scale)
        p = noise if i % 2 == 0 else activations + noise
        points.append(p.requires_grad_(True))
    return points


class ProbedHead(Protocol):
    """The head as a :class:`Prober` sees it: the probe points, the head's scores there, and gradients.

    The explainer implements it on its head (fx graph or re-run); anything that can differentiate the head
    can (``tests/test_certificate.py`` does with a plain function). Every tensor is in volume layout.
    """

    @property
    def points(self) -> Sequence[Tensor]:
        """The probe activations, each ``[B, F, *S]``."""
        ...

    @property
    def point_scores(self) -> Sequence[Tensor]:
        """Raw scores ``s(P)`` of all M outputs at each probe point, each ``[B, M]`` (autograd graph from ``P``)."""
        ...

    def gradients(self, classes: Sequence[int], probe: int | None = None) -> Tensor:
        """``∂s_c/∂A`` for the output indices ``classes``, at the real activations (``probe=None``) or at probe
        point number ``probe``; sample b's gradient of its own score only. Returns: ``[B, k, F, *S]``."""
        ...

    def combined_gradient(self, weights: Tensor, probe: int) -> Tensor:
        """``∂ Σ_c weights[b, c] s_c / ∂A`` at probe point number ``probe`` (one backward pass).

        Args: weights ``[B, M]``. Returns: ``[B, F, *S]``."""
        ...


@dataclass
class GradientSummary:
    """What a :class:`Prober` keeps of the gradients of k classes at the real activations, however they were
    computed: :meth:`of` from the dense gradients ``[B, k, F, *S]``; :mod:`medcam3d.regions` from one gradient per
    class for region targets, without the dense tensor.

    Attributes:
        contribution: ``[B, k]`` ``Σ ∂s/∂A ⊙ A`` (the HiResCAM sums), float64.
        magnitude: ``[B, k]`` ``Σ |∂s/∂A ⊙ A|``, float64.
        variation: ``[k]`` spatial variation of the gradient (:func:`gradient_stats`).
        gmax: ``[k]`` ``max |∂s/∂A|``.
        probe_sums: at each probe point ``P``, ``(Σ ∂s/∂A ⊙ P, Σ |∂s/∂A ⊙ P|)``, each ``[B, k]`` float64 (empty when
            unchecked).
        combine: coefficients ``[k]`` (float64) -> ``Σ_c coef_c ∂s_c/∂A``, ``[B, F, *S]`` (the Jacobian sketch).
        dense: the gradients ``[B, k, F, *S]`` (called only for per-class Jacobian comparisons).
    """

    contribution: Tensor
    magnitude: Tensor
    variation: Tensor
    gmax: Tensor
    probe_sums: list[tuple[Tensor, Tensor]]
    combine: Callable[[Tensor], Tensor]
    dense: Callable[[], Tensor]

    @classmethod
    def of(cls, activations: Tensor, gradients: Tensor, points: Sequence[Tensor] = ()) -> GradientSummary:
        """The summary of dense ``gradients`` ``[B, k, F, *S]`` at ``activations`` ``[B, F, *S]``, with the probe
        sums at ``points`` (each ``[B, F, *S]``)."""
        signed, magnitude = contribution_sums(activations, gradients)
        variation, gmax = gradient_stats(gradients)

        def combine(coef: Tensor) -> Tensor:
            return torch.einsum("k,bk...->b...", coef.to(gradients.device, gradients.dtype), gradients)

        return cls(signed, magnitude, variation, gmax, [contribution_sums(p, gradients) for p in points], combine,
                   lambda: gradients)


class Prober:
    """Collects the certificate's evidence while the gradients are computed, then decides the certificate.

    Fed the gradients at the real activations a chunk of classes at a time, in class order (:meth:`add`), it keeps
    per class the HiResCAM sums ``Σ ∂s/∂A ⊙ A``, the gradient's spatial variation and the secant residual at each
    probe point, and compares the class Jacobians at the real activations with those at the probe points:

    * ``jacobian_test="per-class"``: each class on its own, one backward pass per class and probe point;
    * ``"sketch"``: one random combination ``v`` of the class Jacobians, each class scaled to unit gradient
      (``v_c = z_c / max|∂s_c/∂A|``, ``z ~ N(0, 1)``), compared in :meth:`finish` with one backward pass per
      probe point; when the sketch differs by more than the tolerance, every class is compared on its own.

    Args:
        classes: the K explained output indices.
        head: the head's probe points and gradients (:class:`ProbedHead`).
        baseline: ``[B, K]`` head output at zero activations ``s(0)`` (NaN when not ``checked``).
        tolerance: relative tolerance of the decisions (:func:`default_tolerance` of the activations' dtype).
        checked: False when certification is switched off: only the HiResCAM sums and the spatial variation are
            kept, and the certificate is ``"unchecked"``.
        jacobian_test: ``"sketch"`` or ``"per-class"``.
        sketch_seed: seed of the sketch's random class combination ``z``.
    """

    def __init__(
        self,
        classes: Sequence[int],
        head: ProbedHead,
        baseline: Tensor,
        tolerance: float,
        *,
        checked: bool = True,
        jacobian_test: str = "sketch",
        sketch_seed: int = 1,
    ) -> None:
        if jacobian_test not in ("sketch", "per-class"):
            raise ValueError(f"jacobian_test must be 'sketch' or 'per-class', got {jacobian_test!r}")
        self.classes = list(classes)
        self.head = head
        self.baseline = baseline
        self.tolerance = tolerance
        self.checked = checked
        self.jacobian_test = jacobian_test
        k = len(self.classes)
        self._z = torch.randn(k, generator=torch.Generator().manual_seed(sketch_seed), dtype=torch.float64)
        self._coef = torch.zeros(k, dtype=torch.float64)
        self._sketch: Tensor | None = None  # v·J at the real activations, [B, F, *S]
        self._chunks: list[list[int]] = []
        self._contribution: list[Tensor] = []
        self._magnitude: list[Tensor] = []
        self._variation: list[Tensor] = []
        self._secant: list[Tensor] = []
        self._jacobian: list[Tensor] = []
        self._notes: list[str] = []

    @property
    def n_added(self) -> int:
        """How many of the K classes have been fed so far."""
        return sum(len(c) for c in self._chunks)

    def add(self, activations: Tensor, gradients: Tensor) -> None:
        """Take the gradients of the next ``k`` explained classes.

        Args: activations ``[B, F, *S]``; gradients ``[B, k, F, *S]`` at those activations, for the classes
        ``classes[n_added : n_added + k]``."""
        self.add_summary(GradientSummary.of(activations, gradients, list(self.head.points) if self.checked else []))

    def add_summary(self, summary: GradientSummary) -> None:
        """Take the next ``k`` classes' gradients as a :class:`GradientSummary` (what :meth:`add` does with dense
        gradients)."""
        k = summary.contribution.shape[1]
        sl = slice(self.n_added, self.n_added + k)
        chunk = self.classes[sl]
        if len(chunk) != k:
            raise ValueError(f"gradients for {k} classes, but only {len(chunk)} left to add")
        self._chunks.append(chunk)
        self._contribution.append(summary.contribution)
        self._magnitude.append(summary.magnitude)
        self._variation.append(summary.variation)
        if not self.checked:
            return
        scores = [ps.detach()[:, chunk] for ps in self.head.point_scores]
        self._secant.append(secant_from_sums(summary.probe_sums, scores, self.baseline[:, sl]))
        if self.jacobian_test == "per-class":
            self._jacobian.append(self._per_class_jacobian(summary.dense(), chunk))
        else:
            self._add_to_sketch(summary, sl)

    def _add_to_sketch(self, summary: GradientSummary, sl: slice) -> None:
        """Add ``Σ_c v_c ∂s_c/∂A`` of this chunk's classes to the sketch (``v_c = z_c / max|∂s_c/∂A|``)."""
        scale = summary.gmax.double().cpu()
        self._coef[sl] = self._z[sl] / torch.where(scale > 0, scale, torch.ones_like(scale))
        part = summary.combine(self._coef[sl])
        self._sketch = part if self._sketch is None else self._sketch + part

    def _per_class_jacobian(self, gradients: Tensor, chunk: list[int]) -> Tensor:
        """Largest relative difference between each class's Jacobian at the real activations (``gradients``,
        ``[B, k, F, *S]``) and at every probe point. Returns: ``[k]`` float64."""
        d = torch.zeros(len(chunk), dtype=torch.float64, device=gradients.device)
        for i in range(len(self.head.points)):
            d = torch.maximum(d, jacobian_difference(gradients, self.head.gradients(chunk, probe=i)).double())
        return d.cpu()

    def _sketch_difference(self) -> Tensor:
        """Largest relative difference of the sketch ``v·J`` between the real activations and the probe points."""
        diff = torch.zeros((), dtype=torch.float64)
        if self._sketch is None:
            return diff
        for i, ps in enumerate(self.head.point_scores):
            v = torch.zeros_like(ps)
            v[:, self.classes] = self._coef.to(v.device, v.dtype)
            probe = self.head.combined_gradient(v, probe=i)
            diff = torch.maximum(diff, jacobian_sketch_difference(self._sketch, probe).double().cpu())
        return diff

    def _jacobian_difference(self) -> Tensor:
        """``[K]`` Jacobian evidence: per class, or the sketch's value for every class when it agrees."""
        k = len(self.classes)
        if not self.checked:
            return torch.zeros(k, dtype=torch.float64)
        if self.jacobian_test == "per-class":
            return torch.cat(self._jacobian)
        diff = self._sketch_difference()
        if float(diff) <= self.tolerance:
            return diff.expand(k).clone()
        # the head is not affine somewhere: find the classes, one Jacobian comparison per class
        self._notes.append(f"the one-backward Jacobian sketch differed by {float(diff):.2e}; "
                           "Jacobians compared per class")
        return torch.cat([self._per_class_jacobian(self.head.gradients(c), c) for c in self._chunks])

    def evidence(self, scores: Tensor, head: str, notes: Sequence[str] = ()) -> Evidence:
        """The collected evidence, once every class was added (runs the sketch's probe backward passes).

        Args:
            scores: ``[B, K]`` raw scores of the explained classes at the real activations.
            head: how the head was evaluated (``"fx"`` or ``"rerun"``).
            notes: remarks to put first on the certificate.
        """
        k = len(self.classes)
        if self.n_added != k:
            raise ValueError(f"gradients of {self.n_added} of the {k} classes were added")
        jacobian = self._jacobian_difference()
        secant = torch.cat(self._secant) if self.checked else torch.zeros(k, dtype=torch.float64)
        return Evidence(
            classes=list(self.classes),
            scores=scores.detach(),
            baseline=self.baseline.detach(),
            contribution=torch.cat(self._contribution, dim=1),
            abs_contribution=torch.cat(self._magnitude, dim=1),
            jacobian_difference=jacobian.cpu(),
            spatial_variation=torch.cat(self._variation).cpu(),
            probe_residual=secant.cpu(),
            tolerance=self.tolerance,
            n_probes=len(self.head.points),
            head=head,
            checked=self.checked,
            jacobian_test=self.jacobian_test,
            notes=[*notes, *self._notes],
        )

    def finish(self, scores: Tensor, head: str, notes: Sequence[str] = ()) -> Certificate:
        """:func:`certify` of :meth:`evidence` (same arguments)."""
        return certify(self.evidence(scores, head, notes))


# ---------------------------------------------------------------------------------------------------------------
# Disagreement between two methods' maps (Draelos & Carin, Table 1, plus two common summaries)
# ---------------------------------------------------------------------------------------------------------------


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """The paper's Table 1 distance: ``‖norm(a) − norm(b)‖₂`` between the ReLU + whole-map min-max normalised
    maps at feature resolution. Args: ``[B, K, *S]`` raw maps. Returns: ``[B, K]``."""
    return (normalize(a) - normalize(b)).flatten(2).norm(dim=2)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation between the normalised maps, per (sample, class); NaN where a map is constant.

    Args: ``[B, K, *S]`` raw maps. Returns: ``[B, K]``."""
    x = normalize(a).flatten(2).double()
    y = normalize(b).flatten(2).double()
    x = x - x.mean(dim=2, keepdim=True)
    y = y - y.mean(dim=2, keepdim=True)
    den = x.norm(dim=2) * y.norm(dim=2)
    r = (x * y).sum(dim=2) / den
    return torch.where(den > 0, r, torch.full_like(r, math.nan)).to(a.dtype)


def top_overlap(a: Tensor, b: Tensor, fraction: float = 0.1) -> Tensor:
    """Share of the top ``fraction`` positions (by raw value) that the two maps have in common.

    ``k = ceil(fraction · N)`` positions per map; ties go to the lower position index. Returns: ``[B, K]`` in [0, 1]."""
    fa, fb = a.flatten(2), b.flatten(2)
    n = fa.shape[2]
    k = max(1, math.ceil(fraction * n))
    ia = fa.sort(dim=2, descending=True, stable=True).indices[..., :k]
    ib = fb.sort(dim=2, descending=True, stable=True).indices[..., :k]
    ma = torch.zeros_like(fa, dtype=torch.bool).scatter_(2, ia, True)
    mb = torch.zeros_like(fb, dtype=torch.bool).scatter_(2, ib, True)
    return (ma & mb).sum(dim=2).to(a.dtype) / k


def disagreement(a: Tensor, b: Tensor, fraction: float = 0.1) -> dict[str, Tensor]:
    """All disagreement metrics between two methods' raw maps ``[B, K, *S]``: ``l2`` (Table 1), ``pearson``,
    ``top_overlap`` -- each ``[B, K]``. For an affine head with ``a`` = HiResCAM, ``l2`` is the distance of
    ``b`` from the locations the model used."""
    return {"l2": l2_distance(a, b), "pearson": pearson(a, b), "top_overlap": top_overlap(a, b, fraction)}
