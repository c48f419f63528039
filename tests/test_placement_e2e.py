"""Map placement end to end (issue 14): ``map_geometry="auto"`` is the default of the command line and the Python
API, configs may set ``map_geometry:``, a model whose placement cannot be derived falls back to the field with a
one-line note, and on the demo phantoms the HiResCAM peaks land in the body, at the cells' receptive-field centres.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from medcam3d.cli import main
from medcam3d.config import load_config
from medcam3d.data import make_phantom, write_nifti
from medcam3d.errors import InputError
from medcam3d.pipeline import Session

SHAPE = (24, 64, 64)  # a small phantom at the demo spacing (5 x 2.5 x 2.5 mm): 120 x 160 x 160 mm
SPACING = (5.0, 2.5, 2.5)


class PooledNet(nn.Module):
    """Test-only model: conv -> adaptive average pool to 4 x 4 x 4 -> conv (explained) -> FC. Where the explained
    cells sit depends on the input size (the adaptive pool's windows do), so no placement can be derived from the
    layers and ``auto`` falls back to the field."""

    medcam3d_target_layer = "conv2"

    def __init__(self, n_outputs: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool3d((4, 4, 4))
        self.conv2 = nn.Conv3d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4 * 4, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(self.pool(torch.relu(self.conv1(x))))).flatten(1))


def pooled_config(folder: Path, **extra) -> Path:
    """A config for :class:`PooledNet` (random weights, seeded): network grid 8 x 16 x 16 at 10 mm."""
    torch.manual_seed(0)
    torch.save(PooledNet().state_dict(), folder / "pooled.pt")
    data = {
        "name": "pooled", "model": {"_target_": "test_placement_e2e.PooledNet", "n_outputs": 2},
        "weights": "pooled.pt", "layout": "channels_first", "labels": ["a", "b"], "input_size": [8, 16, 16],
        "preprocessing": [
            {"_target_": "Orientation", "axcodes": "SPL"},
            {"_target_": "Spacing", "pixdim": [10.0, 10.0, 10.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRange", "a_min": -1000.0, "a_max": 800.0, "b_min": 0.0, "b_max": 1.0,
             "clip": True},
            {"_target_": "ResizeWithPadOrCrop", "spatial_size": [8, 16, 16]},
        ],
        **extra,
    }
    path = folder / f"pooled{len(extra)}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scan")
    ph = make_phantom(11, shape=SHAPE, spacing=SPACING, present={"nodule_right_lung": True}, prevalence=0.0)
    return write_nifti(ph, d / "phantom.nii.gz", masks=False)["image"]


# ---------------------------------------------------------------------------------------------------------------
# the fallback
# ---------------------------------------------------------------------------------------------------------------
def test_explain_falls_back_to_the_field_with_a_one_line_note(tmp_path, small_scan, capsys):
    out = tmp_path / "out"
    config = pooled_config(tmp_path)
    capsys.readouterr()
    assert main(["explain", str(small_scan), "--config", str(config), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medcam3d: note: map placement: field (fallback: "), err
    assert "'pool'" in err[0]  # the reason names the adaptive pool
    summary = json.loads((out / "summary.json").read_text())
    geo = summary["map_geometry"]
    assert geo["kind"] == "field" and geo["source"].startswith("fallback: ") and "'pool'" in geo["source"]
    # the field convention, by hand: 4 x 4 x 4 cells on 8 x 16 x 16 voxels are 2 x 4 x 4 voxels apart, cell 0
    # centred at (stride - 1) / 2
    assert geo["stride_voxels"] == [2.0, 4.0, 4.0] and geo["offset_voxels"] == [0.5, 1.5, 1.5]
    low = nib.load(str(out / "lowres_hirescam.nii.gz"))
    assert low.shape[:3] == (4, 4, 4)
    assert np.allclose(np.sqrt((low.affine[:3, :3] ** 2).sum(0)), [20.0, 40.0, 40.0])  # stride x 10 mm
    grid = np.asarray(summary["network_grid"]["affine"])
    assert np.allclose(low.affine @ [1, 2, 3, 1], grid @ [0.5 + 2 * 1, 1.5 + 4 * 2, 1.5 + 4 * 3, 1])


def test_config_map_geometry_is_used_and_the_option_overrides_it(tmp_path, small_scan, capsys):
    config = pooled_config(tmp_path, map_geometry="receptive")
    assert load_config(config).map_geometry == "receptive"
    out = tmp_path / "refused"
    capsys.readouterr()
    assert main(["explain", str(small_scan), "--config", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "receptive" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    out = tmp_path / "auto"
    assert main(["explain", str(small_scan), "--config", str(config), "--out", str(out), "--quiet",
                 "--map-geometry", "auto"]) == 0
    assert json.loads((out / "summary.json").read_text())["map_geometry"]["kind"] == "field"
    assert "fallback" in capsys.readouterr().err


def test_config_map_geometry_is_validated_and_round_trips(tmp_path):
    with pytest.raises(InputError, match="map_geometry must be one of auto, field, receptive") as e:
        load_config(pooled_config(tmp_path, map_geometry="centre"))
    assert "pooled1.yaml" in str(e.value)
    cfg = load_config(pooled_config(tmp_path, map_geometry="field"))
    assert cfg.to_dict()["map_geometry"] == "field"
    assert "map_geometry" not in load_config(pooled_config(tmp_path)).to_dict()  # absent stays absent


def test_session_default_is_auto_unless_the_config_says_otherwise(tmp_path):
    assert Session(device="cpu").map_geometry == "auto"  # the embedded demo config sets none
    cfg = load_config("demo_axialnet")
    cfg.map_geometry = "field"
    assert Session(cfg, device="cpu").map_geometry == "field"
    assert Session(cfg, device="cpu", map_geometry="auto").map_geometry == "auto"
    with pytest.raises(InputError, match="map geometry must be one of"):
        Session(cfg, device="cpu", map_geometry="centre")


# ---------------------------------------------------------------------------------------------------------------
# the demo model on its phantoms
# ---------------------------------------------------------------------------------------------------------------
#: the phantom of ``medcam3d demo`` (seed 7 with these lesions planted) and two phantoms drawn as usual. With
#: ``--map-geometry field`` the full-resolution HiResCAM peak lies inside the body for only 2 of the 9
#: predicted-positive classes of these three (on the demo phantom 1 of 4: the peaks of pleural_effusion_left,
#: cardiomegaly and pericardial_effusion are in the air); with ``auto`` for all 9 (asserted below). Over 12 phantoms
#: (this demo phantom and seeds 0-6, 8-11 drawn as usual): field 16 of 71, auto 71 of 71 (README, "Where the cells
#: are").
DEMO_PHANTOMS = {
    7: {"nodule_right_lung": True, "pleural_effusion_left": True, "cardiomegaly": True},
    0: None,
    2: None,
}


def demo_centre(cell: tuple[int, int, int]) -> np.ndarray:
    """Hand-computed centre of the demo AxialNet's cell ``(t, i, j)`` on its 60 x 128 x 128 network grid.

    Slices: AxialNet reads three consecutive slices as one RGB image, so cell t covers slices 3t, 3t + 1, 3t + 2
    and is centred on slice 3t + 1 (stride 3). In-plane (128 px, feature stride 8): the ResNet-18's convolutions
    and pools are zero-padded with padding (k - 1) / 2, each centring output j at stride * j on its input, so the
    backbone's 16 x 16 cells sit at 8 j; then four unpadded 3 x 3 convolutions each move cell j to the centre of
    cells j .. j + 2, i.e. 8 (j + 1): after four, cell i of the 8 x 8 map sits at 8 (i + 4) = 8 i + 32.
    """
    t, i, j = cell
    return np.array([3.0 * t + 1.0, 8.0 * i + 32.0, 8.0 * j + 32.0])


HALF_STRIDE = np.array([1.5, 4.0, 4.0])


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> list[tuple[Path, Path]]:
    """``medcam3d explain`` (defaults: the demo model, ``auto``) of each demo phantom: (output folder, organ mask)."""
    runs = []
    for seed, present in DEMO_PHANTOMS.items():
        d = tmp_path_factory.mktemp(f"demo{seed}")
        ph = make_phantom(seed, present=present, prevalence=0.0) if present else make_phantom(seed)
        files = write_nifti(ph, d / "phantom.nii.gz")
        out = d / "out"
        assert main(["explain", str(files["image"]), "--out", str(out), "--quiet", "--full-res", "positive",
                     "--methods", "hirescam", "--device", "cpu"]) == 0
        runs.append((out, files["organs"]))
    return runs


def test_demo_default_placement_is_declared_receptive(demo_runs):
    for out, _ in demo_runs:
        geo = json.loads((out / "summary.json").read_text())["map_geometry"]
        assert geo == {"kind": "receptive", "offset_voxels": [1.0, 32.0, 32.0], "stride_voxels": [3.0, 8.0, 8.0],
                       "source": "declared"}


def test_demo_hirescam_peaks_lie_in_the_body_at_the_peak_cells_centre(demo_runs):
    n_positive = 0
    for out, organs_path in demo_runs:
        summary = json.loads((out / "summary.json").read_text())
        organs = nib.load(str(organs_path))
        body = np.asarray(organs.dataobj) > 0  # 0 = outside the body
        low = np.asarray(nib.load(str(out / "lowres_hirescam.nii.gz")).dataobj)  # [20, 8, 8, K] signed raw maps
        to_grid = np.linalg.inv(np.asarray(summary["network_grid"]["affine"])) @ organs.affine  # scan -> network
        for k, c in enumerate(summary["classes"]):
            if not c["predicted"]:
                continue
            n_positive += 1
            heat = np.asarray(nib.load(str(out / f"fullres_hirescam_{c['index']:03d}_{c['label']}.nii.gz")).dataobj)
            assert heat.shape == body.shape
            peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
            assert body[peak], (out, c["label"], peak)
            cell = np.unravel_index(int(np.argmax(low[..., k])), low.shape[:3])
            on_grid = (to_grid @ np.array([*peak, 1.0]))[:3]
            assert np.all(np.abs(on_grid - demo_centre(cell)) <= HALF_STRIDE + 1e-6), (c["label"], on_grid, cell)
    # not vacuous: the demo model calls several classes on these phantoms (the guided default of issue 17 calls 4;
    # the previous default called 9)
    assert n_positive >= 3


# ---------------------------------------------------------------------------------------------------------------
# the evaluation suite
# ---------------------------------------------------------------------------------------------------------------
def test_evaluate_places_cells_by_auto_and_records_it():
    """The suite's default is ``auto``: on the demo AxialNet its declared receptive-field centres (other numbers
    than the field's), recorded with each case."""
    from medcam3d.evaluate.phantoms import PhantomSource
    from medcam3d.evaluate.reproduce import demo_model
    from medcam3d.evaluate.suite import SuiteOptions, evaluate

    assert SuiteOptions().map_geometry == "auto"
    mut, grid = demo_model()
    source = PhantomSource(grid, 1, 5, prevalence=0.0, present={"cardiomegaly": True})
    res = {g: evaluate(mut, source, SuiteOptions(parts=("ground_truth", "localisation"), removal=False,
                                                 map_geometry=g)).to_dict() for g in ("auto", "field")}
    assert res["auto"]["cases"][0]["placement"] == {
        "kind": "receptive", "offset_voxels": [1.0, 32.0, 32.0], "stride_voxels": [3.0, 8.0, 8.0],
        "source": "declared"}
    assert res["auto"]["summary"]["placement"] == ["receptive (declared)"]
    assert res["field"]["summary"]["placement"] == ["field (requested)"]
    assert res["auto"]["summary"]["ground_truth"] != res["field"]["summary"]["ground_truth"]


def test_evaluate_command_takes_the_config_map_geometry_unless_overridden(tmp_path):
    from medcam3d.cli import build_parser
    from medcam3d.evaluate.command import build_suite

    text = Path(load_config("demo_axialnet").path).read_text()
    config = tmp_path / "field.yaml"
    config.write_text(text.replace("weights: package:", "map_geometry: field\nweights: package:"))
    parser = build_parser()
    _, _, options = build_suite(parser.parse_args(["evaluate", "--config", str(config), "--out", str(tmp_path)]))
    assert options.map_geometry == "field"
    args = parser.parse_args(["evaluate", "--config", str(config), "--out", str(tmp_path), "--map-geometry", "auto"])
    assert build_suite(args)[2].map_geometry == "auto"
    assert build_suite(parser.parse_args(["evaluate", "--out", str(tmp_path)]))[2].map_geometry == "auto"
