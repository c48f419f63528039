"""medcam3d.evaluate: hand-computed answers for every metric (edge cases included), perturbation curves of a linear
model computed by hand, randomisation on tiny nets, the step-by-step figure, and the demo model end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from core_nets import ConvFC, ConvGAP
from torch import nn

from medcam3d import Explainer
from medcam3d.cli import main
from medcam3d.evaluate import metrics as M
from medcam3d.evaluate.exactness import (
    cam_equality,
    completeness_residual,
    exactness_record,
    table1_distance,
)
from medcam3d.evaluate.figure import plot_step_by_step, step_by_step
from medcam3d.evaluate.perturbation import (
    cell_orders,
    cell_partition,
    demo_hu_to_input,
    make_fill,
    perturbation_curves,
    perturbation_passes,
)
from medcam3d.evaluate.randomization import (
    map_similarity,
    randomization_curves,
    randomization_groups,
    randomized_models,
)
from medcam3d.evaluate.report import update_section
from medcam3d.methods import gradcam, hirescam

nan = math.nan


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def same(a, b):
    """Equal, with NaN == NaN."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(torch.all((a == b) | (a.isnan() & b.isnan())))


# ------------------------------------------------------------------------------------------------------------------
# masks at feature resolution, relevance mass, allowed region
# ------------------------------------------------------------------------------------------------------------------


def test_block_fractions_and_chance():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = mask[0, 1] = mask[1, 0] = True  # 3 of the 4 voxels of the top-left 2x2 block
    mask[3, 3] = True  # 1 of 4 in the bottom-right block
    f = M.block_fractions(mask, (2, 2))
    assert f.tolist() == [[0.75, 0.0], [0.0, 0.25]]
    assert M.chance_share(f) == pytest.approx(4 / 16)  # the mask's volume share
    assert M.block_fractions(torch.ones(2, 3, 4, dtype=torch.bool), (1, 3, 2)).tolist() == [[[1.0, 1.0]] * 3]


def test_relevance_mass_hand_values_and_edge_cases():
    v = t(2.0, -1.0, 1.0, 0.0)
    assert float(M.relevance_mass(v, torch.tensor([True, False, False, False]))) == pytest.approx(2 / 3)
    assert float(M.relevance_mass(v, t(0.5, 1.0, 0.0, 0.0))) == pytest.approx(1 / 3)  # fractional mask
    assert float(M.relevance_mass(v, torch.ones(4, dtype=torch.bool))) == 1.0  # mask covering everything
    assert float(M.relevance_mass(v, torch.zeros(4, dtype=torch.bool))) == 0.0  # mask covering nothing
    assert math.isnan(float(M.relevance_mass(t(-1.0, 0.0, -2.0, 0.0), torch.ones(4, dtype=torch.bool))))  # empty map
    # a constant positive map scores exactly chance
    frac = M.block_fractions(torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool), (2, 2))
    assert float(M.relevance_mass(torch.full((2, 2), 3.0), frac)) == pytest.approx(M.chance_share(frac))
    # leading axes [B, K] with one shared mask
    batch = torch.stack([v, -v, torch.ones(4)]).reshape(3, 1, 4)
    out = M.relevance_mass(batch, torch.tensor([True, True, False, False]))
    assert out.shape == (3, 1)
    assert same(out[:, 0], t(2 / 3, 1.0, 0.5))


