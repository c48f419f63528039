"""Targets (medcam3d.targets): hand-computed region scores and maps on a 1x1x1-convolution segmentation head,
connected components, per-sample padding, bad input, and the deprecated ``output=`` alias."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from core_nets import ConvGAP
from torch import nn

from medcam3d import Explainer
from medcam3d.errors import InputError
from medcam3d.targets import BoundTargets, Classes, SegmentationRegions, TargetInfo, as_targets

# a 1x1x1 convolution head on known activations: F = 2 features, C = 3 classes
W = np.array([[1.0, -1.0], [0.5, 2.0], [-1.0, 1.0]])
BIAS = np.array([0.5, -1.0, 0.25])


class SegHead(nn.Module):
    """``act`` (identity: the input *is* the explained activation) -> 1x1x1 conv: logits ``W A + b`` per voxel."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Identity()
        self.head = nn.Conv3d(2, 3, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(W, dtype=torch.float32).view(3, 2, 1, 1, 1))
            self.head.bias.copy_(torch.tensor(BIAS, dtype=torch.float32))

    def forward(self, x):
        return self.head(self.act(x))


class Passthrough(nn.Module):
    """Output = input (a given logit volume), so the predicted regions are whatever the test draws."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Identity()

    def forward(self, x):
        return self.act(x) * 1.0


def _activation(batch: int = 1, size: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 2, size, size, size, generator=g, dtype=torch.float64).float()


def _logits(a: np.ndarray) -> np.ndarray:
    """By hand: ``W A + b`` per voxel, ``[B, 3, *S]``."""
    return np.einsum("cf,bf...->bc...", W, a) + BIAS.reshape(1, 3, 1, 1, 1)


def _explain(targets, x, model=None, **kw):
    torch.manual_seed(0)
    model = model or SegHead()
    return Explainer(model, "act", ("hirescam", "gradcam"), targets=targets, **kw)(x)


# --- hand-computed values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_mask_region_hirescam_and_gradcam_by_hand(reduce):
    """Region R (a mask), class 1: s = Σ_R (W_1·A + b_1) (or its mean). HiResCAM at v = Σ_f W_1f A_f(v) on R, 0
    elsewhere; its sum is s − b_1·|R| (sum) or s − b_1 (mean). Grad-CAM: α_f = mean over space of ∂s/∂A_f."""
    x = _activation()
    a = x.double().numpy()
    mask = torch.zeros(5, 5, 5, dtype=torch.bool)
    mask[1:3, 0:4, 2] = True
    mask[4, 4, 4] = True
    r = mask.numpy()
    n_r, n = int(r.sum()), r.size
    scale = 1.0 if reduce == "sum" else 1.0 / n_r
    exp = _explain(SegmentationRegions(1, mask, reduce=reduce), x)

    s = _logits(a)[0, 1][r].sum() * scale
    assert exp.scores.shape == (1, 1)
    assert exp.scores[0, 0].item() == pytest.approx(s, rel=1e-6)
    contrib = np.einsum("f,f...->...", W[1], a[0]) * scale  # Σ_f W_1f A_f(v) (times 1/|R| for the mean)
    hires = np.where(r, contrib, 0.0)
    np.testing.assert_allclose(exp.raw["hirescam"][0, 0].double().numpy(), hires, rtol=1e-5, atol=1e-6)
    bias_part = BIAS[1] * n_r * scale  # b·|R| for the sum, b for the mean
    assert exp.raw["hirescam"][0, 0].double().sum().item() == pytest.approx(s - bias_part, rel=1e-5)
    alpha = W[1] * n_r / n * scale  # the gradient W_1 on R, 0 elsewhere, averaged over the whole grid
    grad = np.einsum("f,f...->...", alpha, a[0])
    np.testing.assert_allclose(exp.raw["gradcam"][0, 0].double().numpy(), grad, rtol=1e-5, atol=1e-6)
    cert = exp.certificate
    assert cert.kind == "affine-head"
    assert cert.baseline[0, 0].item() == pytest.approx(bias_part, rel=1e-6)
    assert abs(cert.completeness_residual[0, 0].item()) < 1e-4


def test_predicted_components_exact_per_target():
    """Region "components" of class 1 on the 1x1x1 head: each target's HiResCAM is exact on its own component
    (sums to its score minus b·voxels), regions taken from the argmax of the hand-computed logits."""
    x = _activation(size=6)
    logits = _logits(x.double().numpy())[0]
    predicted = logits.argmax(0) == 1
    from scipy import ndimage  # the test's own labelling, 26-connectivity

    lab, count = ndimage.label(predicted, structure=np.ones((3, 3, 3)))
    sizes = sorted((int((lab == i).sum()) for i in range(1, count + 1)), reverse=True)
    exp = _explain(SegmentationRegions(1, "components"), x)
    assert [t.voxels for t in exp.targets] == sizes
    assert exp.certificate.kind == "affine-head"
    for k, t in enumerate(exp.targets):
        assert t.region == "component" and t.component == k + 1 and t.cls == 1
        total = exp.raw["hirescam"][0, k].double().sum().item()
        assert total == pytest.approx(exp.scores[0, k].item() - BIAS[1] * t.voxels, rel=1e-4, abs=1e-5)
    # the components together are the predicted region: summed maps = the map of the whole predicted region
    whole = _explain(SegmentationRegions(1, "predicted"), x)
    assert whole.targets[0].voxels == int(predicted.sum())
    torch.testing.assert_close(exp.raw["hirescam"].sum(1), whole.raw["hirescam"][:, 0], rtol=1e-5, atol=1e-5)


def _blob_logits(masks: list[np.ndarray]) -> torch.Tensor:
    """Logits ``[B, 2, *S]``: class 1 wins (10 vs 0) exactly on each sample's mask."""
    out = np.zeros((len(masks), 2, *masks[0].shape), dtype=np.float32)
    for b, m in enumerate(masks):
        out[b, 1] = np.where(m, 10.0, -10.0)
    return torch.from_numpy(out)


