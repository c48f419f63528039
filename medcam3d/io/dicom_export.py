"""Optional DICOM export: maps on a DICOM scan's grid as a DICOM Parametric Map, and thresholded as a DICOM SEG
(highdicom), in the source study.

Both objects reference the source series (same Study, Frame of Reference; one frame per source slice, positioned
like it), so PACS viewers and 3D Slicer show them over the scan. Being part of the patient's study, they
necessarily carry the source's patient and study modules (highdicom copies them): unlike ``Volume.meta``, these
files are not de-identified. Needs ``highdicom`` (``pip install medcam3d[dicom-seg]``).

Only volumes read from a single-frame DICOM series without resampling can be exported: then slice ``k`` of the
volume is file ``meta["dicom_files"][k]``.

Missing source tags never end in a traceback. A missing FrameOfReferenceUID or StudyInstanceUID is replaced by a UID
generated from the SeriesInstanceUID (the same for every export of that series), missing type-2 patient/study
attributes (PatientID, StudyDate, ...) are left empty and a missing SliceThickness becomes the slice spacing; each
such assumption is reported as one note line (``on_note``, default :func:`warnings.warn`). A missing SOPInstanceUID
(the slices could not be referenced) or anything else highdicom refuses is an :class:`InputError` with one line.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..files import atomic_path
from .volume import Volume
from .writers import _to_numpy

__all__ = ["check_dicom_source", "write_parametric_map", "write_segmentation"]

#: type-2 attributes (present, possibly empty) that highdicom copies from the source into the patient/study modules
_TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")
#: highdicom's failures on source headers it cannot use
_HIGHDICOM_ERRORS = (ValueError, AttributeError, TypeError, KeyError, IndexError)
#: private coding scheme of the SEG segments' property type (DICOM allows "99"-prefixed local schemes)
_CODING_SCHEME = "99MEDCAM3D"


def _highdicom() -> tuple[Any, Any]:
    try:  # lazy: highdicom is an optional extra, and pydicom is only needed with it here
        import highdicom as hd
        import pydicom
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("DICOM export needs highdicom: pip install 'medcam3d[dicom-seg]'") from e
    return hd, pydicom



def _new_instance(hd: Any, series_number: int) -> dict[str, Any]:
    """The identity of a new DICOM object medcam3d writes (new series and instance UIDs, medcam3d as the device),
    shared by the Parametric Map and the SEG."""
    return {
        "series_instance_uid": hd.UID(), "series_number": int(series_number), "sop_instance_uid": hd.UID(),
        "instance_number": 1, "manufacturer": "medcam3d", "manufacturer_model_name": "medcam3d",
        "software_versions": _software(), "device_serial_number": "0",
    }

def _software() -> str:
    try:
        return version("medcam3d")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        return "medcam3d"


def check_dicom_source(source_volume: Volume, where: str | os.PathLike[str] | None = None) -> list[str]:
    """The source's slice files when maps on its grid can be exported as DICOM, else :class:`InputError` (one line,
    naming ``where`` or the scan): not a DICOM series, resampled on reading, a multi-frame file, highdicom missing.
    Commands call it right after reading the scan, before any work."""
    where = where if where is not None else source_volume.source
    files = list(source_volume.meta.get("dicom_files") or [])
    if source_volume.meta.get("format") != "dicom" or not files:
        raise InputError(f"{source_volume.source} is not a DICOM series; DICOM export (--dicom-out) needs a DICOM "
                         "source", where)
    if source_volume.meta.get("resampled_slices"):
        raise InputError(f"{source_volume.source} was resampled on reading; its grid is not the DICOM slices', so "
                         "maps on it cannot be exported as DICOM", where)
    if len(files) != source_volume.shape[2]:
        raise InputError(f"{source_volume.source}: multi-frame DICOM sources are not supported for DICOM export",
                         where)
    try:
        _, pydicom = _highdicom()
    except ImportError as e:
        raise InputError(f"{e}", where) from None
    for f in files:  # headers only: an export must reference every slice
        if not str(pydicom.dcmread(f, stop_before_pixels=True).get("SOPInstanceUID", "") or ""):
            raise InputError(f"source slice {f} has no SOPInstanceUID, so a DICOM export could not reference it",
                             where)
    return files


def _check_export(map_on_source_grid: Any, source_volume: Volume, p: Path) -> tuple[np.ndarray, list[str]]:
    """The map as float32 ``[I, J, K]`` and the source's slice files, or :class:`InputError` before any work."""
    if p.suffix.lower() != ".dcm":
        raise InputError("output file name must end with .dcm", p)
    files = check_dicom_source(source_volume, p)
    m = np.asarray(_to_numpy(map_on_source_grid), dtype=np.float32)
    if m.shape != source_volume.shape:
        raise InputError(f"map has shape {m.shape} but the scan has {source_volume.shape}", p)
    if not np.isfinite(m).all():
        raise InputError("map contains NaN or Inf", p)
    return m, files


