"""The Explainer: head-only, all-class, batched gradients at the explained layer.

How one call works (``explainer(x)``):

1. **Backbone, no graph.** The model runs up to the explained layer without building an autograd graph
   (parameters are frozen for the call and the input is detached). Its output ``A`` becomes a fresh leaf.
2. **Head only.** Only the part after the explained layer (the *head*) is differentiated. When the model can be
   traced with ``torch.fx`` (the explained layer kept as one node) the head is a separate graph that can be
   evaluated at any activations without re-running the backbone (``head="fx"``). Otherwise the model is re-run
   with the explained layer's output replaced (``head="rerun"``, correct but slower).
3. **All classes at once.** ``∂s_k/∂A`` for the K classes comes from one batched backward
   (``torch.autograd.grad(..., is_grads_batched=True)``), chunked over classes to bound memory, with a
   class-by-class fallback for heads whose ops have no batching rule. Sample b's gradient is taken of its own
   score only, so samples never mix (the model runs in eval mode). The scores are those of the *targets*
   (:mod:`medcam3d.targets`: the classes by default, or regions of a segmentation), bound once on the real output
   and read through the same bound targets everywhere below. Region targets on a pointwise head (e.g. a 1×1×1
   output convolution after the explained layer) share one backward pass per class: their regions are disjoint,
   so each target's gradient is the class's gradient restricted to its region. The head is then evaluated,
   differentiated and probed at the regions' voxels only (:mod:`medcam3d.regions`), its scores there checked
   against the real ones.
4. **Methods** (:mod:`medcam3d.methods`) turn ``(A, ∂s/∂A)`` into signed raw maps, after a layout adaptor
   (:mod:`medcam3d.layouts`) has mapped both onto ``[B, F, *spatial]``.
5. **Placement** (:mod:`medcam3d.placement`): where the explained cells sit on the input -- declared by the
   model, derived from the fx trace of the layers before the explained one, or the field convention as a
   fallback (``map_geometry="auto"``); cached per model, layer and input size.
6. **Certificate** (:mod:`medcam3d.certificate`): a :class:`~medcam3d.certificate.Prober` is fed the same gradient
   chunks. The head's Jacobian at the real activations is compared with the Jacobian at random probe points far
   away (by default along one random class-scaled combination of the K classes, one backward pass per probe; class
   by class when that differs), every class gets a secant test ``s(P) − s(0) = Σ ∂s/∂A|_A ⊙ P`` at each probe
   point, and ``s(A) − s(0) = Σ ∂s/∂A ⊙ A`` is checked.

The model is left as found: training flags, ``requires_grad`` flags and buffers restored, hooks removed (also
when an exception is raised), and no parameter ``.grad`` is ever written.
"""

from __future__ import annotations

import difflib
import operator
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812 - the usual name

from .autolayer import LayerChoice, choose_layer
from .certificate import Certificate, Prober, default_tolerance, probe_points
from .errors import InputError
from .explanation import Explanation
from .geometry import GEOMETRIES
from .layouts import Layout, resolve_layout

# DEFAULT_METHODS lives in methods; importing it from explainer keeps working for one release
from .methods import DEFAULT_METHODS, get_method
from .placement import Placement, choose_placement, find_receptive
from .regions import REGION_METHODS, ClassGradient, RegionHead

# select_scores lives in targets; importing it from explainer keeps working for one release
from .targets import BoundTargets, Classes, RegionScores, Targets, as_targets, select_scores

if TYPE_CHECKING:  # annotations only (Python 3.10 has no typing.Self)
    from typing_extensions import Self

__all__ = ["Explainer", "explain", "select_scores"]


# ------------------------------------------------------------------------------------------------------------
# Model state: freeze for the call, restore afterwards
# ------------------------------------------------------------------------------------------------------------


class _ModelState:
    """Saves and restores training flags, requires_grad flags and (optionally) buffers of a model."""

    def __init__(self, model: nn.Module, save_buffers: bool) -> None:
        self.model = model
        self.training = [(m, m.training) for m in model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()] if save_buffers else []

    def freeze(self, eval_mode: bool) -> None:
        if eval_mode:
            self.model.eval()
        for p, _ in self.requires_grad:
            p.requires_grad_(False)

    def restore(self) -> None:
        for m, flag in self.training:
            m.training = flag
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)


# ------------------------------------------------------------------------------------------------------------
# Two ways to run "the head": an fx graph split, or a re-run with the layer output replaced
# ------------------------------------------------------------------------------------------------------------


