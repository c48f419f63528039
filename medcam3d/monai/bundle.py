"""MONAI bundles as medcam3d configs: ``medcam3d explain scan.nii.gz --bundle DIR``.

A bundle (MONAI's bundle spec) is a folder ::

    DIR/configs/metadata.json            name, version, network_data_format (output channels and their names)
    DIR/configs/inference.json|yaml      network_def, preprocessing (dictionary transforms), ...
    DIR/models/model.pt | model.ts       weights (a state_dict, or TorchScript read with torch.jit.load)

:func:`load_bundle` reads the configs with ``monai.bundle.ConfigParser`` (references ``@x`` and expressions
``$...`` resolved as MONAI resolves them -- a bundle's expressions are Python code, as when MONAI runs the bundle)
and returns a :class:`medcam3d.config.Config`: the ``network_def`` as the model spec (short ``_target_`` names
resolved as MONAI does), the preprocessing's dictionary transforms as array transforms (loading, channel and
type transforms dropped: medcam3d reads the scan itself into a channel-first RAS MetaTensor), label names from
the metadata's ``channel_def`` when present, the probability (``softmax``/``sigmoid``) and threshold from the
``postprocessing``'s ``Activations(d)`` / ``AsDiscrete(d)`` when present, and the weights.

Segmentation bundles (``task: segmentation`` in the config, :mod:`medcam3d.segmentation`): the metadata's
``network_data_format.outputs.pred`` says ``"format": "segmentation"`` (as MONAI's model-zoo segmentation bundles
do) or ``"type": "segmentation"``; or the ``postprocessing`` takes the ``argmax`` over channels (``AsDiscrete(d)``
with ``argmax=True``) of an output the metadata does not describe as anything but an image (``"type": "image"`` or
no metadata; a classification bundle's ``"probabilities"`` stays a classification). Without an ``Activations``
transform a segmentation bundle's probability is ``softmax`` (argmax over channels), and the labels from
``channel_def`` name every channel, background (channel 0) included.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from ..config import SEGMENTATION_TASK, Config, full_target
from ..errors import InputError

__all__ = ["SKIPPED_TRANSFORMS", "config_or_bundle", "load_bundle"]

#: transforms of a bundle's preprocessing that medcam3d does itself (reading, channel-first, types, devices)
SKIPPED_TRANSFORMS = (
    "LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "ToTensor", "ToDevice", "CastToType",
    "Identity", "SaveImage",
)


def _find(folder: Path, stem: str, where: Path) -> Path | None:
    for ext in (".json", ".yaml", ".yml"):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _parser(root: Path) -> tuple[ConfigParser, Path]:
    configs = root / "configs"
    inference = _find(configs, "inference", root)
    if inference is None:
        raise InputError("not a MONAI bundle: no configs/inference.json or .yaml", root)
    parser = ConfigParser()
    try:
        parser.read_config(str(inference))
        meta = _find(configs, "metadata", root)
        if meta is not None:
            parser.read_meta(str(meta))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad bundle
        raise InputError(f"cannot read the bundle's configs ({type(e).__name__}: {e})".splitlines()[0], root) from None
    return parser, inference


def _plain(item: Any) -> Any:
    """A resolved config item as plain data (components, possibly nested, as their resolved config dicts)."""
    if hasattr(item, "get_config"):
        item = item.get_config()
    if isinstance(item, Mapping):
        return {k: _plain(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return [_plain(v) for v in item]
    return item


def _resolved(parser: ConfigParser, key: str, where: Path) -> Any:
    """The config under ``key`` with references and expressions resolved, components not instantiated."""
    try:
        return _plain(parser.get_parsed_content(key, instantiate=False))
    except Exception as e:  # noqa: BLE001 - a reference or expression that fails is a bad bundle
        raise InputError(f"{key}: cannot resolve ({type(e).__name__}: {e})".splitlines()[0], where) from None


def _network(parser: ConfigParser, where: Path) -> dict[str, Any]:
    if parser.get("network_def", None) is None:
        raise InputError("the bundle's inference config has no network_def", where)
    spec = _resolved(parser, "network_def", where)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("_target_"), str):
        raise InputError("network_def must be a component with a _target_", where)
    args = {k: v for k, v in spec.items() if not str(k).startswith("_")}
    return {"_target_": full_target(spec["_target_"], where), **args}


def _preprocessing(parser: ConfigParser, where: Path) -> list[dict[str, Any]]:
    if parser.get("preprocessing", None) is None:
        return []
    pre = _resolved(parser, "preprocessing", where)
    items = pre.get("transforms", []) if isinstance(pre, Mapping) else pre
    if not isinstance(items, list):
        raise InputError("preprocessing must be a Compose of transforms or a list", where)
    out = []
    for t in items:
        if not isinstance(t, Mapping) or not isinstance(t.get("_target_"), str):
            raise InputError(f"preprocessing: {t!r} is not a transform component", where)
        name = t["_target_"].rsplit(".", 1)[-1]
        if any(name in (s, f"{s}d", f"{s}D", f"{s}Dict") for s in SKIPPED_TRANSFORMS):
            continue
        out.append({k: v for k, v in t.items() if not str(k).startswith("_") or k == "_target_"})
    return out


def _postprocessing(parser: ConfigParser, where: Path) -> list[Mapping[str, Any]]:
    """The bundle's ``postprocessing`` transforms (resolved, not instantiated); empty when it has none."""
    if parser.get("postprocessing", None) is None:
        return []
    post = _resolved(parser, "postprocessing", where)
    items = post.get("transforms", []) if isinstance(post, Mapping) else post
    return [t for t in (items if isinstance(items, list) else [])
            if isinstance(t, Mapping) and isinstance(t.get("_target_"), str)]


