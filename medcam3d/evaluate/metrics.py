"""Pure metric functions: localisation against masks, map similarity, curve areas, AUROC.

Every function takes maps and masks (torch tensors or numpy arrays), never files or models, and returns torch
tensors (float64) unless stated otherwise. Shapes follow docs/architecture.md:

* ``values [..., *S]`` -- any leading axes (e.g. ``[B, K]``), then the spatial axes ``S``;
* ``mask [*S]`` -- one mask shared by every leading index (bool, or a fraction in [0, 1] where stated); the number of
  spatial axes is the mask's number of axes;
* maps compared with each other (:func:`spearman`, :func:`ssim`) have ``spatial_axes`` trailing spatial axes.

Definitions (the edge cases are part of the definitions and are tested):

* **Empty map.** A map with no positive value carries no positive evidence (its display heatmap is all zero).
  :func:`relevance_mass`, :func:`allowed_region_score`, :func:`pointing_game` and :func:`relevance_rank_accuracy`
  are NaN for it.
* **Relevance mass** (Arras et al., CLEVR-XAI): the share of the positive relevance that lies inside the mask,
  ``Σ relu(R)·m / Σ relu(R)``. With a fractional mask (the fraction of each map voxel's block of network-grid voxels
  inside a lesion, :func:`block_fractions`) this is "the share of the method's positive contribution inside the
  lesion". Its value by chance is the mask's volume share, :func:`chance_share` (a constant positive map gets
  exactly that).
* **Allowed-region score** (AxialNet): ``a/(a+b)`` with ``a`` the positive relevance inside the allowed region and
  ``b`` outside it: 1 when nothing falls outside, NaN when the map is empty (``a + b = 0``).
* **Relevance rank accuracy** (Arras et al.): with ``K`` the number of mask voxels, the share of the ``K`` highest
  values that lie inside the mask. Values tied with the K-th highest share the remaining places in proportion
  (the expectation over random tie-breaking). NaN when the mask is empty or the map is empty.
* **Pointing game** (Zhang et al.): 1 when the map's maximum lies in the mask. With several voxels tied at the
  maximum, ``ties="fraction"`` (default) scores the share of them inside the mask (the expected hit under random
  tie-breaking), ``"any"`` 1 if one is inside, ``"all"`` 1 only if all are. NaN when the map is empty.
* **IoU at thresholds** (Draelos & Carin, Table 2): the display heatmap (ReLU, whole-map min-max, in [0, 1]) is
  binarised at ``heatmap >= t`` for each t in :data:`IOU_THRESHOLDS` (0.02, 0.04, ..., 0.98) and compared with the
  mask; NaN where the union is empty (an empty heatmap against a non-empty mask scores 0).
  :func:`best_threshold_iou` picks the threshold on a validation split and reports the test split at it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..geometry import MapGeometry
from ..geometry import block_fractions as geometry_block_fractions

__all__ = [
    "IOU_THRESHOLDS",
    "allowed_region_score",
    "area_under_curve",
    "as_tensor",
    "auroc",
    "best_threshold_iou",
    "block_fractions",
    "chance_share",
    "iou_curve",
    "pointing_game",
    "relevance_mass",
    "relevance_rank_accuracy",
    "spearman",
    "ssim",
]

#: The paper's IoU thresholds: 0.02, 0.04, ..., 0.98 (49 values).
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.02 * i, 2) for i in range(1, 50))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN when only one class is present.

    Args: labels ``[N]`` in {0, 1}; scores ``[N]``."""
    # lazy: scipy costs a second to import; the command line must stay quick
    from scipy.stats import rankdata

    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def as_tensor(x: Any, dtype: torch.dtype = torch.float64) -> Tensor:
    """A detached CPU tensor of ``dtype`` from a tensor, MetaTensor or array (bool stays bool when asked)."""
    if hasattr(x, "as_tensor") and callable(x.as_tensor):  # MONAI MetaTensor, duck-typed
        x = x.as_tensor()
    t = x.detach().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype)


def _split(values: Any, mask: Any, what: str) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """``values [..., *S]`` and ``mask [*S]`` -> (values ``[L, N]``, mask ``[N]``, leading shape), checking shapes."""
    v = as_tensor(values)
    m = as_tensor(mask)
    nd = m.ndim
    if nd == 0 or v.ndim < nd or tuple(v.shape[v.ndim - nd:]) != tuple(m.shape):
        raise ValueError(f"{what}: values of shape {tuple(v.shape)} do not end with the mask's shape {tuple(m.shape)}")
    lead = tuple(int(n) for n in v.shape[: v.ndim - nd])
    return v.reshape(math.prod(lead), -1), m.reshape(-1), lead


