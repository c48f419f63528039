"""What a part of the evaluation suite is given, what it returns, and the registry of parts.

A **part** (exactness, ground truth, localisation, ...) is a class implementing :class:`Part`:

``name``, ``cost``        its key in the outputs and the model passes it spends, in words (``costs`` in the JSON);
``pass_kinds``            the counters of model passes it adds to (``passes`` in the JSON, e.g. ``"removal"``);
``unit_passes(options)``  model passes per unit of work at these options (``passes_per_class`` in the JSON);
``run_case(run, case)``   its work on one explained phantom (a :class:`CaseView`): a record, or None;
``summarise(run, cases)`` the cohort-level step over every case's record: means, and the choices that need the
                          whole cohort (the IoU threshold chosen on the validation phantoms);
``render(summary, ...)``  its section(s) of evaluation.md; ``write(summary, out)``: extra files (the figure).

Records are typed (dataclasses) and know their JSON form: a case record's ``to_json()`` gives the keys it adds
to the case's entry of ``evaluation.json``, a summary's the keys it adds to ``summary``. One part object is made
per run (``cls()``), so a part may keep state across the cases of a run (randomisation finds the layer groups once
and stops after ``randomisation_scans`` phantoms; the figure is drawn for the first case that fits).

Parts are registered by name like the explanation methods (:func:`register_part`, :data:`REGISTRY`) and run in the
order they were registered; :class:`SuiteOptions` ``.parts`` selects them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import torch
from torch import Tensor, nn

from ...config import Config
from ...errors import InputError
from ...explanation import Explanation
from ...geometry import GEOMETRIES, MapGeometry
from ...methods import DEFAULT_METHODS
from ..metrics import block_fractions
from ..numbers import json_number
from ..perturbation import FILLS, MODES, ORDERS, HuToInput, demo_hu_to_input

if TYPE_CHECKING:  # types only: importing phantoms loads scipy (through medcam3d.data); the suite never needs it
    from ..phantoms import Case, PhantomSource

__all__ = [
    "REGISTRY",
    "CaseRecord",
    "CaseView",
    "JsonRecord",
    "ModelUnderTest",
    "Part",
    "PartBase",
    "SuiteOptions",
    "SuiteRun",
    "WrittenFile",
    "get_part",
    "register_part",
]

RANDOMISATION_MODES = ("cascading", "independent")
#: Kept for one release: the map placements are :data:`medcam3d.geometry.GEOMETRIES` (``auto`` included).
MAP_GEOMETRIES = GEOMETRIES


# ----------------------------------------------------------------------------------------------------------------
# what a run is given
# ----------------------------------------------------------------------------------------------------------------


def _registered_parts() -> tuple[str, ...]:
    return tuple(REGISTRY)


@dataclass
class SuiteOptions:
    """What :func:`~medcam3d.evaluate.suite.evaluate` runs (see :mod:`medcam3d.evaluate.suite`).

    Attributes:
        methods: methods to compare (HiResCAM and Grad-CAM).
        parts: names of registered parts (default: every registered part; :data:`REGISTRY`).
        classes: ``"present"``, ``"all"`` or a list of labels.
        removal: measure the score change when each lesion / the marker is removed.
        fills: perturbation fills (``"air"``, ``"soft_tissue"``, ``"blur"``).
        steps: perturbation steps T.
        orders, modes: perturbation orders and modes.
        perturbation_scans: at most this many phantoms get perturbation curves (None: all).
        batch_size: inputs per forward pass in perturbation.
        randomisation: ``"cascading"`` and/or ``"independent"``.
        randomisation_depth: layer grouping depth (:func:`~medcam3d.evaluate.randomization.randomization_groups`).
        randomisation_scans: at most this many phantoms get randomisation curves.
        validation_fraction: share of the phantoms (the first ones) used to choose IoU thresholds.
        top_features: features shown per method in the figure.
        figure_label: the label of the figure (default: the first phantom's first present label).
        seed: seed of random orders and re-initialisations.
        device: ``"cpu"``, ``"cuda"``...
        map_geometry: where feature cells lie for the ground-truth shares, the localisation heatmaps and the
            allowed-region score: ``"auto"`` (default: the receptive-field centres the model declares or its layers
            give, else the field; :mod:`medcam3d.placement`), ``"field"`` (the paper's convention) or
            ``"receptive"`` (the receptive-field centres, else an InputError).
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    parts: tuple[str, ...] = field(default_factory=_registered_parts)
    classes: str | Sequence[str] = "present"
    removal: bool = True
    fills: tuple[str, ...] = FILLS
    steps: int = 10
    orders: tuple[str, ...] = ORDERS
    modes: tuple[str, ...] = MODES
    perturbation_scans: int | None = None
    batch_size: int = 8
    randomisation: tuple[str, ...] = RANDOMISATION_MODES
    randomisation_depth: int | None = 2
    randomisation_scans: int | None = 2
    validation_fraction: float = 0.5
    top_features: int = 4
    figure_label: str | None = None
    seed: int = 0
    device: str = "cpu"
    map_geometry: str = "auto"

    def check(self) -> None:
        """Raise ValueError for unknown parts, fills, orders, modes or map geometry, and for bad numbers."""
        for name, values, allowed in (("parts", self.parts, tuple(REGISTRY)), ("fills", self.fills, FILLS),
                                      ("orders", self.orders, ORDERS), ("modes", self.modes, MODES),
                                      ("randomisation", self.randomisation, RANDOMISATION_MODES)):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"{name}: unknown {bad[0]!r} (choose from {', '.join(allowed)})")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.map_geometry not in GEOMETRIES:
            raise ValueError(f"map_geometry: unknown {self.map_geometry!r} (choose from {', '.join(GEOMETRIES)})")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in (0, 1)")

    def to_json(self) -> dict[str, Any]:
        """The options as recorded in evaluation.json (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class ModelUnderTest:
    """A model with what the suite needs to know about it.

    Attributes:
        model: the network (eval mode is set for the calls).
        labels: names of its M outputs.
        target_layer: explained layer (dotted name; default the model's ``medcam3d_target_layer``).
        layout: layout of the explained layer (default the model's ``medcam3d_layout``).
        allowed_regions: label -> organ names where its evidence may lie.
        hu_to_input: HU -> network units (for the perturbation fills).
        name: shown in the outputs.
        card: the model card, if any (its held-out AUROC is reported).
    """

    model: nn.Module
    labels: list[str]
    target_layer: str | None = None
    layout: Any = None
    allowed_regions: dict[str, list[str]] = field(default_factory=dict)
    hu_to_input: HuToInput | None = None
    name: str = "model"
    card: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Config, checkpoint: str | None = None, device: str = "cpu") -> ModelUnderTest:
        """Build from a :class:`medcam3d.config.Config` (``checkpoint`` overrides its weights)."""
        if checkpoint is not None:
            cp = Path(checkpoint).expanduser().resolve()
            if not cp.is_file():
                raise InputError("model checkpoint not found", cp)
            config.weights = str(cp)
        model = config.build_model().to(device).eval()
        wp = config.weights_path
        card_path = wp.with_suffix(".json") if wp is not None else None
        card = json.loads(card_path.read_text(encoding="utf-8")) if card_path and card_path.is_file() else None
        return cls(model, list(config.labels), config.target_layer, config.layout, dict(config.allowed_regions),
                   None, config.name if wp is None else f"{config.name} ({wp.name})", card)


@dataclass
class SuiteRun:
    """One run of the suite, as every part sees it.

    Attributes:
        mut: the model under test; ``model`` is ``mut.model`` on ``options.device`` in eval mode.
        source: the phantoms.
        options: what runs.
        labels: names of the model's M outputs.
        explainer_kwargs: keyword arguments of :class:`medcam3d.Explainer` for this model (target layer, methods,
            layout, labels, map geometry).
        hu_to_input: HU -> network units (the model's, else the phantom grid's, else the demo preprocessing's).
        n_validation: the first ``n_validation`` phantoms choose the IoU thresholds; the others are reported.
        say: progress messages.
        passes: model passes spent, by kind (``"explain"`` and every registered part's ``pass_kinds``).
    """

    mut: ModelUnderTest
    source: PhantomSource
    options: SuiteOptions
    model: nn.Module
    labels: list[str]
    explainer_kwargs: dict[str, Any]
    hu_to_input: HuToInput
    n_validation: int
    say: Callable[[str], None]
    passes: dict[str, int]

    @classmethod
    def start(cls, mut: ModelUnderTest, source: PhantomSource, options: SuiteOptions,
              progress: Callable[[str], None] | None = None) -> SuiteRun:
        """Put the model on the device in eval mode and set up the counters."""
        model = mut.model.to(options.device).eval()
        labels = list(mut.labels)
        kwargs = {"target_layer": mut.target_layer, "methods": options.methods, "layout": mut.layout, "labels": labels,
                  "map_geometry": options.map_geometry}
        hu_to_input = mut.hu_to_input or getattr(source.grid, "hu_to_input", None) or demo_hu_to_input
        n = len(source)
        n_val = max(1, math.ceil(options.validation_fraction * n)) if n > 1 else 1
        passes = {"explain": 0, **{k: 0 for part in REGISTRY.values() for k in part.pass_kinds}}
        return cls(mut, source, options, model, labels, kwargs, hu_to_input, n_val, progress or (lambda s: None),
                   passes)

    def spend(self, kind: str, n: int = 1) -> None:
        """Count ``n`` model passes of ``kind``."""
        self.passes[kind] = self.passes.get(kind, 0) + int(n)

    def scores(self, x: Tensor) -> Tensor:
        """Raw scores ``[B, M]`` (float64, CPU) of the inputs ``x [B, C, *S]``: one forward pass, not counted."""
        with torch.inference_mode():
            return self.model(x.to(self.options.device)).detach().double().cpu()


# ----------------------------------------------------------------------------------------------------------------
# what a part sees of one case, and the case's record
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CaseView:
    """One phantom after its explanation (all classes, every method, activations and gradients kept).

    Attributes:
        case: the phantom on the network grid (input ``x [1, C, *S]``, lesion / marker / organ masks).
        split: ``"validation"`` or ``"test"`` (IoU thresholds are chosen on the validation phantoms).
        explanation: its :class:`~medcam3d.explanation.Explanation` (on the CPU).
        present: the model's labels whose lesion the phantom shows (ground truth exists only for them).
        chosen: the labels the options ask for on this phantom (``classes``: present, all or a list).
        geometry: where the map's cells lie on the network grid (the options' ``map_geometry``).
    """

    case: Case
    split: str
    explanation: Explanation
    present: list[str]
    chosen: list[str]
    geometry: MapGeometry

    @cached_property
    def scores(self) -> Tensor:
        """``[M]`` float64 raw scores of all the model's outputs."""
        return self.explanation.scores[0].double()

    @cached_property
    def raw(self) -> dict[str, Tensor]:
        """method -> ``[M, *s]`` signed raw maps of every output."""
        return {m: r[0] for m, r in self.explanation.raw.items()}

    @property
    def map_shape(self) -> tuple[int, ...]:
        """Spatial size ``s`` of the maps."""
        return tuple(self.explanation.map_size)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Spatial size ``S`` of the network input."""
        return tuple(self.case.x.shape[2:])

    @property
    def display_geometry(self) -> MapGeometry:
        """:attr:`geometry` on the grid of :attr:`grid_shape` (the same cells; rescaled if that grid is not the
        model input's)."""
        size = tuple(self.explanation.input_size)
        return self.geometry if self.grid_shape == size else self.geometry.rescaled(size, self.grid_shape)

    @cached_property
    def fractions(self) -> dict[str, Tensor]:
        """label -> ``[*s]`` fraction of each map cell's block inside the lesion, for the present labels."""
        return {lab: block_fractions(self.case.lesions[lab], self.map_shape, self.geometry) for lab in self.present}

    @classmethod
    def of(cls, run: SuiteRun, case: Case, explanation: Explanation) -> CaseView:
        """The view of ``case``: its split, present and chosen labels, map geometry."""
        labels, classes = run.labels, run.options.classes
        present = [lab for lab in case.labels if lab in labels and lab in case.lesions]
        if classes == "present":
            chosen = list(present)
        elif classes == "all":
            chosen = list(labels)
        else:
            chosen = [c for c in classes if c in labels]
        split = "validation" if case.index < run.n_validation else "test"
        return cls(case, split, explanation, present, chosen, explanation.map_geometry(run.options.map_geometry))


class JsonRecord(Protocol):
    """A record that knows its JSON form: the keys it adds to the enclosing JSON object."""

    def to_json(self) -> dict[str, Any]: ...


@dataclass
class CaseRecord:
    """What the suite keeps of one phantom: its header and each part's record (by part name)."""

    name: str
    index: int
    split: str
    labels: list[str]
    marker: bool
    scores: dict[str, float | None]
    certificate: str
    records: dict[str, JsonRecord] = field(default_factory=dict)
    placement: dict[str, Any] | None = None

    @classmethod
    def of(cls, view: CaseView, labels: Sequence[str]) -> CaseRecord:
        """The header of a case (no part records yet)."""
        c = view.case
        return cls(c.name, c.index, view.split, list(c.labels), c.marker is not None,
                   {lab: json_number(s) for lab, s in zip(labels, view.scores.tolist())},
                   view.explanation.certificate.kind, placement=_placement_record(view.explanation))

    def to_dict(self) -> dict[str, Any]:
        """The case's entry of evaluation.json."""
        out: dict[str, Any] = {"case": self.name, "index": self.index, "split": self.split, "labels": self.labels,
                               "marker": self.marker, "scores": self.scores, "certificate": self.certificate,
                               "placement": self.placement}
        for record in self.records.values():
            out.update(record.to_json())
        return out


def _placement_record(explanation: Explanation) -> dict[str, Any] | None:
    """Where the explained cells were placed and how that was found (:meth:`Placement.as_dict`), None if unknown."""
    placement = explanation.placement
    return placement.as_dict() if placement is not None else None


# ----------------------------------------------------------------------------------------------------------------
# the protocol and the registry
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class WrittenFile:
    """A file a part wrote into the output folder, and the markdown that shows it in evaluation.md."""

    kind: str
    path: Path
    markdown: str = ""


R = TypeVar("R", bound=JsonRecord)
S = TypeVar("S", bound=JsonRecord)


class Part(Protocol[R, S]):
    """One part of the evaluation suite (see the module docstring). ``R``: its case record, ``S``: its summary."""

    name: ClassVar[str]
    cost: ClassVar[str]
    pass_kinds: ClassVar[tuple[str, ...]]

    def unit_passes(self, options: SuiteOptions) -> dict[str, int]:
        """Model passes per unit of work at these options (``passes_per_class`` in the JSON)."""
        ...

    def run_case(self, run: SuiteRun, case: CaseView) -> R | None:
        """The part's work on one explained phantom; None when nothing applies to it."""
        ...

    def summarise(self, run: SuiteRun, cases: Sequence[tuple[CaseRecord, R]]) -> S | None:
        """Cohort-level step over the cases with a record (in phantom order); None: no summary."""
        ...

    def render(self, summary: S, options: SuiteOptions, labels: Sequence[str]) -> list[str]:
        """Markdown lines of the part's section(s) of evaluation.md (none when there is nothing to show)."""
        ...

    def write(self, summary: S, out: Path) -> list[WrittenFile]:
        """Extra files written into the output folder ``out``."""
        ...


class PartBase(Generic[R, S]):
    """Defaults for a :class:`Part`: no pass counters, no per-unit passes, no extra files. Subclasses set
    ``name`` and ``cost`` and implement ``run_case``, ``summarise`` and ``render``."""

    name: ClassVar[str] = ""
    cost: ClassVar[str] = "0 extra passes"
    pass_kinds: ClassVar[tuple[str, ...]] = ()

    def unit_passes(self, options: SuiteOptions) -> dict[str, int]:
        return {}

    def run_case(self, run: SuiteRun, case: CaseView) -> R | None:
        raise NotImplementedError

    def summarise(self, run: SuiteRun, cases: Sequence[tuple[CaseRecord, R]]) -> S | None:
        raise NotImplementedError

    def render(self, summary: S, options: SuiteOptions, labels: Sequence[str]) -> list[str]:
        return []

    def write(self, summary: S, out: Path) -> list[WrittenFile]:
        return []


REGISTRY: dict[str, type[Part[Any, Any]]] = {}
"""Registered parts by name, in the order they run."""

P = TypeVar("P", bound=type[Part[Any, Any]])


def register_part(cls: P) -> P:
    """Class decorator registering a :class:`Part` under ``cls.name``; a name already registered is refused
    (ValueError), so a part never replaces another silently."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}: a part needs a non-empty name")
    if name in REGISTRY:
        raise ValueError(f"a part named {name!r} is already registered ({REGISTRY[name].__qualname__})")
    REGISTRY[name] = cls
    return cls


def get_part(name: str) -> type[Part[Any, Any]]:
    """The registered part called ``name`` (ValueError listing the known names otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown part {name!r}; known parts: {', '.join(REGISTRY)}") from None
