"""The napari viewer on a segmentation output folder (issue 19): the predicted segmentation as a labels layer under
the maps, the targets listed where classes are, choosing a target moves to its centroid.

The folder is written by hand here, following the file contract (summary.json's ``task``, ``targets``,
``segmentation``, ``segmentation_labels``; ``segmentation.nii.gz``; ``targets.csv``), with hand-counted regions, so
that every expected value is known without medcam3d computing it. GUI tests need napari, pytest-qt and an X server:
``xvfb-run -a python -m pytest tests/test_seg_viewer.py``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medcam3d.cli import main

# the scan is stored in RAS index order (i -> x, j -> y, k -> z), not the viewer's (S, P, L): the layers must be
# transposed and flipped into place
SCAN_SHAPE = (40, 48, 16)
SCAN_AFFINE = np.array([[2.5, 0, 0, -50.0], [0, 2.5, 0, -60.0], [0, 0, 5.0, -40.0], [0, 0, 0, 1]])
# RAS mm -> the viewer's world (S, P, L) mm, by hand: S = z, P = -y, L = -x
RAS_TO_SPL = np.array([[0, 0, 1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
CLASSES = {1: "mass", 2: "effusion"}
# the regions, as half-open index boxes on the scan grid: (class, component rank, box); sizes by hand
REGIONS = [
    (1, 1, ((5, 12), (10, 18), (3, 7))),  # 7 x 8 x 4 = 224 voxels
    (1, 2, ((25, 29), (30, 35), (9, 12))),  # 4 x 5 x 3 = 60 voxels
    (2, 1, ((20, 31), (5, 10), (2, 6))),  # 11 x 5 x 4 = 220 voxels
]
VOXELS = [224, 60, 220]
SCORES = [150.25, 40.5, 99.0]
NAMES = ["mass component 1", "mass component 2", "effusion component 1"]
STEMS = ["000_mass_component_1", "001_mass_component_2", "002_effusion_component_1"]
METHODS = ("hirescam", "gradcam")
TARGET_FIELDS = ["target", "name", "class", "label", "region", "component", "voxels", "centroid_x_mm",
                 "centroid_y_mm", "centroid_z_mm", "score"]


@pytest.fixture(scope="session")
def qapp_args():
    """pytest-qt's QApplication arguments, overridden to fail (not skip) GUI tests without a display."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        pytest.fail("this GUI test needs an X server: run it under `xvfb-run -a python -m pytest` (docs/viewer.md)")
    return ["medcam3d-tests"]


def box_centroid_ras(box) -> np.ndarray:
    """A box's centroid in RAS mm: the mean index of [a, b) is (a + b - 1) / 2, through the scan's affine."""
    ijk = [(a + b - 1) / 2.0 for a, b in box]
    return (SCAN_AFFINE @ np.array([*ijk, 1.0]))[:3]


def gaussian(centre_ras: np.ndarray, sigma_mm: float) -> np.ndarray:
    idx = np.indices(SCAN_SHAPE).reshape(3, -1)
    ras = SCAN_AFFINE[:3, :3] @ idx + SCAN_AFFINE[:3, 3:]
    d2 = ((ras - centre_ras[:, None]) ** 2).sum(axis=0)
    return np.exp(-d2 / (2 * sigma_mm**2)).reshape(SCAN_SHAPE).astype(np.float32)