def test_allowed_region_score_edge_cases():
    allowed = torch.tensor([True, True, False])
    assert float(M.allowed_region_score(t(1.0, 2.0, -5.0), allowed)) == 1.0  # nothing outside -> 1
    assert float(M.allowed_region_score(t(1.0, 0.0, 3.0), allowed)) == 0.25  # a / (a + b) = 1 / 4
    assert float(M.allowed_region_score(t(0.0, -1.0, 2.0), allowed)) == 0.0  # nothing inside
    assert math.isnan(float(M.allowed_region_score(t(0.0, -1.0, -2.0), allowed)))  # empty map: undefined


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        M.relevance_mass(torch.ones(3, 4), torch.ones(5, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------------------------
# rank accuracy, pointing game
# ------------------------------------------------------------------------------------------------------------------


def test_relevance_rank_accuracy():
    mask = torch.tensor([True, False, True, False, False, False])
    # K = 2; the two highest are positions 0 and 1; one of them is inside
    assert float(M.relevance_rank_accuracy(t(5, 4, 3, 2, 1, 0), mask)) == 0.5
    assert float(M.relevance_rank_accuracy(t(5, 0, 4, 2, 1, 0), mask)) == 1.0
    # ties at the K-th value: [3, 3, 3, 1], mask {0, 3}, K = 2: none strictly above, 3 tied of which 1 inside,
    # 2 places shared -> expected hits 2 * 1/3 -> accuracy 1/3
    tie_mask = torch.tensor([True, False, False, True])
    assert float(M.relevance_rank_accuracy(t(3, 3, 3, 1), tie_mask)) == pytest.approx(1 / 3)
    # [4, 3, 3, 1], mask {1, 3}, K = 2: position 0 above (miss), one place for 2 tied of which 1 inside -> 0.5 / 2
    assert float(M.relevance_rank_accuracy(t(4, 3, 3, 1), torch.tensor([False, True, False, True]))) == 0.25
    assert float(M.relevance_rank_accuracy(t(1, 2, 3), torch.ones(3, dtype=torch.bool))) == 1.0  # mask = everything
    assert math.isnan(float(M.relevance_rank_accuracy(t(1, 2, 3), torch.zeros(3, dtype=torch.bool))))  # empty mask
    assert math.isnan(float(M.relevance_rank_accuracy(t(0, -2, 0), torch.tensor([True, False, False]))))  # empty map


def test_pointing_game_with_ties():
    mask = torch.tensor([True, False, False, False])
    assert float(M.pointing_game(t(3, 1, 2, 0), mask)) == 1.0
    assert float(M.pointing_game(t(1, 3, 2, 0), mask)) == 0.0
    tied = t(2, 2, 1, 2)  # three voxels share the maximum, one of them inside
    assert float(M.pointing_game(tied, mask)) == pytest.approx(1 / 3)
    assert float(M.pointing_game(tied, mask, ties="any")) == 1.0
    assert float(M.pointing_game(tied, mask, ties="all")) == 0.0
    assert float(M.pointing_game(t(2, 2, 1, 2), torch.tensor([True, True, False, True]), ties="all")) == 1.0
    assert math.isnan(float(M.pointing_game(t(0, 0, -1, 0), mask)))  # empty map
    assert float(M.pointing_game(t(1, 1, 1, 1), torch.ones(4, dtype=torch.bool))) == 1.0  # mask = everything
    assert float(M.pointing_game(t(1, 2, 1, 1), torch.zeros(4, dtype=torch.bool))) == 0.0  # mask = nothing
    with pytest.raises(ValueError):
        M.pointing_game(tied, mask, ties="first")
    grid = torch.zeros(2, 3, 4)
    grid[1, 2, 3] = 5.0
    m3 = torch.zeros(2, 3, 4, dtype=torch.bool)
    m3[1, 2, 3] = True
    assert float(M.pointing_game(grid, m3)) == 1.0  # 3-D


# ------------------------------------------------------------------------------------------------------------------
# IoU at thresholds, best threshold
# ------------------------------------------------------------------------------------------------------------------


def test_iou_thresholds_are_the_papers():
    assert len(M.IOU_THRESHOLDS) == 49
    assert M.IOU_THRESHOLDS[0] == 0.02 and M.IOU_THRESHOLDS[-1] == 0.98 and M.IOU_THRESHOLDS[24] == 0.5


def test_iou_curve_hand_values():
    heat = t(0.0, 0.03, 0.5, 1.0)
    mask = torch.tensor([False, True, True, False])
    # t=0.02: predicted {1,2,3}, intersection {1,2} -> 2/3; t=0.5 (>=): {2,3} -> 1/3; t=0.99: {3} -> 0/3
    assert torch.allclose(M.iou_curve(heat, mask, (0.02, 0.5, 0.99)), t(2 / 3, 1 / 3, 0.0))
    assert M.iou_curve(heat, mask).shape == (49,)
    # empty heatmap against a lesion: 0; empty heatmap and empty mask: undefined
    assert M.iou_curve(torch.zeros(4), mask, (0.5,)).tolist() == [0.0]
    assert math.isnan(float(M.iou_curve(torch.zeros(4), torch.zeros(4, dtype=torch.bool), (0.5,))[0]))
    # mask covering everything, heatmap everywhere >= t -> 1
    assert M.iou_curve(t(0.6, 0.7, 0.9, 1.0), torch.ones(4, dtype=torch.bool), (0.5,)).tolist() == [1.0]
    two = M.iou_curve(torch.stack([heat, 1 - heat]), mask, (0.02, 0.5))
    assert two.shape == (2, 2)
    # 1 - heat = [1, 0.97, 0.5, 0]: t=0.02 -> {0,1,2}: 2/3; t=0.5 -> {0,1,2}: 2/3
    assert torch.allclose(two[1], t(2 / 3, 2 / 3))


def test_best_threshold_iou():
    th = (0.1, 0.2, 0.3)
    val = [[0.1, 0.5, 0.5], [0.3, 0.1, 0.7]]  # means 0.2, 0.3, 0.6 -> threshold 0.3
    r = M.best_threshold_iou(val, [[0.2, 0.4, 0.9], [0.0, 0.0, 0.3]], th)
    assert r["threshold"] == 0.3 and r["index"] == 2
    assert r["validation"] == pytest.approx(0.6) and r["test"] == pytest.approx(0.6)
    assert r["n_validation"] == 2 and r["n_test"] == 2
    # ties go to the lowest threshold; NaNs are ignored
    r = M.best_threshold_iou([[0.5, 0.5, 0.1], [nan, nan, nan]], [[0.4, 0.9, 0.0]], th)
    assert r["threshold"] == 0.1 and r["test"] == pytest.approx(0.4) and r["n_validation"] == 1
    r = M.best_threshold_iou(np.zeros((0, 3)), [[0.4, 0.9, 0.0]], th)
    assert r["index"] == -1 and math.isnan(r["threshold"]) and math.isnan(r["test"])


# ------------------------------------------------------------------------------------------------------------------
# similarity: Spearman, SSIM; curves; AUROC
# ------------------------------------------------------------------------------------------------------------------


def test_spearman_hand_values():
    a = t(1, 2, 2, 3)
    b = t(1, 2, 3, 4)
    # average ranks of a: 1, 2.5, 2.5, 4 -> centred (-1.5, 0, 0, 1.5); b centred (-1.5, -.5, .5, 1.5)
    assert float(M.spearman(a, b, spatial_axes=1)) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert float(M.spearman(b, b, spatial_axes=1)) == 1.0
    assert float(M.spearman(b, -b, spatial_axes=1)) == -1.0
    assert float(M.spearman(t(-3, 1, 2), t(3, 1, 2), spatial_axes=1, absolute=True)) == 1.0
    assert math.isnan(float(M.spearman(t(1, 1, 1), b[:3], spatial_axes=1)))
    x = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    r = M.spearman(x, x)
    assert r.shape == (2, 3) and bool((r == 1).all())  # a map with itself, per (sample, class)


def test_ssim():
    x = torch.rand(2, 5, 6, 7, generator=torch.Generator().manual_seed(1))
    s = M.ssim(x, x)
    assert s.shape == (2,) and torch.allclose(s, torch.ones(2, dtype=torch.float64), atol=1e-12)
    # constant volumes 0 and 1: sigma = 0 everywhere -> (2*0*1 + C1) / (0 + 1 + C1) with C1 = 0.01^2
    c1 = 0.01**2
    assert float(M.ssim(torch.zeros(4, 4, 4), torch.ones(4, 4, 4))) == pytest.approx(c1 / (1 + c1))
    assert float(M.ssim(x[0], 1 - x[0])) < 0.5
    assert float(M.ssim(x[0], x[1])) == pytest.approx(float(M.ssim(x[1], x[0])))


def test_area_under_curve_and_auroc():
    assert float(M.area_under_curve(t(0, 0.5, 1), t(2, 1, 0))) == pytest.approx(1.0)
    assert M.area_under_curve(t(0, 1), torch.tensor([[0.0, 1.0], [2.0, 2.0]])).tolist() == [0.5, 2.0]
    assert M.auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert math.isnan(M.auroc(np.array([1, 1]), np.array([0.1, 0.2])))


# ------------------------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------------------------


def test_completeness_residual_hand_values():
    raw = torch.tensor([[[1.0, 2.0], [0.5, -0.5]]])  # [B=1, K=2, 2]
    res, rel = completeness_residual(raw, torch.tensor([[4.0, 1.0]]), torch.tensor([[1.0, 0.5]]))
    assert res.tolist() == [[0.0, 0.5]]  # 4 - 1 - 3 ; 1 - 0.5 - 0
    assert rel.tolist() == [[0.0, pytest.approx(0.5 / (1 + 0.5 + 1.0))]]


def test_exactness_on_affine_and_cam_heads():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 4, 4, 4)
    fc = ConvFC(nd=3, size=4).double()
    with Explainer(fc, "act", ("hirescam", "gradcam"), keep_gradients=True) as ex:
        e = ex(x.double())
    rec = exactness_record(e)
    assert rec["certificate"] == "affine-head"
    assert float(rec["relative_residual"]["hirescam"].abs().max()) < 1e-12
    assert float(rec["relative_residual"]["gradcam"].abs().max()) > 1e-3  # Grad-CAM does not decompose the score
    assert bool((rec["table1_l2"] > 0).any()) and "cam_equality" not in rec
    assert torch.all(table1_distance(e.raw["hirescam"], e.raw["hirescam"]) == 0)
    assert float(cam_equality(e.activations, e.gradients)["hirescam"].max()) > 1e-3

    gap = ConvGAP(nd=3).double()
    with Explainer(gap, "act", ("hirescam", "gradcam"), keep_gradients=True) as ex:
        e = ex(torch.randn(2, 1, 5, 5, 5, dtype=torch.float64))
    rec = exactness_record(e)
    assert rec["certificate"] == "cam"
    for m in ("hirescam", "gradcam"):
        assert float(rec["cam_equality"][m].max()) < 1e-12  # CAM = N * HiResCAM = N * Grad-CAM
    assert float(rec["table1_l2"].max()) < 1e-6


# ------------------------------------------------------------------------------------------------------------------
# perturbation
# ------------------------------------------------------------------------------------------------------------------


def test_cell_partition():
    assert cell_partition((2,), (5,)).tolist() == [0, 0, 0, 1, 1]  # floor(i * 2 / 5)
    c = cell_partition((2, 2), (4, 2))
    assert c.tolist() == [[0, 1], [0, 1], [2, 3], [2, 3]]
    c3 = cell_partition((20, 8, 8), (60, 128, 128))  # AxialNet on the demo grid: 3 x 16 x 16 blocks
    assert c3[0, 0, 0] == 0 and c3[2, 15, 15] == 0 and c3[3, 0, 0] == 64 and c3[0, 16, 0] == 8
    assert torch.bincount(c3.flatten()).unique().tolist() == [3 * 16 * 16]


def test_fills():
    x = torch.zeros(1, 4, 4)
    assert float(make_fill(x, "air")[0, 0, 0]) == pytest.approx(-0.449)  # (−1000 + 1000)/1800 − 0.449
    assert float(make_fill(x, "soft_tissue")[0, 0, 0]) == pytest.approx(1040 / 1800 - 0.449)
    assert demo_hu_to_input(3000.0) == pytest.approx(1 - 0.449)  # clipped at 800 HU
    assert float(make_fill(x, 0.25).unique()) == 0.25
    step = torch.zeros(1, 8, 8)
    step[:, :, 4:] = 1.0
    blurred = make_fill(step, "blur", cell_size=(4, 4))
    assert torch.allclose(blurred.mean(), step.mean(), atol=1e-6) and 0 < float(blurred[0, 0, 3]) < 1
    with pytest.raises(ValueError):
        make_fill(x, "bone")


def linear_scores(w: torch.Tensor, b: torch.Tensor):
    """s = W x + b on the flattened input: ``[n, 1, N] -> [n, K]``."""
    return lambda batch: batch.flatten(1).double() @ w.T + b


def test_deletion_and_insertion_on_a_linear_model_by_hand():
    w = t(4.0, -1.0, 2.0, 1.0)[None]  # one class
    b = t(0.5)
    x = torch.ones(1, 4, dtype=torch.float64)  # [C=1, 4]; cells = voxels
    rel = (w * x)  # HiResCAM of a linear model: [K=1, 4] = [4, -1, 2, 1]
    res = perturbation_curves(linear_scores(w, b), x, {"hirescam": rel}, [0], fill=0.0, steps=4)
    c = res.curves["hirescam"]
    # MoRF order 0, 2, 3, 1; the score after removing each (fill 0): 6.5 -> 2.5 -> 0.5 -> -0.5 -> 0.5
    assert c["deletion"]["morf"][0].tolist() == [6.5, 2.5, 0.5, -0.5, 0.5]
    assert c["deletion"]["lerf"][0].tolist() == [6.5, 7.5, 6.5, 4.5, 0.5]  # order 1, 3, 2, 0
    assert c["insertion"]["morf"][0].tolist() == [0.5, 4.5, 6.5, 7.5, 6.5]
    assert c["insertion"]["lerf"][0].tolist() == [0.5, -0.5, 0.5, 2.5, 6.5]
    # trapezoids with dx = 1/4: deletion MoRF (6.5/2 + 2.5 + 0.5 - 0.5 + 0.5/2) / 4 = 1.5; insertion MoRF 5.5
    assert float(res.auc["hirescam"]["deletion"]["morf"][0]) == pytest.approx(1.5)
    assert float(res.auc["hirescam"]["insertion"]["morf"][0]) == pytest.approx(5.5)
    # the random order: recompute the curve from the order itself
    order = cell_orders(rel, seed=0)["random"].tolist()
    expect, kept = [6.5], torch.ones(4, dtype=torch.float64)
    for j in range(4):
        kept[order[j]] = 0
        expect.append(float((w[0] * kept).sum() + 0.5))
    assert c["deletion"]["random"][0].tolist() == expect
    assert res.passes == perturbation_passes(4, 1, 1) == 2 + 2 * 3 * (1 + 2)


def test_perturbation_cells_cover_blocks_and_classes_are_scored_separately():
    # 2 classes, input of 4 voxels, map of 2 cells (voxels {0,1} and {2,3}); fill 0, x = 1
    w = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, -1.0, -1.0]], dtype=torch.float64)
    b = t(0.0, 0.0)
    x = torch.ones(1, 4, dtype=torch.float64)
    rel = {"m": torch.tensor([[2.0, 6.0], [10.0, -2.0]], dtype=torch.float64)}  # per-cell relevance of each class
    r = perturbation_curves(linear_scores(w, b), x, rel, [0, 1], fill=0.0, steps=2, orders=("morf",),
                            modes=("deletion",))
    # class 0 removes cell 1 first: 8 -> 2 -> 0; class 1 removes cell 0 first: 8 -> -2 -> 0
    assert r.curves["m"]["deletion"]["morf"].tolist() == [[8.0, 2.0, 0.0], [8.0, -2.0, 0.0]]
    assert r.passes == 2 + 1 * 2


