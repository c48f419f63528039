"""Where the model looks: the share of positive HiResCAM / Grad-CAM contribution inside each organ.

Computed at feature resolution, on the signed raw maps (the currency between layers):

1. the organ label map is brought onto the network grid with nearest neighbour
   (:meth:`medcam3d.preprocess.Preprocessor.preprocess_labels` with ``like=`` the preprocessed scan);
2. for every map voxel, the fraction of its block of network-grid voxels that lies in each organ
   (``adaptive_avg_pool3d`` of each organ's indicator: exact block fractions when the grid is a whole multiple of
   the map, as for AxialNet's 3 x 16 x 16 blocks; overlapping near-equal windows otherwise);
3. ``share[k, o] = sum(relu(raw[k]) * frac[o]) / sum(relu(raw[k]))``.

Organs are named by ``codes`` (name -> label value; default :data:`medcam3d.data.ORGAN_CODES`, the phantoms'); every
other value (0 = outside the body, padding outside the scan, unnamed codes) counts as ``"unlabelled"``, so the
shares of a class sum to 1. A class with no positive contribution has no shares (None).

Allowed regions (the AxialNet paper's idea: a lung finding should rest on the lungs): with the config's
``allowed_regions`` (label -> organ names), ``outside_allowed[k] = 1 - sum of share[k, o] over allowed o``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..geometry import MapGeometry, block_fractions

__all__ = ["UNLABELLED", "organ_fractions", "organ_shares", "shares_record"]

UNLABELLED = "unlabelled"


def organ_fractions(labels: torch.Tensor | np.ndarray, map_shape: Sequence[int],
                    codes: Mapping[str, int], geometry: MapGeometry | None = None) -> tuple[list[str], torch.Tensor]:
    """Per map voxel, the fraction of its block in each organ.

    Args:
        labels: ``[S, H, W]`` integer-valued label map on the network grid.
        map_shape: the raw maps' spatial size ``(s, h, w)``.
        codes: organ name -> label value.
        geometry: with a ``"receptive"`` geometry a map voxel's block is the network-grid voxels nearest its
            receptive-field centre (:func:`medcam3d.geometry.cell_fractions`); default the even blocks above.

    Returns:
        (names, fractions): ``names`` = the organs in ``codes`` order, then ``"unlabelled"``; ``fractions`` float64
        ``[len(names), s, h, w]``, summing to 1 over the first axis.
    """
    lab = torch.as_tensor(np.asarray(labels)).round().to(torch.int64)
    if lab.ndim != 3 or len(map_shape) != 3:
        raise ValueError(f"labels must be [S, H, W] and map_shape 3-D, got {tuple(lab.shape)} and {tuple(map_shape)}")
    names = list(codes)
    out = []
    covered = torch.zeros((), dtype=torch.float64)
    for name in names:
        out.append(block_fractions(lab == int(codes[name]), map_shape, geometry))
        covered = covered + out[-1]
    out.append((1.0 - covered).clamp_min(0.0))
    return names + [UNLABELLED], torch.stack(out)


def organ_shares(raw: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """``share[k, o] = Σ relu(raw[k])·frac[o] / Σ relu(raw[k])``.

    Args:
        raw: ``[K, s, h, w]`` signed maps at feature resolution.
        fractions: ``[O, s, h, w]`` from :func:`organ_fractions`.

    Returns:
        float64 ``[K, O]``; rows of classes without positive contribution are NaN.
    """
    pos = raw.detach().to(torch.float64).clamp_min(0.0).flatten(1)  # [K, V]
    frac = fractions.to(torch.float64).flatten(1)  # [O, V]
    total = pos.sum(1, keepdim=True)
    inside = pos @ frac.T  # [K, O]
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.full_like(inside, float("nan")))


def _r(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 6)


def shares_record(raw: Mapping[str, torch.Tensor], classes: Sequence[int], labels: Sequence[str],
                  names: list[str], fractions: torch.Tensor,
                  allowed_regions: Mapping[str, Sequence[str]] | None) -> dict[str, Any]:
    """The ``organ_shares`` entry of a scan's summary.json.

    Args:
        raw: method -> ``[K, s, h, w]`` signed maps of the explained classes (order of ``classes``).
        classes: the K explained class indices; ``labels`` all class names.

    Returns:
        ``{"organs": names, "methods": [...], "classes": {label: {"<method>": {organ: share}, "allowed": [...],
        "outside_allowed": {"<method>": fraction}}}}`` with None where a class has no positive contribution.
    """
    allowed_regions = allowed_regions or {}
    per_method = {m: organ_shares(r, fractions).numpy() for m, r in raw.items()}
    out: dict[str, Any] = {}
    for k, c in enumerate(classes):
        label = labels[c]
        entry: dict[str, Any] = {}
        allowed = [o for o in allowed_regions.get(label, []) if o in names]
        for m, sh in per_method.items():
            row = sh[k]
            entry[m] = {o: _r(v) for o, v in zip(names, row)}
        if label in allowed_regions:
            entry["allowed"] = list(allowed_regions[label])
            entry["outside_allowed"] = {}
            for m, sh in per_method.items():
                row = sh[k]
                inside = sum(row[names.index(o)] for o in allowed)
                entry["outside_allowed"][m] = _r(1.0 - inside) if np.isfinite(row).all() else None
        out[label] = entry
    return {"organs": names, "methods": list(raw), "classes": out}
