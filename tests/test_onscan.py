"""Full-resolution maps sampled on the scan grid (medcam3d.onscan) and written as scaled uint8 NIfTI, checked against
a float64 reference written here: the feature-grid map placed by the summary's geometry, read at every scan voxel's
world position with a plain trilinear formula, 0 where no cell sits."""

from __future__ import annotations

import gzip
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nibabel import orientations as ornt

from medcam3d.config import load_config
from medcam3d.data import make_phantom
from medcam3d.geometry import MapGeometry, cell_weights
from medcam3d.io import read_volume
from medcam3d.io.writers import DISPLAY_SLOPE, ChunkedNifti, nifti_header_bytes, write_nifti
from medcam3d.onscan import ScanSampler, affine_reason, voxel_to_cells
from medcam3d.outputs import load_summary
from medcam3d.pipeline import Session

QUANTUM = 1.0 / 255.0


# ----------------------------------------------------------------------------------------------------------------
# the reference, written independently of medcam3d
# ----------------------------------------------------------------------------------------------------------------


def reference_on_scan(cells: np.ndarray, scan_affine: np.ndarray, scan_shape, grid_affine: np.ndarray,
                      offset, stride) -> tuple[np.ndarray, np.ndarray]:
    """Display value and covered mask at every scan voxel, float64: world = A_scan ijk, grid index
    g = A_grid^-1 world, cell coordinate u = (g - offset) / stride; trilinear between the cell centres, the edge
    value out to half a cell beyond the outermost centres, 0 further out."""
    ijk = np.indices(scan_shape).reshape(3, -1).astype(np.float64)
    world = scan_affine[:3, :3] @ ijk + scan_affine[:3, 3:]
    g = np.linalg.solve(grid_affine[:3, :3], world - grid_affine[:3, 3:])
    u = (g - np.asarray(offset, float)[:, None]) / np.asarray(stride, float)[:, None]
    n = np.asarray(cells.shape)[:, None]
    covered = ((u >= -0.5) & (u <= n - 0.5)).all(axis=0)
    uc = np.clip(u, 0, n - 1)
    lo = np.minimum(np.floor(uc).astype(int), np.maximum(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    frac = uc - lo
    value = np.zeros(u.shape[1])
    for corner in itertools.product((0, 1), repeat=3):
        w = np.ones(u.shape[1])
        idx = []
        for d, c in enumerate(corner):
            w = w * (frac[d] if c else 1.0 - frac[d])
            idx.append(hi[d] if c else lo[d])
        value += w * cells[tuple(idx)]
    return np.where(covered, value, 0.0).reshape(scan_shape), covered.reshape(scan_shape)


def display_cells(raw: np.ndarray) -> np.ndarray:
    """The paper's display convention on the cells: ReLU, then min-max over the whole map."""
    x = np.maximum(raw.astype(np.float64), 0.0)
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def rim(covered: np.ndarray) -> np.ndarray:
    """Voxels next to the covered region's edge: covered with an uncovered face neighbour, or the other way."""
    out = np.zeros_like(covered)
    for ax in range(covered.ndim):
        a = np.moveaxis(covered, ax, 0)
        o = np.moveaxis(out, ax, 0)
        edge = a[1:] != a[:-1]
        o[1:] |= edge
        o[:-1] |= edge
    return out


def sample(sampler: ScanSampler, maps: torch.Tensor) -> np.ndarray:
    """All slabs, as float display values ``[C, I, J, K]``."""
    parts = [slab for _, _, slab in sampler.slabs(maps)]
    return np.concatenate(parts, axis=1).transpose(0, 3, 2, 1) / 255.0


# ----------------------------------------------------------------------------------------------------------------
# the sampler on hand-made geometry
# ----------------------------------------------------------------------------------------------------------------

LPS_SCAN = np.array([[-0.9, 0, 0, 40.0], [0, -0.8, 0, 30.0], [0, 0, 1.5, -20.0], [0, 0, 0, 1]])
# a network grid in SPL axis order: axis 0 superior, axis 1 posterior, axis 2 left
SPL_GRID = np.array([[0, 0, -1.1, 30.0], [0, -1.3, 0, 25.0], [2.0, 0, 0, -25.0], [0, 0, 0, 1]])


def rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = math.radians(deg_z), math.radians(deg_x)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


@pytest.mark.parametrize("oblique", [False, True])
def test_sampler_matches_the_reference(oblique):
    rng = np.random.default_rng(3)
    cells = rng.random((2, 5, 4, 6))
    scan = LPS_SCAN.copy()
    if oblique:
        scan[:3, :3] = rotation(12.0, 7.0) @ scan[:3, :3]
    shape = (41, 37, 23)
    geo = MapGeometry((1.0, 6.0, 3.5), (3.0, 5.0, 4.0))
    sampler = ScanSampler(voxel_to_cells(scan, SPL_GRID, geo), (5, 4, 6), shape, slab_voxels=41 * 37 * 5)
    assert sampler.separable is not oblique
    assert not oblique or sampler.perm is None
    got = sample(sampler, torch.from_numpy(cells).float())
    for c in range(2):
        ref, covered = reference_on_scan(cells[c], scan, shape, SPL_GRID, geo.offset, geo.stride)
        assert 0.05 < covered.mean() < 0.95  # the case has both covered and uncovered voxels
        keep = ~rim(covered)
        assert np.abs(got[c] - ref)[keep].max() <= 0.5 * QUANTUM + 1e-5  # rounding to the nearest step only
        assert (got[c][~covered & keep] == 0).all()
        # the sampler's own covered mask agrees with the reference's away from the rim
        mask = sampler.covered_at(*np.indices(shape))
        assert (mask == covered)[keep].all()


def test_separable_path_permutes_axes_for_any_orientation():
    """A scan stored with its axes in another order than the grid's still gets one map axis per scan axis."""
    geo = MapGeometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    scan = np.array([[0, 1.0, 0, 0], [0, 0, -1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    sampler = ScanSampler(voxel_to_cells(scan, np.eye(4), geo), (3, 4, 5), (10, 12, 14))
    assert sampler.perm is not None and sorted(sampler.perm) == [0, 1, 2]


def test_cell_weights_rule():
    """Linear between centres, the edge value within half a cell beyond the outermost centres, 0 further out."""
    u = torch.tensor([-0.51, -0.5, -0.2, 0.0, 0.25, 1.0, 2.0, 2.5, 2.51, float("nan")])
    w = cell_weights(u, 3).numpy()
    expected = np.array([
        [0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [0.75, 0.25, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0],
        [0, 0, 0],
    ])
    assert np.allclose(w, expected)


def test_uncovered_is_zero_and_the_edge_value_is_held():
    """A 1-D check along one axis: beyond half a stride from the outermost centres exactly 0; within it the edge
    cell's value."""
    geo = MapGeometry((10.0, 0.0, 0.0), (4.0, 1.0, 1.0))  # centres at voxels 10, 14, 18 along axis 0
    cells = torch.tensor([0.2, 0.6, 1.0]).reshape(1, 3, 1, 1)
    sampler = ScanSampler(voxel_to_cells(np.eye(4), np.eye(4), geo), (3, 1, 1), (30, 1, 1))
    line = sample(sampler, cells)[0, :, 0, 0]
    assert (line[:8] == 0).all() and (line[21:] == 0).all()  # beyond 8 (= 10 - 2) and 20 (= 18 + 2)
    assert np.allclose(line[8:11], 0.2, atol=QUANTUM) and np.allclose(line[18:21], 1.0, atol=QUANTUM)
    assert line[12] == pytest.approx(0.4, abs=QUANTUM)  # halfway between 0.2 and 0.6


# ----------------------------------------------------------------------------------------------------------------
# chunked, scaled uint8 NIfTI
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["m.nii.gz", "m.nii"])
def test_chunked_nifti_reads_back_scaled_in_nibabel_and_itk(tmp_path, name):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (9, 7, 6), dtype=np.uint8)
    affine = np.array([[-0.7, 0, 0, 10], [0, -0.7, 0, 20], [0, 0, 1.25, -30], [0, 0, 0, 1.0]])
    header = nifti_header_bytes(data.shape, affine, np.uint8, slope=DISPLAY_SLOPE, description="test")
    by_slice = np.ascontiguousarray(data.transpose(2, 1, 0))  # [K, J, I]: NIfTI's Fortran order
    with ThreadPoolExecutor(2) as pool:
        f = ChunkedNifti(tmp_path / name, header, data.nbytes, pool)
        for k in range(0, 6, 4):
            f.add(by_slice[k:k + 4])
        f.finish()
    img = nib.load(str(tmp_path / name))
    assert img.get_data_dtype() == np.uint8 and img.shape == data.shape
    assert np.allclose(img.affine, affine)
    assert np.allclose(img.get_fdata(), data / 255.0, atol=1e-6)
    assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))).transpose(2, 1, 0),
                       data / 255.0, atol=1e-6)
    if name.endswith(".gz"):
        assert gzip.decompress((tmp_path / name).read_bytes())[-data.nbytes:] == by_slice.tobytes()
    # the header is the one write_nifti makes, apart from the scaling
    write_nifti(data, affine, tmp_path / f"ref_{name}", np.uint8, description="test")
    ref = nib.load(str(tmp_path / f"ref_{name}")).header
    differ = [k for k in ref if ref[k].tobytes() != img.header[k].tobytes()]
    assert set(differ) <= {"scl_slope", "scl_inter"}


