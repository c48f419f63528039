"""Model + preprocessing configs: one YAML file says how a scan becomes a network input and what comes out.

Schema (every key is checked; an unknown key, a wrong type or an unknown transform is an
:class:`~medcam3d.errors.InputError` naming the config file)::

    name: axialnet_chestct            # required, str
    description: "..."                # optional, str
    model:                            # required: MONAI-bundle style spec, built by medcam3d.models.build_model
      _target_: medcam3d.models.AxialNet
      n_outputs: 80                   # if present (int), must equal len(labels)
    weights: null                     # optional: path relative to this file, absolute, or
                                      #   "package:medcam3d/weights/NAME.pt" (a file shipped inside a package)
    target_layer: conv2d.7            # optional: dotted module name (default: the model's medcam3d_target_layer)
    layout: slices_as_batch           # optional: slices_as_batch | channels_first | channels_last
    map_geometry: auto                # optional: where the explained cells are drawn: auto (default) | field |
                                      #   receptive (medcam3d.placement); --map-geometry overrides it
    labels: [a, b, ...]               # required: unique class names, in the model's output order
    input_size: [405, 420, 420]       # optional: network grid (S, H, W); the preprocessing must produce it
    min_size: [64, 128, 128]          # optional: the scan, reoriented and resampled, must cover at least this
                                      #   many network-grid voxels (S, H, W) before padding/cropping
    preprocessing:                    # required: MONAI array transforms by name, applied in order to a
      - {_target_: Orientation, axcodes: SPL}        # channel-first [1, *spatial] RAS MetaTensor
      - {_target_: Spacing, pixdim: [0.8, 0.8, 0.8], mode: bilinear}
      - ...
    probability: sigmoid              # optional: sigmoid (multi-label, default) | softmax
    threshold: 0.5                    # optional: probability at or above which a class is called positive
    allowed_regions: {}               # optional: label -> list of organ names where its evidence may lie
    modality: CT                      # optional: the DICOM modality (or list of them) the model reads; absent:
                                      #   no modality check (see "Modality" below)
    task: segmentation                # optional: classification (default) | segmentation (the model outputs
                                      #   per-voxel scores [B, C, *spatial] on the input grid; see below)
    targets:                          # optional, segmentation only: what is explained (medcam3d.targets)
      region: components              #   components (default: each 26-connected component of a class's predicted
                                      #   mask, largest first) | predicted (the class's whole predicted mask)
      reduce: sum                     #   sum (default) | mean of the class's logits over the region
      max_targets: 20                 #   most components per class (the smallest are dropped, with a note)
      min_voxels: 1                   #   predicted regions with fewer voxels are dropped, with a note
      classes: [nodule, mass]         #   classes (labels or channel indices) to explain; default: every class
                                      #   but the background
      background: background          #   the background channel (label or index): default 0 for softmax,
                                      #   none for sigmoid

Transforms: ``_target_`` names a class of ``monai.transforms`` (``Spacing`` or ``monai.transforms.Spacing``) from
its spatial, crop/pad, intensity or utility array transforms; a dictionary transform (``Spacingd``, as MONAI bundles
write them) stands for its array version, its dictionary-only arguments (``keys``, ``allow_missing_keys``, ...)
dropped; random, compose and I/O transforms are refused (preprocessing must be deterministic, invertible where
it moves voxels, and must not touch files). The other keys are the transform's arguments, checked against its
signature and by instantiating it.
The network grid is expected in MONAI axcodes ``"SPL"`` (docs/architecture.md): start with
``{_target_: Orientation, axcodes: SPL}``; ``Spacing.pixdim`` is then (slice, row, column) mm.

Segmentation (``task: segmentation``, or a model declaring ``medcam3d_task = "segmentation"``): the labels name
the output channels (background included), ``probability`` says how the prediction is made (``softmax``: argmax
over channels, the default for ``task: segmentation``; ``sigmoid``: each channel at or above ``threshold``), and
each region of the prediction is a target (:class:`TargetSettings`, :class:`medcam3d.targets.SegmentationRegions`).

Modality: with ``modality``, a DICOM series whose Modality tag is not listed is refused (unless the caller
overrides the check), and a scan without a Modality tag (NIfTI, NRRD) whose intensities do not look like the
config's modality gets one warning line (:mod:`medcam3d.io.modality`). Codes are upper-cased DICOM Modality values
(``CT``, ``MR``, ``PT``, ...).

The model's ``_target_`` may be a short name (``DenseNet121``): it is resolved the way MONAI bundles resolve
it (``monai.bundle.ComponentLocator``: the first MONAI module defining that name).

``load_config(x)`` accepts a path, ``"package:medcam3d/configs/NAME.yaml"`` or the bare name of a shipped
config (``"axialnet_chestct"``, ``"demo_axialnet"``; see :func:`available_configs`).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError
from .geometry import GEOMETRIES
from .models.loading import build_model, declare_model, resolve_package_path

__all__ = [
    "TOP_LEVEL_KEYS",
    "CLASSIFICATION_TASK",
    "SEGMENTATION_TASK",
    "TASKS",
    "Config",
    "TargetSettings",
    "available_configs",
    "instantiate_transform",
    "load_config",
    "resolve_package_path",  # its home is medcam3d.models.loading (models never import config); re-exported
    "full_target",
    "resolve_transform",
]

TOP_LEVEL_KEYS = (
    "name", "description", "model", "weights", "target_layer", "layout", "labels", "input_size", "min_size",
    "preprocessing", "probability", "threshold", "allowed_regions", "modality", "map_geometry", "task", "targets",
)
#: what a model does: ``classification`` (class scores ``[B, M]``) or ``segmentation`` (``[B, C, *spatial]``)
#: The task names of ``task:`` (one home; readers of output folders compare ``Summary.task`` with these).
CLASSIFICATION_TASK = "classification"
SEGMENTATION_TASK = "segmentation"
TASKS = (CLASSIFICATION_TASK, SEGMENTATION_TASK)
_TARGET_KEYS = ("region", "reduce", "max_targets", "min_voxels", "classes", "background")
_REGIONS = ("components", "predicted")
_REDUCES = ("sum", "mean")
_REQUIRED = ("name", "model", "labels", "preprocessing")
_LAYOUTS = ("slices_as_batch", "channels_first", "channels_last")
_PROBABILITIES = ("sigmoid", "softmax")
_ALLOWED_MODULES = (
    "monai.transforms.spatial.array",
    "monai.transforms.croppad.array",
    "monai.transforms.intensity.array",
    "monai.transforms.utility.array",
)
_REFUSED = {"Lambda", "SimulateDelay", "ToDevice", "CuCIM", "TorchVision", "TorchIO", "DataStats"}
#: extra keyword arguments accepted by transforms with ``**pad_kwargs`` (passed on to numpy/torch padding)
_PAD_KWARGS = ("value", "constant_values")
_GEOMETRIC_MODULES = ("monai.transforms.spatial.array", "monai.transforms.croppad.array")
_PACKAGE_PREFIX = "package:"
#: MONAI's RAS axis labels, passed to Orientation explicitly (our MetaTensors are RAS; see docs/architecture.md)
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


# --- YAML -------------------------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain PyYAML keeps the last one silently); ``where`` names the file
    in the error."""

    def __init__(self, stream: str, where: Path | str = "<config>") -> None:
        super().__init__(stream)
        self.where = where

    def construct_unique_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise InputError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", self.where)
            seen.add(key)
        return self.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_unique_mapping)