def test_components_split_two_blobs_largest_first():
    m = np.zeros((8, 8, 8), dtype=bool)
    m[0:2, 0:2, 0:2] = True  # 8 voxels, centroid (0.5, 0.5, 0.5)
    m[5:8, 6, 6] = True  # 3 voxels, centroid (6, 6, 6)
    bound = SegmentationRegions(1, "components").bind(_blob_logits([m]), ["background", "lesion"])
    assert [t.voxels for t in bound.infos] == [8, 3]
    assert bound.infos[0].centroid == pytest.approx((0.5, 0.5, 0.5))
    assert bound.infos[1].centroid == pytest.approx((6.0, 6.0, 6.0))
    assert [t.name for t in bound.infos] == ["lesion component 1", "lesion component 2"]
    assert bound.valid.tolist() == [[True, True]]
    # the score of component k is the class-1 logit summed over its voxels: 10 per voxel
    assert bound(_blob_logits([m])).tolist() == [[80.0, 30.0]]


def test_diagonal_neighbours_are_one_component():
    """26-connectivity: voxels touching only at a corner are one component."""
    m = np.zeros((4, 4, 4), dtype=bool)
    m[0, 0, 0] = m[1, 1, 1] = m[2, 2, 2] = True
    m[3, 0, 3] = True  # isolated
    bound = SegmentationRegions(1, "components").bind(_blob_logits([m]), None)
    assert [t.voxels for t in bound.infos] == [3, 1]
    assert bound.infos[0].centroid == pytest.approx((1.0, 1.0, 1.0))


def test_max_targets_drops_smallest_with_note():
    m = np.zeros((9, 9, 9), dtype=bool)
    m[0, 0, 0:3] = True
    m[4, 4, 0:2] = True
    m[8, 8, 8] = True
    bound = SegmentationRegions(1, "components", max_targets=2).bind(_blob_logits([m]), None)
    assert [t.voxels for t in bound.infos] == [3, 2]
    assert len(bound.notes) == 1 and "1 smallest component" in bound.notes[0]


