"""``target_layer="auto"``: which layer to explain when the caller names none and the model declares none.

The rule (chosen once, on the first input, because it needs the input's shapes):

1. **Candidates.** One forward pass (no graph) with a hook on every module records, in the order modules finish,
   which outputs still have the input's number of spatial axes (after the layout adaptor, :mod:`medcam3d.layouts`)
   with none reduced to one cell -- i.e. the layers before the head reduces space. Excluded: modules that run more than
   once, containers whose output is their last child's (the child is named), and the module whose output *is* the
   model output. For a segmentation net (a dense output ``[B, C, *spatial]`` with the input's spatial axes) the
   *output convolution* is the last convolution (or transposed convolution) that turns an input of another shape
   into the output's shape -- a 1×1×1 convolution, or a UNet's last up-convolution with whatever follows it at the
   output's shape (MONAI's residual unit); only modules that finish before it are candidates, so the layer feeding
   the output convolution is the deepest. The last :data:`MAX_CANDIDATES` remain.
2. **One head evaluation per candidate.** The model is re-run once on the input repeated three times, with the
   candidate's output replaced by ``[A; P; 0]`` (the real activations ``A``, a random probe point ``P`` far away,
   zero). One backward pass of a random combination ``v·s`` of the scores at ``A`` and at ``P`` gives the
   Jacobians ``J(A)``, ``J(P)``. The head is *affine* when ``J(A) = J(P)``, ``v·s(P) − v·s(0) = J(A)·P`` and
   ``v·s(A) − v·s(0) = J(A)·A`` (1000 float epsilons, the certificate's tolerance); *cam* when, in addition,
   ``J(A)`` is constant over space (:mod:`medcam3d.certificate`).
3. **Choice.** The strongest kind wins (``cam`` > ``affine-head`` > ``none``); among equals, the deepest layer.
   Candidates are tried deepest first and the search stops at the first ``cam`` head.
   The full certificate of the chosen layer is then computed by the explanation itself, as for any layer.

Pure torch (layer 2): no MONAI import.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .certificate import default_tolerance, gradient_stats, jacobian_sketch_difference, probe_points
from .errors import InputError
from .layouts import Layout

__all__ = ["MAX_CANDIDATES", "LayerChoice", "choose_layer", "head_kind", "spatial_candidates"]

#: How many of the last spatial layers are tried.
MAX_CANDIDATES = 3
_RANK = {"cam": 2, "affine-head": 1, "none": 0}


@dataclass(frozen=True)
class LayerChoice:
    """The explained layer and why: ``name`` (dotted module name), ``reason`` (one line), and for an automatic
    choice the candidates tried with the head kind each was found to have, shallowest first."""

    name: str
    reason: str
    candidates: tuple[tuple[str, str], ...] = ()


@dataclass
class _Seen:
    """What one module's (first) call returned."""

    order: int
    calls: int
    shape: tuple[int, ...] | None  # of a tensor output, else None
    spatial: bool
    conv_in: tuple[int, ...] | None = None  # a convolution's input shape
    ref: weakref.ref[Tensor] | None = None  # the output tensor, while it lives
    version: int = 0  # its version counter then (tells a tensor changed in place later from the same tensor)
    passes_on: tuple[str, ...] = ()  # descendants whose output this module returns unchanged

    def returned(self, out: Any) -> bool:
        """True when ``out`` is this module's output, unchanged since (same live tensor, same version)."""
        live = self.ref() if self.ref is not None else None
        return live is not None and live is out and live._version == self.version


def _conv_input(module: nn.Module, inputs: Any) -> tuple[int, ...] | None:
    """The input shape of a convolution or transposed convolution module, else None."""
    if isinstance(module, nn.modules.conv._ConvNd) and inputs and isinstance(inputs[0], Tensor):
        return tuple(inputs[0].shape)
    return None


def _output_convolution(seen: dict[str, _Seen], output: Any, size: tuple[int, ...]) -> int | None:
    """Finish order of a segmentation net's output convolution (module docstring), None for other outputs."""
    if not isinstance(output, Tensor) or output.ndim != len(size) + 2:
        return None
    if any(m == 1 < n for m, n in zip(output.shape[2:], size)):
        return None
    shape = tuple(output.shape)
    convs = [s.order for s in seen.values() if s.conv_in is not None and s.shape == shape and s.conv_in != shape]
    return max(convs) if convs else None


