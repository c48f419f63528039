"""The napari viewer and plugin (issue 6): geometry, layers, the dock widget, screenshots, reader, sample data,
explain widget and ``medcam3d view``.

Tests marked ``gui`` need napari, pytest-qt and an X server: run ``xvfb-run -a python -m pytest tests/test_viewer.py``
(docs/viewer.md). Without a display they fail, saying so, rather than being skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medcam3d.cli import main
from medcam3d.config import load_config
from medcam3d.data import LABELS, make_phantom, write_nifti
from medcam3d.io import read_volume, write_map_like

SHAPE = (24, 64, 64)  # a small phantom at the demo spacing: 120 x 160 x 160 mm
SPACING = (5.0, 2.5, 2.5)
LESION = "nodule_right_lung"
# RAS mm -> the viewer's world (S, P, L) mm, written out by hand: S = z, P = -y, L = -x
RAS_TO_SPL = np.array([[0, 0, 1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
SHIFT_MM = 40.0  # the planted Grad-CAM map lies this far towards the patient's left of the lesion


@pytest.fixture(scope="session")
def qapp_args():
    """pytest-qt's QApplication arguments, overridden to fail (not skip, not abort) GUI tests without a display."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        pytest.fail("this GUI test needs an X server: run it under `xvfb-run -a python -m pytest` (docs/viewer.md)")
    return ["medcam3d-tests"]


@pytest.fixture(scope="module")
def untrained_config(tmp_path_factory) -> Path:
    """The demo config with seeded random weights, so these tests do not depend on training."""
    d = tmp_path_factory.mktemp("cfg")
    torch.manual_seed(0)
    cfg = load_config("demo_axialnet")
    from medcam3d.models import build_model

    torch.save(build_model(cfg.model).state_dict(), d / "random.pt")
    shipped = "weights: package:medcam3d/weights/demo_axialnet.pt"
    text = Path(cfg.path).read_text().replace(shipped, "weights: random.pt")
    (d / "untrained.yaml").write_text(text)
    return d / "untrained.yaml"


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    """A phantom with ONE planted lesion, written with its masks (``phantom_lesions.nii.gz``: bit k = LABELS[k])."""
    d = tmp_path_factory.mktemp("scan")
    ph = make_phantom(11, shape=SHAPE, spacing=SPACING, present={LESION: True}, prevalence=0.0)
    write_nifti(ph, d / "phantom.nii.gz")
    return d / "phantom.nii.gz"


def lesion_world(scan: Path) -> np.ndarray:
    """Centroid of the planted lesion in the viewer's world (S, P, L) mm, from the mask file and its affine."""
    img = nib.load(str(scan.with_name("phantom_lesions.nii.gz")))
    ijk = np.argwhere(np.asarray(img.dataobj) & (1 << LABELS.index(LESION))).mean(axis=0)
    return (RAS_TO_SPL @ img.affine @ np.array([*ijk, 1.0]))[:3]


def blob(volume, centre_ras: np.ndarray, sigma_mm: float) -> np.ndarray:
    """A Gaussian in [0, 1] around ``centre_ras`` on the scan grid."""
    idx = np.indices(volume.shape).reshape(3, -1)
    ras = volume.affine[:3, :3] @ idx + volume.affine[:3, 3:]
    d2 = ((ras - centre_ras[:, None]) ** 2).sum(axis=0)
    return np.exp(-d2 / (2 * sigma_mm**2)).reshape(volume.shape).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, scan, untrained_config) -> Path:
    """An output folder of `medcam3d explain` whose full-resolution maps of the lesion class are replaced by planted
    ones: HiResCAM a tight blob on the lesion, Grad-CAM a broad blob 40 mm towards the patient's left."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["explain", str(scan), "--config", str(untrained_config), "--out", str(out), "--quiet",
                 "--full-res", LESION]) == 0
    vol = read_volume(scan)
    centre = np.linalg.inv(RAS_TO_SPL) @ np.array([*lesion_world(scan), 1.0])
    left = centre[:3] - np.array([SHIFT_MM, 0.0, 0.0])  # RAS: x grows towards the patient's right
    k = LABELS.index(LESION)
    write_map_like(blob(vol, centre[:3], 5.0), vol, out / f"fullres_hirescam_{k:03d}_{LESION}.nii.gz")
    write_map_like(blob(vol, left, 12.0), vol, out / f"fullres_gradcam_{k:03d}_{LESION}.nii.gz")
    return out


@pytest.fixture
def app(make_napari_viewer, folder):
    from medcam3d.viewer.app import open_viewer

    return open_viewer(folder, class_=LESION, viewer=make_napari_viewer(show=True))


def nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file's values as nibabel scales them (``scl_slope``: full-resolution maps may be stored as uint8),
    in float32, and its affine."""
    img = nib.load(str(path))
    return img.get_fdata(dtype=np.float32), img.affine


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


