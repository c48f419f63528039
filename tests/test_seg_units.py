"""Issue 19, part 3, the pieces: the config's ``task``/``targets``, the label map on the scan's grid (nearest
neighbour, checked against a voxel-by-voxel loop), the predicted label map, montages through a given voxel."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medcam3d.config import Config, TargetSettings
from medcam3d.errors import InputError
from medcam3d.outputs import montage_views
from medcam3d.segmentation import _predict, expand_class_tokens, labels_on_scan
from medcam3d.targets import TargetInfo

BASE = {"name": "s", "model": {"_target_": "torch.nn.Identity"}, "labels": ["background", "nodule", "mass"],
        "preprocessing": [{"_target_": "Orientation", "axcodes": "SPL"}]}


def cfg(**kw) -> Config:
    return Config.from_dict({**BASE, **kw})


# -- config ------------------------------------------------------------------------------------------------------


def test_task_and_target_defaults():
    c = cfg(task="segmentation")
    assert c.task == "segmentation" and c.probability == "softmax" and c.targets is None
    assert c.target_settings() == TargetSettings(region="components", reduce="sum", max_targets=20, classes=None,
                                                 background=0)
    assert c.target_settings().explained(3) == [1, 2]
    sig = cfg(task="segmentation", probability="sigmoid")
    assert sig.target_settings().background is None and sig.target_settings().explained(3) == [0, 1, 2]
    assert cfg().task is None and cfg().probability == "sigmoid"  # classification configs unchanged
    assert "task" not in cfg().to_dict() and "targets" not in cfg().to_dict()


def test_targets_settings_parsed_and_round_trip():
    c = cfg(task="segmentation", targets={"region": "predicted", "reduce": "mean", "max_targets": 3,
                                          "classes": ["mass", 1], "background": "background"})
    assert c.targets == TargetSettings(region="predicted", reduce="mean", max_targets=3, classes=(2, 1), background=0)
    assert c.targets.explained(3) == [2, 1]
    again = Config.from_dict(c.to_dict())
    assert again.task == "segmentation" and again.targets == c.targets


@pytest.mark.parametrize("kw, message", [
    ({"task": "detection"}, "task must be one of classification, segmentation"),
    ({"task": "classification", "targets": {}}, "targets: only for task: segmentation"),
    ({"task": "segmentation", "targets": {"regions": "components"}}, "targets: unknown key 'regions'"),
    ({"task": "segmentation", "targets": {"region": "blobs"}}, "targets.region must be one of components, predicted"),
    ({"task": "segmentation", "targets": {"reduce": "max"}}, "targets.reduce must be one of sum, mean"),
    ({"task": "segmentation", "targets": {"max_targets": 0}}, "targets.max_targets must be a positive integer"),
    ({"task": "segmentation", "targets": {"classes": [3]}}, "class 3 is outside the model's 3 output channels"),
    ({"task": "segmentation", "targets": {"classes": ["lesion"]}}, "targets.classes: unknown class 'lesion'"),
    ({"task": "segmentation", "targets": {"classes": []}}, "targets.classes must be a non-empty list"),
    ({"task": "segmentation", "targets": {"background": -1}}, "targets.background: class -1 is outside"),
    ({"task": "segmentation", "targets": "components"}, "targets must be a mapping"),
])
def test_bad_targets_are_one_line_input_errors(kw, message):
    with pytest.raises(InputError, match=message) as e:
        cfg(**kw)
    assert "\n" not in str(e.value)


# -- the predicted label map -------------------------------------------------------------------------------------


def test_predicted_label_map_softmax_and_sigmoid():
    logits = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]]).view(1, 3, 3, 1, 1)  # [B, C, 3 voxels]
    soft = _predict(torch.softmax(logits, 1), "softmax", 0.5, 0, ["bg", "a", "b"])
    assert soft.label_map.ravel().tolist() == [2, 0, 1] and soft.names == {1: "a", 2: "b"} and soft.offset == 0
    # sigmoid, no background channel: the most probable channel at or above the threshold, value = channel + 1
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.7, 0.1, 0.4]]).view(1, 2, 3, 1, 1)
    sig = _predict(probs, "sigmoid", 0.5, None, ["a", "b"])
    assert sig.label_map.ravel().tolist() == [1, 0, 1] and sig.names == {1: "a", 2: "b"} and sig.offset == 1


def test_class_label_tokens_select_their_targets():
    infos = [TargetInfo("nodule component 1", 1, "component", 1), TargetInfo("mass component 1", 2, "component", 1),
             TargetInfo("nodule component 2", 1, "component", 2)]
    labels = ["background", "nodule", "mass"]
    assert expand_class_tokens(["nodule"], infos, labels) == [0, 2]
    assert expand_class_tokens(["mass component 1", "top-1", 2], infos, labels) == ["mass component 1", "top-1", 2]
    assert expand_class_tokens(None, infos, labels) is None


# -- the label map on the scan's grid -----------------------------------------------------------------------------


def _grid(affine: np.ndarray, scan_affine: np.ndarray, scan_shape: tuple[int, ...], op: str = "Orientation"):
    """What labels_on_scan reads of a preprocessed MetaTensor: its affine and its record of the preprocessing."""
    return SimpleNamespace(affine=affine, applied_operations=[{"class": op}],
                           meta={"original_affine": scan_affine, "spatial_shape": scan_shape})


def _by_loop(label_map: np.ndarray, grid_affine: np.ndarray, scan_affine: np.ndarray, shape) -> np.ndarray:
    """Voxel by voxel: the grid voxel nearest each scan voxel's centre (0 outside the grid)."""
    to_grid = np.linalg.inv(grid_affine) @ scan_affine
    out = np.zeros(shape, np.uint8)
    for idx in np.ndindex(*shape):
        g = np.floor((to_grid @ np.array([*idx, 1.0]))[:3] + 0.5).astype(int)
        if all(0 <= g[d] < label_map.shape[d] for d in range(3)):
            out[idx] = label_map[tuple(g)]
    return out