def _yaml_load(text: str, where: Path | str) -> Any:
    loader = _StrictLoader(text, where)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"not valid YAML{line}: {problem}", where) from None
    finally:
        loader.dispose()


# --- paths ------------------------------------------------------------------------------------------------------
def _configs_dir() -> Path:
    return Path(__file__).resolve().parent / "configs"


def available_configs() -> list[str]:
    """Names of the configs shipped in ``medcam3d/configs``."""
    return sorted(p.stem for p in _configs_dir().glob("*.yaml"))


def _locate(path_or_name: str | os.PathLike[str]) -> Path:
    s = str(path_or_name)
    if s.startswith(_PACKAGE_PREFIX):
        p = resolve_package_path(s)
    else:
        p = Path(s)
        if not p.exists() and os.sep not in s and "/" not in s and not p.suffix:
            shipped = _configs_dir() / f"{s}.yaml"
            if shipped.exists():
                return shipped
            raise InputError(f"no such config file, and no shipped config of that name (shipped: "
                             f"{', '.join(available_configs())})", s)
    if not p.exists():
        raise InputError("no such config file", p)
    if p.is_dir():
        raise InputError("is a folder, not a config file", p)
    return p


# --- transforms ---------------------------------------------------------------------------------------------------
def resolve_transform(name: Any, where: Path | str | None = None, item: str = "") -> type:
    """The ``monai.transforms`` array-transform class called ``name`` (or ``monai.transforms.NAME``)."""
    # lazy: MONAI's transforms take seconds to import and only configs with preprocessing need them
    import monai.transforms as mt
    from monai.transforms import (
        InvertibleTransform,
        MapTransform,
        Randomizable,
        Transform,
    )

    if not isinstance(name, str) or not name:
        raise InputError(f"{item}_target_ must be a transform name, got {name!r}", where)
    short = name.removeprefix("monai.transforms.")
    cls = getattr(mt, short, None) if "." not in short else None
    if not inspect.isclass(cls) or not issubclass(cls, Transform):
        raise InputError(f"{item}unknown transform {name!r} (expected a class of monai.transforms, e.g. "
                         "Orientation, Spacing, ScaleIntensityRange, ResizeWithPadOrCrop)", where)
    if issubclass(cls, MapTransform):  # a dictionary transform stands for its array version
        short, cls = _array_version(short, cls)
        if cls is None:
            raise InputError(f"{item}{name} is a dictionary transform without an array version", where)
    if cls.__module__ not in _ALLOWED_MODULES or short in _REFUSED:
        raise InputError(f"{item}transform {short} ({cls.__module__}) is not allowed in preprocessing; use spatial, "
                         "crop/pad, intensity or utility array transforms", where)
    if issubclass(cls, Randomizable):
        raise InputError(f"{item}{short} is random; preprocessing for explanations must be deterministic", where)
    if cls.__module__ in _GEOMETRIC_MODULES and not issubclass(cls, InvertibleTransform):
        raise InputError(f"{item}{short} moves voxels but cannot be inverted, so maps could not be brought back to "
                         "the scan", where)
    return cls


