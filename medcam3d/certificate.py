"""What is proven about a set of maps: the faithfulness certificate, and method-disagreement metrics.

Pure tensor functions plus the :class:`Certificate` record. The explainer feeds them gradients of the head
(everything after the explained layer) taken at the real activations and at random probe points.

Certificate kinds (Draelos & Carin, Section 4):

* ``"cam"`` -- the head is affine in the activations *and* its gradient is constant over space (global average
  pooling + linear). CAM = HiResCAM = Grad-CAM up to a positive factor; all three are exact.
* ``"affine-head"`` -- the head is affine (e.g. one fully connected layer, or AxialNet's per-slice FC + mean over
  slices). HiResCAM is exact: the map sums to ``s − s(0)`` (``s(0) = b``, the bias). Grad-CAM is not.
* ``"none"`` -- the head is not affine (e.g. FC–ReLU–FC). No method here is proven faithful; HiResCAM is then
  a first-order (gradient × activation) attribution only.
* ``"unchecked"`` -- certification was switched off.

Evidence: the largest relative difference between the Jacobian at the real activations and at the probe points,
the completeness residual ``s − s(0) − Σ HiResCAM`` per (sample, class), and the spatial variation of the gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .heatmaps import normalize

__all__ = [
    "Certificate",
    "certify",
    "contribution_sums",
    "default_tolerance",
    "disagreement",
    "gradient_stats",
    "jacobian_difference",
    "jacobian_sketch_difference",
    "l2_distance",
    "pearson",
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
    out = torch.zeros(gradients.shape[1], dtype=torch.float64)
    s0 = baseline.detach().double().cpu()
    for p, sp in zip(probes, probe_scores):
        lin, mag = contribution_sums(p, gradients)
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


def certify(
    classes: list[int],
    jac_diff: Tensor,
    spat_var: Tensor,
    scores: Tensor,
    baseline: Tensor,
    contribution: Tensor,
    abs_contribution: Tensor,
    tolerance: float,
    n_probes: int,
    head: str,
    checked: bool = True,
    probe_residual: Tensor | None = None,
    jacobian_test: str = "per-class",
) -> Certificate:
    """Decide the certificate from the evidence.

    Args:
        classes: K explained class indices.
        jac_diff: ``[K]`` max relative Jacobian difference over the probe points.
        spat_var: ``[K]`` spatial variation of the gradient at the real activations.
        scores: ``[B, K]`` raw scores ``s`` of the explained classes.
        baseline: ``[B, K]`` head output at zero activations ``s(0)``.
        contribution: ``[B, K]`` ``Σ ∂s/∂A ⊙ A`` (the HiResCAM sums).
        abs_contribution: ``[B, K]`` ``Σ |∂s/∂A ⊙ A|``.
        tolerance: relative tolerance.
        n_probes: number of probe points used.
        head: ``"fx"`` or ``"rerun"``.
        checked: False when certification was switched off (kind ``"unchecked"``; residuals are NaN).
        probe_residual: ``[K]`` secant residuals at the probe points (:func:`secant_residual`); default zeros.
        jacobian_test: ``"sketch"`` or ``"per-class"``, how ``jac_diff`` was measured.
    """
    # evidence is small ([K] or [B, K]): decide on the CPU whatever device the maps were computed on
    jac_diff, spat_var = jac_diff.detach().cpu(), spat_var.detach().cpu()
    contribution, abs_contribution = contribution.detach().cpu(), abs_contribution.detach().cpu()
    s = scores.detach().cpu().double()
    s0 = baseline.detach().cpu().double()
    residual = s - s0 - contribution
    scale = s.abs() + s0.abs() + abs_contribution
    rel = _safe_ratio(residual.abs(), scale)
    complete = (rel <= tolerance).all(dim=0)  # [K]
    if probe_residual is None:
        probe_residual = torch.zeros_like(jac_diff, dtype=torch.float64)
    probe_residual = probe_residual.detach().cpu()
    affine = (jac_diff <= tolerance) & complete & (probe_residual <= tolerance)
    constant = spat_var <= tolerance
    per_class = ["cam" if a and c else "affine-head" if a else "none" for a, c in zip(affine.tolist(), constant.tolist())]
    kind = "none" if "none" in per_class else "affine-head" if "affine-head" in per_class else "cam"
    if not checked:
        per_class = ["unchecked"] * len(per_class)
        kind = "unchecked"
        jac_diff = torch.full_like(jac_diff, math.nan)
        probe_residual = torch.full_like(probe_residual, math.nan)
    return Certificate(
        kind=kind,
        classes=list(classes),
        per_class=per_class,
        jacobian_difference=jac_diff.detach().cpu(),
        spatial_variation=spat_var.detach().cpu(),
        baseline=baseline.detach().cpu(),
        completeness_residual=residual.detach().cpu(),
        relative_residual=(residual.sign() * rel).detach().cpu(),
        tolerance=tolerance,
        n_probes=n_probes,
        head=head,
        probe_residual=probe_residual,
        jacobian_test=jacobian_test,
    )


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
