"""Loading models: local checkpoints (weights only), MONAI-bundle-style model specs, the embedded demo model.

* :func:`load_checkpoint` reads a checkpoint with ``torch.load(weights_only=True)``: tensors and plain containers
  only, never pickled code. It accepts a raw state_dict or a dict holding one under ``"state_dict"``,
  ``"model_state_dict"``, ``"model"``, ``"params"`` (the format of Draelos & Carin's training code:
  ``{"params": model.state_dict(), "optimizer": ...}``), ``"net"`` or ``"network"`` (MONAI's CheckpointSaver
  dicts, ``{"net": ..., "opt": ...}``), and strips ``module.`` (DataParallel) and ``_orig_mod.``
  (``torch.compile``) prefixes. TorchScript archives (a MONAI bundle's ``models/model.ts``) are read with
  ``torch.jit.load`` -- TorchScript, not pickled Python -- and their parameters and buffers used.
* :func:`build_model` instantiates a spec ``{"_target_": "medcam3d.models.AxialNet", "n_outputs": 13, ...}``
  (any importable ``nn.Module`` class, e.g. ``monai.networks.nets.DenseNet121``; factory functions only from
  :data:`TRUSTED_FACTORY_MODULES`) and optionally loads weights.
* :func:`declare_model` sets what a model declares to medcam3d (``medcam3d_labels``, ``medcam3d_target_layer``,
  ``medcam3d_layout``); :meth:`medcam3d.config.Config.build_model` and the deprecated :func:`load_model_spec` use it.
* :func:`load_state_dict_checked` loads a state_dict into a module after checking its keys and shapes, with a
  one-line :class:`~medcam3d.errors.InputError` listing a few bad keys (the one home of that check).
* :func:`load_model_spec` (deprecated: the model YAML format is :mod:`medcam3d.config`'s) reads a YAML file
  ``{model: {...}, weights: ..., labels: [...], target_layer: ..., layout: ...}``.
* :func:`load_demo` returns the demo AxialNet shipped in ``medcam3d/weights/`` (trained on synthetic phantoms).

Weights paths: absolute, relative to ``base_dir`` (a spec file's folder), or ``package:PKG/relative/path``,
resolved inside an installed package with :mod:`importlib.resources` (e.g. ``package:medcam3d/weights/x.pt``) by
:func:`resolve_package_path`, the one resolver of ``package:`` paths (:mod:`medcam3d.config` uses it too; it lives
here, in the lower layer, so that models never import the config layer).
"""

from __future__ import annotations

import importlib
import importlib.resources
import inspect
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..layouts import Layout, resolve_layout

__all__ = [
    "DEMO_MODEL",
    "TRUSTED_FACTORY_MODULES",
    "build_model",
    "declare_model",
    "load_checkpoint",
    "load_demo",
    "load_model_spec",
    "load_state_dict_checked",
    "read_state_dict",
    "resolve_package_path",
    "resolve_weights",
]

#: Modules whose plain functions may be used as ``_target_`` (classes must subclass ``nn.Module`` instead).
TRUSTED_FACTORY_MODULES: tuple[str, ...] = ("medcam3d.models", "monai.networks")

