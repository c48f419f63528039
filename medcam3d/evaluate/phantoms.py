"""Ground truth by construction: phantoms on a model's network grid, with their masks, and the same patient
without a lesion or the marker.

A :class:`PhantomSource` draws case ``i`` from seed ``(seed, i)`` (as :class:`medcam3d.data.PhantomDataset` does,
so evaluation seeds never coincide with the integer seeds the demo models were trained on) and brings it onto the
network grid with a :class:`GridMapper`:

* :class:`ConfigGrid` -- a config's own MONAI preprocessing (``Preprocessor.from_config(cfg)``) for the scan and
  ``preprocess_labels(..., like=grid)`` (nearest neighbour) for the lesion bitmask and organ label map, exactly as
  ``medcam3d explain`` sees a scan;
* :class:`DirectGrid` -- phantoms rendered directly at the network grid's shape (axcodes SPL, as the network grid),
  with an HU -> input intensity mapping only (for small models trained on small phantoms).

:meth:`PhantomSource.without` renders the same patient and noise without some lesions or the marker (their place is
filled with the tissue under them; see :func:`medcam3d.data.render`): the model's actual use of a lesion is the score
change ``s(scan) − s(scan without it)``, one forward pass per (scan, removed object).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..data import (
    DEFAULT_SHAPE,
    LABELS,
    MARKER_BIT,
    ORGAN_CODES,
    Phantom,
    PhantomDataset,
    PhantomSpec,
    render,
)
from ..io import Volume
from ..preprocess import Preprocessor
from .perturbation import demo_hu_to_input

__all__ = ["Case", "ConfigGrid", "DirectGrid", "GridMapper", "PhantomSource", "config_hu_to_input"]


@dataclass
class Case:
    """One phantom on the network grid.

    Attributes:
        name: ``phantom_<seed>_<i>``.
        index: position in the source.
        x: ``[1, C, *S]`` float32 network input.
        labels: names of the labels shown (phantom label names, :data:`medcam3d.data.LABELS`).
        lesions: label -> ``bool [*S]`` lesion mask on the network grid.
        marker: ``bool [*S]`` Clever-Hans marker mask, or None.
        organs: organ name -> ``bool [*S]`` (:data:`medcam3d.data.ORGANS`).
        spec: the phantom's random draws (to render it again without something).
    """

    name: str
    index: int
    x: Tensor
    labels: tuple[str, ...]
    lesions: dict[str, Tensor]
    marker: Tensor | None
    organs: dict[str, Tensor]
    spec: PhantomSpec = field(repr=False)


class GridMapper(Protocol):
    """Brings a phantom onto the network grid."""

    shape: tuple[int, int, int]
    """The shape phantoms are rendered at."""

    def input(self, phantom: Phantom) -> Tensor:
        """``[1, C, *S]`` network input."""
        ...

    def masks(self, phantom: Phantom) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        """(lesion masks, marker mask, organ masks) on the network grid, ``bool [*S]``."""
        ...


def _shape3(shape: Sequence[int]) -> tuple[int, int, int]:
    """A 3-D grid shape as ints (ValueError otherwise)."""
    s = tuple(int(n) for n in shape)
    if len(s) != 3:
        raise ValueError(f"phantom grids are 3-D; got shape {s}")
    return s[0], s[1], s[2]


def _split_bitmask(bits: np.ndarray, organs: np.ndarray, names: Sequence[str]) -> tuple[
        dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
    b = bits.astype(np.int64)
    lesions = {}
    for name in names:
        m = (b >> LABELS.index(name)) & 1
        if m.any():
            lesions[name] = torch.from_numpy(m.astype(bool))
    mk = (b >> MARKER_BIT) & 1
    marker = torch.from_numpy(mk.astype(bool)) if mk.any() else None
    org = organs.astype(np.int64)
    organ_masks = {name: torch.from_numpy(org == code) for name, code in ORGAN_CODES.items() if name != "body"}
    organ_masks["body"] = torch.from_numpy(org > 0)  # the body contains the organs
    return lesions, marker, organ_masks


def config_hu_to_input(preprocessor: Any) -> Callable[[float], float]:
    """HU -> network-grid units by running a config's intensity transforms (``monai.transforms.intensity``) on a
    number; geometric transforms are skipped."""
    ts = [t for t in preprocessor.transforms if type(t).__module__.startswith("monai.transforms.intensity")]

    def fn(hu: float) -> float:
        v: Any = torch.full((1, 1, 1, 1), float(hu), dtype=torch.float32)
        for t in ts:
            v = t(v)
        return float(torch.as_tensor(v).reshape(-1)[0])

    return fn


class ConfigGrid:
    """A config's preprocessing: phantoms rendered at ``shape`` (default 60 x 128 x 128, 5 x 2.5 x 2.5 mm) and
    preprocessed like any scan."""

    def __init__(self, config: Any, shape: Sequence[int] = DEFAULT_SHAPE) -> None:
        self.config = config
        self.preprocessor = Preprocessor.from_config(config)
        self.shape = _shape3(shape)
        self.hu_to_input = config_hu_to_input(self.preprocessor)
        self._grid: Any = None

    def input(self, phantom: Phantom) -> Tensor:
        self._grid = self.preprocessor(Volume(phantom.hu, phantom.affine, f"phantom {phantom.seed}"))
        return self._grid.as_tensor()[None].float()

    def masks(self, phantom: Phantom) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        grid = self._grid
        if grid is None:
            self.input(phantom)
            grid = self._grid
        bits = self.preprocessor.preprocess_labels(
            Volume(phantom.lesion_bitmask().astype(np.float32), phantom.affine, "lesion bitmask"), like=grid)
        organs = self.preprocessor.preprocess_labels(
            Volume(phantom.organ_labelmap().astype(np.float32), phantom.affine, "organ labels"), like=grid)
        return _split_bitmask(bits[0].numpy().round(), organs[0].numpy().round(), phantom.label_names)


class DirectGrid:
    """Phantoms rendered directly on the network grid (``shape`` = the model's input size), intensities mapped with
    ``hu_to_input`` (default: the demo preprocessing's)."""

    def __init__(self, shape: Sequence[int], hu_to_input: Callable[[Any], Any] = demo_hu_to_input) -> None:
        self.shape = _shape3(shape)
        self.hu_to_input = hu_to_input

    def input(self, phantom: Phantom) -> Tensor:
        return self.hu_to_input(torch.from_numpy(phantom.hu).float())[None, None]

    def masks(self, phantom: Phantom) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        return _split_bitmask(phantom.lesion_bitmask(), phantom.organ_labelmap(), phantom.label_names)


class PhantomSource:
    """``n`` phantoms on a network grid; case ``i`` is drawn from seed ``(seed, i)``.

    Args:
        grid: a :class:`GridMapper` (:class:`ConfigGrid` or :class:`DirectGrid`).
        n: number of cases.
        seed: dataset seed.
        prevalence, present, clever_hans: as for :func:`medcam3d.data.make_phantom`.
    """

    def __init__(
        self,
        grid: GridMapper,
        n: int,
        seed: int,
        prevalence: float | Mapping[str, float] = 0.3,
        present: Mapping[str, bool] | None = None,
        clever_hans: Any = None,
    ) -> None:
        draw: dict[str, Any] = {"prevalence": prevalence}
        if present:
            draw["present"] = dict(present)
        if clever_hans is not None:
            draw["clever_hans"] = clever_hans
        self.grid = grid
        self.dataset = PhantomDataset(n, seed, draw=draw, grid={"shape": grid.shape})
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def case(self, i: int) -> Case:
        """Render case ``i`` and bring it onto the network grid (with its masks)."""
        spec = self.dataset.spec(i)
        ph = render(spec, self.grid.shape)
        x = self.grid.input(ph)
        lesions, marker, organs = self.grid.masks(ph)
        return Case(self.dataset.scan_id(i), i, x, ph.label_names, lesions, marker, organs, spec)

    def __iter__(self) -> Iterator[Case]:
        return (self.case(i) for i in range(len(self)))

    def without(self, case: Case, exclude: Sequence[str]) -> Tensor:
        """The network input of the same patient without ``exclude`` (labels and/or ``"marker"``): ``[1, C, *S]``."""
        ph = render(case.spec, self.grid.shape, exclude=tuple(exclude))
        return self.grid.input(ph)
