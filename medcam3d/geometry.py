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
(voxel centres at integers). Which of the two a model gets by default, and how it was found (declared by the
model, derived from its layers, or the field convention as a fallback), is :mod:`medcam3d.placement`'s job
(``"auto"``).

**Covered and uncovered.** A position is *covered* when it lies within half a stride of the cells' centres, i.e.
in cell units ``u = (voxel − offset) / stride`` when ``−0.5 <= u <= n − 0.5`` on every axis. Display maps
(:func:`cell_weights`, :func:`resample`) interpolate linearly between neighbouring centres, hold the edge cell's
value from the outermost centre out to half a stride beyond it, and are exactly 0 further out: no cell sits there,
which is not the same as a cell saying "no evidence" (:func:`is_covered`; :func:`covered_region` gives the mask
on a grid). For the ``"field"``
geometry half a stride beyond the outer centres is exactly the field's edge, so everything is covered and
:func:`resample` equals ``F.interpolate(mode="(bi/tri)linear", align_corners=False)``.

Pure tensor code. The only layer knowledge is the per-layer placement formulas (:func:`conv_cell_map`,
:func:`transposed_conv_cell_map`, :func:`upsample_cell_map`), used by :func:`conv_chain_geometry` for a plain
chain and by :mod:`medcam3d.placement` for any traced network.
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
    "cell_weights",
    "conv_cell_map",
    "conv_chain_geometry",
    "covered_box",
    "covered_region",
    "interpolation_matrix",
    "is_covered",
    "resample",
    "same_padding",
    "transposed_conv_cell_map",
    "upsample_cell_map",
]

#: Map placements a user can ask for: ``"auto"`` (declared or derived receptive-field centres, else the field;
#: :mod:`medcam3d.placement`), ``"field"`` and ``"receptive"``.
GEOMETRIES = ("auto", "field", "receptive")


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


def is_covered(pos: Tensor, n_cells: int) -> Tensor:
    """``[m]`` bool: which positions ``pos`` (``[m]``, cell units, see :func:`cell_weights`) lie within half a
    stride of the centres of ``n_cells`` cells, ``−0.5 <= u <= n_cells − 0.5`` (bounds included; NaN is not)."""
    return (pos >= -0.5) & (pos <= n_cells - 0.5)


def cell_weights(pos: Tensor, n_cells: int) -> Tensor:
    """Linear-interpolation weights of ``n_cells`` cells at arbitrary positions along one axis.

    Positions are in *cell units*: cell ``i`` is centred at ``u = i``, so a voxel at index ``x`` of a grid whose
    cells sit at ``offset + stride * i`` has ``u = (x − offset) / stride`` (:class:`MapGeometry`). Any positions
    work -- a regular grid (:func:`interpolation_matrix`) or the coordinates of oblique sample points along this
    axis; an n-D value at a point is ``Σ_ijk w0[p, i] w1[p, j] w2[p, k] map[i, j, k]`` with one row per axis.

    The rule, for ``n = n_cells``:

    * ``0 <= u <= n − 1``: linear between the two neighbouring centres (``1 − frac`` on ``floor(u)``, ``frac`` on
      the next), so at a centre the cell's own value;
    * ``−0.5 <= u < 0`` and ``n − 1 < u <= n − 0.5`` (within half a stride beyond the outermost centres, bounds
      included): the edge cell's value (weight 1 on cell 0, resp. ``n − 1``);
    * otherwise (further out, or NaN): uncovered, an all-zero row -- a display value of exactly 0.

    Rows of covered positions sum to 1 (a convex combination, so values stay in the cells' range).

    Args:
        pos: ``[m]`` positions in cell units (any float dtype and device; computed in float64).
        n_cells: number of cells ``n >= 1`` along the axis.
    Returns: ``[m, n_cells]`` float64 weights on ``pos``'s device.
    """
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}")
    u = pos.to(torch.float64).reshape(-1)
    inside = is_covered(u, n_cells)
    u = torch.where(inside, u, torch.zeros_like(u)).clamp(0.0, float(n_cells - 1))
    lo = u.floor().long().clamp(max=n_cells - 1)
    hi = (lo + 1).clamp(max=n_cells - 1)
    frac = u - lo.double()
    keep = inside.double()
    w = torch.zeros(u.shape[0], n_cells, dtype=torch.float64, device=u.device)
    rows = torch.arange(u.shape[0], device=u.device)
    w.index_put_((rows, lo), (1.0 - frac) * keep, accumulate=True)
    w.index_put_((rows, hi), frac * keep, accumulate=True)
    return w


def interpolation_matrix(n_map: int, n_out: int, offset: float, stride: float) -> Tensor:
    """``[n_out, n_map]`` float64 weights from cells centred at ``offset + stride * i`` to the output voxels
    ``0 .. n_out − 1`` (:func:`cell_weights` at ``u = (x − offset) / stride``): linear between centres, the edge
    cell's value up to half a stride beyond the outermost centres, all-zero rows (uncovered) further out. Covered
    rows sum to 1."""
    return cell_weights((torch.arange(n_out, dtype=torch.float64) - offset) / stride, n_map)


def covered_box(geometry: MapGeometry, map_size: Sequence[int]) -> tuple[tuple[float, float], ...]:
    """The covered box per axis, ``(first centre − stride / 2, last centre + stride / 2)`` in voxel-index units of
    ``geometry``'s grid (bounds included; see :func:`cell_weights`). For the ``"field"`` geometry of an input of
    ``N`` voxels: ``(−0.5, N − 0.5)``, the whole field."""
    if len(map_size) != len(geometry.offset):
        raise ValueError(f"map_size {tuple(map_size)} vs a geometry with {len(geometry.offset)} axes")
    return tuple(
        (o - s / 2.0, o + s * (int(n) - 1) + s / 2.0) for o, s, n in zip(geometry.offset, geometry.stride, map_size)
    )