class _Head:
    """Runs the model once (backbone without graph) and then evaluates the head at any activations."""

    kind = "abstract"
    pointwise = False  # True when each output voxel depends on the same voxel of the explained layer only

    def forward(self, x: Tensor, kwargs: Mapping[str, Any]) -> tuple[Tensor, Any]:
        """Run the model on ``x`` (``kwargs``: the forward's other keyword arguments). Returns the explained
        layer's output as a leaf that requires grad (hooked layout ``[N, ...]``) and the model output, whose graph
        starts at that leaf."""
        raise NotImplementedError  # pragma: no cover - interface

    def __call__(self, activations: Tensor) -> Any:
        """Model output with the explained layer's output replaced by ``activations`` (graph from it only)."""
        raise NotImplementedError  # pragma: no cover - interface

    def close(self) -> None:
        """Drop references to tensors of the last call."""


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps the explained module as a single call_module node."""

    def __init__(self, leaf: nn.Module) -> None:
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is self._leaf or super().is_leaf_module(m, module_qualified_name)


_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_POINTWISE_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub, torch.mul,
    torch.div, torch.neg, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.clamp, F.relu, F.leaky_relu, F.gelu,
    F.silu, F.elu, F.dropout, F.sigmoid, F.tanh,
}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "exp", "float", "double", "half", "to", "contiguous", "clone", "add",
                      "sub", "mul", "div", "neg", "clamp"}
_CHANNEL_FUNCTIONS: set[Any] = {torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, torch.cat}


def _channel_dim(node: torch.fx.Node) -> bool:
    """True when a softmax / concatenation node works along axis 1 (the channels)."""
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return isinstance(dim, int) and dim == 1


def _pointwise_module(m: nn.Module) -> bool:
    if isinstance(m, _POINTWISE_MODULES):
        return True
    if isinstance(m, nn.modules.batchnorm._BatchNorm):  # running statistics only
        return bool(not m.training and m.track_running_stats)
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        return m.dim == 1
    if isinstance(m, nn.modules.conv._ConvNd):
        padding = m.padding if isinstance(m.padding, tuple) else (0,) if m.padding == "valid" else (1,)
        return (all(k == 1 for k in m.kernel_size) and all(st == 1 for st in m.stride)
                and all(p == 0 for p in padding) and all(p == 0 for p in m.output_padding))
    return False


def _pointwise_index(index: Any) -> bool:
    """An index that selects along the batch and channel axes only (never a spatial one)."""
    if isinstance(index, int):
        return True
    return (isinstance(index, tuple) and Ellipsis not in index
            and all(i == slice(None) for i in index[2:]))


def _pointwise_node(node: torch.fx.Node, root: nn.Module) -> bool:
    """True when the node's output at a voxel depends on its tensor inputs at that voxel only (an allowlist)."""
    if node.op in ("output", "get_attr", "placeholder"):
        return True
    if node.op == "call_module":
        return _pointwise_module(root.get_submodule(str(node.target)))
    if node.op == "call_function":
        if node.target is operator.getitem:
            return _pointwise_index(node.args[1])
        if node.target in _CHANNEL_FUNCTIONS:
            return _channel_dim(node)
        return node.target in _POINTWISE_FUNCTIONS
    if node.op == "call_method":
        if node.target in ("softmax", "log_softmax"):
            return _channel_dim(node)
        return node.target in _POINTWISE_METHODS
    return False


def _inplace(node: torch.fx.Node, root: nn.Module) -> bool:
    """True when a node may write into its input (an ``inplace`` flag, an in-place method or operator)."""
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace", False)) or name.startswith("i") and hasattr(operator, name)
    return False


def _at_voxels(t: Tensor, positions: Tensor) -> Tensor:
    """``t [B, C, *S]`` at the voxels ``positions`` (``[n]`` flat indices of ``S``) as ``[B, C, 1, ..., n]``: the
    grid's rank kept, so that convolutions take it, and the voxels on the last axis, where PyTorch's CPU convolution
    kernels are fast (on ``[B, C, n, 1, 1]`` a 1×1×1 convolution's backward is about 40× slower)."""
    cut = t.flatten(2).index_select(2, positions.to(t.device))
    return cut.view(*t.shape[:2], *([1] * (t.ndim - 3)), cut.shape[2])