WIDE = (24, 128, 128)  # 120 x 320 x 320 mm: the network grid itself, so AxialNet's cells cover only its middle


@pytest.fixture(scope="module")
def receptive_folder(tmp_path_factory, untrained_config) -> Path:
    """`medcam3d explain --map-geometry receptive` of a phantom as wide as the network grid: AxialNet's 8 x 8 cells
    sit over the middle 64 of its 128 columns and rows (after four valid convolutions), the rest is uncovered."""
    d = tmp_path_factory.mktemp("wide")
    ph = make_phantom(12, shape=WIDE, spacing=SPACING, present={LESION: True}, prevalence=0.0)
    write_nifti(ph, d / "phantom.nii.gz", masks=False)
    assert main(["explain", str(d / "phantom.nii.gz"), "--config", str(untrained_config), "--out", str(d / "out"),
                 "--quiet", "--map-geometry", "receptive", "--full-res", LESION]) == 0
    return d / "out"


def hand_covered_box(s: dict) -> np.ndarray:
    """[2, 3] (S, P, L) mm bounds of the covered region, by hand from summary.json: cell i of axis d is centred at
    network voxel offset[d] + stride[d] * i (i = 0 .. n - 1); covered = within half a stride of the outermost
    centres; the network grid's affine takes voxel indices to RAS mm."""
    g, n = s["map_geometry"], s["map_shape"]
    lo = [o - st / 2 for o, st in zip(g["offset_voxels"], g["stride_voxels"])]
    hi = [o + st * (k - 1) + st / 2 for o, st, k in zip(g["offset_voxels"], g["stride_voxels"], n)]
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]).T
    world = (RAS_TO_SPL @ np.array(s["network_grid"]["affine"]) @ corners)[:3]
    return np.stack([world.min(axis=1), world.max(axis=1)])


def copy_with_maps(folder: Path, dest: Path, maps: dict[str, np.ndarray]) -> Path:
    """A copy of an output folder whose full-resolution maps of LESION are replaced by ``maps`` (method -> array)."""
    shutil.copytree(folder, dest)
    vol = read_volume(summary(folder)["input"]["path"])
    for method, array in maps.items():
        write_map_like(array, vol, dest / f"fullres_{method}_{LABELS.index(LESION):03d}_{LESION}.nii.gz")
    return dest


def hide_overlays(comparison) -> None:
    """Hide the texts drawn on the canvas (caption, scale bar, layer names): only layers remain."""
    overlays = comparison.viewer.canvas.overlays
    for overlay in (overlays.text, overlays.scale_bar, *(m.name_overlay for m in comparison.map_layers)):
        overlay.visible = False


def to_screen(world_pl: np.ndarray, camera, pane_centre: np.ndarray) -> np.ndarray:
    """(row, column) pixel of world (P, L) mm in a pane: pane centre + (world - camera centre) x zoom."""
    return pane_centre + (np.asarray(world_pl, float) - np.asarray(camera.center)[-2:]) * camera.zoom


# --- without a GUI ----------------------------------------------------------------------------------------------------
def test_importing_medcam3d_never_imports_qt_or_napari():
    code = ("import medcam3d, medcam3d.viewer, medcam3d.viewer.command, medcam3d.cli, sys; "
            "medcam3d.cli.build_parser(); "
            "bad = [m for m in ('PyQt6', 'PyQt5', 'PySide6', 'qtpy', 'napari', 'vispy') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


def test_viewer_modules_form_no_import_cycle_and_old_names_keep_working():
    """The window lives in its own module: widget -> comparison, window -> (comparison, widget), app re-exports;
    no module of the package reaches itself through its imports (function-local ones included)."""
    import ast

    import medcam3d.methods
    import medcam3d.viewer.layers

    pkg = Path(medcam3d.viewer.__file__).parent
    graph = {}
    for f in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
        graph[f.stem] = {d for d in deps if (pkg / f"{d}.py").is_file()}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph[start])

    assert not [m for m in graph if m != "__init__" and reaches(m, m)]
    assert "app" not in graph["widget"] and {"comparison", "widget"} <= graph["window"]
    code = ("import medcam3d.viewer.comparison, sys; "
            "bad = [m for m in ('PyQt6', 'PyQt5', 'PySide6', 'qtpy', 'napari') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr  # the comparison itself needs no Qt until a viewer is built
    assert medcam3d.viewer.layers.method_title is medcam3d.methods.method_title
    assert medcam3d.viewer.layers.method_title("gradcampp") == "Grad-CAM++"
    # app: the former home of the comparison and the window, re-exporting them for one release
    from medcam3d.viewer import app, comparison, window

    assert app.open_viewer is window.open_viewer and app.ViewerApp is window.ViewerApp
    assert app.Comparison is comparison.Comparison and app.default_methods(["gradcam", "x", "hirescam"]) == (
        "hirescam", "gradcam")


def test_output_folder_refuses_a_foreign_summary(tmp_path):
    from medcam3d.errors import InputError
    from medcam3d.viewer.folder import OutputFolder

    (tmp_path / "summary.json").write_text(json.dumps({"methods": ["hirescam"], "classes": [{"label": "x"}]}))
    with pytest.raises(InputError, match="not a medcam3d summary .*missing 'index'"):
        OutputFolder(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"schema_version": 99, "methods": [], "classes": []}))
    with pytest.raises(InputError, match="newer than this medcam3d reads"):
        OutputFolder(tmp_path)


