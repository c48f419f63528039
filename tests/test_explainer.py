"""The Explainer: exactness, certificates, layouts, batching, hygiene."""

from __future__ import annotations

from typing import Any, TypeVar

import pytest
import torch
from core_nets import ConvFC, ConvGAP, ConvMLP, Identity8, TinyAxial
from torch import nn

from medcam3d import Explainer, InputError, explain
from medcam3d.certificate import (
    contribution_sums,
    gradient_stats,
    secant_residual,
    spatial_variation,
)
from medcam3d.heatmaps import normalize

HEADS = ["fx", "rerun"]

M = TypeVar("M", bound=nn.Module)


def seeded(model: M, seed: int = 0) -> M:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- paper's Figure 3
@pytest.mark.parametrize("head", HEADS)
def test_figure3_end_to_end(head):
    net = Identity8(bias=0.5)
    a = torch.tensor([-1.0, 2, 1, -4, 3, -2, 2, -1]).reshape(1, 2, 2, 2)
    exp = explain(net, a, "feat", methods=("hirescam", "gradcam"), head=head)
    assert exp.scores.item() == pytest.approx(16.5)  # w.A + b
    assert exp.raw["hirescam"].flatten().tolist() == [-1.0, 10.0, 4.0, 3.0]
    assert exp.raw["hirescam"].sum().item() == pytest.approx(16.0)  # s - b
    assert torch.allclose(exp.raw["gradcam"].flatten(), torch.tensor([-1.25, 2.5, 1.25, -5.0]))
    cert = exp.certificate
    assert cert.kind == "affine-head" and cert.exact and cert.head == head
    assert cert.baseline.item() == pytest.approx(0.5)  # s(0) = b
    assert abs(cert.completeness_residual.item()) < 1e-6


# --------------------------------------------------------------------------------------- tiny nets, 1/2/3-D
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_hand_set_linear_head(nd):
    """Identity features, one FC layer with integer weights: HiResCAM = W ⊙ A summed over features, computed here
    by explicit loops."""
    size, feats, classes = 3, 2, 2
    n = size**nd

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Identity()
            self.fc = nn.Linear(feats * n, classes)

    net = Net()
    net.forward = lambda x: net.fc(net.feat(x).flatten(1))  # type: ignore[method-assign]
    w = torch.arange(classes * feats * n, dtype=torch.float32).reshape(classes, feats * n) % 5 - 2
    with torch.no_grad():
        net.fc.weight.copy_(w)
        net.fc.bias.copy_(torch.tensor([3.0, -1.0]))
    x = (torch.arange(feats * n, dtype=torch.float32) % 7 - 3).reshape(1, feats, *([size] * nd))
    exp = explain(net, x, "feat", head="rerun")
    xf = x.flatten().tolist()
    for k in range(classes):
        wk = w[k].tolist()
        expected = [sum(wk[f * n + i] * xf[f * n + i] for f in range(feats)) for i in range(n)]
        assert exp.raw["hirescam"][0, k].flatten().tolist() == pytest.approx(expected)
        alpha = [sum(wk[f * n : (f + 1) * n]) / n for f in range(feats)]
        expected_g = [sum(alpha[f] * xf[f * n + i] for f in range(feats)) for i in range(n)]
        assert exp.raw["gradcam"][0, k].flatten().tolist() == pytest.approx(expected_g, abs=1e-5)
        assert exp.scores[0, k].item() - float(net.fc.bias[k].detach()) == pytest.approx(sum(expected), abs=1e-4)
    assert exp.certificate.kind == "affine-head"