def _record(order: int, name: str, module: nn.Module, inputs: Any, out: Any, seen: dict[str, _Seen],
            spatial: bool) -> _Seen:
    """What a module's call returned. Tensors are compared by identity while they live (a freed tensor's memory
    can be reused by a later one, so addresses are not compared)."""
    if not isinstance(out, Tensor):
        return _Seen(order, 1, None, spatial, _conv_input(module, inputs))
    same = tuple(o for o, s in seen.items() if o.startswith(name + ".") and s.returned(out))
    return _Seen(order, 1, tuple(out.shape), spatial, _conv_input(module, inputs), weakref.ref(out), out._version,
                 same)


def _is_spatial(out: Any, layout: Layout, batch: int, size: tuple[int, ...]) -> bool:
    """True when ``out`` (hooked layout) is ``[B, F, *S]`` with the input's number of spatial axes, none of them
    reduced to one cell where the input (spatial ``size``) has more."""
    if not isinstance(out, Tensor) or not torch.is_floating_point(out):
        return False
    try:
        vol = layout.to_volume(out, batch)
    except Exception:  # noqa: BLE001 - any shape the layout cannot read is not a candidate
        return False
    return vol.ndim == len(size) + 2 and all(m > 1 or n == 1 for m, n in zip(vol.shape[2:], size))


def spatial_candidates(
    model: nn.Module, x: Tensor, layout: Layout, forward_kwargs: Mapping[str, Any] | None = None
) -> list[str]:
    """The last :data:`MAX_CANDIDATES` modules (in the order they finish) whose output keeps the input's spatial
    axes (see the module docstring). ``x``: ``[B, C, *spatial]``. Runs the model once without a graph."""
    return _candidates(model, x, layout, forward_kwargs)[0]


