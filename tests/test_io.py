"""medcam3d.io: reading scans into RAS volumes, DICOM series rules, exports, atomic writes, bad input.

Expected geometry is computed independently in the tests (SimpleITK's own NIfTI writer, pydicom's
ImagePositionPatient, hand-written LPS->RAS, block centres averaged from integer indices), never from the code under
test.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
import SimpleITK as sitk
from scan_files import CT5N, CT_SMALL, bad_inputs, copy_series, save_nifti

from medcam3d.errors import InputError
from medcam3d.io import (
    Volume,
    affine_to_itk,
    check_min_size,
    itk_to_affine,
    list_series,
    lowres_affine,
    read_lowres_labels,
    read_volume,
    write_lowres_maps,
    write_map_like,
    write_nifti,
)

PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "InstitutionName",
            "ReferringPhysicianName", "AccessionNumber", "StudyID")


def _ras_from_lps(p) -> np.ndarray:
    x, y, z = (float(v) for v in p)
    return np.array([-x, -y, z])


# --- Volume and geometry helpers ----------------------------------------------------------------------------------
def test_volume_spacing_world_and_metatensor_round_trip():
    a = np.array([[0.0, 0.0, -2.0, 10.0], [-1.5, 0.0, 0.0, 20.0], [0.0, 3.0, 0.0, -5.0], [0, 0, 0, 1]])
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    v = Volume(arr, a, "x.nii")
    assert v.spacing == pytest.approx((1.5, 3.0, 2.0))
    assert v.axcodes == "PSL"
    np.testing.assert_allclose(v.index_to_world([1, 2, 3]), [10 - 6.0, 20 - 1.5, -5 + 6.0])
    np.testing.assert_allclose(v.world_to_index(v.index_to_world([1.5, 2, 3.25])), [1.5, 2, 3.25])
    mt = v.to_metatensor()
    assert tuple(mt.shape) == (1, 4, 5, 6)
    np.testing.assert_allclose(np.asarray(mt.affine), a)
    back = Volume.from_metatensor(mt)
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.affine, a)
    # an LPS MetaTensor (as MONAI's ITK reader can make) comes back in RAS
    mt.meta["space"] = "LPS"
    np.testing.assert_allclose(Volume.from_metatensor(mt).affine, np.diag([-1, -1, 1, 1]) @ a)


def test_itk_affine_conversion_matches_hand_computation():
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rows of D
    a = itk_to_affine((5.0, -7.0, 2.0), (0.5, 0.7, 3.0), direction)
    # ITK: LPS(i,j,k) = origin + D @ diag(spacing) @ ijk ; RAS = (-L, -P, S)
    ijk = np.array([2.0, 3.0, 1.0])
    lps = np.array([5.0, -7.0, 2.0]) + np.array(direction).reshape(3, 3) @ (np.array([0.5, 0.7, 3.0]) * ijk)
    np.testing.assert_allclose(a[:3, :3] @ ijk + a[:3, 3], [-lps[0], -lps[1], lps[2]])
    o, s, d = affine_to_itk(a)
    np.testing.assert_allclose(o, (5.0, -7.0, 2.0))
    np.testing.assert_allclose(s, (0.5, 0.7, 3.0))
    np.testing.assert_allclose(d, direction, atol=1e-12)


def test_check_min_size():
    check_min_size(np.zeros((1, 10, 12, 14)), (10, 12, 14), "a.nii")
    with pytest.raises(InputError, match=r"a\.nii: volume too small for the model: 10x11x14"):
        check_min_size(np.zeros((1, 10, 11, 14)), (10, 12, 14), "a.nii")
    check_min_size(np.zeros((3, 3, 3)), None, "a.nii")


# --- NIfTI / NRRD / MHA ----------------------------------------------------------------------------------------------
def test_nifti_keeps_index_order_and_affine(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 5, 4)).astype(np.float32)
    aff = np.array([[0.0, -0.9, 0.0, 30.0], [0.0, 0.0, 2.5, -11.0], [1.1, 0.0, 0.0, 4.0], [0, 0, 0, 1]])
    p = save_nifti(tmp_path / "s.nii.gz", data, aff)
    v = read_volume(p)
    np.testing.assert_array_equal(v.array, data)
    np.testing.assert_allclose(v.affine, nib.load(p).affine)
    assert v.meta["format"] == "nifti" and v.meta["affine_from"] == "sform"
    # a trailing singleton 4th axis (x, y, z, 1) is a 3-D volume
    p4 = save_nifti(tmp_path / "t.nii", data[..., None], aff)
    np.testing.assert_array_equal(read_volume(p4).array, data)


def test_nifti_scaled_integers_read_in_real_units(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "hu.nii"))
    v = read_volume(tmp_path / "hu.nii")
    np.testing.assert_allclose(v.array, data * 2.0 - 1024.0)
    assert v.array.dtype == np.float32


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_are_converted_from_lps(tmp_path, suffix):
    arr_kji = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # numpy [k, j, i]
    img = sitk.GetImageFromArray(arr_kji)
    img.SetSpacing((0.8, 1.2, 2.0))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection((0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    p = tmp_path / f"x{suffix}"
    sitk.WriteImage(img, str(p))
    v = read_volume(p)
    assert v.shape == (6, 5, 4)  # ITK index order (i, j, k)
    np.testing.assert_array_equal(v.array, arr_kji.transpose(2, 1, 0))
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        lps = img.TransformIndexToPhysicalPoint(tuple(int(c) for c in ijk))
        np.testing.assert_allclose(v.index_to_world(ijk), _ras_from_lps(lps), atol=1e-5)
    # SimpleITK's own NIfTI writer agrees (it does the LPS -> RAS flip itself)
    sitk.WriteImage(img, str(tmp_path / "ref.nii.gz"))
    np.testing.assert_allclose(v.affine, nib.load(tmp_path / "ref.nii.gz").affine, atol=1e-5)


# --- DICOM ---------------------------------------------------------------------------------------------------------
def test_dicom_series_matches_simpleitk_nifti_writer_and_pydicom(tmp_path):
    v = read_volume(CT5N)
    assert v.shape == (16, 16, 5)
    # 1) SimpleITK's own reader + NIfTI writer, read back with nibabel
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(CT5N)))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "ref.nii.gz"))
    ref = nib.load(tmp_path / "ref.nii.gz")
    np.testing.assert_allclose(v.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(v.array, ref.get_fdata(), atol=1e-3)
    # 2) pydicom, independently: each slice's ImagePositionPatient is the world position of voxel (0, 0, k), and
    #    pixel (row r, column c) is voxel (i=c, j=r)
    ks = []
    for f in CT5N.iterdir():
        ds = pydicom.dcmread(f)
        p0 = _ras_from_lps(ds.ImagePositionPatient)
        k = int(np.argmin([np.linalg.norm(v.index_to_world((0, 0, kk)) - p0) for kk in range(5)]))
        np.testing.assert_allclose(v.index_to_world((0, 0, k)), p0, atol=1e-4)
        # one step along a row (column index + 1) moves by PixelSpacing[1] along the row cosine
        row_dir = _ras_from_lps(ds.ImageOrientationPatient[:3])
        np.testing.assert_allclose(v.index_to_world((1, 0, k)) - p0, row_dir * float(ds.PixelSpacing[1]),
                                   atol=1e-5)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(v.array[:, :, k], hu.T)
        ks.append(k)
    assert sorted(ks) == list(range(5))
    assert v.meta["modality"] == "CT" and v.meta["series_uid"] == str(ds.SeriesInstanceUID)


def test_dicom_meta_has_no_patient_identifiers():
    v = read_volume(CT5N)
    ds = pydicom.dcmread(next(CT5N.iterdir()))
    text = json.dumps(v.meta, default=str).lower()
    assert "patient" not in text
    for tag in PHI_TAGS:
        value = str(ds.get(tag, "") or "").strip().lower()
        if len(value) > 3:
            assert value not in text, tag


def test_single_dicom_slice_is_refused_with_a_hint():
    with pytest.raises(InputError) as e:
        read_volume(CT_SMALL)
    msg = str(e.value)
    assert "CT_small.dcm" in msg and "2-D" in msg and "folder" in msg and "\n" not in msg


def test_several_series_most_slices_tie_and_uid(tmp_path):
    folder = tmp_path / "study"
    copy_series(CT5N, folder, new_series=False, prefix="a")
    scout = copy_series(CT5N, folder, new_series=True, keep=2, prefix="b")
    scout_uid = str(pydicom.dcmread(scout[0]).SeriesInstanceUID)
    v = read_volume(folder)  # 5 slices beat 2
    assert v.shape == (16, 16, 5) and v.meta["n_series_in_folder"] == 2
    assert {s.n_files for s in list_series(folder)} == {5, 2}
    # a tie is ambiguous: refused, naming the folder and both UIDs
    tie = copy_series(CT5N, folder, new_series=True, prefix="c")
    tie_uid = str(pydicom.dcmread(tie[0]).SeriesInstanceUID)
    with pytest.raises(InputError) as e:
        read_volume(folder)
    assert str(folder) in str(e.value) and tie_uid in str(e.value) and "series_uid" in str(e.value)
    v2 = read_volume(folder, series_uid=tie_uid)
    assert v2.meta["series_uid"] == tie_uid and v2.shape == (16, 16, 5)
    assert read_volume(folder, series_uid=scout_uid).shape == (16, 16, 2)  # any series can be chosen by UID
    with pytest.raises(InputError, match="no DICOM series with SeriesInstanceUID 1.2.3"):
        read_volume(folder, series_uid="1.2.3")


def test_missing_slice_refused_or_resampled(tmp_path):
    folder = tmp_path / "gap"
    copy_series(CT5N, folder, new_series=False, drop={2})
    with pytest.raises(InputError) as e:
        read_volume(folder)
    assert "missing slice" in str(e.value) and str(folder) in str(e.value)
    full = read_volume(CT5N)
    v = read_volume(folder, allow_resample=True)
    assert v.shape == (16, 16, 5) and v.meta["resampled_slices"] is True
    np.testing.assert_allclose(v.affine, full.affine, atol=1e-4)
    for k in (0, 1, 3, 4):
        np.testing.assert_allclose(v.array[:, :, k], full.array[:, :, k])
    np.testing.assert_allclose(v.array[:, :, 2], 0.5 * (full.array[:, :, 1] + full.array[:, :, 3]), atol=1e-3)


def test_irregular_spacing_is_refused(tmp_path):
    folder = tmp_path / "irr"
    files = copy_series(CT5N, folder, new_series=False)
    ds = pydicom.dcmread(files[3])
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                               float(ds.ImagePositionPatient[2]) - 0.9]
    ds.save_as(files[3])
    with pytest.raises(InputError, match="irregular slice spacing"):
        read_volume(folder)


# --- export --------------------------------------------------------------------------------------------------------
def test_write_map_like_has_exact_source_geometry(tmp_path):
    aff = np.array([[0.0, 0.0, -1.3, 40.5], [0.0, 0.7, 0.0, -3.25], [2.0, 0.0, 0.0, 12.0], [0, 0, 0, 1]])
    src = save_nifti(tmp_path / "scan.nii.gz", np.zeros((6, 7, 8), np.float32), aff)
    vol = read_volume(src)
    m = np.random.default_rng(1).random((6, 7, 8))
    out = write_map_like(m, vol, tmp_path / "out" / "map.nii.gz")
    img = nib.load(out)
    assert img.shape == (6, 7, 8) and img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.affine, nib.load(src).affine)
    np.testing.assert_allclose(img.get_fdata(), m.astype(np.float32))
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.header.get_qform(), aff, atol=1e-5)
    # wrong shape: refused before anything is written
    with pytest.raises(InputError, match="map has shape"):
        write_map_like(np.zeros((6, 7, 9)), vol, tmp_path / "out2" / "map.nii.gz")
    assert not (tmp_path / "out2").exists()


def test_lowres_affine_by_hand():
    grid = np.diag([2.0, 1.0, 0.5, 1.0])
    grid[:3, 3] = [10.0, 20.0, 30.0]
    a = lowres_affine(grid, (12, 8, 10), (4, 2, 5))  # f = 3, 4, 2
    np.testing.assert_allclose(np.diag(a)[:3], [6.0, 4.0, 1.0])
    # voxel 0 is centred on grid index (f - 1) / 2 = (1, 1.5, 0.5)
    np.testing.assert_allclose(a[:3, 3], [10.0 + 2.0 * 1.0, 20.0 + 1.5, 30.0 + 0.25])


def test_lowres_4d_export_overlays_at_block_centres(tmp_path):
    # a network grid in SPL with an oblique tilt, as a preprocessor could produce
    c, s = np.cos(0.2), np.sin(0.2)
    grid_affine = np.array([[2.0 * s, 0.0, -1.5 * c, 12.0], [0.0, -1.25, 0.0, 30.0], [2.0 * c, 0.0, 1.5 * s, -40.0],
                            [0, 0, 0, 1]])
    grid_shape = (24, 30, 30)
    map_shape = (8, 5, 6)  # blocks of 3 x 6 x 5 grid voxels
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(3, *map_shape)).astype(np.float32)
    labels = ["nodule", "mass", "effusion"]
    path = write_lowres_maps(maps, grid_affine, grid_shape, tmp_path / "hirescam_lowres.nii.gz", labels=labels)
    img = nib.load(path)
    assert img.shape == (*map_shape, 3)  # (x, y, z, K): the 4th NIfTI axis is the class
    data = img.get_fdata()
    inv = np.linalg.inv(img.affine)
    f = np.array(grid_shape) // np.array(map_shape)
    for j in np.ndindex(*map_shape):
        # the block of grid voxels that map voxel j summarises, and its centre (mean of the block's indices)
        block = np.stack(np.meshgrid(*[np.arange(j[d] * f[d], (j[d] + 1) * f[d]) for d in range(3)],
                                     indexing="ij"), -1).reshape(-1, 3)
        centre_world = grid_affine[:3, :3] @ block.mean(0) + grid_affine[:3, 3]
        vox = inv[:3, :3] @ centre_world + inv[:3, 3]
        np.testing.assert_allclose(vox, j, atol=1e-4)
        for k in range(3):
            assert data[tuple(np.round(vox).astype(int)) + (k,)] == pytest.approx(maps[k][j], abs=1e-6)
    # each low-res voxel is f grid voxels wide
    np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0),
                               f * np.linalg.norm(grid_affine[:3, :3], axis=0), atol=1e-5)
    assert read_lowres_labels(path) == labels
    assert int(img.header["qform_code"]) == 1  # orthogonal affine: both sform and qform set


def test_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "map.nii.gz"
    write_nifti(np.ones((3, 3, 3)), np.eye(4), target)
    before = target.read_bytes()

    def crash(img, filename):  # write half a file, then die
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(np.zeros((3, 3, 3)), np.eye(4), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.nii.gz"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any other file, not a 0600 temp


def test_atomic_path_has_one_home():
    # medcam3d.files is its home; the io names stay importable for one release
    from medcam3d import files
    from medcam3d.io import atomic_path, writers

    assert atomic_path is files.atomic_path and writers.atomic_path is files.atomic_path


def test_write_nifti_refuses_bad_arrays_without_writing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="NaN or Inf"):
        write_nifti(np.full((2, 2, 2), np.nan), np.eye(4), out / "a.nii.gz")
    with pytest.raises(InputError, match="singular affine|zero voxel spacing"):
        write_nifti(np.zeros((2, 2, 2)), np.diag([1.0, 1.0, 0.0, 1.0]), out / "a.nii.gz")
    with pytest.raises(InputError, match=r"\.nii or \.nii\.gz"):
        write_nifti(np.zeros((2, 2, 2)), np.eye(4), out / "a.png")
    assert not out.exists()


# --- every bad input: one-line InputError naming the file, nothing written -------------------------------------------
def _read_and_export(path: Path, out: Path) -> None:
    """What a command does: read, then write a map like the scan."""
    vol = read_volume(path)
    write_map_like(np.zeros(vol.shape, np.float32), vol, out / "map.nii.gz")


def test_every_bad_input_gives_a_one_line_error_naming_the_file_and_writes_nothing(tmp_path):
    cases = bad_inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    failures = []
    for name, (path, pattern) in cases.items():
        try:
            _read_and_export(path, out)
        except InputError as e:
            msg = str(e)
            import re

            if path.name not in msg or "\n" in msg or not re.search(pattern, msg):
                failures.append(f"{name}: {msg!r}")
        else:
            failures.append(f"{name}: no error")
        if list(out.iterdir()):
            failures.append(f"{name}: wrote {list(out.iterdir())}")
    assert not failures, "\n".join(failures)
    # and the good copy of the same data does go through
    _read_and_export(tmp_path / "inputs" / "ok.mha", out)
    assert [p.name for p in out.iterdir()] == ["map.nii.gz"]


def test_dicom_folder_copy_reads_like_the_original(tmp_path):
    shutil.copytree(CT5N, tmp_path / "copy")
    a, b = read_volume(CT5N), read_volume(tmp_path / "copy")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)


def test_dicom_parametric_map_overlays_the_source_slices(tmp_path):
    pytest.importorskip("highdicom")
    from medcam3d.io import write_parametric_map

    vol = read_volume(CT5N)
    m = np.random.default_rng(5).random(vol.shape).astype(np.float32)
    out = write_parametric_map(m, vol, tmp_path / "pm" / "hirescam.dcm", label="HiResCAM")
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    src = pydicom.dcmread(next(CT5N.iterdir()))
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID and ds.StudyInstanceUID == src.StudyInstanceUID
    refs = {r.SeriesInstanceUID for r in ds.ReferencedSeriesSequence}
    assert src.SeriesInstanceUID in refs
    pix = ds.pixel_array
    assert pix.dtype == np.float32 and pix.shape == (5, 16, 16)
    # each frame sits where its values belong: its position is voxel (0, 0, k) of the scan, its pixels map[:, :, k].T
    for f, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pos = _ras_from_lps(fg.PlanePositionSequence[0].ImagePositionPatient)
        k = int(np.argmin([np.linalg.norm(vol.index_to_world((0, 0, kk)) - pos) for kk in range(5)]))
        np.testing.assert_allclose(vol.index_to_world((0, 0, k)), pos, atol=1e-4)
        np.testing.assert_allclose(pix[f], m[:, :, k].T)
    with pytest.raises(InputError, match="not a DICOM series"):
        write_parametric_map(np.zeros((4, 4, 4)), Volume(np.zeros((4, 4, 4)), np.eye(4), "x.nii"),
                             tmp_path / "x" / "a.dcm")
    assert not (tmp_path / "x").exists()
