"""Display post-processing of signed raw maps: ReLU, whole-map min-max, n-linear upsampling.

Following Draelos & Carin (and the AxialNet authors' code), a raw map ``[B, K, *S]`` becomes a heatmap by

1. ReLU (keep the positive evidence for the class),
2. min-max normalisation over the *whole* map of each (sample, class) -- never per slice,
3. n-linear interpolation to the input grid with the cells where a :class:`~medcam3d.geometry.MapGeometry` puts
   them: the ``"field"`` convention (linear / bilinear / trilinear ``F.interpolate``, ``align_corners=False``) or
   the receptive-field centres (:func:`medcam3d.geometry.resample`: linear between centres, the edge cell's value
   for half a stride beyond the outermost centres, exactly 0 -- *uncovered* -- further out). Which one is the
   default is decided by :mod:`medcam3d.placement` (``"auto"``).

Normalising before upsampling keeps values in [0, 1] (n-linear interpolation is a convex combination).
A map with no positive evidence (constant after ReLU) becomes all zeros, never NaN.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import MapGeometry, resample

__all__ = ["iter_heatmaps", "normalize", "to_heatmap", "upsample"]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def normalize(raw: Tensor, relu: bool = True) -> Tensor:
    """ReLU (optional) then min-max over all spatial positions of each map.

    Args:
        raw: ``[B, K, *S]`` signed maps.
        relu: apply ReLU first (the paper's display convention).

    Returns:
        ``[B, K, *S]`` in [0, 1]; constant maps give zeros.
    """
    x = torch.relu(raw) if relu else raw
    flat = x.flatten(2)
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    return out.reshape(x.shape)


def upsample(maps: Tensor, size: Sequence[int], geometry: MapGeometry | None = None) -> Tensor:
    """n-linear upsampling (``align_corners=False``) of ``[B, K, *S]`` to ``[B, K, *size]``.

    With a ``"receptive"`` :class:`~medcam3d.geometry.MapGeometry` (expressed on the grid of ``size``) the cells
    are placed at their receptive-field centres instead of dividing the field of view evenly, and voxels more than
    half a stride beyond the outermost centres are 0 (uncovered; see :mod:`medcam3d.geometry`).
    Interpolates in at least float32 and returns that dtype (callers cast for storage)."""
    size = tuple(int(s) for s in size)
    nd = maps.ndim - 2
    if len(size) != nd:
        raise ValueError(f"size {size} has {len(size)} axes but the maps have {nd} spatial axes")
    if geometry is not None and geometry.kind != "field":
        return resample(maps, size, geometry)
    if tuple(maps.shape[2:]) == size:
        return maps
    x = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
    return F.interpolate(x, size=size, mode=_MODES[nd], align_corners=False)


def to_heatmap(
    raw: Tensor,
    size: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    geometry: MapGeometry | None = None,
) -> Tensor:
    """``normalize`` then ``upsample`` (when ``size`` is given): ``[B, K, *S] -> [B, K, *size]`` in [0, 1]."""
    out = normalize(raw)
    if size is not None:
        out = upsample(out, size, geometry).clamp_(0.0, 1.0)
    return out if dtype is None else out.to(dtype)


def iter_heatmaps(
    raw: Tensor,
    size: Sequence[int] | None,
    chunk: int = 1,
    dtype: torch.dtype | None = None,
    geometry: MapGeometry | None = None,
) -> Iterator[tuple[slice, Tensor]]:
    """Heatmaps ``chunk`` classes at a time, so K full-size volumes never sit in memory together.

    Yields ``(class_slice, heatmap [B, k, *size])`` with ``class_slice`` indexing the K axis of ``raw``."""
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    k = raw.shape[1]
    for start in range(0, k, chunk):
        sl = slice(start, min(start + chunk, k))
        yield sl, to_heatmap(raw[:, sl], size, dtype, geometry)