# --------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("head", HEADS)
def test_cam_architecture_all_three_coincide(nd, head):
    net = seeded(ConvGAP(nd=nd))
    x = rand(2, 1, *([6] * nd))
    exp = explain(net, x, "act", methods=("cam", "hirescam", "gradcam"), head=head)
    assert exp.certificate.kind == "cam"
    n = 6**nd
    assert torch.allclose(exp.raw["cam"], n * exp.raw["hirescam"], rtol=1e-4, atol=1e-5)
    assert torch.allclose(exp.raw["cam"], n * exp.raw["gradcam"], rtol=1e-4, atol=1e-5)
    for m in ("hirescam", "gradcam"):
        assert torch.allclose(exp.heatmap("cam"), exp.heatmap(m), atol=1e-5)
    # CAM = Σ_f w_f A^f with the FC weights read off the model
    acts = net.act(net.conv(x)).detach()
    ref = torch.einsum("kf,bf...->bk...", net.fc.weight.detach(), acts)
    assert torch.allclose(exp.raw["cam"], ref, atol=1e-5)


def test_cam_is_refused_without_gap_head():
    with pytest.raises(InputError, match="global-average-pool"):
        explain(seeded(ConvFC(nd=2)), rand(1, 2, 4, 4), "act", methods=("cam",))


@pytest.mark.parametrize("method", ["hirescam", "gradcam", "gradcampp", "xgradcam", "layercam"])
def test_fc_bias_changes_no_map(method):
    a = seeded(ConvFC(nd=3), seed=1)
    b = seeded(ConvFC(nd=3), seed=1)
    with torch.no_grad():
        b.fc.bias.add_(7.0)
    x = rand(2, 2, 4, 4, 4, seed=3)
    ea = explain(a, x, "act", methods=(method,))
    eb = explain(b, x, "act", methods=(method,))
    assert torch.allclose(ea.raw[method], eb.raw[method], atol=1e-6)
    assert torch.allclose(eb.scores - ea.scores, torch.full_like(ea.scores, 7.0), atol=1e-4)


@pytest.mark.parametrize("head", HEADS)
def test_hirescam_at_input_is_gradient_times_input(head):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Identity()
            self.body = ConvMLP(nd=2)

        def forward(self, x):
            return self.body(self.inp(x))

    net = seeded(Net())
    x = rand(2, 1, 4, 4, seed=5)
    exp = explain(net, x, "inp", methods=("hirescam",), head=head)
    for k in range(4):
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(xi)[:, k].sum(), xi)
        assert torch.allclose(exp.raw["hirescam"][:, k], (g * x).sum(1), atol=1e-6)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_completeness_on_affine_head(nd):
    net = seeded(ConvFC(nd=nd, size=4), seed=nd)
    x = rand(3, 2, *([4] * nd), seed=nd)
    exp = explain(net, x, "act")
    cert = exp.certificate
    assert cert.kind == "affine-head"
    s = exp.scores
    bias = net.fc.bias.detach()
    total = exp.raw["hirescam"].flatten(2).sum(2)
    assert torch.allclose(total, s - bias, atol=1e-4)
    assert torch.allclose(cert.baseline.float(), bias.expand_as(s), atol=1e-6)
    assert float(cert.relative_residual.abs().max()) < 1e-5


@pytest.mark.parametrize("head", HEADS)
def test_certificate_none_on_fc_relu_fc(head):
    exp = explain(seeded(ConvMLP(nd=2)), rand(2, 1, 4, 4), "act", head=head)
    cert = exp.certificate
    assert cert.kind == "none" and not cert.exact
    assert float(cert.jacobian_difference.max()) > 1e-2
    assert "Not proven" in cert.summary()


def test_certify_off_is_unchecked():
    exp = explain(seeded(ConvFC(nd=2)), rand(1, 2, 4, 4), "act", certify=False)
    assert exp.certificate.kind == "unchecked" and not exp.certificate.exact


