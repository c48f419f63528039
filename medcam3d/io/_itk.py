"""SimpleITK helpers shared by the file and DICOM readers (LPS -> RAS happens in :func:`volume_from_itk`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..errors import InputError
from .volume import Volume, itk_to_affine

__all__ = ["first_line", "itk_image_checks", "itk_quiet", "volume_from_itk"]


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


def itk_image_checks(img: Any, source: str) -> Any:
    """Return a 3-D scalar SimpleITK image, dropping trailing size-1 dimensions, or raise :class:`InputError`
    (2-D, 4-D+, vector/RGB pixels)."""
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
