"""What is explained: targets turn a model's output into ``[B, T]`` raw scores, one per target.

A :class:`Targets` object is *bound* once per explanation call, on the real (detached) model output
(:meth:`Targets.bind`). Binding fixes everything that depends on the output -- for a segmentation net, the regions
-- and returns a :class:`BoundTargets`: a callable ``output -> [B, T]`` plus a description of each target
(:class:`TargetInfo`) and which targets are valid in which sample. The explainer then reads every score through
that one callable: at the real activations, at the certificate's probe points, at zero activations and in the
gradients, so the regions never move while the head is tested or differentiated.

Built in:

* :class:`Classes` (the default): the model's raw class scores ``[B, M]`` (T = M), read by
  :func:`select_scores` or any callable; the explained classes are chosen as ``classes=`` chooses them.
* :class:`SegmentationRegions`: for a segmentation net (output ``[B, C, *spatial]``), the raw score (logit) of
  channel ``cls`` summed (or averaged) over a region of the output grid: the predicted mask of that class, each
  26-connected component of it, a mask or a box the user gives.

Any plain callable ``output -> [B, T]`` is accepted wherever targets are (it becomes ``Classes(reader=callable)``).

Regions live on the **output grid**. For segmentation nets the output grid is the input grid (same spatial size,
same voxels), so a region's voxel indices and centroid are input voxel indices and the input's affine maps them to
millimetres (:meth:`TargetInfo.centroid_mm`).

Per-sample regions (components, or the predicted mask of a batch) differ from sample to sample. The T axis is
then padded: T is the largest number of targets of any sample, and ``valid [B, T]`` says which (sample, target)
entries exist. An invalid entry's score is the constant 0 (its region is empty and its weight 0), so its gradient
and every map of it are exactly 0 -- the batch is explained in one pass instead of sample by sample.

Pure torch (layer 1) plus ``scipy.ndimage.label`` for the connected components; no MONAI import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from .errors import InputError

__all__ = [
    "REGIONS",
    "BoundTargets",
    "Classes",
    "NoRegions",
    "SegmentationRegions",
    "TargetInfo",
    "Targets",
    "as_targets",
    "select_scores",
]

#: The ``region`` values of :class:`TargetInfo`.
REGIONS = ("class", "predicted", "component", "mask", "box")


def select_scores(output: Any) -> Tensor:
    """Default reading of a model's output as raw scores ``[B, M]``: a tensor as is; the first element of a
    tuple/list; ``output["logits"]`` (or the only value) of a dict."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, dict):
        if "logits" in output:
            return output["logits"]
        if len(output) == 1:
            return next(iter(output.values()))
    raise InputError(
        f"cannot read class scores from a model output of type {type(output).__name__}; pass targets=callable"
    )