# --------------------------------------------------------------------------------------- layouts
def test_slices_as_batch_gradcam_averages_over_whole_volume():
    """AxialNet-style: Grad-CAM's α_f is the mean of ∂s/∂A^f over all slices and positions of a volume."""
    net = seeded(TinyAxial(hw=6, feats=4, classes=3, slice_weights=3), seed=2).eval()
    x = rand(2, 1, 9, 6, 6, seed=7)  # 3 slice groups per volume
    exp = Explainer(net)(x)  # layout and target layer declared by the model
    assert exp.raw["gradcam"].shape == (2, 3, 3, 6, 6)  # [B, K, S, h, w]
    assert exp.certificate.kind == "affine-head"

    acts: dict[str, torch.Tensor] = {}
    h = net.act.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    xi = x.clone()
    try:
        with torch.enable_grad():
            a_leaf = None

            def swap(m, i, o):
                nonlocal a_leaf
                a_leaf = o.detach().requires_grad_(True)
                return a_leaf.clone()

            h2 = net.act.register_forward_hook(swap)
            out = net(xi)
            h2.remove()
    finally:
        h.remove()
    assert a_leaf is not None
    for k in range(3):
        (g,) = torch.autograd.grad(out[:, k].sum(), a_leaf, retain_graph=True)
        g = g.reshape(2, 3, 4, 6, 6)  # [B, S, F, h, w]
        a = a_leaf.detach().reshape(2, 3, 4, 6, 6)
        alpha_volume = g.mean(dim=(1, 3, 4))  # [B, F]: whole volume
        ref = torch.einsum("bf,bsfhw->bshw", alpha_volume, a)
        assert torch.allclose(exp.raw["gradcam"][:, k], ref, atol=1e-5)
        # per-slice averaging (what a per-image tool does) differs once slices get different gradients
        alpha_slice = g.mean(dim=(3, 4))
        per_slice = torch.einsum("bsf,bsfhw->bshw", alpha_slice, a)
        assert (per_slice - ref).norm() > 0.05 * ref.norm()
        hires = (g * a).sum(2)
        assert torch.allclose(exp.raw["hirescam"][:, k], hires, atol=1e-5)
    hm = exp.heatmap("hirescam")
    assert hm.shape == (2, 3, 9, 6, 6)  # upsampled back to the input's slices


# --------------------------------------------------------------------------------------- batching, chunks
@pytest.mark.parametrize("head", HEADS)
def test_batch_equals_each_alone(head):
    net = seeded(ConvFC(nd=3), seed=4)
    x = rand(3, 2, 4, 4, 4, seed=9)
    together = explain(net, x, "act", methods=("hirescam", "gradcam", "gradcampp"), head=head)
    for b in range(3):
        alone = explain(net, x[b : b + 1], "act", methods=("hirescam", "gradcam", "gradcampp"), head=head)
        for m in together.raw:
            assert torch.allclose(together.raw[m][b : b + 1], alone.raw[m], atol=1e-5)


def test_chunking_and_fallback_give_identical_maps(monkeypatch):
    net = seeded(ConvFC(nd=2, classes=7), seed=6)
    x = rand(2, 2, 4, 4, seed=1)
    ref = explain(net, x, "act")
    tiny = explain(net, x, "act", max_chunk_bytes=1)  # one class per chunk
    for m in ref.raw:
        assert torch.allclose(ref.raw[m], tiny.raw[m], atol=1e-6)

    real_grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented for aten::fake_op")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    fallback = explain(net, x, "act")
    for m in ref.raw:
        assert torch.allclose(ref.raw[m], fallback.raw[m], atol=1e-6)


def test_class_selection_by_index_and_label():
    net = seeded(ConvFC(nd=2, classes=4))
    x = rand(1, 2, 4, 4)
    full = Explainer(net, "act", labels=["a", "b", "c", "d"])(x)
    some = Explainer(net, "act", labels=["a", "b", "c", "d"])(x, classes=["c", 0])
    assert some.classes == [2, 0] and some.class_names() == ["c", "a"]
    assert torch.allclose(some.raw["hirescam"][:, 0], full.raw["hirescam"][:, 2])
    assert some.heatmap("hirescam", classes=["a"]).shape == (1, 1, 4, 4)
    with pytest.raises(InputError, match="out of range"):
        explain(net, x, "act", classes=[9])


