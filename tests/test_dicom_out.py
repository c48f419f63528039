"""``medcam3d explain --dicom-out --dicom-seg``: DICOM Parametric Maps and SEGs of the full-resolution heatmaps.

The written files are read back with pydicom, independently of the writer: every frame's pixels are placed in
space from the frame's own ImagePositionPatient / ImageOrientationPatient / PixelSpacing (LPS), turned into RAS and
looked up in the NIfTI heatmap through the NIfTI's own affine (nibabel, with its scaling). Values must be equal,
frames must sit on the source slices, and the objects must reference the source series.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scan_files import phantom_to_dicom

from medcam3d.cli import main
from medcam3d.data import make_phantom
from medcam3d.errors import InputError
from medcam3d.io import read_volume, write_parametric_map, write_segmentation

SHAPE = (12, 40, 48)  # slices, rows, columns
SPACING = (5.0, 2.5, 2.5)
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LEVEL = 0.05  # SEG threshold: the heatmaps peak on the network grid, often outside this small scan


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """A phantom as an axial DICOM series (one file per slice), without AccessionNumber (left empty, with a note)."""
    ph = make_phantom(5, shape=SHAPE, spacing=SPACING, present={"nodule_right_lung": True}, prevalence=0.0)
    d = tmp_path_factory.mktemp("series") / "ct"
    phantom_to_dicom(ph.hu, ph.affine, d)
    for f in d.iterdir():
        ds = pydicom.dcmread(f)
        del ds.AccessionNumber
        ds.save_as(f)
    return d


@pytest.fixture(scope="module")
def exported(tmp_path_factory, series):
    out = tmp_path_factory.mktemp("run") / "out"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["explain", str(series), "--out", str(out), "--quiet", "--full-res", "top-1", "--dicom-out",
                     "--dicom-seg", str(LEVEL)])
    assert code == 0, err.getvalue()
    return out, err.getvalue()


def _sources(series: Path) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True)
                                                   for f in series.iterdir())}


def _ras_of_frame_pixels(frame_group, shared) -> np.ndarray:
    """RAS mm ``[rows, cols, 3]`` of a frame's pixel centres from its DICOM plane geometry (LPS)."""
    ipp = np.array([float(v) for v in frame_group.PlanePositionSequence[0].ImagePositionPatient])
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    dr, dc = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)  # between rows, between columns
    return ipp, iop, dr, dc


def _lookup(nifti: Path, ds) -> list[np.ndarray]:
    """For each frame of ``ds``, the NIfTI values at the frame's pixel centres (nearest voxel; the grids coincide)."""
    img = nib.load(nifti)
    data = img.get_fdata()  # nibabel applies scl_slope / scl_inter
    inv = np.linalg.inv(img.affine)
    shared = ds.SharedFunctionalGroupsSequence[0]
    out = []
    for fg in ds.PerFrameFunctionalGroupsSequence:
        ipp, iop, dr, dc = _ras_of_frame_pixels(fg, shared)
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        lps = ipp + c[..., None] * dc * iop[:3] + r[..., None] * dr * iop[3:]  # DICOM: columns along the row dir
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = ras @ inv[:3, :3].T + inv[:3, 3]
        assert np.abs(ijk - np.round(ijk)).max() < 1e-3  # on the voxel centres
        idx = np.round(ijk).astype(int)
        out.append(data[idx[..., 0], idx[..., 1], idx[..., 2]])
    return out


def test_parametric_maps_reference_the_source_and_equal_the_nifti_maps(series, exported):
    out, _ = exported
    summary = json.loads((out / "summary.json").read_text())
    pms = summary["dicom_export"]["parametric_maps"]
    full = [c for c in summary["classes"] if c["full_resolution"]]
    assert len(full) == 1 and len(pms) == len(summary["methods"]) == 2
    sources = _sources(series)
    source_ipps = sorted(tuple(float(v) for v in s.ImagePositionPatient) for s in sources.values())
    any_source = next(iter(sources.values()))
    for name in pms:
        ds = pydicom.dcmread(out / name)
        method = name.split("_")[2]
        assert ds.SOPClassUID == PARAMETRIC_MAP_STORAGE
        assert ds.StudyInstanceUID == any_source.StudyInstanceUID
        assert ds.FrameOfReferenceUID == any_source.FrameOfReferenceUID
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == any_source.SeriesInstanceUID
        refs = {r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert refs == set(sources)
        assert int(ds.NumberOfFrames) == SHAPE[0] and (ds.Rows, ds.Columns) == SHAPE[1:]
        ipps = sorted(tuple(float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient)
                      for fg in ds.PerFrameFunctionalGroupsSequence)
        np.testing.assert_allclose(ipps, source_ipps, atol=1e-4)  # one frame on each source slice
        rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0] \
            if "RealWorldValueMappingSequence" in ds.SharedFunctionalGroupsSequence[0] \
            else ds.PerFrameFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        slope, intercept = float(rwvm.RealWorldValueSlope), float(rwvm.RealWorldValueIntercept)
        frames = ds.pixel_array.astype(np.float64) * slope + intercept
        c = full[0]
        nifti = out / f"fullres_{method}_{c['index']:03d}_{c['label']}.nii.gz"
        expected = _lookup(nifti, ds)
        for k, exp in enumerate(expected):
            np.testing.assert_allclose(frames[k], exp, rtol=0, atol=1e-6)
        assert 0.0 < max(float(e.max()) for e in expected) <= 1.0  # a display heatmap in [0, 1], not empty