def test_min_voxels_drops_small_predicted_regions_with_a_note():
    """Components below ``min_voxels`` are dropped (counted in a note) before the ranking and the cap; a whole
    predicted mask below it is dropped too; when nothing is left, NoRegions (an InputError) names why. User masks
    are kept as given."""
    from medcam3d.targets import NoRegions

    m = np.zeros((9, 9, 9), dtype=bool)
    m[0, 0, 0:3] = True  # 3 voxels
    m[4, 4, 0:2] = True  # 2
    m[8, 8, 8] = True  # 1
    bound = SegmentationRegions(1, "components", min_voxels=2).bind(_blob_logits([m]), None)
    assert [t.voxels for t in bound.infos] == [3, 2]
    assert bound.notes == ["class_1: 1 component(s) smaller than min_voxels=2 dropped"]
    capped = SegmentationRegions(1, "components", min_voxels=2, max_targets=1).bind(_blob_logits([m]), None)
    assert [t.voxels for t in capped.infos] == [3] and len(capped.notes) == 2
    assert [t.voxels for t in SegmentationRegions(1, "predicted", min_voxels=6).bind(
        _blob_logits([m]), None).infos] == [6]
    for region in ("components", "predicted"):
        with pytest.raises(NoRegions, match="min_voxels=7"):
            SegmentationRegions(1, region, min_voxels=7).bind(_blob_logits([m]), None)
    kept = SegmentationRegions(1, torch.from_numpy(m), min_voxels=100).bind(_blob_logits([m]), None)
    assert [t.voxels for t in kept.infos] == [6]
    with pytest.raises(InputError, match="min_voxels must be at least 1"):
        SegmentationRegions(1, "components", min_voxels=0)


def test_per_sample_components_padded_with_valid_mask():
    """Sample 0 has two blobs, sample 1 one: T = 2, entry (1, 1) invalid with score and maps exactly 0."""
    m0 = np.zeros((6, 6, 6), dtype=bool)
    m0[0:2, 0:2, 0:2] = True
    m0[4:6, 4, 4] = True
    m1 = np.zeros((6, 6, 6), dtype=bool)
    m1[2:5, 2:5, 2] = True
    logits = _blob_logits([m0, m1])
    exp = _explain(SegmentationRegions(1, "components"), logits, model=Passthrough())
    assert exp.target_valid.tolist() == [[True, True], [True, False]]
    assert exp.scores[1, 1].item() == 0.0
    for m in exp.raw.values():
        assert bool((m[1, 1] == 0).all())
    assert exp.sample_targets[0][0].voxels == 8 and exp.sample_targets[0][1].voxels == 2
    assert exp.sample_targets[1][0].voxels == 9 and exp.sample_targets[1][1] is None
    assert exp.sample_targets[1][0].sample == 1
    assert exp.targets[0].voxels is None  # regions differ per sample: no batch-wide voxel count
    # passthrough head: score = Σ_R logit_1 = 10 per voxel; HiResCAM = the logits on the region
    assert exp.scores.tolist() == [[80.0, 20.0], [90.0, 0.0]]
    assert exp.raw["hirescam"][0, 1].sum().item() == pytest.approx(20.0)


def test_box_region_and_centroid_mm():
    x = _activation()
    exp = _explain(SegmentationRegions(0, ((1, 1, 1), (3, 4, 2))), x)
    t = exp.targets[0]
    assert t.region == "box" and t.voxels == 2 * 3 * 1
    assert t.centroid == pytest.approx((1.5, 2.0, 1.0))
    affine = np.diag([2.0, 3.0, 0.5, 1.0])
    affine[:3, 3] = [10.0, -5.0, 1.0]
    assert t.centroid_mm(affine) == pytest.approx((13.0, 1.0, 1.5))
    d = t.as_dict()
    assert d["centroid"] == pytest.approx([1.5, 2.0, 1.0]) and d["region"] == "box" and d["cls"] == 0
    assert exp.labels == ["class_0 box"] and exp.class_names() == ["class_0 box"]


