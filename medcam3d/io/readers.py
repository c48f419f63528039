"""Read a scan into a :class:`~medcam3d.io.volume.Volume`: NIfTI (nibabel), NRRD/MetaImage (SimpleITK), DICOM.

:func:`read_volume` dispatches on the path:

============================  =========================================================================
``*.nii``, ``*.nii.gz``       nibabel; the affine is the one nibabel chooses (sform if its code > 0, else
                              qform, else the header's voxel sizes), recorded in ``meta["affine_from"]``
``*.nrrd``, ``*.nhdr``,       SimpleITK; ITK's LPS origin/direction become a RAS affine
``*.mha``, ``*.mhd``
a folder                      one DICOM series (:mod:`medcam3d.io.dicom`: choice of series, regular spacing)
any other file                a single DICOM file if it is one (a multi-frame 3-D image), else refused
============================  =========================================================================

Everything a user can get wrong raises :class:`~medcam3d.errors.InputError` with a one-line message that names the
file: missing file, not an image, corrupt or truncated gzip, 2-D or 4-D+ data, NaN/Inf voxels, zero or negative
spacing, singular affine, empty DICOM folder, missing/irregular slices, several series with none chosen.

The array keeps the file's own index order (no reorientation: that is the preprocessing's job, and keeping it
lets maps be written back with exactly the source affine and shape). Trailing size-1 axes beyond the third
(``x, y, z, 1``) are dropped.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ._itk import first_line, itk_quiet, volume_from_itk
from .dicom import is_dicom_file, read_dicom_file, read_dicom_folder
from .volume import Volume

__all__ = ["ITK_SUFFIXES", "NIFTI_SUFFIXES", "read_volume"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def read_volume(path: str | os.PathLike[str], series_uid: str | None = None, allow_resample: bool = False) -> Volume:
    """Read a 3-D scan.

    Args:
        path: a NIfTI/NRRD/MetaImage file, a DICOM series folder or a multi-frame DICOM file.
        series_uid: for a DICOM folder, the SeriesInstanceUID to read (default: the series with the most slices;
            a tie is an error).
        allow_resample: for a DICOM series with a missing slice or irregular spacing, interpolate linearly along
            the slice normal to the median spacing instead of refusing.

    Returns:
        A :class:`Volume` (float32 array in the file's index order, RAS affine, identifier-free ``meta``).

    Raises:
        InputError: naming ``path`` and the problem.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or folder", p)
    if p.is_dir():
        return read_dicom_folder(p, series_uid=series_uid, allow_resample=allow_resample)
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(p)
    if name.endswith(ITK_SUFFIXES):
        return _read_itk_file(p)
    if p.stat().st_size == 0:
        raise InputError("empty file, not an image", p)
    if is_dicom_file(p):
        return read_dicom_file(p)
    raise InputError(
        "not a supported image (expected NIfTI .nii/.nii.gz, NRRD .nrrd/.nhdr, MetaImage .mha/.mhd, a DICOM file "
        "or a DICOM series folder)",
        p,
    )


def _short(e: BaseException, p: Path | None = None) -> str:
    msg = " ".join(str(e).split())
    if p is not None:  # the path is already at the start of our message
        msg = msg.replace(str(p), p.name)
    return f"{type(e).__name__}: {msg[:160]}" if msg else type(e).__name__


_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, MemoryError)


def _read_nifti(p: Path) -> Volume:
    import nibabel as nib  # lazy: nibabel loads only when a NIfTI file is read or written
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    if p.stat().st_size == 0:
        raise InputError("empty file, not an image", p)
    gz = p.name.lower().endswith(".gz")
    if gz:
        with open(p, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                raise InputError("corrupt or truncated gzip file: it is not gzip-compressed (a .nii.gz must be)", p)
    try:
        img = nib.load(str(p))
    except (ImageFileError, HeaderDataError) as e:
        raise InputError(f"not a NIfTI image ({_short(e, p)})", p) from None
    except _READ_ERRORS as e:
        what = "corrupt or truncated gzip file" if gz else "unreadable NIfTI file"
        raise InputError(f"{what} ({_short(e, p)})", p) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"not a NIfTI image (nibabel read it as {type(img).__name__})", p)
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    _check_dims(shape, p)
    hdr = img.header
    sform_code, qform_code = int(hdr["sform_code"]), int(hdr["qform_code"])
    affine_from = "sform" if sform_code > 0 else "qform" if qform_code > 0 else "header voxel sizes (no sform/qform)"
    if sform_code == 0:
        # nibabel silently makes negative pixdim positive on load; read the raw header to catch it
        pixdim = _raw_nifti_pixdim(p, type(hdr))
        if pixdim is not None and (not np.isfinite(pixdim[1:4]).all() or (pixdim[1:4] <= 0).any()):
            raise InputError(f"zero or negative voxel spacing in the header (pixdim {pixdim[1:4].tolist()})", p)
    try:
        arr = np.asarray(img.get_fdata(dtype=np.float32))
    except _READ_ERRORS as e:
        what = "corrupt or truncated gzip file" if gz else "truncated or unreadable voxel data"
        raise InputError(f"{what} ({_short(e, p)})", p) from None
    except Exception as e:  # noqa: BLE001 - e.g. structured RGB dtypes nibabel cannot scale
        raise InputError(f"unsupported NIfTI voxel data ({_short(e, p)})", p) from None
    arr = arr.reshape(shape)
    meta: dict[str, Any] = {"format": "nifti", "affine_from": affine_from}
    return Volume(arr, np.asarray(img.affine, dtype=np.float64), str(p), meta)


