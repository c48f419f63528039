"""An Ignite handler that explains the cases of a MONAI ``SupervisedEvaluator`` as it validates.

``ExplainHandler(output_dir, classes="positive", max_cases=20).attach(evaluator)``: after each iteration the
batch's cases are explained one at a time (so batches padded to a common size by ``pad_list_data_collate`` are
first cropped back to each case's own size) and each case gets a folder ``output_dir/<case>/`` with

* ``<method>.nii.gz`` -- display heatmaps, one channel per explained class, written by MONAI's ``SaveImage``
  on the network grid, or on the scan's grid when ``invert`` (the evaluator's preprocessing) is given;
* ``scores.json`` -- raw scores and sigmoid probabilities of every output, the explained classes, the
  certificate kind, the explained layer and why.

The folder appears whole or not at all (written beside, then renamed). The evaluator's batch, outputs and metrics
are left untouched (the handler works on copies; the explainer leaves the network as it found it). A case that
fails is logged with its traceback and skipped; the run continues.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor, decollate_batch
from monai.transforms import Invertd, PadListDataCollate, SaveImage
from torch import nn

from ..explainer import Explainer
from ..files import write_json_atomic
from .transforms import Explaind

__all__ = ["ExplainHandler"]

_LOG = logging.getLogger("medcam3d.monai")


def _copy(image: Any) -> Any:
    """A MetaTensor copy whose meta and transform history are the handler's own (decollated items share them)."""
    if not isinstance(image, MetaTensor):
        return image
    out = MetaTensor(image.as_tensor().detach().clone())
    out.meta = deepcopy(image.meta)
    out.applied_operations = deepcopy(image.applied_operations)
    return out


def _named(name: str) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    """A ``SaveImage`` file-name formatter writing ``<name>.nii.gz``."""

    def formatter(meta: dict[str, Any], saver: Any) -> dict[str, Any]:
        return {"subject": name}

    return formatter


def _case_name(image: Any, index: int) -> str:
    meta = image.meta if isinstance(image, MetaTensor) else {}
    name = meta.get("filename_or_obj")
    if isinstance(name, str) and name:
        stem = Path(name.rstrip("/")).name
        return stem.removesuffix(".gz").removesuffix(".nii") or f"case_{index:04d}"
    return f"case_{index:04d}"


class ExplainHandler:
    """Explain and write each case of an evaluator's batches (see the module docstring).

    Args:
        output_dir: where the per-case folders go.
        model: the network to explain; default the engine's ``network``.
        target_layer, methods: as for :class:`~medcam3d.Explainer` (``target_layer`` default ``"auto"``).
        classes: ``"positive"`` (default), ``"all"``, ``"top-K"``, names or indices (:mod:`medcam3d.selection`).
        threshold: probability at or above which a class is positive (sigmoid).
        max_cases: stop explaining after this many cases (None: all).
        image_key: the batch key of the images.
        invert: the preprocessing to undo (``Invertd``) so maps are written on the scan's grid; None keeps the
            network grid.
        forward_kwargs: model forward argument -> batch key (e.g. ``{"age": "age"}``).
        explainer: a ready :class:`~medcam3d.Explainer` to use instead.
        explainer_kwargs: more :class:`~medcam3d.Explainer` arguments (``labels``, ...).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        model: nn.Module | None = None,
        target_layer: str | None = None,
        methods: Iterable[str] = ("hirescam", "gradcam"),
        classes: str | Sequence[str | int] = "positive",
        threshold: float = 0.5,
        max_cases: int | None = None,
        image_key: str = "image",
        invert: Any = None,
        forward_kwargs: Mapping[str, Hashable] | None = None,
        explainer: Explainer | None = None,
        **explainer_kwargs: Any,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.model = model
        self.target_layer = target_layer
        self.methods = tuple(methods)
        self.classes = classes
        self.threshold = threshold
        self.max_cases = max_cases
        self.image_key = image_key
        self.invert = invert
        self.forward_kwargs = dict(forward_kwargs or {})
        self.explainer = explainer
        self.explainer_kwargs = explainer_kwargs
        self.written: list[Path] = []
        self.failed: list[str] = []
        self.seen = 0

    def attach(self, engine: Any) -> None:
        """Run after every iteration of ``engine`` (an Ignite engine, e.g. MONAI's ``SupervisedEvaluator``)."""
        from ignite.engine import Events  # lazy: pytorch-ignite is the optional [monai] extra

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _transform(self, engine: Any) -> Explaind:
        if self.explainer is None:
            model = self.model if self.model is not None else engine.network
            self.explainer = Explainer(model, self.target_layer, self.methods, **self.explainer_kwargs)
        return Explaind(self.image_key, methods=self.methods, classes=self.classes, threshold=self.threshold,
                        forward_kwargs=self.forward_kwargs, explainer=self.explainer)

    def __call__(self, engine: Any) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else decollate_batch(batch, detach=True)
        explaind = self._transform(engine)
        for item in items:
            if self.max_cases is not None and self.seen >= self.max_cases:
                return
            self.seen += 1
            name = _case_name(item.get(self.image_key), self.seen - 1)
            try:
                self.written.append(self._case(explaind, item, name))
            except Exception:  # noqa: BLE001 - one bad case must not stop the validation run
                _LOG.exception("medcam3d: explaining case %s failed; the run continues", name)
                self.failed.append(name)

    def _case(self, explaind: Explaind, item: Mapping[Hashable, Any], name: str) -> Path:
        """Explain one decollated case and write its folder; returns the folder."""
        d = {k: v for k, v in item.items() if k == self.image_key or k in self.forward_kwargs.values()}
        d[self.image_key] = _copy(d[self.image_key])
        d = PadListDataCollate.inverse(d)  # back to the case's own size when the batch was padded
        d = explaind(d)
        keys = [f"{self.image_key}_{m}" for m in self.methods]
        if self.invert is not None and d[f"{self.image_key}_classes"].numel() > 0:
            d = Invertd(keys=keys, transform=self.invert, orig_keys=self.image_key, nearest_interp=False)(d)
        final = self.output_dir / name
        tmp = self.output_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            self._write(d, tmp, name)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _write(self, d: Mapping[Hashable, Any], folder: Path, name: str) -> None:
        for m in self.methods:
            maps = d[f"{self.image_key}_{m}"]
            if maps.shape[0] == 0:  # no class selected (e.g. none positive): scores.json only
                continue
            saver = SaveImage(output_dir=str(folder), output_postfix="", separate_folder=False, print_log=False,
                              output_name_formatter=_named(m))
            saver(maps)
        scores = d[f"{self.image_key}_scores"].detach().cpu().double()
        assert self.explainer is not None
        labels = self.explainer.labels or [f"class_{i}" for i in range(scores.numel())]
        layer = self.explainer.layer_choice
        write_json_atomic({
            "case": name,
            "labels": list(labels),
            "scores": scores.tolist(),
            "probabilities": torch.sigmoid(scores).tolist(),
            "classes": [labels[int(i)] for i in d[f"{self.image_key}_classes"].tolist()],
            "methods": list(self.methods),
            "certificate": d.get(f"{self.image_key}_certificate"),
            "target_layer": layer.name if layer else None,
            "target_layer_reason": layer.reason if layer else None,
        }, folder / "scores.json")