def test_sigmoid_threshold():
    logits = torch.full((1, 2, 3, 3, 3), -5.0)
    logits[0, 0, 0, 0, 0] = 0.1  # sigmoid 0.525
    logits[0, 0, 1, 1, 1] = -0.1  # sigmoid 0.475
    logits[0, 0, 2, 2, 2] = 3.0
    b5 = SegmentationRegions(0, "predicted", activation="sigmoid").bind(logits, None)
    assert b5.infos[0].voxels == 2
    b9 = SegmentationRegions(0, "predicted", activation="sigmoid", threshold=0.9).bind(logits, None)
    assert b9.infos[0].voxels == 1


# --- bad input -----------------------------------------------------------------------------------------------------
def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_class_outside_channels():
    with pytest.raises(InputError) as e:
        _explain(SegmentationRegions(3, "predicted"), _activation())
    assert "outside" in _one_line(e) and "3 channels" in str(e.value)
    with pytest.raises(InputError) as e:
        _explain(SegmentationRegions("liver"), _activation(), labels=["a", "b", "c"])
    assert "liver" in _one_line(e)


def test_empty_predicted_region_is_skipped_with_a_note():
    m = np.zeros((4, 4, 4), dtype=bool)
    m[1, 1, 1:3] = True
    logits = torch.cat([_blob_logits([m]), torch.full((1, 1, 4, 4, 4), -20.0)], dim=1)  # class 2 never wins
    exp = _explain(SegmentationRegions([1, 2]), logits, model=Passthrough(), labels=["bg", "mass", "effusion"])
    assert [t.name for t in exp.targets] == ["mass predicted"]
    assert len(exp.notes) == 1 and "effusion" in exp.notes[0] and "skipped" in exp.notes[0]
    with pytest.raises(InputError) as e:  # nothing left
        _explain(SegmentationRegions(2), logits, model=Passthrough())
    assert "no region left" in _one_line(e)


def test_mask_of_wrong_shape():
    with pytest.raises(InputError) as e:
        _explain(SegmentationRegions(1, torch.ones(4, 5, 5)), _activation())
    assert "(4, 5, 5)" in _one_line(e)
    with pytest.raises(InputError):
        SegmentationRegions(1, ((0, 0), (2, 2, 2)))  # box with mismatched axes
    with pytest.raises(InputError):
        _explain(SegmentationRegions(1, ((0, 0, 0), (2, 2, 9))), _activation())  # box beyond the grid


def test_bad_arguments():
    for kw in ({"region": "everything"}, {"reduce": "max"}, {"activation": "relu"}, {"max_targets": 0}):
        with pytest.raises(InputError):
            SegmentationRegions(1, **kw)
    with pytest.raises(InputError):
        as_targets(42)


def test_dense_output_needs_segmentation_targets():
    with pytest.raises(InputError) as e:
        _explain(None, _activation())
    assert "SegmentationRegions" in _one_line(e)


# --- classes, selection, the deprecated alias -------------------------------------------------------------------------
def test_classes_default_unchanged_and_described():
    torch.manual_seed(0)
    model, x = ConvGAP(), torch.randn(2, 1, 5, 5, 5)
    exp = Explainer(model, "act", labels=["a", "b", "c"])(x)
    assert exp.classes == [0, 1, 2] and exp.labels == ["a", "b", "c"]
    assert exp.targets == [TargetInfo("a", 0), TargetInfo("b", 1), TargetInfo("c", 2)]
    assert exp.target_valid.shape == (2, 3) and bool(exp.target_valid.all())
    sel = Explainer(model, "act", labels=["a", "b", "c"], targets=Classes(["c", 0]))(x)
    assert sel.classes == [2, 0]
    torch.testing.assert_close(sel.raw["hirescam"][:, 0], exp.raw["hirescam"][:, 2])
    assert Explainer(model, "act", targets=Classes([2]))(x, classes=[1]).classes == [1]  # the call wins