class _FxHead(_Head):
    """Head evaluation on a torch.fx trace split at the explained layer's node."""

    kind = "fx"

    def __init__(self, model: nn.Module, layer: nn.Module, layer_name: str) -> None:
        tracer = _LeafTracer(layer)
        graph = tracer.trace(model)
        self.gm = torch.fx.GraphModule(tracer.root, graph)
        targets = [n for n in graph.nodes if n.op == "call_module" and n.target == layer_name]
        if len(targets) != 1:
            raise RuntimeError(f"the explained layer appears {len(targets)} times in the traced graph")
        self.target = targets[0]
        nodes = list(graph.nodes)
        downstream: set[torch.fx.Node] = set()
        frontier = [self.target]
        while frontier:
            for user in frontier.pop().users:
                if user not in downstream:
                    downstream.add(user)
                    frontier.append(user)
        self.head_nodes = [n for n in nodes if n in downstream]
        self.backbone_nodes = [n for n in nodes if n not in downstream]
        if not any(n.op == "output" for n in self.head_nodes):
            raise RuntimeError("the model output does not depend on the explained layer")
        # values the head needs from the backbone; everything else is freed as soon as it is used
        self.keep = {i for n in self.head_nodes for i in n.all_input_nodes if i not in downstream}
        self.keep.add(self.target)
        last_use: dict[torch.fx.Node, int] = {}
        for pos, n in enumerate(self.backbone_nodes):
            for i in n.all_input_nodes:
                last_use[i] = pos
        self.free_after: dict[int, list[torch.fx.Node]] = {}
        for n, pos in last_use.items():
            if n not in self.keep:
                self.free_after.setdefault(pos, []).append(n)
        self.env: dict[torch.fx.Node, Any] = {}
        # each output voxel computed from the same voxel of the explained layer (e.g. a 1x1x1 output convolution)
        self.pointwise = all(_pointwise_node(n, self.gm) for n in self.head_nodes)
        # a pointwise head without in-place ops never writes into its inputs: no defensive copies needed
        self.copies = not (self.pointwise and not any(_inplace(n, self.gm) for n in self.head_nodes))

    def accepts(self, kwargs: Mapping[str, Any]) -> bool:
        """True when every forward keyword argument is a placeholder of the trace (else re-run the model)."""
        names = {n.target for n in self.gm.graph.nodes if n.op == "placeholder"}
        return set(kwargs) <= names

    def _args(self, x: Tensor, kwargs: Mapping[str, Any]) -> list[Any]:
        """Values of the trace's placeholders, in order: ``x``, then each keyword argument or its default."""
        args: list[Any] = [x]
        for n in [n for n in self.gm.graph.nodes if n.op == "placeholder"][1:]:
            if n.target in kwargs:
                args.append(kwargs[str(n.target)])
            elif n.args:
                args.append(n.args[0])
            else:
                raise InputError(f"the model's forward needs the argument {n.target!r}; pass it to the call")
        return args

    def forward(self, x: Tensor, kwargs: Mapping[str, Any]) -> tuple[Tensor, Any]:
        interp = torch.fx.Interpreter(self.gm, garbage_collect_values=False)
        env: dict[torch.fx.Node, Any] = {}
        interp.env = env
        interp.args_iter = iter(self._args(x, kwargs))
        with torch.no_grad():
            for pos, n in enumerate(self.backbone_nodes):
                env[n] = interp.run_node(n)
                for dead in self.free_after.get(pos, ()):
                    env.pop(dead, None)
        self.env = {n: env[n] for n in self.keep}
        activations = self.env[self.target]
        if not isinstance(activations, Tensor):
            raise InputError(f"the explained layer returns {type(activations).__name__}, not a tensor")
        leaf = activations.detach().requires_grad_(True)
        return leaf, self(leaf)

    def __call__(self, activations: Tensor) -> Any:
        return self._run(self.env, activations)

    def _run(self, values: Mapping[torch.fx.Node, Any], activations: Tensor) -> Any:
        """The head's output from the backbone ``values`` it needs and the explained layer's ``activations``."""
        interp = torch.fx.Interpreter(self.gm, garbage_collect_values=False)
        # clones, so that in-place ops in the head (ReLU(inplace=True), +=) never touch the leaf or the cache
        env = {n: v.clone() if isinstance(v, Tensor) and self.copies else v for n, v in values.items()}
        env[self.target] = activations.clone() if self.copies else activations
        interp.env = env
        out = None
        for n in self.head_nodes:
            env[n] = interp.run_node(n)
            if n.op == "output":
                out = env[n]
        return out

    def on_voxels(self, positions: Tensor, grid: tuple[int, ...]) -> Callable[[Tensor], Any] | None:
        """A pointwise head evaluated at some voxels of the explained grid only: a callable taking the explained
        activations there, ``[B, F, 1, ..., n]`` (:func:`_at_voxels`), and returning the model output there,
        ``[B, M, 1, ..., n]``. ``positions``: ``[n]`` flat indices into ``grid``.

        Each backbone value the head reads is cut to the same voxels when it lies on the grid, kept when it is
        constant over space (a 0-d tensor, or size 1 on every spatial axis); for any other value (a tensor on
        another grid, a container of tensors) the voxels cannot be cut out and None is returned."""
        if not self.pointwise:
            return None
        d = len(grid)
        values: dict[torch.fx.Node, Any] = {}
        for node, v in self.env.items():
            if node is self.target:
                continue
            if isinstance(v, Tensor):
                if v.ndim == d + 2 and tuple(v.shape[2:]) == grid:
                    v = _at_voxels(v, positions)
                elif not all(n == 1 for n in v.shape[-d:]):
                    return None
            elif isinstance(v, (list, tuple, dict)):
                return None
            values[node] = v
        return lambda activations: self._run(values, activations)

    def close(self) -> None:
        self.env = {}


class _RerunHead(_Head):
    """Head evaluation by re-running the whole model with a forward hook replacing the layer's output."""

    kind = "rerun"

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        self.model = model
        self.layer = layer
        self.x: Tensor | None = None
        self.kwargs: Mapping[str, Any] = {}
        self._replacement: Tensor | None = None
        self._captured: Tensor | None = None
        self._calls = 0

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        self._calls += 1
        if self._calls > 1:
            raise InputError("the explained layer runs more than once per forward pass; explain a layer that runs once")
        if not isinstance(output, Tensor):
            raise InputError(f"the explained layer returns {type(output).__name__}, not a tensor")
        if self._replacement is None:  # first pass: the real activations become the leaf
            self._captured = output.detach().requires_grad_(True)
            return self._captured.clone()
        return self._replacement.clone()

    def _run(self, x: Tensor, replacement: Tensor | None) -> Any:
        self._calls = 0
        self._replacement = replacement
        handle = self.layer.register_forward_hook(self._hook)
        try:
            out = self.model(x, **self.kwargs)
        finally:
            handle.remove()
            self._replacement = None
        if self._calls == 0:
            raise InputError("the explained layer did not run during the forward pass")
        return out

    def forward(self, x: Tensor, kwargs: Mapping[str, Any]) -> tuple[Tensor, Any]:
        # parameters are frozen and x is detached, so the backbone builds no graph even with grad enabled
        self.x = x
        self.kwargs = kwargs
        out = self._run(x, None)
        assert self._captured is not None
        return self._captured, out

    def __call__(self, activations: Tensor) -> Any:
        assert self.x is not None
        return self._run(self.x, activations)

    def close(self) -> None:
        self.x = None
        self.kwargs = {}
        self._captured = None


# ------------------------------------------------------------------------------------------------------------
# Batched gradients
# ------------------------------------------------------------------------------------------------------------


