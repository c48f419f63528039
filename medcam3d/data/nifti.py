"""Writing phantoms as NIfTI: the HU volume, an organ label map, a lesion bitmask and a JSON sidecar.

Every file is written atomically (a temporary file in the destination folder, then ``os.replace``:
:mod:`medcam3d.files`). nibabel is imported only when writing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import InputError
from ..files import atomic_path, write_text_atomic
from .phantoms import LABELS, MARKER_BIT, ORGAN_CODES, Phantom

__all__ = ["nifti_stem", "write_nifti"]

_INT16 = np.iinfo(np.int16)


def nifti_stem(path: str | os.PathLike[str]) -> tuple[Path, str, str]:
    """Split a NIfTI path into (folder, stem, extension); the extension is ``.nii`` or ``.nii.gz``."""
    p = Path(path)
    for ext in (".nii.gz", ".nii"):
        if p.name.endswith(ext) and len(p.name) > len(ext):
            return p.parent, p.name[: -len(ext)], ext
    raise InputError("a NIfTI file name must end in .nii or .nii.gz", p)


def atomic_write(dest: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a new temporary path next to ``dest`` (same extension), then move it onto ``dest``.

    Kept for one release: a thin use of :func:`medcam3d.files.atomic_path`, which new code should call."""
    with atomic_path(dest) as tmp:
        write(str(tmp))


def _save_volume(data: np.ndarray, affine: np.ndarray, dest: Path, intent: str | None = None) -> None:
    import nibabel as nib  # lazy: only writing needs nibabel

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    if intent is not None:
        img.header.set_intent(intent)
    with atomic_path(dest) as tmp:
        nib.save(img, str(tmp))


def _sidecar(phantom: Phantom, hu_dtype: str) -> dict[str, object]:
    return {
        "seed": phantom.seed if isinstance(phantom.seed, int) else list(phantom.seed),
        "shape": list(phantom.hu.shape),
        "spacing_mm": list(phantom.spacing),
        "axcodes": "SPL",
        "affine": phantom.affine.tolist(),
        "hu_dtype": hu_dtype,
        "labels": {name: int(flag) for name, flag in zip(LABELS, phantom.labels)},
        "labels_present": list(phantom.label_names),
        "marker": phantom.marker_mask is not None,
        "organ_codes": dict(ORGAN_CODES),
        "lesion_bits": {**{name: k for k, name in enumerate(LABELS)}, "marker": MARKER_BIT},
        "source": "medcam3d.data synthetic chest-CT phantom (not patient data)",
    }


def write_nifti(
    phantom: Phantom,
    path: str | os.PathLike[str],
    masks: bool = True,
    hu_dtype: Literal["float32", "int16"] = "float32",
) -> dict[str, Path]:
    """Write ``phantom`` as NIfTI with its affine (sform and qform code 1, units mm), atomically.

    Parameters
    ----------
    phantom : Phantom
    path : path-like
        ``<stem>.nii`` or ``<stem>.nii.gz``; the folder is created if needed.
    masks : bool, default True
        Also write ``<stem>_organs<ext>`` (``uint8 [S, H, W]``, :data:`~medcam3d.data.phantoms.ORGAN_CODES`,
        0 outside the body) and ``<stem>_lesions<ext>`` (``uint16 [S, H, W]`` bitmask: bit k for ``LABELS[k]``,
        bit :data:`~medcam3d.data.phantoms.MARKER_BIT` for the marker).
    hu_dtype : {"float32", "int16"}, default "float32"
        ``"int16"`` rounds the HU (half the size).

    Returns
    -------
    dict of str to Path
        Keys ``image``, ``sidecar`` (``<stem>.json``: seed, geometry, labels, codes) and, with ``masks``,
        ``organs`` and ``lesions``.

    Raises
    ------
    InputError
        If ``path`` does not end in ``.nii`` or ``.nii.gz``, or for an unknown ``hu_dtype``.
    """
    folder, stem, ext = nifti_stem(path)
    if hu_dtype not in ("float32", "int16"):
        raise InputError(f"hu_dtype: {hu_dtype!r} is not 'float32' or 'int16'")
    folder.mkdir(parents=True, exist_ok=True)
    hu = phantom.hu if hu_dtype == "float32" else np.clip(np.rint(phantom.hu), _INT16.min, _INT16.max).astype(np.int16)
    written = {"image": folder / f"{stem}{ext}", "sidecar": folder / f"{stem}.json"}
    _save_volume(hu, phantom.affine, written["image"])
    if masks:
        written["organs"] = folder / f"{stem}_organs{ext}"
        written["lesions"] = folder / f"{stem}_lesions{ext}"
        _save_volume(phantom.organ_labelmap(), phantom.affine, written["organs"], "label")
        _save_volume(phantom.lesion_bitmask(), phantom.affine, written["lesions"])
    write_text_atomic(written["sidecar"], json.dumps(_sidecar(phantom, hu_dtype), indent=2) + "\n")
    return written