def test_output_alias_warns_and_matches_targets():
    torch.manual_seed(0)
    model, x = ConvGAP(), torch.randn(1, 1, 5, 5, 5)

    def reader(y):
        return y[:, :2] * 2.0

    with pytest.warns(DeprecationWarning, match="targets="):
        old = Explainer(model, "act", output=reader)(x)
    new = Explainer(model, "act", targets=Classes(reader=reader))(x)
    plain = Explainer(model, "act", targets=reader)(x)
    assert old.scores.shape == (1, 2)
    for e in (new, plain):
        torch.testing.assert_close(e.raw["hirescam"], old.raw["hirescam"], rtol=0, atol=0)
    with pytest.raises(InputError):
        Explainer(model, "act", output=reader, targets=Classes())


def test_region_targets_selected_by_index_and_name():
    m = np.zeros((6, 6, 6), dtype=bool)
    m[0:2, 0:2, 0:2] = True
    m[4:6, 4, 4] = True
    logits = _blob_logits([m])
    torch.manual_seed(0)
    ex = Explainer(Passthrough(), "act", targets=SegmentationRegions(1, "components"))
    exp = ex(logits, classes=[1])
    assert exp.classes == [1] and exp.class_names() == ["class_1 component 2"]
    assert ex(logits, classes=["class_1 component 1"]).classes == [0]


def test_custom_targets_object():
    """A user's Targets implementation: bind returns BoundTargets; scores read through it everywhere."""

    class Corner:
        def bind(self, output, labels):
            return BoundTargets([TargetInfo("corner", 0, "box")], torch.ones(1, 1, dtype=torch.bool),
                                lambda y: y[:, 0, :2, :2, :2].sum((1, 2, 3)).unsqueeze(1))

    x = _activation()
    exp = _explain(Corner(), x)
    by_box = _explain(SegmentationRegions(0, ((0, 0, 0), (2, 2, 2))), x)
    torch.testing.assert_close(exp.raw["hirescam"], by_box.raw["hirescam"])
    assert exp.labels is None and exp.targets[0].name == "corner"


@pytest.mark.parametrize("jacobian", ["sketch", "per-class"])
def test_pointwise_head_one_backward_per_class_matches_per_target(jacobian):
    """On a 1x1x1 head the targets of one class share one backward pass (their regions are disjoint). The maps and
    the certificate's evidence computed from that one gradient per class (medcam3d.regions), and the per-target
    gradients cut from it, equal those of the re-run head, which differentiates every target on its own."""
    x = _activation(batch=2, size=6)
    targets = SegmentationRegions([1, 2], "components")
    fast = _explain(targets, x, head="fx", jacobian=jacobian)  # maps and evidence by regions
    kept = _explain(targets, x, keep_gradients=True, head="fx", jacobian=jacobian)  # per-target gradients, grouped
    slow = _explain(targets, x, keep_gradients=True, head="rerun", jacobian=jacobian)  # one backward per target
    assert len(fast.targets) >= 3 and {t.cls for t in fast.targets} == {1, 2}
    assert not bool(fast.target_valid.all())  # padded: some sample has fewer components
    torch.testing.assert_close(kept.gradients, slow.gradients, rtol=0, atol=1e-6)
    for e in (fast, kept):
        for m in slow.raw:
            torch.testing.assert_close(e.raw[m], slow.raw[m], rtol=1e-5, atol=1e-6)
        c, ref = e.certificate, slow.certificate
        assert c.kind == ref.kind == "affine-head" and c.per_class == ref.per_class
        torch.testing.assert_close(c.completeness_residual, ref.completeness_residual, rtol=0, atol=1e-4)
        torch.testing.assert_close(c.spatial_variation.double(), ref.spatial_variation.double(), rtol=1e-5,
                                   atol=1e-6)
        assert float(c.probe_residual.max()) <= c.tolerance and float(c.jacobian_difference.max()) <= c.tolerance


def test_region_path_refuses_other_methods_by_falling_back():
    """Methods other than HiResCAM and Grad-CAM need per-target gradients: the dense path is used, same maps."""
    x = _activation(size=6)
    targets = SegmentationRegions(1, "components")
    torch.manual_seed(0)
    both = Explainer(SegHead(), "act", ("hirescam", "layercam"), targets=targets)(x)
    torch.manual_seed(0)
    ref = Explainer(SegHead(), "act", ("hirescam", "layercam"), targets=targets, head="rerun")(x)
    for m in ref.raw:
        torch.testing.assert_close(both.raw[m], ref.raw[m], rtol=1e-5, atol=1e-6)