def _class_gradients(scores: Tensor, leaf: Tensor, classes: Sequence[int]) -> Tensor:
    """``∂ scores[b, c] / ∂ leaf[b]`` for each class c, all samples together.

    Args:
        scores: ``[B, M]`` (graph from ``leaf``).
        leaf: ``[N, ...]`` the explained layer's output (requires grad).
        classes: k class indices.
    Returns: ``[k, N, ...]``; zeros where a score does not depend on ``leaf``.
    """
    k = len(classes)
    if not scores.requires_grad:
        return torch.zeros((k, *leaf.shape), dtype=leaf.dtype, device=leaf.device)
    v = torch.zeros((k, *scores.shape), dtype=scores.dtype, device=scores.device)
    v[torch.arange(k), :, torch.as_tensor(list(classes))] = 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # vmap's "performance drop" fallback notice
            (g,) = torch.autograd.grad(
                scores, leaf, grad_outputs=v, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
    except RuntimeError:
        # some ops have no batching rule: one backward per class, same numbers
        grads = []
        for i in range(k):
            (gi,) = torch.autograd.grad(scores, leaf, grad_outputs=v[i], retain_graph=True, allow_unused=True)
            grads.append(torch.zeros_like(leaf) if gi is None else gi)
        return torch.stack(grads)
    return torch.zeros((k, *leaf.shape), dtype=leaf.dtype, device=leaf.device) if g is None else g


def _sketch_gradient(scores: Tensor, leaf: Tensor, v: Tensor) -> Tensor:
    """``∂ Σ_c v[b, c] scores[b, c] / ∂ leaf`` (one backward; samples never mix). Args: ``scores`` ``[B, M]``,
    ``leaf`` ``[N, ...]``, ``v`` ``[B, M]``. Returns: ``[N, ...]`` (zeros where nothing depends on ``leaf``)."""
    if not scores.requires_grad:
        return torch.zeros_like(leaf)
    (g,) = torch.autograd.grad(scores, leaf, grad_outputs=v, retain_graph=True, allow_unused=True)
    return torch.zeros_like(leaf) if g is None else g


def _to_volume(layout: Layout, per_class: Tensor, batch: int) -> Tensor:
    """``[k, N, ...]`` hooked-layout gradients -> ``[B, k, F, *S]`` (a view, no copy, when the layout is already
    the volume layout)."""
    volumes = [layout.to_volume(g, batch) for g in per_class]
    if all(v is g for v, g in zip(volumes, per_class)):
        return per_class.transpose(0, 1)
    return torch.stack(volumes, dim=1)


class _HeadGradients:
    """The head's class scores differentiated at the real activations and at the probe points, in volume layout
    (implements :class:`medcam3d.certificate.ProbedHead`).

    Args:
        layout: maps hooked tensors ``[N, ...]`` to ``[B, F, *S]``.
        batch: B.
        leaf: the real activations (hooked layout, requires grad); ``scores`` ``[B, M]`` has its graph from it.
        probes: probe activations (hooked layout, leaves); ``probe_scores`` ``[B, M]`` each, graphs from them.
    """

    def __init__(self, layout: Layout, batch: int, leaf: Tensor, scores: Tensor, probes: list[Tensor],
                 probe_scores: list[Tensor]) -> None:
        self.layout = layout
        self.batch = batch
        self.leaf = leaf
        self.scores = scores
        self.probes = probes
        self.points = [layout.to_volume(p.detach(), batch) for p in probes]
        self.point_scores = probe_scores

    def gradients(self, classes: Sequence[int], probe: int | None = None) -> Tensor:
        """``[B, k, F, *S]`` gradients of the ``classes`` scores at the real activations or at probe ``probe``."""
        scores, leaf = (self.scores, self.leaf) if probe is None else (self.point_scores[probe], self.probes[probe])
        per_class = _class_gradients(scores, leaf, classes)
        out = _to_volume(self.layout, per_class, self.batch)
        return out.detach() if probe is None else out

    def combined_gradient(self, weights: Tensor, probe: int) -> Tensor:
        """``[B, F, *S]`` gradient of ``Σ_c weights[b, c] s_c`` (``weights`` ``[B, M]``) at probe ``probe``."""
        g = _sketch_gradient(self.point_scores[probe], self.probes[probe], weights)
        return _to_volume(self.layout, g.unsqueeze(0), self.batch)[:, 0]


# ------------------------------------------------------------------------------------------------------------
# The Explainer
# ------------------------------------------------------------------------------------------------------------


class Explainer:
    """Explain a model's raw class scores at one layer with HiResCAM, Grad-CAM, CAM and relatives.

    Args:
        model: any ``nn.Module`` returning raw class scores ``[B, M]``, or dense scores for ``targets`` to read.
        target_layer: dotted module name (``"layer4"``, ``"conv2d.7"``) or the module itself; default the
            model's ``medcam3d_target_layer`` attribute, else ``"auto"``: chosen on the first call among the last
            few layers that keep the input's spatial axes, preferring the strongest head certificate (see
            :mod:`medcam3d.autolayer`; the choice and why are on :attr:`layer_choice` and every explanation).
        methods: method names from :data:`medcam3d.methods.METHODS`.
        layout: maps the layer output to ``[B, F, *spatial]``; default the model's ``medcam3d_layout`` or
            channels-first. Use :class:`medcam3d.layouts.SlicesAsBatch` when slices ride in the batch axis.
        labels: names of the M outputs; default the model's ``medcam3d_labels``.
        targets: what is explained (:mod:`medcam3d.targets`): :class:`~medcam3d.targets.Classes` (default, the
            M class scores), :class:`~medcam3d.targets.SegmentationRegions` (regions of a segmentation output), or
            any callable ``output -> [B, T]``. Bound once per call on the real output (regions fixed there) and read
            at the real activations, the probe points and in the gradients alike.
        output: deprecated alias of ``targets=Classes(reader=output)`` (a :class:`DeprecationWarning`).
        certify: compute the faithfulness certificate (a few cheap head evaluations).
        n_probes: random probe points for the affinity test (≥ 2).
        head: ``"auto"`` (fx trace when possible, else re-run), ``"fx"`` or ``"rerun"``.
        eval_mode: run the model in eval mode for the call (restored afterwards). With ``False`` the model's
            own flags are used and buffers are restored after the call.
        max_chunk_bytes: memory budget for one chunk of per-class gradients.
        keep_gradients: keep activations and gradients on the explanation (memory heavy; for evaluation).
        seed: seed of the probe points.
        jacobian: how the certificate compares the head's Jacobian at the real activations with the Jacobian at
            each probe point: ``"sketch"`` (default) along one random combination of the K classes, each class
            scaled to unit gradient, so one backward pass per probe point instead of K -- and per class whenever
            the sketch differs; ``"per-class"`` K comparisons per probe point always. Either way each class is
            also checked by its own secant test at every probe point (no backward pass), see
            :func:`medcam3d.certificate.secant_residual`.
        map_geometry: where the explained cells are drawn by default (:attr:`Explanation.placement`): ``"auto"``
            (default) the receptive-field centres the model declares (``medcam3d_map_geometry``) or its layers give
            (:mod:`medcam3d.placement`; channels-first layouts), else the field with the reason recorded;
            ``"field"`` the field of view divided evenly (the paper's convention); ``"receptive"`` the
            receptive-field centres or an :class:`InputError`. The receptive geometry, when there is one, is kept
            on :attr:`Explanation.geometry` whichever is chosen.

    Use as a context manager or call :meth:`close` to drop the cached trace.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        methods: Iterable[str] = DEFAULT_METHODS,
        layout: Layout | str | None = None,
        *,
        labels: Sequence[str] | None = None,
        targets: Targets | Callable[[Any], Tensor] | None = None,
        output: Callable[[Any], Tensor] | None = None,
        certify: bool = True,
        n_probes: int = 2,
        head: str = "auto",
        eval_mode: bool = True,
        max_chunk_bytes: int = 1 << 30,
        keep_gradients: bool = False,
        seed: int = 0,
        jacobian: str = "sketch",
        map_geometry: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.layer_choice: LayerChoice | None = self._resolve_layer(model, target_layer)
        self.methods = tuple(methods)
        if not self.methods:
            raise InputError("methods: give at least one method")
        for m in self.methods:
            try:
                get_method(m)
            except ValueError as e:
                raise InputError(f"methods: {e}") from None
        self.layout = resolve_layout(layout if layout is not None else getattr(model, "medcam3d_layout", None))
        lab = labels if labels is not None else getattr(model, "medcam3d_labels", None)
        self.labels = list(lab) if lab is not None else None
        self.targets = self._resolve_targets(targets, output)
        self.certify = certify
        if n_probes < 2:
            raise InputError("n_probes must be at least 2")
        self.n_probes = n_probes
        if head not in ("auto", "fx", "rerun"):
            raise InputError(f"head must be 'auto', 'fx' or 'rerun', got {head!r}")
        self.head_mode = head
        self.eval_mode = eval_mode
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.keep_gradients = keep_gradients
        self.seed = seed
        if jacobian not in ("sketch", "per-class"):
            raise InputError(f"jacobian must be 'sketch' or 'per-class', got {jacobian!r}")
        self.jacobian = jacobian
        if map_geometry not in GEOMETRIES:
            raise InputError(f"map_geometry must be one of {', '.join(GEOMETRIES)}, got {map_geometry!r}")
        self.map_geometry = map_geometry
        self._fx: _FxHead | None = None
        self._fx_failed: str | None = None

    # -- construction helpers --------------------------------------------------------------------------------
    @property
    def layer_name(self) -> str | None:
        """Dotted name of the explained module (None until the first call chooses it, with ``"auto"``)."""
        return self.layer_choice.name if self.layer_choice is not None else None

    @property
    def layer(self) -> nn.Module | None:
        """The explained module (None until the first call chooses it, with ``"auto"``)."""
        return self.model.get_submodule(self.layer_choice.name) if self.layer_choice is not None else None

    @staticmethod
    def _resolve_targets(targets: Targets | Callable[[Any], Tensor] | None,
                         output: Callable[[Any], Tensor] | None) -> Targets:
        """``targets`` (:func:`medcam3d.targets.as_targets`), or the deprecated ``output=`` reader as
        :class:`~medcam3d.targets.Classes`."""
        if output is None:
            return as_targets(targets)
        if targets is not None:
            raise InputError("give targets= or its deprecated alias output=, not both")
        warnings.warn("Explainer(output=...) is deprecated; use targets=Classes(reader=...) (medcam3d.targets)",
                      DeprecationWarning, stacklevel=3)
        return Classes(reader=output)

    @staticmethod
    def _resolve_layer(model: nn.Module, target: str | nn.Module | None) -> LayerChoice | None:
        """The named or declared layer, or None for ``"auto"`` (chosen on the first call)."""
        reason = "given"
        if target is None:
            target = getattr(model, "medcam3d_target_layer", None)
            reason = "declared by the model (medcam3d_target_layer)"
        if target is None or target == "auto":
            return None
        if isinstance(target, nn.Module):
            for name, m in model.named_modules():
                if m is target:
                    return LayerChoice(name, reason)
            raise InputError("target_layer: the given module is not part of the model")
        try:
            model.get_submodule(target)
        except AttributeError:
            raise InputError(f"target_layer: no module named {target!r} in the model; "
                             f"{_layer_hint(model, target)}") from None
        return LayerChoice(target, reason)

    def _choose_layer(self, x: Tensor, kwargs: Mapping[str, Any]) -> LayerChoice:
        """``target_layer="auto"``: choose on this input (once; cached), see :mod:`medcam3d.autolayer`. The
        targets are bound on the output of the candidates' forward pass and read on the input repeated 3 times."""
        if self.layer_choice is None:
            batch = x.shape[0]
            self.layer_choice = choose_layer(self.model, x, self.layout, None, kwargs, self.seed,
                                             bind=lambda y: self._auto_output(self._bind(y, batch), batch))
        return self.layer_choice

    def _auto_output(self, bound: BoundTargets, batch: int) -> Callable[[Any], Tensor]:
        return lambda y: self._scores(bound, y, 3 * batch)

    def _head(self, kwargs: Mapping[str, Any]) -> _Head:
        assert self.layer is not None and self.layer_name is not None  # chosen before the first head
        if self.head_mode != "rerun" and self._fx is None and self._fx_failed is None:
            try:
                self._fx = _FxHead(self.model, self.layer, self.layer_name)
            except Exception as e:  # tracing is best effort; the re-run head is always correct
                self._fx_failed = f"{type(e).__name__}: {e}".splitlines()[0]
                if self.head_mode == "fx":
                    raise InputError(f"head='fx': cannot trace the model with torch.fx ({self._fx_failed})") from e
        if self._fx is not None and self.head_mode != "rerun" and self._fx.accepts(kwargs):
            return self._fx
        return _RerunHead(self.model, self.layer)

    # -- context manager ------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the cached trace and any tensors of the last call."""
        if self._fx is not None:
            self._fx.close()
        self._fx = None

    # -- the call -------------------------------------------------------------------------------------------
    def __call__(self, x: Tensor, classes: Sequence[int | str] | None = None, *,
                 allow_nonfinite: bool = False, **forward_kwargs: Any) -> Explanation:
        """Explain ``x``.

        Args:
            x: ``[B, C, *spatial]`` input (a MONAI MetaTensor is accepted; its affine is kept).
            classes: which targets to explain: for :class:`~medcam3d.targets.Classes`, output indices or labels
                (default the targets' own selection, else all M outputs); for other targets, target indices or
                names (default all T).
            allow_nonfinite: explain an input holding NaN or Inf (refused by default, as the command line does).
            forward_kwargs: the model's other forward arguments (``model(x, **forward_kwargs)``, e.g. clinical
                covariates), passed to every forward pass of the call.
        Returns: an :class:`Explanation` with ``raw[method]`` of shape ``[B, K, *map_spatial]`` (K explained
            targets) and the targets' descriptions (:attr:`Explanation.targets`).
        """
        affine, meta = None, None
        if hasattr(x, "as_tensor") and hasattr(x, "affine"):  # MONAI MetaTensor, duck-typed
            affine = torch.as_tensor(x.affine).detach().clone()
            meta = _meta_out(x)
            x = x.as_tensor()
        if not isinstance(x, Tensor):
            raise InputError(f"x must be a tensor [B, C, *spatial], got {type(x).__name__}")
        if x.ndim < 3:
            raise InputError(f"x must be [B, C, *spatial] with 1-3 spatial axes, got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            x = x.float()
        # a finite sum proves every value finite (NaN and Inf propagate); only an overflowing sum needs the full test
        if not allow_nonfinite and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise InputError(f"x: {bad} value(s) are NaN or Inf (allow_nonfinite=True explains it anyway)")
        with torch.inference_mode(False):
            x = x.detach().clone() if x.is_inference() else x.detach()
            state = _ModelState(self.model, save_buffers=not self.eval_mode)
            state.freeze(self.eval_mode)
            try:
                with ExitStack() as stack:
                    stack.enter_context(torch.enable_grad())
                    self._choose_layer(x, forward_kwargs)
                    exp = self._explain(x, classes, affine, forward_kwargs)
            finally:
                state.restore()
        return exp if meta is None else _with_meta(exp, meta)

    def _explain(
        self, x: Tensor, classes: Sequence[int | str] | None, affine: Tensor | None, kwargs: Mapping[str, Any]
    ) -> Explanation:
        """Forward, probes, then gradients -> maps -> evidence, chunk by chunk; see the module docstring."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        batch = x.shape[0]
        head = self._head(kwargs)
        notes: list[str] = []
        if head.kind == "rerun" and self._fx_failed and self.head_mode == "auto":
            notes.append(f"fx trace unavailable ({self._fx_failed}); the head was evaluated by re-running the model")
        try:
            leaf, output = head.forward(x, kwargs)
            bound = self._bind(output, batch)
            scores = self._scores(bound, output, batch)
            timings["forward"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            class_idx = self._class_indices(classes if classes is not None else bound.selection, bound)
            volume = self._volume(leaf.detach(), batch)  # [B, F, *S]
            grads, prober = self._probe(head, bound, leaf, scores, class_idx, volume, notes)
            timings["probes"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            raw, kept = self._maps(grads, prober, volume, class_idx)
            cert = prober.finish(scores.detach()[:, class_idx], head.kind, notes)
            timings["gradients_and_maps"] = time.perf_counter() - t2
        finally:
            head.close()
        self._check_cam(cert)
        t3 = time.perf_counter()
        receptive, placement = self._placement(tuple(x.shape[2:]), tuple(volume.shape[2:]))
        timings["placement"] = time.perf_counter() - t3
        timings["total"] = time.perf_counter() - t0
        return Explanation(
            scores=scores.detach(),
            classes=class_idx,
            raw=raw,
            certificate=cert,
            input_size=tuple(x.shape[2:]),
            labels=bound.labels,
            affine=affine,
            activations=volume.detach() if self.keep_gradients else None,
            gradients=kept,
            timings=timings,
            geometry=receptive.geometry if isinstance(receptive, Placement) else None,
            placement=placement,
            layer=self.layer_choice,
            targets=list(bound.infos),
            target_valid=bound.valid.to(scores.device),
            sample_targets=[list(row) for row in bound.sample_infos],
            notes=list(bound.notes),
        )

    def _placement(self, input_size: tuple[int, ...], map_size: tuple[int, ...]) -> tuple[Placement | str, Placement]:
        """The receptive placement (or why there is none) and the placement ``map_geometry`` resolves to.
        Reuses this explainer's fx trace when there is one (no second trace)."""
        graph = self._fx.gm.graph if self._fx is not None else None
        assert self.layer_name is not None
        found = find_receptive(self.model, self.layer_name, input_size, map_size, self.layout, graph)
        return found, choose_placement(self.map_geometry, found, map_size, input_size)

    def _probe(
        self, head: _Head, bound: BoundTargets, leaf: Tensor, scores: Tensor, class_idx: list[int], volume: Tensor,
        notes: list[str],
    ) -> tuple[_HeadGradients | RegionHead, Prober]:
        """Evaluate the head at the probe points and at zero (scores read through the same ``bound`` targets);
        return the gradient source and a fresh prober."""
        batch = scores.shape[0]
        grads: _HeadGradients | RegionHead | None = self._region_head(head, bound, leaf, scores, volume, notes)
        if grads is None:
            probes = probe_points(leaf.detach(), self.n_probes, self.seed) if self.certify else []
            grads = _HeadGradients(self.layout, batch, leaf, scores, probes,
                                   [self._scores(bound, head(p), batch) for p in probes])
        if self.certify:
            with torch.no_grad():
                zero = torch.zeros_like(grads.leaf)
                baseline = (grads.scores_of(zero) if isinstance(grads, RegionHead)
                            else self._scores(bound, head(zero), batch))[:, class_idx]
        else:
            baseline = torch.full((batch, len(class_idx)), float("nan"), dtype=scores.dtype, device=scores.device)
        prober = Prober(
            class_idx,
            grads,
            baseline,
            default_tolerance(volume.dtype),
            checked=self.certify,
            jacobian_test=self.jacobian,
            sketch_seed=self.seed + 1,
        )
        return grads, prober

    def _region_head(self, head: _Head, bound: BoundTargets, leaf: Tensor, scores: Tensor, volume: Tensor,
                     notes: list[str]) -> RegionHead | None:
        """Region targets on a pointwise head whose maps need one gradient per class only (:mod:`medcam3d.regions`):
        the head evaluated at the regions' voxels -- or on the whole grid when the backbone values it reads cannot
        be cut to them, or when the scores there differ from the real ones. None for everything else."""
        regions = bound.regions
        if (regions is None or not head.pointwise or self.keep_gradients
                or not set(self.methods) <= set(REGION_METHODS) or leaf.shape != volume.shape
                or any(r.shape[1:] != volume.shape[2:] for r in regions.values())):
            return None
        batch, grid = scores.shape[0], tuple(volume.shape[2:])
        labels = {c: r.flatten(1) for c, r in regions.items()}
        target_class = [i.cls for i in bound.infos]
        inside = torch.stack([(m > 0).any(dim=0) for m in labels.values()]).any(dim=0)
        positions = torch.nonzero(inside).flatten()
        run = head.on_voxels(positions, grid) if isinstance(head, _FxHead) else None
        if run is not None and isinstance(bound.score, RegionScores):
            cut_scores = bound.score.on_voxels(positions)
            cut = _at_voxels(volume, positions).requires_grad_(True)

            def cut_scores_of(a: Tensor) -> Tensor:
                return cut_scores(run(a))

            s = cut_scores_of(cut)
            diff = (s.detach() - scores.detach()).abs().double()
            if bool((diff <= default_tolerance(volume.dtype) * (s.detach().abs() + scores.detach().abs())).all()):
                probes = probe_points(cut.detach(), self.n_probes, self.seed) if self.certify else []
                return RegionHead(cut_scores_of, cut, s, {c: m.index_select(1, positions) for c, m in labels.items()},
                                  target_class, probes, positions)
            notes.append(f"the head at the regions' voxels gave scores {float(diff.max()):.2e} away from the real "
                         "ones; evaluated on the whole grid")

        def scores_of(a: Tensor) -> Tensor:
            return self._scores(bound, head(a), batch)

        probes = probe_points(leaf.detach(), self.n_probes, self.seed) if self.certify else []
        return RegionHead(scores_of, leaf, scores, labels, target_class, probes)

    def _maps(
        self, grads: _HeadGradients | RegionHead, prober: Prober, volume: Tensor, class_idx: list[int]
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Gradients -> maps -> evidence, a chunk of classes at a time (region targets on a pointwise head: a
        class at a time, from one gradient per class, :mod:`medcam3d.regions`).

        Returns: method -> raw maps ``[B, K, *S]``, and the gradients ``[B, K, F, *S]`` when kept."""
        if isinstance(grads, RegionHead):
            return self._region_maps(grads, prober, volume, class_idx), None
        raw: dict[str, list[Tensor]] = {m: [] for m in self.methods}
        kept: list[Tensor] = []
        for chunk in self._chunks(class_idx, volume):
            g = grads.gradients(chunk)  # [B, k, F, *S]
            with torch.no_grad():
                for m in self.methods:
                    raw[m].append(get_method(m)(volume, g))
                prober.add(volume, g)
            if self.keep_gradients:
                kept.append(g)
        return _join(raw), torch.cat(kept, dim=1) if kept else None

    def _region_maps(self, grads: RegionHead, prober: Prober, volume: Tensor, class_idx: list[int]
                     ) -> dict[str, Tensor]:
        """:meth:`_maps` for region targets on a pointwise head: per run of one class's targets, the maps and the
        evidence from the class's gradient and label map at the regions' voxels (no per-target gradient tensor)."""
        raw: dict[str, list[Tensor]] = {m: [] for m in self.methods}
        total, grid = len(grads.target_class), tuple(volume.shape[2:])
        for cls, run in grads.class_runs(class_idx):
            cg = ClassGradient(grads.class_gradient(cls), grads.labels[cls], total, grid, grads.positions)
            with torch.no_grad():
                for m in self.methods:
                    raw[m].append(cg.maps(m, grads.activations, run, volume))
                prober.add_summary(cg.summary(grads.activations, run, grads.points))
        return _join(raw)

    def _check_cam(self, cert: Certificate) -> None:
        """Refuse method ``cam`` unless the head is certified GAP + linear."""
        if "cam" in self.methods and cert.kind != "cam":
            raise InputError(
                f"method 'cam' needs a global-average-pool + linear head after the explained layer, but this head "
                f"is certified {cert.kind!r}; use 'hirescam' (it equals CAM on such heads) or 'gradcam'"
            )

    # -- pieces ---------------------------------------------------------------------------------------------
    def _bind(self, output: Any, batch: int) -> BoundTargets:
        """The targets bound on the real model ``output`` (detached; no graph), checked against the batch."""
        output = _detach(output)
        with torch.no_grad():
            bound = self.targets.bind(output, self.labels)
            if not isinstance(bound, BoundTargets):
                raise InputError(f"targets.bind returned {type(bound).__name__}, not BoundTargets")
            self._scores(bound, output, batch)  # the shape checks, with their messages
        if bound.valid.shape != (batch, len(bound.infos)):
            raise InputError(f"targets: valid has shape {tuple(bound.valid.shape)}, expected "
                             f"[B={batch}, T={len(bound.infos)}]")
        return bound

    def _scores(self, bound: BoundTargets, output: Any, batch: int) -> Tensor:
        """``[B, T]`` target scores of ``output`` (graph kept), read through the bound targets."""
        s = bound(output)
        if not isinstance(s, Tensor):
            raise InputError(f"the targets' score reader returned {type(s).__name__}, not a tensor")
        if s.ndim == 1:
            s = s.unsqueeze(1)
        if s.ndim != 2 or s.shape[0] != batch:
            raise InputError(
                f"model scores have shape {tuple(s.shape)}; expected [B={batch}, M] raw class scores "
                "(for segmentation outputs pass targets=SegmentationRegions(...), medcam3d.targets)"
            )
        return s

    def _class_indices(self, classes: Sequence[int | str] | None, bound: BoundTargets) -> list[int]:
        """Indices on the T axis of the explained targets (labels or names looked up in ``bound.labels``)."""
        m = len(bound.infos)
        if classes is None:
            return list(range(m))
        names = bound.labels
        out = []
        for c in classes:
            if isinstance(c, str):
                if not names or c not in names:
                    raise InputError(f"classes: unknown label {c!r}")
                c = names.index(c)
            c = int(c)
            if not 0 <= c < m:
                raise InputError(f"classes: index {c} out of range for a model with {m} outputs")
            out.append(c)
        if not out:
            raise InputError("classes: empty selection")
        return out

    def _volume(self, hooked: Tensor, batch: int) -> Tensor:
        """The explained activations in volume layout ``[B, F, *S]`` (1-3 spatial axes)."""
        volume = self.layout.to_volume(hooked, batch)
        if not 1 <= volume.ndim - 2 <= 3:
            raise InputError(f"explained activations have shape {tuple(volume.shape)}; need 1-3 spatial axes")
        return volume

    def _chunks(self, classes: list[int], activations: Tensor) -> list[list[int]]:
        """Class chunks whose gradients fit ``max_chunk_bytes``."""
        per_class = activations.numel() * activations.element_size() * (6 + 2 * len(self.methods))
        size = max(1, min(len(classes), self.max_chunk_bytes // max(per_class, 1)))
        return [classes[i : i + size] for i in range(0, len(classes), size)]


def _join(raw: Mapping[str, list[Tensor]]) -> dict[str, Tensor]:
    """Each method's chunks of maps joined along the target axis (a single chunk as is: no copy)."""
    return {m: v[0] if len(v) == 1 else torch.cat(v, dim=1) for m, v in raw.items()}


def _detach(output: Any) -> Any:
    """``output`` with every tensor detached (tuples, lists and dicts walked)."""
    if isinstance(output, Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(_detach(o) for o in output) if type(output) in (tuple, list) else output
    if isinstance(output, dict):
        return {k: _detach(v) for k, v in output.items()}
    return output


def _meta_out(x: Any) -> Any:
    """What the maps of a MetaTensor input carry (:class:`medcam3d.monai.meta.MetaOut`)."""
    from .monai.meta import MetaOut  # lazy: MONAI is imported only when the input is a MetaTensor

    return MetaOut.of(x)


def _with_meta(exp: Explanation, meta: Any) -> Explanation:
    """The explanation of a MetaTensor input: raw maps as MetaTensors with their world affine (the default
    placement's), and ``meta`` kept for the display maps (:meth:`Explanation.heatmap`)."""
    step = exp.map_geometry("auto").index_affine()
    exp.raw = {m: meta.feature_grid(r, step) for m, r in exp.raw.items()}
    exp.meta = meta
    return exp


def _layer_hint(model: nn.Module, target: str) -> str:
    """Close matches for a mistyped module name (``difflib``), else the model's top-level modules."""
    names = [n for n, _ in model.named_modules() if n]
    close = [repr(n) for n in difflib.get_close_matches(target, names, n=3)]
    if close:
        listed = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
        return f"did you mean {listed}?"
    top = [n for n, _ in model.named_children()]
    more = f", ... ({len(top)} in all)" if len(top) > 12 else ""
    return f"top-level modules: {', '.join(top[:12]) or 'none'}{more}"


def explain(
    model: nn.Module,
    x: Tensor,
    target_layer: str | nn.Module | None = None,
    methods: Iterable[str] = DEFAULT_METHODS,
    classes: Sequence[int | str] | None = None,
    **kwargs: Any,
) -> Explanation:
    """One-call form of :class:`Explainer`: ``explain(model, x, target_layer="layer4")``."""
    with Explainer(model, target_layer, methods, **kwargs) as explainer:
        return explainer(x, classes)