def test_chunked_nifti_is_reproducible_and_checks_its_size(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(6, 5, 4)
    header = nifti_header_bytes((4, 5, 6), np.eye(4), np.uint8, slope=DISPLAY_SLOPE)
    outs = []
    for threads in (None, 1, 2):
        pool = ThreadPoolExecutor(threads) if threads else None
        f = ChunkedNifti(tmp_path / f"{threads}.nii.gz", header, data.nbytes, pool)
        f.add(data[:3])
        f.add(data[3:])
        outs.append(f.finish().read_bytes())
        if pool:
            pool.shutdown()
    assert outs[0] == outs[1] == outs[2]
    f = ChunkedNifti(tmp_path / "short.nii.gz", header, data.nbytes)
    f.add(data[:3])
    with pytest.raises(ValueError, match="bytes of voxel data"):
        f.finish()
    assert not (tmp_path / "short.nii.gz").exists()


# ----------------------------------------------------------------------------------------------------------------
# end to end: the demo model on the demo phantom, an LPS scan and oblique scans
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_session() -> Session:
    return Session(None, device="cpu")


@pytest.fixture(scope="module")
def diagonal_config(tmp_path_factory) -> Path:
    """The demo config with Spacing(diagonal=True): the network grid is aligned with the world axes, so an oblique
    scan is oblique to it too (the general sampler)."""
    cfg = load_config("demo_axialnet")
    text = Path(cfg.path).read_text()
    text = text.replace("mode: bilinear, dtype: float32}", "mode: bilinear, dtype: float32, diagonal: true}")
    assert "diagonal: true" in text
    text = text.replace("weights: package:medcam3d/weights/demo_axialnet.pt",
                        f"weights: {cfg.weights_path}")
    d = tmp_path_factory.mktemp("cfg")
    (d / "diagonal.yaml").write_text(text)
    return d / "diagonal.yaml"


def phantom_scan(kind: str, folder: Path) -> Path:
    """The demo phantom as a NIfTI: as made (SPL axes), reoriented to LPS axes, or with an oblique affine (rotated
    about the world's z and x axes)."""
    ph = make_phantom(7, present={"nodule_right_lung": True, "pleural_effusion_left": True, "cardiomegaly": True},
                      prevalence=0.0)
    img = nib.Nifti1Image(ph.hu.astype(np.float32), ph.affine)
    if kind == "lps":
        img = img.as_reoriented(ornt.ornt_transform(ornt.io_orientation(ph.affine), ornt.axcodes2ornt("LPS")))
    elif kind.startswith("oblique"):
        aff = ph.affine.copy()
        aff[:3, :3] = rotation(15.0, 8.0) @ aff[:3, :3]
        img = nib.Nifti1Image(ph.hu.astype(np.float32), aff)
    path = folder / f"{kind}.nii.gz"
    nib.save(img, str(path))
    return path


def check_against_reference(out: Path) -> tuple[int, float]:
    """Every full-resolution map of ``out`` against the reference; returns (maps checked, worst difference)."""
    s = load_summary(out)
    scan_affine, shape = np.asarray(s.input.affine), tuple(s.input.shape)
    grid_affine = np.asarray(s.network_grid.affine)
    geo = s.map_geometry
    worst, n = 0.0, 0
    for m in s.methods:
        low = np.asarray(nib.load(str(out / f"lowres_{m}.nii.gz")).dataobj, dtype=np.float64)
        for k, c in enumerate(s.classes):
            if not c.full_resolution:
                continue
            ref, covered = reference_on_scan(display_cells(low[..., k]), scan_affine, shape, grid_affine,
                                             geo.offset_voxels, geo.stride_voxels)
            img = nib.load(str(out / f"fullres_{m}_{c.index:03d}_{c.label}.nii.gz"))
            assert img.get_data_dtype() == np.uint8 and img.shape == shape
            assert np.allclose(img.affine, scan_affine, atol=1e-5)
            diff = np.abs(img.get_fdata() - ref)[~rim(covered)]
            worst, n = max(worst, float(diff.max())), n + 1
    return n, worst


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["demo", "lps", "oblique", "oblique-diagonal"])
def test_fullres_maps_equal_the_reference_within_one_quantum(tmp_path, demo_session, diagonal_config, kind):
    scan = phantom_scan(kind, tmp_path)
    session = Session(diagonal_config, device="cpu") if kind == "oblique-diagonal" else demo_session
    volume = read_volume(scan)
    result = session.explain_volume(volume)
    assert affine_reason(result.grid, volume.affine, volume.shape) is None
    geo = result.explanation.map_geometry(session.map_geometry)
    sampler = ScanSampler(voxel_to_cells(volume.affine, np.asarray(result.grid.affine), geo),
                          result.explanation.map_size, volume.shape)
    assert sampler.separable is (kind != "oblique-diagonal")  # the general (trilinear) path on the oblique grid
    out = tmp_path / "out"
    session.write_folder(result, out, full_res=["top-2"])
    n, worst = check_against_reference(out)
    assert n == 4  # 2 classes x 2 methods
    assert worst <= QUANTUM + 1e-6, f"{kind}: worst difference {worst * 255:.2f} quanta"


