"""Issue 18: refuse before allocating, say what was assumed.

Size checks on headers (NIfTI, NRRD/MHA, DICOM) and resampled grids, gzip streams stopped while they expand, complex
voxels, modality checks, the DICOM series-choice note. Memory bombs run in a subprocess under an address-space cap
(what importing medcam3d took + 2 GiB) and must be refused by the size check, not by a MemoryError.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from bombs import (
    claims_huge,
    extension_lie_8gib,
    header_bytes,
    honest_8gib,
    run_capped,
    trailing_8gib,
    zeros_gz,
)
from scan_files import CT5N, copy_series, save_nifti

from medcam3d.config import Config, load_config
from medcam3d.errors import InputError
from medcam3d.io import Volume, check_modality, looks_like_ct, read_volume
from medcam3d.io.limits import DEFAULT_MAX_VOXELS, GunzipStream, check_voxels
from medcam3d.preprocess import Preprocessor


def sha(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


# --- the limits themselves --------------------------------------------------------------------------------------
def test_default_limit_is_the_documented_one():
    assert DEFAULT_MAX_VOXELS == 1_500_000_000  # a whole-body CT is ~5e8


def test_check_voxels_counts_exactly_and_names_claim_and_limit():
    check_voxels((10, 10, 10), 1, "f.nii", max_voxels=1000)  # exactly at the limit: fine
    with pytest.raises(InputError, match=r"^f\.nii: size check: the header claims 10 x 10 x 11 = 1100 voxels, "
                                         r"more than the limit of 1000 voxels"):
        check_voxels((10, 10, 11), 1, "f.nii", max_voxels=1000)
    # Python ints: 100000^3 does not overflow into a small number
    with pytest.raises(InputError, match=r"1e\+15 voxels"):
        check_voxels((100000, 100000, 100000), 1, "f.nii")


def test_gunzip_stream_matches_gzip_over_several_members():
    rng = np.random.default_rng(0)
    parts = [rng.bytes(3000), b"\0" * 200_000, rng.bytes(10)]
    blob = b"".join(gzip.compress(p) for p in parts)
    s = GunzipStream(io.BytesIO(blob))
    got = b"".join(iter(lambda: s.read(777), b""))
    assert got == b"".join(parts) == gzip.decompress(blob)
    assert s.total == len(got)
    bad = bytearray(gzip.compress(parts[0]))
    bad[-6] ^= 0xFF  # corrupt the CRC-32 in the trailer: zlib checks it when the member ends
    with pytest.raises(zlib.error):
        GunzipStream(io.BytesIO(bytes(bad))).read(10**6)
    with pytest.raises(EOFError):
        GunzipStream(io.BytesIO(gzip.compress(parts[0])[:-20])).read(10**6)


# --- NIfTI headers and gzip streams (in process: the refusals allocate nothing) ------------------------------------
@pytest.mark.parametrize(("name", "side", "nifti2", "claimed"), [
    ("nifti1_32767.nii", 32767, False, r"32767 x 32767 x 32767 = 3.52e\+13 voxels"),
    ("nifti1_32767.nii.gz", 32767, False, r"32767 x 32767 x 32767 = 3.52e\+13 voxels"),
    ("nifti2_100000.nii.gz", 100000, True, r"100000 x 100000 x 100000 = 1e\+15 voxels"),
])
def test_header_claiming_a_huge_grid_is_refused_before_reading(tmp_path, name, side, nifti2, claimed):
    p = claims_huge(tmp_path / name, side, nifti2)
    with pytest.raises(InputError, match=rf"size check: the header claims {claimed}, more than the limit of "
                                         r"1.5e\+09 voxels \(raise it with --max-voxels"):
        read_volume(p)


def test_max_voxels_changes_the_limit_for_nifti_nrrd_and_mha(tmp_path):
    a = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    save_nifti(tmp_path / "s.nii.gz", a, np.eye(4))
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "s.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "s.mha"))
    for name in ("s.nii.gz", "s.nrrd", "s.mha"):
        assert read_volume(tmp_path / name, max_voxels=336).array.size == 336  # at the limit: read
        with pytest.raises(InputError, match=r"size check: the header claims \d x \d x \d = 336 voxels, more than "
                                             r"the limit of 335 voxels"):
            read_volume(tmp_path / name, max_voxels=335)


def test_nrrd_and_mha_headers_claiming_huge_grids_are_refused(tmp_path):
    a = np.zeros((8, 8, 8), np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "s.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "s.nrrd"))
    mha = (tmp_path / "s.mha").read_bytes().replace(b"DimSize = 8 8 8", b"DimSize = 40000 40000 40000")
    (tmp_path / "big.mha").write_bytes(mha)
    nrrd = (tmp_path / "s.nrrd").read_bytes().replace(b"sizes: 8 8 8", b"sizes: 50000 50000 50000")
    (tmp_path / "big.nrrd").write_bytes(nrrd)
    with pytest.raises(InputError, match=r"size check: the header claims 40000 x 40000 x 40000 = 6.4e\+13"):
        read_volume(tmp_path / "big.mha")
    with pytest.raises(InputError, match=r"size check: the header claims 50000 x 50000 x 50000 = 1.25e\+14"):
        read_volume(tmp_path / "big.nrrd")


def test_gzip_expanding_beyond_its_header_is_stopped_while_decompressing(tmp_path):
    """A valid 8^3 image followed by 256 MiB of zeros: refused once the stream runs 1 MiB past what the header
    accounts for (352 + 2048 bytes), long before the end."""
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    p = tmp_path / "tail.nii.gz"
    with open(p, "wb") as f:
        f.write(gzip.compress(img.to_bytes()))
        zeros_gz(f, 256 << 20)
    with pytest.raises(InputError, match=r"size check: the gzip stream expands beyond the 2400 bytes its header "
                                         r"accounts for \(stopped decompressing 1 MiB past them\)"):
        read_volume(p)
    # a little padding (under 1 MiB) is accepted and ignored, as nibabel does
    with open(tmp_path / "pad.nii.gz", "wb") as f:
        f.write(gzip.compress(img.to_bytes()))
        f.write(gzip.compress(b"\0" * 1000))
    np.testing.assert_array_equal(read_volume(tmp_path / "pad.nii.gz").array, 1.0)


def test_header_placing_data_beyond_huge_extensions_is_refused(tmp_path):
    p = tmp_path / "ext.nii.gz"
    head = header_bytes((8, 8, 8), np.uint8, vox_offset=1 << 30, extension_flag=True)
    p.write_bytes(gzip.compress(head + np.array([(1 << 30) - 360, 6], "<i4").tobytes()))
    with pytest.raises(InputError, match=r"size check: the header puts the voxel data at byte 1073741824 "
                                         r"\(1 GiB\), beyond the 64 MiB allowed for a header and its extensions"):
        read_volume(p)


def test_gzip_read_equals_nibabel_on_scaled_and_big_endian_data(tmp_path):
    """The bounded reader gives exactly nibabel's values (scl_slope/inter applied, either byte order)."""
    rng = np.random.default_rng(3)
    raw = rng.integers(-1000, 1000, size=(9, 10, 11)).astype(np.int16)
    img = nib.Nifti1Image(raw, np.diag([0.7, 0.8, 2.5, 1.0]))
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, tmp_path / "le.nii.gz")
    big = nib.Nifti1Image(raw.astype(">i2"), np.eye(4))
    nib.save(big, tmp_path / "be.nii.gz")
    for name, expected in (("le.nii.gz", raw * 0.5 - 3.0), ("be.nii.gz", raw.astype(np.float64))):
        v = read_volume(tmp_path / name)
        np.testing.assert_array_equal(v.array, expected.astype(np.float32))
        np.testing.assert_array_equal(v.array, nib.load(tmp_path / name).get_fdata(dtype=np.float32))


