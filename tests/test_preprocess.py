"""medcam3d.preprocess: scan -> network grid -> maps back on the scan, in world space.

The round trip uses a phantom with a bright blob at a known RAS coordinate, written in RAS, in LPS, with permuted
axes, with an oblique (rotated) grid, and as an ITK MetaImage; the expected voxel of the blob and the reference
resampling are computed in the tests from the files' own affines (nibabel / SimpleITK), not by medcam3d.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import map_coordinates

from medcam3d.config import load_config
from medcam3d.errors import InputError
from medcam3d.io import Volume, read_volume, write_map_like
from medcam3d.preprocess import Preprocessor

BLOB = np.array([7.3, -12.9, 21.4])  # RAS mm
GRID = (16, 32, 20)
SPEC = [
    {"_target_": "Orientation", "axcodes": "SPL"},
    {"_target_": "Spacing", "pixdim": [3.0, 2.0, 2.0], "mode": "bilinear"},
    {"_target_": "ScaleIntensityRange", "a_min": -1000, "a_max": 800, "b_min": 0.0, "b_max": 1.0, "clip": True},
    {"_target_": "ResizeWithPadOrCrop", "spatial_size": list(GRID)},  # crops S and L, pads P
    {"_target_": "ShiftIntensity", "offset": -0.449},
]
_TH = np.deg2rad(15.0)
_RZ = np.array([[np.cos(_TH), -np.sin(_TH), 0.0], [np.sin(_TH), np.cos(_TH), 0.0], [0.0, 0.0, 1.0]])
# name -> (direction cosines as columns, spacing, shape)
GEOMETRIES = {
    "ras": (np.eye(3), (1.1, 0.9, 2.5), (48, 56, 24)),
    "lps": (np.diag([-1.0, -1.0, 1.0]), (1.1, 0.9, 2.5), (48, 56, 24)),
    "permuted": (np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), (2.5, 1.1, 0.9), (24, 48, 56)),
    "oblique": (_RZ @ np.diag([-1.0, -1.0, 1.0]), (1.1, 0.9, 2.5), (48, 56, 24)),
}


def _phantom(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(array, RAS affine): soft tissue at -800 HU with a Gaussian blob (+1400 HU, sigma 5 mm) at BLOB, the volume
    centred a few mm away from it."""
    rot, sp, shape = GEOMETRIES[name]
    a = np.eye(4)
    a[:3, :3] = rot * np.asarray(sp)[None, :]
    centre = BLOB + np.array([4.0, -3.0, 5.0])
    a[:3, 3] = centre - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    idx = np.indices(shape).reshape(3, -1).T
    world = idx @ a[:3, :3].T + a[:3, 3]
    r2 = ((world - BLOB) ** 2).sum(1)
    arr = (-800.0 + 1400.0 * np.exp(-r2 / (2 * 5.0**2))).reshape(shape).astype(np.float32)
    return arr, a


def _write_phantom(tmp: Path, name: str, fmt: str) -> tuple[Path, np.ndarray]:
    """Write the phantom; return the path and the affine the file itself declares (read back independently)."""
    arr, a = _phantom(name)
    if fmt == "nii":
        p = tmp / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, a), str(p))
        return p, nib.load(p).affine
    # ITK MetaImage: LPS geometry, numpy array in [k, j, i] order
    p = tmp / f"{name}.mha"
    img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
    flip = np.diag([-1.0, -1.0, 1.0])
    sp = np.linalg.norm(a[:3, :3], axis=0)
    img.SetSpacing(tuple(sp))
    img.SetDirection(tuple((flip @ a[:3, :3] / sp).ravel()))
    img.SetOrigin(tuple(flip @ a[:3, 3]))
    sitk.WriteImage(img, str(p))
    back = sitk.ReadImage(str(p))
    d = np.asarray(back.GetDirection()).reshape(3, 3) * np.asarray(back.GetSpacing())[None, :]
    aff = np.eye(4)
    aff[:3, :3] = flip @ d
    aff[:3, 3] = flip @ np.asarray(back.GetOrigin())
    return p, aff