def _bool_mask(mask: Tensor, what: str) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    vals = torch.unique(mask)
    if not bool(((vals == 0) | (vals == 1)).all()):
        raise ValueError(f"{what}: the mask must be boolean (0/1), got values such as {vals[:4].tolist()}")
    return mask.bool()


# ----------------------------------------------------------------------------------------------------------------
# masks at feature resolution
# ----------------------------------------------------------------------------------------------------------------


def block_fractions(mask: Any, map_shape: Sequence[int], geometry: MapGeometry | None = None) -> Tensor:
    """Per map voxel, the fraction of its block of grid voxels that lies inside ``mask``.

    Adaptive average pooling of the mask's indicator: exact blocks when the grid is a whole multiple of the map
    (AxialNet's 3 x 16 x 16 blocks on the demo grid), overlapping near-equal windows otherwise (the convention of
    :mod:`medcam3d.batch.organs`).

    Args:
        mask: ``[*S]`` bool (or 0/1) on the network grid, 1-3 axes.
        map_shape: the maps' spatial size ``s`` (same number of axes).
        geometry: with a ``"receptive"`` :class:`~medcam3d.geometry.MapGeometry` a map voxel's block is the grid
            voxels nearest its receptive-field centre (:func:`medcam3d.geometry.cell_fractions`).

    Returns:
        float64 ``[*s]`` in [0, 1].
    """
    m = as_tensor(mask, torch.float32)
    shape = tuple(int(n) for n in map_shape)
    if m.ndim != len(shape) or not 1 <= m.ndim <= 3:
        raise ValueError(f"block_fractions: mask of shape {tuple(m.shape)} and map_shape {shape} need 1-3 equal axes")
    return geometry_block_fractions(m, shape, geometry)


def chance_share(fraction: Any) -> float:
    """What :func:`relevance_mass` gives by chance: the mask's volume share (mean of ``fraction [*s]``); a constant
    positive map scores exactly this."""
    f = as_tensor(fraction)
    return float(f.mean()) if f.numel() else math.nan


# ----------------------------------------------------------------------------------------------------------------
# localisation
# ----------------------------------------------------------------------------------------------------------------


def relevance_mass(values: Any, fraction: Any) -> Tensor:
    """Share of the positive relevance inside a mask: ``Σ relu(v)·m / Σ relu(v)``.

    Args:
        values: ``[..., *S]`` signed maps (e.g. raw HiResCAM maps ``[B, K, *s]``).
        fraction: ``[*S]`` mask, bool or fractional in [0, 1] (see :func:`block_fractions`).

    Returns:
        float64 ``[...]``; NaN for empty maps (no positive value). Chance level: :func:`chance_share`.
    """
    v, m, lead = _split(values, fraction, "relevance_mass")
    pos = v.clamp_min(0.0)
    total = pos.sum(1)
    inside = pos @ m
    out = torch.where(total > 0, inside / total.clamp_min(1e-300), torch.full_like(total, math.nan))
    return out.reshape(lead)


def allowed_region_score(values: Any, allowed: Any) -> Tensor:
    """The AxialNet allowed-region score ``a / (a + b)``: ``a`` the positive relevance inside the allowed region,
    ``b`` outside it.

    Args:
        values: ``[..., *S]`` signed maps.
        allowed: ``[*S]`` allowed region, bool or fractional (e.g. :func:`block_fractions` of the lungs).

    Returns:
        float64 ``[...]``: 1 when nothing falls outside (``b = 0 < a``), 0 when nothing falls inside, NaN when the
        map is empty (``a + b = 0``)."""
    return relevance_mass(values, allowed)


def relevance_rank_accuracy(values: Any, mask: Any) -> Tensor:
    """Relevance rank accuracy: share of the ``K = |mask|`` highest values that lie inside the mask.

    Ties at the K-th highest value share the remaining places in proportion to how many of the tied voxels are
    inside (the expectation over random tie-breaking).

    Args:
        values: ``[..., *S]`` maps (raw or heatmaps; only the order matters).
        mask: ``[*S]`` bool.

    Returns:
        float64 ``[...]`` in [0, 1]; NaN when the mask is empty or the map is empty (no positive value).
    """
    v, m, lead = _split(values, mask, "relevance_rank_accuracy")
    n = v.shape[0]
    m = _bool_mask(m, "relevance_rank_accuracy")
    k = int(m.sum())
    out = torch.full((n,), math.nan, dtype=torch.float64)
    if k == 0:
        return out.reshape(lead)
    for i in range(n):
        row = v[i]
        if not bool((row > 0).any()):
            continue
        kth = torch.topk(row, k).values[-1]  # the K-th highest value
        above = row > kth
        tied = row == kth
        n_above = int(above.sum())
        n_tied = int(tied.sum())
        hits = float((above & m).sum()) + (k - n_above) * float((tied & m).sum()) / n_tied
        out[i] = hits / k
    return out.reshape(lead)


