"""Scan -> network grid with MONAI transforms, and maps on the network grid -> back onto the scan.

:class:`Preprocessor` applies a config's transforms (see :mod:`medcam3d.config`) to a channel-first RAS
``MetaTensor [1, I, J, K]`` made from a :class:`~medcam3d.io.Volume`. MONAI records every applied transform in the
output's ``applied_operations``; :meth:`Preprocessor.invert` replays them backwards (``Compose.inverse``, the machinery
behind MONAI's ``Invertd``) on maps: undo crop/pad, resample back from the network spacing, undo the reorientation.
Intensity transforms have no inverse and are skipped (maps are not intensities). Resampling in the inverse is
always linear (``bilinear`` = trilinear in 3-D, zeros outside the network grid, computed in float32), whatever mode
the forward pass used, so continuous maps stay continuous. The result is ``[K, *source_shape]`` float32 on exactly the
source grid (its affine is checked against the source's).

:meth:`Preprocessor.preprocess_labels` takes label maps (organ masks) to the network grid with nearest-neighbour
interpolation: the same geometric transforms with ``mode="nearest"`` (intensity transforms skipped), or, given
``like=`` (a preprocessed scan), a direct nearest-neighbour resampling onto that scan's network grid.

Size checks: with ``min_size`` (config key), the scan, once reoriented and resampled, must cover at least that many
network-grid voxels along (S, H, W) before any crop/pad; otherwise :class:`InputError` names the scan file. Before
each spatial transform runs, the grid it would produce is computed without allocating it (MONAI's lazy mode,
``peek_pending_shape``) and checked against ``max_voxels`` and the memory budget
(:func:`medcam3d.io.limits.check_voxels`): a scan with absurd voxel sizes is refused by arithmetic, not by a failed
13 TB allocation inside ``Spacing``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch

from .config import Config, instantiate_transform
from .errors import InputError
from .io.limits import check_voxels, resolve_max_voxels
from .io.volume import Volume, check_min_size

__all__ = ["Preprocessor"]

_CROPPAD_MODULE = "monai.transforms.croppad.array"
_SPATIAL_MODULE = "monai.transforms.spatial.array"
# recorded operation class -> interpolation mode to use when inverting a continuous map
_LINEAR_INVERSE = {
    "SpatialResample": {"mode": "bilinear", "padding_mode": "zeros", "dtype": "float32"},
    "Affine": {"mode": "bilinear", "padding_mode": "zeros"},
    "Rotate": {"mode": "bilinear", "padding_mode": "zeros"},
    "Resize": {"mode": "trilinear"},
    "Zoom": {"mode": "trilinear"},
}


# spatial transforms whose padding_mode is grid_sample's ("zeros" | "border" | "reflection")
_GRID_SAMPLERS = {"Spacing", "SpatialResample", "ResampleToMatch", "Affine", "Rotate", "Resample"}
#: working set per output voxel of a resampling step, in units of its compute dtype's size: the sampling grid
#: (3 coordinates) and the output; plus the float32 result
_GRID_ITEMS_PER_VOXEL = 4
_FLOAT32_BYTES = 4


def _is_croppad(t: Any) -> bool:
    return type(t).__module__ == _CROPPAD_MODULE


class Preprocessor:
    """MONAI preprocessing from a list of transform specs, with inversion for maps.

    Args:
        transforms_spec: ``[{_target_: Orientation, axcodes: SPL}, ...]`` (see :mod:`medcam3d.config`).
        input_size: expected network grid (S, H, W); the output is checked against it.
        min_size: minimum coverage in network-grid voxels before crop/pad (see the module docstring).
        where: what to name in config errors (the config file).
        max_voxels: the largest grid any transform may produce (default
            :data:`~medcam3d.io.limits.DEFAULT_MAX_VOXELS`).
    """

    def __init__(
        self,
        transforms_spec: Sequence[Mapping[str, Any]],
        *,
        input_size: Sequence[int] | None = None,
        min_size: Sequence[int] | None = None,
        where: str | None = None,
        max_voxels: int | None = None,
    ) -> None:
        from monai.transforms import Compose  # lazy: MONAI takes seconds to import (as in medcam3d.config)

        self.where = where or "<preprocessing>"
        self.specs = [dict(s) for s in transforms_spec]
        if not self.specs:
            raise InputError("preprocessing has no transforms", self.where)
        self.transforms = [
            instantiate_transform(s, self.where, f"preprocessing[{i}]: ") for i, s in enumerate(self.specs)
        ]
        self.input_size = tuple(int(v) for v in input_size) if input_size is not None else None
        self.min_size = tuple(int(v) for v in min_size) if min_size is not None else None
        self.max_voxels = resolve_max_voxels(max_voxels)
        self._compose = Compose(self.transforms, lazy=False)
        self._label_transforms: list[Any] | None = None

    @classmethod
    def from_config(cls, cfg: Config, max_voxels: int | None = None) -> Preprocessor:
        """The preprocessing of a :class:`~medcam3d.config.Config` (``max_voxels``: see the class)."""
        return cls(cfg.preprocessing, input_size=cfg.input_size, min_size=cfg.min_size, where=cfg.where,
                   max_voxels=max_voxels)

    # forward ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _as_metatensor(volume: Any) -> tuple[Any, str]:
        from monai.data import MetaTensor  # lazy: MONAI takes seconds to import

        if isinstance(volume, Volume):
            return volume.to_metatensor(), volume.source
        if isinstance(volume, MetaTensor):
            v = Volume.from_metatensor(volume)  # validates, converts LPS to RAS
            return v.to_metatensor(), v.source
        raise InputError(f"expected a medcam3d.io.Volume or a MONAI MetaTensor, got {type(volume).__name__}")

    def __call__(self, volume: Volume | Any) -> Any:
        """Preprocess a scan.

        Args:
            volume: a :class:`Volume` or a MetaTensor ``[1, I, J, K]`` / ``[I, J, K]`` with an affine.

        Returns:
            MetaTensor ``[1, S, H, W]`` float32 on the network grid; ``.affine`` maps grid indices to RAS mm and
            ``.applied_operations`` records what :meth:`invert` undoes.
        """
        x, source = self._as_metatensor(volume)
        checked = False
        with torch.no_grad():
            for i, t in enumerate(self.transforms):
                if not checked and _is_croppad(t):
                    check_min_size(x, self.min_size, source)
                    checked = True
                x = self._apply(i, t, x, source)
        if not checked:
            check_min_size(x, self.min_size, source)
        if not hasattr(x, "applied_operations") or x.ndim != 4 or x.shape[0] != 1:
            raise InputError(f"preprocessing produced {type(x).__name__} of shape {tuple(x.shape)}; expected a "
                             "MetaTensor [1, S, H, W]", self.where)
        if self.input_size is not None and tuple(x.shape[1:]) != self.input_size:
            raise InputError(f"preprocessing produced a {tuple(x.shape[1:])} grid but input_size is "
                             f"{self.input_size}", self.where)
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        return x

    def _check_grid(self, i: int, t: Any, x: Any, source: str) -> None:
        """Refuse, before transform ``i`` allocates it, a grid beyond ``max_voxels`` or the memory budget."""
        from monai.transforms.traits import LazyTrait  # lazy: MONAI takes seconds to import

        if not isinstance(t, LazyTrait) or not hasattr(x, "peek_pending_shape"):
            return
        try:
            peek = cast(Any, t)(x, lazy=True)  # geometry only: no voxel is computed
            shape = tuple(int(v) for v in peek.peek_pending_shape())
        except Exception:  # noqa: BLE001 - if the shape cannot be foreseen, the transform itself will say why
            return
        compute = getattr(getattr(t, "sp_resample", t), "dtype", None)
        per_voxel = _GRID_ITEMS_PER_VOXEL * _itemsize(compute) + _FLOAT32_BYTES
        spacing = ", ".join(f"{v:.4g}" for v in np.linalg.norm(np.asarray(x.affine, dtype=np.float64)[:3, :3],
                                                               axis=0))
        have = " x ".join(str(int(v)) for v in x.shape[1:])
        check_voxels(shape, per_voxel, source, max_voxels=self.max_voxels,
                     claim=f"preprocessing[{i}] ({type(t).__name__}) would turn this {have} scan with ({spacing}) mm "
                           "voxels into")

    def _apply(self, i: int, t: Any, x: Any, source: str) -> Any:
        """Apply transform ``i``; a failure is a config problem (the volume was validated): name both."""
        self._check_grid(i, t, x, source)
        try:
            return t(x)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001
            msg = " ".join(str(e).split())[:200]
            raise InputError(f"preprocessing[{i}] ({type(t).__name__}) failed on {source}: {type(e).__name__}: "
                             f"{msg}", self.where) from None

    # inverse ----------------------------------------------------------------------------------------------------
    def invert(self, maps: Any, reference: Any, *, chunk: int = 4) -> np.ndarray:
        """Map continuous maps on the network grid back onto the original scan grid (linear interpolation).

        Args:
            maps: ``[*grid]`` or ``[K, *grid]`` numpy array or tensor on the grid of ``reference``.
            reference: the MetaTensor this Preprocessor returned for the scan.
            chunk: classes inverted at a time (bounds memory on full-size CT).

        Returns:
            float32 ``[K, *source_shape]``, aligned with the source Volume's affine.
        """
        from monai.data import MetaTensor  # lazy: MONAI takes seconds to import

        ops = getattr(reference, "applied_operations", None)
        if not isinstance(reference, MetaTensor) or ops is None:
            raise InputError("reference must be the MetaTensor returned by Preprocessor(...)")
        m = maps.detach().cpu() if isinstance(maps, torch.Tensor) else torch.from_numpy(np.asarray(maps))
        m = m.to(torch.float32)
        grid = tuple(reference.shape[1:])
        if m.ndim == len(grid):
            m = m[None]
        if m.ndim != len(grid) + 1 or tuple(m.shape[1:]) != grid:
            raise InputError(f"maps have shape {tuple(m.shape)}; expected [K, {', '.join(map(str, grid))}] "
                             "(the network grid of the reference)")
        linear_ops = [_linear_op(op) for op in ops]
        src_affine = reference.meta.get("original_affine")
        src_shape = reference.meta.get("spatial_shape")
        src_affine = None if src_affine is None else np.asarray(src_affine, dtype=np.float64)
        src_shape = None if src_shape is None else tuple(int(s) for s in np.asarray(src_shape).tolist())
        out = []
        for k0 in range(0, m.shape[0], max(1, int(chunk))):
            part = MetaTensor(m[k0:k0 + chunk].contiguous(), affine=reference.affine.clone(),
                              meta=copy.deepcopy({k: v for k, v in reference.meta.items() if k != "affine"}))
            part.applied_operations = copy.deepcopy(linear_ops)
            try:
                with torch.no_grad():
                    inv = self._compose.inverse(part)
            except RuntimeError as e:
                raise InputError(f"cannot invert: the reference was not produced by this Preprocessor ({e})") \
                    from None
            ok_shape = src_shape is None or tuple(inv.shape[1:]) == src_shape
            ok_affine = src_affine is None or np.allclose(np.asarray(inv.affine, dtype=np.float64), src_affine,
                                                          atol=1e-4)
            if not (ok_shape and ok_affine):  # MONAI's inverse did not land on the source grid: a bug, not input
                raise RuntimeError(
                    f"inverse preprocessing ended on grid {tuple(inv.shape[1:])} with affine "
                    f"{np.asarray(inv.affine).round(4).tolist()}, not the source grid {src_shape} with affine "
                    f"{None if src_affine is None else src_affine.round(4).tolist()}"
                )
            out.append(np.asarray(inv.detach().cpu().numpy(), dtype=np.float32))
        return np.concatenate(out, axis=0)

    # labels -----------------------------------------------------------------------------------------------------
    def _labels_pipeline(self) -> list[Any]:
        if self._label_transforms is None:
            ts = []
            for i, spec in enumerate(self.specs):
                t = self.transforms[i]
                module = type(t).__module__
                if module == _SPATIAL_MODULE:
                    overrides = {"mode": "nearest"}
                    if type(t).__name__ in _GRID_SAMPLERS:  # their padding_mode is grid_sample's: zeros outside
                        overrides["padding_mode"] = "zeros"
                    ts.append(instantiate_transform(spec, self.where, f"preprocessing[{i}]: ", overrides=overrides))
                elif module == _CROPPAD_MODULE:
                    ts.append(instantiate_transform(spec, self.where, f"preprocessing[{i}]: "))
            self._label_transforms = ts
        return self._label_transforms

    def preprocess_labels(self, label_volume: Volume | Any, like: Any = None) -> Any:
        """Label map (integer-valued organ/lesion masks) -> network grid, nearest neighbour.

        Args:
            label_volume: a :class:`Volume` or MetaTensor of labels (any geometry).
            like: optional preprocessed scan (the MetaTensor returned by ``self(scan)``); the labels are then
                resampled onto exactly its grid (use this when the label volume's grid differs from the scan's or
                the pipeline has data-dependent crops).

        Returns:
            MetaTensor ``[1, S, H, W]`` float32 holding the label values, with the network grid's affine.
        """
        from monai.transforms import SpatialResample  # lazy: MONAI takes seconds to import

        x, source = self._as_metatensor(label_volume)
        with torch.no_grad():
            if like is not None:
                if not hasattr(like, "affine") or like.ndim != 4:
                    raise InputError("like must be a preprocessed scan: MetaTensor [1, S, H, W]")
                # MONAI accepts torch dtypes here too (its annotation names numpy's only)
                x = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float64)(  # type: ignore[arg-type]
                    x, dst_affine=like.affine, spatial_size=tuple(like.shape[1:]))
            else:
                for i, t in enumerate(self._labels_pipeline()):
                    x = self._apply(i, t, x, source)
        return x.to(torch.float32)


def _itemsize(dtype: Any) -> int:
    """Bytes per value of a transform's compute dtype (numpy, torch or a name); MONAI's default is float64."""
    if dtype is None:
        return 8
    try:
        return int(np.dtype(str(dtype).removeprefix("torch.")).itemsize)
    except TypeError:
        return 8


def _linear_op(op: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a recorded MONAI operation whose inverse resamples linearly (zeros outside)."""
    new = dict(op)
    cls = op.get("class")
    if cls in _LINEAR_INVERSE and isinstance(op.get("extra_info"), Mapping):
        extra = dict(op["extra_info"])
        for k, v in _LINEAR_INVERSE[cls].items():
            if k in extra:
                extra[k] = v
        new["extra_info"] = extra
    return new
