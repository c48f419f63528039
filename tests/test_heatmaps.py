"""Display post-processing: ReLU, whole-map min-max, n-linear upsampling."""

import pytest
import torch
import torch.nn.functional as F

from medcam3d.geometry import MapGeometry
from medcam3d.heatmaps import iter_heatmaps, normalize, to_heatmap, upsample


def test_normalize_relu_then_whole_map_minmax():
    raw = torch.tensor([-2.0, 0.0, 1.0, 4.0]).reshape(1, 1, 4)
    # relu -> [0, 0, 1, 4]; min 0, max 4
    assert normalize(raw).flatten().tolist() == [0.0, 0.0, 0.25, 1.0]


def test_normalize_is_over_the_whole_volume_not_per_slice():
    raw = torch.zeros(1, 1, 2, 2, 2)
    raw[0, 0, 0] = 1.0  # slice 0 weak
    raw[0, 0, 1] = 4.0  # slice 1 strong
    out = normalize(raw)
    assert torch.allclose(out[0, 0, 0], torch.full((2, 2), 0.0))  # min of whole volume is 1 -> 0
    assert torch.allclose(out[0, 0, 1], torch.full((2, 2), 1.0))
    raw[0, 0, 0, 0, 0] = 0.0
    out = normalize(raw)
    # whole-volume min 0, max 4: the weak slice keeps its 0.25, it is not stretched to 1
    assert torch.allclose(out[0, 0, 0].flatten(), torch.tensor([0.0, 0.25, 0.25, 0.25]))


def test_all_negative_or_constant_map_gives_zeros_not_nan():
    raw = torch.tensor([[[-1.0, -3.0, -2.0]], [[5.0, 5.0, 5.0]]])  # [B=2, K=1, 3]
    out = normalize(raw)
    assert torch.equal(out, torch.zeros_like(out))


def test_normalize_maps_are_independent_per_sample_and_class():
    raw = torch.tensor([[[0.0, 2.0], [0.0, 10.0]]])  # [1, 2, 2]
    assert normalize(raw).tolist() == [[[0.0, 1.0], [0.0, 1.0]]]


def test_upsample_trilinear_align_corners_false_and_range():
    gen = torch.Generator().manual_seed(1)
    raw = torch.randn(2, 3, 4, 5, 6, generator=gen)
    hm = to_heatmap(raw, (8, 10, 12))
    ref = F.interpolate(normalize(raw), size=(8, 10, 12), mode="trilinear", align_corners=False)
    assert hm.shape == (2, 3, 8, 10, 12)
    assert torch.allclose(hm, ref)
    assert hm.min() >= 0 and hm.max() <= 1


def test_upsample_1d_2d_modes():
    m1 = torch.tensor([[[0.0, 1.0]]])
    # linear, align_corners=False: out[i] samples at (i + 0.5) / 2 - 0.5 -> [-0.25, 0.25, 0.75, 1.25] clamped
    assert torch.allclose(upsample(m1, (4,)).flatten(), torch.tensor([0.0, 0.25, 0.75, 1.0]))
    m2 = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert upsample(m2, (4, 4)).shape == (1, 1, 4, 4)


def test_float16_and_chunked_iteration_match():
    gen = torch.Generator().manual_seed(2)
    raw = torch.randn(1, 5, 3, 3, 3, generator=gen)
    full = to_heatmap(raw, (6, 6, 6))
    parts = list(iter_heatmaps(raw, (6, 6, 6), chunk=2, dtype=torch.float16))
    assert [p[1].shape[1] for p in parts] == [2, 2, 1]
    assert all(p[1].dtype == torch.float16 for p in parts)
    joined = torch.cat([p[1] for p in parts], dim=1).float()
    assert torch.allclose(joined, full, atol=1e-3)


def test_receptive_upsample_is_zero_where_no_cell_sits():
    """Two cells centred at voxels 2 and 6 of 12 (stride 4): linear between the centres, the edge value for half a
    stride (2 voxels) beyond them, 0 from voxel 9 on (issue 14: uncovered is not zero evidence)."""
    maps = torch.tensor([[[0.2, 1.0]]])
    out = upsample(maps, (12,), MapGeometry((2.0,), (4.0,)))
    expected = [0.2, 0.2, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert out.flatten().tolist() == pytest.approx(expected)
    assert out[0, 0, 9:].eq(0).all()
    # to_heatmap: min-max first (0.2 -> 0, 1.0 -> 1), then the same placement
    hm = to_heatmap(maps, (12,), geometry=MapGeometry((2.0,), (4.0,)))
    assert hm.flatten().tolist() == pytest.approx([0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 0, 0, 0])