def test_non_affine_preprocessing_falls_back_to_the_monai_inverse(tmp_path, demo_session):
    """A preprocessing step the fast path cannot place (here a Zoom) makes the maps go through MONAI's inverse; they
    still land on the scan grid, uint8, in [0, 1]."""
    cfg = load_config("demo_axialnet")
    text = Path(cfg.path).read_text().replace(
        "  - {_target_: ResizeWithPadOrCrop", "  - {_target_: Zoom, zoom: 1.0, keep_size: true}\n"
                                              "  - {_target_: ResizeWithPadOrCrop")
    text = text.replace("weights: package:medcam3d/weights/demo_axialnet.pt", f"weights: {cfg.weights_path}")
    (tmp_path / "zoom.yaml").write_text(text)
    session = Session(tmp_path / "zoom.yaml", device="cpu")
    scan = phantom_scan("lps", tmp_path)
    volume = read_volume(scan)
    result = session.explain_volume(volume)
    assert "Zoom" in (affine_reason(result.grid, volume.affine, volume.shape) or "")
    out = tmp_path / "out"
    session.write_folder(result, out, full_res=["top-1"])
    maps = sorted(out.glob("fullres_*.nii.gz"))
    assert len(maps) == 2
    for p in maps:
        img = nib.load(str(p))
        assert img.get_data_dtype() == np.uint8 and img.shape == volume.shape
        data = img.get_fdata()
        assert data.min() >= 0 and 0.5 < data.max() <= 1.0 + 1e-6
