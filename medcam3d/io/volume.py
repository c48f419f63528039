"""The one volume type of medcam3d: a 3-D array that carries its geometry.

A :class:`Volume` is ``array`` (float32, in the file's own index order), ``affine`` (float64 4x4 mapping array
indices ``(i, j, k, 1)`` to RAS millimetres, the nibabel convention), a ``source`` description and a small ``meta``
dict (format, modality, series UID, ... never patient identifiers). The affine travels with the array everywhere
(TorchIO spirit): preprocessing, inversion and export all read it from here.

ITK, SimpleITK, DICOM and NRRD describe space in LPS; :func:`itk_to_affine` and :func:`affine_to_itk` are the only
places where LPS is turned into RAS (negate the first two world axes) and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np
import torch

from ..errors import InputError

__all__ = [
    "LPS_TO_RAS",
    "Volume",
    "affine_to_itk",
    "check_min_size",
    "itk_to_affine",
    "spacing_from_affine",
    "validate_affine",
]

#: diag(-1, -1, 1, 1): turns LPS world coordinates into RAS (and back: it is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def spacing_from_affine(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size in mm along each array axis: the lengths of the affine's first three columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))


def validate_affine(affine: Any, where: str | PathLike[str] | None) -> np.ndarray:
    """Return ``affine`` as a float64 4x4 array, or raise :class:`InputError` naming ``where`` when it is not a
    finite, invertible 4x4 matrix with last row ``(0, 0, 0, 1)`` and positive voxel sizes."""
    try:
        a = np.array(affine, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"affine is not a numeric 4x4 matrix ({e})", where) from None
    if a.shape != (4, 4):
        raise InputError(f"affine has shape {a.shape}; expected 4x4", where)
    if not np.isfinite(a).all():
        raise InputError("affine contains NaN or Inf", where)
    if not np.allclose(a[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(f"affine's last row is {a[3].tolist()}; expected [0, 0, 0, 1]", where)
    sp = spacing_from_affine(a)
    if min(sp) <= 0.0:
        raise InputError(f"zero voxel spacing {_fmt(sp)} mm (singular affine)", where)
    # scale-free test: |det| of the direction cosines (columns normalised) is 1 for orthogonal axes, 0 if degenerate
    cos = a[:3, :3] / np.asarray(sp)
    if abs(np.linalg.det(cos)) < 1e-6:
        raise InputError("singular affine: its voxel axes are (nearly) parallel", where)
    return a


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


@dataclass
class Volume:
    """A 3-D scan (or map) with its geometry.

    Attributes:
        array: ``[I, J, K]`` float32 voxels in the file's own index order (not reoriented).
        affine: float64 4x4, array index ``(i, j, k, 1)`` -> RAS mm.
        source: where it came from (a path or a description); used in error messages.
        meta: small, identifier-free facts (``format``, ``modality``, ``series_uid``, ...).

    Construction validates: 3-D, finite voxels, finite invertible affine (:class:`InputError` naming ``source``).
    """

    array: np.ndarray
    affine: np.ndarray
    source: str = "<array>"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.source = str(self.source)
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise InputError(f"{arr.ndim}-D array of shape {arr.shape}; a 3-D volume is needed", self.source)
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
            raise InputError(f"unsupported voxel type {arr.dtype}", self.source)
        self.array = arr.astype(np.float32, copy=False)
        self.affine = validate_affine(self.affine, self.source)
        finite = np.isfinite(self.array)
        if not finite.all():
            bad = int(self.array.size - np.count_nonzero(finite))
            raise InputError(f"{bad} voxel(s) are NaN or Inf", self.source)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(I, J, K)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (from the affine)."""
        return spacing_from_affine(self.affine)  # type: ignore[return-value]

    @property
    def axcodes(self) -> str:
        """Orientation code of the array axes, e.g. ``"RAS"`` or ``"LPS"`` (nibabel's aff2axcodes)."""
        import nibabel as nib  # lazy: nibabel loads only when a NIfTI file is read or written

        return "".join(nib.aff2axcodes(self.affine))

    def index_to_world(self, ijk: np.ndarray | Sequence[float]) -> np.ndarray:
        """RAS mm of array indices ``[..., 3]``."""
        p = np.asarray(ijk, dtype=np.float64)
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, xyz: np.ndarray | Sequence[float]) -> np.ndarray:
        """Continuous array indices of RAS points ``[..., 3]``."""
        inv = np.linalg.inv(self.affine)
        p = np.asarray(xyz, dtype=np.float64)
        return p @ inv[:3, :3].T + inv[:3, 3]

    # --- MONAI -------------------------------------------------------------------------------------------------
    def to_metatensor(self) -> Any:
        """MONAI ``MetaTensor`` ``[1, I, J, K]`` (channel first) with this affine (RAS, ``meta["space"] = "RAS"``).

        The source affine and shape are kept in ``meta["original_affine"]`` and ``meta["spatial_shape"]``."""
        from monai.data import MetaTensor  # lazy: MONAI takes seconds to import

        t = torch.from_numpy(np.ascontiguousarray(self.array))[None]
        meta = {
            "filename_or_obj": self.source,
            "space": "RAS",
            "original_affine": self.affine.copy(),
            "spatial_shape": np.asarray(self.shape),
            "original_channel_dim": "no_channel",
        }
        return MetaTensor(t, affine=torch.from_numpy(self.affine.copy()), meta=meta)

    @classmethod
    def from_metatensor(cls, mt: Any, source: str | None = None) -> Volume:
        """A Volume from a MONAI ``MetaTensor`` ``[1, *spatial]`` or ``[*spatial]`` (3 spatial axes).

        An LPS MetaTensor (``meta["space"] == "LPS"``, as MONAI's ITK reader can make) is converted to RAS."""
        arr = mt.detach().cpu().numpy() if hasattr(mt, "detach") else np.asarray(mt)
        meta = dict(getattr(mt, "meta", {}) or {})
        src = source if source is not None else str(meta.get("filename_or_obj", "<MetaTensor>"))
        if arr.ndim == 4:
            if arr.shape[0] != 1:
                raise InputError(f"MetaTensor has {arr.shape[0]} channels; expected 1 ([1, *spatial])", src)
            arr = arr[0]
        affine = getattr(mt, "affine", None)
        if affine is None:
            raise InputError("MetaTensor has no affine", src)
        affine = affine.detach().cpu().numpy() if hasattr(affine, "detach") else np.asarray(affine)
        if str(meta.get("space", "RAS")).upper() == "LPS":
            affine = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
        return cls(arr, affine, src, {"format": "metatensor"})

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return f"Volume(shape={self.shape}, spacing=({sp}) mm, axcodes={self.axcodes}, source={self.source!r})"


