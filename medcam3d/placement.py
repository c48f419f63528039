"""Where an explained layer's cells sit on the model input: declared by the model, derived from its layers, or the
field convention as a fallback (``map_geometry="auto"``).

Three ways, tried in this order by :func:`find_receptive` / :func:`resolve_placement`:

1. **Declared.** A model with ``medcam3d_map_geometry(input_size, map_size) -> MapGeometry`` says where its cells
   are (AxialNet does: its slices ride in the batch axis, which no graph walk can see through).
2. **Derived** (:func:`derive_geometry`). The model is traced with ``torch.fx`` (the explained layer kept as one
   node) and the nodes the explained layer depends on are walked in order. Each tensor carries an affine placement
   ``cell j at offset + stride * j`` (input voxels, per spatial axis), starting from the input (``0 + 1 j``). A
   layer that places its output ``j`` at ``a + b j`` on its own input (:mod:`medcam3d.geometry`'s per-layer
   formulas) turns ``(offset, stride)`` into ``(offset + stride a, stride b)``:

   * convolutions and max/avg/LP pools, 1-3 D, modules or functions: kernel, stride, padding (ints, ``"same"``,
     ``"valid"``), dilation; transposed convolutions; ``nn.Upsample`` / ``F.interpolate`` with a scale factor and
     ``align_corners`` False/None; constant/reflect/replicate padding;
   * norms, activations, dropout, identity and elementwise functions pass placements through;
   * merges (``+``, ``*``, ``torch.cat`` along channels, ...) need their inputs' placements to agree (a residual
     block's downsample meets its main path at the same centres; DenseNet concatenates equal grids);
   * a global pooling (adaptive pool to size 1) makes a *global* value that broadcasts onto any placement
     (squeeze-and-excitation); reaching the explained layer with it fails;
   * anything else fails with a reason: attention, adaptive pooling to a size > 1, flatten/reshape/permute of
     spatial axes, up-sampling to a given ``size``, a leaf module fx does not see into, a model fx cannot trace.

   Only the channels-first layout can be derived (the explained layer's spatial axes are the input's).
3. **Fallback** to ``"field"`` (the field of view divided evenly among the cells, the paper's display convention),
   with the reason recorded in :attr:`Placement.source` as ``"fallback: <reason>"``.

Derivation reads module attributes only (no forward pass, no gradients) and is cached per (model, explained
layer, input size); gradient probing is used only in the tests, as a cross-check on small nets.

The receptive-field centre is the right place to draw a cell: a cell's value is computed from the input voxels of
its receptive field, symmetric about that centre. For zero-padded nets cell ``i`` sits at ``stride * i`` whereas
the field convention puts it at ``stride * i + (stride - 1) / 2``: ``"auto"`` moves their display by half a stride.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from .errors import InputError
from .geometry import (
    GEOMETRIES,
    MapGeometry,
    conv_cell_map,
    transposed_conv_cell_map,
    upsample_cell_map,
)
from .layouts import ChannelsFirst, Layout

__all__ = [
    "Placement",
    "PlacementError",
    "choose_placement",
    "clear_cache",
    "derive_geometry",
    "find_receptive",
    "resolve_placement",
]


class PlacementError(Exception):
    """Raised by :func:`derive_geometry` when a network's cell placement cannot be derived; the message is the
    reason (one line)."""


@dataclass(frozen=True)
class Placement:
    """Where the explained cells sit on the input grid, and how that was found.

    Attributes:
        geometry: the cell centres (:class:`~medcam3d.geometry.MapGeometry`; ``kind`` ``"receptive"`` or
            ``"field"``).
        source: ``"declared"`` (the model's ``medcam3d_map_geometry``), ``"derived"`` (:func:`derive_geometry`),
            ``"requested"`` (``"field"`` asked for explicitly) or ``"fallback: <reason>"`` (no receptive geometry,
            the field convention used instead).
    """

    geometry: MapGeometry
    source: str

    @property
    def kind(self) -> str:
        """``"receptive"`` or ``"field"``."""
        return self.geometry.kind

    @property
    def offset(self) -> tuple[float, ...]:
        """Centre of cell 0 per spatial axis (input voxel index)."""
        return self.geometry.offset

    @property
    def stride(self) -> tuple[float, ...]:
        """Distance between neighbouring cell centres per spatial axis (input voxels)."""
        return self.geometry.stride

    @property
    def fallback(self) -> bool:
        """True when no receptive geometry was found and the field convention stands in."""
        return self.source.startswith("fallback")

    @property
    def reason(self) -> str | None:
        """Why no receptive geometry was found (fallbacks only)."""
        return self.source.split(": ", 1)[1] if self.fallback else None

    def note(self) -> str:
        """One line for logs / stderr, e.g. ``map placement: field (fallback: ...)``."""
        return f"map placement: {self.kind} ({self.source})"

    def as_dict(self) -> dict[str, Any]:
        """``{"kind", "offset_voxels", "stride_voxels", "source"}`` (JSON-ready)."""
        return {"kind": self.kind, "offset_voxels": list(self.offset), "stride_voxels": list(self.stride),
                "source": self.source}


# ------------------------------------------------------------------------------------------------------------
# Resolution: declared, derived (cached), or field
# ------------------------------------------------------------------------------------------------------------

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], tuple[tuple[float, ...], ...] | str]] = (
    weakref.WeakKeyDictionary()
)


def clear_cache() -> None:
    """Forget every derived placement (e.g. after changing a model's layers in place, or to time a cold run)."""
    _CACHE.clear()


def find_receptive(
    model: nn.Module,
    layer_name: str,
    input_size: Sequence[int],
    map_size: Sequence[int],
    layout: Layout | None = None,
    graph: torch.fx.Graph | None = None,
) -> Placement | str:
    """The receptive-field placement of ``layer_name``'s cells: declared, else derived (channels-first layouts
    only; cached per model, layer and input size).

    Args:
        model: the model.
        layer_name: dotted name of the explained module.
        input_size, map_size: spatial sizes of the model input and of the explained map (volume layout).
        layout: the explained layer's layout; None means channels-first.
        graph: optional fx graph of ``model`` with the explained layer as one ``call_module`` node (the
            Explainer's own trace), to save a second trace.
    Returns: a :class:`Placement` (``source`` ``"declared"`` or ``"derived"``), or the reason there is none.
    """
    declare = getattr(model, "medcam3d_map_geometry", None)
    if callable(declare):
        return Placement(declare(tuple(input_size), tuple(map_size)), "declared")
    if layout is not None and not isinstance(layout, ChannelsFirst):
        return (f"layout {layout!r}: only channels-first layers can be derived (declare medcam3d_map_geometry, as "
                "AxialNet does)")
    if len(input_size) != len(map_size):
        return f"the explained map has {len(map_size)} spatial axes, the input {len(input_size)}"
    per_model = _CACHE.setdefault(model, {})
    key = (layer_name, tuple(input_size))
    if key not in per_model:
        try:
            per_model[key] = derive_geometry(model, layer_name, len(input_size), graph)
        except PlacementError as e:
            per_model[key] = str(e)
    found = per_model[key]
    if isinstance(found, str):
        return found
    return Placement(MapGeometry(found[0], found[1], "receptive"), "derived")


def choose_placement(
    kind: str, found: Placement | str, map_size: Sequence[int], input_size: Sequence[int]
) -> Placement:
    """The placement to use for ``kind`` (``"auto"``, ``"field"`` or ``"receptive"``) given what
    :func:`find_receptive` found.

    ``"auto"``: the receptive placement, else the field with ``source="fallback: <reason>"``; ``"field"``: the
    field (``source="requested"``); ``"receptive"``: the receptive placement, else :class:`InputError`."""
    if kind not in GEOMETRIES:
        raise InputError(f"map geometry must be one of {', '.join(GEOMETRIES)}, got {kind!r}")
    if kind != "field" and isinstance(found, Placement):
        return found
    if kind == "receptive":
        raise InputError(no_receptive_message(found if isinstance(found, str) else None))
    source = "requested" if kind == "field" else f"fallback: {found}"
    return Placement(MapGeometry.field(map_size, input_size), source)


def no_receptive_message(reason: str | None) -> str:
    """The one-line error for ``"receptive"`` on a model without a declared or derivable geometry."""
    why = f" and none could be derived ({reason})" if reason else ""
    return (f"map geometry 'receptive': the model declares no medcam3d_map_geometry (where its explained cells sit "
            f"on the input){why}; use 'auto' or 'field'")


def resolve_placement(
    model: nn.Module,
    layer_name: str,
    input_size: Sequence[int],
    map_size: Sequence[int],
    kind: str = "auto",
    layout: Layout | None = None,
) -> Placement:
    """:func:`choose_placement` of :func:`find_receptive`: the placement ``kind`` resolves to for this model,
    layer and sizes (see the module docstring)."""
    return choose_placement(kind, find_receptive(model, layer_name, input_size, map_size, layout), map_size, input_size)


# ------------------------------------------------------------------------------------------------------------
# Derivation: walk the traced graph up to the explained layer
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cells:
    """A tensor's placement: cell ``j`` along axis ``d`` centred at input voxel ``offset[d] + stride[d] * j``."""

    offset: tuple[float, ...]
    stride: tuple[float, ...]

    def then(self, maps: Sequence[tuple[float, float]]) -> _Cells:
        """After a layer placing its output ``j`` at ``a + b j`` on this tensor (``maps[d] = (a, b)``)."""
        return _Cells(tuple(o + s * a for o, s, (a, _) in zip(self.offset, self.stride, maps)),
                      tuple(s * b for s, (_, b) in zip(self.stride, maps)))

    def same(self, other: _Cells) -> bool:
        vals = zip((*self.offset, *self.stride), (*other.offset, *other.stride))
        return all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in vals)


_GLOBAL = "global"  # a value computed from global pooling: no place, broadcasts onto any placement
_Value = _Cells | str | None  # None: not a spatial tensor of the input (a constant, a shape, an int)


class _Pass:
    """Rule: the output sits where its (agreeing) inputs sit."""


class _Global:
    """Rule: the output is global (pooled over all of space)."""


class _Meta:
    """Rule: the output is not a spatial tensor (a size, a dtype, ...)."""


PASS, GLOBAL, META = _Pass(), _Global(), _Meta()
_Rule = _Pass | _Global | _Meta | tuple[tuple[float, float], ...]  # a tuple: one (a, b) per axis


def derive_geometry(
    model: nn.Module, layer_name: str, nd: int, graph: torch.fx.Graph | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Receptive-field centres of ``layer_name``'s output cells on the input of a channels-first ``model``.

    Args:
        model: input ``[B, C, *spatial]`` with ``nd`` spatial axes; the explained layer's output
            ``[B, F, *map_spatial]`` with the same ``nd``.
        layer_name: dotted name of the explained module (it must run once).
        nd: number of spatial axes.
        graph: an fx graph of ``model`` with ``layer_name`` as one call_module node (traced here when None).
    Returns: ``(offset, stride)`` per axis: cell ``i`` centred at input voxel ``offset + stride * i``.
    Raises: :class:`PlacementError` with the reason when the placement cannot be derived.
    """
    layer = model.get_submodule(layer_name)
    if graph is None:
        graph = _trace(model, layer, "the model")
    targets = [n for n in graph.nodes if n.op == "call_module" and n.target == layer_name]
    if len(targets) != 1:
        raise PlacementError(f"the explained layer {layer_name!r} appears {len(targets)} times in the traced graph")
    env = _walk(graph, model, targets[0], nd, inputs=None)
    out = _apply_module(layer, layer_name, [env[a] for a in targets[0].all_input_nodes], targets[0], nd)
    if out == _GLOBAL:
        raise PlacementError(f"the explained layer {layer_name!r} comes after a global pooling: "
                             "its cells have no place")
    if not isinstance(out, _Cells):
        raise PlacementError(f"the explained layer {layer_name!r} does not depend on the input's spatial axes")
    return out.offset, out.stride


class _LeafTracer(torch.fx.Tracer):
    """Default fx tracer that also keeps ``leaf`` as one call_module node."""

    def __init__(self, leaf: nn.Module | None) -> None:
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is self._leaf or super().is_leaf_module(m, module_qualified_name)


_DEFAULT_TRACER = torch.fx.Tracer()  # only asked which modules are leaves


def _trace(root: nn.Module, leaf: nn.Module | None, what: str) -> torch.fx.Graph:
    try:
        return _LeafTracer(leaf).trace(root)
    except Exception as e:  # control flow, unsupported Python: fx raises many types
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:160]
        raise PlacementError(f"torch.fx cannot trace {what} ({msg})") from e


def _walk(
    graph: torch.fx.Graph, root: nn.Module, stop: Node, nd: int, inputs: list[_Value] | None
) -> dict[Node, _Value]:
    """Placements of ``stop``'s ancestors (graph order). Placeholders get ``inputs`` in order; with None the first
    placeholder is the model input (``0 + 1 j``) and the others are constants."""
    needed: set[Node] = set()
    frontier = list(stop.all_input_nodes)
    while frontier:
        n = frontier.pop()
        if n not in needed:
            needed.add(n)
            frontier.extend(n.all_input_nodes)
    env: dict[Node, _Value] = {}
    placeholders = 0
    for n in graph.nodes:
        if n.op == "placeholder":
            if inputs is None:
                env[n] = _Cells((0.0,) * nd, (1.0,) * nd) if placeholders == 0 else None
            else:
                env[n] = inputs[placeholders] if placeholders < len(inputs) else None
            placeholders += 1
        elif n in needed:
            env[n] = _node_value(n, env, root, nd)
    return env


def _node_value(node: Node, env: dict[Node, _Value], root: nn.Module, nd: int) -> _Value:
    """Placement of one node's output from its inputs' placements."""
    ins = [env.get(a) for a in node.all_input_nodes]
    if node.op == "get_attr" or all(v is None for v in ins):
        return None
    if node.op == "call_module":
        return _apply_module(root.get_submodule(str(node.target)), str(node.target), ins, node, nd)
    try:
        if node.op == "call_function":
            rule = _function_rule(node, root, nd)
        elif node.op == "call_method":
            rule = _method_rule(node, nd)
        else:
            raise PlacementError(f"unexpected graph node {node.format_node()}")
    except PlacementError:
        if any(isinstance(v, _Cells) for v in ins):
            raise
        return _GLOBAL  # computed from global values only: whatever it is, it has no place
    return _combine(rule, ins, node)


def _apply_module(module: nn.Module, name: str, ins: list[_Value], node: Node, nd: int) -> _Value:
    """A module's output placement: by rule for torch.nn leaves, else by tracing into the module."""
    if _DEFAULT_TRACER.is_leaf_module(module, name):
        try:
            rule = _module_rule(module, name, nd)
        except PlacementError:
            if any(isinstance(v, _Cells) for v in ins):
                raise
            return _GLOBAL  # see _node_value
        return _combine(rule, ins, node)
    sub = _trace(module, None, f"module {name!r}")
    outputs = [n for n in sub.nodes if n.op == "output"]
    result = outputs[0].args[0]
    if not isinstance(result, Node):
        raise PlacementError(f"module {name!r} returns {type(result).__name__}, not one tensor")
    if result.op == "placeholder":  # a module returning its input unchanged
        placeholders = [n for n in sub.nodes if n.op == "placeholder"]
        return ins[placeholders.index(result)] if placeholders.index(result) < len(ins) else None
    env = _walk(sub, module, result, nd, inputs=ins)
    return _node_value(result, env, module, nd)


def _combine(rule: _Rule, ins: list[_Value], node: Node) -> _Value:
    """Apply a rule to the input placements (None inputs are constants and ignored)."""
    if rule is META:
        return None
    placed = [v for v in ins if isinstance(v, _Cells)]
    if not placed:  # only global (and constant) inputs: still global, unless space is created from it
        if isinstance(rule, tuple) and any(b < 1 for _, b in rule):
            raise PlacementError(f"{_describe(node)} makes a spatial map from a global value")
        return _GLOBAL
    if rule is GLOBAL:
        return _GLOBAL
    first = placed[0]
    for other in placed[1:]:
        if not first.same(other):
            raise PlacementError(
                f"the inputs of {_describe(node)} sit at different places (offsets {first.offset} vs {other.offset}, "
                f"strides {first.stride} vs {other.stride})"
            )
    if isinstance(rule, tuple):
        if len(placed) != 1:
            raise PlacementError(f"{_describe(node)} takes {len(placed)} spatial inputs")
        return first.then(rule)
    return first


def _describe(node: Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{'method' if node.op == 'call_method' else 'function'} {target!r} (node {node.name})"


# ------------------------------------------------------------------------------------------------------------
# Rules: modules
# ------------------------------------------------------------------------------------------------------------

_PASS_MODULES = ("torch.nn.modules.activation", "torch.nn.modules.batchnorm", "torch.nn.modules.instancenorm",
                 "torch.nn.modules.normalization", "torch.nn.modules.dropout")


def _per_axis(v: Any, nd: int, what: str) -> tuple[Any, ...]:
    """A kernel/stride/padding/... argument as one value per spatial axis."""
    if isinstance(v, str):
        return (v,) * nd
    if isinstance(v, Sequence):
        if len(v) == 1:
            return (v[0],) * nd
        if len(v) != nd:
            raise PlacementError(f"{what} {tuple(v)} has {len(v)} values for {nd} spatial axes")
        return tuple(v)
    if isinstance(v, Node):
        raise PlacementError(f"{what} is computed at run time")
    return (v,) * nd


def _conv_rule(kernel: Any, stride: Any, padding: Any, dilation: Any, nd: int, what: str) -> _Rule:
    k, s = _per_axis(kernel, nd, f"{what} kernel"), _per_axis(stride, nd, f"{what} stride")
    p, d = _per_axis(padding, nd, f"{what} padding"), _per_axis(dilation, nd, f"{what} dilation")
    try:
        return tuple(conv_cell_map(int(k[i]), int(s[i]), p[i], int(d[i])) for i in range(nd))
    except ValueError as e:
        raise PlacementError(f"{what}: {e}") from None


def _transposed_rule(kernel: Any, stride: Any, padding: Any, dilation: Any, nd: int, what: str) -> _Rule:
    k, s = _per_axis(kernel, nd, f"{what} kernel"), _per_axis(stride, nd, f"{what} stride")
    p, d = _per_axis(padding, nd, f"{what} padding"), _per_axis(dilation, nd, f"{what} dilation")
    return tuple(transposed_conv_cell_map(int(k[i]), int(s[i]), int(p[i]), int(d[i])) for i in range(nd))


def _upsample_rule(size: Any, scale: Any, align_corners: Any, recompute: Any, nd: int, what: str) -> _Rule:
    if scale is None:
        raise PlacementError(f"{what} resizes to a given size ({size}); only scale factors can be placed")
    if align_corners:
        raise PlacementError(f"{what} uses align_corners=True, which places cells by size; only False can be placed")
    scales = [float(f) for f in _per_axis(scale, nd, f"{what} scale_factor")]
    if recompute and any(f != round(f) for f in scales):
        raise PlacementError(f"{what}: recompute_scale_factor with a non-integer scale depends on sizes")
    return tuple(upsample_cell_map(f) for f in scales)


def _pad_rule(pad: Any, nd: int, what: str) -> _Rule:
    """``(left_last, right_last, left_previous, ...)``: axis ``nd − 1 − i`` gets ``pad[2 i]`` on the left."""
    if isinstance(pad, Node) or any(isinstance(v, Node) for v in pad):
        raise PlacementError(f"{what}: padding computed at run time")
    left = [0.0] * nd
    for i in range(min(len(pad) // 2, nd)):
        left[nd - 1 - i] = float(pad[2 * i])
    return tuple((-lft, 1.0) for lft in left)


def _adaptive_rule(output_size: Any, nd: int, what: str) -> _Rule:
    sizes = _per_axis(output_size, nd, f"{what} output_size")
    if all(s == 1 for s in sizes):
        return GLOBAL
    raise PlacementError(f"{what} pools to a fixed size {output_size} (cells depend on the input size)")


def _module_rule(m: nn.Module, name: str, nd: int) -> _Rule:
    """The rule of a torch.nn leaf module."""
    what = f"module {name!r} ({type(m).__name__})"
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return _transposed_rule(m.kernel_size, m.stride, m.padding, m.dilation, nd, what)
    if isinstance(m, nn.modules.conv._ConvNd):
        return _conv_rule(m.kernel_size, m.stride, m.padding, m.dilation, nd, what)
    if isinstance(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._LPPoolNd)):
        stride = m.stride if m.stride is not None else m.kernel_size  # LPPool keeps None
        return _conv_rule(m.kernel_size, stride, getattr(m, "padding", 0), getattr(m, "dilation", 1), nd, what)
    if isinstance(m, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        return _adaptive_rule(m.output_size, nd, what)
    if isinstance(m, nn.Upsample):
        return _upsample_rule(m.size, m.scale_factor, m.align_corners, m.recompute_scale_factor, nd, what)
    if type(m).__module__ == "torch.nn.modules.padding":
        return _pad_rule(m.padding, nd, what)
    if isinstance(m, nn.Identity) or (type(m).__module__ in _PASS_MODULES and not isinstance(m, nn.MultiheadAttention)):
        return PASS
    raise PlacementError(f"{what} is a leaf module whose effect on cell positions is unknown")


# ------------------------------------------------------------------------------------------------------------
# Rules: functions and methods
# ------------------------------------------------------------------------------------------------------------

_ELEMENTWISE: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.neg,
    operator.pos, operator.abs, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide,
    torch.maximum, torch.minimum, torch.where, torch.clamp, torch.clip, torch.abs, torch.neg, torch.exp, torch.log,
    torch.sqrt, torch.rsqrt, torch.pow, torch.square, torch.sigmoid, torch.tanh, torch.relu, torch.relu_, torch.erf,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like, torch.randn_like,
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.sigmoid, F.tanh, F.prelu, F.threshold, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.batch_norm, F.instance_norm,
    F.group_norm, F.layer_norm, F.local_response_norm, F.normalize, F.softmax, F.log_softmax,
}
_PASS_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "clamp", "clamp_", "clip", "abs", "exp", "neg", "sqrt", "pow", "contiguous", "clone", "detach",
    "float", "double", "half", "bfloat16", "to", "type", "type_as", "requires_grad_", "masked_fill", "softmax",
}
_META_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "element_size", "get_device"}

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_MAXPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_POOL_ARGS = ("input", "kernel_size", "stride", "padding")
_INTERP_ARGS = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor")


def _bind(names: Sequence[str], node: Node, defaults: dict[str, Any]) -> dict[str, Any]:
    """A call's positional and keyword arguments by name."""
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _kernel_of(weight: Any, root: nn.Module, what: str) -> tuple[int, ...]:
    """Spatial kernel size of a functional convolution's weight (a parameter read with get_attr)."""
    if isinstance(weight, Node) and weight.op == "get_attr":
        t = _get_attr(root, str(weight.target))
        if isinstance(t, torch.Tensor):
            return tuple(int(k) for k in t.shape[2:])
    raise PlacementError(f"{what}: the kernel is computed at run time, so its size is unknown")


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _spatial_dim(dim: Any, nd: int) -> bool:
    """Whether ``dim`` of a ``[B, C, *spatial]`` tensor is a spatial axis."""
    if not isinstance(dim, int):
        return True  # unknown or several axes: assume the worst
    return (dim if dim >= 0 else dim + nd + 2) >= 2


def _convolution_function_rule(node: Node, root: nn.Module, nd: int, what: str) -> _Rule | None:
    """Rules of functional convolutions and pools (None: not one of them)."""
    fn = node.target
    if fn in (F.conv1d, F.conv2d, F.conv3d):
        a = _bind(_CONV_ARGS, node, {"stride": 1, "padding": 0, "dilation": 1})
        return _conv_rule(_kernel_of(a["weight"], root, what), a["stride"], a["padding"], a["dilation"], nd, what)
    if fn in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
        a = _bind(_CONVT_ARGS, node, {"stride": 1, "padding": 0, "dilation": 1})
        return _transposed_rule(_kernel_of(a["weight"], root, what), a["stride"], a["padding"], a["dilation"], nd, what)
    if fn in _MAX_POOLS:
        a = _bind(_MAXPOOL_ARGS, node, {"stride": None, "padding": 0, "dilation": 1})
        stride = a["stride"] if a["stride"] not in (None, []) else a["kernel_size"]
        return _conv_rule(a["kernel_size"], stride, a["padding"], a["dilation"], nd, what)
    if fn in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
        a = _bind(_POOL_ARGS, node, {"stride": None, "padding": 0})
        stride = a["stride"] if a["stride"] not in (None, []) else a["kernel_size"]
        return _conv_rule(a["kernel_size"], stride, a["padding"], 1, nd, what)
    return None


_MAX_POOLS: set[Any] = {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
                        torch.max_pool3d, F.max_pool1d_with_indices, F.max_pool2d_with_indices,
                        F.max_pool3d_with_indices}
_ADAPTIVE: set[Any] = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                       F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_SPLITTERS: dict[Any, int] = {torch.chunk: 2, torch.split: 2, "chunk": 2, "split": 2}  # position of ``dim``


def _function_rule(node: Node, root: nn.Module, nd: int) -> _Rule:
    """The rule of a call_function node."""
    fn = node.target
    what = _describe(node)
    rule = _convolution_function_rule(node, root, nd, what)
    if rule is not None:
        return rule
    if fn in (F.interpolate, F.upsample):
        a = _bind(_INTERP_ARGS, node, {"size": None, "scale_factor": None, "align_corners": None,
                                       "recompute_scale_factor": None})
        return _upsample_rule(a["size"], a["scale_factor"], a["align_corners"], a["recompute_scale_factor"], nd, what)
    if fn is F.pad:
        return _pad_rule(_bind(("input", "pad"), node, {})["pad"], nd, what)
    if fn in _ADAPTIVE:
        return _adaptive_rule(_bind(("input", "output_size"), node, {})["output_size"], nd, what)
    if fn in (torch.cat, torch.concat, torch.concatenate):
        dim = _bind(("tensors", "dim"), node, {"dim": 0})["dim"]
        if _spatial_dim(dim, nd):
            raise PlacementError(f"{what} concatenates along spatial axis {dim}")
        return PASS
    if fn in _SPLITTERS:
        return _split_rule(node, _SPLITTERS[fn], nd, what)
    if fn is operator.getitem:
        return _getitem_rule(node, nd, what)
    if fn is getattr or fn is len:
        return META
    if fn in _ELEMENTWISE:
        return PASS
    raise PlacementError(f"{what} has an unknown effect on cell positions")


def _method_rule(node: Node, nd: int) -> _Rule:
    """The rule of a call_method node (``x.relu()``, ``x.size(2)``, ...)."""
    name = str(node.target)
    what = _describe(node)
    if name in _META_METHODS:
        return META
    if name in _PASS_METHODS:
        return PASS
    if name in _SPLITTERS:
        return _split_rule(node, _SPLITTERS[name], nd, what)
    raise PlacementError(f"{what} has an unknown effect on cell positions (e.g. a reshape of spatial axes)")


def _split_rule(node: Node, dim_pos: int, nd: int, what: str) -> _Rule:
    """chunk/split: fine along batch or channels (each piece keeps the placement)."""
    dim = node.args[dim_pos] if len(node.args) > dim_pos else node.kwargs.get("dim", 0)
    if _spatial_dim(dim, nd):
        raise PlacementError(f"{what} splits spatial axis {dim}")
    return PASS


def _getitem_rule(node: Node, nd: int, what: str) -> _Rule:
    """``pieces[i]`` of a chunk/split keeps the placement; ``x[:, a:b]`` (batch/channel slicing) too; indexing a
    spatial axis does not."""
    source, index = node.args[0], node.args[1]
    if isinstance(source, Node) and source.target in _SPLITTERS:
        return PASS
    idx = index if isinstance(index, tuple) else (index,)
    if idx and idx[-1] is Ellipsis:
        idx = idx[:-1]
    ok = all(isinstance(i, slice) for i in idx[:2]) and all(i == slice(None) for i in idx[2:])
    if not ok or any(i is None or i is Ellipsis for i in idx):
        raise PlacementError(f"{what} indexes {index!r}, touching spatial axes")
    return PASS