def test_fx_and_rerun_heads_agree():
    net = seeded(TinyAxial(), seed=3)
    x = rand(1, 1, 6, 6, 6, seed=2)
    a = Explainer(net, head="fx")(x)
    b = Explainer(net, head="rerun")(x)
    assert a.certificate.head == "fx" and b.certificate.head == "rerun"
    for m in a.raw:
        assert torch.allclose(a.raw[m], b.raw[m], atol=1e-6)
    assert torch.allclose(a.scores, b.scores, atol=1e-6)


def test_untraceable_model_falls_back_to_rerun():
    class Branchy(ConvFC):
        def forward(self, x):
            if float(x.mean()) > 100:  # data-dependent Python branch: torch.fx cannot trace it
                x = x * 2
            return super().forward(x)

    net = seeded(Branchy(nd=2))
    exp = explain(net, rand(1, 2, 4, 4), "act")
    assert exp.certificate.head == "rerun" and exp.certificate.kind == "affine-head"
    assert any("fx trace unavailable" in n for n in exp.certificate.notes)
    with pytest.raises(InputError, match="cannot trace"):
        explain(net, rand(1, 2, 4, 4), "act", head="fx")


# --------------------------------------------------------------------------------------- hygiene
def snapshot(model):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()),
        [b.clone() for b in model.buffers()],
    )


def assert_same(model, snap):
    training, req, hooks, bufs = snap
    assert [m.training for m in model.modules()] == training
    assert [p.requires_grad for p in model.parameters()] == req
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules()) == hooks
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), bufs))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("head", HEADS)
def test_model_left_as_found_after_success_and_errors(head):
    net = seeded(TinyAxial(), seed=1)
    net.train()  # BatchNorm in training mode: the explainer must use eval mode and restore train mode
    net.conv.weight.requires_grad_(False)  # a partly frozen model
    snap = snapshot(net)
    x = rand(2, 1, 6, 6, 6)
    Explainer(net, head=head)(x)
    assert_same(net, snap)
    with pytest.raises(InputError):
        Explainer(net, head=head)(x, classes=[99])
    assert_same(net, snap)

    class Boom(RuntimeError):
        pass

    def explode(*a):
        raise Boom()

    net.fc.register_forward_hook(explode)
    snap = snapshot(net)
    with pytest.raises(Boom):
        Explainer(net, head=head)(x)
    assert_same(net, snap)


def test_eval_mode_false_restores_buffers():
    net = seeded(TinyAxial(), seed=1).train()
    snap = snapshot(net)
    Explainer(net, eval_mode=False, head="rerun")(rand(1, 1, 6, 6, 6))
    assert_same(net, snap)


@pytest.mark.parametrize("head", HEADS)
def test_backbone_builds_no_graph_and_no_grad_contexts_work(head):
    seen = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 2, 3, padding=1)
            self.body = ConvFC(nd=2, c_in=2)

        def forward(self, x):
            return self.body(self.stem(x))

    net = seeded(Net())
    net.stem.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad or o.grad_fn is not None))
    x = rand(1, 1, 4, 4).requires_grad_(True)
    ref = explain(net, x, "body.act", head=head)
    assert seen and not any(seen)  # nothing before the explained layer was recorded by autograd
    with torch.no_grad():
        a = explain(net, x, "body.act", head=head)
    with torch.inference_mode():
        b = explain(net, x.detach(), "body.act", head=head)
    for e in (a, b):
        assert torch.allclose(e.raw["hirescam"], ref.raw["hirescam"])
    assert x.grad is None


def test_metatensor_input_keeps_affine():
    monai_data = pytest.importorskip("monai.data")
    net = seeded(ConvFC(nd=3))
    aff = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    x = monai_data.MetaTensor(rand(1, 2, 4, 4, 4), affine=aff)
    exp = explain(net, x, "act")
    assert exp.affine is not None
    assert torch.equal(exp.affine.float(), aff)
    # issue 16: a MetaTensor in gives MetaTensors out (raw maps with their own world affine), same values
    assert isinstance(exp.raw["hirescam"], monai_data.MetaTensor)
    plain = explain(net, x.as_tensor(), "act")
    assert type(plain.raw["hirescam"]) is torch.Tensor
    assert torch.equal(exp.raw["hirescam"].as_tensor(), plain.raw["hirescam"])


