"""DICOM input: one series from a folder (SimpleITK/GDCM), or one multi-frame file.

Series choice (folder input):
    * ``series_uid`` given: that SeriesInstanceUID, or an error listing the series present.
    * none given, one series: that one.
    * none given, several series: the one with the most files (slices), e.g. the axial series rather than the
      scout; if several series tie for the most slices (say a lung-kernel and a soft-tissue-kernel reconstruction),
      the choice would be a guess, so :class:`InputError` lists them and asks for ``series_uid``.
      ``meta["n_series_in_folder"]`` records how many series the folder held, and a one-line note in
      ``meta["notes"]`` names the series taken, the others and ``--series-uid`` (the command line prints it).

Size check (:mod:`medcam3d.io.limits`): Rows x Columns x slices from the headers (and, for a resampled series,
the number of slices after resampling) must pass :func:`~medcam3d.io.limits.check_voxels` before pixels are read.

Geometry checks (before any pixel is read, from the headers via pydicom): every slice has the same orientation
(ImageOrientationPatient), size and pixel spacing; slice positions lie along the slice normal (no gantry tilt); no two
slices share a position; the spacing between consecutive slices is regular (tolerance ``max(1e-3 mm, 1 %)``). A
missing slice or irregular spacing is refused unless ``allow_resample=True``: then the slices are resampled
linearly along the normal to the median spacing (``meta["resampled_slices"] = True``). ITK's own series reader
assumes regular spacing and would silently produce wrong geometry, which is why the check and the resampling are
written here. Mixed orientations, sizes, tilted or duplicate positions are always refused.

Regular series are read with ``sitk.ImageSeriesReader`` (GDCM applies RescaleSlope/Intercept, so CT arrives in HU).
No patient identifier is copied into ``Volume.meta``: only modality, SeriesInstanceUID, SeriesDescription and the
sorted file list (needed to reference the source in a DICOM export).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ._itk import check_itk_header as _check_itk_header
from ._itk import first_line as _first_line
from ._itk import itk_quiet as _itk_quiet
from ._itk import volume_from_itk as _volume_from_itk
from .limits import check_voxels
from .volume import Volume, itk_to_affine

#: working set per voxel of a series read by ITK: its buffer and numpy's copy (at most 8 bytes each once GDCM has
#: applied the rescale slope), and the float32 array
_SERIES_BYTES_PER_VOXEL = 2 * 8 + 4
#: working set per output voxel when slices are resampled: the float32 stack, two gathered copies and the result
_RESAMPLE_BYTES_PER_VOXEL = 4 * 4 + 4

__all__ = ["SeriesInfo", "is_dicom_file", "list_series", "read_dicom_file", "read_dicom_folder"]


@dataclass
class SeriesInfo:
    """One DICOM series in a folder: its UID, files sorted by GDCM (along the slice normal) and description."""

    uid: str
    files: list[str]
    description: str = ""
    modality: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_files(self) -> int:
        return len(self.files)


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` starts like a DICOM Part-10 file (``DICM`` at byte 128) or pydicom can parse its header."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    import pydicom  # lazy: pydicom loads only when DICOM is read

    try:  # files without the preamble: let pydicom decide (without force, so text files are rejected)
        ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        return "SOPClassUID" in ds or "Modality" in ds
    except Exception:  # noqa: BLE001 - any parse failure means "not DICOM"
        return False


def _header(path: str) -> Any:
    import pydicom  # lazy: pydicom loads only when DICOM is read

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"unreadable DICOM header ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                         path) from None


def list_series(folder: str | os.PathLike[str]) -> list[SeriesInfo]:
    """The DICOM series directly inside ``folder`` (not in subfolders), as GDCM groups them.

    Raises :class:`InputError` if ``folder`` is not a folder, is empty or holds no DICOM image series."""
    d = Path(folder)
    if not d.exists():
        raise InputError("no such file or folder", d)
    if not d.is_dir():
        raise InputError("not a folder", d)
    entries = list(d.iterdir())
    files = [e for e in entries if e.is_file() and not e.name.startswith(".")]
    subdirs = [e for e in entries if e.is_dir()]
    if not files:
        hint = f" (it has {len(subdirs)} subfolder(s); give the folder that holds the series' files)" if subdirs else ""
        raise InputError(f"empty DICOM folder: no files{hint}", d)
    import SimpleITK as sitk  # lazy: SimpleITK loads only when an ITK or DICOM file is read

    with _itk_quiet():
        uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d)))
    if not uids:
        raise InputError(f"no DICOM image series found among its {len(files)} file(s)", d)
    out: list[SeriesInfo] = []
    for uid in uids:
        with _itk_quiet():
            names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(d), uid))
        if not names:
            continue
        ds = _header(names[0])
        out.append(
            SeriesInfo(uid=uid, files=names, description=str(ds.get("SeriesDescription", "") or ""),
                       modality=str(ds.get("Modality", "") or ""))
        )
    if not out:
        raise InputError(f"no DICOM image series found among its {len(files)} file(s)", d)
    return out


def _describe(s: SeriesInfo) -> str:
    desc = f" '{s.description}'" if s.description else ""
    return f"{s.uid}{desc} ({s.n_files} files)"


def _choice_note(folder: Path, series: list[SeriesInfo], chosen: SeriesInfo) -> str:
    """One line: which of several series was taken, the others, and how to choose another."""
    others = "; ".join(_describe(s) for s in series if s is not chosen)
    return (f"{folder}: {len(series)} DICOM series; read {_describe(chosen)}, the one with the most slices "
            f"(others: {others}) -- choose another with --series-uid UID")


def _choose_series(folder: Path, series: list[SeriesInfo], series_uid: str | None) -> SeriesInfo:
    describe = _describe

    if series_uid is not None:
        for s in series:
            if s.uid == series_uid:
                return s
        raise InputError(
            f"no DICOM series with SeriesInstanceUID {series_uid}; found: " + "; ".join(describe(s) for s in series),
            folder,
        )
    if len(series) == 1:
        return series[0]
    most = max(s.n_files for s in series)
    top = [s for s in series if s.n_files == most]
    if len(top) > 1:
        raise InputError(
            f"{len(series)} DICOM series and none chosen; {len(top)} tie for the most slices: "
            + "; ".join(describe(s) for s in top)
            + " -- choose one by SeriesInstanceUID (series_uid=...)",
            folder,
        )
    return top[0]


def _as_floats(value: Any, n: int, tag: str, path: str) -> np.ndarray:
    try:
        a = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"invalid {tag} {value!r}", path) from None
    if a.shape != (n,) or not np.isfinite(a).all():
        raise InputError(f"invalid {tag} {value!r}", path)
    return a


def _slice_geometry(files: list[str], folder: Path, max_voxels: int | None = None) -> dict[str, Any]:
    """Check the headers of a single-frame series; return orientation, spacing and per-slice positions."""
    rows_cols: set[tuple[int, int]] = set()
    iops: list[np.ndarray] = []
    ipps: list[np.ndarray] = []
    pss: list[np.ndarray] = []
    for f in files:
        ds = _header(f)
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise InputError("DICOM slice without ImagePositionPatient/ImageOrientationPatient (not a volume "
                             "series)", f)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError("multi-frame file inside a multi-file series (mixed series)", f)
        if ds.get("Rows") is None or ds.get("Columns") is None:
            raise InputError("DICOM file without Rows/Columns (not an image)", f)
        rows_cols.add((int(ds.Rows), int(ds.Columns)))
        iops.append(_as_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", f))
        ipps.append(_as_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", f))
        ps = ds.get("PixelSpacing", None)
        pss.append(_as_floats(ps, 2, "PixelSpacing", f) if ps is not None else np.array([np.nan, np.nan]))
    rows, cols = max(rows_cols, key=lambda rc: rc[0] * rc[1])
    check_voxels((cols, rows, len(files)), _SERIES_BYTES_PER_VOXEL, folder, max_voxels=max_voxels,
                 claim=f"the headers claim (Columns x Rows x {len(files)} slices)")
    if len(rows_cols) > 1:
        raise InputError(f"mixed DICOM series: slices of different sizes {sorted(rows_cols)}", folder)
    iop = iops[0]
    if any(np.abs(o - iop).max() > 1e-4 for o in iops):
        raise InputError("mixed DICOM series: slices with different orientations (ImageOrientationPatient)", folder)
    ps0 = pss[0]
    if not np.isfinite(ps0).all():
        raise InputError("DICOM series without PixelSpacing", folder)
    if min(ps0) <= 0:
        raise InputError(f"zero or negative PixelSpacing {ps0.tolist()}", files[0])
    if any(np.abs(p - ps0).max() > 1e-4 for p in pss):
        raise InputError("mixed DICOM series: slices with different PixelSpacing", folder)
    r, c = iop[:3], iop[3:]
    n = np.cross(r, c)
    if np.linalg.norm(n) < 1e-3:
        raise InputError(f"invalid ImageOrientationPatient {iop.tolist()} (row and column directions parallel)",
                         files[0])
    n = n / np.linalg.norm(n)
    pos = np.stack(ipps)
    d = pos @ n
    order = np.argsort(d, kind="stable")
    d_sorted = d[order]
    gaps = np.diff(d_sorted)
    if len(gaps) and gaps.min() < 1e-3:
        raise InputError("mixed DICOM series: two slices at the same position (several acquisitions or phases?)",
                         folder)
    # positions must move along the normal: no in-plane drift (gantry tilt / sheared stacks)
    inplane = (pos - pos[order[0]]) - np.outer(d - d_sorted[0], n)
    if np.abs(inplane).max() > 1e-2 * max(1.0, float(np.median(gaps)) if len(gaps) else 1.0):
        raise InputError("slice positions are not along the slice normal (gantry tilt or sheared series); "
                         "not supported", folder)
    return {"iop": iop, "normal": n, "positions": pos[order], "depths": d_sorted, "order": order,
            "gaps": gaps, "pixel_spacing": ps0, "rows_cols": next(iter(rows_cols))}


def _check_regular(geo: dict[str, Any], folder: Path) -> tuple[bool, str]:
    """(regular?, description of the irregularity)."""
    gaps: np.ndarray = geo["gaps"]
    if len(gaps) < 2:
        return True, ""
    med = float(np.median(gaps))
    tol = max(1e-3, 0.01 * med)
    if np.abs(gaps - med).max() <= tol:
        return True, ""
    k = int(np.argmax(np.abs(gaps - med)))
    d = geo["depths"]
    ratio = gaps[k] / med
    if abs(ratio - round(ratio)) <= 0.05 and round(ratio) >= 2:
        missing = int(round(ratio)) - 1
        what = (f"missing slice(s): a gap of {gaps[k]:.4g} mm between slice positions {d[k]:.4g} and "
                f"{d[k + 1]:.4g} mm along the normal where the spacing is {med:.4g} mm (about {missing} slice(s) "
                "missing)")
    else:
        what = f"irregular slice spacing: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm (median {med:.4g} mm)"
    return False, what


def read_dicom_folder(folder: str | os.PathLike[str], series_uid: str | None = None,
                      allow_resample: bool = False, *, max_voxels: int | None = None) -> Volume:
    """Read one DICOM series from ``folder`` as a :class:`Volume` (see the module docstring for the rules;
    ``max_voxels``: the size check's voxel limit, default :data:`~medcam3d.io.limits.DEFAULT_MAX_VOXELS`)."""
    d = Path(folder)
    series = list_series(d)
    s = _choose_series(d, series, series_uid)
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": s.modality,
        "series_uid": s.uid,
        "series_description": s.description,
        "n_series_in_folder": len(series),
        "resampled_slices": False,
    }
    notes = [_choice_note(d, series, s)] if series_uid is None and len(series) > 1 else []
    if s.n_files == 1:  # a multi-frame file, or a lone 2-D slice
        try:
            vol = read_dicom_file(s.files[0], max_voxels=max_voxels)
        except InputError as e:
            if "single 2-D DICOM slice" not in str(e):
                raise
            raise InputError(f"the DICOM series {s.uid} is a single 2-D slice; a 3-D volume is needed", d) from None
        vol.meta.update({k: v for k, v in meta.items() if k not in ("format",)})
        vol.meta["dicom_files"] = list(s.files)
        vol.meta["notes"] = notes
        return vol
    geo = _slice_geometry(s.files, d, max_voxels)
    files_sorted = [s.files[i] for i in geo["order"]]
    meta["dicom_files"] = files_sorted
    meta["notes"] = notes
    regular, problem = _check_regular(geo, d)
    if not regular and not allow_resample:
        raise InputError(f"{problem}; refused (read it with allow_resample=True to interpolate along the slice "
                         "normal)", d)
    import SimpleITK as sitk  # lazy: SimpleITK loads only when an ITK or DICOM file is read

    if regular:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files_sorted)
        try:
            with _itk_quiet():
                img = reader.Execute()
        except RuntimeError as e:
            raise InputError(f"could not read the DICOM series ({_first_line(e)})", d) from None
        return _volume_from_itk(img, str(d), meta)
    return _read_resampled(files_sorted, geo, d, meta, max_voxels)


