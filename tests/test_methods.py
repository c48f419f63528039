"""Golden numbers for the pure method functions (hand-computed, see comments)."""

import math

import pytest
import torch

from medcam3d import methods
from medcam3d.methods import (
    BUILTIN_METHODS,
    METHOD_TITLES,
    METHODS,
    get_method,
    register_method,
)


def fig3():
    """Draelos & Carin, Figure 3: F=2 feature maps of 2x2, FC weights w, activations A."""
    w = torch.tensor([1.0, 3, 2, -1, 0, -2, 1, 1]).reshape(1, 1, 2, 2, 2)  # gradients [B, K, F, 2, 2]
    a = torch.tensor([-1.0, 2, 1, -4, 3, -2, 2, -1]).reshape(1, 2, 2, 2)  # activations [B, F, 2, 2]
    return a, w


def test_figure3_hirescam_sums_to_w_dot_a():
    a, g = fig3()
    m = methods.hirescam(a, g)
    # map 1: w1*A1 = [-1, 6, 2, 4]; map 2: w2*A2 = [0, 4, 2, -1]; sum = [-1, 10, 4, 3]
    assert m.shape == (1, 1, 2, 2)
    assert m.flatten().tolist() == [-1.0, 10.0, 4.0, 3.0]
    assert float(m.sum()) == 16.0  # w . A = s - b


def test_figure3_gradcam_follows_averaged_weights():
    a, g = fig3()
    m = methods.gradcam(a, g)
    # alpha_1 = mean(1, 3, 2, -1) = 1.25, alpha_2 = mean(0, -2, 1, 1) = 0 -> 1.25 * A1
    assert torch.allclose(m.flatten(), torch.tensor([-1.25, 2.5, 1.25, -5.0]))
    # Grad-CAM's map does not sum to s - b
    assert float(m.sum()) == pytest.approx(-2.5)


@pytest.fixture
def one_map():
    """F=1, four positions: A = [1, 2, 3, 4] (sum 10), g = [1, -1, 2, 0.5]."""
    a = torch.tensor([1.0, 2, 3, 4]).reshape(1, 1, 4)
    g = torch.tensor([1.0, -1, 2, 0.5]).reshape(1, 1, 1, 4)
    return a, g


def test_one_map_goldens(one_map):
    a, g = one_map
    A = a.flatten()
    # HiResCAM: g * A
    assert methods.hirescam(a, g).flatten().tolist() == [1.0, -2.0, 6.0, 2.0]
    # Grad-CAM: mean g = 2.5 / 4 = 0.625
    assert torch.allclose(methods.gradcam(a, g).flatten(), 0.625 * A)
    # CAM weight = sum of gradients = 2.5 (w_f = N * mean)
    assert torch.allclose(methods.cam(a, g).flatten(), 2.5 * A)
    # XGrad-CAM: w = sum(A/sum(A) * g) = (1 - 2 + 6 + 2) / 10 = 0.7
    assert torch.allclose(methods.xgradcam(a, g).flatten(), 0.7 * A)
    # LayerCAM: relu(g) * A
    assert methods.layercam(a, g).flatten().tolist() == [1.0, 0.0, 6.0, 2.0]
    # Grad-CAM++: alpha = g^2 / (2 g^2 + sum(A) g^3): 1/12, (g<0 -> relu 0), 4/88, 0.25/1.75
    # w = 1/12 * 1 + 1/22 * 2 + 1/7 * 0.5 = 227/924
    assert torch.allclose(methods.gradcampp(a, g).flatten(), (227 / 924) * A, atol=1e-6)


def test_gradcampp_zero_gradient_has_zero_weight():
    a = torch.tensor([1.0, 2.0]).reshape(1, 1, 2)
    g = torch.zeros(1, 1, 1, 2)
    assert torch.all(methods.gradcampp(a, g) == 0)


@pytest.mark.parametrize("spatial", [(5,), (3, 4), (2, 3, 4)])
def test_methods_match_loop_implementations(spatial):
    """Every method against a plain-Python loop written from the papers' equations, 1-D/2-D/3-D, B=2, K=3."""
    gen = torch.Generator().manual_seed(0)
    B, K, F = 2, 3, 4
    a = torch.randn((B, F, *spatial), generator=gen, dtype=torch.float64)
    g = torch.randn((B, K, F, *spatial), generator=gen, dtype=torch.float64)
    n = math.prod(spatial)
    for b in range(B):
        for k in range(K):
            A = [a[b, f].flatten().tolist() for f in range(F)]
            G = [g[b, k, f].flatten().tolist() for f in range(F)]
            hires = [sum(G[f][i] * A[f][i] for f in range(F)) for i in range(n)]
            alpha = [sum(G[f]) / n for f in range(F)]
            grad = [sum(alpha[f] * A[f][i] for f in range(F)) for i in range(n)]
            layer = [sum(max(G[f][i], 0.0) * A[f][i] for f in range(F)) for i in range(n)]
            xw = [sum(A[f][i] / sum(A[f]) * G[f][i] for i in range(n)) for f in range(F)]
            xgrad = [sum(xw[f] * A[f][i] for f in range(F)) for i in range(n)]
            ppw = []
            for f in range(F):
                s = sum(A[f])
                ppw.append(sum(G[f][i] ** 2 / (2 * G[f][i] ** 2 + s * G[f][i] ** 3) * max(G[f][i], 0)
                               for i in range(n)))
            pp = [sum(ppw[f] * A[f][i] for f in range(F)) for i in range(n)]
            refs = [("hirescam", hires), ("gradcam", grad), ("layercam", layer), ("xgradcam", xgrad), ("gradcampp", pp)]
            for name, ref in refs:
                got = get_method(name)(a, g)[b, k].flatten()
                assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), atol=1e-9), name


def test_registry():
    assert {"hirescam", "gradcam", "cam", "gradcampp", "xgradcam", "layercam"} <= set(METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")

    @register_method("ones_for_test")
    def ones(a, g):
        return torch.ones(a.shape[0], g.shape[1], *a.shape[2:])

    try:
        assert get_method("ones_for_test") is ones
    finally:
        METHODS.pop("ones_for_test")


@pytest.mark.parametrize("name", ["hirescam", "gradcam", "cam", "gradcampp", "xgradcam", "layercam"])
def test_builtin_methods_are_never_replaced(name):
    builtin = METHODS[name]
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=f"method '{name}' is built in"):

            @register_method(name, overwrite=overwrite)
            def impostor(a, g):
                return torch.zeros(a.shape[0], g.shape[1], *a.shape[2:])

    assert METHODS[name] is builtin


def test_builtin_list_matches_the_registry_and_titles():
    assert set(BUILTIN_METHODS) == set(METHOD_TITLES)
    assert set(BUILTIN_METHODS) <= set(METHODS)


def test_user_method_is_replaced_only_on_request():
    @register_method("twice_for_test")
    def first(a, g):
        return 2 * methods.hirescam(a, g)

    try:
        with pytest.raises(ValueError, match="'twice_for_test' is already registered; pass overwrite=True"):

            @register_method("twice_for_test")
            def again(a, g):
                return 3 * methods.hirescam(a, g)

        assert get_method("twice_for_test") is first

        @register_method("twice_for_test", overwrite=True)
        def second(a, g):
            return 3 * methods.hirescam(a, g)

        assert get_method("twice_for_test") is second
    finally:
        METHODS.pop("twice_for_test")