def _array_version(short: str, cls: type) -> tuple[str, Any]:
    """``(name, class)`` of the array transform a dictionary transform wraps (``Spacingd`` -> ``Spacing``; MONAI
    also spells them ``SpacingD`` and ``SpacingDict``); class None when there is none."""
    import monai.transforms as mt  # lazy: as in resolve_transform

    base = cls.__name__
    for suffix in ("Dict", "D", "d"):
        if base.endswith(suffix):
            array = getattr(mt, base[: -len(suffix)], None)
            if inspect.isclass(array) and not issubclass(array, mt.MapTransform):
                return array.__name__, array
    return short, None


def _dictionary_only(name: Any) -> set[str]:
    """Arguments of the dictionary transform ``name`` that its array version does not take (``keys``, ...)."""
    import monai.transforms as mt  # lazy: as in resolve_transform

    short = str(name).removeprefix("monai.transforms.")
    cls = getattr(mt, short, None) if "." not in short else None
    if not inspect.isclass(cls) or not issubclass(cls, mt.MapTransform):
        return set()
    _, array = _array_version(short, cls)
    if array is None:
        return set()
    return set(inspect.signature(cls).parameters) - set(inspect.signature(array).parameters)


def instantiate_transform(spec: Mapping[str, Any], where: Path | str | None = None, item: str = "",
                          overrides: Mapping[str, Any] | None = None) -> Any:
    """Instantiate one ``{_target_: Name, **args}`` spec (``overrides`` replace arguments the class accepts)."""
    if not isinstance(spec, Mapping):
        raise InputError(f"{item}must be a mapping like {{_target_: Spacing, pixdim: [1, 1, 1]}}, got {spec!r}",
                         where)
    if "_target_" not in spec:
        raise InputError(f"{item}has no _target_ (the transform's name)", where)
    cls = resolve_transform(spec["_target_"], where, item)
    dropped = _dictionary_only(spec["_target_"])
    args = {k: v for k, v in spec.items() if k != "_target_" and k not in dropped}
    for k in args:
        if not isinstance(k, str) or k.startswith("_"):
            raise InputError(f"{item}{cls.__name__}: unknown key {k!r}", where)
    sig = inspect.signature(cls)
    params = sig.parameters
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if cls.__name__ == "Orientation" and "labels" not in args:
        args["labels"] = RAS_LABELS
    for k, v in (overrides or {}).items():
        if k in params:
            args[k] = v
    unknown = [k for k in args if k not in params and not (accepts_kwargs and k in _PAD_KWARGS)]
    if unknown:
        accepted = [p for p, v in params.items() if p != "lazy" and v.kind is not inspect.Parameter.VAR_KEYWORD]
        if accepts_kwargs:
            accepted += list(_PAD_KWARGS)
        raise InputError(f"{item}{cls.__name__}: unknown argument {unknown[0]!r} (accepted: {', '.join(accepted)})",
                         where)
    if cls.__name__ == "Orientation":
        _check_axcodes(args.get("axcodes"), where, item)
    try:
        sig.bind(**args)
    except TypeError as e:
        raise InputError(f"{item}{cls.__name__}: bad arguments ({e})", where) from None
    if args.get("lazy"):
        raise InputError(f"{item}{cls.__name__}: lazy resampling is not supported", where)
    try:
        return cls(**args)
    except Exception as e:  # noqa: BLE001 - any constructor failure is a config problem
        raise InputError(f"{item}{cls.__name__}: bad arguments ({type(e).__name__}: {e})", where) from None


