"""SimpleITK helpers shared by the file and DICOM readers (LPS -> RAS happens in :func:`volume_from_itk`)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..errors import InputError
from .limits import check_voxels
from .volume import Volume, itk_to_affine

__all__ = ["check_itk_header", "first_line", "itk_image_checks", "itk_pixel_bytes", "itk_quiet", "volume_from_itk"]

_FLOAT32_BYTES = 4


@contextmanager
def itk_quiet() -> Iterator[None]:
    """Silence ITK's C-level warnings for the duration (we raise our own, clearer errors)."""
    import SimpleITK as sitk  # lazy: SimpleITK loads only when an ITK or DICOM file is read

    prev = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(prev)


def first_line(e: BaseException) -> str:
    """The informative line of an ITK exception message (they start with 'Exception thrown in ...: file:line:')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Exception thrown") and not ln.endswith(":")]
    return (useful or lines or [type(e).__name__])[-1][:200]


def itk_pixel_bytes(pixel_type: str, components: int = 1) -> int:
    """Bytes per voxel of an ITK pixel type described as SimpleITK names it (``"16-bit signed integer"``,
    ``"vector of 32-bit float"``, ``"complex of 64-bit float"``), times ``components``."""
    m = re.search(r"(\d+)-bit", pixel_type)
    bits = int(m.group(1)) if m else 64  # unknown: assume the widest scalar
    per = bits // 8 * (2 if "complex" in pixel_type else 1)
    return per * max(1, int(components))


def _refuse_complex(pixel_type: str, source: str | os.PathLike[str]) -> None:
    if "complex" in pixel_type:
        raise InputError(f"complex voxels ({pixel_type}): medcam3d needs real intensities; convert the image to "
                         "real values (e.g. its magnitude) first", source)


def check_itk_header(reader: Any, source: str | os.PathLike[str], max_voxels: int | None) -> None:
    """Size and pixel-type checks on a ``sitk.ImageFileReader`` after ``ReadImageInformation()`` (header only):
    complex voxels are refused, the claimed grid must pass :func:`~medcam3d.io.limits.check_voxels`."""
    import SimpleITK as sitk  # lazy: SimpleITK loads only when an ITK or DICOM file is read

    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    _refuse_complex(pixel_type, source)
    file_bytes = itk_pixel_bytes(pixel_type, reader.GetNumberOfComponents())
    # ITK's buffer, numpy's copy of it, the float32 array
    check_voxels(reader.GetSize(), 2 * file_bytes + _FLOAT32_BYTES, source, max_voxels=max_voxels)


def itk_image_checks(img: Any, source: str) -> Any:
    """Return a 3-D scalar SimpleITK image, dropping trailing size-1 dimensions, or raise :class:`InputError`
    (2-D, 4-D+, vector/RGB pixels, complex voxels)."""
    _refuse_complex(img.GetPixelIDTypeAsString(), source)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"vector/RGB image ({img.GetNumberOfComponentsPerPixel()} components per voxel); a scalar "
                         "3-D volume is needed", source)
    while img.GetDimension() > 3 and img.GetSize()[-1] == 1:
        index = [slice(None)] * (img.GetDimension() - 1) + [0]
        img = img[tuple(index)]
    size = img.GetSize()
    if img.GetDimension() > 3:
        raise InputError(f"{img.GetDimension()}-D image (size {'x'.join(map(str, size))}); a 3-D volume is needed",
                         source)
    if img.GetDimension() < 3 or min(size) == 1:
        raise InputError(f"2-D image (size {'x'.join(map(str, size))}); a 3-D volume is needed", source)
    return img


def volume_from_itk(img: Any, source: str, meta: dict[str, Any]) -> Volume:
    """Volume from a SimpleITK image, in ITK index order (i, j, k), with the LPS geometry turned into a RAS affine."""
    import SimpleITK as sitk  # lazy: SimpleITK loads only when an ITK or DICOM file is read

    img = itk_image_checks(img, source)
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # numpy [k, j, i] -> ITK index order [i, j, k]
    affine = itk_to_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    return Volume(np.asarray(arr, dtype=np.float32), affine, source, meta)