def test_random_order_is_shared_by_methods_and_ties_are_not_positional():
    w = torch.ones(1, 16, dtype=torch.float64)
    x = torch.ones(1, 16, dtype=torch.float64)
    rel = {"a": torch.zeros(1, 16, dtype=torch.float64), "b": torch.arange(16.0, dtype=torch.float64)[None]}
    r = perturbation_curves(linear_scores(w, t(0.0)), x, rel, [0], fill=0.0, steps=4)
    assert r.curves["a"]["deletion"]["random"] is r.curves["b"]["deletion"]["random"]
    orders = cell_orders(torch.zeros(1, 16), seed=0)
    assert orders["morf"][0].tolist() != list(range(16))  # an all-tied map is not visited in raster order


# ------------------------------------------------------------------------------------------------------------------
# randomisation
# ------------------------------------------------------------------------------------------------------------------


def test_randomisation_on_a_tiny_net():
    torch.manual_seed(0)
    net = ConvFC(nd=3, size=4)
    x = torch.randn(2, 2, 4, 4, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    groups = randomization_groups(net, x)
    assert groups == [["fc"], ["conv"]]  # output first
    kw = {"target_layer": "act", "methods": ("hirescam", "gradcam")}
    with Explainer(net, **kw) as ex:
        original = ex(x).raw
    assert float(map_similarity(original["hirescam"], original["hirescam"])["spearman"].min()) == 1.0
    for mode in ("cascading", "independent"):
        rc = randomization_curves(net, x, kw, mode=mode, seed=1)
        assert rc["layers"] == ["fc", "conv"] and rc["passes"] == 3
        for m in ("hirescam", "gradcam"):
            for s in ("spearman", "spearman_abs", "ssim"):
                curve = rc["similarity"][m][s]
                assert curve.shape == (2, 5, 3)
                assert bool((curve[..., 0] == 1).all())  # the trained model
            assert float(rc["similarity"][m]["spearman"][..., 1:].mean()) < 0.9  # the maps changed
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])  # the original is untouched
    # cascading keeps earlier groups randomised; independent restores them
    (_, m1), (_, m2) = list(randomized_models(net, groups, "cascading", seed=3))
    assert m1 is m2 and not torch.equal(m2.fc.weight, net.fc.weight)
    (_, _), (_, i2) = list(randomized_models(net, groups, "independent", seed=3))
    assert torch.equal(i2.fc.weight, net.fc.weight) and not torch.equal(i2.conv.weight, net.conv.weight)