def test_bad_arguments_are_input_errors():
    net = seeded(ConvFC(nd=2))
    with pytest.raises(InputError, match="no module named"):
        Explainer(net, "nope")
    # no layer named or declared: target_layer="auto" (issue 16), refused on the first call when no layer keeps space
    with pytest.raises(InputError, match="medcam3d_target_layer"):
        Explainer(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)))(torch.zeros(1, 1, 4, 4))
    with pytest.raises(InputError, match="unknown method"):
        Explainer(net, "act", methods=("magic",))
    with pytest.raises(InputError, match="shape"):
        explain(net, torch.zeros(4, 4), "act")
    with pytest.raises(InputError, match="module is not part"):
        Explainer(net, nn.ReLU())


def test_unknown_layer_name_suggests_close_matches():
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 2, 3, padding=1)
            self.layer4 = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU())
            self.body = ConvFC(nd=2, c_in=2)

        def forward(self, x):
            return self.body(self.layer4(self.stem(x)))

    net = Deep()
    with pytest.raises(InputError, match=r"no module named 'layer_4'.*did you mean 'layer4'") as e:
        Explainer(net, "layer_4")
    assert "'stem'" not in str(e.value)  # only close names, not a listing of the model
    with pytest.raises(InputError, match=r"did you mean 'body\.act'") as e:
        Explainer(net, "body.actt")
    # nothing close: the top-level modules, in the model's order
    with pytest.raises(InputError, match=r"no module named 'zzz' in the model; top-level modules: stem, layer4, body$"):
        Explainer(net, "zzz")


def test_heatmap_defaults_to_input_size_and_normalises_whole_map():
    net = seeded(ConvFC(nd=3, size=4))
    exp = explain(net, rand(1, 2, 4, 4, 4), "act")
    hm = exp.heatmap("hirescam", size=(8, 8, 8))
    assert hm.shape == (1, 5, 8, 8, 8) and float(hm.min()) >= 0 and float(hm.max()) <= 1
    low = exp.heatmap("hirescam", upsample=False)
    assert torch.allclose(low, normalize(exp.raw["hirescam"]))
    assert exp.heatmap("gradcam", dtype=torch.float16).dtype == torch.float16


def test_disagreement_metrics_on_explanation():
    net = seeded(ConvFC(nd=2, classes=3), seed=8)
    exp = explain(net, rand(2, 2, 4, 4), "act")
    d = exp.disagreement()
    assert set(d) == {"l2", "pearson", "top_overlap"}
    assert all(v.shape == (2, 3) for v in d.values())
    same = exp.disagreement("hirescam", "hirescam")
    assert torch.allclose(same["l2"], torch.zeros(2, 3)) and torch.all(same["top_overlap"] == 1)


