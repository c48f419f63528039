"""MetaTensors out: explanation maps that carry what MONAI needs to bring them back to the scan.

When the explained input is a MONAI ``MetaTensor`` the :class:`~medcam3d.Explainer` keeps a :class:`MetaOut`
on the explanation (imported only then: the core never imports MONAI, docs/architecture.md), and

* maps on the input grid (``exp.heatmap(...)``, ``exp.iter_heatmaps(...)``) become MetaTensors with the input's
  meta and ``applied_operations``, batched like it, so that ``Invertd`` undoes the preprocessing and
  ``SaveImaged`` writes them on the scan's grid;
* maps on the feature grid (``exp.raw[...]``, ``heatmap(upsample=False)``) become MetaTensors carrying only their
  own world affine, ``A_input @ index_affine`` of the placement (:meth:`medcam3d.geometry.MapGeometry.index_affine`),
  and no transform history (they are not on any grid the preprocessing produced).
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from monai.data import MetaTensor
from torch import Tensor

__all__ = ["MetaOut"]


class MetaOut:
    """What an explanation keeps of a MetaTensor input ``[B, C, *spatial]``: its meta dict, transform history,
    batch flag and affine (``[4, 4]``, or ``[B, 4, 4]`` for a collated batch)."""

    def __init__(self, meta: dict[str, Any], operations: list[Any], is_batch: bool, affine: Tensor) -> None:
        self.meta = meta
        self.operations = operations
        self.is_batch = is_batch
        self.affine = affine

    @classmethod
    def of(cls, x: MetaTensor) -> MetaOut:
        """Copy what is needed from the input (deep copies: later edits of ``x`` do not leak in)."""
        return cls(deepcopy(dict(x.meta)), deepcopy(x.applied_operations), bool(x.is_batch),
                   torch.as_tensor(x.affine).detach().clone())

    def input_grid(self, maps: Tensor) -> MetaTensor:
        """``maps`` ``[B, K, *spatial]`` on the input grid, with the input's meta and transform history."""
        out = MetaTensor(maps)
        # set, not passed to the constructor: a collated batch's meta holds per-sample values the constructor
        # would try to read as one (e.g. original_channel_dim)
        out.meta = deepcopy(self.meta)
        out.applied_operations = deepcopy(self.operations)
        out.is_batch = self.is_batch
        return out

    def feature_grid(self, maps: Tensor, index_affine: Tensor) -> MetaTensor:
        """``maps`` ``[B, K, *map_spatial]`` with the world affine ``A_input @ index_affine`` (``index_affine``
        ``[D+1, D+1]``: cell index -> input voxel index) and no transform history."""
        affine = self.affine.to(torch.float64)
        n = affine.shape[-1]
        d = index_affine.shape[0] - 1
        step = torch.eye(n, dtype=torch.float64)
        step[:d, :d] = index_affine[:d, :d]
        step[:d, n - 1] = index_affine[:d, d]
        out = MetaTensor(maps, affine=affine @ step)
        out.is_batch = self.is_batch
        return out
