"""Perturbation faithfulness in 3-D: deletion and insertion curves over 3-D cells.

**Cells.** Each voxel of the explained map is one cell: the block of network-grid voxels it covers, found by
nearest-neighbour upsampling of the cell index to the input grid (:func:`cell_partition`; exact blocks when the grid
is a whole multiple of the map, e.g. AxialNet's 3 x 16 x 16 blocks on the demo grid).

**Orders.** For each explained class k the cells are visited in one of three orders: ``"morf"`` (most relevant
first: the signed raw map of class k in decreasing order), ``"lerf"`` (least relevant first: increasing order) and
``"random"`` (a seeded random permutation, shared by all classes and methods). Ties in the map are broken by a
seeded random permutation, never by position.

**Curves.** *Deletion* starts from the scan and replaces cells by the fill, *insertion* starts from the fill and
puts the scan's cells back. After a fraction ``t/T`` of the cells (``round(t/T · n_cells)`` cells, t = 0..T) the
model is run and the **raw score** ``s_k`` of class k (multi-label, never argmax) is recorded. The area under each
curve is the trapezoid over the fraction in [0, 1] (:func:`medcam3d.evaluate.metrics.area_under_curve`). A faithful
map gives a *low* deletion-MoRF area and a *high* insertion-MoRF area, compared with the random order (and with
LeRF, the other way round).

**Fills** (CT-appropriate, in network-grid units; the demo preprocessing maps HU h to
``(clip(h, −1000, 800) + 1000)/1800 − 0.449``): ``"air"`` (−1000 HU), ``"soft_tissue"`` (40 HU) and ``"blur"`` (the
scan blurred by a Gaussian with, along each axis, half the cell size as standard deviation).

**Cost** (model forward passes, batched ``batch_size`` inputs at a time): 2 per scan shared by everything (the scan
and the fill: every curve's end points), ``(T − 1)`` per mode for the random order (shared by all classes and
methods), and ``(T − 1)`` per (mode, order, class, method) for MoRF and LeRF -- i.e. ``4 (T − 1)`` passes per (scan,
class, method) for both modes and both relevance orders.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch
from torch import Tensor

from .metrics import area_under_curve

__all__ = [
    "FILLS",
    "FILL_HU",
    "MODES",
    "ORDERS",
    "HuToInput",
    "PerturbationCurves",
    "cell_orders",
    "cell_partition",
    "demo_hu_to_input",
    "make_fill",
    "perturbation_curves",
    "perturbation_passes",
]

FILLS = ("air", "soft_tissue", "blur")
ORDERS = ("morf", "lerf", "random")
MODES = ("deletion", "insertion")
#: HU of the constant fills
FILL_HU = {"air": -1000.0, "soft_tissue": 40.0}

ScoreFn = Callable[[Tensor], Tensor]
"""``score_fn(x [n, C, *S]) -> [n, M]`` raw scores of a batch of inputs."""

HuToInput = Callable[[float], float]
"""``hu_to_input(hu) -> value``: HU -> network-grid units."""


@overload
def demo_hu_to_input(hu: float) -> float: ...
@overload
def demo_hu_to_input(hu: Tensor) -> Tensor: ...
def demo_hu_to_input(hu: float | Tensor) -> float | Tensor:
    """The demo preprocessing's intensity mapping, HU -> network-grid units: ``(clip(h,-1000,800)+1000)/1800-0.449``."""
    if isinstance(hu, Tensor):
        return (hu.clamp(-1000.0, 800.0) + 1000.0) / 1800.0 - 0.449
    return (min(max(float(hu), -1000.0), 800.0) + 1000.0) / 1800.0 - 0.449