CASES = [(g, "nii") for g in GEOMETRIES] + [("lps", "mha"), ("oblique", "mha")]


@pytest.mark.parametrize(("name", "fmt"), CASES, ids=[f"{g}-{f}" for g, f in CASES])
def test_round_trip_blob_comes_back_to_its_world_coordinate(tmp_path, name, fmt):
    path, file_affine = _write_phantom(tmp_path, name, fmt)
    vol = read_volume(path)
    np.testing.assert_allclose(vol.affine, file_affine, atol=1e-4)
    pre = Preprocessor(SPEC, input_size=GRID)
    x = pre(vol)
    assert tuple(x.shape) == (1, *GRID) and x.dtype == torch.float32
    assert nib.aff2axcodes(np.asarray(x.affine)) == ("S", "P", "L")  # the network grid convention
    # a map that peaks at the blob on the network grid: the preprocessed image itself
    grid_map = x[0].numpy()
    blob_on_grid = np.linalg.solve(np.asarray(x.affine), np.r_[BLOB, 1.0])[:3]
    assert np.abs(np.array(np.unravel_index(grid_map.argmax(), GRID)) - blob_on_grid).max() <= 1.0
    back = pre.invert(grid_map, x)
    assert back.shape == (1, *vol.shape) and back.dtype == np.float32
    peak = np.array(np.unravel_index(back[0].argmax(), vol.shape))
    expected = np.linalg.solve(file_affine, np.r_[BLOB, 1.0])[:3]  # world -> voxel, from the file's own affine
    assert np.abs(peak - expected).max() <= 1.0, (peak, expected)
    # independent inverse: trilinear sampling of the grid map at every source voxel centre, in world space
    idx = np.indices(vol.shape).reshape(3, -1).T
    g = np.linalg.inv(np.asarray(x.affine)) @ file_affine
    gi = idx @ g[:3, :3].T + g[:3, 3]
    ref = map_coordinates(grid_map, gi.T, order=1, mode="constant", cval=0.0).reshape(vol.shape)
    inside = ((gi >= 0) & (gi <= np.array(GRID) - 1)).all(1).reshape(vol.shape)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(back[0][inside], ref[inside], atol=1e-4)
    # the written map has exactly the source affine and shape
    out = write_map_like(back[0], vol, tmp_path / "out" / "map.nii.gz")
    img = nib.load(out)
    assert img.shape == vol.shape and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, file_affine, atol=1e-4)
    if fmt == "nii":
        np.testing.assert_array_equal(img.affine, nib.load(path).affine)


def test_invert_is_linear_chunked_and_accepts_tensors():
    arr, a = _phantom("lps")
    pre = Preprocessor(SPEC)
    x = pre(Volume(arr, a, "phantom"))
    m = x[0]
    maps = torch.stack([m, 2.0 * m, -m + 0.5])
    one = pre.invert(maps, x, chunk=1)
    many = pre.invert(maps.numpy(), x, chunk=8)
    np.testing.assert_allclose(one, many, atol=1e-6)
    np.testing.assert_allclose(one[1], 2.0 * one[0], atol=1e-5)
    assert one.shape == (3, *arr.shape)
    with pytest.raises(InputError, match="maps have shape"):
        pre.invert(np.zeros((2, 5, 5, 5)), x)


def test_inverse_is_linear_even_when_the_forward_resampling_is_nearest():
    spec = [dict(s) for s in SPEC]
    spec[1] = {"_target_": "Spacing", "pixdim": [3.0, 2.0, 2.0], "mode": "nearest"}
    arr, a = _phantom("ras")
    pre = Preprocessor(spec)
    x = pre(Volume(arr, a, "phantom"))
    ramp = np.broadcast_to(np.arange(GRID[2], dtype=np.float32), GRID).copy()  # linear along L
    back = pre.invert(ramp, x)[0]
    g = np.linalg.inv(np.asarray(x.affine)) @ a
    idx = np.indices(arr.shape).reshape(3, -1).T
    gi = idx @ g[:3, :3].T + g[:3, 3]
    inside = ((gi >= 0) & (gi <= np.array(GRID) - 1)).all(1).reshape(arr.shape)
    np.testing.assert_allclose(back[inside], gi[:, 2].reshape(arr.shape)[inside], atol=1e-4)  # exact ramp