# --------------------------------------------------------------------------------------- certificate: sketch + secant
class MixedHead(nn.Module):
    """conv -> ReLU (``act``) -> flatten -> [Linear (classes 0-2, affine) | FC-ReLU-FC (classes 3-4, not affine)]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.lin = nn.Linear(3 * 16, 3)
        self.fc1 = nn.Linear(3 * 16, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        a = torch.flatten(self.act(self.conv(x)), 1)
        return torch.cat([self.lin(a), self.fc2(torch.relu(self.fc1(a)))], dim=1)


@pytest.mark.parametrize("jacobian", ["sketch", "per-class"])
def test_certificate_per_class_on_a_mixed_head(jacobian):
    """Affine classes are certified, the non-affine ones are not -- with one Jacobian sketch per probe or per class."""
    exp = explain(seeded(MixedHead(), seed=3), rand(2, 1, 4, 4, seed=1), "act", jacobian=jacobian)
    cert = exp.certificate
    assert cert.per_class == ["affine-head"] * 3 + ["none"] * 2
    assert cert.kind == "none" and cert.jacobian_test == jacobian
    # the evidence is per class either way: the sketch's failure triggers the per-class comparison
    assert float(cert.jacobian_difference[:3].max()) < 1e-5
    assert float(cert.jacobian_difference[3:].min()) > 1e-2
    assert float(cert.probe_residual[:3].max()) < 1e-5
    assert float(cert.probe_residual[3:].min()) > 1e-3
    if jacobian == "sketch":
        assert any("Jacobians compared per class" in n for n in cert.notes)


@pytest.mark.parametrize("jacobian", ["sketch", "per-class"])
def test_certificate_modes_agree_on_affine_heads(jacobian):
    for net, x, kind in [
        (seeded(ConvFC(nd=3, size=4)), rand(2, 2, 4, 4, 4), "affine-head"),
        (seeded(ConvGAP(nd=2)), rand(2, 1, 5, 5), "cam"),
        (seeded(TinyAxial(hw=6, feats=4, classes=3, slice_weights=3), seed=2), rand(2, 1, 9, 6, 6), "affine-head"),
    ]:
        kw: dict[str, Any] = {} if isinstance(net, TinyAxial) else {"target_layer": "act"}
        cert = Explainer(net, jacobian=jacobian, **kw)(x).certificate
        assert cert.kind == kind, (type(net).__name__, cert.kind)
        assert float(cert.jacobian_difference.max()) < 1e-5
        assert float(cert.probe_residual.max()) < 1e-5
        assert not cert.notes


def test_secant_residual_hand_computed():
    """s(P) = Σ P² is not affine: with the gradient 2A taken at A, the secant residual at P is
    |s(P) − s(0) − Σ 2A⊙P| = |Σ P² − 2 A·P| relative to |s(P)| + |s(0)| + Σ|2A⊙P|."""
    a = torch.tensor([[[1.0, 2.0]]])  # [B=1, F=1, S=2]
    p = torch.tensor([[[3.0, -1.0]]])
    g = (2 * a).unsqueeze(1)  # [B, K=1, F, S]
    sp = (p**2).sum().reshape(1, 1)  # 10
    r = secant_residual(g, [p], [sp], torch.zeros(1, 1))
    # Σ 2A⊙P = 2*3 + 4*(-1) = 2; residual |10 - 0 - 2| = 8; scale 10 + 0 + (6 + 4) = 20
    assert r.tolist() == [pytest.approx(0.4)]
    # an affine s(P) = 2A·P + 1 (the same Jacobian everywhere) has zero residual
    lin = ((2 * a) * p).sum().reshape(1, 1) + 1.0
    assert secant_residual(g, [p], [lin], torch.ones(1, 1)).tolist() == [0.0]


def test_jacobian_option_is_checked():
    with pytest.raises(InputError, match="jacobian must be"):
        Explainer(seeded(ConvFC(nd=2)), "act", jacobian="fast")


def test_certificate_reductions_match_their_definitions():
    """The one-pass forms used for speed equal the textbook formulas."""
    g = rand(2, 3, 4, 5, 6, seed=11)  # [B, K, F, *S]
    a = rand(2, 4, 5, 6, seed=12)
    signed, magnitude = contribution_sums(a, g)
    prod = g.double() * a.double().unsqueeze(1)
    assert torch.allclose(signed, prod.flatten(2).sum(2), rtol=0, atol=1e-12)
    assert torch.allclose(magnitude, prod.abs().flatten(2).sum(2), rtol=1e-6)
    variation, gmax = gradient_stats(g)
    dev = (g - g.mean(dim=(3, 4), keepdim=True)).abs().transpose(0, 1).flatten(1).amax(1)
    scale = g.abs().transpose(0, 1).flatten(1).amax(1)
    assert torch.allclose(gmax, scale) and torch.allclose(variation, dev / scale)
    assert torch.equal(spatial_variation(g), variation)
    const = torch.ones(1, 2, 3, 4, 4)  # constant over space: GAP + FC gradients
    assert spatial_variation(const).tolist() == [0.0, 0.0]
