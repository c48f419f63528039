"""One scan in, one output folder out: read → preprocess → explain → map back → write.

The command line (``medcam3d explain``), the napari widget and the batch runner all call this module rather than
repeating the steps. :class:`Session` holds what is expensive to set up (config, model, explainer) so that a batch
worker loads the model once and explains many scans.

Writing is compute -> write: :meth:`Session.plan_outputs` chooses the classes and places the maps,
:meth:`Session.summarise` builds the typed :class:`~medcam3d.outputs.Summary`, and :meth:`Session.write_folder`
writes the files and the summary (through :func:`medcam3d.outputs.write_summary`) into a folder that appears whole.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, load_config
from .errors import InputError
from .explainer import Explainer
from .explanation import Explanation
from .files import sha256_of
from .geometry import GEOMETRIES
from .io import Volume, read_volume, write_lowres_maps, write_map_like
from .methods import DEFAULT_METHODS
from .outputs import (
    SCORES,
    SUMMARY,
    CertificateRecord,
    ClassRecord,
    ConfigRecord,
    DisagreementRecord,
    GridRecord,
    InputRecord,
    MapGeometryRecord,
    ModelRecord,
    PeakRecord,
    Summary,
    fullres_name,
    lowres_name,
    montage_name,
    output_folder,
    render_montage,
    write_scores_csv,
    write_summary,
)
from .preprocess import Preprocessor
from .selection import depends_on_scores, select_classes

__all__ = [
    "DEFAULT_CONFIG",
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
MIN_FULL_RES = 3


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu or auto)")
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
        explanation: the :class:`Explanation` (batch of 1) for the explained classes.
        probabilities: ``[M]`` probabilities of all outputs.
        timings: seconds per stage.
    """

    volume: Volume
    grid: Any
    explanation: Explanation
    probabilities: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def scores(self) -> np.ndarray:
        """``[M]`` raw scores."""
        return self.explanation.scores[0].detach().cpu().numpy().astype(np.float64)


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
    """

    explained: list[int]
    full_res: list[int]
    grid_affine: np.ndarray
    grid_shape: tuple[int, ...]
    map_affine: np.ndarray | None


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
    """

    def __init__(
        self,
        config: Config | str | Path | None = None,
        checkpoint: str | Path | None = None,
        methods: Sequence[str] = DEFAULT_METHODS,
        device: str | torch.device = "auto",
        map_geometry: str | None = None,
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
        self.preprocessor = Preprocessor.from_config(cfg)
        self.model = cfg.build_model().to(self.device).eval()
        self.explainer = Explainer(self.model, cfg.target_layer, self.methods, labels=cfg.labels,
                                   map_geometry=map_geometry)
        wp = cfg.weights_path
        self.weights_path = wp
        card = wp.with_suffix(".json") if wp is not None else None
        self.model_card: dict[str, Any] | None = (
            json.loads(card.read_text(encoding="utf-8")) if card is not None and card.is_file() else None
        )

    @property
    def synthetic_only(self) -> bool:
        """True for a model trained on synthetic data only (the embedded demo), per its model card."""
        return bool(self.model_card and self.model_card.get("synthetic_data_only"))

    # compute -----------------------------------------------------------------------------------------------------
    def explain_volume(
        self, volume: Volume, classes: Sequence[str | int] | None = None, read_seconds: float | None = None
    ) -> ScanResult:
        """Preprocess and explain one scan (all outputs, or the given classes). ``read_seconds``: time spent
        reading the scan, recorded with the other timings."""
        t0 = time.perf_counter()
        grid = self.preprocessor(volume)
        t1 = time.perf_counter()
        x = grid.as_tensor()[None].to(self.device)  # [1, 1, S, H, W]
        idx = None  # all outputs: as cheap as a few, and score-dependent selections need every score
        if not depends_on_scores(classes):
            n = len(self.config.labels)
            idx = select_classes(classes, np.zeros(n), np.zeros(n), self.config.labels, self.config.threshold)
        exp = self.explainer(x, classes=idx)
        t2 = time.perf_counter()
        probs = exp.probabilities(self.config.probability)[0].detach().cpu().numpy().astype(np.float64)
        timings = {} if read_seconds is None else {"read": read_seconds}
        timings.update({"preprocess": t1 - t0, "explain": t2 - t1})
        timings.update({f"explain.{k}": v for k, v in exp.timings.items()})
        return ScanResult(volume, grid, exp.cpu(), probs, timings)

    # compute what goes into the folder ----------------------------------------------------------------------------
    def plan_outputs(
        self,
        result: ScanResult,
        classes: Sequence[str | int] | None = None,
        full_res: Sequence[str | int] | None = None,
    ) -> OutputPlan:
        """Which classes go to the output folder and where the maps sit (InputError before anything is written).

        Args:
            classes: which explained classes go to the outputs (default: all explained).
            full_res: which of those also get full-resolution maps and montages (default: predicted positive,
                and at least the top 3 by score).
        """
        cfg, exp = self.config, result.explanation
        scores, probs = result.scores, result.probabilities
        explained = [c for c in select_classes(classes, scores, probs, cfg.labels, cfg.threshold) if c in exp.classes]
        if not explained:
            raise InputError("--classes selects no explained class")
        spec = ["positive", f"top-{MIN_FULL_RES}"] if full_res is None else full_res
        fr = select_classes(spec, scores, probs, cfg.labels, cfg.threshold, what="--full-res")
        grid_affine = np.asarray(result.grid.affine, dtype=np.float64)
        geometry = exp.map_geometry(self.map_geometry)  # InputError when the model declares no receptive geometry
        map_affine = grid_affine @ geometry.index_affine().numpy() if len(exp.map_size) == 3 else None
        return OutputPlan(
            explained=explained,
            full_res=[c for c in fr if c in explained],
            grid_affine=grid_affine,
            grid_shape=tuple(int(s) for s in result.grid.shape[1:]),
            map_affine=map_affine,
        )

    def summarise(self, result: ScanResult, plan: OutputPlan) -> Summary:
        """The summary of ``result`` as ``plan`` writes it (its timings and file list are completed by
        :meth:`write_folder`)."""
        cfg, exp = self.config, result.explanation
        versions = _versions()
        geo = exp.map_geometry(self.map_geometry)
        return Summary(
            medcam3d_version=versions.get("medcam3d", "unknown"),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            input=_input_record(result.volume),
            config=ConfigRecord(name=cfg.name, path=str(cfg.path) if cfg.path else None,
                                sha256=sha256_of(cfg.path) if cfg.path else None),
            model=self._model_record(),
            network_grid=GridRecord(shape=list(plan.grid_shape), affine=plan.grid_affine.tolist()),
            map_shape=list(exp.map_size),
            map_affine=plan.map_affine.tolist() if plan.map_affine is not None else None,
            map_geometry=MapGeometryRecord(kind=geo.kind, offset_voxels=list(geo.offset),
                                           stride_voxels=list(geo.stride), source=_placement_source(exp)),
            methods=list(exp.methods),
            device=str(self.device),
            versions=versions,
            certificate=CertificateRecord.from_certificate(exp.certificate),
            probability=cfg.probability,
            threshold=cfg.threshold,
            classes=_class_records(result, plan, cfg.labels, cfg.threshold),
        )

    def _model_record(self) -> ModelRecord:
        w = self.weights_path
        return ModelRecord(
            spec=self.config.model,
            weights=str(w) if w else None,
            weights_sha256=sha256_of(w) if w and w.is_file() else None,
            target_layer=self.explainer.layer_name,
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
    ) -> Summary:
        """Write the output folder (atomically) and return its :class:`~medcam3d.outputs.Summary`.

        ``classes`` and ``full_res`` as in :meth:`plan_outputs`; ``progress`` is called with each stage's name;
        ``extra`` adds top-level sections to the summary (e.g. ``batch``, ``organ_shares``)."""
        t0 = time.perf_counter()
        plan = self.plan_outputs(result, classes, full_res)
        summary = self.summarise(result, plan)
        with output_folder(out_dir) as tmp:
            written = self._write_files(result, plan, tmp, progress or (lambda s: None))
            timings = {**result.timings, "write": time.perf_counter() - t0}
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
    ) -> dict[str, Any]:
        """:meth:`write_folder`, returning the summary as the JSON object written to ``summary.json``."""
        return self.write_folder(result, out_dir, classes, full_res, progress, extra).to_dict()

    def _write_files(self, result: ScanResult, plan: OutputPlan, folder: Path, step: Callable[[str], None]) -> list[str]:
        """scores.csv, the low-resolution maps, and each full-resolution class's maps and montage; their names."""
        write_scores_csv(_score_rows(result, plan, self.config.labels, self.config.threshold), folder / SCORES)
        step("low-resolution maps")
        written = [SCORES, *self._write_lowres(result, plan, folder)]
        for c in plan.full_res:
            step(f"full resolution: {self.config.labels[c]}")
            written += self._write_fullres(result, plan, c, folder)
        return written

    def _write_lowres(self, result: ScanResult, plan: OutputPlan, folder: Path) -> list[str]:
        """One 4-D ``lowres_<method>.nii.gz`` per method: the explained classes' signed raw maps."""
        exp, labels = result.explanation, self.config.labels
        pos = [exp.index(c) for c in plan.explained]
        for m in exp.methods:
            write_lowres_maps(exp.raw[m][0, pos], plan.grid_affine, plan.grid_shape, folder / lowres_name(m),
                              labels=[labels[c] for c in plan.explained], description=f"medcam3d {m} signed raw maps",
                              map_affine=plan.map_affine)
        return [lowres_name(m) for m in exp.methods]

    def _write_fullres(self, result: ScanResult, plan: OutputPlan, c: int, folder: Path) -> list[str]:
        """Class ``c``'s heatmap per method on the scan grid, and its montage."""
        exp, label = result.explanation, self.config.labels[c]
        on_scan: dict[str, np.ndarray] = {}
        written = []
        for m in exp.methods:
            hm = exp.heatmap(m, size=plan.grid_shape, classes=[c], geometry=self.map_geometry)[0]  # [1, S, H, W]
            on_scan[m] = self.preprocessor.invert(hm, result.grid)[0]
            name = fullres_name(m, c, label)
            write_map_like(on_scan[m], result.volume, folder / name, description=f"medcam3d {m} heatmap {label}"[:79])
            written.append(name)
        p = float(result.probabilities[c])
        title = (f"{label}  score {result.scores[c]:+.3f}  p={p:.3f}  "
                 f"({'synthetic demo model' if self.synthetic_only else self.config.name})")
        render_montage(result.volume.array, on_scan, result.volume.affine, folder / montage_name(c, label), title,
                       peak_from=exp.methods[0])
        return [*written, montage_name(c, label)]