def _check_axcodes(axcodes: Any, where: Path | str | None, item: str) -> None:
    """Orientation axcodes: three letters, one from each of L/R, P/A, I/S (e.g. "SPL", "RAS")."""
    ok = isinstance(axcodes, str) and len(axcodes) == 3
    if ok:
        pairs = [{"L", "R"}, {"P", "A"}, {"I", "S"}]
        used = [next((i for i, pair in enumerate(pairs) if c in pair), None) for c in axcodes.upper()]
        ok = None not in used and sorted(used) == [0, 1, 2]  # type: ignore[type-var]
    if not ok:
        raise InputError(f"{item}Orientation: axcodes {axcodes!r} must be three letters, one of L/R, one of P/A and "
                         "one of I/S (the network grid is SPL)", where)


# --- the config -----------------------------------------------------------------------------------------------------
def _size3(value: Any, key: str, where: Path | str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise InputError(f"{key} must be a list of 3 positive integers (S, H, W), got {value!r}", where)
    return (int(value[0]), int(value[1]), int(value[2]))


# --- validating a parsed config (Config.from_dict) ------------------------------------------------------------------
def _check_keys(data: Any, where: Path | str) -> None:
    """A mapping, with only known keys and every required one."""
    if not isinstance(data, Mapping):
        raise InputError(f"a config must be a YAML mapping of keys ({', '.join(_REQUIRED)}, ...), got "
                         f"{type(data).__name__}", where)
    for k in data:
        if k not in TOP_LEVEL_KEYS:
            raise InputError(f"unknown key {k!r} (allowed: {', '.join(TOP_LEVEL_KEYS)})", where)
    for k in _REQUIRED:
        if k not in data or data[k] is None:
            raise InputError(f"missing required key {k!r}", where)


def _check_text(data: Mapping[str, Any], where: Path | str) -> tuple[str, str]:
    """``(name, description)``."""
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"name must be a non-empty string, got {name!r}", where)
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise InputError("description must be a string", where)
    return name, description