def _note(on_note: Callable[[str], None] | None, text: str) -> None:
    if on_note is None:
        warnings.warn(text, UserWarning, stacklevel=3)
    else:
        on_note(text)


def _source_headers(files: Sequence[str], on_note: Callable[[str], None] | None) -> list[Any]:
    """The source slices' headers (each with a SOPInstanceUID: :func:`check_dicom_source`), with missing UIDs
    generated and missing type-2 attributes emptied (one note each)."""
    _, pydicom = _highdicom()
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for tag, what in (("FrameOfReferenceUID", "viewers will not register the map with the scan automatically"),
                      ("StudyInstanceUID", "the map goes into a new study")):
        if any(not str(ds.get(tag, "") or "") for ds in sources):
            # derived from the series, so every export of the series (all maps, PM and SEG) shares it
            series = str(sources[0].get("SeriesInstanceUID", "") or files[0])
            uid = str(pydicom.uid.generate_uid(entropy_srcs=[series, tag]))
            for ds in sources:
                setattr(ds, tag, uid)
            _note(on_note, f"DICOM export: the source series has no {tag}; a generated one ({uid}) is used, so "
                           f"{what}")
    empty = [tag for tag in _TYPE2_COPIED if any(tag not in ds for ds in sources)]
    for ds in sources:
        for tag in empty:
            if tag not in ds:
                setattr(ds, tag, "")
    if empty:
        _note(on_note, f"DICOM export: the source series lacks {', '.join(empty)}; left empty in the export")
    if any("SliceThickness" not in ds for ds in sources) and len(sources) > 1:
        step = float(np.linalg.norm(np.subtract(sources[1].ImagePositionPatient, sources[0].ImagePositionPatient)))
        for ds in sources:
            if "SliceThickness" not in ds:
                ds.SliceThickness = round(step, 6)
        _note(on_note, f"DICOM export: the source series lacks SliceThickness; the spacing between slices "
                       f"({step:.4g} mm) is used")
    return sources


def _code_string(text: str) -> str:
    """A DICOM Code String (CS): up to 16 upper-case letters, digits, spaces or underscores."""
    return re.sub(r"[^A-Z0-9_ ]", "_", text.upper())[:16] or "MAP"


def _save(dataset: Any, p: Path) -> Path:
    with atomic_path(p) as tmp:
        dataset.save_as(str(tmp))
    return p