def _candidates(
    model: nn.Module, x: Tensor, layout: Layout, forward_kwargs: Mapping[str, Any] | None = None
) -> tuple[list[str], Any]:
    """:func:`spatial_candidates` and the model output of its forward pass."""
    seen: dict[str, _Seen] = {}
    batch, size = x.shape[0], tuple(x.shape[2:])

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in seen:
                seen[name].calls += 1
            else:
                seen[name] = _record(len(seen), name, module, inputs, output, seen,
                                     _is_spatial(output, layout, batch, size))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            output = model(x, **(forward_kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    names = sorted(seen, key=lambda n: seen[n].order)
    eligible = [n for n in names if seen[n].spatial and seen[n].calls == 1 and not seen[n].returned(output)]
    stage = _output_convolution(seen, output, size)
    if stage is not None:  # a segmentation net: the layers before its output convolution
        eligible = [n for n in eligible if seen[n].order < stage]
    # a container passing on an eligible child's output: the child is named
    keep = [n for n in eligible if not any(o in eligible for o in seen[n].passes_on)]
    return keep[-MAX_CANDIDATES:], output


def _repeat(value: Any, batch: int, times: int) -> Any:
    """A forward keyword argument for the input repeated ``times`` times (tensors with a batch axis repeated)."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return torch.cat([value] * times)
    return value


def head_kind(
    model: nn.Module,
    name: str,
    x: Tensor,
    layout: Layout,
    output: Callable[[Any], Tensor],
    forward_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> str:
    """``"cam"``, ``"affine-head"`` or ``"none"`` for the head after module ``name``, from one re-run of the model
    on ``x`` (``[B, C, *spatial]``) repeated three times and one backward pass (module docstring, step 2)."""
    layer = model.get_submodule(name)
    batch = x.shape[0]
    state: dict[str, Tensor] = {}

    def replace(module: nn.Module, inputs: Any, out: Tensor) -> Tensor:
        n = out.shape[0] // 3
        real = out[:n].detach()
        probe = probe_points(real, 1, seed)[0].detach()
        leaf = torch.cat([real, probe, torch.zeros_like(real)]).requires_grad_(True)
        state["leaf"] = leaf
        return leaf.clone()

    handle = layer.register_forward_hook(replace)
    try:
        kwargs = {k: _repeat(v, batch, 3) for k, v in (forward_kwargs or {}).items()}
        scores = output(model(torch.cat([x, x, x]), **kwargs))
    finally:
        handle.remove()
    leaf = state["leaf"]
    if scores.ndim == 1:
        scores = scores.unsqueeze(1)
    gen = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(scores.shape[0] // 3, scores.shape[1], generator=gen).to(scores.device, scores.dtype)
    weights = torch.cat([v, v, torch.zeros_like(v)])
    if not scores.requires_grad:
        return "none"
    (g,) = torch.autograd.grad(scores, leaf, grad_outputs=weights, allow_unused=True)
    if g is None:
        return "none"
    sv = (scores.detach().double() * torch.cat([v, v, v]).double()).sum(1)  # v·s at A, P and 0: [3B]
    return _decide(layout, batch, leaf.detach(), g, sv)


def _decide(layout: Layout, batch: int, leaf: Tensor, grad: Tensor, sv: Tensor) -> str:
    """The kind from ``leaf`` ``[3N, ...]`` = ``[A; P; 0]``, its gradient and ``v·s`` ``[3B]`` at the three
    points."""
    n = leaf.shape[0] // 3
    a, p = layout.to_volume(leaf[:n], batch), layout.to_volume(leaf[n : 2 * n], batch)
    ga, gp = layout.to_volume(grad[:n], batch), layout.to_volume(grad[n : 2 * n], batch)
    s_0 = sv[2 * batch :]
    s_a, s_p = sv[:batch] - s_0, sv[batch : 2 * batch] - s_0
    tol = default_tolerance(leaf.dtype)
    jac = float(jacobian_sketch_difference(ga, gp))
    return _secant_kind(a, p, ga, s_a, s_p, tol, jac)


def _secant_kind(a: Tensor, p: Tensor, ga: Tensor, s_a: Tensor, s_p: Tensor, tol: float, jac: float) -> str:
    """Decide from the secant tests at ``A`` and ``P`` (``s_a``, ``s_p`` are ``v·s − v·s(0)`` per sample)."""
    lin_a = (ga.double() * a.double()).flatten(1).sum(1)
    lin_p = (ga.double() * p.double()).flatten(1).sum(1)
    mag_a = (ga.double() * a.double()).abs().flatten(1).sum(1)
    mag_p = (ga.double() * p.double()).abs().flatten(1).sum(1)
    res_a = ((s_a - lin_a).abs() / (s_a.abs() + mag_a).clamp_min(1e-300)).max()  # relative secant residuals
    res_p = ((s_p - lin_p).abs() / (s_p.abs() + mag_p).clamp_min(1e-300)).max()
    if not (jac <= tol and float(res_a) <= tol and float(res_p) <= tol):
        return "none"
    spatial, _ = gradient_stats(ga.unsqueeze(1))
    return "cam" if float(spatial[0]) <= tol else "affine-head"


def choose_layer(
    model: nn.Module,
    x: Tensor,
    layout: Layout,
    output: Callable[[Any], Tensor] | None,
    forward_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    *,
    bind: Callable[[Any], Callable[[Any], Tensor]] | None = None,
) -> LayerChoice:
    """The automatic choice for input ``x`` ``[B, C, *spatial]`` (module docstring). The model should be in eval
    mode with frozen parameters (the explainer's call sets that up).

    Args:
        output: reads the scores ``[3B, M]`` from the model output on the input repeated 3 times.
        bind: instead of ``output``, makes the reader from the model output on ``x`` (the candidates' forward
            pass): targets whose regions are fixed on the real output (:mod:`medcam3d.targets`).

    Raises:
        InputError: no module keeps the input's spatial axes (name the layer to explain).
    """
    names, real = _candidates(model, x, layout, forward_kwargs)
    if bind is not None:
        output = bind(real)
    if output is None:
        raise ValueError("choose_layer: give output or bind")
    if not names:
        raise InputError(
            "target_layer='auto': no layer of the model keeps the input's spatial axes; name the layer to explain "
            "(target_layer=..., or declare medcam3d_target_layer on the model)"
        )
    kinds: list[tuple[str, str]] = []
    for n in reversed(names):  # deepest first; a cam head cannot be beaten, so the search stops there
        kinds.insert(0, (n, head_kind(model, n, x, layout, output, forward_kwargs, seed)))
        if kinds[0][1] == "cam":
            break
    best = max(range(len(kinds)), key=lambda i: (_RANK[kinds[i][1]], i))
    name, kind = kinds[best]
    tried = ", ".join(f"{n} ({k})" for n, k in kinds)
    reason = f"auto: the deepest of the last spatial layers with the strongest head ({kind}); tried {tried}"
    return LayerChoice(name, reason, tuple(kinds))