def _check_model_and_labels(data: Mapping[str, Any], where: Path | str) -> tuple[dict[str, Any], list[str]]:
    """``(model spec, labels)``; ``model.n_outputs``, when given, must count the labels."""
    model = data["model"]
    if not isinstance(model, Mapping) or not isinstance(model.get("_target_"), str):
        raise InputError("model must be a mapping with a _target_ (import path of the network class), e.g. "
                         "{_target_: medcam3d.models.AxialNet, n_outputs: 80}", where)
    model = {**model, "_target_": full_target(model["_target_"], where)}
    labels = data["labels"]
    if (not isinstance(labels, list) or not labels
            or not all(isinstance(x, str) and x.strip() for x in labels)):
        raise InputError("labels must be a non-empty list of class names", where)
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise InputError(f"duplicate labels {dup}", where)
    n_out = model.get("n_outputs")
    if isinstance(n_out, int) and not isinstance(n_out, bool) and n_out != len(labels):
        raise InputError(f"{len(labels)} labels but model.n_outputs is {n_out}", where)
    return dict(model), list(labels)


def full_target(target: str, where: Path | str | None = None) -> str:
    """A model ``_target_`` as a dotted path: a short name (``DenseNet121``) is looked up the way MONAI bundles do
    (``monai.bundle.ComponentLocator``; the first module when several define it). Dotted paths are kept."""
    if "." in target or target.startswith(("$", "@", "%")):
        return target
    from monai.bundle import ComponentLocator  # lazy: MONAI takes seconds to import

    found = ComponentLocator().get_component_module_name(target)
    if isinstance(found, list):
        found = found[0] if found else None
    if not found:
        raise InputError(f"model: _target_ {target!r} is neither a dotted import path nor a name MONAI knows", where)
    return f"{found}.{target}"


def _check_declarations(data: Mapping[str, Any], where: Path | str) -> tuple[str | None, str | None, str | None]:
    """``(weights, target_layer, layout)``, each ``None`` when absent."""
    weights = data.get("weights")
    if weights is not None and (not isinstance(weights, str) or not weights.strip()):
        raise InputError(f"weights must be a path string or null, got {weights!r}", where)
    target_layer = data.get("target_layer")
    if target_layer is not None and (not isinstance(target_layer, str) or not target_layer.strip()):
        raise InputError(f"target_layer must be a dotted module name, got {target_layer!r}", where)
    layout = data.get("layout")
    if layout is not None and layout not in _LAYOUTS:
        raise InputError(f"unknown layout {layout!r} (choose {', '.join(_LAYOUTS)})", where)
    return weights, target_layer, layout


def _check_map_geometry(data: Mapping[str, Any], where: Path | str) -> str | None:
    """``map_geometry`` (one of :data:`medcam3d.geometry.GEOMETRIES`), None when absent."""
    kind = data.get("map_geometry")
    if kind is not None and kind not in GEOMETRIES:
        raise InputError(f"map_geometry must be one of {', '.join(GEOMETRIES)}, got {kind!r}", where)
    return kind


def _check_scoring(data: Mapping[str, Any], where: Path | str, default: str = "sigmoid") -> tuple[str, float]:
    """``(probability, threshold)``, defaults ``default`` (sigmoid; softmax for segmentation) and 0.5."""
    probability = data.get("probability", default)
    if probability not in _PROBABILITIES:
        raise InputError(f"probability must be one of {', '.join(_PROBABILITIES)}, got {probability!r}", where)
    threshold = data.get("threshold", 0.5)
    if (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
            or not 0.0 <= threshold <= 1.0):
        raise InputError(f"threshold must be a number in [0, 1], got {threshold!r}", where)
    return probability, float(threshold)


def _check_regions(data: Mapping[str, Any], labels: Sequence[str], where: Path | str) -> dict[str, list[str]]:
    """``allowed_regions``: label -> organ names (a single name becomes a one-item list)."""
    regions = data.get("allowed_regions") or {}
    if not isinstance(regions, Mapping):
        raise InputError("allowed_regions must map labels to lists of organ names", where)
    allowed: dict[str, list[str]] = {}
    for lab, organs in regions.items():
        if lab not in labels:
            raise InputError(f"allowed_regions: unknown label {lab!r} (not in labels)", where)
        if isinstance(organs, str):
            organs = [organs]
        if not isinstance(organs, list) or not all(isinstance(o, str) and o for o in organs):
            raise InputError(f"allowed_regions[{lab!r}] must be a list of organ names", where)
        allowed[str(lab)] = list(organs)
    return allowed


