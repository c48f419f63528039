"""Montage PNGs: the covered region's outline where the covered box ends, the peak marker at the peak, radiological
orientation, one row when the certificate proves the methods coincide, uint8 maps read as v / 255.

The panels' pixel boxes come from the PNG's ``medcam3d`` text chunk; where things are drawn inside them is computed
here from the volumes the test builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcam3d.outputs import COVERED_COLOUR, PEAK_COLOUR, montage_views, render_montage

# scan axes (i, j, k) run to the patient's left, posterior and superior ("LPS"): the SPL view is the transpose, so
# the axial slice at k shows rows = j (anterior at the top) and columns = i (patient right on the left)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
SHAPE = (60, 50, 40)
BOX = ((12, 47), (8, 41))  # covered: i in [12, 47], j in [8, 41], every k
PEAK = (30, 20, 25)


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ct = np.full(SHAPE, -600.0, dtype=np.float32)
    i, j, k = np.indices(SHAPE)
    hm = np.exp(-((i - PEAK[0]) ** 2 + (j - PEAK[1]) ** 2 + (k - PEAK[2]) ** 2) / (2 * 6.0**2))
    covered = (i >= BOX[0][0]) & (i <= BOX[0][1]) & (j >= BOX[1][0]) & (j <= BOX[1][1])
    return ct, (hm * covered).astype(np.float32), covered


def panels(png: Path) -> dict[tuple[str, str], dict]:
    meta = json.loads(Image.open(png).info["medcam3d"])
    return {(p["method"], p["view"]): p for p in meta["panels"]}


def pixel(panel: dict, row: float, col: float) -> tuple[float, float]:
    """PNG (x, y) of slice position (row, col): pixel centres at (index + 0.5) / size of the panel's box."""
    x0, y0, x1, y1 = panel["bbox_px"]
    rows, cols = panel["shape"]
    return x0 + (col + 0.5) / cols * (x1 - x0), y0 + (row + 0.5) / rows * (y1 - y0)


def colour_mask(rgb: np.ndarray, colour: tuple[float, float, float], tol: float = 60) -> np.ndarray:
    return (np.abs(rgb - np.asarray(colour) * 255.0) < tol).all(axis=-1)


@pytest.fixture(scope="module")
def montage(tmp_path_factory) -> Path:
    ct, hm, covered = scene()
    path = tmp_path_factory.mktemp("m") / "montage.png"
    render_montage(ct, {"hirescam": hm, "gradcam": (hm * 255).round().astype(np.uint8)}, AFFINE, path, "test",
                   covered=covered, scales={"hirescam": (0.0, 2.5), "gradcam": (0.0, 0.1)})
    return path


def test_size_and_rows(montage):
    im = np.asarray(Image.open(montage).convert("RGB"))
    assert im.shape == (800, 1200, 3)
    assert set(panels(montage)) == {(m, v) for m in ("hirescam", "gradcam") for v in ("axial", "coronal", "sagittal")}


def test_covered_outline_is_drawn_where_the_covered_box_ends(montage):
    rgb = np.asarray(Image.open(montage).convert("RGB"), dtype=np.float64)
    cyan = colour_mask(rgb, COVERED_COLOUR)
    p = panels(montage)[("hirescam", "axial")]
    # axial: rows are j, columns are i; the box's edges lie half a pixel outside its first and last voxels
    left, _ = pixel(p, 0, BOX[0][0] - 0.5)
    right, _ = pixel(p, 0, BOX[0][1] + 0.5)
    _, top = pixel(p, BOX[1][0] - 0.5, 0)
    _, bottom = pixel(p, BOX[1][1] + 0.5, 0)
    ys = np.arange(int(top) + 4, int(bottom) - 4)
    xs = np.arange(int(left) + 4, int(right) - 4)
    for x_edge in (left, right):  # every row of the box has outline pixels within 2 px of the vertical edges
        band = cyan[ys][:, int(round(x_edge)) - 2:int(round(x_edge)) + 3]
        assert band.any(axis=1).mean() > 0.95
    for y_edge in (top, bottom):
        band = cyan[int(round(y_edge)) - 2:int(round(y_edge)) + 3][:, xs]
        assert band.any(axis=0).mean() > 0.95
    inner = cyan[int(top) + 5:int(bottom) - 5, int(left) + 5:int(right) - 5]
    assert not inner.any()  # no outline inside the covered region
    # coronal: rows are k (flipped), columns i; the box spans every k, so only the vertical edges are outlined
    q = panels(montage)[("hirescam", "coronal")]
    lx, y_mid = pixel(q, SHAPE[2] / 2, BOX[0][0] - 0.5)
    assert cyan[int(y_mid) - 10:int(y_mid) + 10, int(round(lx)) - 2:int(round(lx)) + 3].any(axis=1).all()


def test_peak_marker_sits_at_the_peak(montage):
    rgb = np.asarray(Image.open(montage).convert("RGB"), dtype=np.float64)
    green = colour_mask(rgb, PEAK_COLOUR)
    i, j, k = PEAK
    expected = {"axial": (j, i), "coronal": (SHAPE[2] - 1 - k, i), "sagittal": (SHAPE[2] - 1 - k, j)}
    for method in ("hirescam", "gradcam"):
        for view, (row, col) in expected.items():
            p = panels(montage)[(method, view)]
            x, y = pixel(p, row, col)
            x0, y0, x1, y1 = (int(v) for v in p["bbox_px"])
            ys, xs = np.nonzero(green[y0:y1, x0:x1])
            assert len(xs) > 10, (method, view)
            assert abs(xs.mean() + x0 - x) < 1.5 and abs(ys.mean() + y0 - y) < 1.5, (method, view)


def test_radiological_orientation():
    """A bright rod at the patient's right and anterior shows on the left and at the top of the axial panel."""
    ct = np.full(SHAPE, -1000.0, dtype=np.float32)
    ct[2:8, 2:8, :] = 400.0  # i small = patient right (axis 0 runs to the left); j small = anterior
    hm = np.zeros(SHAPE, dtype=np.float32)
    hm[30, 25, 20] = 1.0
    views = {v.name: v for v in montage_views(ct, {"m": hm}, AFFINE)}
    axial = views["axial"]
    assert axial.letters == ("A", "P", "R", "L")
    rows, cols = np.nonzero(axial.ct > 0)
    assert rows.max() < axial.ct.shape[0] / 4 and cols.max() < axial.ct.shape[1] / 4
    assert views["coronal"].letters == ("S", "I", "R", "L") and views["sagittal"].letters == ("S", "I", "A", "P")


def test_cam_certificate_gives_one_row_and_a_note(tmp_path):
    ct, hm, covered = scene()
    path = tmp_path / "cam.png"
    render_montage(ct, {"hirescam": hm, "gradcam": hm}, AFFINE, path, "cam", methods=["hirescam"],
                   note="certificate 'cam': the methods coincide by proof")
    im = np.asarray(Image.open(path).convert("RGB"))
    assert im.shape == (400, 1200, 3)
    assert {m for m, _ in panels(path)} == {"hirescam"}


def test_uint8_maps_read_as_value_over_255():
    ct, hm, _ = scene()
    q = (hm * 255).round().astype(np.uint8)
    a = {v.name: v for v in montage_views(ct, {"m": hm}, AFFINE)}
    b = {v.name: v for v in montage_views(ct, {"m": q}, AFFINE)}
    for name in a:
        assert np.abs(a[name].maps["m"] - b[name].maps["m"]).max() <= 0.5 / 255 + 1e-6
        assert a[name].peak == b[name].peak