def test_manifest_validates_and_points_at_importable_callables():
    import npe2

    import medcam3d.viewer

    path = Path(medcam3d.viewer.__file__).with_name("napari.yaml")
    manifest = npe2.PluginManifest.from_file(path)
    assert manifest.name == "medcam3d"
    assert npe2.PluginManifest.from_distribution("medcam3d").name == "medcam3d"  # the entry point is installed
    manifest.validate_imports()
    assert [s.key for s in manifest.contributions.sample_data] == ["demo"]
    assert manifest.contributions.readers[0].accepts_directories


def test_any_orientation_is_placed_in_the_spl_world_without_copying():
    from medcam3d.viewer.geometry import place

    # an array in RAS index order: i -> x, j -> y, k -> z
    affine = np.array([[2.0, 0, 0, 10], [0, 3.0, 0, 20], [0, 0, 4.0, 30], [0, 0, 0, 1]])
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    p = place(array, affine)
    assert p.data.shape == (7, 6, 5) and np.shares_memory(p.data, array)
    assert p.data[3, 2, 1] == array[1, 2, 3]
    # S = 4k + 30, P = -(3j + 20), L = -(2i + 10)
    assert np.allclose(p.affine, [[4, 0, 0, 30], [0, -3, 0, -20], [0, 0, -2, -10], [0, 0, 0, 1]])
    # a phantom is stored in SPL order: nothing to transpose and positive voxel sizes
    ph = make_phantom(0, shape=(12, 32, 32), spacing=SPACING, prevalence=0.0)
    q = place(ph.hu, ph.affine)
    assert q.axes == (0, 1, 2) and np.allclose(np.diag(q.affine)[:3], SPACING)


def test_covered_box_from_the_summary_by_hand():
    from medcam3d.outputs import summary_from_dict
    from medcam3d.viewer.coverage import covered_world_box

    # the demo's network grid (SPL, 5 x 2.5 x 2.5 mm) with AxialNet's receptive cells: 20 x 8 x 8 cells at
    # (1, 32, 32) + (3, 8, 8) i. Covered voxels: S [1 - 1.5, 1 + 57 + 1.5] = [-0.5, 59.5], P and L [32 - 4, 32 + 56 + 4]
    # = [28, 92]. World: S = z = 5 i - 317.5, P = -y = 2.5 j - 138.75, L = -x = 2.5 k - 158.75.
    affine = [[0.0, 0.0, -2.5, 158.75], [0.0, -2.5, 0.0, 138.75], [5.0, 0.0, 0.0, -317.5], [0.0, 0.0, 0.0, 1.0]]
    s = summary_from_dict({"methods": ["hirescam"], "classes": [], "map_shape": [20, 8, 8],
                           "network_grid": {"shape": [60, 128, 128], "affine": affine},
                           "map_geometry": {"kind": "receptive", "offset_voxels": [1.0, 32.0, 32.0],
                                            "stride_voxels": [3.0, 8.0, 8.0]}})
    assert np.allclose(covered_world_box(s), [[-320.0, -68.75, -88.75], [-20.0, 91.25, 71.25]])
    # field: 8 cells of 16 voxels at 7.5 + 16 i cover [-0.5, 127.5], the whole grid: P [-140, 180], L [-160, 160]
    s.map_geometry.kind, s.map_geometry.offset_voxels = "field", [1.0, 7.5, 7.5]
    s.map_geometry.stride_voxels = [3.0, 16.0, 16.0]
    assert np.allclose(covered_world_box(s), [[-320.0, -140.0, -160.0], [-20.0, 180.0, 160.0]])
    s.map_geometry.offset_voxels, s.map_geometry.stride_voxels = [], []  # older summaries: field = the whole grid
    assert np.allclose(covered_world_box(s), [[-320.0, -140.0, -160.0], [-20.0, 180.0, 160.0]])
    s.map_geometry.kind = "receptive"
    assert covered_world_box(s) is None  # nothing recorded: nothing drawn


