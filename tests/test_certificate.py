"""The certificate's evidence on its own: a Prober fed by plain autograd on tiny heads, without the Explainer.

Each head is a function of the activations ``A`` ``[B, F, *S]`` -> raw scores ``[B, M]``. :class:`FunctionHead`
differentiates it with ``torch.autograd.grad``, one class at a time (an implementation independent of the
explainer's batched gradients), so the decision rule is tested apart from the explainer's wiring. The same heads,
put behind an ``nn.Identity`` explained layer, get the same certificate kinds from the Explainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

from medcam3d import Explainer
from medcam3d.certificate import (
    Certificate,
    Evidence,
    Prober,
    certify,
    default_tolerance,
    probe_points,
)

Head = Callable[[Tensor], Tensor]


class FunctionHead:
    """A :class:`medcam3d.certificate.ProbedHead` for a head given as a function, differentiated class by class."""

    def __init__(self, f: Head, activations: Tensor, points: Sequence[Tensor]) -> None:
        self.real = activations.detach().clone().requires_grad_(True)
        self.scores = f(self.real)  # [B, M]
        self.points = [p.detach().clone().requires_grad_(True) for p in points]
        self.point_scores = [f(p) for p in self.points]

    @staticmethod
    def _grad(scores: Tensor, leaf: Tensor, weights: Tensor) -> Tensor:
        # heads act on each sample alone, so the gradient of the batch sum is each sample's own gradient
        (g,) = torch.autograd.grad((scores * weights).sum(), leaf, retain_graph=True)
        return g

    def gradients(self, classes: Sequence[int], probe: int | None = None) -> Tensor:
        leaf, s = (self.real, self.scores) if probe is None else (self.points[probe], self.point_scores[probe])
        out = []
        for c in classes:
            w = torch.zeros_like(s)
            w[:, c] = 1.0
            out.append(self._grad(s, leaf, w))
        return torch.stack(out, dim=1)  # [B, k, F, *S]

    def combined_gradient(self, weights: Tensor, probe: int) -> Tensor:
        return self._grad(self.point_scores[probe], self.points[probe], weights)


def prober_certificate(
    f: Head,
    a: Tensor,
    points: Sequence[Tensor],
    jacobian_test: str = "sketch",
    chunk: int = 1,
    checked: bool = True,
) -> Certificate:
    """Feed a Prober the gradients of every output of ``f`` at ``a``, ``chunk`` classes at a time."""
    head = FunctionHead(f, a, points)
    m = head.scores.shape[1]
    classes = list(range(m))
    with torch.no_grad():
        baseline = f(torch.zeros_like(a))
    prober = Prober(classes, head, baseline, default_tolerance(a.dtype), checked=checked, jacobian_test=jacobian_test)
    for start in range(0, m, chunk):
        prober.add(a, head.gradients(classes[start : start + chunk]))
    return prober.finish(head.scores.detach(), "function")


def explainer_certificate(f: nn.Module, a: Tensor, jacobian_test: str = "sketch") -> Certificate:
    """The Explainer's certificate for the same head behind an identity explained layer."""
    net = nn.Sequential(nn.Identity(), f)
    return Explainer(net, "0", jacobian=jacobian_test)(a).certificate