# --- complex voxels ---------------------------------------------------------------------------------------------
def test_complex_voxels_are_refused_not_cast(tmp_path):
    a = (np.ones((6, 6, 6)) + 2j).astype(np.complex64)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "c.nii.gz")
    nib.save(nib.Nifti1Image(a.astype(np.complex128), np.eye(4)), tmp_path / "c128.nii")
    re_ = sitk.GetImageFromArray(a.real.copy())
    sitk.WriteImage(sitk.RealAndImaginaryToComplex(re_, re_), str(tmp_path / "c.nrrd"))
    for name, kind in (("c.nii.gz", "complex64"), ("c128.nii", "complex128"), ("c.nrrd", "complex of 32-bit float")):
        with pytest.raises(InputError, match=rf"complex voxels \({kind}\): medcam3d needs real intensities"):
            read_volume(tmp_path / name)
    with pytest.raises(InputError, match="unsupported voxel type complex64"):
        Volume(a, np.eye(4))


# --- DICOM series -------------------------------------------------------------------------------------------------
def test_dicom_series_size_is_checked_from_the_headers(tmp_path):
    """CT5N: 5 slices of 16 x 16 (1280 voxels)."""
    assert read_volume(CT5N, max_voxels=1280).shape == (16, 16, 5)
    with pytest.raises(InputError, match=r"size check: the headers claim \(Columns x Rows x 5 slices\) "
                                         r"16 x 16 x 5 = 1280 voxels, more than the limit of 1279 voxels"):
        read_volume(CT5N, max_voxels=1279)