def cell_partition(map_shape: Sequence[int], input_shape: Sequence[int]) -> Tensor:
    """Cell index (a flat map-voxel index) of every input voxel.

    Voxel ``i`` along an axis of length ``S`` belongs to map voxel ``floor(i · s / S)`` (nearest-neighbour
    upsampling), so every cell is a box of ``S/s`` voxels per axis when ``S`` is a multiple of ``s``.

    Args: map_shape ``s`` (1-3 axes); input_shape ``S`` (same number of axes, each ``>= s``).
    Returns: int64 ``[*S]`` with values in ``[0, prod(s))``."""
    s = tuple(int(n) for n in map_shape)
    big = tuple(int(n) for n in input_shape)
    if len(s) != len(big) or not 1 <= len(s) <= 3 or any(a < b for a, b in zip(big, s)):
        raise ValueError(f"cell_partition: map {s} and input {big} need 1-3 axes with input >= map")
    idx = [torch.div(torch.arange(n) * m, n, rounding_mode="floor") for m, n in zip(s, big)]
    grids = torch.meshgrid(*idx, indexing="ij")
    flat = torch.zeros(big, dtype=torch.int64)
    stride = 1
    for g, m in zip(reversed(grids), reversed(s)):
        flat += g * stride
        stride *= m
    return flat


def make_fill(
    x: Tensor,
    kind: str | float,
    hu_to_input: HuToInput = demo_hu_to_input,
    cell_size: Sequence[float] | None = None,
) -> Tensor:
    """The fill volume for one input.

    Args:
        x: ``[C, *S]`` one network input.
        kind: ``"air"``, ``"soft_tissue"``, ``"blur"`` or a number (network-grid units).
        hu_to_input: HU -> network-grid units (default: the demo preprocessing's mapping).
        cell_size: voxels per cell along each axis (for ``"blur"``: sigma = cell_size / 2; default 2 voxels).

    Returns: ``[C, *S]`` like ``x``."""
    if isinstance(kind, (int, float)) and not isinstance(kind, bool):
        return torch.full_like(x, float(kind))
    if kind in FILL_HU:
        return torch.full_like(x, float(hu_to_input(FILL_HU[kind])))
    if kind == "blur":
        # lazy: scipy costs a second to import and only the blur needs it
        from scipy.ndimage import gaussian_filter

        nd = x.ndim - 1
        sig = [0.0] + [float(c) / 2 for c in (cell_size or [4.0] * nd)]
        out = gaussian_filter(x.detach().cpu().double().numpy(), sig, mode="nearest")
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)
    raise ValueError(f"unknown fill {kind!r}; use one of {', '.join(FILLS)} or a number")