def test_randomisation_groups_by_depth():
    net = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), nn.Linear(3, 2))
    assert randomization_groups(net, torch.zeros(1, 3)) == [["1"], ["0.1"], ["0.0"]]
    assert randomization_groups(net, torch.zeros(1, 3), depth=1) == [["1"], ["0.1", "0.0"]]
    assert [name for name, _ in randomized_models(net, [["1"], ["0.1", "0.0"]], "independent")] == ["1", "0"]


# ------------------------------------------------------------------------------------------------------------------
# step-by-step figure, report sections
# ------------------------------------------------------------------------------------------------------------------


def test_step_by_step_parts_sum_to_the_maps(tmp_path):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 3, 4, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(6, 3, 4, 5, generator=gen, dtype=torch.float64)
    parts = step_by_step(a, g, top=2)
    for name, fn in (("hirescam", hirescam), ("gradcam", gradcam)):
        p = parts[name]
        want = fn(a[None], g[None, None])[0, 0]
        assert torch.allclose(p.final, want)
        assert torch.allclose(p.contributions.sum(0) + p.rest, want)
        assert len(p.features) == 2
        totals = (g * a if name == "hirescam" else g.mean((1, 2, 3))[:, None, None, None] * a).sum((1, 2, 3))
        assert p.features.tolist() == torch.argsort(totals.abs(), descending=True)[:2].tolist()
    assert torch.allclose(parts["gradcam"].scalar_weights, g.mean((1, 2, 3))[parts["gradcam"].features])
    out = plot_step_by_step(parts, tmp_path / "fig.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_update_section(tmp_path):
    p = tmp_path / "results.md"
    update_section(p, "a", "first", header="# Results\n")
    update_section(p, "b", "second")
    update_section(p, "a", "FIRST again")
    text = p.read_text()
    assert text.startswith("# Results")
    assert "FIRST again" in text and "first\n" not in text and text.index("FIRST") < text.index("second")


# ------------------------------------------------------------------------------------------------------------------
# phantoms on the network grid
# ------------------------------------------------------------------------------------------------------------------


def test_phantom_source_grid_masks_and_removal():
    from scipy.ndimage import binary_dilation

    from medcam3d.config import load_config
    from medcam3d.data import BLUR_REACH, make_phantom
    from medcam3d.evaluate.phantoms import (
        ConfigGrid,
        DirectGrid,
        PhantomSource,
        config_hu_to_input,
    )

    cfg = load_config("demo_axialnet")
    draw = {"prevalence": 0.0, "present": {"nodule_right_lung": True},
            "clever_hans": {"label": "nodule_right_lung", "p_with": 1.0, "p_without": 1.0}}
    grid = ConfigGrid(cfg)
    assert grid.hu_to_input(-1000.0) == pytest.approx(-0.449) and grid.hu_to_input(2000.0) == pytest.approx(0.551)
    assert config_hu_to_input(grid.preprocessor)(40.0) == pytest.approx(demo_hu_to_input(40.0))
    src = PhantomSource(grid, 1, 7, **draw)
    case = src.case(0)
    ph = make_phantom((7, 0), **draw)  # case i of dataset seed S is phantom seed (S, i)
    # the demo grid is the phantom's own grid: masks carry over exactly, intensities follow the HU mapping
    assert case.labels == ("nodule_right_lung",)
    assert torch.equal(case.lesions["nodule_right_lung"], torch.from_numpy(ph.lesion_masks["nodule_right_lung"]))
    assert torch.equal(case.marker, torch.from_numpy(ph.marker_mask))
    assert torch.equal(case.organs["right_lung"], torch.from_numpy(ph.organ_masks["right_lung"]))
    assert torch.allclose(case.x[0, 0], demo_hu_to_input(torch.from_numpy(ph.hu)), atol=1e-6)
    # the same patient without the marker differs only near the marker
    changed = (src.without(case, ["marker"]) != case.x)[0, 0].numpy()
    near = binary_dilation(ph.marker_mask, np.ones([2 * r + 1 for r in BLUR_REACH], bool))
    assert changed.any() and not (changed & ~near).any()
    direct = PhantomSource(DirectGrid((30, 64, 64)), 1, 7, **draw).case(0)
    assert direct.x.shape == (1, 1, 30, 64, 64) and direct.lesions["nodule_right_lung"].shape == (30, 64, 64)


# ------------------------------------------------------------------------------------------------------------------
# command line and the demo model end to end
# ------------------------------------------------------------------------------------------------------------------


def test_evaluate_is_a_subcommand():
    from medcam3d.cli import build_parser
    from medcam3d.evaluate.command import cmd_evaluate, command_line

    args = build_parser().parse_args(["evaluate", "--out", "x", "--phantoms", "3", "--seed", "9"])
    assert args.func is cmd_evaluate and args.phantoms == 3 and args.parts[0] == "exactness"
    assert command_line(args).startswith("medcam3d evaluate --out x --phantoms 3 --seed 9")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--out", "x", "--phantoms", "0"])


def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", "--out", str(out), "--classes", "no_such_label"]) == 2
    assert main(["evaluate", "--out", str(out), "--clever-hans", "no_such_label"]) == 2
    assert main(["evaluate", "--out", str(out), "--model", str(tmp_path / "missing.pt")]) == 2
    assert not out.exists()
    assert "no_such_label" in capsys.readouterr().err


def test_demo_model_end_to_end(tmp_path):
    """The embedded demo AxialNet on 2 phantoms through ``medcam3d evaluate`` (every part, small settings)."""
    out = tmp_path / "eval"
    steps = 3
    threads = torch.get_num_threads()
    try:  # one thread: on a busy 2-core machine two OpenMP threads can be several times slower
        code = main(["evaluate", "--out", str(out), "--phantoms", "2", "--seed", "5", "--prevalence", "0",
                     "--present", "nodule_right_lung", "cardiomegaly", "--steps", str(steps), "--perturbation-scans",
                     "1", "--randomisation", "cascading", "--randomisation-scans", "1", "--depth", "1", "--device",
                     "cpu", "--threads", "1", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "evaluation.md", "step_by_step.png"]
    r = json.loads((out / "evaluation.json").read_text())
    assert r["command"].startswith("medcam3d evaluate --out") and "--seed 5" in r["command"]
    s = r["summary"]
    assert s["certificate"] == ["affine-head"]  # AxialNet's head (per-slice FC + slice mean) is affine
    ex = s["exactness"]
    assert ex["max_relative_residual"]["hirescam"] < 1e-4 < ex["max_relative_residual"]["gradcam"]
    for lab in ("nodule_right_lung", "cardiomegaly"):
        assert ex["table1"][lab]["n_present"] == 2 and ex["table1"][lab]["hirescam"] == 0.0
        assert ex["table1"][lab]["gradcam_present"] > 0
        g = s["ground_truth"][lab]
        assert g["n"] == 2 and 0 < g["chance"] < 0.2
        for c in r["cases"]:
            e = c["ground_truth"][lab]
            assert e["score_drop"] == pytest.approx(e["score"] - e["score_without"])
            assert e["score"] == pytest.approx(c["scores"][lab])
            for m in ("hirescam", "gradcam"):
                v = e["share"][m]
                assert v is None or 0 <= v <= 1
        loc = s["localisation"][lab]
        assert loc["n"] == 2 and loc["hirescam"]["iou"]["n_validation"] == 1 and loc["hirescam"]["iou"]["n_test"] == 1
        assert loc["hirescam"]["iou"]["threshold"] in [round(0.02 * i, 2) for i in range(1, 50)]
    assert set(s["allowed_region"]) == {"nodule_right_lung", "cardiomegaly"}
    # perturbation: one scan, two classes, two methods; curve end points are the scan's and the fill's scores
    case0 = r["cases"][0]
    pert = case0["perturbation"]["air"]
    for m in ("hirescam", "gradcam"):
        for lab in ("nodule_right_lung", "cardiomegaly"):
            dele = pert[m]["deletion"]["morf"][lab]["curve"]
            ins = pert[m]["insertion"]["morf"][lab]["curve"]
            assert len(dele) == steps + 1
            assert dele[0] == pytest.approx(case0["scores"][lab], abs=1e-4)
            assert dele[-1] == pytest.approx(ins[0]) and ins[-1] == pytest.approx(dele[0])
            assert pert[m]["deletion"]["random"][lab] == pert["hirescam"]["deletion"]["random"][lab]
    assert r["passes"]["perturbation"] == perturbation_passes(steps, 2, 2)
    assert r["passes"]["removal"] == 2 * 2
    rd = s["randomisation"]["cascading"]
    assert rd["layers"][:2] == ["(trained)", "fc"] and rd["hirescam"]["spearman"][0] == 1.0
    md = (out / "evaluation.md").read_text()
    for heading in ("## Exactness", "## Ground truth", "## Describing the model", "## Perturbation",
                    "## Parameter randomisation", "## Costs"):
        assert heading in md
    assert r["figure"]["label"] == "nodule_right_lung"


def test_block_fractions_with_receptive_geometry():
    from medcam3d.geometry import MapGeometry

    mask = torch.zeros(10, dtype=torch.bool)
    mask[[0, 4, 5, 6]] = True
    # cells centred at voxels 2 and 6: cell 0 owns voxels 0-3, cell 1 owns 4-9 (edge cells own what lies beyond)
    assert M.block_fractions(mask, (2,), MapGeometry((2.0,), (4.0,))).tolist() == [0.25, 0.5]
    # field geometry is the even blocks
    assert M.block_fractions(mask, (2,), MapGeometry.field((2,), (10,))).tolist() == pytest.approx([0.4, 0.4])


def test_suite_receptive_geometry_moves_the_heatmap_and_the_blocks():
    """On the demo AxialNet, the suite's map geometry decides where cells lie: the ground-truth share equals the
    relevance mass over the voxels nearest each receptive-field centre (computed here with numpy)."""
    from medcam3d import Explainer
    from medcam3d.evaluate.phantoms import PhantomSource
    from medcam3d.evaluate.reproduce import demo_model
    from medcam3d.evaluate.suite import SuiteOptions, evaluate

    mut, grid = demo_model()
    source = PhantomSource(grid, 1, 5, prevalence=0.0, present={"cardiomegaly": True})
    results = {g: evaluate(mut, source, SuiteOptions(parts=("ground_truth", "localisation"), removal=False,
                                                     map_geometry=g)) for g in ("field", "receptive")}
    assert results["receptive"]["options"]["map_geometry"] == "receptive"
    case = source.case(0)
    exp = Explainer(mut.model, mut.target_layer, layout=mut.layout)(case.x)
    k = mut.labels.index("cardiomegaly")
    mask = case.lesions["cardiomegaly"].numpy()
    pos = np.maximum(exp.raw["hirescam"][0, k].numpy(), 0)
    shares = {}
    for g in ("field", "receptive"):
        geo = exp.map_geometry(g)
        idx = [np.clip(np.floor((np.arange(n) - o) / s + 0.5), 0, m - 1).astype(int)
               for n, o, s, m in zip(mask.shape, geo.offset, geo.stride, exp.map_size)]
        inside = np.zeros(exp.map_size)
        count = np.zeros(exp.map_size)
        cells = np.ix_(*idx)
        np.add.at(inside, tuple(np.broadcast_arrays(*cells)), mask.astype(float))
        np.add.at(count, tuple(np.broadcast_arrays(*cells)), 1.0)
        shares[g] = (pos * inside / count).sum() / pos.sum()
        got = results[g]["cases"][0]["ground_truth"]["cardiomegaly"]["share"]["hirescam"]
        assert got == pytest.approx(shares[g], abs=1e-6)
    assert abs(shares["field"] - shares["receptive"]) > 1e-3  # the geometry matters on AxialNet