def test_segmentations_are_the_maps_at_the_stated_level(series, exported):
    out, _ = exported
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dicom_export"]["seg_threshold"] == LEVEL
    c = next(c for c in summary["classes"] if c["full_resolution"])
    sources = _sources(series)
    total = 0
    for name in summary["dicom_export"]["segmentations"]:
        ds = pydicom.dcmread(out / name)
        method = name.split("_")[2]
        assert ds.SOPClassUID == SEGMENTATION_STORAGE and ds.SegmentationType == "BINARY"
        assert ds.SegmentSequence[0].SegmentLabel.endswith(f">= {LEVEL:g}")
        assert ds.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
        nifti = out / f"fullres_{method}_{c['index']:03d}_{c['label']}.nii.gz"
        masks = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
        expected = _lookup(nifti, ds)
        assert len(expected) == SHAPE[0]
        for k, exp in enumerate(expected):
            np.testing.assert_array_equal(masks[k].astype(bool), exp >= LEVEL)
        total += sum(int(m.sum()) for m in masks)
    assert total > 0  # not trivially empty


def test_assumed_attributes_are_noted(exported):
    out, err = exported
    line = "DICOM export: the source series lacks AccessionNumber; left empty in the export"
    assert err.strip().splitlines() == [f"medcam3d: note: {line}"]
    assert json.loads((out / "summary.json").read_text())["assumptions"] == [line]
    assert pydicom.dcmread(next(out.glob("dicom_pm_*.dcm"))).AccessionNumber == ""


def test_missing_frame_of_reference_gets_one_generated_uid_with_a_note(tmp_path, series):
    d = tmp_path / "nofor"
    shutil.copytree(series, d)
    for f in d.iterdir():
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    v = read_volume(d)
    heat = np.linspace(0.0, 1.0, int(np.prod(v.shape)), dtype=np.float32).reshape(v.shape)
    notes: list[str] = []
    write_parametric_map(heat, v, tmp_path / "pm.dcm", on_note=notes.append)
    write_segmentation(heat, v, tmp_path / "seg.dcm", 0.5, on_note=notes.append)
    uids = {pydicom.dcmread(tmp_path / n).FrameOfReferenceUID for n in ("pm.dcm", "seg.dcm")}
    assert len(uids) == 1  # the same generated UID for every export of the series
    (uid,) = uids
    for_notes = [n for n in notes if "FrameOfReferenceUID" in n]
    assert len(for_notes) == 2 and len(set(for_notes)) == 1 and "\n" not in for_notes[0]
    assert for_notes[0] == (f"DICOM export: the source series has no FrameOfReferenceUID; a generated one ({uid}) is "
                            "used, so viewers will not register the map with the scan automatically")


def test_missing_sop_instance_uid_is_one_line_before_any_work(tmp_path, capsys, series):
    d = tmp_path / "nosop"
    shutil.copytree(series, d)
    victim = sorted(d.iterdir())[3]
    ds = pydicom.dcmread(victim)
    del ds.SOPInstanceUID
    ds.save_as(victim)
    out = tmp_path / "out"
    code = main(["explain", str(d), "--out", str(out), "--quiet", "--dicom-out"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (f"medcam3d: error: {d}: source slice {victim} has no SOPInstanceUID, so a DICOM export "
                        "could not reference it")
    assert not out.exists()
    with pytest.raises(InputError, match="has no SOPInstanceUID"):
        write_parametric_map(np.zeros(read_volume(d).shape, np.float32), read_volume(d), tmp_path / "x.dcm")


def test_batch_dicom_out_writes_the_same_objects_per_scan(tmp_path, series):
    cohort = tmp_path / "cohort"
    shutil.copytree(series, cohort / "case1")
    out = tmp_path / "batch"
    code = main(["batch", str(cohort), "--out", str(out), "--shard", "0/1", "--quiet", "--no-report",
                 "--full-res", "top-1", "--dicom-out"])
    assert code == 0
    (folder,) = (out / "scans").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    pms = summary["dicom_export"]["parametric_maps"]
    assert len(pms) == 2 and summary["dicom_export"]["segmentations"] == []
    assert sorted(p.name for p in folder.glob("dicom_*.dcm")) == sorted(pms)
    source = next(iter(_sources(series).values()))
    for name in pms:
        ds = pydicom.dcmread(folder / name)
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        assert int(ds.NumberOfFrames) == SHAPE[0]