def cell_orders(relevance: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Visiting orders of the cells.

    Args:
        relevance: ``[K, n_cells]`` signed relevance per cell for K classes.
        seed: seed of the tie-breaking permutation and of the random order.

    Returns:
        ``{"morf": [K, n_cells], "lerf": [K, n_cells], "random": [n_cells]}`` cell indices (int64)."""
    gen = torch.Generator().manual_seed(int(seed))
    n = relevance.shape[1]
    tie = torch.randperm(n, generator=gen)
    rand = torch.randperm(n, generator=gen)
    r = relevance.detach().cpu().double()[:, tie]
    morf = tie[torch.sort(r, dim=1, descending=True, stable=True).indices]
    lerf = tie[torch.sort(r, dim=1, descending=False, stable=True).indices]
    return {"morf": morf, "lerf": lerf, "random": rand}


@dataclass
class PerturbationCurves:
    """Deletion/insertion curves of one input.

    Attributes:
        fractions: ``[T+1]`` fraction of cells replaced (0..1).
        classes: the K output indices scored.
        curves: ``curves[method][mode][order]`` -> float64 ``[K, T+1]`` raw scores (the random order's curves are
            the same object for every method).
        auc: the same keys -> ``[K]`` areas under the curves.
        passes: model forward passes spent on this input.
    """

    fractions: Tensor
    classes: list[int]
    curves: dict[str, dict[str, dict[str, Tensor]]] = field(default_factory=dict)
    auc: dict[str, dict[str, dict[str, Tensor]]] = field(default_factory=dict)
    passes: int = 0


def perturbation_passes(steps: int, n_classes: int, n_methods: int, modes: int = 2, relevance_orders: int = 2) -> int:
    """Model forward passes :func:`perturbation_curves` spends on one input (see the module docstring)."""
    interior = max(steps - 1, 0)
    return 2 + modes * interior * (1 + relevance_orders * n_classes * n_methods)


def perturbation_curves(
    score_fn: ScoreFn,
    x: Tensor,
    relevance: Mapping[str, Tensor],
    classes: Sequence[int],
    fill: Tensor | float | str = "air",
    steps: int = 10,
    orders: Sequence[str] = ORDERS,
    modes: Sequence[str] = MODES,
    batch_size: int = 8,
    seed: int = 0,
    hu_to_input: HuToInput = demo_hu_to_input,
) -> PerturbationCurves:
    """Deletion and insertion curves of one input for several methods and classes.

    Args:
        score_fn: ``x [n, C, *S] -> [n, M]`` raw scores (e.g. ``lambda b: model(b)`` under ``torch.inference_mode``).
        x: ``[C, *S]`` one network input (or ``[1, C, *S]``).
        relevance: method -> ``[K, *s]`` signed raw maps of the K classes (one sample); ``s`` defines the cells.
        classes: the K output indices of ``score_fn`` that the maps explain.
        fill: a fill kind (see :func:`make_fill`), a number, or a ``[C, *S]`` volume.
        steps: T, the number of steps from 0 to all cells.
        orders: subset of ``("morf", "lerf", "random")``.
        modes: subset of ``("deletion", "insertion")``.
        batch_size: inputs per forward pass.
        seed: seed of tie-breaking and of the random order.
        hu_to_input: HU -> network units for the constant fills.

    Returns: :class:`PerturbationCurves`.
    """
    if x.ndim >= 2 and x.shape[0] == 1 and x.ndim == next(iter(relevance.values())).ndim + 1:
        x = x[0]
    classes = [int(c) for c in classes]
    maps = _checked_maps(relevance, classes, steps, orders, modes)
    map_shape = tuple(next(iter(maps.values())).shape[1:])
    spatial = tuple(x.shape[1:])
    n_cells = math.prod(map_shape)
    cell_size = [n / m for n, m in zip(spatial, map_shape)]
    fill_vol = fill if isinstance(fill, Tensor) else make_fill(x, fill, hu_to_input, cell_size)
    fill_vol = fill_vol.to(device=x.device, dtype=x.dtype).reshape(x.shape)
    counts = [round(t / steps * n_cells) for t in range(steps + 1)]
    orders_by_method = {m: cell_orders(r.reshape(len(classes), -1), seed) for m, r in maps.items()}
    pending = _schedule(orders_by_method, len(classes), counts, orders, modes)
    perturb = _Perturber(x, fill_vol, cell_partition(map_shape, spatial).to(x.device), n_cells)

    def run(batch: list[Tensor]) -> Tensor:
        with torch.inference_mode():
            out = score_fn(torch.stack(batch))
        return out.detach().double().cpu()[:, classes]  # [n, K]

    base = run([x, fill_vol])  # the shared end points: s(scan), s(fill)
    values = [run([perturb(*p[:4]) for p in pending[i : i + batch_size]]) for i in range(0, len(pending), batch_size)]
    scored = torch.cat(values) if values else torch.empty((0, len(classes)), dtype=torch.float64)
    fractions = torch.tensor([t / steps for t in range(steps + 1)], dtype=torch.float64)
    result = PerturbationCurves(fractions=fractions, classes=classes, passes=2 + len(pending))
    _fill_curves(result, list(maps), base, scored, pending, steps, orders, modes)
    return result


def _checked_maps(relevance: Mapping[str, Tensor], classes: list[int], steps: int, orders: Sequence[str],
                  modes: Sequence[str]) -> dict[str, Tensor]:
    """The maps on the CPU, after checking the arguments of :func:`perturbation_curves` (ValueError)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    bad = [o for o in orders if o not in ORDERS] + [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown order/mode {bad[0]!r}; orders {ORDERS}, modes {MODES}")
    maps = {m: r.detach().cpu() for m, r in relevance.items()}
    map_shape = tuple(next(iter(maps.values())).shape[1:])
    for m, r in maps.items():
        if r.shape[0] != len(classes) or tuple(r.shape[1:]) != map_shape:
            raise ValueError(f"relevance[{m!r}] has shape {tuple(r.shape)}; expected [{len(classes)}, *{map_shape}]")
    return maps


#: one input to score: (curve key (method or "*" for the shared random order, mode, order, class), the cells'
#: visiting order, number of cells switched, mode, step t)
_Pending = tuple[tuple[Any, ...], Tensor, int, str, int]


def _schedule(orders_by_method: dict[str, dict[str, Tensor]], n_classes: int, counts: list[int],
              orders: Sequence[str], modes: Sequence[str]) -> list[_Pending]:
    """Every perturbed input to score, in scoring order (consecutive inputs share a visiting order)."""
    steps = len(counts) - 1
    random_order = orders_by_method[next(iter(orders_by_method))]["random"]
    pending: list[_Pending] = []
    for mode in modes:
        if "random" in orders:
            key: tuple[Any, ...] = ("*", mode, "random", None)
            pending += [(key, random_order, counts[t], mode, t) for t in range(1, steps)]
        for m, by_order in orders_by_method.items():
            for order in ("morf", "lerf"):
                if order not in orders:
                    continue
                for k in range(n_classes):
                    key = (m, mode, order, k)
                    pending += [(key, by_order[order][k], counts[t], mode, t) for t in range(1, steps)]
    return pending


class _Perturber:
    """Builds perturbed inputs: the first ``count`` cells of a visiting order switched from one end to the other
    (deletion: scan -> fill; insertion: fill -> scan)."""

    def __init__(self, x: Tensor, fill: Tensor, cells: Tensor, n_cells: int) -> None:
        self.ends = {"deletion": (x, fill), "insertion": (fill, x)}
        self.cells = cells  # [*S] cell index of every input voxel
        self.n_cells = n_cells
        self.key: Any = None
        self.rank: Tensor | None = None

    def __call__(self, key: tuple[Any, ...], order: Tensor, count: int, mode: str) -> Tensor:
        if self.key != key or self.rank is None:  # rank of each voxel's cell in the visiting order
            rank = torch.empty(self.n_cells, dtype=torch.int32)
            rank[order] = torch.arange(self.n_cells, dtype=torch.int32)
            self.key, self.rank = key, rank.to(self.cells.device)[self.cells]
        start, target = self.ends[mode]
        return torch.where((self.rank < count).unsqueeze(0), target, start)


def _empty_curve(ends: tuple[Tensor, Tensor], n_classes: int, steps: int) -> Tensor:
    """``[K, T+1]`` float64 curves with their end points (``ends``: scores at t = 0 and t = T) set."""
    c = torch.empty((n_classes, steps + 1), dtype=torch.float64)
    c[:, 0], c[:, steps] = ends
    return c


def _fill_curves(result: PerturbationCurves, methods: list[str], base: Tensor, scored: Tensor,
                 pending: list[_Pending], steps: int, orders: Sequence[str], modes: Sequence[str]) -> None:
    """Put the end points and the scored inputs into ``result.curves`` and compute the areas."""
    shared: dict[str, Tensor] = {}
    for mode in modes:
        ends = (base[0], base[1]) if mode == "deletion" else (base[1], base[0])
        if "random" in orders:
            shared[mode] = _empty_curve(ends, len(result.classes), steps)
        for m in methods:
            for order in ("morf", "lerf"):
                if order in orders:
                    result.curves.setdefault(m, {}).setdefault(mode, {})[order] = _empty_curve(
                        ends, len(result.classes), steps)
    for row, (key, _, _, _, t) in enumerate(pending):
        who, mode, order, k = key
        if who == "*":
            shared[mode][:, t] = scored[row]
        else:
            result.curves[who][mode][order][k, t] = scored[row, k]
    for m in methods:
        for mode in modes:
            per = result.curves.setdefault(m, {}).setdefault(mode, {})
            if "random" in orders:
                per["random"] = shared[mode]
            result.auc.setdefault(m, {})[mode] = {o: area_under_curve(result.fractions, c) for o, c in per.items()}