def _short(t: Mapping[str, Any]) -> str:
    """A transform's array name: ``monai.transforms.AsDiscreted`` -> ``AsDiscrete``."""
    return str(t["_target_"]).rsplit(".", 1)[-1].rstrip("dD").removesuffix("Dict")


def _scoring(parser: ConfigParser, where: Path) -> dict[str, Any]:
    """``probability`` (and ``threshold``) from the bundle's ``postprocessing``: ``Activations(d)`` with
    ``softmax=True`` or ``sigmoid=True``, ``AsDiscrete(d)`` with a ``threshold``; empty (medcam3d's defaults:
    sigmoid, 0.5; softmax for segmentation) when the bundle says nothing."""
    found: dict[str, Any] = {}
    for t in _postprocessing(parser, where):
        name = _short(t)
        if name == "Activations" and t.get("softmax") is True:
            found["probability"] = "softmax"
        elif name == "Activations" and t.get("sigmoid") is True:
            found["probability"] = "sigmoid"
        elif name == "AsDiscrete" and isinstance(t.get("threshold"), (int, float)) and not isinstance(
                t.get("threshold"), bool):
            found["threshold"] = float(t["threshold"])
    return found


def _task(parser: ConfigParser, where: Path) -> str | None:
    """``"segmentation"`` when the metadata or the postprocessing says the output is one (module docstring), else
    None (classification)."""
    fmt = parser.get("_meta_#network_data_format#outputs#pred", None) or {}
    fmt = fmt if isinstance(fmt, Mapping) else {}
    said = {str(fmt.get(k, "")).strip().lower() for k in ("type", "format")}
    if "segmentation" in said:
        return SEGMENTATION_TASK
    argmax = any(_short(t) == "AsDiscrete" and t.get("argmax") is True for t in _postprocessing(parser, where))
    image = not fmt or str(fmt.get("type", "")).strip().lower() == "image"
    return SEGMENTATION_TASK if argmax and image else None


def _labels(parser: ConfigParser, network: Mapping[str, Any]) -> list[str]:
    """Names from ``network_data_format.outputs.pred.channel_def``, else ``class_<i>`` for the network's outputs."""
    fmt = parser.get("_meta_#network_data_format#outputs#pred", None) or {}
    channels = fmt.get("channel_def") if isinstance(fmt, Mapping) else None
    if isinstance(channels, Mapping) and channels:
        return [str(channels[k]) for k in sorted(channels, key=lambda k: int(k))]
    n = fmt.get("num_channels") if isinstance(fmt, Mapping) else None
    for key in ("out_channels", "num_classes", "classes", "n_outputs"):
        if n is None and isinstance(network.get(key), int):
            n = network[key]
    return [f"class_{i}" for i in range(int(n or 1))]


def _weights(root: Path) -> Path | None:
    for name in ("model.pt", "model.ts"):
        if (root / "models" / name).is_file():
            return root / "models" / name
    return None


def load_bundle(folder: str | os.PathLike[str]) -> Config:
    """The :class:`~medcam3d.config.Config` of the MONAI bundle in ``folder`` (module docstring).

    Raises:
        InputError: naming the bundle: no inference config, no or a malformed ``network_def``, unreadable
            configs, a transform medcam3d refuses (random, I/O, ...). A network_def that does not build and
            weights that do not fit are reported when the model is built (:meth:`Config.build_model`).
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise InputError("no such bundle folder", root)
    parser, inference = _parser(root)
    network = _network(parser, inference)
    labels = _labels(parser, network)
    meta_name = parser.get("_meta_#name", None)
    weights = _weights(root)
    data = {
        "name": str(meta_name or root.name),
        "description": f"MONAI bundle {root}",
        "model": network,
        "weights": str(weights) if weights is not None else None,
        "labels": labels,
        "preprocessing": _preprocessing(parser, inference),
        **_scoring(parser, inference),
    }
    task = _task(parser, inference)
    if task is not None:
        data["task"] = task
    if not data["preprocessing"]:
        data["preprocessing"] = [{"_target_": "Identity"}]
    return Config.from_dict(data, path=inference)


def config_or_bundle(config: Config | str | None, bundle: str | os.PathLike[str] | None) -> Config | str | None:
    """What a command's ``--config`` / ``--bundle`` pair names: ``config`` as given (a path or shipped name, None
    for the embedded demo model), or the bundle's :class:`~medcam3d.config.Config` (:func:`load_bundle`).

    Raises:
        InputError: both given, or the bundle is not readable (see :func:`load_bundle`).
    """
    if bundle is None:
        return config
    if config is not None:
        raise InputError("give --config or --bundle, not both")
    return load_bundle(bundle)