def test_resampled_dicom_series_is_checked_before_interpolating(tmp_path):
    """A slice far away makes resampling to the median spacing produce many slices: refused by arithmetic."""
    import pydicom

    files = copy_series(CT5N, tmp_path / "far", new_series=False)
    ds = pydicom.dcmread(files[-1])
    ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]),
                               float(ds.ImagePositionPatient[2]) + 1e10]
    ds.save_as(files[-1])
    with pytest.raises(InputError, match=r"size check: resampling the slices to 2.5 mm would make 16 x 16 x "
                                         r"4000000005 = 1.02e\+12 voxels, more than the limit of 1.5e\+09"):
        read_volume(tmp_path / "far", allow_resample=True)


def test_two_series_note_names_the_chosen_series_and_series_uid(tmp_path):
    import pydicom

    d = tmp_path / "two"
    copy_series(CT5N, d, new_series=False, prefix="a")
    small = copy_series(CT5N, d, new_series=True, keep=3, prefix="b")
    big_uid = str(pydicom.dcmread(next(CT5N.iterdir())).SeriesInstanceUID)
    small_uid = str(pydicom.dcmread(small[0]).SeriesInstanceUID)
    v = read_volume(d)
    assert v.meta["series_uid"] == big_uid
    (note,) = v.meta["notes"]
    assert "\n" not in note
    assert note.startswith(f"{d}: 2 DICOM series; read {big_uid} ")
    assert "(5 files), the one with the most slices" in note and f"others: {small_uid}" in note
    assert "(3 files)" in note and note.endswith("choose another with --series-uid UID")
    assert read_volume(d, series_uid=small_uid).meta["notes"] == []  # chosen by the user: nothing assumed
    assert read_volume(CT5N).meta["notes"] == []