#: Name of the embedded demo model: ``medcam3d/weights/<DEMO_MODEL>.pt`` and ``.json``.
DEMO_MODEL = "demo_axialnet"

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "params", "net", "network")
_PREFIXES = ("module.", "_orig_mod.")
_PACKAGE_PREFIX = "package:"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def read_state_dict(path: str | PathLike[str]) -> dict[str, Tensor]:
    """Read a state_dict from a checkpoint file with ``torch.load(path, map_location="cpu", weights_only=True)``.

    Unwraps ``{"state_dict"|"model_state_dict"|"model"|"params"|"net"|"network": {...}}``, reads TorchScript
    archives with ``torch.jit.load`` and strips ``module.``/``_orig_mod.``
    prefixes. Returns ``{name: tensor}``.

    Raises:
        InputError: (naming the file) missing or unreadable file, a checkpoint holding pickled objects other than
            tensors and plain containers, or no state_dict inside.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError("checkpoint file not found", p)
    if _is_torchscript(p):
        return _torchscript_state(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
        if found:  # the weights-only unpickler met a reference to a Python object (class, function, ...)
            raise InputError(
                f"the checkpoint contains pickled Python objects ({found.group(1)}), not only tensors; medcam3d "
                "never unpickles code (torch.load weights_only=True). Re-save it with "
                "torch.save(model.state_dict(), path)",
                p,
            ) from None
        raise InputError("not a readable PyTorch checkpoint (corrupt or not written by torch.save)", p) from None
    except Exception as exc:  # zip/EOF/runtime errors from a corrupt or foreign file
        raise InputError(f"not a readable PyTorch checkpoint ({_first_line(exc)})", p) from None
    state = _unwrap(obj)
    if state is None:
        keys = sorted(map(str, obj))[:6] if isinstance(obj, Mapping) else []
        raise InputError(
            f"no state_dict found in the checkpoint (a {type(obj).__name__}"
            + (f" with keys {keys}" if keys else "")
            + f"); expected a dict of tensors or one under {list(_WRAPPER_KEYS)}",
            p,
        )
    return _strip_prefixes(state)


def _is_torchscript(p: Path) -> bool:
    """True for a TorchScript archive (``torch.jit.save``): a zip holding ``*/constants.pkl`` and ``*/code/``."""
    if not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _torchscript_state(p: Path) -> dict[str, Tensor]:
    """Parameters and buffers of a TorchScript archive (``torch.jit.load``: TorchScript IR, no Python unpickled)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 deprecates jit; bundles still ship .ts
            module = torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure means an unreadable archive
        raise InputError(f"not a readable TorchScript file ({_first_line(exc)})", p) from None
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if not state:
        raise InputError("the TorchScript file holds no parameters or buffers", p)
    return _strip_prefixes(state)


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _unwrap(obj: object) -> dict[str, Tensor] | None:
    if _is_state_dict(obj):
        return dict(obj)  # type: ignore[call-overload]  # _is_state_dict checked it is a Mapping[str, Tensor]
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                return dict(obj[key])
    return None


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _mismatch_message(missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str], n: int = 4) -> str:
    def few(items: Sequence[str]) -> str:
        more = f", ... ({len(items) - n} more)" if len(items) > n else ""
        return ", ".join(items[:n]) + more

    parts = ["the weights do not fit the model"]
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {few(shapes)}")
    return "; ".join(parts)


