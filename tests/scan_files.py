"""Shared test data: scans written as files -- malformed scans of every kind, phantoms as DICOM series."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import SimpleITK as sitk
from pydicom.uid import generate_uid

CT5N = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_raw_nifti(path: Path, data: np.ndarray, pixdim=(1.0, 1.0, 1.0), sform=None) -> Path:
    """Write a NIfTI byte for byte, bypassing nibabel's header fixes (for malformed files)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.float32)
    hdr["pixdim"][1:4] = pixdim
    if sform is None:
        hdr["qform_code"], hdr["sform_code"] = 1, 0
    else:
        hdr.set_sform(np.asarray(sform, dtype=np.float64), code=1)
        hdr["qform_code"] = 0
    with open(path, "wb") as f:
        hdr.write_to(f)
        f.write(b"\0" * (int(hdr["vox_offset"]) - 348))
        f.write(np.asarray(data, dtype=np.float32).tobytes(order="F"))
    return path


def copy_series(src: Path, dst: Path, new_series: bool, keep: int | None = None, drop: set[int] | None = None,
                 prefix: str = "") -> list[Path]:
    """Copy CT5N's files (sorted by position) into ``dst``, optionally as a new series and without some slices."""
    files = sorted(src.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    series_uid = generate_uid() if new_series else None
    out = []
    dst.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files[:keep] if keep else files):
        if drop and i in drop:
            continue
        ds = pydicom.dcmread(f)
        if series_uid is not None:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = dst / f"{prefix}{i:03d}.dcm"
        ds.save_as(p)
        out.append(p)
    return out


def bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path to read, regex the message must match)."""
    d = tmp / "inputs"
    d.mkdir()
    cases: dict[str, tuple[Path, str]] = {}
    good = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    cases["missing file"] = (d / "nope.nii.gz", "no such file")
    (d / "notes.txt").write_text("hello")
    cases["not an image (txt)"] = (d / "notes.txt", "not a supported image")
    (d / "text.nii").write_text("this is not a NIfTI file at all, just some text " * 10)
    cases["not an image (.nii)"] = (d / "text.nii", "not a NIfTI image|unreadable")
    (d / "text.mha").write_text("hello")
    cases["not an image (.mha)"] = (d / "text.mha", "not an image|unreadable")
    (d / "random.nii.gz").write_bytes(np.random.default_rng(1).bytes(2000))
    cases["corrupt gzip"] = (d / "random.nii.gz", "corrupt or truncated gzip")
    full = gzip.compress(nib.Nifti1Image(good, np.eye(4)).to_bytes())
    (d / "truncated.nii.gz").write_bytes(full[: len(full) // 2])
    cases["truncated gzip"] = (d / "truncated.nii.gz", "corrupt or truncated gzip")
    (d / "empty.nii.gz").write_bytes(b"")
    cases["empty file"] = (d / "empty.nii.gz", "empty file")
    save_nifti(d / "flat.nii.gz", good[:, :, 0], np.eye(4))
    cases["2-D"] = (d / "flat.nii.gz", "2-D image")
    save_nifti(d / "slab.nii.gz", good[:, :, :1], np.eye(4))
    cases["2-D (one slice)"] = (d / "slab.nii.gz", "2-D image")
    save_nifti(d / "time.nii.gz", np.stack([good, good], -1), np.eye(4))
    cases["4-D"] = (d / "time.nii.gz", "4-D image")
    nan = good.copy()
    nan[1, 2, 3] = np.nan
    save_nifti(d / "nan.nii.gz", nan, np.eye(4))
    cases["NaN voxels"] = (d / "nan.nii.gz", "1 voxel.* NaN or Inf")
    inf = good.copy()
    inf[0, 0, 0] = np.inf
    inf[1, 0, 0] = -np.inf
    save_nifti(d / "inf.nii.gz", inf, np.eye(4))
    cases["Inf voxels"] = (d / "inf.nii.gz", "2 voxel.* NaN or Inf")
    write_raw_nifti(d / "zero_spacing.nii", good, pixdim=(1.0, 1.0, 0.0))
    cases["zero spacing (NIfTI)"] = (d / "zero_spacing.nii", "zero or negative voxel spacing")
    write_raw_nifti(d / "neg_spacing.nii", good, pixdim=(1.0, -2.0, 1.0))
    cases["negative spacing (NIfTI)"] = (d / "neg_spacing.nii", "zero or negative voxel spacing")
    img = sitk.GetImageFromArray(good)
    sitk.WriteImage(img, str(d / "ok.mha"))
    head = (d / "ok.mha").read_bytes()
    (d / "zero_spacing.mha").write_bytes(head.replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 0 1"))
    cases["zero spacing (MHA)"] = (d / "zero_spacing.mha", "zero or negative voxel spacing")
    (d / "neg_spacing.mha").write_bytes(head.replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 1 -2"))
    cases["negative spacing (MHA)"] = (d / "neg_spacing.mha", "zero or negative voxel spacing")
    singular = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0, 0, 0, 1]])
    write_raw_nifti(d / "singular.nii", good, sform=singular)
    cases["singular affine"] = (d / "singular.nii", "singular affine")
    (d / "empty_dicom").mkdir()
    cases["empty DICOM folder"] = (d / "empty_dicom", "empty DICOM folder")
    (d / "not_dicom").mkdir()
    (d / "not_dicom" / "readme.txt").write_text("x")
    cases["folder without DICOM"] = (d / "not_dicom", "no DICOM image series")
    copy_series(CT5N, d / "gap", new_series=False, drop={2})
    cases["missing slice"] = (d / "gap", "missing slice")
    copy_series(CT5N, d / "two", new_series=False, prefix="a")
    copy_series(CT5N, d / "two", new_series=True, prefix="b")
    cases["several series, none chosen"] = (d / "two", "2 DICOM series and none chosen")
    cases["single DICOM slice"] = (CT_SMALL, "single 2-D DICOM slice")
    (d / "one_slice").mkdir()
    shutil.copy(CT_SMALL, d / "one_slice" / "only.dcm")
    cases["DICOM folder with one 2-D slice"] = (d / "one_slice", "is a single 2-D slice")
    return cases


def phantom_to_dicom(hu: np.ndarray, affine: np.ndarray, folder: Path) -> None:
    """Write an SPL-ordered phantom [S, P, L] as an axial DICOM series (one file per slice), using pydicom's
    CT_small.dcm as the template. DICOM patient coordinates are LPS."""
    folder.mkdir(parents=True)
    tmpl = pydicom.dcmread(CT_SMALL)
    series = generate_uid()
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    col_dir = ras_to_lps @ affine[:3, 2] / np.linalg.norm(affine[:3, 2])  # along columns (array axis 2)
    row_dir = ras_to_lps @ affine[:3, 1] / np.linalg.norm(affine[:3, 1])  # down rows (array axis 1)
    for k in range(hu.shape[0]):
        ds = tmpl.copy()
        origin = ras_to_lps @ (affine @ np.array([k, 0, 0, 1.0]))[:3]
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.PixelSpacing = [float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 2]))]
        ds.SliceThickness = float(np.linalg.norm(affine[:3, 0]))
        ds.ImageOrientationPatient = [*map(float, col_dir), *map(float, row_dir)]
        ds.ImagePositionPatient = [float(v) for v in origin]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.round(hu[k] + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm")