# ------------------------------------------------------------------------------------------------------------
# What a target is, and the bound form the explainer reads scores through
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetInfo:
    """One target, described for people and output files.

    Attributes:
        name: e.g. ``"mass_right_lung"`` (a class) or ``"lesion component 1"`` (a region).
        cls: the output channel (class index) whose score is explained.
        region: ``"class"`` (the whole class score), ``"predicted"``, ``"component"``, ``"mask"`` or ``"box"``.
        component: for components, the rank by size (1 = largest); else None.
        voxels: number of voxels of the region on the output grid; None for classes.
        centroid: the region's centroid as (fractional) voxel indices on the output grid; None for classes.
        sample: the sample the description belongs to, when regions differ per sample; None when shared.
    """

    name: str
    cls: int
    region: str = "class"
    component: int | None = None
    voxels: int | None = None
    centroid: tuple[float, ...] | None = None
    sample: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable record (the centroid as a list)."""
        d = asdict(self)
        d["centroid"] = None if self.centroid is None else [float(c) for c in self.centroid]
        return d

    def centroid_mm(self, affine: Any) -> tuple[float, ...] | None:
        """The centroid in world millimetres: ``affine`` is the output grid's ``[d+1, d+1]`` index -> world matrix
        (numpy or tensor; for segmentation nets the output grid is the input grid, so the input's affine). A
        centroid with fewer axes than the affine is padded with index 0. None when there is no centroid."""
        if self.centroid is None:
            return None
        a = torch.as_tensor(np.asarray(affine, dtype=np.float64))
        d = a.shape[0] - 1
        if a.shape != (d + 1, d + 1) or len(self.centroid) > d:
            raise ValueError(f"affine of shape {tuple(a.shape)} does not fit a {len(self.centroid)}-axis centroid")
        idx = torch.tensor([*self.centroid, *([0.0] * (d - len(self.centroid))), 1.0], dtype=torch.float64)
        return tuple(float(v) for v in (a @ idx)[:d])


@dataclass
class BoundTargets:
    """Targets fixed on one model output: call it on any model output to get ``[B, T]`` raw scores.

    Attributes:
        infos: the T targets (:class:`TargetInfo`); with per-sample regions and B > 1, a description shared by the
            batch (voxels and centroid None; see :attr:`sample_infos`).
        valid: ``[B, T]`` bool, False where sample b has no target t (its score is the constant 0).
        score: ``output -> [B, T]`` (may also be given an output of the input repeated r times, ``[rB, T]``).
        labels: names of the T targets as the explanation shows them (for :class:`Classes`, the model's labels,
            possibly None).
        notes: one-line remarks (skipped empty regions, dropped components).
        selection: the targets explained when the call names none (None = all); indices or names.
        sample_infos: ``[B][T]`` per-sample descriptions (None where invalid).
        regions: for region targets, class -> ``[B, *S]`` label map on the output grid (0 outside every region,
            t + 1 inside target t's region): the score of target t is a weighted sum of channel ``infos[t].cls`` over
            its region, and the regions of one class are disjoint. Lets the explainer differentiate all targets of
            a class in one backward pass when the head maps each output voxel from the same voxel only. None for
            other targets.
    """

    infos: list[TargetInfo]
    valid: Tensor
    score: Callable[[Any], Tensor]
    labels: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    selection: Sequence[int | str] | None = None
    sample_infos: list[list[TargetInfo | None]] = field(default_factory=list)
    regions: dict[int, Tensor] | None = None

    def __call__(self, output: Any) -> Tensor:
        """``[B, T]`` raw target scores of ``output`` (the regions fixed at bind time)."""
        return self.score(output)

    @property
    def names(self) -> list[str]:
        """The T target names."""
        return [t.name for t in self.infos]


@runtime_checkable
class Targets(Protocol):
    """Anything that can be bound to a model output (:class:`Classes`, :class:`SegmentationRegions`)."""

    def bind(self, output: Any, labels: Sequence[str] | None) -> BoundTargets:
        """Fix the targets on the real, detached model ``output``; ``labels`` names the model's output channels
        (None when unknown)."""
        ...


def _class_name(cls: int, labels: Sequence[str] | None) -> str:
    return str(labels[cls]) if labels is not None and 0 <= cls < len(labels) else f"class_{cls}"


# ------------------------------------------------------------------------------------------------------------
# Classes: today's behaviour
# ------------------------------------------------------------------------------------------------------------


class Classes:
    """The model's raw class scores as targets (the default): T = M outputs.

    Args:
        classes: the classes explained when the call names none (output indices or labels, as ``classes=`` of
            :meth:`medcam3d.Explainer.__call__`); default all M.
        reader: ``output -> [B, M]`` raw scores; default :func:`select_scores` (a tensor, a tuple's first element,
            a dict's ``"logits"``).

    Example::

        Explainer(model, "layer4", targets=Classes(["mass"]))
    """

    def __init__(self, classes: Sequence[int | str] | None = None, reader: Callable[[Any], Tensor] | None = None):
        self.classes = None if classes is None else list(classes)
        self.reader = reader or select_scores

    def __repr__(self) -> str:
        return f"Classes(classes={self.classes!r})"

    def bind(self, output: Any, labels: Sequence[str] | None) -> BoundTargets:
        s = self.reader(output)
        if not isinstance(s, Tensor):
            raise InputError(f"targets: the score reader returned {type(s).__name__}, not a tensor")
        m = s.shape[1] if s.ndim == 2 else 1
        b = s.shape[0] if s.ndim >= 1 else 1
        infos = [TargetInfo(_class_name(c, labels), c) for c in range(m)]
        return BoundTargets(
            infos=infos,
            valid=torch.ones((b, m), dtype=torch.bool),
            score=self.reader,
            labels=None if labels is None else list(labels),
            selection=self.classes,
            sample_infos=[list(infos) for _ in range(b)],
        )


def as_targets(targets: Targets | Callable[[Any], Tensor] | None) -> Targets:
    """``None`` -> :class:`Classes`; a :class:`Targets` as is; a plain callable ``output -> [B, T]`` ->
    ``Classes(reader=callable)``."""
    if targets is None:
        return Classes()
    if isinstance(targets, Targets):
        return targets
    if callable(targets):
        return Classes(reader=targets)
    raise InputError(f"targets: expected Classes, SegmentationRegions or a callable, got {type(targets).__name__}")


# ------------------------------------------------------------------------------------------------------------
# Segmentation regions
# ------------------------------------------------------------------------------------------------------------


class NoRegions(InputError):
    """Region targets found no region to explain (every one empty, or smaller than ``min_voxels``)."""



@dataclass
class _ClassRegions:
    """The regions of one class in every sample: ``labels [B, *S]`` int64, 0 outside, k inside its k-th region
    (k = 1..count; for components, the k-th largest)."""

    cls: int
    kind: str
    labels: Tensor
    count: int


class RegionScores:
    """``output -> [B, T]``: target t's score is ``w[b, t] · Σ_{v ∈ region(b, t)} dense[b, cls_t, v]``.

    Regions of one class never overlap (a class's components partition its mask), so each class keeps one label
    map ``[B, N]`` (0 = no target, t + 1 = target t) and the sums are one ``scatter_add`` per class.

    Args:
        reader: ``output -> [B, C, *S]`` dense scores.
        label_maps: class -> ``[B, N]`` int64 label map (N = prod S).
        weights: ``[B, T]`` (1 for sums, 1/voxels for means, 0 for invalid entries).
    """

    def __init__(self, reader: Callable[[Any], Tensor], label_maps: dict[int, Tensor], weights: Tensor) -> None:
        self.reader = reader
        self.label_maps = label_maps
        self.weights = weights

    def on_voxels(self, positions: Tensor) -> RegionScores:
        """The same scores read from an output holding only the voxels ``positions`` (``[n]`` flat indices of the
        output grid, in that order): ``[B, C, 1, ..., n]`` (any shape whose flattened spatial axes are the n voxels)
        instead of ``[B, C, *S]``. Every region voxel must be among
        them."""
        return RegionScores(self.reader, {c: m.index_select(1, positions.to(m.device))
                                          for c, m in self.label_maps.items()}, self.weights)

    def __call__(self, output: Any) -> Tensor:
        dense = self.reader(output)
        b, t = dense.shape[0], self.weights.shape[1]
        reps = b // self.weights.shape[0]
        if reps * self.weights.shape[0] != b:
            raise InputError(f"targets: an output with batch {b} does not fit regions bound on batch "
                             f"{self.weights.shape[0]}")
        flat = dense.flatten(2)  # [B, C, N]
        sums = flat.new_zeros((b, t + 1))
        for cls, labels in self.label_maps.items():
            idx = labels.to(flat.device)
            sums = sums.scatter_add(1, idx if reps == 1 else idx.repeat(reps, 1), flat[:, cls])
        weights = self.weights.to(flat.device, flat.dtype)
        return sums[:, 1:] * (weights if reps == 1 else weights.repeat(reps, 1))


class SegmentationRegions:
    """Regions of a segmentation output as targets: the raw score (logit) of channel ``cls`` summed (or averaged)
    over each region, ``s_t = Σ_{v ∈ R_t} y[cls, v]`` (``reduce="sum"``) or ``s_t / |R_t|`` (``"mean"``).

    Args:
        cls: the output channel, as an index or a label; or several (one set of targets per class, in order).
        region: ``"predicted"`` (the predicted mask of the class, one target), ``"components"`` (each
            26-connected component of the predicted mask, largest first), a mask tensor (the output's spatial shape
            ``[*S]`` shared by the batch, or ``[B, *S]``; non-zero = inside) or a box ``(start, stop)`` of voxel
            index tuples (half-open, on the output grid). A numpy mask is accepted too.
        reduce: ``"sum"`` or ``"mean"`` over the region.
        activation: how the prediction is made: ``"softmax"`` (the predicted mask is ``argmax == cls``) or
            ``"sigmoid"`` (``sigmoid(y[cls]) >= threshold``).
        threshold: the sigmoid threshold.
        max_targets: the most components kept per class (the smallest are dropped, with a note).
        reader: ``output -> [B, C, *S]`` dense scores; default :func:`select_scores`.
        min_voxels: predicted regions (components, or a whole predicted mask) with fewer voxels are dropped, with a
            note (isolated voxels of a noisy prediction are rarely worth a target); masks and boxes are kept as given.

    An empty region (a class not predicted anywhere, an empty mask) is skipped with a one-line note; when no
    target is left, :class:`NoRegions` (an :class:`InputError`).

    Example::

        Explainer(unet, "model.1", targets=SegmentationRegions(2, "components"))(x)
    """

    def __init__(
        self,
        cls: int | str | Sequence[int | str],
        region: str | Tensor | np.ndarray | tuple[Sequence[int], Sequence[int]] = "predicted",
        reduce: str = "sum",
        activation: str = "softmax",
        threshold: float = 0.5,
        max_targets: int = 20,
        reader: Callable[[Any], Tensor] | None = None,
        min_voxels: int = 1,
    ) -> None:
        self.cls: list[int | str] = list(cls) if isinstance(cls, (list, tuple)) else [cls]  # type: ignore[list-item]
        if isinstance(region, np.ndarray):
            region = torch.from_numpy(region)
        if isinstance(region, str) and region not in ("predicted", "components"):
            raise InputError(f"targets: region must be 'predicted', 'components', a mask or a box, got {region!r}")
        if not isinstance(region, (str, Tensor)):
            region = _check_box(region)
        if reduce not in ("sum", "mean"):
            raise InputError(f"targets: reduce must be 'sum' or 'mean', got {reduce!r}")
        if activation not in ("softmax", "sigmoid"):
            raise InputError(f"targets: activation must be 'softmax' or 'sigmoid', got {activation!r}")
        if max_targets < 1:
            raise InputError(f"targets: max_targets must be at least 1, got {max_targets}")
        if min_voxels < 1:
            raise InputError(f"targets: min_voxels must be at least 1, got {min_voxels}")
        self.region = region
        self.reduce = reduce
        self.activation = activation
        self.threshold = float(threshold)
        self.max_targets = int(max_targets)
        self.min_voxels = int(min_voxels)
        self.reader = reader or select_scores

    def __repr__(self) -> str:
        region = self.region if isinstance(self.region, (str, tuple)) else f"mask{tuple(self.region.shape)}"
        return f"SegmentationRegions(cls={self.cls!r}, region={region!r}, reduce={self.reduce!r})"

    def bind(self, output: Any, labels: Sequence[str] | None) -> BoundTargets:
        dense = self._dense(output)
        classes = list(dict.fromkeys(_resolve_class(c, labels, dense.shape[1]) for c in self.cls))
        notes: list[str] = []
        regions = [r for c in classes if (r := self._regions(dense, c, _class_name(c, labels), notes)) is not None]
        if not regions:
            raise NoRegions(f"targets: no region left to explain ({'; '.join(notes)})")
        return _bound(regions, dense, labels, self.reduce, self.reader, notes)

    def _dense(self, output: Any) -> Tensor:
        dense = self.reader(output)
        if not isinstance(dense, Tensor) or dense.ndim < 3:
            shape = tuple(dense.shape) if isinstance(dense, Tensor) else type(dense).__name__
            raise InputError(f"targets: SegmentationRegions needs a dense output [B, C, *spatial], got {shape}")
        return dense.detach()

    def _predicted(self, dense: Tensor, cls: int) -> Tensor:
        """``[B, *S]`` bool: where the model predicts class ``cls`` (softmax: where ``argmax == cls``, the first of
        tied maxima winning, computed channel by channel: a strided argmax is slow on the CPU)."""
        if self.activation == "softmax":
            top = dense[:, cls]
            wins = torch.ones_like(top, dtype=torch.bool)
            for c in range(dense.shape[1]):
                if c != cls:
                    wins &= top > dense[:, c] if c < cls else top >= dense[:, c]
            return wins
        return torch.sigmoid(dense[:, cls].float()) >= self.threshold

    def _regions(self, dense: Tensor, cls: int, name: str, notes: list[str]) -> _ClassRegions | None:
        """The regions of one class (None, with a note, when they are empty in every sample)."""
        shape = (dense.shape[0], *dense.shape[2:])
        if isinstance(self.region, Tensor):
            masks, kind = _user_mask(self.region, shape), "mask"
        elif isinstance(self.region, tuple):
            masks, kind = _box_mask(self.region, shape), "box"
        else:
            masks, kind = self._predicted(dense, cls), "predicted"
            if self.min_voxels > 1 and self.region == "predicted":
                small = masks.flatten(1).sum(dim=1) < self.min_voxels
                if bool((small & masks.flatten(1).any(dim=1)).any()):
                    notes.append(f"{name}: the predicted region has fewer than min_voxels={self.min_voxels} voxels "
                                 f"in {int(small.sum())} sample(s); dropped there")
                masks = masks & ~small.view(-1, *([1] * (masks.ndim - 1)))
        empty = ~masks.flatten(1).any(dim=1)
        if bool(empty.all()):
            notes.append(f"{name}: the {kind} region is empty; target skipped")
            return None
        if bool(empty.any()):
            which = ", ".join(str(i) for i in torch.nonzero(empty).flatten().tolist())
            notes.append(f"{name}: the {kind} region is empty in sample(s) {which}; those entries are invalid")
        if not (isinstance(self.region, str) and self.region == "components"):
            return _ClassRegions(cls, kind, masks.long(), 1)
        found = _components(masks, cls, self.max_targets, self.min_voxels, name, notes)
        if found.count == 0:
            notes.append(f"{name}: every component has fewer than min_voxels={self.min_voxels} voxels; target skipped")
            return None
        return found


def _resolve_class(c: int | str, labels: Sequence[str] | None, channels: int) -> int:
    """The channel index of ``c`` (an index or a label); InputError when it is not one of the output's."""
    if isinstance(c, str):
        if labels is None or c not in labels:
            raise InputError(f"targets: unknown class label {c!r}")
        c = list(labels).index(c)
    c = int(c)
    if not 0 <= c < channels:
        raise InputError(f"targets: class {c} is outside the model output's {channels} channels")
    return c


def _check_box(box: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        start, stop = (tuple(int(v) for v in part) for part in box)
    except (TypeError, ValueError):
        raise InputError(f"targets: a box is (start, stop) index tuples, got {box!r}") from None
    if len(start) != len(stop) or any(a >= b for a, b in zip(start, stop)):
        raise InputError(f"targets: box {box!r} is empty or malformed (need start < stop on every axis)")
    return start, stop


def _user_mask(mask: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``[B, *S]`` bool from a ``[*S]`` or ``[B, *S]`` mask; InputError for any other shape."""
    if tuple(mask.shape) == shape[1:]:
        return (mask != 0).unsqueeze(0).expand(shape).contiguous()
    if tuple(mask.shape) == shape:
        return mask != 0
    raise InputError(f"targets: the mask has shape {tuple(mask.shape)}, but the output's spatial shape is "
                     f"{shape[1:]} (or [B, *spatial] = {shape})")


def _box_mask(box: tuple[tuple[int, ...], tuple[int, ...]], shape: tuple[int, ...]) -> Tensor:
    start, stop = box
    spatial = shape[1:]
    if len(start) != len(spatial) or any(not 0 <= a < b <= n for a, b, n in zip(start, stop, spatial)):
        raise InputError(f"targets: box {box!r} does not fit the output's spatial shape {spatial}")
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[(slice(None), *(slice(a, b) for a, b in zip(start, stop)))] = True
    return mask


def _components(masks: Tensor, cls: int, cap: int, min_voxels: int, name: str,
                notes: list[str]) -> _ClassRegions:
    """Each sample's 26-connected components (full connectivity in any number of axes) of at least ``min_voxels``
    voxels, ranked largest first (ties in scan order); target k is the k-th largest component of every sample that
    has one. At most ``cap`` per sample (a note says how many were dropped, and how many were too small)."""
    arr = masks.cpu().numpy()
    structure = np.ones((3,) * (arr.ndim - 1), dtype=bool)
    ranked = np.zeros(arr.shape, dtype=np.int64)
    dropped, small, count = 0, 0, 0
    for b, m in enumerate(arr):
        lab, n = ndimage.label(m, structure=structure)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        order = np.argsort(-sizes, kind="stable")
        big = order[sizes[order] >= min_voxels]
        small += len(order) - len(big)
        order = big[:cap]
        rank = np.zeros(n + 1, dtype=np.int64)
        rank[order + 1] = np.arange(1, len(order) + 1)
        ranked[b] = rank[lab]
        dropped += max(0, len(big) - cap)
        count = max(count, len(order))
    if small:
        notes.append(f"{name}: {small} component(s) smaller than min_voxels={min_voxels} dropped")
    if dropped:
        notes.append(f"{name}: {dropped} smallest component(s) beyond max_targets={cap} dropped")
    return _ClassRegions(cls, "component", torch.from_numpy(ranked).to(masks.device), count)


def _measure(labels: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Voxel counts ``[count]`` and centroids ``[count, d]`` (mean voxel index; NaN where empty) of the regions
    1..count of one sample's ``labels [*S]``, from its labelled voxels only."""
    where = torch.nonzero(labels)  # [n, d]
    values = labels[tuple(where.T)] - 1
    voxels = torch.bincount(values, minlength=count)[:count]
    sums = torch.zeros((count, labels.ndim), dtype=torch.float64, device=labels.device)
    sums.index_add_(0, values, where.double())
    return voxels.cpu(), (sums / voxels.unsqueeze(1).double()).cpu()


def _describe(region: _ClassRegions, k: int, voxels: int, centroid: Tensor | None, sample: int | None,
              labels: Sequence[str] | None) -> TargetInfo:
    """Region k's description; without ``voxels`` (0) the batch-wide one (no voxel count, no centroid)."""
    component = k + 1 if region.kind == "component" else None
    suffix = f"component {component}" if component is not None else region.kind
    return TargetInfo(
        name=f"{_class_name(region.cls, labels)} {suffix}",
        cls=region.cls,
        region=region.kind,
        component=component,
        voxels=voxels or None,
        centroid=None if not voxels or centroid is None else tuple(float(v) for v in centroid.tolist()),
        sample=sample,
    )


def _bound(regions: list[_ClassRegions], dense: Tensor, labels: Sequence[str] | None, reduce: str,
           reader: Callable[[Any], Tensor], notes: list[str]) -> BoundTargets:
    """The bound form of ``regions`` on ``dense [B, C, *S]``: label maps, weights, descriptions. The targets are
    numbered class by class, region by region."""
    batch, total = dense.shape[0], sum(r.count for r in regions)
    label_maps: dict[int, Tensor] = {}
    weights = torch.zeros((batch, total), dtype=torch.float64)
    sample_infos: list[list[TargetInfo | None]] = [[None] * total for _ in range(batch)]
    infos: list[TargetInfo] = []
    for r in regions:
        first = len(infos)
        flat = r.labels.flatten(1)
        label_maps[r.cls] = torch.where(flat > 0, flat + first, torch.zeros_like(flat))  # 0 or global index + 1
        shared = all(bool(torch.equal(r.labels[b], r.labels[0])) for b in range(1, batch))
        for b in range(batch):
            voxels, centroids = _measure(r.labels[b], r.count)
            for k in range(r.count):
                n = int(voxels[k])
                if n:
                    weights[b, first + k] = 1.0 / n if reduce == "mean" else 1.0
                    sample_infos[b][first + k] = _describe(r, k, n, centroids[k], None if shared else b, labels)
        for k in range(r.count):
            one = sample_infos[0][first + k]
            infos.append(one if shared and one is not None else _describe(r, k, 0, None, None, labels))
    return BoundTargets(
        infos=infos,
        valid=weights > 0,
        score=RegionScores(reader, {c: m.to(dense.device) for c, m in label_maps.items()},
                           weights.to(dense.device, dense.dtype)),
        labels=[i.name for i in infos],
        notes=notes,
        sample_infos=sample_infos,
        regions={c: m.view(dense.shape[0], *dense.shape[2:]).to(dense.device) for c, m in label_maps.items()},
    )
