"""The result of one explanation call: scores, signed raw maps, certificate."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .autolayer import LayerChoice
from .certificate import Certificate, disagreement
from .errors import InputError
from .geometry import GEOMETRIES, MapGeometry, covered_region
from .heatmaps import iter_heatmaps, to_heatmap
from .placement import Placement, no_receptive_message
from .targets import TargetInfo

__all__ = ["Explanation"]


@dataclass
class Explanation:
    """Maps for K classes of a batch of B inputs.

    Attributes:
        scores: ``[B, M]`` raw scores ``s_m`` (before sigmoid/softmax) of all M targets: the M model outputs
            for class targets (the default), the T region scores for segmentation targets (:mod:`medcam3d.targets`).
        classes: the K explained target indices (into the M scores), in the order of the maps' K axis.
        raw: method name -> ``[B, K, *map_spatial]`` signed maps at feature resolution (before any ReLU).
        certificate: what is proven about these maps (:class:`medcam3d.certificate.Certificate`).
        input_size: spatial size of the model input (the default heatmap size).
        labels: names of the M outputs, when known (for region targets, the target names).
        affine: ``[4, 4]`` affine of the input grid (array index -> RAS mm) when the input was a MONAI
            MetaTensor, else None.
        activations: ``[B, F, *map_spatial]`` explained-layer activations (only with ``keep_gradients=True``).
        gradients: ``[B, K, F, *map_spatial]`` ``∂s_k/∂A`` (only with ``keep_gradients=True``).
        timings: seconds spent per stage.
        geometry: where the model's explained cells sit on the input grid (receptive-field centres), when the
            model declares it (``medcam3d_map_geometry``) or it could be derived from the layers (see
            :mod:`medcam3d.placement`); None otherwise.
        placement: the placement display and export use by default (``geometry="auto"``): kind (``"receptive"`` or
            ``"field"``), offset, stride and how it was found (``"declared"``, ``"derived"``, ``"requested"`` or
            ``"fallback: <reason>"``); see :class:`medcam3d.placement.Placement`. None on explanations built by
            hand: ``"auto"`` then means :attr:`geometry` if known, else the field.
        meta: when the input was a MONAI MetaTensor, what its maps carry (:class:`medcam3d.monai.meta.MetaOut`):
            :meth:`heatmap` and :meth:`iter_heatmaps` on the input grid then return MetaTensors with the input's
            meta and transform history (``Invertd`` brings them back to the scan), :attr:`raw` and feature-grid
            heatmaps MetaTensors with their own world affine only. None for plain tensors (plain tensors out).
        layer: the explained layer and why it was explained (given, declared by the model, or chosen by
            ``target_layer="auto"``; :class:`medcam3d.autolayer.LayerChoice`). None on explanations built by hand.
        targets: the M targets described (:class:`medcam3d.targets.TargetInfo`: class, region, voxels, centroid),
            parallel to :attr:`scores`' second axis; for class targets one ``region="class"`` entry per output. None
            on explanations built by hand.
        target_valid: ``[B, M]`` bool, False where a sample has no such target (per-sample regions are padded; an
            invalid entry's score and maps are exactly 0). None on explanations built by hand.
        sample_targets: ``[B][M]`` per-sample descriptions (None where invalid); equal to :attr:`targets` in every
            sample unless regions differ per sample.
        notes: one-line remarks about the targets (skipped empty regions, dropped components).
    """

    scores: Tensor
    classes: list[int]
    raw: dict[str, Tensor]
    certificate: Certificate
    input_size: tuple[int, ...]
    labels: list[str] | None = None
    affine: Tensor | None = None
    activations: Tensor | None = None
    gradients: Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    geometry: MapGeometry | None = None
    placement: Placement | None = None
    layer: LayerChoice | None = None
    meta: Any = None
    targets: list[TargetInfo] | None = None
    target_valid: Tensor | None = None
    sample_targets: list[list[TargetInfo | None]] | None = None
    notes: list[str] = field(default_factory=list)

    # -- naming ---------------------------------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        """The methods with maps in :attr:`raw`."""
        return tuple(self.raw)

    @property
    def map_size(self) -> tuple[int, ...]:
        """Spatial size of the raw maps (feature resolution)."""
        return tuple(next(iter(self.raw.values())).shape[2:])

    def class_names(self) -> list[str]:
        """Names of the K explained classes (``class_<i>`` when labels are unknown)."""
        return [self.labels[c] if self.labels else f"class_{c}" for c in self.classes]

    def index(self, cls: int | str) -> int:
        """Position on the K axis of a class given by output index or label."""
        if isinstance(cls, str):
            if not self.labels or cls not in self.labels:
                raise KeyError(f"unknown class label {cls!r}")
            cls = self.labels.index(cls)
        if cls not in self.classes:
            raise KeyError(f"class {cls} was not explained (explained: {self.classes})")
        return self.classes.index(cls)

    # -- scores ---------------------------------------------------------------------------------------------
    def probabilities(self, kind: str = "sigmoid") -> Tensor:
        """``[B, M]`` probabilities from the raw scores: ``"sigmoid"`` (multi-label) or ``"softmax"``."""
        if kind == "sigmoid":
            return torch.sigmoid(self.scores)
        if kind == "softmax":
            return torch.softmax(self.scores, dim=1)
        raise ValueError(f"unknown probability kind {kind!r} (sigmoid or softmax)")

    def explained_scores(self) -> Tensor:
        """``[B, K]`` raw scores of the explained classes."""
        return self.scores[:, self.classes]

    # -- maps -----------------------------------------------------------------------------------------------
    def map_geometry(self, kind: str = "auto") -> MapGeometry:
        """Cell centres on the input grid: ``"auto"`` (:attr:`placement`: the receptive-field centres the model
        declares or its layers give, else the field), ``"field"`` (the field of view divided evenly, the paper's
        display convention) or ``"receptive"`` (:attr:`geometry`; :class:`InputError` when there is none)."""
        if kind == "auto":
            if self.placement is not None:
                return self.placement.geometry
            kind = "receptive" if self.geometry is not None else "field"
        if kind == "field":
            return MapGeometry.field(self.map_size, self.input_size)
        if kind == "receptive":
            if self.geometry is None:
                raise InputError(no_receptive_message(self.placement.reason if self.placement is not None else None))
            return self.geometry
        raise InputError(f"map geometry must be one of {', '.join(GEOMETRIES)}, got {kind!r}")

    def _raw(self, method: str, classes: Sequence[int | str] | None) -> Tensor:
        if method not in self.raw:
            raise KeyError(f"method {method!r} was not computed (computed: {', '.join(self.raw)})")
        r = self.raw[method]
        r = r.as_tensor() if hasattr(r, "as_tensor") else r  # MetaTensor -> plain (meta is re-attached on output)
        if classes is None:
            return r
        return r[:, [self.index(c) for c in classes]]

    def _display_geometry(self, kind: str, size: Sequence[int]) -> MapGeometry:
        """:meth:`map_geometry` on an output grid of ``size`` covering the input's field of view."""
        geo = self.map_geometry(kind)
        if tuple(size) != tuple(self.input_size):
            geo = geo.rescaled(self.input_size, size)
        return geo

    def heatmap(
        self,
        method: str,
        size: Sequence[int] | None = None,
        classes: Sequence[int | str] | None = None,
        dtype: torch.dtype | None = None,
        upsample: bool = True,
        geometry: str = "auto",
    ) -> Tensor:
        """Display heatmaps ``[B, K, *size]`` in [0, 1]: ReLU, min-max over the whole map, n-linear interpolation
        between the cell centres on a grid of ``size`` (default: the input's spatial size) covering the input's
        field of view; exactly 0 more than half a stride beyond the outermost centres (uncovered, see
        :meth:`covered_region`).

        Args:
            method: a computed method name.
            size: output spatial size; default :attr:`input_size`.
            classes: subset of explained classes (indices or labels); default all K.
            dtype: output dtype, e.g. ``torch.float16`` to halve memory.
            upsample: False keeps feature resolution.
            geometry: where the cells go (:meth:`map_geometry`): ``"auto"`` (default, :attr:`placement`),
                ``"field"`` (the paper's convention, ``align_corners=False`` upsampling) or ``"receptive"``.
        """
        target = (size or self.input_size) if upsample else None
        geo = self._display_geometry(geometry, target) if target is not None else None
        return self._with_meta(to_heatmap(self._raw(method, classes), target, dtype, geo), target, geometry)

    def _with_meta(self, maps: Tensor, size: Sequence[int] | None, geometry: str) -> Tensor:
        """MetaTensors out for a MetaTensor input (:attr:`meta`): the input's meta on the input grid, the
        placement's world affine on the feature grid (``size`` None); plain tensors otherwise."""
        if self.meta is None:
            return maps
        if size is None:
            return self.meta.feature_grid(maps, self.map_geometry(geometry).index_affine())
        return self.meta.input_grid(maps) if tuple(size) == tuple(self.input_size) else maps

    def iter_heatmaps(
        self,
        method: str,
        size: Sequence[int] | None = None,
        chunk: int = 1,
        dtype: torch.dtype | None = None,
        geometry: str = "auto",
    ) -> Iterator[tuple[list[int], Tensor]]:
        """Like :meth:`heatmap` but ``chunk`` classes at a time: yields ``(class_indices, [B, k, *size])`` so that
        K full-resolution volumes never sit in memory together."""
        target = size or self.input_size
        geo = self._display_geometry(geometry, target)
        for sl, hm in iter_heatmaps(self._raw(method, None), target, chunk, dtype, geo):
            yield self.classes[sl], self._with_meta(hm, target, geometry)

    def covered_region(self, size: Sequence[int] | None = None, geometry: str = "auto") -> Tensor:
        """``[*size]`` bool: where on a grid of ``size`` (default the input's) covering the input's field of view
        some cell sits, within half a stride of the outermost centres -- where :meth:`heatmap` draws the map rather
        than the 0 of "no cell here" (:func:`medcam3d.geometry.covered_region`). All True for the field."""
        target = tuple(size or self.input_size)
        return covered_region(self._display_geometry(geometry, target), self.map_size, target)

    def disagreement(self, a: str = "hirescam", b: str = "gradcam", fraction: float = 0.1) -> dict[str, Tensor]:
        """Disagreement between two methods' maps at feature resolution, each ``[B, K]``: ``l2`` (the paper's
        Table 1 distance between normalised maps), ``pearson`` and ``top_overlap`` (top-10 % positions)."""
        return disagreement(self._raw(a, None), self._raw(b, None), fraction)

    # -- housekeeping ----------------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> Explanation:
        """A copy with every tensor moved to ``device``."""

        def mv(t: Any) -> Any:
            return t.to(device) if isinstance(t, Tensor) else t

        return replace(
            self,
            scores=mv(self.scores),
            raw={k: mv(v) for k, v in self.raw.items()},
            activations=mv(self.activations),
            gradients=mv(self.gradients),
            target_valid=mv(self.target_valid),
        )

    def cpu(self) -> Explanation:
        return self.to("cpu")

    def __repr__(self) -> str:
        return (
            f"Explanation(batch={self.scores.shape[0]}, classes={len(self.classes)}, methods={list(self.raw)}, "
            f"map_size={self.map_size}, input_size={self.input_size}, certificate={self.certificate.kind!r})"
        )