def _check_modality(data: Mapping[str, Any], where: Path | str) -> tuple[str, ...] | None:
    """``modality``: one DICOM Modality code or a list of them, upper-cased; ``None`` when absent."""
    value = data.get("modality")
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or not items
            or not all(isinstance(m, str) and m.strip().isalnum() and len(m.strip()) <= 16 for m in items)):
        raise InputError(f"modality must be a DICOM Modality code like CT or MR, or a list of them, got {value!r}",
                         where)
    return tuple(dict.fromkeys(m.strip().upper() for m in items))


def _check_preprocessing(data: Mapping[str, Any], input_size: tuple[int, int, int] | None,
                         where: Path | str) -> list[dict[str, Any]]:
    """The transform specs, each validated by instantiating it; the last crop/pad must produce ``input_size``."""
    pre = data["preprocessing"]
    if not isinstance(pre, list) or not pre:
        raise InputError("preprocessing must be a non-empty list of transforms", where)
    specs: list[dict[str, Any]] = []
    for i, spec in enumerate(pre):
        instantiate_transform(spec, where, f"preprocessing[{i}]: ")  # validates name and arguments
        specs.append(dict(spec))
    if input_size is not None:
        last = _last_spatial_size(specs)
        if last is not None and tuple(last) != input_size:
            raise InputError(f"input_size {list(input_size)} differs from the last crop/pad's spatial_size "
                             f"{list(last)}", where)
    return specs


def _check_task(data: Mapping[str, Any], where: Path | str) -> str | None:
    """``task`` (one of :data:`TASKS`), None when absent (classification, unless the model declares
    ``medcam3d_task``)."""
    task = data.get("task")
    if task is not None and task not in TASKS:
        raise InputError(f"task must be one of {', '.join(TASKS)}, got {task!r}", where)
    return task


@dataclass(frozen=True)
class TargetSettings:
    """The ``targets:`` of a segmentation config (module docstring): which regions of the prediction are explained.

    Attributes:
        region: ``"components"`` (each 26-connected component of a class's predicted mask, largest first) or
            ``"predicted"`` (the class's whole predicted mask).
        reduce: ``"sum"`` or ``"mean"`` of the class's logits over the region.
        max_targets: the most components kept per class.
        min_voxels: predicted regions (components, or whole predicted masks) with fewer voxels are dropped.
        classes: the explained output channels (indices), in order; None: every channel but ``background``.
        background: the background channel (index), None when there is none (sigmoid nets).
    """

    region: str = "components"
    reduce: str = "sum"
    max_targets: int = 20
    min_voxels: int = 1
    classes: tuple[int, ...] | None = None
    background: int | None = 0

    def explained(self, n_channels: int) -> list[int]:
        """The output channels explained by default: ``classes``, else every channel but the background."""
        if self.classes is not None:
            return list(self.classes)
        return [c for c in range(n_channels) if c != self.background]

    def to_dict(self, labels: Sequence[str]) -> dict[str, Any]:
        """As the config writes it (channels by label)."""
        return {"region": self.region, "reduce": self.reduce, "max_targets": self.max_targets,
                "min_voxels": self.min_voxels,
                "classes": None if self.classes is None else [labels[c] for c in self.classes],
                "background": None if self.background is None else labels[self.background]}


