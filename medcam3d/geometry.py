"""Where a map's cells sit on the input grid, and n-linear resampling that respects it.

A map at feature resolution has one value per cell. To draw it on the input grid one must know where each cell
is. Two answers are used:

* ``"field"`` -- the paper's display convention (and ``F.interpolate(..., align_corners=False)``): the input's
  field of view is divided evenly among the cells, cell ``i`` of an axis with ``n`` cells over ``N`` voxels is
  centred at voxel ``(i + 0.5) N / n − 0.5``.
* ``"receptive"`` -- the centre of each cell's receptive field, as the network's convolutions and pools place it.
  For padded ("same") convolutions the two nearly agree; after unpadded ("valid") convolutions they do not: the
  paper's AxialNet explains the output of four valid 3 x 3 convolutions, whose 6 x 6 cells are centred over the
  middle 160 of 420 pixels, not spread over all 420.

A :class:`MapGeometry` holds, per spatial axis, ``centre(i) = offset + stride * i`` in input voxel-index units
(voxel centres at integers). :func:`resample` interpolates linearly between cell centres (separably, axis by
axis) and holds the edge cells' values beyond the first and last centre -- for ``"field"`` geometry that is
exactly ``F.interpolate(mode="(bi/tri)linear", align_corners=False)``.

Pure tensor code; the only model knowledge is :func:`conv_chain_geometry`, which composes the (kernel, stride,
padding, dilation) of a chain of convolutions and pools.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GEOMETRIES",
    "MapGeometry",
    "assignment_matrix",
    "block_fractions",
    "cell_fractions",
    "conv_chain_geometry",
    "interpolation_matrix",
    "resample",
]

GEOMETRIES = ("field", "receptive")


@dataclass(frozen=True)
class MapGeometry:
    """Cell centres on the input grid: along axis ``d``, cell ``i`` is centred at ``offset[d] + stride[d] * i``
    (input voxel-index units).

    Attributes:
        offset: centre of cell 0 per spatial axis.
        stride: distance between neighbouring cell centres per spatial axis (input voxels).
        kind: ``"field"`` or ``"receptive"`` (what the numbers mean; see the module docstring).
    """

    offset: tuple[float, ...]
    stride: tuple[float, ...]
    kind: str = "receptive"

    def __post_init__(self) -> None:
        if len(self.offset) != len(self.stride):
            raise ValueError(f"offset {self.offset} and stride {self.stride} have different numbers of axes")
        if any(s <= 0 for s in self.stride):
            raise ValueError(f"stride must be positive, got {self.stride}")

    @classmethod
    def field(cls, map_size: Sequence[int], input_size: Sequence[int]) -> MapGeometry:
        """The whole-field convention: ``stride = N / n``, ``offset = (stride − 1) / 2`` per axis."""
        if len(map_size) != len(input_size):
            raise ValueError(f"map_size {tuple(map_size)} and input_size {tuple(input_size)} differ in axes")
        stride = tuple(float(n_in) / float(n) for n, n_in in zip(map_size, input_size))
        return cls(tuple((s - 1.0) / 2.0 for s in stride), stride, "field")

    def rescaled(self, input_size: Sequence[int], size: Sequence[int]) -> MapGeometry:
        """The same cells on a grid of ``size`` voxels covering the same field as ``input_size`` (voxel ``x`` of
        the input lies at ``(x + 0.5) size / input_size − 0.5``)."""
        r = [float(t) / float(n) for t, n in zip(size, input_size)]
        return MapGeometry(
            tuple((o + 0.5) * f - 0.5 for o, f in zip(self.offset, r)),
            tuple(s * f for s, f in zip(self.stride, r)),
            self.kind,
        )

    def centres(self, axis: int, n: int) -> Tensor:
        """``[n]`` centres of the cells along ``axis`` (float64)."""
        return self.offset[axis] + self.stride[axis] * torch.arange(n, dtype=torch.float64)

    def index_affine(self) -> Tensor:
        """``[D+1, D+1]`` float64 homogeneous map from cell index to input voxel index
        (``A_map = A_input @ this``)."""
        d = len(self.offset)
        m = torch.eye(d + 1, dtype=torch.float64)
        m[:d, :d] = torch.diag(torch.tensor(self.stride, dtype=torch.float64))
        m[:d, d] = torch.tensor(self.offset, dtype=torch.float64)
        return m


def interpolation_matrix(n_map: int, n_out: int, offset: float, stride: float) -> Tensor:
    """``[n_out, n_map]`` linear-interpolation weights from cells centred at ``offset + stride * i`` to the output
    voxels ``0 .. n_out − 1``; outside the first/last centre the edge cell's value is held. Rows sum to 1."""
    pos = (torch.arange(n_out, dtype=torch.float64) - offset) / stride
    pos = pos.clamp(0.0, float(n_map - 1))
    lo = pos.floor().long().clamp(max=n_map - 1)
    hi = (lo + 1).clamp(max=n_map - 1)
    frac = pos - lo.double()
    w = torch.zeros(n_out, n_map, dtype=torch.float64)
    rows = torch.arange(n_out)
    w.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    w.index_put_((rows, hi), frac, accumulate=True)
    return w