@pytest.mark.parametrize("case", ["permuted", "coarser", "oblique"])
def test_labels_on_scan_nearest_neighbour(case):
    rng = np.random.default_rng(0)
    label_map = rng.integers(0, 4, (6, 7, 8)).astype(np.uint8)
    scan_affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    scan_affine[:3, 3] = [12.0, 9.0, -3.0]
    shape = (9, 10, 7)
    # grid axes (S, P, L): S along scan k, P along -scan j (y), L along -scan i (x)
    grid_affine = np.array([[0, 0, -1.5, 12.0], [0, -1.5, 0, 9.0], [2.0, 0, 0, -3.0], [0, 0, 0, 1]])
    if case == "coarser":  # the grid voxels twice the scan's, shifted by a quarter voxel
        grid_affine = grid_affine @ np.diag([2.0, 2.0, 2.0, 1.0])
        grid_affine[:3, 3] += [0.7, -0.4, 1.1]
    if case == "oblique":  # rotated 20 degrees about the scan's z axis
        c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
        rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        grid_affine = rot @ grid_affine
    got = labels_on_scan(label_map, _grid(grid_affine, scan_affine, shape), scan_affine, shape)
    want = _by_loop(label_map, grid_affine, scan_affine, shape)
    assert got.dtype == np.uint8 and got.shape == shape
    np.testing.assert_array_equal(got, want)
    assert want.any()


def test_labels_on_scan_through_the_inverse_when_not_affine():
    """A preprocessing that is not purely geometric: each value's one-hot mask goes through the inverse and the
    largest wins (here the inverse is the identity, so the label map comes back as it was)."""
    label_map = np.array([0, 1, 2, 2, 0, 1], np.uint8).reshape(1, 2, 3)
    grid = _grid(np.eye(4), np.eye(4), (1, 2, 3), op="GaussianSmooth")
    with pytest.raises(ValueError, match="needs invert"):
        labels_on_scan(label_map, grid, np.eye(4), (1, 2, 3))
    got = labels_on_scan(label_map, grid, np.eye(4), (1, 2, 3), invert=lambda m: m)
    np.testing.assert_array_equal(got, label_map)


# -- montages through a given voxel ---------------------------------------------------------------------------------


def test_montage_views_cut_through_the_given_voxel():
    """RAS scan (identity affine), shape (I, J, K) = (5, 6, 7), voxel (1, 2, 3). SPL: slice = k = 3, row (A to P)
    = J - 1 - j = 3, column (R to L) = I - 1 - i = 3. Axial peak (row, col) = (3, 3); coronal and sagittal put
    superior up: row = K - 1 - k = 3; coronal column 3, sagittal column = row index 3."""
    ct = np.zeros((5, 6, 7), np.float32)
    hm = np.zeros((5, 6, 7), np.float32)
    hm[4, 5, 6] = 1.0  # the peak is elsewhere: `at` wins
    ct[1, 2, 3] = 100.0
    region = np.zeros((5, 6, 7), bool)
    region[1, 2, 3] = region[0, 2, 3] = True  # the voxel and its neighbour towards patient left (x - 1)
    views = montage_views(ct, {"hirescam": hm}, np.eye(4), at=(1, 2, 3), region=region)
    assert [v.name for v in views] == ["axial", "coronal", "sagittal"]
    assert [v.peak for v in views] == [(3, 3), (3, 3), (3, 3)]
    for v in views:
        assert v.ct[v.peak] == 100.0  # the marked pixel is the given voxel
        assert v.region is not None and v.region[v.peak]
    # i = 0 is one column further to the image's right (patient left) in the axial and coronal views; the
    # sagittal slice at i = 1 holds only the voxel itself
    assert [int(v.region.sum()) for v in views] == [2, 2, 1]
    assert views[0].region[3, 4] and views[1].region[3, 4]
    peak_views = montage_views(ct, {"hirescam": hm}, np.eye(4))
    assert peak_views[0].peak == (0, 0)  # the peak (4, 5, 6): row J-1-5 = 0, column I-1-4 = 0


# -- the README's section ------------------------------------------------------------------------------------------


def _readme_section() -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = text.index("## Explain a segmentation network")
    return text[start:text.index("\n## ", start + 3)]


def test_readme_segmentation_config_loads(tmp_path):
    from medcam3d.config import load_config

    section = _readme_section()
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "seg.yaml").write_text(block)
    c = load_config(tmp_path / "seg.yaml")
    assert c.task == "segmentation" and c.probability == "softmax" and c.labels == ["background", "nodule", "mass"]
    assert c.targets == TargetSettings(region="components", reduce="sum", max_targets=20, min_voxels=5,
                                       classes=(1, 2), background=0)


def test_readme_segmentation_commands_parse():
    from medcam3d.cli import build_parser

    section = _readme_section()
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].split() for line in block.strip().splitlines()]
    assert len(lines) == 4
    for words in lines:
        assert words[0] == "medcam3d"
        args = build_parser().parse_args(words[1:])
        assert args.command in ("explain", "demo")
    assert build_parser().parse_args(lines[3][1:]).task == "segmentation"
