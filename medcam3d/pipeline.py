"""One scan in, one output folder out: read → preprocess → explain → map back → write.

The command line (``medcam3d explain``), the napari widget and the batch runner all call this module rather than
repeating the steps. :class:`Session` holds what is expensive to set up (config, model, explainer) so that a batch
worker loads the model once and explains many scans.

Writing is compute -> write: :meth:`Session.plan_outputs` chooses the classes and places the maps,
:meth:`Session.summarise` builds the typed :class:`~medcam3d.outputs.Summary`, and :meth:`Session.write_folder`
writes the files and the summary (through :func:`medcam3d.outputs.write_summary`) into a folder that appears whole.

Refusals come before work (issue 18): the scan's size is checked from its header (:func:`read_scan`,
``max_voxels``), the grid each preprocessing step would make before it is allocated, a DICOM scan's modality
against the config's ``modality`` (or the model card's) before the model runs, the config's labels against the
number of outputs the model really gives (on the first forward), the ``device`` string before the model is built.
What is assumed rather than refused is said: :attr:`ScanResult.notes` (e.g. which of several DICOM series was read)
and :attr:`ScanResult.warnings` (a scan that does not look like the config's modality) go to the summary's
``assumptions`` and ``warnings`` and are printed by the command line.

Full-resolution maps are sampled on the scan's own grid straight from the feature-resolution maps
(:mod:`medcam3d.onscan`: through the map's placement and the preprocessing's affine, a slab of slices and a chunk of
classes at a time), quantised to uint8 (``scl_slope = 1/255``) and compressed in a thread pool while the montages
are drawn from the same arrays. Preprocessing that is not purely affine-geometric falls back to MONAI's inverse
(:meth:`~medcam3d.preprocess.Preprocessor.invert`), one class at a time.

Segmentation networks (``task: segmentation`` in the config, or a model declaring ``medcam3d_task =
"segmentation"``) explain *targets* instead of classes (:mod:`medcam3d.segmentation`, :mod:`medcam3d.targets`): the
regions of the model's own prediction, each scored by its class's logits summed (or averaged) over it. Everything
written per class is then written per target (index = target index, label = target name), and the folder also holds
the predicted segmentation on the scan's grid and ``targets.csv``. Full resolution by default: the largest regions
first (by voxel count), at most :data:`MAX_FULL_RES`. A prediction with no voxel of any explained class is a
one-line note, not an error: :meth:`Session.explain_volume` raises :class:`EmptyScan` (an :class:`InputError`
carrying what was computed, :class:`EmptyPrediction`), and :meth:`Session.write_empty` writes the segmentation,
``scores.csv``/``targets.csv`` (headers only) and the summary with the note, no maps (the command line does so and
exits 0).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import SEGMENTATION_TASK, TASKS, Config, load_config
from .errors import InputError
from .explainer import Explainer, select_scores
from .explanation import Explanation
from .files import sha256_of
from .geometry import GEOMETRIES
from .heatmaps import normalize
from .io import (
    Volume,
    check_dicom_source,
    check_modality,
    read_volume,
    write_lowres_maps,
    write_nifti,
    write_parametric_map,
    write_segmentation,
)
from .io.limits import resolve_max_voxels
from .io.writers import DISPLAY_SLOPE, ChunkedNifti, nifti_header_bytes
from .methods import DEFAULT_METHODS, method_title
from .onscan import SLAB_VOXELS, ScanSampler, affine_reason, voxel_to_cells
from .outputs import (
    DICOM_PM_PREFIX,
    DICOM_SEG_PREFIX,
    SCORES,
    SEGMENTATION,
    SUMMARY,
    TARGETS,
    CertificateRecord,
    ClassRecord,
    ConfigRecord,
    DicomExportRecord,
    DisagreementRecord,
    GridRecord,
    InputRecord,
    MapGeometryRecord,
    ModelRecord,
    MontageRenderer,
    PeakRecord,
    Summary,
    TargetRecord,
    check_output_folder,
    dicom_pm_name,
    dicom_seg_name,
    fullres_name,
    lowres_name,
    montage_name,
    output_folder,
    render_montage,
    write_scores_csv,
    write_summary,
    write_targets_csv,
)
from .preprocess import Preprocessor
from .segmentation import (
    EmptySegmentation,
    Prediction,
    RecordingTargets,
    TargetPlaces,
    expand_class_tokens,
    labels_on_scan,
    target_places,
    target_records,
)
from .selection import depends_on_scores, select_classes
from .targets import Classes, Targets

__all__ = [
    "DEFAULT_CONFIG",
    "DicomExport",
    "EmptyPrediction",
    "EmptyScan",
    "OutputPlan",
    "ScanResult",
    "Session",
    "explain_scan",
    "read_scan",
    "resolve_device",
    "select_classes",
]

# DEFAULT_METHODS (home: medcam3d.methods), sha256_of (medcam3d.files) and select_classes (medcam3d.selection)
# stay importable from this module for one release: other code imported them from here.

DEFAULT_CONFIG = "demo_axialnet"
#: default full resolution: the predicted-positive classes, at least the top MIN_FULL_RES and at most MAX_FULL_RES
#: (highest scores first); for segmentation targets, the MAX_FULL_RES largest regions (most voxels first)
MIN_FULL_RES = 3
MAX_FULL_RES = 10
#: uint8 display maps held at once per chunk of full-resolution classes (all methods of a class stay together:
#: the montage is drawn from them); two chunks are alive while one is compressed and the next sampled
FULLRES_CHUNK_BYTES = 256 << 20


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU. An unknown or unavailable device is an :class:`InputError`
    (one line), never a traceback."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"--device {device!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise InputError(f"--device {device}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("--device mps: no Apple MPS device is available (use --device cpu or auto)")
    elif d.type != "cpu":
        raise InputError(f"--device {device!r}: medcam3d runs on cpu, cuda or mps")
    return d


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("medcam3d", "torch", "monai", "numpy", "nibabel", "SimpleITK", "pydicom"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class ScanResult:
    """Everything computed for one scan, before writing.

    Attributes:
        volume: the scan as read (source grid).
        grid: MONAI MetaTensor ``[1, S, H, W]`` on the network grid (carries the inverse-mapping record).
        explanation: the :class:`Explanation` (batch of 1) for the explained classes (or segmentation targets).
        probabilities: ``[M]`` probabilities of all outputs (for segmentation targets: each target's mean
            probability of its class over its region).
        timings: seconds per stage.
        notes: one line per assumption made on the way (e.g. which of several DICOM series was read).
        warnings: one line per thing to check (e.g. a scan that does not look like the config's modality).
        task: ``"classification"`` or ``"segmentation"``.
        prediction: a segmentation net's predicted label map on the network grid (None for classification).
        target_notes: one-line remarks about the targets (skipped empty regions, dropped components).
    """

    volume: Volume
    grid: Any
    explanation: Explanation
    probabilities: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    task: str = "classification"
    prediction: Prediction | None = None
    target_notes: list[str] = field(default_factory=list)

    @property
    def scores(self) -> np.ndarray:
        """``[M]`` raw scores."""
        return self.explanation.scores[0].detach().cpu().numpy().astype(np.float64)


@dataclass
class EmptyPrediction:
    """A segmentation net's prediction with nothing to explain (no voxel of any explained class): what
    :meth:`Session.write_empty` writes.

    Attributes:
        volume, grid, timings, notes, warnings: as :class:`ScanResult`'s.
        prediction: the (empty) prediction on the network grid.
        note: the one line saying so.
    """

    volume: Volume
    grid: Any
    prediction: Prediction
    note: str
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class EmptyScan(EmptySegmentation):
    """Raised by :meth:`Session.explain_volume` when a segmentation net predicts none of the explained classes; an
    :class:`InputError` (one line) carrying the prediction (``result``) for :meth:`Session.write_empty`."""

    def __init__(self, result: EmptyPrediction) -> None:
        super().__init__(result.note)
        self.result = result


@dataclass(frozen=True)
class DicomExport:
    """``--dicom-out``: the full-resolution heatmaps also as DICOM Parametric Maps referencing the source series,
    and, with ``seg_threshold``, each map thresholded at that level as a DICOM SEG (:mod:`medcam3d.io.dicom_export`).
    """

    seg_threshold: float | None = None


@dataclass
class OutputPlan:
    """What one output folder holds, decided before anything is written (:meth:`Session.plan_outputs`).

    Attributes:
        explained: the class indices written (rows of scores.csv, the K axis of the low-resolution maps), in order.
        full_res: those of them also written at full resolution, with a montage.
        grid_affine: ``[4, 4]`` affine of the network grid (array index -> RAS mm).
        grid_shape: ``(S, H, W)`` of the network grid.
        map_affine: ``[4, 4]`` affine of the low-resolution maps (where the model's cells sit), None unless the
            maps are 3-D.
        notes: one-line remarks for the user (e.g. that the default full-resolution cap cut classes).
        names: the names of the M scores (the config's labels; for segmentation targets, the target names).
        places: segmentation targets: where each lies (centroid in mm and on the scan); None for classes.
    """

    explained: list[int]
    full_res: list[int]
    grid_affine: np.ndarray
    grid_shape: tuple[int, ...]
    map_affine: np.ndarray | None
    notes: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    places: TargetPlaces | None = None


class Session:
    """A configured model ready to explain scans.

    Args:
        config: a :class:`Config`, a path or a shipped config name (default: the embedded demo model).
        checkpoint: weights file overriding the config's ``weights``.
        methods: methods to compute (HiResCAM and Grad-CAM by default).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        map_geometry: where feature-resolution cells go on the scan (:mod:`medcam3d.placement`): ``"auto"`` (the
            receptive-field centres the model declares or its layers give, else the field with the reason recorded),
            ``"field"`` (the field of view divided evenly, the paper's convention) or ``"receptive"`` (the
            receptive-field centres, else an InputError). Default (None): the config's ``map_geometry``, else
            ``"auto"``. Used for full-resolution heatmaps, the low-resolution maps' affine and the summary's
            ``map_geometry`` record (:attr:`Explanation.placement`).
        max_voxels: the largest preprocessing grid, in voxels (default
            :data:`~medcam3d.io.limits.DEFAULT_MAX_VOXELS`; scans are checked by :func:`read_scan`).
        ignore_modality: explain a DICOM scan whose Modality the config does not accept (a warning instead of an
            :class:`InputError`).
        target_layer: the explained layer (a dotted module name, or ``"auto"``), overriding the config's
            ``target_layer`` and the model's ``medcam3d_target_layer``; None: theirs. An unknown name is an
            :class:`InputError` naming the closest module names.
    """

    def __init__(
        self,
        config: Config | str | Path | None = None,
        checkpoint: str | Path | None = None,
        methods: Sequence[str] = DEFAULT_METHODS,
        device: str | torch.device = "auto",
        map_geometry: str | None = None,
        *,
        max_voxels: int | None = None,
        ignore_modality: bool = False,
        target_layer: str | None = None,
    ) -> None:
        cfg = config if isinstance(config, Config) else load_config(config or DEFAULT_CONFIG)
        map_geometry = map_geometry or cfg.map_geometry or "auto"
        if map_geometry not in GEOMETRIES:
            raise InputError(f"map geometry must be one of {', '.join(GEOMETRIES)}, got {map_geometry!r}")
        self.map_geometry = map_geometry
        if checkpoint is not None:
            cp = Path(checkpoint).expanduser().resolve()
            if not cp.is_file():
                raise InputError("model checkpoint not found", cp)
            cfg.weights = str(cp)
        self.config = cfg
        self.device = resolve_device(device)
        self.methods = tuple(methods)
        self.max_voxels = resolve_max_voxels(max_voxels)
        self.ignore_modality = bool(ignore_modality)
        self.preprocessor = Preprocessor.from_config(cfg, max_voxels=self.max_voxels)
        self.model = cfg.build_model().to(self.device).eval()
        self.task = cfg.task or getattr(self.model, "medcam3d_task", None) or "classification"
        if self.task not in TASKS:
            raise InputError(f"the model declares medcam3d_task = {self.task!r}; medcam3d knows "
                             f"{', '.join(TASKS)}", cfg.where)
        self.explainer = Explainer(self.model, target_layer or cfg.target_layer, self.methods, labels=cfg.labels,
                                   targets=self._targets(), map_geometry=map_geometry)
        wp = cfg.weights_path
        self.weights_path = wp
        card = wp.with_suffix(".json") if wp is not None else None
        self.model_card: dict[str, Any] | None = (
            json.loads(card.read_text(encoding="utf-8")) if card is not None and card.is_file() else None
        )

    @property
    def modalities(self) -> tuple[str, ...] | None:
        """The modalities the model reads: the config's ``modality``, else the model card's; ``None``: no check."""
        if self.config.modality:
            return self.config.modality
        card = (self.model_card or {}).get("modality")
        if isinstance(card, str) and card.strip():
            return (card.strip().upper(),)
        if isinstance(card, list) and card and all(isinstance(m, str) for m in card):
            return tuple(m.strip().upper() for m in card)
        return None

    def _targets(self, mask: torch.Tensor | None = None) -> Targets:
        """What the explainer explains: the model's class scores, or (segmentation) the regions of its prediction
        (``mask``: a region on the network grid given by the user instead)."""
        if self.task == "classification":
            return Classes(reader=self._checked_scores)
        return self._regions(mask)

    def _regions(self, mask: torch.Tensor | None = None) -> RecordingTargets:
        """A segmentation net's targets for one scan (fresh: they record that scan's prediction)."""
        cfg = self.config
        return RecordingTargets(cfg.target_settings(), cfg.labels, cfg.probability, cfg.threshold,
                                self._checked_dense, mask)

    def _checked_dense(self, output: Any) -> torch.Tensor:
        """A segmentation net's raw scores ``[B, C, *spatial]``, refused when they are not dense or ``C`` is not the
        number of the config's labels."""
        dense = select_scores(output)
        if dense.ndim < 3:
            raise InputError(f"task: segmentation, but the model gives scores of shape {tuple(dense.shape)}; a "
                             "segmentation output is [B, C, *spatial]", self.config.where)
        n = len(self.config.labels)
        if dense.shape[1] != n:
            raise InputError(f"labels: the config names {n} classes but the model gives {dense.shape[1]} output "
                             "channels; labels must name every channel, in the model's order", self.config.where)
        return dense

    def _checked_scores(self, output: Any) -> torch.Tensor:
        """The model's raw scores ``[B, M]`` (:func:`~medcam3d.explainer.select_scores`), refused when ``M`` is not
        the number of the config's labels (checked on the real output, for any model)."""
        scores = select_scores(output)
        n = len(self.config.labels)
        if scores.ndim == 2 and scores.shape[1] != n:
            raise InputError(f"labels: the config names {n} classes but the model gives {scores.shape[1]} outputs; "
                             "labels must name every output, in the model's order", self.config.where)
        return scores

    @property
    def synthetic_only(self) -> bool:
        """True for a model trained on synthetic data only (the embedded demo), per its model card."""
        return bool(self.model_card and self.model_card.get("synthetic_data_only"))

    # compute -----------------------------------------------------------------------------------------------------
    def explain_volume(
        self, volume: Volume, classes: Sequence[str | int] | None = None, read_seconds: float | None = None,
        *, target_mask: Volume | None = None,
    ) -> ScanResult:
        """Preprocess and explain one scan (all outputs, or the given classes). ``read_seconds``: time spent
        reading the scan, recorded with the other timings. Segmentation nets: every target is explained (the
        selection is made when writing); ``target_mask`` (a mask on the scan's grid) is then the one region
        explained for each explained class, instead of the predicted regions.

        Raises :class:`InputError` (before any work) for a DICOM scan of a modality the model does not read."""
        what = f"the config {self.config.where}"
        warning = check_modality(volume, self.modalities, ignore=self.ignore_modality, what=what)
        if target_mask is not None and self.task != "segmentation":
            raise InputError("a target mask is for segmentation models (task: segmentation)", target_mask.source)
        t0 = time.perf_counter()
        grid = self.preprocessor(volume)
        t1 = time.perf_counter()
        x = grid.as_tensor()[None].to(self.device)  # [1, 1, S, H, W]
        result: ScanResult | EmptyPrediction
        if self.task == SEGMENTATION_TASK:
            result = self._explain_segmentation(volume, grid, x, target_mask)
        else:
            result = self._explain_classes(volume, grid, x, classes)
        t2 = time.perf_counter()
        timings = {} if read_seconds is None else {"read": read_seconds}
        timings.update({"preprocess": t1 - t0, "explain": t2 - t1})
        result.notes = [str(n) for n in volume.meta.get("notes") or []]
        result.warnings = [warning] if warning else []
        if isinstance(result, EmptyPrediction):
            result.timings = timings
            raise EmptyScan(result)
        timings.update({f"explain.{k}": v for k, v in result.explanation.timings.items()})
        result.timings = timings
        return result

    def _explain_classes(self, volume: Volume, grid: Any, x: torch.Tensor,
                         classes: Sequence[str | int] | None) -> ScanResult:
        """A classification net's explanation of ``x`` (all outputs, or the classes a score-free selection names)."""
        idx = None  # all outputs: as cheap as a few, and score-dependent selections need every score
        if not depends_on_scores(classes):
            n = len(self.config.labels)
            idx = select_classes(classes, np.zeros(n), np.zeros(n), self.config.labels, self.config.threshold)
        exp = self.explainer(x, classes=idx)
        probs = exp.probabilities(self.config.probability)[0].detach().cpu().numpy().astype(np.float64)
        return ScanResult(volume, grid, exp.cpu(), probs)

    def _explain_segmentation(self, volume: Volume, grid: Any, x: torch.Tensor,
                              target_mask: Volume | None) -> ScanResult | EmptyPrediction:
        """A segmentation net's explanation of ``x``: every target, the prediction, the targets' mean
        probabilities; or, when nothing is predicted, the prediction and the note."""
        targets = self._regions(self._mask_on_grid(target_mask, volume, grid))
        self.explainer.targets = targets  # this scan's; replaced by the next scan's
        exp: Explanation | None
        try:
            exp, note = self.explainer(x), ""
        except EmptySegmentation as e:
            exp, note = None, str(e)
        prediction = targets.prediction
        assert prediction is not None  # recorded when the targets were bound
        if prediction.label_map.shape != tuple(grid.shape[1:]):
            raise InputError(f"the model's segmentation has spatial shape {prediction.label_map.shape}, not its "
                             f"input's {tuple(grid.shape[1:])}; medcam3d explains segmentations on the input grid",
                             self.config.where)
        if exp is None:
            return EmptyPrediction(volume, grid, prediction, note)
        return ScanResult(volume, grid, exp.cpu(), targets.region_probabilities, task="segmentation",
                          prediction=prediction, target_notes=list(exp.notes))

    def _mask_on_grid(self, mask: Volume | None, volume: Volume, grid: Any) -> torch.Tensor | None:
        """A target mask on the scan's grid (same shape; non-zero = inside) as a bool ``[S, H, W]`` region on the
        network grid (nearest neighbour); InputError when its shape is not the scan's."""
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(volume.shape):
            raise InputError(f"the target mask has shape {tuple(mask.shape)}, but the scan has "
                             f"{tuple(volume.shape)}; a mask must be on the scan's grid", mask.source)
        on_grid = self.preprocessor.preprocess_labels(mask, like=grid)[0]
        return torch.as_tensor(np.asarray(on_grid)) != 0

    # compute what goes into the folder ----------------------------------------------------------------------------
    def plan_outputs(
        self,
        result: ScanResult,
        classes: Sequence[str | int] | None = None,
        full_res: Sequence[str | int] | None = None,
    ) -> OutputPlan:
        """Which classes (or segmentation targets) go to the output folder and where the maps sit (InputError
        before anything is written).

        Args:
            classes: which explained classes go to the outputs (default: all explained). For segmentation targets:
                target names or indices, or class labels (every target of that class).
            full_res: which of those also get full-resolution maps and montages (default: predicted positive, at
                least the top 3 and at most the top 10 by score, with a note in ``notes`` when the cap cuts; for
                segmentation targets the 10 largest regions).
        """
        cfg, exp = self.config, result.explanation
        grid_affine = np.asarray(result.grid.affine, dtype=np.float64)
        grid_shape = tuple(int(s) for s in result.grid.shape[1:])
        scores, probs = result.scores, result.probabilities
        names = list(exp.labels) if result.task == SEGMENTATION_TASK and exp.labels else list(cfg.labels)
        if result.task == SEGMENTATION_TASK:
            classes = expand_class_tokens(classes, exp.targets or [], cfg.labels)
            full_res = expand_class_tokens(full_res, exp.targets or [], cfg.labels)
        explained = [c for c in select_classes(classes, scores, probs, names, cfg.threshold) if c in exp.classes]
        if not explained:
            raise InputError("--classes selects no explained class")
        placement = exp.placement
        notes = [placement.note()] if placement is not None and placement.fallback else []
        notes += result.target_notes
        if full_res is None:
            fr, note = self._default_full_res(result, explained, names)
            notes += [note] if note else []
        else:
            fr = [c for c in select_classes(full_res, scores, probs, names, cfg.threshold, what="--full-res")
                  if c in explained]
        geometry = exp.map_geometry(self.map_geometry)  # InputError when the model declares no receptive geometry
        map_affine = grid_affine @ geometry.index_affine().numpy() if len(exp.map_size) == 3 else None
        places = None
        if result.task == SEGMENTATION_TASK:
            infos = exp.sample_targets[0] if exp.sample_targets else list(exp.targets or [])
            vol = result.volume
            places = target_places(infos, grid_affine, np.asarray(vol.affine, dtype=np.float64), vol.shape)
        return OutputPlan(explained=explained, full_res=fr, grid_affine=grid_affine, grid_shape=grid_shape,
                          map_affine=map_affine, notes=notes, names=names, places=places)

    def _default_full_res(self, result: ScanResult, explained: Sequence[int],
                          names: Sequence[str]) -> tuple[list[int], str | None]:
        """The default full-resolution classes among ``explained``, highest score first: predicted positive and
        the top :data:`MIN_FULL_RES`, at most :data:`MAX_FULL_RES`; and a note when the cap cuts. Segmentation
        targets: the :data:`MAX_FULL_RES` largest regions (most voxels first)."""
        cfg, scores = self.config, result.scores
        if result.task == SEGMENTATION_TASK:
            infos = result.explanation.targets or []
            wanted = sorted(explained, key=lambda t: (-(infos[t].voxels or 0), t))
            what = f"{len(wanted)} targets are explained; full resolution and montages for the {MAX_FULL_RES} largest"
        else:
            spec = ["positive", f"top-{MIN_FULL_RES}"]
            wanted = [c for c in select_classes(spec, scores, result.probabilities, names, cfg.threshold)
                      if c in explained]
            wanted.sort(key=lambda c: -scores[c])
            what = (f"{len(wanted)} classes are predicted positive; full resolution and montages for the "
                    f"{MAX_FULL_RES} highest-scoring")
        if len(wanted) <= MAX_FULL_RES:
            return wanted, None
        return wanted[:MAX_FULL_RES], (
            f"{what} only (all are in the low-resolution maps; --full-res all writes every one)")

    def summarise(self, result: ScanResult, plan: OutputPlan) -> Summary:
        """The summary of ``result`` as ``plan`` writes it (its timings and file list are completed by
        :meth:`write_folder`)."""
        summary = replace(self._base_summary(result.volume, plan, result.warnings, result.notes),
                          **self._explanation_fields(result, plan))
        if result.task == SEGMENTATION_TASK:
            assert result.prediction is not None
            records = target_records(result.explanation, plan.explained, plan.places or TargetPlaces(),
                                     self.config.labels)
            summary = replace(summary, **_segmentation_fields(result.prediction, records))
        return summary

    def _base_summary(self, volume: Volume, plan: OutputPlan, warnings: Sequence[str],
                      assumptions: Sequence[str]) -> Summary:
        """The summary's provenance: scan, config, model, network grid, versions, notes; no maps, no classes."""
        cfg = self.config
        versions = _versions()
        return Summary(
            medcam3d_version=versions.get("medcam3d", "unknown"),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            input=_input_record(volume),
            config=ConfigRecord(name=cfg.name, path=str(cfg.path) if cfg.path else None,
                                sha256=sha256_of(cfg.path) if cfg.path else None),
            model=self._model_record(),
            network_grid=GridRecord(shape=list(plan.grid_shape), affine=plan.grid_affine.tolist()),
            methods=list(self.methods),
            device=str(self.device),
            versions=versions,
            probability=cfg.probability,
            threshold=cfg.threshold,
            classes=[],
            warnings=list(warnings),
            assumptions=list(assumptions),
            notes=list(plan.notes) or None,
        )

    def _explanation_fields(self, result: ScanResult, plan: OutputPlan) -> dict[str, Any]:
        """The summary's fields that describe the maps: their grid and placement, the certificate, the classes."""
        exp = result.explanation
        geo = exp.map_geometry(self.map_geometry)
        return {
            "map_shape": list(exp.map_size),
            "map_affine": plan.map_affine.tolist() if plan.map_affine is not None else None,
            "map_geometry": MapGeometryRecord(kind=geo.kind, offset_voxels=list(geo.offset),
                                              stride_voxels=list(geo.stride), source=_placement_source(exp)),
            "methods": list(exp.methods),
            "certificate": CertificateRecord.from_certificate(exp.certificate),
            "classes": _class_records(result, plan, self.config.threshold),
        }

    def _model_record(self) -> ModelRecord:
        w = self.weights_path
        return ModelRecord(
            spec=self.config.model,
            weights=str(w) if w else None,
            weights_sha256=sha256_of(w) if w and w.is_file() else None,
            target_layer=self.explainer.layer_name,
            target_layer_reason=self.explainer.layer_choice.reason if self.explainer.layer_choice else None,
            synthetic_data_only=self.synthetic_only,
            card=self.model_card,
        )

    # write ---------------------------------------------------------------------------------------------------------
    def write_folder(
        self,
        result: ScanResult,
        out_dir: str | Path,
        classes: Sequence[str | int] | None = None,
        full_res: Sequence[str | int] | None = None,
        progress: Callable[[str], None] | None = None,
        extra: dict[str, Any] | None = None,
        dicom: DicomExport | None = None,
        threads: int | None = None,
    ) -> Summary:
        """Write the output folder (atomically) and return its :class:`~medcam3d.outputs.Summary`.

        ``classes`` and ``full_res`` as in :meth:`plan_outputs`; ``progress`` is called with each stage's name;
        ``extra`` adds top-level sections to the summary (e.g. ``batch``, ``organ_shares``); ``dicom`` also writes
        the full-resolution maps as DICOM (:class:`DicomExport`; the scan must be a single-frame DICOM series);
        ``threads``: threads compressing maps (default: torch's thread count, which ``batch`` sets to each worker's
        share of the cores). A failed write (disk full, folder not writable) is an InputError naming the folder; the
        partial folder is removed and an earlier output folder at ``out_dir`` is kept."""
        t0 = time.perf_counter()
        plan = self.plan_outputs(result, classes, full_res)
        summary = self.summarise(result, plan)
        if dicom is not None:
            check_dicom_source(result.volume)
        notes: list[str] = []
        timings = dict(result.timings)
        with _writing(out_dir) as tmp:
            written = self._write_files(result, plan, tmp, progress or (lambda s: None), threads, timings,
                                        dicom, notes)
            timings["write"] = time.perf_counter() - t0
            summary = replace(summary, timings_s={k: round(v, 4) for k, v in timings.items()},
                              files=sorted([*written, SUMMARY]),
                              assumptions=[*(summary.assumptions or []), *dict.fromkeys(notes)],
                              dicom_export=_dicom_record(written, dicom)).with_sections(extra)
            write_summary(summary, tmp / SUMMARY)
        return summary

    def write_empty(self, empty: EmptyPrediction, out_dir: str | Path, progress: Callable[[str], None] | None = None,
                    extra: dict[str, Any] | None = None) -> Summary:
        """The output folder of a segmentation with nothing to explain (:class:`EmptyScan`): the segmentation,
        ``scores.csv`` and ``targets.csv`` with their headers only, the summary (``notes`` holds the note); no maps.
        Atomic, as :meth:`write_folder`."""
        t0 = time.perf_counter()
        grid = empty.grid
        plan = OutputPlan([], [], np.asarray(grid.affine, dtype=np.float64), tuple(int(n) for n in grid.shape[1:]),
                          None, notes=[empty.note])
        summary = replace(self._base_summary(empty.volume, plan, empty.warnings, empty.notes),
                          **_segmentation_fields(empty.prediction, []))
        timings = dict(empty.timings)
        with _writing(out_dir) as tmp:
            (progress or (lambda s: None))("segmentation")
            write_scores_csv([], tmp / SCORES)
            written = [SCORES, *self._write_segmentation(empty.volume, grid, empty.prediction, [], tmp)]
            timings["write"] = time.perf_counter() - t0
            summary = replace(summary, timings_s={k: round(v, 4) for k, v in timings.items()},
                              files=sorted([*written, SUMMARY])).with_sections(extra)
            write_summary(summary, tmp / SUMMARY)
        return summary

    def write(
        self,
        result: ScanResult,
        out_dir: str | Path,
        classes: Sequence[str | int] | None = None,
        full_res: Sequence[str | int] | None = None,
        progress: Callable[[str], None] | None = None,
        extra: dict[str, Any] | None = None,
        dicom: DicomExport | None = None,
        threads: int | None = None,
    ) -> dict[str, Any]:
        """:meth:`write_folder`, returning the summary as the JSON object written to ``summary.json``."""
        return self.write_folder(result, out_dir, classes, full_res, progress, extra, dicom, threads).to_dict()

    def _write_files(self, result: ScanResult, plan: OutputPlan, folder: Path, step: Callable[[str], None],
                     threads: int | None, timings: dict[str, float], dicom: DicomExport | None = None,
                     notes: list[str] | None = None) -> list[str]:
        """scores.csv, the low-resolution maps, and each full-resolution class's maps and montage (and DICOM
        objects); their names. Adds ``write.*`` stage times to ``timings``; ``notes`` collects the DICOM export's
        notes."""
        t0 = time.perf_counter()
        write_scores_csv(_score_rows(result, plan, self.config.threshold), folder / SCORES)
        written = [SCORES]
        if result.task == SEGMENTATION_TASK:
            assert result.prediction is not None
            step("segmentation")
            records = target_records(result.explanation, plan.explained, plan.places or TargetPlaces(),
                                     self.config.labels)
            written += self._write_segmentation(result.volume, result.grid, result.prediction, records, folder)
            timings["write.segmentation"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        step("low-resolution maps")
        written += self._write_lowres(result, plan, folder)
        timings["write.lowres"] = time.perf_counter() - t1
        if plan.full_res:
            n = max(1, int(threads or torch.get_num_threads()))
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="medcam3d-gzip") as pool:
                writer = _FullResWriter(self, result, plan, folder, pool, dicom, notes if notes is not None else [])
                written += writer.run(step, timings)
        return written

    def _write_segmentation(self, volume: Volume, grid: Any, prediction: Prediction, records: Sequence[TargetRecord],
                            folder: Path) -> list[str]:
        """``segmentation.nii.gz`` (the predicted label map on the scan's grid, uint8) and ``targets.csv``."""
        on_scan = labels_on_scan(prediction.label_map, grid, volume.affine, volume.shape,
                                 invert=lambda m: self.preprocessor.invert(m, grid))
        names = ", ".join(f"{v}={n}" for v, n in prediction.names.items())
        write_nifti(on_scan, volume.affine, folder / SEGMENTATION, np.uint8,
                    description=f"medcam3d predicted segmentation: {names}"[:79])
        write_targets_csv(records, folder / TARGETS)
        return [SEGMENTATION, TARGETS]

    def _write_lowres(self, result: ScanResult, plan: OutputPlan, folder: Path) -> list[str]:
        """One 4-D ``lowres_<method>.nii.gz`` per method: the explained classes' signed raw maps."""
        exp, labels = result.explanation, plan.names
        pos = [exp.index(c) for c in plan.explained]
        for m in exp.methods:
            write_lowres_maps(exp.raw[m][0, pos], plan.grid_affine, plan.grid_shape, folder / lowres_name(m),
                              labels=[labels[c] for c in plan.explained], description=f"medcam3d {m} signed raw maps",
                              map_affine=plan.map_affine)
        return [lowres_name(m) for m in exp.methods]


class _FullResWriter:
    """The full-resolution maps and montages of one output folder, a chunk of classes at a time.

    Each chunk's display maps are sampled on the scan grid (uint8 ``[maps, K, J, I]``, i.e. each map's Fortran-order
    voxel bytes) slab by slab; every slab goes to the thread pool to be compressed as soon as it exists, the montages
    are drawn from the same arrays meanwhile, and the chunk's files are written once the next chunk is sampled."""

    def __init__(self, session: Session, result: ScanResult, plan: OutputPlan, folder: Path,
                 pool: ThreadPoolExecutor, dicom: DicomExport | None = None, notes: list[str] | None = None) -> None:
        self.session, self.result, self.plan, self.folder, self.pool = session, result, plan, folder, pool
        self.dicom, self.notes = dicom, notes if notes is not None else []
        self.exp = result.explanation
        self.methods = list(self.exp.methods)
        self.labels = plan.names
        vol = result.volume
        self.shape = tuple(int(n) for n in vol.shape)
        geometry = self.exp.map_geometry(session.map_geometry)
        self.sampler: ScanSampler | None = None
        if len(self.exp.map_size) == 3 and affine_reason(result.grid, vol.affine, vol.shape) is None:
            to_cells = voxel_to_cells(vol.affine, plan.grid_affine, geometry)
            self.sampler = ScanSampler(to_cells, self.exp.map_size, self.shape)
        self.slab = self.sampler.slab if self.sampler else max(1, SLAB_VOXELS // (self.shape[0] * self.shape[1]))
        self._buffers: list[np.ndarray] = []  # two uint8 buffers, alternating between chunks (no fresh pages)
        self._chunks = 0
        self.renderer = MontageRenderer()  # one figure for every montage of the scan

    def run(self, step: Callable[[str], None], timings: dict[str, float]) -> list[str]:
        """Write every full-resolution class; returns the file names. Adds ``write.fullres_maps`` (sampling and
        files) and ``write.montages`` to ``timings``."""
        classes = self.plan.full_res
        per_chunk = max(1, FULLRES_CHUNK_BYTES // (math.prod(self.shape) * len(self.methods)))
        written: list[str] = []
        pending: list[ChunkedNifti] = []
        t_maps = t_montages = 0.0
        try:
            for n0 in range(0, len(classes), per_chunk):
                chunk = classes[n0:n0 + per_chunk]
                step(f"full resolution {n0 + len(chunk)}/{len(classes)}: {', '.join(self.labels[c] for c in chunk)}")
                t0 = time.perf_counter()
                volumes, files = self._sample(chunk)
                t1 = time.perf_counter()
                written += [self._montage(c, volumes, n) for n, c in enumerate(chunk)]
                if self.dicom is not None:
                    written += [f for n, c in enumerate(chunk) for f in self._dicom(c, volumes, n)]
                t2 = time.perf_counter()
                written += [f.finish().name for f in pending]  # the previous chunk: compressed meanwhile
                pending = files
                t_maps, t_montages = t_maps + (t1 - t0) + (time.perf_counter() - t2), t_montages + (t2 - t1)
            t3 = time.perf_counter()
            written += [f.finish().name for f in pending]
            t_maps += time.perf_counter() - t3
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        timings.update({"write.fullres_maps": t_maps, "write.montages": t_montages})
        return written

    def _display_maps(self, chunk: Sequence[int]) -> torch.Tensor:
        """``[methods x classes, *map_size]`` display maps (ReLU, whole-map min-max), method-major."""
        pos = [self.exp.index(c) for c in chunk]
        return torch.cat([normalize(self.exp.raw[m][:, pos])[0] for m in self.methods])

    def _sample(self, chunk: Sequence[int]) -> tuple[np.ndarray, list[ChunkedNifti]]:
        """The chunk's uint8 maps ``[methods x classes, K, J, I]`` and their files, fed slab by slab."""
        volumes = self._volumes(len(self.methods) * len(chunk))
        header = nifti_header_bytes(self.shape, self.result.volume.affine, np.uint8, slope=DISPLAY_SLOPE)
        files = []
        for n in range(volumes.shape[0]):
            m, c = self.methods[n // len(chunk)], chunk[n % len(chunk)]
            files.append(ChunkedNifti(self.folder / fullres_name(m, c, self.labels[c]), header, volumes[n].nbytes,
                                      self.pool))
        try:
            if self.sampler is not None:
                for _, _, slab in self.sampler.slabs(self._display_maps(chunk), out=volumes):
                    for n, f in enumerate(files):
                        f.add(slab[n])  # compressed in the pool while the next slab is sampled
            else:
                self._sample_by_inverse(chunk, volumes, files)
        except BaseException:
            for f in files:
                f.cancel()
            raise
        return volumes, files

    def _volumes(self, n: int) -> np.ndarray:
        """uint8 ``[n, K, J, I]`` for the next chunk: the buffer the chunk before last used (its files are written
        by now), so its pages are already mapped."""
        i, j, k = self.shape
        slot = self._chunks % 2
        self._chunks += 1
        if len(self._buffers) <= slot or self._buffers[slot].shape[0] < n:
            buffer = np.empty((n, k, j, i), dtype=np.uint8)
            self._buffers[slot:slot + 1] = [buffer]
        return self._buffers[slot][:n]

    def _sample_by_inverse(self, chunk: Sequence[int], volumes: np.ndarray, files: list[ChunkedNifti]) -> None:
        """Fallback for preprocessing that is not purely affine: each map on the network grid, then MONAI's
        inverse, one map at a time."""
        session, grid = self.session, self.result.grid
        for n in range(volumes.shape[0]):
            m, c = self.methods[n // len(chunk)], chunk[n % len(chunk)]
            hm = self.exp.heatmap(m, size=self.plan.grid_shape, classes=[c], geometry=session.map_geometry)[0]
            on_scan = session.preprocessor.invert(hm, grid)[0]  # [I, J, K] float32
            volumes[n] = np.clip(on_scan * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8).transpose(2, 1, 0)
            for k0 in range(0, volumes.shape[1], self.slab):
                files[n].add(volumes[n, k0:k0 + self.slab])

    def _dicom(self, c: int, volumes: np.ndarray, n: int) -> list[str]:
        """Class ``c``'s maps as DICOM objects (``--dicom-out``), from the same uint8 arrays as the NIfTIs, scaled
        the same way (``DISPLAY_SLOPE``), so the DICOM values equal the NIfTI's as read."""
        assert self.dicom is not None
        per_method = volumes.shape[0] // len(self.methods)
        out: list[str] = []
        for a, m in enumerate(self.methods):
            heatmap = volumes[a * per_method + n].transpose(2, 1, 0).astype(np.float32) * np.float32(DISPLAY_SLOPE)
            out += _write_dicom(heatmap, self.result.volume, self.folder, m, c, self.labels[c], self.dicom, self.notes)
        return out

    def _montage(self, c: int, volumes: np.ndarray, n: int) -> str:
        """Class ``c``'s montage from its maps (row ``n`` of each method's block in ``volumes``)."""
        result, exp, label = self.result, self.exp, self.labels[c]
        per_method = volumes.shape[0] // len(self.methods)
        maps = {m: volumes[a * per_method + n].transpose(2, 1, 0) for a, m in enumerate(self.methods)}  # [I, J, K]
        k = exp.index(c)
        scales = {}
        for m in self.methods:
            pos = torch.relu(exp.raw[m][0, k])
            scales[m] = (float(pos.min()), float(pos.max()))
        cam = exp.certificate.per_class[k] == "cam" and len(self.methods) > 1
        note = (f"certificate 'cam': {', '.join(self.methods)} coincide for this class by proof (global average "
                "pooling + one linear layer), so one row is shown") if cam else None
        p = float(result.probabilities[c])
        model = "synthetic demo model" if self.session.synthetic_only else self.session.config.name
        title = f"{label}  score {result.scores[c]:+.3f}  p={p:.3f}  ({model})"
        at = self.plan.places.scan_index.get(c) if self.plan.places is not None else None
        if at is not None:  # a region: cut through its centroid; its score is a sum of logits, p a mean
            title = f"{label}  region score {result.scores[c]:+.3f}  mean p={p:.3f}  ({model})"
        name = montage_name(c, label)
        render_montage(result.volume.array, maps, result.volume.affine, self.folder / name, title,
                       peak_from=self.methods[0], scales=scales, note=note,
                       covered=self.sampler.covered_at if self.sampler is not None else None,
                       methods=self.methods[:1] if cam else None, renderer=self.renderer, at=at,
                       region=self._region(c))
        return name

    def _region(self, c: int) -> np.ndarray | None:
        """Target ``c``'s region on the scan's grid (bool ``[I, J, K]``), None for classes."""
        result, prediction = self.result, self.result.prediction
        infos = self.exp.targets or []
        if prediction is None or c >= len(infos):
            return None
        mask = prediction.region(c, infos[c].cls)
        if mask is None:
            return None
        vol = result.volume
        on_scan = labels_on_scan(mask.astype(np.uint8), result.grid, vol.affine, vol.shape,
                                 invert=lambda m: self.session.preprocessor.invert(m, result.grid))
        return on_scan.astype(bool)


def _write_dicom(heatmap: np.ndarray, volume: Volume, folder: Path, method: str, c: int, label: str,
                 dicom: DicomExport, notes: list[str]) -> list[str]:
    """Class ``c``'s ``method`` heatmap ``[I, J, K]`` on the scan grid as a DICOM Parametric Map (and a SEG at the
    export's threshold); their names."""
    title = method_title(method)
    pm = dicom_pm_name(method, c, label)
    write_parametric_map(heatmap, volume, folder / pm, label=title, description=f"medcam3d {title} {label}",
                         on_note=notes.append)
    if dicom.seg_threshold is None:
        return [pm]
    seg = dicom_seg_name(method, c, label)
    write_segmentation(heatmap, volume, folder / seg, dicom.seg_threshold, label=f"{title} {label}",
                       on_note=notes.append)
    return [pm, seg]


def _dicom_record(written: Sequence[str], dicom: DicomExport | None) -> DicomExportRecord | None:
    """The summary's record of the DICOM objects written (``None`` without ``--dicom-out``)."""
    if dicom is None:
        return None
    return DicomExportRecord(
        parametric_maps=sorted(n for n in written if n.startswith(DICOM_PM_PREFIX)),
        segmentations=sorted(n for n in written if n.startswith(DICOM_SEG_PREFIX)),
        seg_threshold=dicom.seg_threshold,
    )


def _placement_source(exp: Explanation) -> str | None:
    """How the cells' placement was found (:attr:`medcam3d.placement.Placement.source`), None when unknown."""
    return exp.placement.source if exp.placement is not None else None


def _predicted(result: ScanResult, c: int, threshold: float) -> bool:
    """Whether class ``c`` is predicted: its probability at or above the threshold; a segmentation target is when
    its region is (part of) the prediction."""
    if result.task == SEGMENTATION_TASK:
        info = (result.explanation.targets or [])[c]
        if info.region in ("predicted", "component"):
            return True
    return bool(result.probabilities[c] >= threshold)


def _score_rows(result: ScanResult, plan: OutputPlan, threshold: float) -> list[dict[str, Any]]:
    """The rows of ``scores.csv`` (for targets: the raw region score and the mean probability over the region)."""
    scores, probs = result.scores, result.probabilities
    return [
        {"index": c, "label": plan.names[c], "score": f"{scores[c]:.6g}", "probability": f"{probs[c]:.6g}",
         "predicted": int(_predicted(result, c, threshold)), "full_resolution": int(c in plan.full_res)}
        for c in plan.explained
    ]


def _segmentation_fields(prediction: Prediction, records: list[TargetRecord]) -> dict[str, Any]:
    """The summary's segmentation fields: task, targets, the segmentation file and its label values."""
    return {
        "task": "segmentation",
        "targets": records,
        "segmentation": SEGMENTATION,
        "segmentation_labels": {str(v): n for v, n in prediction.names.items()},
    }


@contextmanager
def _writing(out_dir: str | Path) -> Iterator[Path]:
    """:func:`~medcam3d.outputs.output_folder`, a failed write (disk full, folder not writable) turned into an
    InputError naming the folder (the partial folder removed, an earlier one kept)."""
    try:
        with output_folder(out_dir) as tmp:
            yield tmp
    except OSError as e:
        raise InputError(f"cannot write the output folder ({e.strerror or e}); nothing was written",
                         Path(out_dir).expanduser()) from None


def _input_record(vol: Volume) -> InputRecord:
    """The scan's identity (path, SHA-256, DICOM meta without identifiers) and grid."""
    exists = Path(vol.source).exists()
    return InputRecord(
        path=str(Path(vol.source).resolve()) if exists else vol.source,
        sha256=sha256_of(vol.source) if exists else None,
        meta={k: v for k, v in vol.meta.items() if isinstance(v, (str, int, float, bool)) or v is None},
        shape=list(vol.shape),
        spacing_mm=[round(s, 6) for s in vol.spacing],
        axcodes=vol.axcodes,
        affine=np.asarray(vol.affine).tolist(),
    )


def _peak(raw: torch.Tensor, map_affine: np.ndarray | None) -> PeakRecord:
    """The maximum of one class's raw map ``[*map_spatial]``; its RAS position when positive and placed."""
    flat = int(torch.argmax(raw))
    value = float(raw.flatten()[flat])
    ijk = np.unravel_index(flat, tuple(raw.shape))
    world = None
    if map_affine is not None and value > 0:
        world = (map_affine @ np.array([*ijk, 1.0]))[:3].round(2).tolist()
    return PeakRecord(map_index=[int(v) for v in ijk], value=value, world_ras_mm=world)


def _class_records(result: ScanResult, plan: OutputPlan, threshold: float) -> list[ClassRecord]:
    """One record per explained class: scores, certificate evidence, peaks, HiResCAM-vs-Grad-CAM disagreement."""
    exp = result.explanation
    cert = exp.certificate
    pair = list(exp.methods[:2])
    dis = exp.disagreement(pair[0], pair[1]) if len(pair) > 1 else None
    records = []
    for c in plan.explained:
        k = exp.index(c)
        records.append(ClassRecord(
            index=c,
            label=plan.names[c],
            score=float(result.scores[c]),
            probability=float(result.probabilities[c]),
            predicted=_predicted(result, c, threshold),
            full_resolution=c in plan.full_res,
            certificate=cert.per_class[k],
            completeness_residual=float(cert.completeness_residual[0, k]),
            relative_residual=float(cert.relative_residual[0, k]),
            bias=float(cert.baseline[0, k]),
            peak={m: _peak(exp.raw[m][0, k], plan.map_affine) for m in exp.methods},
            disagreement=None if dis is None else DisagreementRecord.from_dict(
                {"methods": pair, **{name: float(v[0, k]) for name, v in dis.items()}}),
        ))
    return records


def explain_scan(
    scan: str | Path,
    out_dir: str | Path,
    config: Config | str | Path | None = None,
    checkpoint: str | Path | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    classes: Sequence[str | int] | None = None,
    full_res: Sequence[str | int] | None = None,
    device: str = "auto",
    series_uid: str | None = None,
    allow_resample: bool = False,
    session: Session | None = None,
    *,
    max_voxels: int | None = None,
    ignore_modality: bool = False,
    dicom: DicomExport | None = None,
    target_mask: str | Path | None = None,
) -> dict[str, Any]:
    """Read ``scan`` (NIfTI, NRRD/MHA, DICOM folder), explain it and write ``out_dir``. Returns the summary (the
    JSON object written to ``summary.json``; :func:`medcam3d.outputs.load_summary` reads it typed).

    ``max_voxels`` bounds the scan and every preprocessing grid (size checks before allocating);
    ``ignore_modality`` explains a DICOM scan of a modality the config does not read; ``dicom`` also writes the
    full-resolution maps as DICOM (a DICOM source is needed); ``target_mask`` (segmentation models) is a mask file
    on the scan's grid explained instead of the predicted regions. Bad input raises :class:`InputError` before
    anything is written."""
    check_output_folder(out_dir)
    volume, t_read = read_scan(scan, series_uid, allow_resample, max_voxels=max_voxels)
    if dicom is not None:
        check_dicom_source(volume)
    mask = read_scan(target_mask, max_voxels=max_voxels)[0] if target_mask is not None else None
    s = session or Session(config, checkpoint, methods, device, max_voxels=max_voxels,
                           ignore_modality=ignore_modality)
    try:
        result = s.explain_volume(volume, classes, read_seconds=t_read, target_mask=mask)
    except EmptyScan as e:  # a segmentation with nothing to explain: the segmentation and the note, no maps
        return s.write_empty(e.result, out_dir).to_dict()
    return s.write(result, out_dir, classes, full_res, dicom=dicom)


def read_scan(scan: str | Path, series_uid: str | None = None, allow_resample: bool = False, *,
              max_voxels: int | None = None) -> tuple[Volume, float]:
    """:func:`medcam3d.io.read_volume` (size-checked against ``max_voxels``) with its wall time in seconds."""
    t0 = time.perf_counter()
    volume = read_volume(scan, series_uid=series_uid, allow_resample=allow_resample, max_voxels=max_voxels)
    return volume, time.perf_counter() - t0