def covered_region(geometry: MapGeometry, map_size: Sequence[int], size: Sequence[int]) -> Tensor:
    """``[*size]`` bool: the voxels of a grid of ``size`` (the grid ``geometry`` is expressed on) where some cell
    sits -- where :func:`resample` draws the map, rather than the 0 of "no cell here". A box (the product of the
    per-axis intervals of :func:`covered_box`); all True for the ``"field"`` geometry."""
    size = tuple(int(n) for n in size)
    if not len(size) == len(map_size) == len(geometry.offset):
        raise ValueError(f"size {size}, map_size {tuple(map_size)} and the geometry differ in axes")
    mask = torch.ones((), dtype=torch.bool)
    for d, n_out in enumerate(size):
        u = (torch.arange(n_out, dtype=torch.float64) - geometry.offset[d]) / geometry.stride[d]
        mask = mask.unsqueeze(-1) & is_covered(u, int(map_size[d]))
    return mask


def resample(maps: Tensor, size: Sequence[int], geometry: MapGeometry) -> Tensor:
    """n-linear resampling of ``[B, K, *S]`` maps to ``[B, K, *size]`` with cells placed by ``geometry`` (a geometry
    on the output grid of ``size``; see :meth:`MapGeometry.rescaled`).

    Separable (one :func:`interpolation_matrix` per axis), on the maps' device, in at least float32. Covered
    voxels are convex combinations of cell values (so stay within their range); uncovered voxels (more than half a
    stride beyond the outermost centres on some axis) are exactly 0."""
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


# ------------------------------------------------------------------------------------------------------------
# Per-layer placement: cell j of a layer's output sits at ``a + b j`` on the layer's input grid (one axis)
# ------------------------------------------------------------------------------------------------------------


def same_padding(kernel: int, dilation: int = 1) -> int:
    """Left padding of ``padding="same"`` (PyTorch: total ``d (k − 1)``, the smaller half first)."""
    return dilation * (kernel - 1) // 2


def conv_cell_map(kernel: int, stride: int = 1, padding: int | str = 0, dilation: int = 1) -> tuple[float, float]:
    """Convolution or pooling along one axis: output ``j`` reads inputs ``s j − p + d t`` (``t = 0 .. k − 1``),
    centred at ``s j − p + d (k − 1) / 2``. ``padding`` may be ``"valid"`` (0) or ``"same"``
    (:func:`same_padding`). Returns ``(a, b)`` with output ``j`` at ``a + b j`` on the input."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding={padding!r}: expected an int, 'same' or 'valid'")
        padding = same_padding(kernel, dilation) if padding == "same" else 0
    return dilation * (kernel - 1) / 2.0 - padding, float(stride)


def transposed_conv_cell_map(kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> tuple[float, float]:
    """Transposed convolution along one axis: input ``i`` writes outputs ``s i − p + d t``, centred at
    ``s i − p + d (k − 1) / 2``; output ``j`` sits where that places it, ``(j + p − d (k − 1) / 2) / s`` (exactly
    its receptive-field centre when the kernel covers the stride; ``output_padding`` only adds outputs at the end).
    Returns ``(a, b)``."""
    return (padding - dilation * (kernel - 1) / 2.0) / stride, 1.0 / stride


def upsample_cell_map(scale: float) -> tuple[float, float]:
    """Up-/down-sampling by ``scale`` with ``align_corners=False`` (``F.interpolate``, ``nn.Upsample``): output
    ``j`` samples the input at ``(j + 0.5) / scale − 0.5``. Returns ``(a, b)``."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return 0.5 / scale - 0.5, 1.0 / scale


def _tuple(v: int | Sequence[int], nd: int) -> tuple[int, ...]:
    """A module's ``kernel_size``/``stride``/... as one value per axis."""
    return tuple(v) if isinstance(v, Sequence) else (int(v),) * nd


_CHAIN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def conv_chain_geometry(modules: Iterable[nn.Module], nd: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Receptive-field centres after a chain of convolutions / pools applied one after another.

    A layer with kernel ``k``, stride ``s``, padding ``p`` and dilation ``d`` centres its output ``j`` at input
    ``s j − p + d (k − 1) / 2`` (:func:`conv_cell_map`; ``padding="same"``/``"valid"`` included); composing these
    affine maps gives ``centre(i) = offset + stride * i`` on the chain's input. Other modules (norms,
    activations) do not move centres and are skipped. For any traced network (residual branches, concatenation,
    upsampling) see :func:`medcam3d.placement.derive_geometry`.

    Args:
        modules: the convolutions and pools in forward order (leave out parallel branches such as a residual
            block's downsample, which meets the main path at the same centres).
        nd: number of spatial axes.
    Returns: ``(offset, stride)`` per axis.
    """
    offset = [0.0] * nd
    stride = [1.0] * nd
    for m in modules:
        if isinstance(m, _CHAIN_LAYERS):
            k, s = _tuple(m.kernel_size, nd), _tuple(m.stride, nd)
            p = m.padding if isinstance(m.padding, str) else _tuple(m.padding, nd)
            dil = _tuple(getattr(m, "dilation", 1), nd)
            for ax in range(nd):
                a, b = conv_cell_map(k[ax], s[ax], p if isinstance(p, str) else p[ax], dil[ax])
                offset[ax] += stride[ax] * a
                stride[ax] *= b
    return tuple(offset), tuple(stride)
