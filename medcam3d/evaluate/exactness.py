"""Exactness at no extra model cost: completeness residuals, the paper's Table 1 distance, CAM-architecture equality.

All three read what one explanation call already computed (scores, the head's output at zero activations ``s(0)``
from the certificate, the raw maps and, for CAM equality, the kept activations and gradients): **0 extra model
passes** per (scan, class).

* :func:`completeness_residual` -- ``s − s(0) − Σ map`` per (sample, class) for any method. For an affine head
  HiResCAM's residual is 0 up to rounding (the map *is* the decomposition of the score); Grad-CAM's is not.
* :func:`table1_distance` -- Draelos & Carin's Table 1: ``‖norm(Grad-CAM) − norm(HiResCAM)‖₂`` at feature resolution
  (ReLU + whole-map min-max, :func:`medcam3d.certificate.l2_distance`). For an affine head HiResCAM shows the
  locations the model used, so this is Grad-CAM's distance from them, and HiResCAM's own distance is 0.
* :func:`cam_equality` -- on a CAM architecture (global average pooling + linear) CAM = N·HiResCAM = N·Grad-CAM:
  the largest relative deviation from those identities.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..certificate import l2_distance
from ..methods import cam, gradcam, hirescam

__all__ = ["cam_equality", "completeness_residual", "exactness_record", "table1_distance"]


def completeness_residual(raw: Tensor, scores: Tensor, baseline: Tensor) -> tuple[Tensor, Tensor]:
    """How far a map is from decomposing the score: ``s − s(0) − Σ map``.

    Args:
        raw: ``[B, K, *S]`` signed raw maps of one method.
        scores: ``[B, K]`` raw scores ``s`` of the K explained classes.
        baseline: ``[B, K]`` the head's output at zero activations ``s(0)`` (the bias of an affine head;
            ``Explanation.certificate.baseline``).

    Returns:
        ``(residual, relative)``, both float64 ``[B, K]``: the residual, and the residual divided by
        ``|s| + |s(0)| + Σ|map|`` (0 when that scale is 0).
    """
    r = raw.detach().double().flatten(2)
    s = scores.detach().double()
    s0 = baseline.detach().double()
    residual = s - s0 - r.sum(2)
    scale = s.abs() + s0.abs() + r.abs().sum(2)
    rel = torch.where(scale > 0, residual / torch.where(scale > 0, scale, torch.ones_like(scale)),
                      torch.zeros_like(scale))
    return residual, rel


def table1_distance(gradcam_raw: Tensor, hirescam_raw: Tensor) -> Tensor:
    """The paper's Table 1 distance ``‖norm(Grad-CAM) − norm(HiResCAM)‖₂`` per (sample, class).

    Args: ``[B, K, *S]`` raw maps of the two methods. Returns: float32/64 ``[B, K]`` (0 when the normalised maps are
    equal; both-empty maps are equal)."""
    return l2_distance(gradcam_raw, hirescam_raw)


def cam_equality(activations: Tensor, gradients: Tensor) -> dict[str, Tensor]:
    """Check CAM = N·HiResCAM = N·Grad-CAM (N spatial positions), which holds exactly for a global-average-pool +
    linear head.

    Args:
        activations: ``[B, F, *S]``; gradients: ``[B, K, F, *S]`` (``Explanation.activations/.gradients``).

    Returns:
        ``{"hirescam": [B, K], "gradcam": [B, K]}``: ``max|CAM − N·map| / max|CAM|`` (0 when CAM is all zero and the
        map too; inf when only the map is non-zero).
    """
    a = activations.detach().double()
    g = gradients.detach().double()
    n = math.prod(a.shape[2:])
    c = cam(a, g).flatten(2)
    scale = c.abs().amax(2)
    out = {}
    for name, fn in (("hirescam", hirescam), ("gradcam", gradcam)):
        dev = (c - n * fn(a, g).flatten(2)).abs().amax(2)
        ratio = dev / torch.where(scale > 0, scale, torch.ones_like(scale))
        out[name] = torch.where(scale > 0, ratio, torch.where(dev > 0, torch.full_like(dev, math.inf), dev))
    return out


def exactness_record(explanation: Any, methods: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Exactness of one :class:`~medcam3d.explanation.Explanation` (0 extra model passes).

    Returns a dict of tensors: ``certificate`` (kind), ``per_class`` kinds, ``residual[method]`` and
    ``relative_residual[method]`` ``[B, K]``, ``table1_l2`` ``[B, K]`` (Grad-CAM from HiResCAM; absent unless both
    were computed) and ``cam_equality`` (only for a ``"cam"`` certificate with kept activations/gradients)."""
    cert = explanation.certificate
    scores = explanation.explained_scores().detach()
    names = methods or explanation.methods
    rec: dict[str, Any] = {"certificate": cert.kind, "per_class": list(cert.per_class), "residual": {},
                           "relative_residual": {}}
    for m in names:
        res, rel = completeness_residual(explanation.raw[m], scores, cert.baseline)
        rec["residual"][m] = res
        rec["relative_residual"][m] = rel
    if "hirescam" in explanation.raw and "gradcam" in explanation.raw:
        rec["table1_l2"] = table1_distance(explanation.raw["gradcam"], explanation.raw["hirescam"]).double()
    if cert.kind == "cam" and explanation.activations is not None and explanation.gradients is not None:
        rec["cam_equality"] = cam_equality(explanation.activations, explanation.gradients)
    return rec