def pointing_game(values: Any, mask: Any, ties: str = "fraction") -> Tensor:
    """Pointing game: does the map's maximum lie inside the mask?

    Args:
        values: ``[..., *S]`` maps.
        mask: ``[*S]`` bool.
        ties: with several voxels at the maximum: ``"fraction"`` (share of them inside, the expected hit under
            random tie-breaking), ``"any"`` or ``"all"``.

    Returns:
        float64 ``[...]`` in [0, 1]; NaN for an empty map (no positive value).
    """
    if ties not in ("fraction", "any", "all"):
        raise ValueError(f"ties={ties!r}: expected 'fraction', 'any' or 'all'")
    v, m, lead = _split(values, mask, "pointing_game")
    m = _bool_mask(m, "pointing_game")
    top = v.amax(1, keepdim=True)
    at_max = v == top  # [L, N]
    inside = (at_max & m).sum(1).to(torch.float64)
    count = at_max.sum(1).to(torch.float64)
    if ties == "fraction":
        hit = inside / count
    elif ties == "any":
        hit = (inside > 0).to(torch.float64)
    else:
        hit = (inside == count).to(torch.float64)
    out = torch.where(top[:, 0] > 0, hit, torch.full_like(hit, math.nan))
    return out.reshape(lead)


def iou_curve(heatmap: Any, mask: Any, thresholds: Sequence[float] = IOU_THRESHOLDS) -> Tensor:
    """IoU of the binarised heatmap (``heatmap >= t``) with the mask, for each threshold.

    Args:
        heatmap: ``[..., *S]`` display heatmaps in [0, 1] (:func:`medcam3d.heatmaps.to_heatmap`).
        mask: ``[*S]`` bool.
        thresholds: T thresholds (default :data:`IOU_THRESHOLDS`).

    Returns:
        float64 ``[..., T]``; NaN where both the binarised map and the mask are empty.
    """
    v, m, lead = _split(heatmap, mask, "iou_curve")
    m = _bool_mask(m, "iou_curve")
    t = torch.as_tensor(list(thresholds), dtype=torch.float64)
    n_mask = int(m.sum())
    out = torch.empty((v.shape[0], t.numel()), dtype=torch.float64)
    for i in range(v.shape[0]):
        row = v[i]
        all_sorted = torch.sort(row).values
        in_sorted = torch.sort(row[m]).values
        pred = row.numel() - torch.searchsorted(all_sorted, t, right=False)  # count of values >= t
        inter = n_mask - torch.searchsorted(in_sorted, t, right=False)
        union = (pred + n_mask - inter).to(torch.float64)
        out[i] = torch.where(union > 0, inter.to(torch.float64) / union.clamp_min(1.0),
                             torch.full_like(union, math.nan))
    return out.reshape(*lead, t.numel())


