"""``Explaind``: explanations as a MONAI dictionary transform.

``Explaind(keys="image", model=net)`` explains each image of a data dictionary (one sample ``[C, *spatial]``, as
in a ``Compose`` or a ``Dataset``'s transforms, or a collated batch ``[B, C, *spatial]``) and adds

* ``image_<method>`` -- display heatmaps ``[K, *spatial]`` in [0, 1] for the K explained classes, MetaTensors
  with the image's meta and transform history, so ``Invertd(keys="image_hirescam", orig_keys="image", ...)``
  maps them back to the scan and ``SaveImaged`` writes them there;
* ``image_scores`` -- the raw scores ``[M]`` of all outputs; ``image_classes`` -- the K explained class indices;
  ``image_certificate`` -- the certificate kind (``"cam"``, ``"affine-head"``, ``"none"``).

The model runs only inside the explainer (one forward pass with an fx-traceable model; the head evaluations of
the certificate are head-only): ``Explaind`` adds no forward pass of its own (``scripts/bench_monai.py``).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch import Tensor, nn

from ..explainer import Explainer
from ..explanation import Explanation
from ..selection import depends_on_scores, select_classes

__all__ = ["Explaind", "select"]


def select(
    exp: Explanation, classes: str | Sequence[str | int] | None, labels: Sequence[str] | None, threshold: float,
    sample: int = 0,
) -> list[int]:
    """Class indices for ``classes`` (tokens of :mod:`medcam3d.selection`: ``"all"``, ``"positive"``, ``"top-3"``,
    names, indices; a single string is one token) on sample ``sample`` of ``exp`` (sigmoid probabilities)."""
    spec = [classes] if isinstance(classes, (str, int)) else classes
    names = list(labels) if labels else [f"class_{i}" for i in range(exp.scores.shape[1])]
    scores = exp.scores[sample].detach().cpu().double().numpy()
    return select_classes(spec, scores, 1.0 / (1.0 + np.exp(-scores)), names, threshold, "classes")


class Explaind(MapTransform):
    """Explain ``keys`` with an :class:`~medcam3d.Explainer` (see the module docstring).

    Args:
        keys: the image keys.
        model: the network (ignored when ``explainer`` is given).
        target_layer: as for :class:`~medcam3d.Explainer` (default ``"auto"`` unless the model declares one).
        methods: the methods whose heatmaps are added.
        classes: which classes get maps: None (all), indices or labels, or selection tokens such as
            ``"positive"`` or ``"top-3"`` (:mod:`medcam3d.selection`; ``threshold`` on sigmoid probabilities).
        output_postfix: ``{key}_{postfix}{method}`` names the heatmaps (default ``""``: ``image_hirescam``).
        forward_kwargs: model forward argument name -> data key (e.g. ``{"age": "age"}``), or fixed values
            under ``forward_values``.
        explainer: a ready :class:`~medcam3d.Explainer` to use instead of building one.
        allow_missing_keys: skip absent keys.
        explainer_kwargs: more :class:`~medcam3d.Explainer` arguments (``labels``, ``map_geometry``, ...).
    """

    def __init__(
        self,
        keys: KeysCollection,
        model: nn.Module | None = None,
        target_layer: str | nn.Module | None = None,
        methods: Iterable[str] = ("hirescam", "gradcam"),
        classes: str | Sequence[str | int] | None = None,
        output_postfix: str = "",
        threshold: float = 0.5,
        forward_kwargs: Mapping[str, Hashable] | None = None,
        forward_values: Mapping[str, Any] | None = None,
        explainer: Explainer | None = None,
        allow_missing_keys: bool = False,
        **explainer_kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if explainer is None:
            if model is None:
                raise ValueError("Explaind: give a model or an explainer")
            explainer = Explainer(model, target_layer, tuple(methods), **explainer_kwargs)
        self.explainer = explainer
        self.methods = tuple(methods)
        self.classes = classes
        self.output_postfix = output_postfix
        self.threshold = threshold
        self.forward_kwargs = dict(forward_kwargs or {})
        self.forward_values = dict(forward_values or {})

    def _kwargs(self, d: Mapping[Hashable, Any], batched: bool) -> dict[str, Any]:
        out = dict(self.forward_values)
        for name, key in self.forward_kwargs.items():
            value = d[key]
            if isinstance(value, Tensor) and not batched:
                value = value[None]
            elif not isinstance(value, Tensor) and not batched:
                value = torch.as_tensor([value])
            out[name] = value
        return out

    def explain(self, image: Tensor, d: Mapping[Hashable, Any]) -> tuple[Explanation, bool]:
        """The explanation of one image (``[C, *spatial]``, explained as a batch of one) or a collated batch."""
        batched = isinstance(image, MetaTensor) and bool(image.is_batch)
        x = image if batched else image[None]
        classes = None if self.classes is None or depends_on_scores(_spec(self.classes)) else _spec(self.classes)
        return self.explainer(x, classes, **self._kwargs(d, batched)), batched

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            exp, batched = self.explain(d[key], d)
            chosen = self._chosen(exp, batched)
            for m in self.methods:
                maps = exp.heatmap(m, classes=chosen)
                d[f"{key}_{self.output_postfix}{m}"] = maps if batched else maps[0]
            scores = exp.scores.detach()
            d[f"{key}_scores"] = scores if batched else scores[0]
            d[f"{key}_classes"] = torch.as_tensor(chosen if chosen is not None else exp.classes)
            d[f"{key}_certificate"] = exp.certificate.kind
        return d

    def _chosen(self, exp: Explanation, batched: bool) -> list[int] | None:
        """The classes whose maps are kept: the score-dependent selection of one sample, else all explained."""
        if self.classes is None or not depends_on_scores(_spec(self.classes)):
            return None
        if batched and exp.scores.shape[0] > 1:
            raise ValueError("Explaind: score-dependent classes (e.g. 'positive') need one sample at a time")
        return select(exp, self.classes, self.explainer.labels, self.threshold)


def _spec(classes: str | Sequence[str | int]) -> list[str | int]:
    return [classes] if isinstance(classes, (str, int)) else list(classes)