def test_cover_shapes_outline_the_box_and_veil_the_rest():
    from medcam3d.viewer.coverage import cover_shapes

    extent = np.array([[0.0, 0.0, 0.0], [100.0, 200.0, 300.0]])
    box = np.array([[10.0, 50.0, 100.0], [90.0, 150.0, 200.0]])
    c = cover_shapes(box, extent, (1, 2), (40.0, 0.0, 0.0))  # an axial slice through the box
    outline = [v for v, r in zip(c.shapes, c.roles) if r == "outline"]
    veils = [v for v, r in zip(c.shapes, c.roles) if r == "veil"]
    assert len(outline) == 1 and np.allclose(outline[0][:, 0], 40.0)
    assert np.allclose(outline[0][:, 1:].min(axis=0), [50, 100]) and np.allclose(outline[0][:, 1:].max(axis=0),
                                                                               [150, 200])
    area = sum(np.ptp(v[:, 1]) * np.ptp(v[:, 2]) for v in veils)
    assert area == pytest.approx(200 * 300 - 100 * 100)  # the veils tile the slice outside the box
    c = cover_shapes(box, extent, (1, 2), (95.0, 0.0, 0.0))  # above the covered slab: no cell on this slice
    assert c.roles == ["veil"] and np.allclose(np.ptp(c.shapes[0], axis=0)[1:], [200, 300])
    c = cover_shapes(box, extent, (0, 1, 2), (0.0, 0.0, 0.0))  # 3-D: the box's 12 edges, each along one axis
    assert len(c.shapes) == 12 and all(np.count_nonzero(np.ptp(e, axis=0)) == 1 for e in c.shapes)
    assert cover_shapes(None, extent, (1, 2), (40.0, 0.0, 0.0)).shapes == []


def test_scaled_uint8_maps_are_read_as_values_in_0_1(tmp_path, folder):
    from medcam3d.viewer.folder import OutputFolder

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    k = LABELS.index(LESION)
    path = copy / f"fullres_hirescam_{k:03d}_{LESION}.nii.gz"
    ref = nib.load(str(path))
    raw = (np.arange(np.prod(ref.shape)) % 256).astype(np.uint8).reshape(ref.shape)
    img = nib.Nifti1Image(raw, ref.affine)
    img.header.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0 / 255.0, 0.0)  # as medcam3d writes display heatmaps
    nib.save(img, str(path))
    m = OutputFolder(copy).map("hirescam", LESION)
    data = np.transpose(m.placed.data, np.argsort(m.placed.axes))  # back to the file's axis order
    assert m.full_resolution and data.dtype == np.float32
    assert np.allclose(data, raw / 255.0, atol=1e-6, rtol=0) and data.max() == 1.0 and data.min() == 0.0


