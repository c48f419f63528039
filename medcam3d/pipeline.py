"""One scan in, one output folder out: read → preprocess → explain → map back → write.

The command line (``medcam3d explain``), the napari widget and the batch runner all call this module rather than
repeating the steps. :class:`Session` holds what is expensive to set up (config, model, explainer) so that a batch
worker loads the model once and explains many scans.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from .geometry import GEOMETRIES
from .io import Volume, read_volume, write_lowres_maps, write_map_like
from .outputs import (
    SCORES,
    SUMMARY,
    fullres_name,
    lowres_name,
    montage_name,
    output_folder,
    render_montage,
    write_json,
    write_scores_csv,
)
from .preprocess import Preprocessor

__all__ = ["DEFAULT_CONFIG", "ScanResult", "Session", "explain_scan", "read_scan", "resolve_device", "select_classes"]

DEFAULT_CONFIG = "demo_axialnet"
DEFAULT_METHODS = ("hirescam", "gradcam")
MIN_FULL_RES = 3


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return d


def sha256_of(path: str | Path) -> str | None:
    """SHA-256 of a file, or of a folder's files (sorted by name, contents chained); None if unreadable."""
    p = Path(path)
    h = hashlib.sha256()
    try:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("medcam3d", "torch", "monai", "numpy", "nibabel", "SimpleITK", "pydicom"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def select_classes(
    spec: Sequence[str | int] | None,
    scores: np.ndarray,
    probabilities: np.ndarray,
    labels: Sequence[str],
    threshold: float,
    what: str = "--classes",
) -> list[int]:
    """Resolve a class selection against one scan's scores.

    Tokens (unioned, first-come order): ``all``, ``none``, ``positive`` (probability ≥ threshold), ``top-K``,
    a label, or an integer index. ``None`` means all."""
    if spec is None:
        return list(range(len(labels)))
    out: list[int] = []

    def add(idx: Sequence[int]) -> None:
        for i in idx:
            if i not in out:
                out.append(int(i))

    for tok in spec:
        t = str(tok).strip()
        if t == "all":
            add(range(len(labels)))
        elif t == "none":
            continue
        elif t == "positive":
            add([int(i) for i in np.argsort(-scores) if probabilities[i] >= threshold])
        elif t.startswith("top-"):
            try:
                k = int(t[4:])
            except ValueError:
                raise InputError(f"{what}: bad token {t!r} (use top-K with an integer K)") from None
            add([int(i) for i in np.argsort(-scores)[: max(k, 0)]])
        elif t in labels:
            add([list(labels).index(t)])
        elif t.lstrip("-").isdigit():
            i = int(t)
            if not 0 <= i < len(labels):
                raise InputError(f"{what}: index {i} out of range (0..{len(labels) - 1})")
            add([i])
        else:
            raise InputError(f"{what}: unknown class {t!r} (labels: {', '.join(labels[:6])}, ...)")
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


class Session:
    """A configured model ready to explain scans.

    Args:
        config: a :class:`Config`, a path or a shipped config name (default: the embedded demo model).
        checkpoint: weights file overriding the config's ``weights``.
        methods: methods to compute (HiResCAM and Grad-CAM by default).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        map_geometry: where feature-resolution cells go on the scan: ``"field"`` (the field of view divided evenly,
            the paper's convention) or ``"receptive"`` (the receptive-field centres the model declares; AxialNet
            does). Used for full-resolution heatmaps and the low-resolution maps' affine.
    """

    def __init__(
        self,
        config: Config | str | Path | None = None,
        checkpoint: str | Path | None = None,
        methods: Sequence[str] = DEFAULT_METHODS,
        device: str | torch.device = "auto",
        map_geometry: str = "field",
    ) -> None:
        if map_geometry not in GEOMETRIES:
            raise InputError(f"map geometry must be one of {', '.join(GEOMETRIES)}, got {map_geometry!r}")
        self.map_geometry = map_geometry
        cfg = config if isinstance(config, Config) else load_config(config or DEFAULT_CONFIG)
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
        self.explainer = Explainer(self.model, cfg.target_layer, self.methods, labels=cfg.labels)
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
        if classes is not None and not any(str(c) in ("all", "positive") or str(c).startswith("top-") for c in classes):
            n = len(self.config.labels)
            idx = select_classes(classes, np.zeros(n), np.zeros(n), self.config.labels, self.config.threshold)
        exp = self.explainer(x, classes=idx)
        t2 = time.perf_counter()
        probs = exp.probabilities(self.config.probability)[0].detach().cpu().numpy().astype(np.float64)
        timings = {} if read_seconds is None else {"read": read_seconds}
        timings.update({"preprocess": t1 - t0, "explain": t2 - t1})
        timings.update({f"explain.{k}": v for k, v in exp.timings.items()})
        return ScanResult(volume, grid, exp.cpu(), probs, timings)

    # write ---------------------------------------------------------------------------------------------------------
    def write(
        self,
        result: ScanResult,
        out_dir: str | Path,
        classes: Sequence[str | int] | None = None,
        full_res: Sequence[str | int] | None = None,
        progress: Callable[[str], None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write the output folder (atomically) and return the summary dict.

        Args:
            classes: which explained classes go to the outputs (default: all explained).
            full_res: which of those also get full-resolution maps and montages (default: predicted positive,
                and at least the top 3 by score).
        """
        cfg, exp = self.config, result.explanation
        labels = cfg.labels
        scores, probs = result.scores, result.probabilities
        explained = [c for c in select_classes(classes, scores, probs, labels, cfg.threshold) if c in exp.classes]
        if not explained:
            raise InputError("--classes selects no explained class")
        if full_res is None:
            fr = select_classes(["positive", f"top-{MIN_FULL_RES}"], scores, probs, labels, cfg.threshold)
        else:
            fr = select_classes(full_res, scores, probs, labels, cfg.threshold, what="--full-res")
        fr = [c for c in fr if c in explained]
        step = progress or (lambda s: None)
        t0 = time.perf_counter()
        grid_affine = np.asarray(result.grid.affine, dtype=np.float64)
        grid_shape = tuple(int(s) for s in result.grid.shape[1:])
        pos = [exp.index(c) for c in explained]
        map_shape = exp.map_size
        geometry = exp.map_geometry(self.map_geometry)  # InputError when the model declares no receptive geometry
        map_affine = grid_affine @ geometry.index_affine().numpy() if len(map_shape) == 3 else None
        written: list[str] = []
        with output_folder(out_dir) as tmp:
            rows = [
                {
                    "index": c, "label": labels[c], "score": f"{scores[c]:.6g}", "probability": f"{probs[c]:.6g}",
                    "predicted": int(probs[c] >= cfg.threshold), "full_resolution": int(c in fr),
                }
                for c in explained
            ]
            write_scores_csv(rows, tmp / SCORES)
            written.append(SCORES)
            step("low-resolution maps")
            for m in exp.methods:
                maps = exp.raw[m][0, pos]
                write_lowres_maps(maps, grid_affine, grid_shape, tmp / lowres_name(m), labels=[labels[c] for c in explained],
                                  description=f"medcam3d {m} signed raw maps", map_affine=map_affine)
                written.append(lowres_name(m))
            for c in fr:
                step(f"full resolution: {labels[c]}")
                on_scan: dict[str, np.ndarray] = {}
                for m in exp.methods:
                    hm = exp.heatmap(m, size=grid_shape, classes=[c], geometry=self.map_geometry)[0]  # [1, S, H, W]
                    back = self.preprocessor.invert(hm, result.grid)[0]
                    name = fullres_name(m, c, labels[c])
                    write_map_like(back, result.volume, tmp / name, description=f"medcam3d {m} heatmap {labels[c]}"[:79])
                    written.append(name)
                    on_scan[m] = back
                title = (f"{labels[c]}  score {scores[c]:+.3f}  p={probs[c]:.3f}  "
                         f"({'synthetic demo model' if self.synthetic_only else cfg.name})")
                render_montage(result.volume.array, on_scan, result.volume.affine, tmp / montage_name(c, labels[c]),
                               title, peak_from=exp.methods[0])
                written.append(montage_name(c, labels[c]))
            timings = dict(result.timings)
            timings["write"] = time.perf_counter() - t0
            summary = self._summary(result, explained, fr, map_affine, timings, written + [SUMMARY], extra)
            write_json(summary, tmp / SUMMARY)
        return summary

    def _summary(
        self,
        result: ScanResult,
        explained: list[int],
        fr: list[int],
        map_affine: np.ndarray | None,
        timings: dict[str, float],
        files: list[str],
        extra: dict[str, Any] | None,
    ) -> dict[str, Any]:
        cfg, exp, vol = self.config, result.explanation, result.volume
        cert = exp.certificate
        geo = exp.map_geometry(self.map_geometry)
        dis = exp.disagreement(exp.methods[0], exp.methods[1]) if len(exp.methods) > 1 else None
        per_class = []
        for c in explained:
            k = exp.index(c)
            entry: dict[str, Any] = {
                "index": c,
                "label": cfg.labels[c],
                "score": float(result.scores[c]),
                "probability": float(result.probabilities[c]),
                "predicted": bool(result.probabilities[c] >= cfg.threshold),
                "full_resolution": c in fr,
                "certificate": cert.per_class[k],
                "completeness_residual": float(cert.completeness_residual[0, k]),
                "relative_residual": float(cert.relative_residual[0, k]),
                "bias": float(cert.baseline[0, k]),
                "peak": {},
            }
            if dis is not None:
                entry["disagreement"] = {
                    "methods": [exp.methods[0], exp.methods[1]],
                    **{name: float(v[0, k]) for name, v in dis.items()},
                }
            for m in exp.methods:
                raw = exp.raw[m][0, k]
                flat = int(torch.argmax(raw))
                val = float(raw.flatten()[flat])
                ijk = np.unravel_index(flat, tuple(raw.shape))
                world = None
                if map_affine is not None and val > 0:
                    world = (map_affine @ np.array([*ijk, 1.0]))[:3].round(2).tolist()
                entry["peak"][m] = {"map_index": [int(v) for v in ijk], "value": val, "world_ras_mm": world}
            per_class.append(entry)
        weights = self.weights_path
        summary: dict[str, Any] = {
            "medcam3d_version": _versions().get("medcam3d", "unknown"),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input": {
                "path": str(Path(vol.source).resolve()) if Path(vol.source).exists() else vol.source,
                "sha256": sha256_of(vol.source) if Path(vol.source).exists() else None,
                "meta": {k: v for k, v in vol.meta.items() if isinstance(v, (str, int, float, bool)) or v is None},
                "shape": list(vol.shape),
                "spacing_mm": [round(s, 6) for s in vol.spacing],
                "axcodes": vol.axcodes,
                "affine": np.asarray(vol.affine).tolist(),
            },
            "config": {
                "name": cfg.name,
                "path": str(cfg.path) if cfg.path else None,
                "sha256": sha256_of(cfg.path) if cfg.path else None,
            },
            "model": {
                "spec": cfg.model,
                "weights": str(weights) if weights else None,
                "weights_sha256": sha256_of(weights) if weights and weights.is_file() else None,
                "target_layer": self.explainer.layer_name,
                "synthetic_data_only": self.synthetic_only,
                "card": self.model_card,
            },
            "network_grid": {
                "shape": [int(s) for s in result.grid.shape[1:]],
                "affine": np.asarray(result.grid.affine, dtype=np.float64).tolist(),
            },
            "map_shape": list(exp.map_size),
            "map_affine": map_affine.tolist() if map_affine is not None else None,
            "map_geometry": {"kind": self.map_geometry, "offset_voxels": list(geo.offset),
                             "stride_voxels": list(geo.stride)},
            "methods": list(exp.methods),
            "device": str(self.device),
            "versions": _versions(),
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            "certificate": {
                "kind": cert.kind,
                "exact": cert.exact,
                "summary": cert.summary(),
                "head": cert.head,
                "tolerance": cert.tolerance,
                "n_probes": cert.n_probes,
                "jacobian_test": cert.jacobian_test,
                "max_jacobian_difference": float(cert.jacobian_difference.max()),
                "max_probe_residual": float(cert.probe_residual.max()) if cert.probe_residual.numel() else 0.0,
                "notes": list(cert.notes),
            },
            "probability": cfg.probability,
            "threshold": cfg.threshold,
            "classes": per_class,
            "files": sorted(files),
        }
        if extra:
            summary.update(extra)
        return summary


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
    """Read ``scan`` (NIfTI, NRRD/MHA, DICOM folder), explain it and write ``out_dir``. Returns the summary.

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
