"""Does a scan fit the modality a model reads? DICOM says so in its Modality tag; other files are judged by their
intensities.

:func:`check_modality` takes a :class:`~medcam3d.io.volume.Volume` and the modalities a config accepts
(``Config.modality``, e.g. ``("CT",)``):

* a DICOM scan whose Modality tag is not accepted is refused (:class:`~medcam3d.errors.InputError`), unless
  ``ignore=True``: then the mismatch is returned as a warning line;
* a scan without a Modality tag (NIfTI, NRRD, MetaImage) is judged by :func:`looks_like_ct`: a CT model given a
  scan that is not in Hounsfield units, or a non-CT model given one that is, gets a one-line warning (the run goes
  on: the intensities are only a hint, a cropped CT without air would be flagged too).

Hounsfield test: CT intensities put air at -1000 HU, and nearly every CT holds some air (outside the body, in the
lungs, the bowel or the sinuses), so its 1st percentile lies at or below :data:`CT_AIR_HU` (-500). An MRI (0-255 or
0-4095, z-scores), a PET (SUV >= 0) or a CT stored without its rescale (air at 0) does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from .volume import Volume

__all__ = ["CT_AIR_HU", "check_modality", "looks_like_ct"]

#: a CT's 1st intensity percentile lies at or below this (air is -1000 HU)
CT_AIR_HU = -500.0
_SAMPLES = 1_000_000  # voxels sampled (evenly) to estimate the percentile


def looks_like_ct(array: np.ndarray) -> tuple[bool, str]:
    """``(looks like CT in HU?, a short description of the intensities)`` from an even sample of the voxels."""
    a = np.asarray(array)
    flat = np.ravel(a, order="K")  # a view for C- or F-ordered arrays
    sample = flat[:: max(1, flat.size // _SAMPLES)]
    p1 = float(np.percentile(sample, 1.0))
    lo, hi = float(sample.min()), float(sample.max())
    return p1 <= CT_AIR_HU, f"1st percentile {p1:.4g}, range {lo:.4g} to {hi:.4g}"


def check_modality(volume: Volume, accepted: Sequence[str] | None, *, ignore: bool = False,
                   what: str = "the config") -> str | None:
    """Check ``volume`` against the accepted modalities; return a warning line, or ``None`` when all is well.

    Args:
        volume: the scan (``meta["modality"]`` is the DICOM Modality tag when it came from DICOM).
        accepted: upper-case DICOM Modality codes (``None`` or empty: no check).
        ignore: turn a DICOM mismatch into a warning instead of a refusal.
        what: how to name the source of ``accepted`` in messages (e.g. the config file).

    Raises:
        InputError: a DICOM scan of a modality not accepted (unless ``ignore``).
    """
    if not accepted:
        return None
    want = "/".join(accepted)
    tag = str(volume.meta.get("modality") or "").strip().upper()
    if tag:
        if tag in accepted:
            return None
        msg = f"DICOM Modality is {tag} but {what} reads {want}"
        if not ignore:
            raise InputError(f"{msg}; refused (--ignore-modality / ignore_modality=True explains it anyway)",
                             volume.source)
        return f"{volume.source}: {msg}; explained anyway (--ignore-modality)"
    is_ct, facts = looks_like_ct(volume.array)
    if "CT" in accepted and not is_ct:
        return (f"{volume.source}: intensities do not look like CT in Hounsfield units ({facts}; air would be near "
                f"-1000), but {what} reads {want}: the scores may mean nothing")
    if "CT" not in accepted and is_ct:
        return (f"{volume.source}: intensities look like CT in Hounsfield units ({facts}), but {what} reads {want}: "
                "the scores may mean nothing")
    return None