def resample(maps: Tensor, size: Sequence[int], geometry: MapGeometry) -> Tensor:
    """n-linear resampling of ``[B, K, *S]`` maps to ``[B, K, *size]`` with cells placed by ``geometry``.

    Separable (one small matrix per axis), on the maps' device, in at least float32. Values stay within the
    range of the inputs (each output is a convex combination)."""
    size = tuple(int(s) for s in size)
    nd = maps.ndim - 2
    if len(size) != nd or len(geometry.offset) != nd:
        raise ValueError(f"size {size} / geometry with {len(geometry.offset)} axes vs maps with {nd} spatial axes")
    x = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
    for d in range(nd):
        w = interpolation_matrix(x.shape[2 + d], size[d], geometry.offset[d], geometry.stride[d])
        x = torch.movedim(torch.tensordot(x, w.to(x.device, x.dtype), dims=([2 + d], [1])), -1, 2 + d)
    return x.contiguous()


def assignment_matrix(n_map: int, n_in: int, offset: float, stride: float) -> Tensor:
    """``[n_map, n_in]`` 0/1 matrix giving each input voxel to the cell whose centre is nearest (a voxel exactly
    halfway goes to the upper cell; voxels beyond the first/last centre go to the edge cell). For the field
    geometry with ``n_in`` a multiple of ``n_map`` the cells are the even blocks ``[i f, (i + 1) f)``."""
    pos = (torch.arange(n_in, dtype=torch.float64) - offset) / stride
    idx = torch.floor(pos + 0.5).clamp(0, n_map - 1).long()
    m = torch.zeros(n_map, n_in, dtype=torch.float64)
    m[idx, torch.arange(n_in)] = 1.0
    return m


def cell_fractions(mask: Tensor, map_size: Sequence[int], geometry: MapGeometry) -> Tensor:
    """Fraction of each cell's voxels (those nearest its centre, :func:`assignment_matrix`) inside ``mask``.

    Args: ``mask`` ``[..., *in_size]`` (bool or float in [0, 1]; leading axes are kept), ``map_size`` the map's
    spatial size. Returns: ``[..., *map_size]`` float64 in [0, 1]."""
    nd = len(map_size)
    x = mask.to(torch.float64)
    count = torch.ones((), dtype=torch.float64)
    for d in range(nd):
        axis = x.ndim - nd + d
        a = assignment_matrix(int(map_size[d]), x.shape[axis], geometry.offset[d], geometry.stride[d]).to(x.device)
        x = torch.movedim(torch.tensordot(x, a, dims=([axis], [1])), -1, axis)
        count = count.unsqueeze(-1) * a.sum(1)  # voxels per cell, an outer product over axes
    return x / count.to(x.device).clamp(min=1.0)


def block_fractions(mask: Tensor, map_size: Sequence[int], geometry: MapGeometry | None = None) -> Tensor:
    """Per map cell, the fraction of its block of input voxels inside ``mask`` (``[*in_size]``, 1-3 axes).

    ``"field"`` geometry (or None): adaptive average pooling -- the even blocks when the input is a whole multiple
    of the map, overlapping near-equal windows otherwise. ``"receptive"``: the voxels nearest each cell's centre
    (:func:`cell_fractions`). Returns: float64 ``[*map_size]`` in [0, 1]."""
    size = tuple(int(n) for n in map_size)
    if geometry is not None and geometry.kind != "field":
        return cell_fractions(mask, size, geometry)
    pool: Callable[..., Tensor] = {  # pool1d is typed for an int size; a 1-tuple works too
        1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d
    }[mask.ndim]
    return pool(mask.to(torch.float32)[None, None], size)[0, 0].to(torch.float64)


def _tuple(v: int | Sequence[int], nd: int) -> tuple[int, ...]:
    """A module's ``kernel_size``/``stride``/... as one value per axis."""
    return tuple(v) if isinstance(v, Sequence) else (int(v),) * nd


def conv_chain_geometry(modules: Iterable[nn.Module], nd: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Receptive-field centres after a chain of convolutions / pools applied one after another.

    A layer with kernel ``k``, stride ``s``, padding ``p`` and dilation ``d`` centres its output ``j`` at input
    ``s j − p + d (k − 1) / 2``; composing these affine maps gives ``centre(i) = offset + stride * i`` on the
    chain's input. Other modules (norms, activations) do not move centres and are skipped.

    Args:
        modules: the convolutions and pools in forward order (leave out parallel branches such as a residual
            block's downsample, which meets the main path at the same centres).
        nd: number of spatial axes.
    Returns: ``(offset, stride)`` per axis.
    """
    offset = [0.0] * nd
    stride = [1.0] * nd
    for m in modules:
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                          nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            k = _tuple(m.kernel_size, nd)
            s = _tuple(m.stride, nd)
            p = m.padding
            if isinstance(p, str):  # "same"/"valid": a value we cannot place, so not a TypeError
                raise ValueError(  # noqa: TRY004
                    f"{type(m).__name__} with padding={p!r}: give explicit padding"
                )
            p = _tuple(p, nd)
            dil = _tuple(getattr(m, "dilation", 1), nd)
            for a in range(nd):
                local = -p[a] + dil[a] * (k[a] - 1) / 2.0  # centre of output 0 on this layer's input
                offset[a] += stride[a] * local
                stride[a] *= s[a]
    return tuple(offset), tuple(stride)