def test_metatensor_input_gives_the_same_result():
    arr, a = _phantom("permuted")
    vol = Volume(arr, a, "phantom")
    pre = Preprocessor(SPEC)
    x1, x2 = pre(vol), pre(vol.to_metatensor())
    torch.testing.assert_close(x1.as_tensor(), x2.as_tensor())
    np.testing.assert_allclose(np.asarray(x1.affine), np.asarray(x2.affine))


def test_preprocess_labels_is_nearest_neighbour_on_the_scan_grid():
    arr, a = _phantom("oblique")
    labels = np.zeros(arr.shape, np.float32)
    labels[arr > 0] = 2.0  # blob core
    labels[(arr > -700) & (arr <= 0)] = 1.0  # rim
    pre = Preprocessor(SPEC)
    x = pre(Volume(arr, a, "scan"))
    lab = pre.preprocess_labels(Volume(labels, a, "mask"))
    assert tuple(lab.shape) == (1, *GRID)
    np.testing.assert_allclose(np.asarray(lab.affine), np.asarray(x.affine))
    assert set(np.unique(lab.numpy()).tolist()) <= {0.0, 1.0, 2.0}
    # independent nearest-neighbour sampling of the mask at the grid voxel centres
    g = np.linalg.inv(a) @ np.asarray(x.affine)
    idx = np.indices(GRID).reshape(3, -1).T
    si = idx @ g[:3, :3].T + g[:3, 3]
    ref = map_coordinates(labels, si.T, order=0, mode="constant", cval=0.0).reshape(GRID)
    assert (lab[0].numpy() == ref).mean() > 0.99  # ties at exactly half-voxel offsets may round either way
    assert (lab[0].numpy() == 2.0).sum() > 0
    # resampling onto a given grid ("like") agrees
    lab2 = pre.preprocess_labels(Volume(labels, a, "mask"), like=x)
    assert (lab2.numpy() == lab.numpy()).mean() > 0.99


def test_too_small_volume_names_the_file_and_writes_nothing(tmp_path):
    p = tmp_path / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.float32), np.diag([1.0, 1.0, 1.0, 1.0])), str(p))
    pre = Preprocessor(SPEC, min_size=(4, 8, 8))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError) as e:
        vol = read_volume(p)
        x = pre(vol)
        write_map_like(pre.invert(x[0], x)[0], vol, out / "map.nii.gz")
    assert "tiny.nii.gz" in str(e.value) and "too small" in str(e.value)
    assert list(out.iterdir()) == []


def test_output_grid_must_match_input_size():
    arr, a = _phantom("ras")
    pre = Preprocessor(SPEC[:3], input_size=GRID, where="my.yaml")  # no pad/crop: the grid is whatever it is
    with pytest.raises(InputError, match=r"my\.yaml: preprocessing produced a .* grid but input_size"):
        pre(Volume(arr, a, "scan"))


def test_shipped_demo_config_makes_the_demo_grid():
    cfg = load_config("demo_axialnet")
    pre = Preprocessor.from_config(cfg)
    shape = (160, 150, 50)
    a = np.diag([-0.75, -0.75, 2.0, 1.0])  # an LPS-ordered scan, like DICOM
    a[:3, 3] = [60.0, 55.0, -50.0]
    arr = np.full(shape, -1000.0, np.float32)
    arr[40:120, 30:120, 5:45] = 40.0
    x = pre(Volume(arr, a, "scan"))
    assert tuple(x.shape) == (1, 60, 128, 128)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(x.affine)[:3, :3], axis=0), [5.0, 2.5, 2.5])
    # air is 0 after clip/scale, minus 0.449; soft tissue (40 HU) is 1040/1800 - 0.449
    vals = np.unique(np.round(x.numpy(), 4))
    assert vals.min() == pytest.approx(-0.449, abs=1e-4)
    assert np.isclose(vals, 1040 / 1800 - 0.449, atol=1e-3).any()
    back = pre.invert(x[0], x)
    assert back.shape == (1, *shape)
