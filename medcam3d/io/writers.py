"""Write maps so that viewers overlay them on the scan without resampling: NIfTI (nibabel), atomically.

* :func:`write_nifti` -- any 3-D/4-D array with its RAS affine (sform and, when the affine has no shear, qform both
  set with code 1 "scanner", units mm).
* :func:`write_map_like` -- a map on the source grid, float32, with exactly the source volume's affine and shape.
* :func:`nifti_header_bytes` / :class:`ChunkedNifti` -- a large map written as it is computed: the header, then
  chunks of voxel bytes (NIfTI's Fortran order), each compressed in a thread pool into its own gzip member (zlib
  releases the GIL, so members compress in parallel; a multi-member gzip is a valid gzip file that nibabel, ITK and
  ``gunzip`` read whole). Display heatmaps are stored this way as uint8 with ``scl_slope = 1/255``
  (:data:`DISPLAY_SLOPE`): readers that apply the scaling (nibabel's ``get_fdata``/``dataobj``, ITK, napari via
  medcam3d's reader) see values in [0, 1] in steps of 1/255.
* :func:`lowres_affine` / :func:`write_lowres_maps` -- all classes at feature resolution as one 4-D NIfTI
  ``(x, y, z, K)``: the 4th NIfTI axis is the class (``maps[k]`` -> volume ``k``, in the order given, normally the
  model's output order; the label names, when given, are stored as JSON in a NIfTI comment extension). The affine
  places each low-resolution voxel over the block of network-grid voxels it summarises under ``align_corners=False``
  geometry: voxel ``j`` is centred at input index ``(j + 0.5) * f - 0.5`` with ``f = grid / map`` per axis, and is
  ``f`` input voxels wide.

Every write goes to a temporary file in the destination folder and is moved into place with ``os.replace``
(:func:`medcam3d.files.atomic_path`), so a crash never leaves a half-written map and a reader never sees one.
Arguments are validated before anything is created. nibabel is imported only when reading or writing.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..errors import InputError
from ..files import atomic_path  # its home is medcam3d.files; re-exported here for one release
from .volume import Volume, validate_affine

__all__ = [
    "DISPLAY_SLOPE",
    "EXTENSION_CODE",
    "ChunkedNifti",
    "atomic_path",
    "lowres_affine",
    "nifti_header_bytes",
    "read_lowres_labels",
    "write_lowres_maps",
    "write_map_like",
    "write_nifti",
]

#: NIfTI extension code used for medcam3d's JSON comment (6 = NIFTI_ECODE_COMMENT).
EXTENSION_CODE = 6
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: ``scl_slope`` of uint8 display heatmaps: stored value v reads as v / 255
DISPLAY_SLOPE = 1.0 / 255.0
#: zlib level of chunked maps: level 1 is 4-5x faster than the default 6 and, on smooth uint8 maps, about 1.7x larger
GZIP_LEVEL = 1


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _check_nifti_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.name.lower().endswith(_NIFTI_SUFFIXES):
        raise InputError("output file name must end with .nii or .nii.gz", p)
    if p.exists() and p.is_dir():
        raise InputError("output path is a folder", p)
    return p


def _is_orthogonal(affine: np.ndarray) -> bool:
    m = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.allclose(m.T @ m, np.eye(3), atol=1e-6))


def write_nifti(
    array: Any,
    affine: Any,
    path: str | os.PathLike[str],
    dtype: Any = np.float32,
    *,
    description: str | None = None,
    comment: dict[str, Any] | None = None,
) -> Path:
    """Write ``array`` (3-D, or 4-D with the 4th axis as channels/classes) with ``affine`` (index -> RAS mm).

    Args:
        array: numpy array or tensor; must be finite.
        affine: 4x4, array index -> RAS mm.
        path: ``*.nii`` or ``*.nii.gz``.
        dtype: stored voxel type (default float32; no scaling is applied).
        description: up to 79 ASCII characters for the header's ``descrip`` field.
        comment: JSON-serialisable dict stored in a NIfTI comment extension (code 6).

    Returns:
        The written path. Raises :class:`InputError` (before writing anything) on a bad argument.
    """
    import nibabel as nib  # lazy: only writing and reading maps need nibabel

    p = _check_nifti_path(path)
    arr = _to_numpy(array)
    if arr.ndim not in (3, 4):
        raise InputError(f"array to write has shape {arr.shape}; expected 3-D or 4-D", p)
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise InputError(f"array to write has unsupported type {arr.dtype}", p)
    if not np.isfinite(arr).all():
        raise InputError("array to write contains NaN or Inf", p)
    aff = validate_affine(affine, p)
    data = np.asarray(arr, dtype=dtype)
    img = nib.Nifti1Image(data, aff)
    img.set_sform(aff, code=1)
    if _is_orthogonal(aff):
        img.set_qform(aff, code=1)
    else:  # a quaternion cannot hold shear: leave the qform unset so readers use the exact sform
        img.set_qform(None, code=0)
    hdr = img.header
    hdr.set_xyzt_units("mm", "unknown")
    hdr.set_data_dtype(data.dtype)
    if description:
        hdr["descrip"] = description.encode("ascii", "replace")[:79]
    if comment is not None:
        blob = json.dumps(comment).encode("utf-8")
        hdr.extensions.append(nib.nifti1.Nifti1Extension(EXTENSION_CODE, blob))
    with atomic_path(p) as tmp:
        nib.save(img, str(tmp))
    return p


def write_map_like(
    map_on_source_grid: Any,
    source_volume: Volume,
    path: str | os.PathLike[str],
    *,
    description: str | None = None,
) -> Path:
    """Write a map that lives on ``source_volume``'s grid as float32 NIfTI with exactly its affine and shape.

    Args:
        map_on_source_grid: ``[I, J, K]`` (or ``[1, I, J, K]``) numpy/tensor, same shape as the source array.
        source_volume: the scan the map belongs to.
        path: ``*.nii`` or ``*.nii.gz``.
    """
    p = _check_nifti_path(path)
    m = _to_numpy(map_on_source_grid)
    if m.ndim == 4 and m.shape[0] == 1:
        m = m[0]
    if tuple(m.shape) != tuple(source_volume.shape):
        raise InputError(
            f"map has shape {tuple(m.shape)} but the scan {source_volume.source} has {source_volume.shape}; "
            "map it back to the scan grid first (Preprocessor.invert)",
            p,
        )
    return write_nifti(m, source_volume.affine, p, np.float32, description=description)


def lowres_affine(grid_affine: Any, grid_shape: Sequence[int], map_shape: Sequence[int]) -> np.ndarray:
    """Affine of a low-resolution map that summarises blocks of a grid (``align_corners=False`` geometry).

    With ``f = grid_shape / map_shape`` per axis, map voxel ``j`` is centred at grid index ``(j + 0.5) * f - 0.5``
    and is ``f`` grid voxels wide: ``A_map = A_grid @ [[diag(f), (f - 1) / 2], [0, 1]]``.
    """
    a = validate_affine(grid_affine, "grid_affine")
    g = np.asarray(grid_shape, dtype=np.float64)
    m = np.asarray(map_shape, dtype=np.float64)
    if g.shape != (3,) or m.shape != (3,) or (g <= 0).any() or (m <= 0).any():
        raise InputError(f"grid_shape {tuple(grid_shape)} and map_shape {tuple(map_shape)} must be 3 positive sizes")
    f = g / m
    s = np.eye(4)
    s[:3, :3] = np.diag(f)
    s[:3, 3] = (f - 1.0) / 2.0
    return a @ s


def write_lowres_maps(
    maps: Any,
    grid_affine: Any,
    grid_shape: Sequence[int],
    path: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    description: str | None = None,
    map_affine: Any | None = None,
) -> Path:
    """Write all classes' feature-resolution maps as one 4-D NIfTI ``(x, y, z, K)``.

    Args:
        maps: ``[K, *map_shape]`` (3 spatial axes, on the network grid's axes), numpy or tensor.
        grid_affine: the network grid's affine (``Preprocessor`` output ``.affine``: grid index -> RAS mm).
        grid_shape: the network grid's spatial shape ``(S, H, W)``.
        path: ``*.nii`` or ``*.nii.gz``.
        labels: K class names, stored in the order of ``maps`` as JSON ``{"medcam3d": {"axis_3": "class",
            "labels": [...]}}`` in a NIfTI comment extension (read back with :func:`read_lowres_labels`).

        map_affine: the maps' own affine (map index -> RAS mm), e.g. from the cells' receptive-field centres
            (:class:`medcam3d.geometry.MapGeometry`); default :func:`lowres_affine` (the field divided evenly).

    NIfTI volume ``k`` (4th axis) is ``maps[k]``.
    """
    p = _check_nifti_path(path)
    m = _to_numpy(maps)
    if m.ndim != 4:
        raise InputError(f"maps have shape {m.shape}; expected [K, *map_shape] with 3 spatial axes", p)
    if labels is not None and len(labels) != m.shape[0]:
        raise InputError(f"{len(labels)} labels for {m.shape[0]} maps", p)
    if map_affine is None:
        affine = lowres_affine(grid_affine, grid_shape, m.shape[1:])
    else:
        affine = validate_affine(map_affine, "map_affine")
    data = np.moveaxis(m.astype(np.float32, copy=False), 0, -1)  # (x, y, z, K)
    comment = {"medcam3d": {"axis_3": "class", "labels": list(labels) if labels is not None else None,
                            "grid_shape": [int(s) for s in grid_shape]}}
    return write_nifti(data, affine, p, np.float32, description=description, comment=comment)


def read_lowres_labels(path: str | os.PathLike[str]) -> list[str] | None:
    """The class labels stored by :func:`write_lowres_maps` (``None`` if there are none)."""
    import nibabel as nib  # lazy: only writing and reading maps need nibabel

    img = nib.load(str(path))
    header = cast("nib.nifti1.Nifti1Header", img.header)  # NIfTI-1 or -2 (a subclass): both carry extensions
    for ext in header.extensions:
        if ext.get_code() == EXTENSION_CODE:
            try:
                d = json.loads(ext.get_content())
            except (ValueError, TypeError):
                continue
            if isinstance(d, dict) and "medcam3d" in d:
                return d["medcam3d"].get("labels")
    return None


def _header(
    shape: Sequence[int],
    affine: np.ndarray,
    dtype: Any,
    description: str | None,
    comment: dict[str, Any] | None,
) -> Any:
    """A NIfTI-1 header for an array of ``shape`` and ``dtype`` with ``affine``, set as :func:`write_nifti` sets it
    (sform code 1; qform code 1 unless the affine has shear; mm; description; JSON comment extension)."""
    import nibabel as nib  # lazy: only writing and reading maps need nibabel

    # a 1-voxel image sets zooms (pixdim) from the affine as nibabel does for any image
    img = nib.Nifti1Image(np.zeros((1,) * len(shape), dtype=dtype), affine)
    img.set_sform(affine, code=1)
    if _is_orthogonal(affine):
        img.set_qform(affine, code=1)
    else:
        img.set_qform(None, code=0)
    hdr = img.header
    hdr.set_data_shape(tuple(int(s) for s in shape))
    hdr.set_data_dtype(dtype)
    hdr.set_xyzt_units("mm", "unknown")
    if description:
        hdr["descrip"] = description.encode("ascii", "replace")[:79]
    if comment is not None:
        hdr.extensions.append(nib.nifti1.Nifti1Extension(EXTENSION_CODE, json.dumps(comment).encode("utf-8")))
    return hdr


def nifti_header_bytes(
    shape: Sequence[int],
    affine: Any,
    dtype: Any = np.uint8,
    *,
    slope: float | None = None,
    description: str | None = None,
    comment: dict[str, Any] | None = None,
) -> bytes:
    """The bytes of a single-file NIfTI-1 (``.nii``) before its voxel data: the 348-byte header, the extension
    flag and extensions, zero-padded to ``vox_offset``. ``slope``: ``scl_slope`` (intercept 0), e.g.
    :data:`DISPLAY_SLOPE`; None leaves the data unscaled. Raises :class:`InputError` on a bad affine or shape."""
    aff = validate_affine(affine, "affine")
    if len(shape) not in (3, 4) or any(int(s) < 1 for s in shape):
        raise InputError(f"cannot write an image of shape {tuple(shape)}; expected 3 or 4 positive sizes")
    hdr = _header(shape, aff, np.dtype(dtype), description, comment)
    if slope is not None:
        hdr.set_slope_inter(float(slope), 0.0)
    buf = io.BytesIO()
    hdr.write_to(buf)
    offset = int(hdr["vox_offset"])
    return buf.getvalue() + b"\0" * (offset - buf.tell())


def _gzip_member(data: Any, level: int) -> bytes:
    """One complete gzip member of ``data`` (a bytes-like object); zlib releases the GIL while it compresses. The
    header's time stamp is 0, so equal data gives equal bytes."""
    return zlib.compress(data, level, wbits=31)


class ChunkedNifti:
    """A NIfTI file written from its header and its voxel data in chunks, compressed in parallel.

    Each :meth:`add` hands a chunk (the next bytes of the voxel data in NIfTI's Fortran order, e.g. a C-contiguous
    ``[K, J, I]`` slab of an ``(I, J, K)`` map) to ``pool`` to become one gzip member; :meth:`finish` writes the
    members in order into a temporary file and moves it into place (atomic). A ``.nii`` path stores the chunks
    uncompressed. The chunks must not change until :meth:`finish` returns.

    Args:
        path: ``*.nii.gz`` or ``*.nii``.
        header: :func:`nifti_header_bytes`.
        nbytes: the voxel data's size in bytes (checked by :meth:`finish`).
        pool: the executor that compresses (None: compress in the calling thread).
        level: zlib level (default :data:`GZIP_LEVEL`).
    """

    def __init__(self, path: str | os.PathLike[str], header: bytes, nbytes: int, pool: Executor | None = None,
                 level: int = GZIP_LEVEL) -> None:
        self.path = _check_nifti_path(path)
        self.compress = self.path.name.lower().endswith(".gz")
        self.nbytes = int(nbytes)
        self.pool = pool
        self.level = int(level)
        self._added = 0
        self._members: list[Future[bytes] | bytes] = []
        self._push(header)

    def _push(self, data: Any) -> None:
        if not self.compress:
            self._members.append(bytes(data))
        elif self.pool is None:
            self._members.append(_gzip_member(data, self.level))
        else:
            self._members.append(self.pool.submit(_gzip_member, data, self.level))

    def add(self, chunk: Any) -> None:
        """Queue the next chunk of voxel bytes (a C-contiguous array or a bytes-like object)."""
        view = memoryview(chunk).cast("B")
        self._added += view.nbytes
        if self._added > self.nbytes:
            raise ValueError(f"{self.path.name}: {self._added} bytes of voxel data for an image of {self.nbytes}")
        self._push(view)

    def finish(self) -> Path:
        """Write the file (waiting for its members); returns its path."""
        if self._added != self.nbytes:
            raise ValueError(f"{self.path.name}: {self._added} bytes of voxel data for an image of {self.nbytes}")
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            for m in self._members:
                f.write(m.result() if isinstance(m, Future) else m)
        self._members.clear()
        return self.path

    def cancel(self) -> None:
        """Drop the queued chunks (after a failure elsewhere); nothing is written."""
        for m in self._members:
            if isinstance(m, Future):
                m.cancel()
        self._members.clear()
