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
file: missing file, not an image, corrupt or truncated gzip, 2-D or 4-D+ data, complex voxels, NaN/Inf voxels, zero
or negative spacing, singular affine, empty DICOM folder, missing/irregular slices, several series with none chosen.

Size checks (:mod:`medcam3d.io.limits`) come before any voxel is read: the grid and voxel type a header claims
(NIfTI header, NRRD/MetaImage header via ITK's ``ReadImageInformation``, DICOM Rows x Columns x slices) must stay
within ``max_voxels`` and the memory budget. A ``.nii.gz`` is decompressed here, chunk by chunk: only as far as its
header accounts for (header, extensions, voxel data), and a stream that goes on expanding beyond that by more than
:data:`GZIP_TAIL_SLACK` bytes is refused while it is being decompressed.

The array keeps the file's own index order (no reorientation: that is the preprocessing's job, and keeping it
lets maps be written back with exactly the source affine and shape). Trailing size-1 axes beyond the third
(``x, y, z, 1``) are dropped.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ._itk import check_itk_header, first_line, itk_quiet, volume_from_itk
from .dicom import is_dicom_file, read_dicom_file, read_dicom_folder
from .limits import MAX_HEADER_BYTES, GunzipStream, check_voxels, format_bytes
from .volume import Volume

__all__ = ["GZIP_TAIL_SLACK", "ITK_SUFFIXES", "NIFTI_SUFFIXES", "read_volume"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
#: bytes a ``.nii.gz`` stream may expand to beyond what its header accounts for (padding) before it is refused
GZIP_TAIL_SLACK = 1 << 20
_NIFTI_BYTES_PER_VOXEL = 4  # the float32 array; plus twice the file's own voxel size (file bytes, raw array)


def read_volume(
    path: str | os.PathLike[str],
    series_uid: str | None = None,
    allow_resample: bool = False,
    *,
    max_voxels: int | None = None,
) -> Volume:
    """Read a 3-D scan.

    Args:
        path: a NIfTI/NRRD/MetaImage file, a DICOM series folder or a multi-frame DICOM file.
        series_uid: for a DICOM folder, the SeriesInstanceUID to read (default: the series with the most slices;
            a tie is an error).
        allow_resample: for a DICOM series with a missing slice or irregular spacing, interpolate linearly along
            the slice normal to the median spacing instead of refusing.
        max_voxels: the largest volume, in voxels, to read (default
            :data:`~medcam3d.io.limits.DEFAULT_MAX_VOXELS`); checked against the header before reading.

    Returns:
        A :class:`Volume` (float32 array in the file's index order, RAS affine, identifier-free ``meta``).

    Raises:
        InputError: naming ``path`` and the problem.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or folder", p)
    if p.is_dir():
        return read_dicom_folder(p, series_uid=series_uid, allow_resample=allow_resample, max_voxels=max_voxels)
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(p, max_voxels)
    if name.endswith(ITK_SUFFIXES):
        return _read_itk_file(p, max_voxels)
    if p.stat().st_size == 0:
        raise InputError("empty file, not an image", p)
    if is_dicom_file(p):
        return read_dicom_file(p, max_voxels=max_voxels)
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


_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


def _check_nifti_header(hdr: Any, p: Path, max_voxels: int | None) -> int:
    """Size checks on a parsed NIfTI header, before any voxel is read; returns the bytes the file's header,
    extensions and voxel data take (the stream's expected length)."""
    shape = tuple(int(s) for s in hdr.get_data_shape())
    dtype = np.dtype(hdr.get_data_dtype())
    if dtype.kind == "c":
        raise InputError(f"complex voxels ({dtype.name}): medcam3d needs real intensities; convert the image to "
                         "real values (e.g. its magnitude) first", p)
    check_voxels(shape, 2 * dtype.itemsize + _NIFTI_BYTES_PER_VOXEL, p, max_voxels=max_voxels)
    offset = int(hdr.get_data_offset())
    if offset > MAX_HEADER_BYTES:
        raise InputError(f"size check: the header puts the voxel data at byte {offset} ({format_bytes(offset)}), "
                         f"beyond the {format_bytes(MAX_HEADER_BYTES)} allowed for a header and its extensions", p)
    return offset + int(np.prod(shape, dtype=object)) * dtype.itemsize


def _nifti_class(head: bytes, p: Path) -> Any:
    import nibabel as nib  # lazy: nibabel loads only when a NIfTI file is read or written

    if len(head) >= 4:
        for order in ("little", "big"):
            size = int.from_bytes(head[:4], order)  # type: ignore[arg-type]
            if size == 348:
                return nib.Nifti1Image
            if size == 540:
                return nib.Nifti2Image
    raise InputError("not a NIfTI image (its first bytes are not a NIfTI-1 or NIfTI-2 header)", p)


def _load_nifti_gz(p: Path, max_voxels: int | None) -> Any:
    """A nibabel image of a ``.nii.gz`` decompressed here in bounded chunks (see the module docstring)."""
    from nibabel.spatialimages import HeaderDataError  # lazy: nibabel loads only when a NIfTI file is read

    with open(p, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            raise InputError("corrupt or truncated gzip file: it is not gzip-compressed (a .nii.gz must be)", p)
        f.seek(0)
        stream = GunzipStream(f)  # type: ignore[arg-type]
        try:
            head = stream.read(540)
            klass = _nifti_class(head, p)
            size = 348 if klass.__name__ == "Nifti1Image" else 540
            try:
                hdr = klass.header_class.from_fileobj(io.BytesIO(head[:size]))
            except (HeaderDataError, ValueError) as e:
                raise InputError(f"not a NIfTI image ({_short(e, p)})", p) from None
            need = _check_nifti_header(hdr, p, max_voxels)
            buf = io.BytesIO()
            buf.write(head[:need])
            if len(head) < need and stream.readinto_file(buf, need - len(head)) < need - len(head):
                raise EOFError(f"compressed file ended after {stream.total} of the {need} bytes its header needs")
            tail = stream.readinto_file(_Discard(), GZIP_TAIL_SLACK + 1)
        except (InputError, MemoryError):
            raise
        except _READ_ERRORS as e:
            raise InputError(f"corrupt or truncated gzip file ({_short(e, p)})", p) from None
    if tail > GZIP_TAIL_SLACK:
        raise InputError(f"size check: the gzip stream expands beyond the {need} bytes its header accounts for "
                         f"(stopped decompressing {format_bytes(tail)} past them)", p)
    buf.seek(0)
    try:
        return klass.from_stream(buf)
    except (HeaderDataError, ValueError) as e:
        raise InputError(f"not a NIfTI image ({_short(e, p)})", p) from None


class _Discard(io.RawIOBase):
    """A write-only sink (decompressed bytes that are only counted)."""

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


def _load_nifti(p: Path, max_voxels: int | None) -> Any:
    import nibabel as nib  # lazy: nibabel loads only when a NIfTI file is read or written
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    if p.name.lower().endswith(".gz"):
        img = _load_nifti_gz(p, max_voxels)
    else:
        try:
            img = nib.load(str(p))
        except (ImageFileError, HeaderDataError) as e:
            raise InputError(f"not a NIfTI image ({_short(e, p)})", p) from None
        except _READ_ERRORS as e:
            raise InputError(f"unreadable NIfTI file ({_short(e, p)})", p) from None
        if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            _check_nifti_header(img.header, p, max_voxels)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"not a NIfTI image (nibabel read it as {type(img).__name__})", p)
    return img


def _read_nifti(p: Path, max_voxels: int | None = None) -> Volume:
    if p.stat().st_size == 0:
        raise InputError("empty file, not an image", p)
    gz = p.name.lower().endswith(".gz")
    img = _load_nifti(p, max_voxels)
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
    except MemoryError:
        raise InputError("out of memory while reading the voxel data (MemoryError), although the size check "
                         "estimated it would fit; lower --max-voxels or free memory", p) from None
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


def _itk_read_error(e: RuntimeError, p: Path) -> InputError:
    msg = first_line(e).replace(str(p), p.name)
    if "spacing" in msg.lower():
        return InputError(f"zero or negative voxel spacing ({msg})", p)
    if "Unable to determine ImageIO" in msg or "Could not create IO object" in msg:
        return InputError(f"not an image SimpleITK can read ({msg})", p)
    return InputError(f"unreadable or truncated image ({msg})", p)


def _read_itk_file(p: Path, max_voxels: int | None = None) -> Volume:
    import SimpleITK as sitk  # lazy: SimpleITK loads only when an ITK or DICOM file is read

    if p.stat().st_size == 0:
        raise InputError("empty file, not an image", p)
    problem = _header_spacing_problem(p)
    if problem:
        raise InputError(problem, p)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with itk_quiet():
            reader.ReadImageInformation()  # the header only: sizes and pixel type, no voxel is read
    except RuntimeError as e:
        raise _itk_read_error(e, p) from None
    check_itk_header(reader, p, max_voxels)
    try:
        with itk_quiet():
            img = reader.Execute()
    except RuntimeError as e:
        raise _itk_read_error(e, p) from None
    meta = {"format": p.suffix.lower().lstrip(".")}
    return volume_from_itk(img, str(p), meta)