def write_parametric_map(
    map_on_source_grid: Any,
    source_volume: Volume,
    path: str | os.PathLike[str],
    *,
    label: str = "HiResCAM",
    description: str = "medcam3d explanation map",
    series_number: int = 900,
    on_note: Callable[[str], None] | None = None,
) -> Path:
    """Write ``map_on_source_grid`` ``[I, J, K]`` as a DICOM Parametric Map referencing ``source_volume``'s series.

    Args:
        map_on_source_grid: map with exactly the source volume's shape (e.g. ``Preprocessor.invert(...)[k]``).
        source_volume: a Volume read by :func:`medcam3d.io.read_volume` from a DICOM series folder.
        path: output ``*.dcm`` file (written atomically).
        label: short name of the quantity (the real-world value mapping's LUT label, <= 16 characters).
        description: content description.
        series_number: series number of the new series.
        on_note: called with each one-line note about an assumption (generated UID, emptied attribute); default
            :func:`warnings.warn`.

    Frame ``k`` is slice ``k`` (file ``meta["dicom_files"][k]``) as ``map[:, :, k].T`` (rows = ``j``, columns =
    ``i``), stored as float32 ``FloatPixelData`` with an identity real-world value mapping (slope 1, intercept 0).

    Raises:
        InputError: one line, before anything is written, for a source that cannot be exported.
    """
    p = Path(path)
    m, files = _check_export(map_on_source_grid, source_volume, p)
    hd, _ = _highdicom()
    sources = _source_headers(files, on_note)
    frames = np.stack([m[:, :, k].T for k in range(m.shape[2])])  # [slices, rows (j), columns (i)]
    lo, hi = float(frames.min()), float(frames.max())
    if hi <= lo:
        hi = lo + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label[:16], lut_explanation=description[:64], unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        value_range=(lo, hi), slope=1, intercept=0,
    )
    try:
        pm = hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=frames,
            **_new_instance(hd, series_number),
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=(lo + hi) / 2, window_width=hi - lo)],
            content_label=_code_string(label),
            content_description=description[:64],
        )
    except _HIGHDICOM_ERRORS as e:
        raise InputError(f"cannot make a DICOM Parametric Map of {source_volume.source} "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:160]})", p) from None
    return _save(pm, p)


def write_segmentation(
    map_on_source_grid: Any,
    source_volume: Volume,
    path: str | os.PathLike[str],
    threshold: float,
    *,
    label: str = "HiResCAM",
    description: str = "medcam3d explanation map thresholded",
    series_number: int = 901,
    on_note: Callable[[str], None] | None = None,
) -> Path:
    """Write ``map_on_source_grid >= threshold`` as a binary DICOM SEG (one segment) referencing the source series.

    Args:
        map_on_source_grid: ``[I, J, K]`` on the source grid (e.g. a display heatmap in [0, 1]).
        source_volume: a Volume read from a single-frame DICOM series (see the module docstring).
        path: output ``*.dcm`` file (written atomically).
        threshold: voxels with ``map >= threshold`` are in the segment (stated in the segment's description).
        label: the segment's label (e.g. the method and class).
        on_note: as for :func:`write_parametric_map`.

    Frames are the source slices (empty ones included), mask frame ``k`` = ``(map[:, :, k] >= threshold).T``.
    """
    p = Path(path)
    m, files = _check_export(map_on_source_grid, source_volume, p)
    if not np.isfinite(threshold):
        raise InputError(f"SEG threshold must be a finite number, got {threshold!r}", p)
    hd, _ = _highdicom()
    from pydicom.sr.codedict import codes  # lazy: with highdicom (optional extra)

    sources = _source_headers(files, on_note)
    mask = np.stack([(m[:, :, k] >= threshold).T for k in range(m.shape[2])]).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medcam3d", version=_software(), family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=f"{label} >= {threshold:g}"[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=hd.sr.CodedConcept("EXPLMAP", _CODING_SCHEME, "Explanation map region"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=mask,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            **_new_instance(hd, series_number),
            content_description=f"{description} at {threshold:g}"[:64],
            content_label=_code_string(label),
            omit_empty_frames=False,
        )
    except _HIGHDICOM_ERRORS as e:
        raise InputError(f"cannot make a DICOM SEG of {source_volume.source} "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:160]})", p) from None
    return _save(seg, p)