# --- resampled grid (Preprocessor) --------------------------------------------------------------------------------
def test_resampling_absurd_voxels_is_refused_before_spacing_allocates():
    """350 x 350 x 500 mm voxels resampled to 0.8 mm: MONAI would allocate terabytes."""
    pre = Preprocessor.from_config(load_config("axialnet_chestct"))
    v = Volume(np.zeros((8, 8, 8), np.float32), np.diag([350.0, 350.0, 500.0, 1.0]), "weird.nii.gz")
    with pytest.raises(InputError, match=r"^weird\.nii\.gz: size check: preprocessing\[1\] \(Spacing\) would turn "
                                         r"this 8 x 8 x 8 scan with \(500, 350, 350\) mm voxels into \d+ x \d+ x \d+ "
                                         r"= 4.\d+e\+10 voxels, more than the limit of 1.5e\+09 voxels"):
        pre(v)
    # the demo grid is 5 x 2.5 x 2.5 mm (S, P, L); a 10 x 10 x 5 scan (R, A, S) at 5 x 5 x 10 mm has voxel centres
    # spanning 45 x 45 x 40 mm, i.e. 40 / 5 + 1 = 9 slices and 45 / 2.5 + 1 = 19 rows and columns: 3249 voxels
    small = Preprocessor.from_config(load_config("demo_axialnet"), max_voxels=3248)
    v = Volume(np.zeros((10, 10, 5), np.float32), np.diag([5.0, 5.0, 10.0, 1.0]), "ok.nii.gz")
    with pytest.raises(InputError, match=r"size check: preprocessing\[1\] \(Spacing\) would turn this 5 x 10 x 10 "
                                         r"scan with \(10, 5, 5\) mm voxels into 9 x 19 x 19 = 3249 voxels, "
                                         r"more than the limit of 3248 voxels"):
        small(v)


# --- modality -----------------------------------------------------------------------------------------------------
def test_config_modality_key(tmp_path):
    for name in ("demo_axialnet", "axialnet_chestct"):
        assert load_config(name).modality == ("CT",)
    base = load_config("demo_axialnet").to_dict()
    assert Config.from_dict({**base, "modality": None}).modality is None
    assert Config.from_dict({**base, "modality": ["ct", "PT"]}).modality == ("CT", "PT")
    for bad in (3, [], ["C T"], [""], {"a": 1}):
        with pytest.raises(InputError, match="modality must be a DICOM Modality code"):
            Config.from_dict({**base, "modality": bad})


def test_looks_like_ct_uses_air_at_minus_1000():
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 30, size=(20, 20, 20))
    ct[:, :, :4] = -1000.0  # air around the body: 20 % of voxels
    assert looks_like_ct(ct)[0]
    assert not looks_like_ct(rng.integers(0, 256, size=(20, 20, 20)))[0]  # an 8-bit MRI
    assert not looks_like_ct(rng.normal(size=(20, 20, 20)))[0]  # z-scored
    assert not looks_like_ct(ct + 1024)[0]  # CT stored without its rescale intercept: air at 24


def test_check_modality_refuses_dicom_and_warns_for_files():
    mr = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), "mr_series", {"format": "dicom", "modality": "MR"})
    with pytest.raises(InputError, match=r"^mr_series: DICOM Modality is MR but the config reads CT; refused "
                                         r"\(--ignore-modality"):
        check_modality(mr, ("CT",))
    assert check_modality(mr, ("CT",), ignore=True) == ("mr_series: DICOM Modality is MR but the config reads CT; "
                                                       "explained anyway (--ignore-modality)")
    assert check_modality(mr, ("CT", "MR")) is None
    assert check_modality(mr, None) is None  # no key: no check
    brain = Volume(np.linspace(0, 255, 512, dtype=np.float32).reshape(8, 8, 8), np.eye(4), "brain.nii.gz")
    line = check_modality(brain, ("CT",))
    assert line is not None and "\n" not in line
    assert line.startswith("brain.nii.gz: intensities do not look like CT in Hounsfield units (1st percentile")
    ct = Volume(np.full((8, 8, 8), -1000.0, np.float32), np.eye(4), "ct.nii.gz")
    assert check_modality(ct, ("CT",)) is None
    assert "look like CT in Hounsfield units" in (check_modality(ct, ("MR",)) or "")