def test_view_refuses_bad_input_with_exit_2(tmp_path, folder, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["view", str(tmp_path / "empty")], "not a medcam3d output folder"),
        (["view", str(folder), "--screenshot", str(tmp_path / "shot.jpg")], ".png"),
        (["view", str(folder), "--threshold", "1.5"], "--threshold"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        assert message in capsys.readouterr().err
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    args = ["view", str(folder), "--screenshot", str(tmp_path / "s.png")]
    r = subprocess.run([sys.executable, "-m", "medcam3d.cli", *args], capture_output=True, text=True, env=env,
                       check=False)
    assert r.returncode == 2 and "xvfb-run" in r.stderr and not (tmp_path / "s.png").exists()


# --- the viewer -------------------------------------------------------------------------------------------------------
@pytest.mark.gui
def test_viewer_layers_names_and_affines(app, folder, scan):
    v, k = app.viewer, LABELS.index(LESION)
    assert [layer.name for layer in v.layers] == [
        "left: CT", f"left: HiResCAM · {LESION}", "left: covered region",
        "right: CT", f"right: Grad-CAM · {LESION}", "right: covered region"]
    assert v.canvas.grid.enabled and v.canvas.grid.stride == 3 and tuple(v.canvas.grid.shape) == (1, 2)
    ct, ct_affine = nifti(scan)
    for layer in (v.layers[0], v.layers[3]):
        assert np.array_equal(layer.data, ct)  # the phantom is stored in (S, P, L) order: no transposition
        assert np.allclose(layer.affine.affine_matrix, RAS_TO_SPL @ ct_affine)
    for layer, method in ((v.layers[1], "hirescam"), (v.layers[4], "gradcam")):
        data, affine = nifti(folder / f"fullres_{method}_{k:03d}_{LESION}.nii.gz")
        assert np.array_equal(layer.data, data)
        assert np.allclose(layer.affine.affine_matrix, RAS_TO_SPL @ affine)
        # translucent, not additive (white + anything = white); the bottom of the range is fully transparent
        rgba = layer.colormap.map(np.array([0.0, 1.0]))
        assert layer.blending == "translucent" and rgba[0, 3] == 0.0 and rgba[1, 3] == 1.0
        assert rgba[1, :3].min() < 0.5  # the top is a saturated colour, not white
    assert v.dims.axis_labels == ("S", "P", "L")


@pytest.mark.gui
def test_choosing_a_class_in_the_widget_shows_its_maps(app, folder):
    w, v = app.widget, app.viewer
    classes = summary(folder)["classes"]
    other = next(c for c in classes if not c["full_resolution"])
    position = classes.index(other)
    w.table.selectRow(next(r for r, e in enumerate(w.entries) if e.index == other["index"]))
    for layer, method in ((v.layers[1], "hirescam"), (v.layers[4], "gradcam")):
        data, affine = nifti(folder / f"lowres_{method}.nii.gz")
        assert np.array_equal(layer.data, data[..., position])  # feature-resolution maps are in SPL order too
        assert np.allclose(layer.affine.affine_matrix, RAS_TO_SPL @ affine)
        assert layer.name.endswith(f"{other['label']} · feature resolution")
    w.method_boxes[1].setCurrentIndex(w.method_boxes[1].findData("hirescam"))
    assert np.array_equal(v.layers[4].data, v.layers[1].data) and v.layers[4].name.startswith("right: HiResCAM")
    w.table.selectRow(next(r for r, e in enumerate(w.entries) if e.label == LESION))
    data, _ = nifti(folder / f"fullres_hirescam_{LABELS.index(LESION):03d}_{LESION}.nii.gz")
    assert np.array_equal(v.layers[4].data, data)
    w.threshold_box.setValue(0.5)
    assert v.layers[1].contrast_limits == pytest.approx([0.5 * data.max(), data.max()])
    w.window_box.setCurrentIndex(w.window_box.findData("soft_tissue"))
    assert v.layers[0].contrast_limits == pytest.approx([-160.0, 240.0])
    w.three_d.setChecked(True)
    assert v.dims.ndisplay == 3


def brightest(image: np.ndarray) -> np.ndarray:
    """(row, column) centroid of the pixels at >= 80 % of the image's maximum brightness."""
    total = image[..., :3].astype(float).sum(axis=-1)
    return np.argwhere(total >= 0.8 * total.max()).mean(axis=0)


@pytest.mark.gui
def test_screenshot_puts_the_hirescam_peak_on_the_lesion(app, scan):
    from qtpy.QtWidgets import QApplication

    comparison, v = app.comparison, app.viewer
    width, height = 800, 400
    lesion = lesion_world(scan)
    app.widget.peak_buttons[0].click()
    assert abs(v.dims.point[0] - lesion[0]) <= SPACING[0]  # the slice through the HiResCAM peak cuts the lesion
    for layer in (*comparison.scan_layers, *comparison.cover_layers):  # keep only the maps, to find them without
        layer.visible = False                                           # the CT's (or the outline's) help
    overlays = v.canvas.overlays
    for overlay in (overlays.text, overlays.scale_bar, *(m.name_overlay for m in comparison.map_layers)):
        overlay.visible = False
    QApplication.processEvents()
    shot = comparison.screenshot((width, height))
    assert shot.shape == (height, width, 4)
    # where the lesion must appear, from the camera alone: pane centre + (world - camera centre) x zoom
    camera = v.scene.camera
    centre, zoom = np.asarray(camera.center)[-2:], camera.zoom
    pane = np.array([height / 2, width / 4])
    expected = pane + (lesion[1:] - centre) * zoom
    assert np.linalg.norm(expected - pane) > 20  # off-centre, so this test can tell a misplaced map
    left, right = shot[:, : width // 2], shot[:, width // 2 :]
    assert np.linalg.norm(brightest(left) - expected) < 4.0 * zoom  # within 4 mm
    shifted = expected + np.array([0.0, SHIFT_MM * zoom])  # the patient's left is to the right of the screen
    assert np.linalg.norm(brightest(right) - shifted) < 8.0 * zoom
    assert np.abs(left.astype(float) - right).mean() > 2.0  # the panes differ where the methods differ


def body_pixels_coloured(comparison, window: str, size: tuple[int, int], grey: int) -> tuple[int, int]:
    """Screenshots of the left pane's CT with and without its map (covered-region drawing hidden): how many pixels
    of tissue at least ``grey`` bright without the map there are, and how many of them the map changes by > 40 in
    some colour channel."""
    comparison.set_window(window)
    for layer in comparison.cover_layers:
        layer.visible = False
    with_map = comparison.screenshot(size)[..., :3].astype(float)
    comparison.map_layers[0].visible = False
    without = comparison.screenshot(size)[..., :3].astype(float)
    comparison.map_layers[0].visible = True
    half = size[0] // 2
    tissue = (without[:, :half].min(axis=-1) >= grey) & (np.ptp(without[:, :half], axis=-1) < 3)  # grey, bright
    changed = np.abs(with_map[:, :half] - without[:, :half]).max(axis=-1) > 40
    return int(tissue.sum()), int((tissue & changed).sum())


@pytest.mark.gui
def test_maps_show_over_white_soft_tissue_in_both_windows(make_napari_viewer, folder, scan, tmp_path):
    """A broad map over the whole body (a Gaussian, 40 mm wide, centred on it): where it lies over soft tissue --
    white in the lung window -- the overlay must be seen, not only over the (black) air and lungs."""
    from medcam3d.viewer.app import open_viewer

    vol = read_volume(scan)
    centre = vol.affine @ np.array([*(np.array(vol.shape) - 1) / 2.0, 1.0])
    broad = blob(vol, centre[:3], 40.0)
    copy = copy_with_maps(folder, tmp_path / "broad", {"hirescam": broad, "gradcam": broad})
    app = open_viewer(copy, class_=LESION, viewer=make_napari_viewer(show=True))
    c = app.comparison
    hide_overlays(c)
    c.viewer.dims.set_point(0, float(centre[2]))  # the middle slice (phantom: S = z)
    size = (800, 400)
    # soft tissue is white (>= 220 grey) in the lung window, mid-grey (>= 100) in the soft-tissue window
    for window, grey in (("lung", 220), ("soft_tissue", 100)):
        tissue, coloured = body_pixels_coloured(c, window, size, grey)
        assert tissue > 2000, window  # the slice shows plenty of such tissue under the map
        assert coloured > 0.9 * tissue, (window, tissue, coloured)
    # the former display (additive blending, a colormap starting at black) is lost over white tissue
    for layer in c.map_layers:
        layer.blending, layer.colormap = "additive", "inferno"
    tissue, coloured = body_pixels_coloured(c, "lung", size, 220)
    assert coloured < 0.1 * tissue


@pytest.mark.gui
def test_uncovered_region_is_outlined_and_veiled(make_napari_viewer, receptive_folder):
    from medcam3d.viewer.app import open_viewer

    s = summary(receptive_folder)
    box = hand_covered_box(s)
    ct, ct_affine = nifti(Path(s["input"]["path"]))
    corners = np.array([[a, b, c, 1.0] for a in (-0.5, ct.shape[0] - 0.5) for b in (-0.5, ct.shape[1] - 0.5)
                        for c in (-0.5, ct.shape[2] - 0.5)]).T
    scan_world = (RAS_TO_SPL @ ct_affine @ corners)[:3]
    extent = np.stack([scan_world.min(axis=1), scan_world.max(axis=1)])
    # AxialNet's cells cover the middle of the slice: a band of at least 20 mm is uncovered on every side
    assert np.all(box[0, 1:] - extent[0, 1:] > 20) and np.all(extent[1, 1:] - box[1, 1:] > 20)
    app = open_viewer(receptive_folder, class_=LESION, viewer=make_napari_viewer(show=True))
    c, v = app.comparison, app.viewer
    hide_overlays(c)
    v.dims.set_point(0, float(box.mean(axis=0)[0]))  # a slice through the covered slab
    size = (800, 400)
    shot = c.screenshot(size)[..., :3].astype(int)
    for layer in c.cover_layers:
        layer.visible = False
    bare = c.screenshot(size)[..., :3].astype(int)
    (top, left), (bottom, right) = (to_screen(box[i, 1:], v.scene.camera, np.array([size[1] / 2, size[0] / 4]))
                                    for i in (0, 1))
    pane = shot[:, : size[0] // 2]
    cyan = (pane[..., 0] < 100) & (pane[..., 1] > 150) & (pane[..., 2] > 150)
    rows, cols = np.arange(pane.shape[0]), np.arange(pane.shape[1])
    near_rows = [np.abs(rows - r) <= 3 for r in (top, bottom)]
    near_cols = [np.abs(cols - q) <= 3 for q in (left, right)]
    along_rows = np.arange(int(np.ceil(top)) + 4, int(bottom) - 3)
    along_cols = np.arange(int(np.ceil(left)) + 4, int(right) - 3)
    for near in near_rows:  # the top and bottom edges: cyan at every column between the corners
        assert cyan[near][:, along_cols].any(axis=0).mean() > 0.95
    for near in near_cols:  # the left and right edges: cyan at every row between the corners
        assert cyan[:, near][along_rows].any(axis=1).mean() > 0.95
    on_edges = np.zeros_like(cyan)
    on_edges[near_rows[0] | near_rows[1], :] = True
    on_edges[:, near_cols[0] | near_cols[1]] = True
    assert cyan.sum() > 100 and (cyan & ~on_edges).sum() < 0.01 * cyan.sum()  # an outline, nothing else
    # outside the box the scan is veiled (changed); inside it nothing is drawn over the map
    diff = np.abs(shot - bare)[:, : size[0] // 2].max(axis=-1)
    r0, r1 = to_screen(extent[0, 1:], v.scene.camera, np.array([size[1] / 2, size[0] / 4])), \
        to_screen(extent[1, 1:], v.scene.camera, np.array([size[1] / 2, size[0] / 4]))
    band = np.zeros_like(cyan)
    band[int(r0[0]) + 2: int(top) - 4, int(r0[1]) + 2: int(r1[1]) - 2] = True  # anterior band, full width
    inside = np.zeros_like(cyan)
    inside[int(top) + 5: int(bottom) - 5, int(left) + 5: int(right) - 5] = True
    assert band.sum() > 500 and np.mean(diff[band] > 10) > 0.95
    assert diff[inside].max() == 0


@pytest.mark.gui
def test_a_cam_certificate_shows_one_pane_and_says_why(make_napari_viewer, folder, tmp_path):
    from medcam3d.viewer.app import open_viewer

    copy = tmp_path / "cam"
    shutil.copytree(folder, copy)
    s = summary(copy)
    s["certificate"]["kind"] = "cam"  # as a GAP + linear head is certified
    (copy / "summary.json").write_text(json.dumps(s))
    app = open_viewer(copy, class_=LESION, viewer=make_napari_viewer(show=True))
    c, v = app.comparison, app.viewer
    line = "HiResCAM and Grad-CAM coincide by proof for this model (certificate cam): one pane shown"
    assert c.methods == ["hirescam", "gradcam"] and not v.canvas.grid.enabled
    assert [layer.visible for layer in v.layers] == [True, True, True, False, False, False]
    assert line in v.canvas.overlays.text.text and line in app.widget.legend.text()
    app.widget.method_boxes[1].setCurrentIndex(app.widget.method_boxes[1].findData("hirescam"))
    assert v.canvas.grid.enabled and all(layer.visible for layer in v.layers)  # asked for the same method twice
    assert "coincide" not in v.canvas.overlays.text.text
    # without the cam certificate: two panes, no such line
    app2 = open_viewer(folder, class_=LESION, viewer=make_napari_viewer(show=True))
    assert app2.viewer.canvas.grid.enabled and "coincide" not in app2.viewer.canvas.overlays.text.text


# --- the plugin -------------------------------------------------------------------------------------------------------
@pytest.mark.gui
def test_reader_opens_folders_and_maps(make_napari_viewer, folder, scan):
    v = make_napari_viewer()
    s = summary(folder)
    top = max(s["classes"], key=lambda c: c["score"])
    v.open(str(folder), plugin="medcam3d")
    suffix = "" if top["full_resolution"] else " · feature resolution"
    assert [layer.name for layer in v.layers] == ["CT", f"HiResCAM · {top['label']}{suffix}",
                                                 f"Grad-CAM · {top['label']}{suffix}"]
    ct, ct_affine = nifti(scan)
    assert np.array_equal(v.layers["CT"].data, ct)
    assert np.allclose(v.layers["CT"].affine.affine_matrix, RAS_TO_SPL @ ct_affine)
    v.layers.clear()
    k = LABELS.index(LESION)
    v.open(str(folder / f"fullres_gradcam_{k:03d}_{LESION}.nii.gz"), plugin="medcam3d")
    data, affine = nifti(folder / f"fullres_gradcam_{k:03d}_{LESION}.nii.gz")
    assert [layer.name for layer in v.layers] == [f"Grad-CAM · {LESION}"]
    assert np.array_equal(v.layers[0].data, data)
    assert np.allclose(v.layers[0].affine.affine_matrix, RAS_TO_SPL @ affine)
    v.layers.clear()
    v.open(str(folder / "lowres_hirescam.nii.gz"), plugin="medcam3d")
    low, low_affine = nifti(folder / "lowres_hirescam.nii.gz")
    assert [layer.name for layer in v.layers] == [f"HiResCAM · {c['label']} · feature resolution" for c in s["classes"]]
    assert [layer.visible for layer in v.layers] == [c is top for c in s["classes"]]
    for position, layer in enumerate(v.layers):
        assert np.array_equal(layer.data, low[..., position])
        assert np.allclose(layer.affine.affine_matrix, RAS_TO_SPL @ low_affine)


@pytest.mark.gui
def test_sample_data_is_the_explained_demo_phantom(make_napari_viewer, monkeypatch, untrained_config):
    import medcam3d.viewer.sample_data as sample

    monkeypatch.setattr(sample, "DEMO_CONFIG", str(untrained_config))  # the trained demo weights may be absent
    v = make_napari_viewer()
    v.open_sample("medcam3d", "demo")
    names = [layer.name for layer in v.layers]
    assert names[0] == "CT" and names[-1] == "planted lesions" and len(names) == 4
    assert names[1].startswith("HiResCAM · ") and names[2].startswith("Grad-CAM · ")
    ph = make_phantom(sample.DEMO_SEED, present={n: True for n in sample.DEMO_LESIONS}, prevalence=0.0)
    assert np.allclose(v.layers["CT"].data, ph.hu, atol=1e-3)
    for layer in v.layers:
        assert np.allclose(layer.affine.affine_matrix, RAS_TO_SPL @ ph.affine)  # maps are full resolution here
    lesions = v.layers["planted lesions"].data
    assert sorted(np.unique(lesions)) == [0, *sorted(LABELS.index(n) + 1 for n in sample.DEMO_LESIONS)]
    assert np.array_equal(lesions == LABELS.index(LESION) + 1, ph.lesion_masks[LESION])


@pytest.mark.gui
def test_explain_widget_adds_the_maps_the_cli_writes(make_napari_viewer, qtbot, tmp_path, scan, folder,
                                                     untrained_config):
    from medcam3d.viewer.explain_widget import ExplainWidget

    v = make_napari_viewer()
    v.open(str(scan), plugin="medcam3d")
    w = ExplainWidget(v)
    assert w.layer_box.currentText() == "phantom"
    w.config_box.setCurrentText(str(untrained_config))
    w.out_edit.setText(str(tmp_path / "widget_out"))
    stages = []
    worker = w.run()
    worker.yielded.connect(stages.append)
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    assert len(v.layers) == 3, w.status.text()
    out = tmp_path / "widget_out"
    for method in ("hirescam", "gradcam"):  # the same raw maps as `medcam3d explain` on the scan file
        mine, _ = nifti(out / f"lowres_{method}.nii.gz")
        cli, _ = nifti(folder / f"lowres_{method}.nii.gz")
        assert np.allclose(mine, cli, atol=1e-5)
    s = summary(out)
    top = max(s["classes"], key=lambda c: c["score"])
    for layer, method in zip(v.layers[1:], ("hirescam", "gradcam"), strict=True):
        data, _ = nifti(out / f"fullres_{method}_{top['index']:03d}_{top['label']}.nii.gz")
        assert np.array_equal(layer.data, data)
        assert np.allclose(layer.affine.affine_matrix, v.layers["phantom"].affine.affine_matrix)
    assert w.progress.value() == w.progress.maximum() and top["label"] in w.status.text()


# --- medcam3d view --screenshot ---------------------------------------------------------------------------------------
@pytest.mark.gui
def test_view_command_writes_a_screenshot(mock_app_model, qtbot, tmp_path, folder, scan, capsys):
    # mock_app_model: the viewers made by `main` register napari's actions in a throw-away application, as the
    # make_napari_viewer fixture does
    from PIL import Image

    png = tmp_path / "view.png"
    args = ["view", str(scan), "--maps", str(folder), "--class", LESION, "--screenshot", str(png),
            "--size", "640", "320"]
    assert main(args) == 0, capsys.readouterr().err
    image = np.asarray(Image.open(png).convert("RGB"), dtype=float)
    assert image.shape == (320, 640, 3)
    assert image.std() > 20  # not blank
    assert np.abs(image[:, :320] - image[:, 320:]).mean() > 1.0  # the HiResCAM and Grad-CAM panes differ