def test_pointwise_detection():
    from medcam3d.explainer import _FxHead

    seg = SegHead()
    assert _FxHead(seg, seg.act, "act").pointwise
    wide = nn.Sequential(nn.Identity(), nn.Conv3d(2, 3, 3, padding=1))
    assert not _FxHead(wide, wide[0], "0").pointwise
    pooled = nn.Sequential(nn.Identity(), nn.AvgPool3d(2), nn.Conv3d(2, 3, 1))
    assert not _FxHead(pooled, pooled[0], "0").pointwise


def test_class_gradient_equals_dense_per_target_quantities():
    """medcam3d.regions against the dense definitions on g_t = G ⊙ 1[R_t]: methods, contribution sums, gradient
    stats (zeros outside a region count; a region covering the whole grid has none), probe sums, sketch."""
    from medcam3d.certificate import contribution_sums, gradient_stats
    from medcam3d.methods import gradcam, hirescam
    from medcam3d.regions import ClassGradient

    g = torch.Generator().manual_seed(5)
    grad = torch.randn(2, 3, 4, 5, 6, generator=g)
    act = torch.randn(2, 3, 4, 5, 6, generator=g)
    probe = torch.randn(2, 3, 4, 5, 6, generator=g)
    labels = torch.randint(0, 4, (2, 4, 5, 6), generator=g)  # targets 0, 1, 2 (label t + 1), 0 = outside
    labels[1] = 3  # sample 1: target 2 covers the whole grid, targets 0 and 1 are empty there
    cg = ClassGradient(grad, labels, 3)
    targets = [0, 1, 2]
    dense = torch.stack([grad * (labels == t + 1).unsqueeze(1) for t in targets], dim=1)  # [B, 3, F, *S]
    torch.testing.assert_close(cg.dense(targets), dense.flatten(3))
    torch.testing.assert_close(cg.maps("hirescam", act, targets), hirescam(act, dense), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cg.maps("gradcam", act, targets), gradcam(act, dense), rtol=1e-5, atol=1e-6)
    s = cg.summary(act, targets, [probe])
    ref_c, ref_m = contribution_sums(act, dense)
    torch.testing.assert_close(s.contribution, ref_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.magnitude, ref_m, rtol=1e-6, atol=1e-6)
    ref_v, ref_g = gradient_stats(dense)
    torch.testing.assert_close(s.variation, ref_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.gmax, ref_g)
    torch.testing.assert_close(s.probe_sums[0][0], contribution_sums(probe, dense)[0], rtol=1e-6, atol=1e-6)
    coef = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(s.combine(coef), torch.einsum("k,bk...->b...", coef.float(), dense).flatten(2),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        cg.maps("layercam", act, targets)


def test_class_gradient_at_region_voxels_equals_whole_grid():
    """The same quantities from the gradient at the regions' voxels only (the class's gradient is zero elsewhere,
    as on a pointwise head): maps spread back to the grid, Grad-CAM weights divided by the whole grid's N, the
    spatial variation counting the zeros outside, probe sums and the sketch at the voxels."""
    from medcam3d.regions import ClassGradient

    g = torch.Generator().manual_seed(7)
    act = torch.randn(2, 3, 4, 5, 6, generator=g)
    probe = torch.randn(2, 3, 4, 5, 6, generator=g)
    labels = torch.randint(0, 3, (2, 4, 5, 6), generator=g)
    labels[:, :2] = 0  # the first two planes hold no region
    grad = torch.randn(2, 3, 4, 5, 6, generator=g) * (labels > 0).unsqueeze(1)
    positions = torch.nonzero((labels > 0).flatten(1).any(dim=0)).flatten()
    assert 0 < len(positions) < 120

    def cut(t):
        return t.flatten(2).index_select(2, positions)

    whole = ClassGradient(grad, labels, 2)
    part = ClassGradient(cut(grad), labels.flatten(1)[:, positions], 2, grid=(4, 5, 6), positions=positions)
    targets = [0, 1]
    for m in ("hirescam", "gradcam"):
        torch.testing.assert_close(part.maps(m, cut(act), targets, act), whole.maps(m, act, targets), rtol=1e-5,
                                   atol=1e-6)
    a, b = part.summary(cut(act), targets, [cut(probe)]), whole.summary(act, targets, [probe])
    for x, y in ((a.contribution, b.contribution), (a.magnitude, b.magnitude), (a.variation, b.variation),
                 (a.gmax, b.gmax), (a.probe_sums[0][0], b.probe_sums[0][0])):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    coef = torch.tensor([0.5, -2.0], dtype=torch.float64)
    torch.testing.assert_close(a.combine(coef), cut(b.combine(coef)))


class SkipHead(nn.Module):
    """A pointwise head that reads backbone values: ``conv1x1(cat([act, skip])) + offset``, where ``skip`` lies on
    the explained grid and ``offset`` is either constant over space or (``varying``) varies along the first axis."""

    def __init__(self, size: int, varying: bool = False) -> None:
        super().__init__()
        self.act = nn.Identity()
        self.head = nn.Conv3d(3, 3, 1)
        shape = (1, 3, size, 1, 1) if varying else (1, 3, 1, 1, 1)
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, 3 * shape[2]).view(shape))

    def forward(self, x):
        skip = torch.tanh(x[:, :1] * 2.0)
        return self.head(torch.cat([self.act(x), skip], dim=1)) + self.offset