def _raw_nifti_pixdim(p: Path, header_class: Any) -> np.ndarray | None:
    from nibabel.openers import ImageOpener  # lazy: nibabel loads only when a NIfTI file is read

    try:
        with ImageOpener(str(p)) as f:
            raw = header_class.from_fileobj(f, check=False)
        return np.asarray(raw["pixdim"], dtype=np.float64)
    except Exception:  # noqa: BLE001 - nibabel already read the header once; nothing more to learn
        return None


def _check_dims(shape: tuple[int, ...], p: Path) -> None:
    if len(shape) > 3:
        raise InputError(f"{len(shape)}-D image (shape {'x'.join(map(str, shape))}); a 3-D volume is needed", p)
    if len(shape) < 3 or min(shape) == 1:
        raise InputError(f"2-D image (shape {'x'.join(map(str, shape))}); a 3-D volume is needed", p)
    if min(shape) < 1:
        raise InputError(f"empty image (shape {shape})", p)


_SPACING_FIELDS = {
    # MetaImage: "ElementSpacing = 1 1 2"; NRRD: "spacings: 1 1 2" (NRRD files usually use "space directions")
    ".mha": re.compile(rb"^\s*ElementSpacing\s*=\s*(.*)$", re.MULTILINE),
    ".mhd": re.compile(rb"^\s*ElementSpacing\s*=\s*(.*)$", re.MULTILINE),
    ".nrrd": re.compile(rb"^spacings:\s*(.*)$", re.MULTILINE),
    ".nhdr": re.compile(rb"^spacings:\s*(.*)$", re.MULTILINE),
}


def _header_spacing_problem(p: Path) -> str | None:
    """ITK turns a negative MetaImage spacing into a flipped direction without a word; refuse it instead."""
    pattern = _SPACING_FIELDS.get(p.suffix.lower())
    if pattern is None:
        return None
    try:
        with open(p, "rb") as f:
            head = f.read(8192)
    except OSError:
        return None
    if p.suffix.lower() in (".mha", ".mhd"):
        head = head.split(b"ElementDataFile", 1)[0] + b"\n"
    else:
        head = head.split(b"\n\n", 1)[0] + b"\n"
    m = pattern.search(head)
    if m is None:
        return None
    values = []
    for tok in m.group(1).split():
        try:
            values.append(float(tok))
        except ValueError:
            continue  # NRRD writes "nan" for non-spatial axes
    spatial = [v for v in values if np.isfinite(v)]
    if any(v <= 0 for v in spatial):
        return f"zero or negative voxel spacing in the header ({m.group(1).decode(errors='replace').strip()})"
    return None


def _read_itk_file(p: Path) -> Volume:
    import SimpleITK as sitk  # lazy: SimpleITK loads only when an ITK or DICOM file is read

    if p.stat().st_size == 0:
        raise InputError("empty file, not an image", p)
    problem = _header_spacing_problem(p)
    if problem:
        raise InputError(problem, p)
    try:
        with itk_quiet():
            img = sitk.ReadImage(str(p))
    except RuntimeError as e:
        msg = first_line(e).replace(str(p), p.name)
        if "spacing" in msg.lower():
            raise InputError(f"zero or negative voxel spacing ({msg})", p) from None
        if "Unable to determine ImageIO" in msg or "Could not create IO object" in msg:
            raise InputError(f"not an image SimpleITK can read ({msg})", p) from None
        raise InputError(f"unreadable or truncated image ({msg})", p) from None
    meta = {"format": p.suffix.lower().lstrip(".")}
    return volume_from_itk(img, str(p), meta)