# --- memory bombs, under an address-space cap ---------------------------------------------------------------------
_BOMBS = {
    "nifti1_32767": (lambda d: claims_huge(d / "h1.nii", 32767), "size check: the header claims 32767 x 32767 x 32767"),
    "nifti2_100000": (lambda d: claims_huge(d / "h2.nii.gz", 100000, nifti2=True),
                      "size check: the header claims 100000 x 100000 x 100000 = 1e+15 voxels"),
    "honest_8GiB": (lambda d: honest_8gib(d / "h3.nii.gz"),
                    "size check: the header claims 2048 x 2048 x 2048 = 8.59e+09 voxels"),
    "extension_lie_8GiB": (lambda d: extension_lie_8gib(d / "h4.nii.gz"),
                           "size check: the header puts the voxel data at byte 8589934592"),
    "trailing_8GiB": (lambda d: trailing_8gib(d / "h5.nii.gz"),
                      "size check: the gzip stream expands beyond the 2400 bytes its header accounts for"),
    # 1e9 float32 voxels are under the voxel limit but need ~11 GiB: over the 2 GiB the cap leaves
    "memory_budget": (lambda d: _write(d / "h6.nii.gz", gzip.compress(header_bytes((1000,) * 3, np.float32))),
                      "1e+09 voxels, which needs about 11.2 GiB (12 bytes per voxel), more than the memory budget of"),
    # 350 x 350 x 500 mm voxels: MONAI's Spacing would try to allocate terabytes
    "absurd_voxel_size": (lambda d: save_nifti(d / "h7.nii.gz", np.full((16, 16, 16), -1000.0, np.float32),
                                               np.diag([350.0, 350.0, 500.0, 1.0])),
                          "size check: preprocessing[1] (Spacing) would turn this 16 x 16 x 16 scan"),
    # a small file tripping a lowered limit
    "max_voxels_option": (lambda d: save_nifti(d / "h8.nii.gz", np.full((20, 20, 20), -1000.0, np.float32),
                                               np.eye(4)),
                          "20 x 20 x 20 = 8000 voxels, more than the limit of 7999 voxels"),
}


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


@pytest.fixture(scope="module")
def capped_runs(tmp_path_factory):
    """Every bomb explained in one capped interpreter: name -> (scan, digest before, out, exit code, stderr)."""
    d = tmp_path_factory.mktemp("bombs")
    scans = {name: make(d) for name, (make, _) in _BOMBS.items()}
    digests = {name: sha(p) for name, p in scans.items()}
    cases = {name: ["explain", str(p), "--out", str(d / f"out_{name}"), "--quiet"] for name, p in scans.items()}
    cases["max_voxels_option"] += ["--max-voxels", "7999"]
    results = run_capped(cases, d)
    return {name: (scans[name], digests[name], d / f"out_{name}", *results[name]) for name in _BOMBS}


@pytest.mark.parametrize("name", list(_BOMBS))
def test_memory_bombs_are_refused_by_the_size_check_under_a_memory_cap(capped_runs, name):
    scan, digest, out, code, stderr = capped_runs[name]
    assert scan.stat().st_size < 16 << 20  # the files are small; what they claim or expand to is not
    assert code == 2, (code, stderr[-2000:])
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medcam3d: error: ") and _BOMBS[name][1] in lines[0], stderr
    assert "MemoryError" not in stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))  # nothing written
    assert sha(scan) == digest  # input unchanged


def test_python_api_applies_the_same_limits(tmp_path):
    """explain_scan and Session take max_voxels; the refusal comes before anything is written."""
    from medcam3d.pipeline import Session, explain_scan

    scan = save_nifti(tmp_path / "s.nii.gz", np.full((20, 20, 20), -1000.0, np.float32), np.eye(4))
    with pytest.raises(InputError, match="8000 voxels, more than the limit of 7999 voxels"):
        explain_scan(scan, tmp_path / "out", max_voxels=7999)
    assert not (tmp_path / "out").exists()
    session = Session(max_voxels=1000)
    assert session.preprocessor.max_voxels == 1000
    with pytest.raises(InputError,
                       match=r"size check: preprocessing\[0\] \(Orientation\) would turn this 20 x 20 x 20"):
        session.explain_volume(read_volume(scan))