def itk_to_affine(
    origin: Sequence[float] | np.ndarray, spacing: Sequence[float] | np.ndarray, direction: Sequence[float] | np.ndarray
) -> np.ndarray:
    """RAS affine of an ITK/SimpleITK 3-D image (LPS origin, spacing, row-major direction cosines).

    ITK maps index ``(i, j, k)`` to LPS ``origin + D @ diag(spacing) @ (i, j, k)``; RAS = diag(-1, -1, 1) @ LPS.
    The index order is ITK's (``i`` fastest), i.e. the transpose of ``sitk.GetArrayFromImage``."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    a = np.eye(4)
    a[:3, :3] = d * np.asarray(spacing, dtype=np.float64)[None, :]
    a[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ a


def affine_to_itk(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(origin, spacing, direction)`` in ITK's LPS convention for a RAS affine (inverse of :func:`itk_to_affine`)."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    sp = np.linalg.norm(lps[:3, :3], axis=0)
    d = lps[:3, :3] / sp[None, :]
    return tuple(lps[:3, 3].tolist()), tuple(sp.tolist()), tuple(d.ravel().tolist())


def check_min_size(volume_or_tensor: Any, min_shape: Sequence[int] | None, path: str | PathLike[str] | None) -> None:
    """Raise :class:`InputError` naming ``path`` if the volume is smaller than ``min_shape`` along any axis.

    Args:
        volume_or_tensor: a :class:`Volume`, a numpy array or a tensor; its last ``len(min_shape)`` axes are compared.
        min_shape: minimum size per spatial axis (``None`` checks nothing).
        path: the file the volume came from (for the message).
    """
    if min_shape is None:
        return
    shape = tuple(int(s) for s in volume_or_tensor.shape)
    need = tuple(int(m) for m in min_shape)
    if len(shape) < len(need):
        raise InputError(f"volume has shape {shape}; expected at least {len(need)} spatial axes", path)
    have = shape[len(shape) - len(need):]
    if any(h < n for h, n in zip(have, need)):
        raise InputError(
            f"volume too small for the model: {'x'.join(map(str, have))} voxels, at least "
            f"{'x'.join(map(str, need))} needed",
            path,
        )