def _read_resampled(files_sorted: list[str], geo: dict[str, Any], d: Path, meta: dict[str, Any],
                    max_voxels: int | None) -> Volume:
    """An irregular series, resampling allowed: read slices one by one and interpolate linearly along the normal
    to the median spacing."""
    import SimpleITK as sitk  # lazy: SimpleITK loads only when an ITK or DICOM file is read

    depths: np.ndarray = geo["depths"]
    step = float(np.median(geo["gaps"]))
    n_out = int(round((depths[-1] - depths[0]) / step)) + 1
    rows, cols = geo["rows_cols"]
    check_voxels((cols, rows, n_out), _RESAMPLE_BYTES_PER_VOXEL, d, max_voxels=max_voxels,
                 claim=f"resampling the slices to {step:.4g} mm would make")
    slices = []
    for f in files_sorted:
        try:
            with _itk_quiet():
                im = sitk.ReadImage(f)
        except RuntimeError as e:
            raise InputError(f"could not read DICOM slice ({_first_line(e)})", f) from None
        a = sitk.GetArrayFromImage(im)  # [1, rows, cols] = [k, j, i]
        slices.append(np.asarray(a, dtype=np.float32).reshape(a.shape[-2:]).T)  # [i, j]
    stack = np.stack(slices, axis=-1)  # [i, j, n_slices]
    targets = depths[0] + step * np.arange(n_out)
    hi = np.clip(np.searchsorted(depths, targets, side="right"), 1, len(depths) - 1)
    lo = hi - 1
    w = np.clip((targets - depths[lo]) / (depths[hi] - depths[lo]), 0.0, 1.0).astype(np.float32)
    arr = stack[..., lo] * (1.0 - w) + stack[..., hi] * w
    iop, n = geo["iop"], geo["normal"]
    direction = np.stack([iop[:3], iop[3:], n], axis=1)  # columns: i (along a row), j (down a column), normal
    ps = geo["pixel_spacing"]  # DICOM: (row spacing, column spacing) = (j, i)
    affine = itk_to_affine(geo["positions"][0], (ps[1], ps[0], step), direction.ravel())
    meta["resampled_slices"] = True
    meta["original_slice_depths_mm"] = [float(x) for x in depths]
    return Volume(arr.astype(np.float32), affine, str(d), meta)


def read_dicom_file(path: str | os.PathLike[str], *, max_voxels: int | None = None) -> Volume:
    """Read a single DICOM file. A multi-frame 3-D file becomes a Volume; a lone 2-D slice is refused (a 3-D
    volume is needed: give the folder of its series). The header's size is checked before pixels are read."""
    import SimpleITK as sitk  # lazy: SimpleITK loads only when an ITK or DICOM file is read

    p = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with _itk_quiet():
            reader.ReadImageInformation()
        _check_itk_header(reader, p, max_voxels)
        with _itk_quiet():
            img = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"could not read the DICOM file ({_first_line(e)})", p) from None
    size = img.GetSize()
    if img.GetDimension() == 2 or (img.GetDimension() == 3 and min(size) == 1):
        raise InputError(
            f"a single 2-D DICOM slice ({size[0]}x{size[1]}); a 3-D volume is needed -- give the folder of its "
            f"series ({p.parent}) instead",
            p,
        )
    ds = _header(str(p))
    meta = {"format": "dicom", "modality": str(ds.get("Modality", "") or ""),
            "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
            "series_description": str(ds.get("SeriesDescription", "") or ""), "dicom_files": [str(p)],
            "resampled_slices": False}
    return _volume_from_itk(img, str(p), meta)