def _placement_source(exp: Explanation) -> str | None:
    """How the cells' placement was found (:attr:`medcam3d.placement.Placement.source`), None when unknown."""
    return exp.placement.source if exp.placement is not None else None


def _score_rows(result: ScanResult, plan: OutputPlan, labels: Sequence[str], threshold: float) -> list[dict[str, Any]]:
    """The rows of ``scores.csv``."""
    scores, probs = result.scores, result.probabilities
    return [
        {"index": c, "label": labels[c], "score": f"{scores[c]:.6g}", "probability": f"{probs[c]:.6g}",
         "predicted": int(probs[c] >= threshold), "full_resolution": int(c in plan.full_res)}
        for c in plan.explained
    ]


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


def _class_records(result: ScanResult, plan: OutputPlan, labels: Sequence[str], threshold: float) -> list[ClassRecord]:
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
            label=labels[c],
            score=float(result.scores[c]),
            probability=float(result.probabilities[c]),
            predicted=bool(result.probabilities[c] >= threshold),
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
) -> dict[str, Any]:
    """Read ``scan`` (NIfTI, NRRD/MHA, DICOM folder), explain it and write ``out_dir``. Returns the summary (the
    JSON object written to ``summary.json``; :func:`medcam3d.outputs.load_summary` reads it typed).

    Bad input raises :class:`InputError` before anything is written."""
    volume, t_read = read_scan(scan, series_uid, allow_resample)
    s = session or Session(config, checkpoint, methods, device)
    result = s.explain_volume(volume, classes, read_seconds=t_read)
    return s.write(result, out_dir, classes, full_res)


def read_scan(scan: str | Path, series_uid: str | None = None, allow_resample: bool = False) -> tuple[Volume, float]:
    """:func:`medcam3d.io.read_volume` with its wall time in seconds."""
    t0 = time.perf_counter()
    volume = read_volume(scan, series_uid=series_uid, allow_resample=allow_resample)
    return volume, time.perf_counter() - t0