def write_seg_folder(root: Path, scan_path: Path | None = None) -> Path:
    """A segmentation output folder written by hand to the contract, with its scan (``root/scan.nii.gz``)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    scan = scan_path or root / "scan.nii.gz"
    if scan_path is None:
        hu = (rng.normal(0, 30, SCAN_SHAPE) - 400).astype(np.float32)
        nib.save(nib.Nifti1Image(hu, SCAN_AFFINE), str(scan))
    out = root / "out"
    out.mkdir()
    seg = np.zeros(SCAN_SHAPE, np.uint8)
    for cls, _, box in REGIONS:
        seg[tuple(slice(a, b) for a, b in box)] = cls
    img = nib.Nifti1Image(seg, SCAN_AFFINE)
    img.header.set_data_dtype(np.uint8)
    nib.save(img, str(out / "segmentation.nii.gz"))
    centroids = [box_centroid_ras(box) for _, _, box in REGIONS]
    for k, c in enumerate(centroids):
        nib.save(nib.Nifti1Image(gaussian(c, 5.0), SCAN_AFFINE), str(out / f"fullres_hirescam_{STEMS[k]}.nii.gz"))
        shifted = c + np.array([-20.0, 0.0, 0.0])  # Grad-CAM 20 mm towards the patient's right
        nib.save(nib.Nifti1Image(gaussian(shifted, 10.0), SCAN_AFFINE), str(out / f"fullres_gradcam_{STEMS[k]}.nii.gz"))
    low_affine = SCAN_AFFINE @ np.diag([8.0, 8.0, 8.0, 1.0])
    for m in METHODS:
        nib.save(nib.Nifti1Image(rng.normal(size=(5, 6, 2, 3)).astype(np.float32), low_affine),
                 str(out / f"lowres_{m}.nii.gz"))
    targets = [{"index": k, "name": NAMES[k], "cls": cls, "label": CLASSES[cls], "region": "component",
                "component": comp, "voxels": VOXELS[k], "centroid_mm": [float(v) for v in centroids[k]],
                "score": SCORES[k]} for k, (cls, comp, _) in enumerate(REGIONS)]
    summary = {
        "schema_version": 1, "medcam3d_version": "test",
        "input": {"path": str(scan), "shape": list(SCAN_SHAPE), "affine": SCAN_AFFINE.tolist()},
        "map_shape": [5, 6, 2], "methods": list(METHODS),
        "classes": [{"index": k, "label": NAMES[k], "score": SCORES[k], "probability": 0.9, "predicted": True,
                     "full_resolution": True} for k in range(3)],
        "task": "segmentation", "targets": targets, "segmentation": "segmentation.nii.gz",
        "segmentation_labels": {str(k): v for k, v in CLASSES.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary))
    with open(out / "targets.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TARGET_FIELDS)
        for t in targets:
            w.writerow([t["index"], t["name"], t["cls"], t["label"], t["region"], t["component"], t["voxels"],
                        *t["centroid_mm"], t["score"]])
    return out


@pytest.fixture(scope="module")
def seg_folder(tmp_path_factory) -> Path:
    return write_seg_folder(tmp_path_factory.mktemp("seg"))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def world_voxels(data: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    """The world positions of the voxels holding ``value``, rounded to 1e-6 mm and sorted (row by row)."""
    idx = np.argwhere(data == value)
    world = (affine @ np.c_[idx, np.ones(len(idx))].T)[:3].T
    return np.round(world[np.lexsort(np.round(world, 6).T[::-1])], 6)


# --- without a GUI ----------------------------------------------------------------------------------------------------
def test_folder_reads_targets_and_the_segmentation(seg_folder):
    from medcam3d.viewer.folder import OutputFolder

    f = OutputFolder(seg_folder)
    assert f.is_segmentation and f.segmentation_labels == CLASSES
    assert [e.label for e in f.listing()] == NAMES  # targets in their order, not by score
    assert [(t.name, t.label, t.component, t.voxels) for t in f.targets] == [
        (NAMES[k], CLASSES[c], comp, VOXELS[k]) for k, (c, comp, _) in enumerate(REGIONS)]
    assert f.target(f.entry("mass component 2")).score == SCORES[1]
    seg = f.segmentation()
    assert seg.data.dtype == np.uint8
    for value in CLASSES:  # the same voxels at the same places in the napari world as the file's
        stored = nib.load(str(seg_folder / "segmentation.nii.gz"))
        expected = world_voxels(np.asarray(stored.dataobj), RAS_TO_SPL @ stored.affine, value)
        assert np.array_equal(world_voxels(seg.data, seg.affine, value), expected)
    assert seg.data.shape == (SCAN_SHAPE[2], SCAN_SHAPE[1], SCAN_SHAPE[0])  # (S, P, L) axes


def test_a_classification_summary_has_no_targets(tmp_path):
    from medcam3d.viewer.folder import OutputFolder

    (tmp_path / "summary.json").write_text(json.dumps({
        "methods": ["hirescam"], "classes": [{"index": i, "label": f"c{i}", "score": s, "probability": 0.5,
                                              "predicted": False, "full_resolution": False}
                                             for i, s in enumerate((0.1, 2.0, 1.0))]}))
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)), str(tmp_path / "lowres_hirescam.nii.gz"))
    f = OutputFolder(tmp_path)
    assert not f.is_segmentation and f.targets == [] and f.segmentation() is None
    assert [e.label for e in f.listing()] == ["c1", "c2", "c0"]  # by score, as before
    assert f.target(f.classes[0]) is None


def test_segmentation_layer_colours_names_and_transparent_background(seg_folder):
    from medcam3d.viewer.folder import OutputFolder
    from medcam3d.viewer.layers import MAP_COLORMAP, segmentation_layer

    f = OutputFolder(seg_folder)
    data, kwargs, kind = segmentation_layer(f.segmentation(), f.segmentation_labels)
    assert kind == "labels" and data is f.segmentation().data
    colours = kwargs["colormap"]
    assert colours[0][3] == 0.0 and colours[None][3] == 0.0  # background and unlisted values: not drawn
    assert colours[1][3] == 1.0 and colours[2][3] == 1.0 and colours[1] != colours[2]
    plasma = [c[:3] for c in MAP_COLORMAP["colors"]]
    for v in (1, 2):  # no class colour is one of the maps' colours
        assert min(np.abs(np.subtract(colours[v][:3], p)).max() for p in plasma) > 0.1
    assert kwargs["features"] == {"index": [0, 1, 2], "class": ["background", "mass", "effusion"]}
    assert 0 < kwargs["opacity"] < 1


def test_a_partial_segmentation_summary_is_refused(tmp_path):
    from medcam3d.errors import InputError
    from medcam3d.viewer.folder import OutputFolder

    out = write_seg_folder(tmp_path)
    s = json.loads((out / "summary.json").read_text())
    s["targets"] = s["targets"][:2]
    (out / "summary.json").write_text(json.dumps(s))
    with pytest.raises(InputError, match="one target per explained class record, found 2 targets and 3 classes"):
        OutputFolder(out)


def test_an_empty_segmentation_says_why_nothing_is_shown(tmp_path):
    from medcam3d.errors import InputError
    from medcam3d.viewer.folder import OutputFolder

    note = "the model predicts none of the explained classes (mass) anywhere in this scan"
    (tmp_path / "summary.json").write_text(json.dumps({
        "methods": ["hirescam"], "classes": [], "task": "segmentation", "targets": [], "notes": [note],
        "segmentation": "segmentation.nii.gz", "segmentation_labels": {"1": "mass"}}))
    with pytest.raises(InputError, match=re.escape(f"predicted nothing to explain ({note})")):
        OutputFolder(tmp_path)


# --- the viewer -------------------------------------------------------------------------------------------------------
@pytest.fixture
def app(make_napari_viewer, seg_folder):
    from medcam3d.viewer.window import open_viewer

    return open_viewer(seg_folder, viewer=make_napari_viewer(show=True))


@pytest.mark.gui
def test_segmentation_is_a_labels_layer_under_each_map_and_the_table_lists_targets(app, seg_folder):
    v, c = app.viewer, app.comparison
    assert [layer.name for layer in v.layers] == [
        "left: CT", "left: segmentation", f"left: HiResCAM · {NAMES[0]}", "left: covered region",
        "right: CT", "right: segmentation", f"right: Grad-CAM · {NAMES[0]}", "right: covered region"]
    assert v.canvas.grid.enabled and v.canvas.grid.stride == 4 and tuple(v.canvas.grid.shape) == (1, 2)
    stored = nib.load(str(seg_folder / "segmentation.nii.gz"))
    labels = np.asarray(stored.dataobj)
    for seg, m in zip(c.segmentation_layers, c.map_layers, strict=True):
        assert type(seg).__name__ == "Labels" and list(v.layers).index(seg) < list(v.layers).index(m)
        # the labels layer's data, placed by its affine, is the file's data placed by the file's affine
        for value in CLASSES:
            assert np.array_equal(world_voxels(np.asarray(seg.data), seg.affine.affine_matrix, value),
                                  world_voxels(labels, RAS_TO_SPL @ stored.affine, value))
        assert np.array_equal(np.sort(np.unique(seg.data)), [0, 1, 2])
        assert np.bincount(np.asarray(seg.data).ravel()).tolist() == [labels.size - 284 - 220, 284, 220]
        # by hand: the (x, y, z)-ordered file is shown as its (z, y, x) transpose; S = 5 k - 40, P = -(2.5 j - 60),
        # L = -(2.5 i - 50)
        assert np.array_equal(np.asarray(seg.data), np.transpose(labels, (2, 1, 0)))
        assert np.allclose(seg.affine.affine_matrix, [[5, 0, 0, -40], [0, -2.5, 0, 60], [0, 0, -2.5, 50], [0, 0, 0, 1]])
    hires = nib.load(str(seg_folder / f"fullres_hirescam_{STEMS[0]}.nii.gz")).get_fdata(dtype=np.float32)
    assert np.array_equal(np.asarray(c.map_layers[0].data), np.transpose(hires, (2, 1, 0)))
    w = app.widget  # the table lists the targets of targets.csv
    header = [w.table.horizontalHeaderItem(i).text() for i in range(w.table.columnCount())]
    assert header == ["target", "class", "component", "voxels", "score"]
    rows = [[w.table.item(r, col).text() for col in range(len(header))] for r in range(w.table.rowCount())]
    expected = [[r["name"], r["label"], r["component"], r["voxels"], f"{float(r['score']):+.3f}"]
                for r in read_csv(seg_folder / "targets.csv")]
    assert rows == expected and len(rows) == 3
    assert w.segmentation_box is not None and w.segmentation_box.isChecked()
    w.segmentation_box.setChecked(False)
    assert not any(layer.visible for layer in app.comparison.segmentation_layers)
    w.segmentation_box.setChecked(True)
    assert all(layer.visible for layer in app.comparison.segmentation_layers)


def centroid_world(row: dict[str, str]) -> np.ndarray:
    """A targets.csv row's centroid in the viewer's world (S, P, L) mm."""
    return (RAS_TO_SPL @ np.array([float(row[f"centroid_{a}_mm"]) for a in "xyz"] + [1.0]))[:3]


@pytest.mark.gui
def test_opening_on_a_target_and_choosing_targets_moves_to_their_centroids(make_napari_viewer, seg_folder):
    from medcam3d.viewer.window import open_viewer

    app = open_viewer(seg_folder, class_="effusion component 1", viewer=make_napari_viewer(show=True))
    w, v, c = app.widget, app.viewer, app.comparison
    rows = read_csv(seg_folder / "targets.csv")
    # opened on a named target: the slices go through its centroid (the view is then fitted to the window, so the
    # camera is not checked here)
    centroid = centroid_world(rows[2])
    assert abs(v.dims.point[0] - centroid[0]) <= 2.5 + 1e-6
    assert np.allclose(v.dims.point[1:], centroid[1:], atol=1.25 + 1e-6)
    assert w.table.selectedItems()[0].text() == "effusion component 1"
    for row in (0, 1, 2):
        w.table.selectRow(row)
        r = rows[row]
        centroid = centroid_world(r)
        # the slider stops on the slice nearest the centroid (5 mm slices), the other axes are where asked
        assert abs(v.dims.point[0] - centroid[0]) <= 2.5 + 1e-6
        assert np.allclose(v.dims.point[1:], centroid[1:], atol=1.25 + 1e-6)
        assert np.allclose(np.asarray(v.scene.camera.center)[-2:], centroid[1:])
        for layer, method in zip(c.map_layers, METHODS, strict=True):
            data = nib.load(str(seg_folder / f"fullres_{method}_{STEMS[row]}.nii.gz")).get_fdata(dtype=np.float32)
            assert np.array_equal(np.asarray(layer.data), np.transpose(data, (2, 1, 0)))
            assert layer.name.endswith(r["name"])
        caption = v.canvas.overlays.text.text
        assert caption.startswith(f"{r['name']}   class {r['label']}   {r['voxels']} voxels   region score "
                                  f"{float(r['score']):+.3f}")
        assert "under the maps: the predicted segmentation (mass, effusion)" in caption
    # the maps of the chosen target peak at its centroid (planted so): the peak button agrees with the centroid
    c.jump_to_peak(0)
    assert np.allclose(v.dims.point, centroid, atol=2.5 + 1e-6)


@pytest.mark.gui
def test_reader_opens_the_segmentation_folder_and_file(make_napari_viewer, seg_folder):
    v = make_napari_viewer()
    v.open(str(seg_folder), plugin="medcam3d")
    assert [layer.name for layer in v.layers] == ["CT", "segmentation", f"HiResCAM · {NAMES[0]}",
                                                 f"Grad-CAM · {NAMES[0]}"]
    assert type(v.layers["segmentation"]).__name__ == "Labels"
    v.layers.clear()
    v.open(str(seg_folder / "segmentation.nii.gz"), plugin="medcam3d")
    stored = nib.load(str(seg_folder / "segmentation.nii.gz"))
    assert [type(layer).__name__ for layer in v.layers] == ["Labels"]
    assert np.array_equal(world_voxels(np.asarray(v.layers[0].data), v.layers[0].affine.affine_matrix, 2),
                          world_voxels(np.asarray(stored.dataobj), RAS_TO_SPL @ stored.affine, 2))


@pytest.mark.gui
def test_view_command_screenshot_of_a_segmentation_folder(mock_app_model, qtbot, tmp_path, seg_folder, capsys):
    from PIL import Image

    png = tmp_path / "view.png"
    assert main(["view", str(seg_folder), "--class", "1", "--screenshot", str(png), "--size", "640", "320"]) == 0, \
        capsys.readouterr().err
    image = np.asarray(Image.open(png).convert("RGB"), dtype=float)
    assert image.shape == (320, 640, 3) and image.std() > 10


# --- a folder written by `medcam3d explain` ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explained(tmp_path_factory) -> Path:
    """tests/test_seg_cli.py's hand-computable segmentation net explaining its blob scan (LPS-oriented: the viewer
    must flip it into place)."""
    from test_seg_cli import LPS, write_config, write_scan

    d = tmp_path_factory.mktemp("explained")
    cfg = write_config(d / "cfg")
    scan = write_scan(d / "scan.nii.gz", LPS)
    assert main(["explain", str(scan), "--config", str(cfg), "--out", str(d / "out"), "--quiet"]) == 0
    return d / "out"


def test_an_explained_folder_reads_as_its_files_say(explained):
    from medcam3d.viewer.folder import OutputFolder

    f = OutputFolder(explained)
    rows = read_csv(explained / "targets.csv")
    assert f.is_segmentation and [e.label for e in f.listing()] == [r["name"] for r in rows]
    assert [(t.cls, t.voxels) for t in f.targets] == [(int(r["class"]), int(r["voxels"])) for r in rows]
    assert f.segmentation_labels == {1: "nodule", 2: "mass"}
    stored = nib.load(str(explained / "segmentation.nii.gz"))
    seg = f.segmentation()
    for value in (1, 2):
        assert np.array_equal(world_voxels(seg.data, seg.affine, value),
                              world_voxels(np.asarray(stored.dataobj), RAS_TO_SPL @ stored.affine, value))


@pytest.mark.gui
def test_viewer_on_an_explained_folder(make_napari_viewer, explained):
    from medcam3d.viewer.window import open_viewer

    app = open_viewer(explained, class_="mass component 1", viewer=make_napari_viewer(show=True))
    v, c = app.viewer, app.comparison
    assert [type(layer).__name__ for layer in v.layers] == ["Image", "Labels", "Image", "Shapes"] * 2
    stored = nib.load(str(explained / "segmentation.nii.gz"))
    for seg in c.segmentation_layers:
        assert np.array_equal(world_voxels(np.asarray(seg.data), seg.affine.affine_matrix, 2),
                              world_voxels(np.asarray(stored.dataobj), RAS_TO_SPL @ stored.affine, 2))
    # the slices stand on the mass's centroid (within half a voxel: the slider stops on voxel centres)
    r = read_csv(explained / "targets.csv")[2]
    half = np.abs(np.diag(c.segmentation_layers[0].affine.affine_matrix)[:3]) / 2
    assert np.all(np.abs(np.asarray(v.dims.point) - centroid_world(r)) <= half + 1e-6)
    # the mass's HiResCAM display map is 1 on the mass, 0 elsewhere: shown where the file says
    img = nib.load(str(explained / "fullres_hirescam_002_mass_component_1.nii.gz"))
    layer = c.map_layers[0]
    assert np.array_equal(world_voxels(np.asarray(layer.data) > 0.5, layer.affine.affine_matrix, 1),
                          world_voxels(img.get_fdata() > 0.5, RAS_TO_SPL @ img.affine, 1))
    assert np.array_equal(world_voxels(np.asarray(layer.data) > 0.5, layer.affine.affine_matrix, 1),
                          world_voxels(np.asarray(stored.dataobj), RAS_TO_SPL @ stored.affine, 2))