def load_state_dict_checked(
    module: nn.Module, state: Mapping[str, Tensor], where: str | PathLike[str], strict: bool = True
) -> nn.Module:
    """Load ``state`` (``{name: tensor}``) into ``module`` (in place) after checking that it fits; returns ``module``.

    With ``strict`` every parameter and buffer must be present with the right shape and no extra keys may appear;
    BatchNorm ``num_batches_tracked`` counters may be absent (old checkpoints). With ``strict=False`` missing and
    unexpected keys are ignored but shapes must still match.

    Raises:
        InputError: naming ``where`` (the checkpoint file, or a description of the state_dict), with a few of the
            missing and unexpected keys and shape mismatches listed.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if shapes or (strict and (missing or unexpected)):
        raise InputError(_mismatch_message(missing if strict else [], unexpected if strict else [], shapes), where)
    try:
        module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    except RuntimeError as exc:  # dtype/device oddities not caught above
        raise InputError(f"cannot load the weights ({_first_line(exc)})", where) from None
    return module


def load_checkpoint(model: nn.Module, path: str | PathLike[str], strict: bool = True) -> nn.Module:
    """Load the weights in the local checkpoint ``path`` into ``model`` (in place) and return ``model``.

    With ``strict`` (default) every parameter and buffer must be present with the right shape and no extra keys
    may appear; BatchNorm ``num_batches_tracked`` counters may be absent (old checkpoints). With
    ``strict=False`` missing and unexpected keys are ignored but shapes must still match.

    Raises:
        InputError: naming the file: missing/corrupt file, pickled code, or keys/shapes that do not fit (a few
            missing and unexpected keys are listed).
    """
    return load_state_dict_checked(model, read_state_dict(path), path, strict)


def resolve_package_path(spec: str, where: str | PathLike[str] | None = None) -> Path:
    """``"package:PKG/rel/path"`` -> the file inside the installed package ``PKG`` (need not exist yet).

    ``PKG`` may be a subpackage (``package:medcam3d.models/loading.py``). ``where`` (a file) is named in errors.

    Raises:
        InputError: not of that form, or no installed package ``PKG``.
    """
    rest = spec.removeprefix(_PACKAGE_PREFIX).lstrip("/")
    pkg, _, rel = rest.partition("/")
    if not pkg or not rel:
        raise InputError(f"package path {spec!r} must look like 'package:PKG/relative/path'", where)
    try:
        root = importlib.resources.files(pkg)
    except (ModuleNotFoundError, TypeError):
        raise InputError(f"package path {spec!r}: no installed package {pkg!r}", where) from None
    return Path(str(root.joinpath(rel)))


def resolve_weights(weights: str | PathLike[str], base_dir: str | PathLike[str] | None = None) -> Path:
    """Turn a weights reference into a file path.

    ``package:PKG/rel/path`` resolves inside the installed package ``PKG``; a relative path resolves against
    ``base_dir`` (default: the current directory); ``~`` is expanded. The file is not opened here."""
    text = str(weights)
    if text.startswith(_PACKAGE_PREFIX):
        return resolve_package_path(text)
    p = Path(text).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir).expanduser() / p
    return p


def _resolve_target(target: object) -> Any:
    if not isinstance(target, str) or "." not in target:
        raise InputError(
            f"model spec: _target_ {target!r} must be a dotted import path like 'monai.networks.nets.UNet'"
        )
    if target.startswith(("$", "@", "%")):
        raise InputError(f"model spec: _target_ {target!r}: MONAI bundle expressions/references are not supported")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(
            f"model spec: cannot import {module_name!r} for _target_ {target!r} ({_first_line(exc)})"
        ) from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise InputError(f"model spec: {module_name!r} has no attribute {attr!r} (_target_ {target!r})")
    if inspect.isclass(obj):
        if not issubclass(obj, nn.Module):
            raise InputError(f"model spec: _target_ {target!r} is a class but not a torch.nn.Module")
        return obj
    if callable(obj):
        home = getattr(obj, "__module__", "") or ""
        if not any(home == m or home.startswith(m + ".") for m in TRUSTED_FACTORY_MODULES):
            raise InputError(
                f"model spec: _target_ {target!r} is a function from {home!r}; only nn.Module classes, or factory "
                f"functions from {list(TRUSTED_FACTORY_MODULES)}, may be used"
            )
        return obj
    raise InputError(f"model spec: _target_ {target!r} is not callable")


def build_model(
    spec: Mapping[str, Any],
    weights: str | PathLike[str] | None = None,
    base_dir: str | PathLike[str] | None = None,
) -> nn.Module:
    """Instantiate a model from a MONAI-bundle-style spec and optionally load weights.

    Args:
        spec: ``{"_target_": "dotted.path.Class", **kwargs}``, e.g.
            ``{"_target_": "medcam3d.models.AxialNet", "n_outputs": 13, "width": 16, "feature_stride": 8,
            "in_plane": [128, 128]}`` or ``{"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 3,
            "in_channels": 1, "out_channels": 2}``. Other keys are keyword arguments, passed as they are.
        weights: optional checkpoint (see :func:`resolve_weights` for the forms), loaded strictly with
            :func:`load_checkpoint`.
        base_dir: folder that relative weights paths are relative to (the spec file's folder).

    Returns:
        the model, in eval mode if weights were loaded (train mode otherwise, as constructed).

    Raises:
        InputError: unknown/forbidden ``_target_``, bad arguments, a target that does not return an
            ``nn.Module``, or weights that cannot be loaded.
    """
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise InputError(f"model spec must be a mapping with a '_target_' key, got {spec!r}")
    target = spec["_target_"]
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    bad = [k for k in kwargs if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise InputError(f"model spec for {target!r}: argument names {bad} are not valid identifiers")
    factory = _resolve_target(target)
    try:
        model = factory(**kwargs)
    except InputError:
        raise
    except (TypeError, ValueError, AssertionError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise InputError(f"model spec: {target}({', '.join(kwargs)}) failed: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"model spec: _target_ {target!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_checkpoint(model, resolve_weights(weights, base_dir))
        model.eval()
    return model


def declare_model(
    model: nn.Module,
    labels: Sequence[str] | None = None,
    target_layer: str | None = None,
    layout: Layout | str | None = None,
) -> nn.Module:
    """Declare on ``model`` (in place; returned) what medcam3d reads from it: the class names of its outputs
    (``medcam3d_labels``), the default explained layer (``medcam3d_target_layer``, a dotted module name) and how
    that layer's activations are laid out (``medcam3d_layout``: a :mod:`medcam3d.layouts` layout or its name).

    These become instance attributes, overriding the model class's own (docs/architecture.md); ``None`` leaves an
    attribute as it is.

    Raises:
        InputError: an unknown layout name.
    """
    # setattr: nn.Module's __setattr__ is typed for tensors and modules only, these are plain attributes
    if labels is not None:
        setattr(model, "medcam3d_labels", [str(x) for x in labels])
    if target_layer is not None:
        setattr(model, "medcam3d_target_layer", str(target_layer))
    if layout is not None:
        setattr(model, "medcam3d_layout", resolve_layout(layout))
    return model


_SPEC_KEYS = {"model", "weights", "labels", "target_layer", "layout"}


def load_model_spec(path: str | PathLike[str]) -> nn.Module:
    """Build the model described by a YAML file and return it.

    .. deprecated:: 0.1
        medcam3d has one model YAML format, the config's (:mod:`medcam3d.config`: the same ``model``,
        ``weights``, ``labels``, ``target_layer`` and ``layout`` keys, plus ``name`` and ``preprocessing``): use
        ``medcam3d.config.load_config(path).build_model()``. This reader stays for one release and warns.

    The file holds::

        model:                        # build_model spec
          _target_: monai.networks.nets.DenseNet121
          spatial_dims: 3
          in_channels: 1
          out_channels: 2
        weights: densenet_ct.pt       # optional; relative to this file's folder, or package:PKG/path
        labels: [nodule, effusion]    # optional; sets model.medcam3d_labels
        target_layer: features.norm5  # optional; sets model.medcam3d_target_layer
        layout: channels_first        # optional; sets model.medcam3d_layout (a medcam3d.layouts name)

    Raises:
        InputError: naming the file, for unreadable YAML, unknown keys, or any :func:`build_model` error.
    """
    warnings.warn(
        "medcam3d.models.load_model_spec is deprecated and will be removed in the next release: write a config "
        "(medcam3d.config; same model/weights/labels/target_layer/layout keys plus name and preprocessing) and use "
        "medcam3d.config.load_config(path).build_model()",
        DeprecationWarning,
        stacklevel=2,
    )
    import yaml  # lazy: PyYAML belongs to the config layer; only this deprecated reader needs it here

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError("model spec file not found", p)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read the model spec ({_first_line(exc)})", p) from None
    if not isinstance(doc, Mapping) or "model" not in doc:
        raise InputError("a model spec file must be a mapping with a 'model' key", p)
    unknown = sorted(set(map(str, doc)) - _SPEC_KEYS)
    if unknown:
        raise InputError(f"unknown keys {unknown} in the model spec; allowed: {sorted(_SPEC_KEYS)}", p)
    try:
        return _build_from_spec_doc(doc, p.parent)
    except InputError as exc:
        if exc.path is not None:
            raise
        raise InputError(str(exc), p) from None


def _build_from_spec_doc(doc: Mapping[str, Any], base_dir: Path) -> nn.Module:
    """The model of a (deprecated) model spec document, with its declarations checked and set."""
    model = build_model(doc["model"], doc.get("weights"), base_dir=base_dir)
    labels = doc.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, (str, int)) for x in labels)):
        raise InputError("labels must be a list of names")
    target_layer = doc.get("target_layer")
    if target_layer is not None and str(target_layer) not in dict(model.named_modules()):
        raise InputError(f"target_layer {str(target_layer)!r} is not a module of the model")
    layout = doc.get("layout")
    return declare_model(
        model,
        labels=labels,
        target_layer=None if target_layer is None else str(target_layer),
        layout=None if layout is None else str(layout),
    )


def load_demo(name: str = DEMO_MODEL) -> nn.Module:
    """Return an embedded demo model, ready for :class:`medcam3d.Explainer` (eval mode, labels set).

    Reads ``medcam3d/weights/<name>.pt`` (a state_dict) and its model card ``medcam3d/weights/<name>.json``, which
    must hold at least ``{"model": {"_target_": ..., **args}, "labels": [...]}`` (a :func:`build_model` spec);
    the card's other entries (preprocessing, input size, spacing, training seed, held-out metrics, the note that
    it was trained on synthetic phantoms only) are attached as ``model.medcam3d_model_card``.

    Raises:
        InputError: the demo weights or card are not installed, or do not fit.
    """
    weights_dir = importlib.resources.files("medcam3d").joinpath("weights")
    pt, card_file = weights_dir.joinpath(f"{name}.pt"), weights_dir.joinpath(f"{name}.json")
    if not pt.is_file() or not card_file.is_file():
        raise InputError(
            f"the demo model {name!r} is not installed (expected medcam3d/weights/{name}.pt and {name}.json); "
            "train it with scripts/train_demo.py or give a model explicitly"
        )
    try:
        card = json.loads(card_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the model card ({_first_line(exc)})", str(card_file)) from None
    if not isinstance(card, dict) or not isinstance(card.get("model"), dict):
        raise InputError("the model card has no 'model' spec", str(card_file))
    model = declare_model(build_model(card["model"], weights=Path(str(pt))), labels=card.get("labels"))
    setattr(model, "medcam3d_model_card", card)  # setattr: a plain attribute (see declare_model)
    return model.eval()