def seeded(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


def rand(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- hand-computed heads
class HandAffine(nn.Module):
    """``s_k = Σ W_k ⊙ A + b_k`` on A ``[B, F=1, S=3]``: class 0 has W = [1, −2, 3], b = 0.5; class 1 has the
    constant W = [2, 2, 2], b = −1 (a gradient constant over space: a GAP + linear head)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [2.0, 2.0, 2.0]]))
            self.fc.bias.copy_(torch.tensor([0.5, -1.0]))

    def forward(self, a: Tensor) -> Tensor:
        return self.fc(a.flatten(1))


A_HAND = torch.tensor([[[1.0, 2.0, -1.0]]])  # [B=1, F=1, S=3]
P_HAND = [torch.tensor([[[3.0, -1.0, 2.0]]]), torch.tensor([[[-2.0, 0.0, 5.0]]])]  # integer probe points


@pytest.mark.parametrize("jacobian_test", ["sketch", "per-class"])
@pytest.mark.parametrize("chunk", [1, 2])
def test_affine_head_hand_computed(jacobian_test, chunk):
    cert = prober_certificate(HandAffine(), A_HAND, P_HAND, jacobian_test, chunk)
    # class 1's gradient is the same at every position -> "cam"; the call takes the weaker kind
    assert cert.per_class == ["affine-head", "cam"] and cert.kind == "affine-head" and cert.exact
    # s = W·A + b: class 0: 1 − 4 − 3 + 0.5 = −5.5; class 1: 2 + 4 − 2 − 1 = 3; s(0) = b
    assert cert.baseline.tolist() == [[0.5, -1.0]]
    # integers all the way: s − s(0) − Σ W ⊙ A is exactly zero, and so are the Jacobian and secant tests
    assert cert.completeness_residual.tolist() == [[0.0, 0.0]]
    assert cert.jacobian_difference.tolist() == [0.0, 0.0]
    assert cert.probe_residual.tolist() == [0.0, 0.0]
    # spatial variation of g = [1, −2, 3]: mean 2/3, max|g − mean| = 8/3, max|g| = 3 -> 8/9; class 1: 0
    assert cert.spatial_variation.tolist() == [pytest.approx(8 / 9), 0.0]
    assert cert.n_probes == 2 and cert.head == "function" and cert.jacobian_test == jacobian_test
    assert not cert.notes


def square_head(a: Tensor) -> Tensor:
    """``s(A) = Σ A²`` per sample: one class, not affine."""
    return a.pow(2).flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("jacobian_test", ["sketch", "per-class"])
def test_square_head_hand_computed(jacobian_test):
    a = torch.tensor([[[1.0, 2.0]]])  # [B=1, F=1, S=2]
    p = torch.tensor([[[3.0, -1.0]]])
    cert = prober_certificate(square_head, a, [p], jacobian_test)
    assert cert.kind == "none" and cert.per_class == ["none"] and not cert.exact
    # Jacobian 2A = [2, 4] at A, 2P = [6, −2] at P: max|2P − 2A| / max|2A| = 6 / 4
    assert cert.jacobian_difference.tolist() == [pytest.approx(1.5)]
    # secant: |s(P) − s(0) − Σ 2A ⊙ P| = |10 − 0 − 2| = 8 over 10 + 0 + (6 + 4) = 20
    assert cert.probe_residual.tolist() == [pytest.approx(0.4)]
    # completeness: s = 5, s(0) = 0, Σ 2A ⊙ A = 10: residual −5, relative −5 / (5 + 0 + 10)
    assert cert.completeness_residual.tolist() == [[-5.0]]
    assert cert.relative_residual.tolist() == [[pytest.approx(-1 / 3)]]
    # spatial variation of g = [2, 4]: mean 3, max deviation 1, max|g| = 4
    assert cert.spatial_variation.tolist() == [0.25]
    if jacobian_test == "sketch":  # one class: the sketch is that class, and it differs
        assert any("Jacobians compared per class" in n for n in cert.notes)


def test_unchecked_keeps_the_sums_and_decides_nothing():
    head = FunctionHead(HandAffine(), A_HAND, [])
    baseline = torch.full((1, 2), math.nan)
    prober = Prober([0, 1], head, baseline, default_tolerance(torch.float32), checked=False)
    prober.add(A_HAND, head.gradients([0, 1]))
    ev = prober.evidence(head.scores.detach(), "function")
    assert ev.contribution.tolist() == [[-6.0, 4.0]]  # Σ W ⊙ A per class
    assert ev.n_probes == 0 and not ev.checked
    cert = certify(ev)
    assert cert.kind == "unchecked" and cert.per_class == ["unchecked"] * 2 and not cert.exact
    assert all(math.isnan(v) for v in cert.jacobian_difference.tolist() + cert.probe_residual.tolist())


def test_prober_checks_what_it_is_fed():
    head = FunctionHead(HandAffine(), A_HAND, P_HAND)
    prober = Prober([0, 1], head, torch.tensor([[0.5, -1.0]]), 1e-4)
    prober.add(A_HAND, head.gradients([0]))
    with pytest.raises(ValueError, match="1 of the 2 classes"):
        prober.finish(head.scores.detach(), "function")
    with pytest.raises(ValueError, match="only 1 left"):
        prober.add(A_HAND, head.gradients([0, 1]))
    with pytest.raises(ValueError, match="jacobian_test"):
        Prober([0], head, torch.zeros(1, 1), 1e-4, jacobian_test="fast")


def test_certify_decision_rule_at_the_tolerance():
    """Each of the three tests can fail a class on its own; a value equal to the tolerance passes."""
    tol = 0.01

    def evidence(jd: float, pr: float, s: float, sv: float) -> Evidence:
        # s(0) = 0, Σ g ⊙ A = 1, Σ |g ⊙ A| = 1: relative completeness residual |s − 1| / (|s| + 1)
        return Evidence(
            classes=[0],
            scores=torch.tensor([[s]]),
            baseline=torch.zeros(1, 1),
            contribution=torch.ones(1, 1, dtype=torch.float64),
            abs_contribution=torch.ones(1, 1, dtype=torch.float64),
            jacobian_difference=torch.tensor([jd], dtype=torch.float64),
            spatial_variation=torch.tensor([sv]),
            probe_residual=torch.tensor([pr], dtype=torch.float64),
            tolerance=tol,
            n_probes=2,
            head="test",
        )

    assert certify(evidence(0.0, 0.0, 1.0, 0.0)).kind == "cam"
    assert certify(evidence(0.0, 0.0, 1.0, 0.5)).kind == "affine-head"
    assert certify(evidence(tol, tol, 1.0, tol)).kind == "cam"
    assert certify(evidence(2 * tol, 0.0, 1.0, 0.0)).kind == "none"
    assert certify(evidence(0.0, 2 * tol, 1.0, 0.0)).kind == "none"
    assert certify(evidence(0.0, 0.0, 1.1, 0.0)).kind == "none"  # 0.1 / 2.1 > tol
    cert = certify(evidence(0.0, 0.0, 1.1, 0.0))
    assert cert.completeness_residual.tolist() == [[pytest.approx(0.1)]]
    assert cert.relative_residual.tolist() == [[pytest.approx(0.1 / 2.1)]]


# --------------------------------------------------------------------------------------- same kinds as the Explainer
class CamHead(nn.Module):
    """Global average pooling + one linear layer on ``[B, F, H, W]``."""

    def __init__(self, feats: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(feats, classes)

    def forward(self, a: Tensor) -> Tensor:
        return self.fc(a.flatten(2).mean(2))


class AffineHead(nn.Module):
    """One fully connected layer on the flattened ``[B, F, H, W]``."""

    def __init__(self, n: int = 4 * 5 * 5, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(n, classes)

    def forward(self, a: Tensor) -> Tensor:
        return self.fc(a.flatten(1))


class MixedHead(nn.Module):
    """Classes 0-2 one linear layer (affine), classes 3-4 FC-ReLU-FC (not affine)."""

    def __init__(self, n: int = 4 * 5 * 5) -> None:
        super().__init__()
        self.lin = nn.Linear(n, 3)
        self.fc1 = nn.Linear(n, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, a: Tensor) -> Tensor:
        flat = a.flatten(1)
        return torch.cat([self.lin(flat), self.fc2(torch.relu(self.fc1(flat)))], dim=1)


HEADS = [
    ("cam", lambda: CamHead(), ["cam"] * 3),
    ("affine", lambda: AffineHead(), ["affine-head"] * 3),
    ("mixed", lambda: MixedHead(), ["affine-head"] * 3 + ["none"] * 2),
]


@pytest.mark.parametrize("jacobian_test", ["sketch", "per-class"])
@pytest.mark.parametrize("name,make,kinds", HEADS, ids=[h[0] for h in HEADS])
def test_same_kinds_as_the_explainer(name, make, kinds, jacobian_test):
    head = seeded(make(), seed=len(name))
    a = rand(2, 4, 5, 5, seed=3)
    points = probe_points(a, 2, seed=0)  # the Explainer's default points (n_probes=2, seed=0)
    mine = prober_certificate(head, a, points, jacobian_test, chunk=2)
    theirs = explainer_certificate(head, a, jacobian_test)
    assert mine.per_class == theirs.per_class == kinds
    assert mine.kind == theirs.kind == ("none" if "none" in kinds else kinds[0])
    # the evidence itself agrees (same points, same sketch; independent gradient code)
    for field in ("jacobian_difference", "probe_residual"):
        x, y = getattr(mine, field), getattr(theirs, field)
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), (field, x, y)
    assert torch.allclose(mine.baseline, theirs.baseline) and torch.allclose(mine.baseline, head(torch.zeros_like(a)))
    assert bool(mine.notes) == bool(theirs.notes) == (jacobian_test == "sketch" and "none" in kinds)