def best_threshold_iou(
    validation: Any, test: Any, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> dict[str, float | int]:
    """The paper's best-threshold IoU: the threshold with the highest mean IoU on the validation split, and the
    mean IoU of the test split at that threshold.

    Args:
        validation: ``[n_val, T]`` IoU curves (:func:`iou_curve`) of the validation cases (NaNs are ignored).
        test: ``[n_test, T]`` IoU curves of the test cases.
        thresholds: the T thresholds.

    Returns:
        ``{"threshold", "index", "validation", "test", "n_validation", "n_test"}``; ties between thresholds go to the
        lowest; everything NaN (index -1) when no validation case has a defined IoU.
    """
    val = as_tensor(validation).reshape(-1, len(thresholds)).numpy()
    tst = as_tensor(test).reshape(-1, len(thresholds)).numpy()
    n_val = int(np.isfinite(val).any(axis=1).sum())
    n_test = int(np.isfinite(tst).any(axis=1).sum())
    result: dict[str, float | int] = {"threshold": math.nan, "index": -1, "validation": math.nan, "test": math.nan,
                                      "n_validation": n_val, "n_test": n_test}
    if n_val == 0:
        return result
    with warnings.catch_warnings():  # an all-NaN column is a legitimate NaN here ("Mean of empty slice")
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_val = np.nanmean(val, axis=0)
        mean_test = np.nanmean(tst, axis=0) if tst.size else np.full(len(thresholds), math.nan)
    if not np.isfinite(mean_val).any():
        return result
    idx = int(np.nanargmax(mean_val))  # first (lowest) threshold among ties
    result.update(threshold=float(thresholds[idx]), index=idx, validation=float(mean_val[idx]),
                  test=float(mean_test[idx]))
    return result


# ----------------------------------------------------------------------------------------------------------------
# similarity between maps (sanity checks)
# ----------------------------------------------------------------------------------------------------------------


def _flat_pairs(a: Any, b: Any, spatial_axes: int, what: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    x = as_tensor(a).numpy()
    y = as_tensor(b).numpy()
    if x.shape != y.shape or x.ndim < spatial_axes or spatial_axes < 1:
        raise ValueError(f"{what}: maps of shapes {x.shape} and {y.shape} (spatial_axes={spatial_axes}) do not match")
    lead = x.shape[: x.ndim - spatial_axes]
    return x.reshape(int(np.prod(lead)), -1), y.reshape(int(np.prod(lead)), -1), tuple(lead)


def spearman(a: Any, b: Any, spatial_axes: int = 3, absolute: bool = False) -> Tensor:
    """Spearman rank correlation between two maps over their spatial axes (average ranks for ties).

    Args:
        a, b: ``[..., *S]`` maps of the same shape with ``spatial_axes`` trailing spatial axes.
        absolute: correlate ``|a|`` with ``|b|`` (Adebayo et al.'s "absolute" variant).

    Returns:
        float64 ``[...]`` in [-1, 1]; NaN where either map is constant.
    """
    # lazy: scipy costs a second to import; the command line must stay quick
    from scipy.stats import rankdata

    x, y, lead = _flat_pairs(a, b, spatial_axes, "spearman")
    if absolute:
        x, y = np.abs(x), np.abs(y)
    rx = rankdata(x, axis=1) - (x.shape[1] + 1) / 2
    ry = rankdata(y, axis=1) - (y.shape[1] + 1) / 2
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (rx * ry).sum(1) / np.where(den > 0, den, 1.0), np.nan)
    return torch.from_numpy(np.clip(r, -1.0, 1.0).reshape(lead))


def ssim(
    a: Any,
    b: Any,
    spatial_axes: int = 3,
    data_range: float = 1.0,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Structural similarity (Wang et al. 2004) in 1-3 spatial dimensions, with Gaussian-weighted local statistics.

    ``SSIM = mean over voxels of (2 μa μb + C1)(2 σab + C2) / ((μa² + μb² + C1)(σa² + σb² + C2))`` with local means,
    variances and covariance from a Gaussian filter of standard deviation ``sigma`` voxels (truncated at 3.5 sigma,
    reflecting at the borders, so that small feature maps keep every voxel), ``C1 = (k1·data_range)²``,
    ``C2 = (k2·data_range)²``.

    Args:
        a, b: ``[..., *S]`` maps (e.g. display heatmaps in [0, 1]) with ``spatial_axes`` trailing spatial axes.
        data_range: the maps' value range (1 for heatmaps).

    Returns:
        float64 ``[...]``; identical maps give 1.
    """
    # lazy: scipy costs a second to import
    from scipy.ndimage import gaussian_filter

    x = as_tensor(a).numpy()
    y = as_tensor(b).numpy()
    if x.shape != y.shape or not 1 <= spatial_axes <= x.ndim:
        raise ValueError(f"ssim: maps of shapes {x.shape} and {y.shape} (spatial_axes={spatial_axes}) do not match")
    sig = [0.0] * (x.ndim - spatial_axes) + [float(sigma)] * spatial_axes

    def blur(t: np.ndarray) -> np.ndarray:
        return gaussian_filter(t, sig, mode="reflect", truncate=3.5)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    axes = tuple(range(x.ndim - spatial_axes, x.ndim))
    return torch.from_numpy(np.asarray(s.mean(axis=axes), dtype=np.float64))


# ----------------------------------------------------------------------------------------------------------------
# curves
# ----------------------------------------------------------------------------------------------------------------


def area_under_curve(x: Any, y: Any) -> Tensor:
    """Trapezoidal area under ``y`` over ``x``.

    Args: x ``[T]`` increasing (e.g. fractions 0..1 removed); y ``[..., T]``. Returns: float64 ``[...]``."""
    xs = as_tensor(x)
    ys = as_tensor(y)
    if xs.ndim != 1 or ys.shape[-1] != xs.numel():
        raise ValueError(f"area_under_curve: x of shape {tuple(xs.shape)} does not match y of shape {tuple(ys.shape)}")
    return torch.trapezoid(ys, xs, dim=-1)