@pytest.mark.parametrize("varying", [False, True])
def test_region_voxels_path_equals_per_target_gradients(monkeypatch, varying):
    """Region targets on a pointwise head are differentiated and probed at the regions' voxels only, with the
    backbone values the head reads (a skip tensor on the grid) cut to the same voxels: maps and certificate equal
    the re-run head's, which differentiates every target on the whole grid. A backbone value on another grid (an
    offset varying along one axis only) cannot be cut: the whole grid is used, same numbers."""
    from medcam3d.explainer import _FxHead

    seen = []
    original = _FxHead.on_voxels

    def spy(self, positions, grid):
        run = original(self, positions, grid)
        seen.append((len(positions), run is not None))
        return run

    monkeypatch.setattr(_FxHead, "on_voxels", spy)
    x = _activation(batch=2, size=6)
    targets = SegmentationRegions([1, 2], "components")
    torch.manual_seed(1)
    model = SkipHead(6, varying)
    fast = _explain(targets, x, model=model, head="fx")
    slow = _explain(targets, x, model=model, head="rerun")
    assert len(seen) == 1 and 0 < seen[0][0] < 2 * 6**3 and seen[0][1] is not varying
    for m in slow.raw:
        torch.testing.assert_close(fast.raw[m], slow.raw[m], rtol=1e-5, atol=1e-6)
    c, ref = fast.certificate, slow.certificate
    assert c.kind == ref.kind == "affine-head"
    torch.testing.assert_close(c.completeness_residual, ref.completeness_residual, rtol=0, atol=1e-4)
    assert float(c.probe_residual.max()) <= c.tolerance and float(c.jacobian_difference.max()) <= c.tolerance
    assert not c.notes


def test_region_voxels_scores_checked_against_the_real_ones(monkeypatch):
    """If the head at the regions' voxels ever scored differently from the real output, the whole grid is used
    instead and a note says so: the maps stay those of the real head."""
    from medcam3d.explainer import _FxHead

    original = _FxHead.on_voxels
    monkeypatch.setattr(_FxHead, "on_voxels",
                        lambda self, p, g: (lambda a, run=original(self, p, g): run(a) * 2.0))
    x = _activation(size=6)
    targets = SegmentationRegions(1, "components")
    wrong = _explain(targets, x, head="fx")
    ref = _explain(targets, x, head="rerun")
    assert any("regions' voxels" in n for n in wrong.certificate.notes)
    for m in ref.raw:
        torch.testing.assert_close(wrong.raw[m], ref.raw[m], rtol=1e-5, atol=1e-6)
    assert wrong.certificate.kind == "affine-head"
