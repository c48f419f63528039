"""Segmentation networks in the pipeline: the targets a config asks for, the predicted label map, its records.

A segmentation config (``task: segmentation``, :class:`medcam3d.config.TargetSettings`) explains *targets*
(:mod:`medcam3d.targets`): the regions of the model's own prediction -- each 26-connected component of a class's
predicted mask, or the whole mask -- each scored by the class's logits summed (or averaged) over it.
:class:`RecordingTargets` wraps :class:`~medcam3d.targets.SegmentationRegions` so that binding the targets on the
real model output (once per explanation, inside the explainer) also keeps what the output folder needs:

* the predicted label map on the network grid (:class:`Prediction`; uint8, value = output channel, 0 = background;
  when the background is not channel 0, or a sigmoid net has none, every class's value is its channel + 1 so that
  0 stays background -- :attr:`Prediction.names` says which value is which class);
* each target's mean predicted probability of its class over its region (a region score is a sum of logits, not
  a probability: this mean is what ``probability`` means for a target in ``scores.csv`` and the summary).

A prediction with no voxel of any explained class is not an error: binding raises :class:`EmptySegmentation`
(with its one-line note) before the core would refuse "no region left", and the pipeline writes the (empty)
segmentation and no maps.

:func:`labels_on_scan` brings the label map to the scan's own grid by nearest neighbour (the segmentation NIfTI
has the scan's affine and shape). :func:`target_records` describes the targets for ``targets.csv`` and the summary
(:class:`medcam3d.outputs.TargetRecord`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import TargetSettings
from .errors import InputError
from .explanation import Explanation
from .onscan import affine_reason
from .outputs import TargetRecord
from .targets import BoundTargets, NoRegions, RegionScores, SegmentationRegions, TargetInfo

__all__ = [
    "EmptySegmentation",
    "Prediction",
    "RecordingTargets",
    "expand_class_tokens",
    "labels_on_scan",
    "target_records",
]

#: scan voxels resampled at a time by :func:`labels_on_scan`'s general (oblique) path
_SLAB_VOXELS = 1 << 22


class EmptySegmentation(InputError):
    """The model predicts no voxel of any explained class: nothing to explain (the note says which classes)."""


@dataclass
class Prediction:
    """A segmentation net's prediction for one scan on the network grid.

    Attributes:
        label_map: ``[*S]`` uint8, value = output channel + ``offset`` where a class is predicted, 0 elsewhere.
        names: label value -> class name (background omitted).
        offset: 0 when channel 0 is the background (value = channel), else 1.
        regions: the targets' regions, per class: ``cls -> [*S]`` int32, ``t + 1`` on target ``t``'s region, 0
            elsewhere (a class's regions never overlap; regions of different classes may).
    """

    label_map: np.ndarray
    names: dict[int, str]
    offset: int = 0
    regions: dict[int, np.ndarray] = field(default_factory=dict)

    def region(self, target: int, cls: int) -> np.ndarray | None:
        """Target ``target``'s region (of class ``cls``) on the network grid, bool ``[*S]``; None when unknown."""
        labels = self.regions.get(cls)
        return None if labels is None else labels == target + 1


def _probabilities(dense: Tensor, activation: str) -> Tensor:
    """``[B, C, *S]`` float32 probabilities of raw scores ``dense``: softmax over channels or sigmoid."""
    d = dense.detach().float()
    return torch.softmax(d, dim=1) if activation == "softmax" else torch.sigmoid(d)


def _predict(probs: Tensor, activation: str, threshold: float, background: int | None,
             labels: Sequence[str]) -> Prediction:
    """The label map of sample 0 of ``probs [B, C, *S]``: softmax -> argmax; sigmoid -> the most probable channel
    at or above ``threshold`` (0 where none is)."""
    offset = 0 if background == 0 else 1
    p = probs[0]
    if activation == "softmax":
        winner = p.argmax(dim=0)
        fg = winner != background if background is not None else torch.ones_like(winner, dtype=torch.bool)
    else:
        q = p.clone()
        if background is not None:
            q[background] = -1.0
        best, winner = q.max(dim=0)
        fg = best >= threshold
    values = torch.where(fg, winner + offset, torch.zeros_like(winner))
    names = {c + offset: str(labels[c]) for c in range(p.shape[0]) if c != background}
    if max(names, default=0) > 255:
        raise InputError(f"a segmentation with {p.shape[0]} channels does not fit a uint8 label map")
    return Prediction(values.to(torch.uint8).cpu().numpy(), names, offset)


class RecordingTargets:
    """:class:`~medcam3d.targets.SegmentationRegions` that keep, on each bind, the prediction and the targets'
    mean probabilities (a :class:`~medcam3d.targets.Targets`; give it to the explainer as ``targets=``).

    Args:
        settings: the config's targets (:meth:`medcam3d.config.Config.target_settings`).
        labels: the output channels' names (the config's labels).
        activation: ``"softmax"`` or ``"sigmoid"`` (the config's ``probability``).
        threshold: the sigmoid threshold.
        reader: ``output -> [B, C, *S]`` dense raw scores (checked against the labels by the caller).
        mask: ``[*S]`` region on the network grid (a ``--target-mask``) instead of the predicted regions.
    """

    def __init__(self, settings: TargetSettings, labels: Sequence[str], activation: str, threshold: float,
                 reader: Callable[[Any], Tensor], mask: Tensor | None = None) -> None:
        self.settings, self.labels = settings, list(labels)
        self.activation, self.threshold, self.reader = activation, float(threshold), reader
        self.classes = settings.explained(len(self.labels))
        region: str | Tensor = mask if mask is not None else settings.region
        self.regions = SegmentationRegions(self.classes, region, reduce=settings.reduce, activation=activation,
                                           threshold=threshold, max_targets=settings.max_targets, reader=reader,
                                           min_voxels=settings.min_voxels)
        self.masked = mask is not None
        self.prediction: Prediction | None = None
        self.region_probabilities: np.ndarray = np.zeros(0)

    def bind(self, output: Any, labels: Sequence[str] | None) -> BoundTargets:
        """Record the prediction, then bind the regions (:class:`EmptySegmentation` when nothing is predicted)."""
        dense = self.reader(output)
        probs = _probabilities(dense, self.activation)
        self.prediction = _predict(probs, self.activation, self.threshold, self.settings.background, self.labels)
        self.region_probabilities = np.zeros(0)
        if not self.masked and not self._any_predicted(probs, dense):
            names = ", ".join(self.labels[c] for c in self.classes)
            raise EmptySegmentation(f"the model predicts none of the explained classes ({names}) anywhere in this "
                                    "scan: the segmentation is empty and nothing was explained")
        try:
            bound = self.regions.bind(output, labels)
        except NoRegions as e:  # every predicted region is smaller than min_voxels: as empty as no prediction
            if self.masked:
                raise
            raise EmptySegmentation(f"no predicted region of the explained classes has min_voxels="
                                    f"{self.settings.min_voxels} voxels or more: nothing was explained "
                                    f"({str(e).removeprefix('targets: no region left to explain ')})") from None
        self.region_probabilities = _mean_probabilities(bound, probs, self.settings.reduce)
        if isinstance(bound.score, RegionScores):  # the regions, to outline them in the montages
            spatial = tuple(dense.shape[2:])
            self.prediction.regions = {c: m[0].reshape(spatial).to(torch.int32).cpu().numpy()
                                       for c, m in bound.score.label_maps.items()}
        return bound

    def _any_predicted(self, probs: Tensor, dense: Tensor) -> bool:
        """Whether sample 0 predicts a voxel of an explained class (as :class:`SegmentationRegions` predicts)."""
        if self.activation == "softmax":
            winner = dense[0].argmax(dim=0)
            return any(bool((winner == c).any()) for c in self.classes)
        return any(bool((probs[0, c] >= self.threshold).any()) for c in self.classes)


def _mean_probabilities(bound: BoundTargets, probs: Tensor, reduce: str) -> np.ndarray:
    """``[T]``: each target's mean probability of its class over its region in sample 0 (NaN for an invalid
    entry): the bound region scores read on the probabilities, divided by the voxel count for sums."""
    exact = probs.to(torch.float64) if probs.device.type != "mps" else probs  # MPS has no float64
    with torch.no_grad():
        reduced = bound(exact)[0].double().cpu().numpy()
    out = np.full(len(bound.infos), np.nan)
    for t, info in enumerate(bound.sample_infos[0] if bound.sample_infos else bound.infos):
        if info is not None and info.voxels:
            out[t] = reduced[t] / info.voxels if reduce == "sum" else reduced[t]
    return out


def expand_class_tokens(spec: Sequence[str | int] | None, infos: Sequence[TargetInfo],
                        class_labels: Sequence[str]) -> list[str | int] | None:
    """``--classes`` for targets: a token naming a class label (``mass``) stands for every target of that class
    (its index); other tokens (target names, indices, ``all``, ``top-K``, ``positive``) are kept."""
    if spec is None:
        return None
    out: list[str | int] = []
    for tok in spec:
        t = str(tok).strip()
        if t in class_labels and t not in {i.name for i in infos}:
            cls = list(class_labels).index(t)
            out += [k for k, i in enumerate(infos) if i.cls == cls]
        else:
            out.append(tok)
    return out


# ------------------------------------------------------------------------------------------------------------
# The label map on the scan's grid
# ------------------------------------------------------------------------------------------------------------


def labels_on_scan(label_map: np.ndarray, grid: Any, scan_affine: Any, scan_shape: Sequence[int],
                   invert: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The network-grid label map ``[S, H, W]`` on the scan's grid ``[I, J, K]`` (uint8), nearest neighbour: each
    scan voxel takes the value of the grid voxel nearest to it (0 outside the grid).

    When the preprocessing is purely affine-geometric (:func:`medcam3d.onscan.affine_reason`), that is exact index
    arithmetic through the grid's affine; otherwise ``invert`` (the preprocessing's linear inverse,
    ``[K, *grid] -> [K, *scan]``) is applied to each value's one-hot mask and the largest wins (0 on ties with
    the background)."""
    shape = tuple(int(n) for n in scan_shape)
    if affine_reason(grid, scan_affine, shape) is None:
        to_grid = np.linalg.inv(np.asarray(grid.affine, dtype=np.float64)) @ np.asarray(scan_affine, np.float64)
        return _nearest(label_map, to_grid, shape)
    if invert is None:
        raise ValueError("the preprocessing is not affine: labels_on_scan needs invert=")
    values = [v for v in np.unique(label_map).tolist() if v != 0]
    onehot = np.stack([label_map == v for v in [0, *values]]).astype(np.float32)
    inv = invert(onehot)  # [1 + V, *scan]
    pick = inv.argmax(axis=0)
    return np.asarray([0, *values], dtype=np.uint8)[pick]


def _nearest(label_map: np.ndarray, to_grid: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``label_map`` sampled at the grid voxel nearest ``to_grid @ (i, j, k, 1)`` of each scan voxel."""
    m = to_grid[:3]
    lin = m[:, :3]
    if np.count_nonzero(np.abs(lin) > 1e-9) == 3 and sorted(np.argmax(np.abs(lin), axis=1).tolist()) == [0, 1, 2]:
        return _nearest_separable(label_map, m, shape)
    out = np.zeros(shape, dtype=np.uint8)
    step = max(1, _SLAB_VOXELS // (shape[0] * shape[1]))
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for k0 in range(0, shape[2], step):
        k = np.arange(k0, min(shape[2], k0 + step))
        g = [np.floor(m[d, 0] * i[..., None] + m[d, 1] * j[..., None] + m[d, 2] * k + m[d, 3] + 0.5).astype(np.int64)
             for d in range(3)]
        inside = np.ones(g[0].shape, dtype=bool)
        for d in range(3):
            inside &= (g[d] >= 0) & (g[d] < label_map.shape[d])
        vals = np.zeros(g[0].shape, dtype=np.uint8)
        vals[inside] = label_map[g[0][inside], g[1][inside], g[2][inside]]
        out[:, :, k0:k0 + len(k)] = vals
    return out


def _nearest_separable(label_map: np.ndarray, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """:func:`_nearest` when each grid axis moves with one scan axis (no obliquity): one index vector per axis."""
    axis_of = np.argmax(np.abs(m[:, :3]), axis=1)  # grid axis d moves with scan axis axis_of[d]
    index: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * 3
    valid: list[np.ndarray] = [np.zeros(0, dtype=bool)] * 3
    for d in range(3):
        a = int(axis_of[d])
        g = np.floor(m[d, a] * np.arange(shape[a]) + m[d, 3] + 0.5).astype(np.int64)
        index[a] = np.clip(g, 0, label_map.shape[d] - 1)
        valid[a] = (g >= 0) & (g < label_map.shape[d])
    order = [int(np.where(axis_of == a)[0][0]) for a in range(3)]  # the grid axis read along scan axis a
    moved = np.transpose(label_map, order)  # axes in scan order
    out = moved[np.ix_(index[0], index[1], index[2])]
    inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    return np.where(inside, out, 0).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------------------


@dataclass
class TargetPlaces:
    """Where a target lies: its centroid in RAS mm and at the scan voxel nearest it (montages cut there)."""

    world: dict[int, list[float]] = field(default_factory=dict)
    scan_index: dict[int, tuple[int, int, int]] = field(default_factory=dict)


def target_places(infos: Sequence[TargetInfo | None], grid_affine: np.ndarray, scan_affine: np.ndarray,
                  scan_shape: Sequence[int]) -> TargetPlaces:
    """Each target's centroid (network-grid indices) in RAS mm and as the nearest scan voxel (clipped into the
    scan)."""
    places = TargetPlaces()
    to_scan = np.linalg.inv(np.asarray(scan_affine, dtype=np.float64))
    for t, info in enumerate(infos):
        world = info.centroid_mm(grid_affine) if info is not None else None
        if world is None or len(world) != 3:
            continue
        places.world[t] = [float(v) for v in world]
        ijk = np.floor((to_scan @ np.array([*world, 1.0]))[:3] + 0.5).astype(int)
        i, j, k = (int(np.clip(v, 0, int(n) - 1)) for v, n in zip(ijk, scan_shape))
        places.scan_index[t] = (i, j, k)
    return places


def target_records(exp: Explanation, indices: Sequence[int], places: TargetPlaces,
                   class_labels: Sequence[str]) -> list[TargetRecord]:
    """One :class:`~medcam3d.outputs.TargetRecord` per target index in ``indices`` (sample 0 of ``exp``)."""
    infos = exp.sample_targets[0] if exp.sample_targets else exp.targets or []
    scores = exp.scores[0].detach().cpu().double().numpy()
    out = []
    for t in indices:
        info = infos[t]
        assert info is not None  # a batch of one has every target valid
        out.append(TargetRecord(
            index=t, name=info.name, cls=info.cls,
            label=str(class_labels[info.cls]) if info.cls < len(class_labels) else f"class_{info.cls}",
            region=info.region, component=info.component, voxels=info.voxels,
            centroid_mm=[round(v, 4) for v in places.world[t]] if t in places.world else None,
            score=float(scores[t])))
    return out