def _channel(value: Any, labels: Sequence[str], key: str, where: Path | str) -> int:
    """A channel named by its label or index; InputError when it is not one of the ``len(labels)`` outputs."""
    if isinstance(value, str):
        if value not in labels:
            raise InputError(f"{key}: unknown class {value!r} (labels: {', '.join(labels)})", where)
        return list(labels).index(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{key}: a class is a label or a channel index, got {value!r}", where)
    if not 0 <= value < len(labels):
        raise InputError(f"{key}: class {value} is outside the model's {len(labels)} output channels "
                         f"(0 to {len(labels) - 1}; labels name every channel)", where)
    return value


def _check_targets(data: Mapping[str, Any], task: str | None, labels: Sequence[str], probability: str,
                   where: Path | str) -> TargetSettings | None:
    """``targets`` (segmentation only), channels resolved to indices; None when absent."""
    spec = data.get("targets")
    if spec is None:
        return None
    if task == CLASSIFICATION_TASK:
        raise InputError("targets: only for task: segmentation", where)
    if not isinstance(spec, Mapping):
        raise InputError(f"targets must be a mapping ({', '.join(_TARGET_KEYS)}), got {spec!r}", where)
    unknown = [k for k in spec if k not in _TARGET_KEYS]
    if unknown:
        raise InputError(f"targets: unknown key {unknown[0]!r} (allowed: {', '.join(_TARGET_KEYS)})", where)
    region, reduce = spec.get("region", "components"), spec.get("reduce", "sum")
    if region not in _REGIONS:
        raise InputError(f"targets.region must be one of {', '.join(_REGIONS)}, got {region!r}", where)
    if reduce not in _REDUCES:
        raise InputError(f"targets.reduce must be one of {', '.join(_REDUCES)}, got {reduce!r}", where)
    cap, smallest = spec.get("max_targets", 20), spec.get("min_voxels", 1)
    for key, value in (("max_targets", cap), ("min_voxels", smallest)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"targets.{key} must be a positive integer, got {value!r}", where)
    classes = spec.get("classes")
    if classes is not None and (not isinstance(classes, list) or not classes):
        raise InputError(f"targets.classes must be a non-empty list of labels or channel indices, got {classes!r}",
                         where)
    chosen = None if classes is None else tuple(dict.fromkeys(
        _channel(c, labels, "targets.classes", where) for c in classes))
    default_bg = 0 if probability == "softmax" else None
    bg = spec.get("background", default_bg)
    background = None if bg is None else _channel(bg, labels, "targets.background", where)
    return TargetSettings(region=region, reduce=reduce, max_targets=cap, min_voxels=smallest, classes=chosen,
                          background=background)


@dataclass
class Config:
    """A validated config (see the module docstring for the schema). ``path`` is the file it came from."""

    name: str
    model: dict[str, Any]
    labels: list[str]
    preprocessing: list[dict[str, Any]]
    description: str = ""
    weights: str | None = None
    target_layer: str | None = None
    layout: str | None = None
    input_size: tuple[int, int, int] | None = None
    min_size: tuple[int, int, int] | None = None
    probability: str = "sigmoid"
    threshold: float = 0.5
    allowed_regions: dict[str, list[str]] = field(default_factory=dict)
    modality: tuple[str, ...] | None = None
    path: Path | None = None
    map_geometry: str | None = None
    task: str | None = None
    targets: TargetSettings | None = None

    # construction ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, path: str | os.PathLike[str] | None = None) -> Config:
        """Validate a parsed config (``path`` is used in messages and to resolve relative weights)."""
        where: Path | str = Path(path) if path is not None else "<config>"
        _check_keys(data, where)  # the checks run in the order of the schema's keys (the first problem is named)
        name, description = _check_text(data, where)
        model, labels = _check_model_and_labels(data, where)
        weights, target_layer, layout = _check_declarations(data, where)
        map_geometry = _check_map_geometry(data, where)
        input_size = _size3(data.get("input_size"), "input_size", where)
        min_size = _size3(data.get("min_size"), "min_size", where)
        task = _check_task(data, where)
        probability, threshold = _check_scoring(data, where, "softmax" if task == SEGMENTATION_TASK else "sigmoid")
        allowed = _check_regions(data, labels, where)
        specs = _check_preprocessing(data, input_size, where)
        modality = _check_modality(data, where)
        targets = _check_targets(data, task, labels, probability, where)
        return cls(
            name=name, model=model, labels=labels, preprocessing=specs, description=description, weights=weights,
            map_geometry=map_geometry,
            target_layer=target_layer, layout=layout, input_size=input_size, min_size=min_size,
            probability=probability, threshold=threshold, allowed_regions=allowed, modality=modality,
            path=Path(path).resolve() if path is not None else None, task=task, targets=targets,
        )

    # derived -------------------------------------------------------------------------------------------------------
    @property
    def where(self) -> str:
        """What to name in messages: the config file, or the config's name."""
        return str(self.path) if self.path is not None else f"<config {self.name}>"

    @property
    def dir(self) -> Path:
        """The folder relative paths are resolved against (the config file's folder, else the working folder)."""
        return self.path.parent if self.path is not None else Path.cwd()

    @property
    def n_outputs(self) -> int:
        return len(self.labels)

    def target_settings(self) -> TargetSettings:
        """The segmentation targets: ``targets``, else the defaults (components, sum, background channel 0 for
        softmax, none for sigmoid)."""
        if self.targets is not None:
            return self.targets
        return TargetSettings(background=0 if self.probability == "softmax" else None)

    @property
    def weights_path(self) -> Path | None:
        """Absolute path of ``weights`` (``package:`` or relative to the config file); ``None`` if unset."""
        if self.weights is None:
            return None
        if self.weights.startswith(_PACKAGE_PREFIX):
            return resolve_package_path(self.weights, self.where)
        p = Path(self.weights).expanduser()
        return p if p.is_absolute() else (self.dir / p)

    def build_model(self) -> Any:
        """Build the network from ``model`` with ``weights`` (``medcam3d.models.build_model``), and declare this
        config's ``labels``, ``target_layer`` and ``layout`` on it (``medcam3d_*`` instance attributes).

        Raises :class:`InputError` naming the config if the weights file is missing."""
        wp = self.weights_path
        if wp is not None and not wp.exists():
            raise InputError(f"weights file {wp} not found", self.where)
        try:
            model = build_model(self.model, weights=wp, base_dir=self.dir)
        except InputError as e:
            raise InputError(f"model: {e}", self.where) from None
        return declare_model(model, labels=self.labels, target_layer=self.target_layer, layout=self.layout)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (YAML-serialisable), without ``path``."""
        d: dict[str, Any] = {
            "name": self.name, "description": self.description, "model": dict(self.model), "weights": self.weights,
            "target_layer": self.target_layer, "layout": self.layout, "labels": list(self.labels),
            "input_size": list(self.input_size) if self.input_size else None,
            "min_size": list(self.min_size) if self.min_size else None,
            "preprocessing": [dict(s) for s in self.preprocessing], "probability": self.probability,
            "threshold": self.threshold, "allowed_regions": {k: list(v) for k, v in self.allowed_regions.items()},
            "modality": list(self.modality) if self.modality is not None else None,
        }
        if self.map_geometry is not None:
            d["map_geometry"] = self.map_geometry
        if self.task is not None:
            d["task"] = self.task
        if self.targets is not None:
            d["targets"] = self.targets.to_dict(self.labels)
        return d


def _last_spatial_size(specs: Sequence[Mapping[str, Any]]) -> Sequence[int] | None:
    """spatial_size of the last ResizeWithPadOrCrop / SpatialPad / CenterSpatialCrop / Resize, if any."""
    for spec in reversed(specs):
        name = str(spec.get("_target_", "")).rsplit(".", 1)[-1]
        if name in ("ResizeWithPadOrCrop", "CenterSpatialCrop", "Resize") and "spatial_size" in spec:
            size = spec["spatial_size"]
            return list(size) if isinstance(size, (list, tuple)) else None
        if name in ("Spacing", "Orientation", "SpatialPad", "DivisiblePad", "BorderPad", "Zoom", "SpatialCrop",
                    "CropForeground"):
            return None
    return None


def load_config(path_or_name: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config (a path, ``package:...`` or a shipped config's name)."""
    p = _locate(path_or_name)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read config ({type(e).__name__}: {e})", p) from None
    return Config.from_dict(_yaml_load(text, p), path=p)
