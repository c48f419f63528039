"""Synthetic chest-CT phantoms with known abnormalities, organ masks and an optional Clever-Hans marker.

A phantom is a supine chest CT in Hounsfield units on a grid ``[S, H, W]`` in MONAI axcodes ``"SPL"``: slices run
inferior→superior, rows anterior→posterior, columns from the patient's right to their left, so ``hu[k]`` shown
with ``imshow`` is an axial slice in radiological convention. The affine maps array indices to RAS mm.

Anatomy: air −1000, body outline with subcutaneous fat (≈ −100) over muscle (≈ 45), two lungs (≈ −850, denser
towards the back, with vessels and bronchi) above diaphragm domes, liver below the right dome, heart (≈ 40)
anterior and left of the midline in a thin layer of pericardial fat, mediastinal fat with the aorta, oesophagus
and trachea, spine (vertebral bodies ≈ 600-1000 with discs, canal and posterior elements), ribs (≈ 700) and
sternum, and usually a table under the patient. Body and organ sizes, positions, densities, a small shift and
rotation, and the noise level (Gaussian, 10-20 HU, added after a mild blur) vary between patients.

Labels (:data:`LABELS`; code = index): focal (1-3 nodules of 15-30 mm, a lobulated mass of 35-60 mm, per lung), regional
(consolidation with air bronchograms, plate atelectasis, per lung), dependent fluid (posterior pleural effusion
at 8-22 HU, per side), organ-level (cardiomegaly: heart 1.28-1.42 times larger; pericardial effusion: a 9-15 mm
fluid rim) and diffuse (emphysema: upper lungs at ≈ −950 with bullae). Each is present independently with its
prevalence; every present label has a non-empty boolean mask.

Determinism: :func:`draw_spec` makes every random draw first (one independent stream per part of the patient
and per label, drawn whether the label is shown or not); :func:`render` only paints. So the same seed gives the
same patient whatever the prevalence, ``present`` or ``clever_hans``, and ``exclude`` renders the same patient and
noise without some lesions or the marker, the lesion's place filled with what lies under it: voxels change only
within the excluded mask dilated by the blur's reach (:data:`BLUR_REACH` voxels), except that removing
cardiomegaly or a pericardial effusion reshapes the heart, its fat and the lung edge: within 15 mm of the heart.

Geometry: the anatomy is designed in a 300 × 320 × 320 mm field of view and fitted to any grid; the default
spacing is that field of view divided by ``shape`` ((5.0, 2.5, 2.5) mm for (60, 128, 128)).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import isfinite

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ._anatomy import LEFT, RIGHT, Anatomy, build_scene, draw_anatomy
from ._grid import REF_FOV_MM, Grid
from ._lesions import (
    LABELS,
    PAINT_ORDER,
    HeartChange,
    Lesion,
    Marker,
    draw_lesions,
    draw_marker,
)

__all__ = [
    "BLUR_REACH",
    "DEFAULT_SHAPE",
    "LABELS",
    "MARKER_BIT",
    "ORGANS",
    "ORGAN_CODES",
    "CleverHans",
    "Phantom",
    "PhantomSpec",
    "draw_labels",
    "draw_spec",
    "make_phantom",
    "render",
]

ORGANS: tuple[str, ...] = ("body", "right_lung", "left_lung", "heart", "spine", "ribs")
"""Organ masks of every phantom. ``right_lung``/``left_lung`` are the whole hemithorax (aerated lung and any lesion
or pleural fluid in it); ``heart`` is the heart muscle plus any pericardial effusion; ``spine`` is the vertebral
column (bodies, discs, posterior elements; not the canal); ``ribs`` are the ribs and the sternum; ``body`` is
everything inside the skin. Apart from ``body``, which contains them, the masks do not overlap."""

ORGAN_CODES: dict[str, int] = {name: code for code, name in enumerate(ORGANS, start=1)}
"""Values of the organ label map: 0 outside the body, 1 elsewhere in the body, then one code per organ."""

MARKER_BIT: int = len(LABELS)
"""Bit of the marker in :meth:`Phantom.lesion_bitmask` (label ``k`` is bit ``k``)."""

DEFAULT_SHAPE: tuple[int, int, int] = (60, 128, 128)

_BLUR_SIGMA = (0.45, 0.6, 0.6)
_BLUR_TRUNCATE = 3.0
BLUR_REACH: tuple[int, int, int] = tuple(int(_BLUR_TRUNCATE * s + 0.5) for s in _BLUR_SIGMA)  # type: ignore[assignment]
"""How far (slices, rows, columns) the blur spreads a voxel: (1, 2, 2)."""
_HU_RANGE = (-1024.0, 3071.0)


@dataclass(frozen=True)
class CleverHans:
    """A spurious marker that appears with probability ``p_with`` on scans showing ``label`` and ``p_without``
    on the others (a shortcut a model can learn instead of the lesion)."""

    label: str
    p_with: float = 0.9
    p_without: float = 0.05

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise InputError(f"clever_hans: unknown label {self.label!r}; expected one of {', '.join(LABELS)}")
        for name in ("p_with", "p_without"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise InputError(f"clever_hans: {name} = {p} is not a probability in [0, 1]")


@dataclass(frozen=True, eq=False)
class PhantomSpec:
    """Every random draw of one phantom (the output of :func:`draw_spec`, the input of :func:`render`).

    ``lesions`` holds a lesion for every label, shown only where ``labels`` (``bool [len(LABELS)]``) is set."""

    seed: int | tuple[int, ...]
    anatomy: Anatomy
    lesions: Mapping[str, Lesion]
    labels: np.ndarray
    marker: Marker
    marker_present: bool
    texture_seed: int
    noise_seed: int


@dataclass(eq=False)
class Phantom:
    """A rendered phantom.

    Attributes
    ----------
    hu : ndarray, float32 [S, H, W]
        Hounsfield units; axes inferior→superior, anterior→posterior, patient right→left (axcodes ``"SPL"``).
    affine : ndarray, float64 [4, 4]
        Maps array indices (k, j, i, 1) to RAS mm.
    spacing : tuple of 3 float
        (slice, row, column) spacing in mm.
    labels : ndarray, uint8 [len(LABELS)]
        1 where the abnormality ``LABELS[k]`` is shown.
    lesion_masks : dict of str to ndarray, bool [S, H, W]
        One non-empty mask per shown label.
    organ_masks : dict of str to ndarray, bool [S, H, W]
        One mask per name in :data:`ORGANS`.
    marker_mask : ndarray, bool [S, H, W], or None
        The Clever-Hans marker, None without one.
    seed : int or tuple of int
        The seed the phantom was drawn from.
    """

    hu: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    labels: np.ndarray
    lesion_masks: dict[str, np.ndarray]
    organ_masks: dict[str, np.ndarray]
    marker_mask: np.ndarray | None
    seed: int | tuple[int, ...]

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of the shown labels, in :data:`LABELS` order."""
        return tuple(name for name, flag in zip(LABELS, self.labels) if flag)

    @property
    def label_vector(self) -> np.ndarray:
        """``float32 [len(LABELS)]`` targets for a multi-label loss."""
        return self.labels.astype(np.float32)

    def organ_labelmap(self) -> np.ndarray:
        """``uint8 [S, H, W]`` with :data:`ORGAN_CODES` (0 outside the body)."""
        out = np.zeros(self.hu.shape, np.uint8)
        for name in ORGANS:
            out[self.organ_masks[name]] = ORGAN_CODES[name]
        return out

    def lesion_bitmask(self) -> np.ndarray:
        """``uint16 [S, H, W]``: bit ``k`` inside the mask of ``LABELS[k]``, bit :data:`MARKER_BIT` on the marker."""
        out = np.zeros(self.hu.shape, np.uint16)
        for name, mask in self.lesion_masks.items():
            out[mask] |= np.uint16(1 << LABELS.index(name))
        if self.marker_mask is not None:
            out[self.marker_mask] |= np.uint16(1 << MARKER_BIT)
        return out


def _seed_sequence(seed: int | Sequence[int]) -> np.random.SeedSequence:
    values = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in values):
        raise InputError(f"seed: {seed!r} is not a non-negative integer or a sequence of them")
    return np.random.SeedSequence([int(v) for v in values])


def _prevalences(prevalence: float | Mapping[str, float]) -> np.ndarray:
    if isinstance(prevalence, Mapping):
        _check_names("prevalence", prevalence, LABELS)
        values = np.array([prevalence.get(name, 0.3) for name in LABELS], float)
    else:
        values = np.full(len(LABELS), prevalence, float)
    if not np.all((values >= 0) & (values <= 1)):
        raise InputError(f"prevalence: {prevalence!r} is not a probability in [0, 1] for every label")
    return values


def _check_names(argument: str, names: Iterable[str], allowed: Sequence[str]) -> None:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise InputError(f"{argument}: unknown name(s) {', '.join(map(repr, unknown))}; expected {', '.join(allowed)}")


def _clever_hans(value: CleverHans | Mapping[str, object] | None) -> CleverHans | None:
    if value is None or isinstance(value, CleverHans):
        return value
    _check_names("clever_hans", value, ("label", "p_with", "p_without"))
    return CleverHans(**value)  # type: ignore[arg-type]


def _streams(seed: int | Sequence[int]) -> list[np.random.SeedSequence]:
    """Independent seed sequences for the anatomy, the lesions, the labels, the marker and the rendering."""
    return _seed_sequence(seed).spawn(5)


def draw_labels(
    seed: int | Sequence[int],
    prevalence: float | Mapping[str, float] = 0.3,
    present: Mapping[str, bool] | None = None,
    clever_hans: CleverHans | Mapping[str, object] | None = None,
) -> tuple[np.ndarray, bool]:
    """The labels and marker presence that :func:`draw_spec` draws for ``seed``, without the anatomy.

    Fast (no geometry): for label statistics, stratification or a dataset's label table. Each label gets one
    uniform number, shown when it is below the label's prevalence unless ``present`` forces it; the marker gets
    one more, compared with ``p_with`` or ``p_without`` of ``clever_hans`` given the final presence of its label.

    Parameters
    ----------
    seed, prevalence, present, clever_hans
        As for :func:`draw_spec`.

    Returns
    -------
    labels : ndarray, bool [len(LABELS)]
    marker : bool
        Always False without ``clever_hans``.
    """
    streams = _streams(seed)
    labels = np.random.default_rng(streams[2]).random(len(LABELS)) < _prevalences(prevalence)
    if present is not None:
        _check_names("present", present, LABELS)
        for name, flag in present.items():
            labels[LABELS.index(name)] = bool(flag)
    hans = _clever_hans(clever_hans)
    if hans is None:
        return labels, False
    p = hans.p_with if labels[LABELS.index(hans.label)] else hans.p_without
    return labels, bool(np.random.default_rng(streams[3]).random() < p)


def draw_spec(
    seed: int | Sequence[int],
    prevalence: float | Mapping[str, float] = 0.3,
    present: Mapping[str, bool] | None = None,
    clever_hans: CleverHans | Mapping[str, object] | None = None,
) -> PhantomSpec:
    """Make every random draw of one phantom (a few ms, no arrays), for :func:`render`.

    The anatomy, every lesion's geometry (drawn for every label, shown or not), the marker's position, the
    texture and the noise depend on ``seed`` only, never on the other arguments (see :func:`draw_labels`).

    Parameters
    ----------
    seed : int or sequence of int
        Non-negative; e.g. ``(dataset_seed, index)``.
    prevalence : float or mapping of str to float, default 0.3
        Probability that each label is shown: one for all, or per label (missing labels: 0.3).
    present : mapping of str to bool, optional
        Labels forced on or off, e.g. ``{"cardiomegaly": True, "emphysema": False}``.
    clever_hans : CleverHans or mapping, optional
        Draw the spurious marker with these probabilities given its label's presence (a dict of
        :class:`CleverHans` fields is accepted). Without it there is no marker.

    Returns
    -------
    PhantomSpec

    Raises
    ------
    InputError
        For a negative seed, an unknown label or a probability outside [0, 1].
    """
    labels, marker_present = draw_labels(seed, prevalence, present, clever_hans)
    anatomy_seed, lesion_seed, _, marker_seed, render_seed = _streams(seed)
    anatomy = draw_anatomy(np.random.default_rng(anatomy_seed))
    marker_rng = np.random.default_rng(marker_seed)
    marker_rng.random()  # the marker's presence draw (see draw_labels)
    texture_seed, noise_seed = (int(v) for v in np.random.default_rng(render_seed).integers(0, 2**63 - 1, size=2))
    return PhantomSpec(
        seed=seed if isinstance(seed, (int, np.integer)) else tuple(int(v) for v in seed),
        anatomy=anatomy,
        lesions=draw_lesions(lesion_seed, anatomy),
        labels=labels,
        marker=draw_marker(marker_rng, anatomy),
        marker_present=marker_present,
        texture_seed=texture_seed,
        noise_seed=noise_seed,
    )


def _grid(shape: Sequence[int], spacing: Sequence[float] | None) -> Grid:
    if len(shape) != 3 or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 8 for n in shape):
        raise InputError(f"shape: {tuple(shape)!r} is not three integers ≥ 8 (slices, rows, columns)")
    shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
    if spacing is None:
        return Grid(shape3, tuple(f / n for f, n in zip(REF_FOV_MM, shape3)))  # type: ignore[arg-type]
    if len(spacing) != 3 or not all(isinstance(d, (int, float)) and isfinite(d) and d > 0 for d in spacing):
        raise InputError(f"spacing: {tuple(spacing)!r} is not three positive numbers of mm (slice, row, column)")
    return Grid(shape3, (float(spacing[0]), float(spacing[1]), float(spacing[2])))


def _trim(painted: list[tuple[str, np.ndarray]], shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Masks minus what later lesions painted over; empty ones dropped."""
    covered = np.zeros(shape, bool)
    out = {}
    for name, mask in reversed(painted):
        visible = mask & ~covered
        covered |= mask
        if visible.any():
            out[name] = visible
    return out


def render(
    spec: PhantomSpec,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] | None = None,
    exclude: Sequence[str] = (),
) -> Phantom:
    """Paint the phantom ``spec`` on a grid (deterministic; about 0.2 s at the default shape).

    Parameters
    ----------
    spec : PhantomSpec
        From :func:`draw_spec`.
    shape : sequence of 3 int, default (60, 128, 128)
        (S, H, W), each at least 8.
    spacing : sequence of 3 float, optional
        (slice, row, column) mm for the affine; default: the 300 × 320 × 320 mm field of view divided by
        ``shape``. The anatomy always fills the field of view (see the module's notes on geometry).
    exclude : sequence of str, default ()
        Labels and/or ``"marker"`` to leave out of the same patient (their place shows what lies under them).

    Returns
    -------
    Phantom
        ``hu`` is ``float32 [S, H, W]``; ``labels`` are the labels shown (drawn, not excluded, non-empty mask).
    """
    grid = _grid(shape, spacing)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    _check_names("exclude", exclude, (*LABELS, "marker"))
    shown = [name for name in PAINT_ORDER if spec.labels[LABELS.index(name)] and name not in exclude]
    heart = spec.anatomy.heart
    for name in shown:
        lesion = spec.lesions[name]
        if isinstance(lesion, HeartChange):
            heart = lesion.apply(heart)
    scene = build_scene(grid, spec.anatomy, heart, spec.texture_seed)
    lesion_masks = _trim([(name, spec.lesions[name].paint(scene)) for name in shown], grid.shape)
    marker = spec.marker.paint(scene) if spec.marker_present and "marker" not in exclude else None
    hu = ndimage.gaussian_filter(scene.hu, _BLUR_SIGMA, truncate=_BLUR_TRUNCATE)
    hu += spec.anatomy.noise_sd * np.random.default_rng(spec.noise_seed).standard_normal(grid.shape, np.float32)
    np.clip(hu, *_HU_RANGE, out=hu)
    organs = {
        "body": scene.masks["body"],
        "right_lung": scene.cavity[RIGHT],
        "left_lung": scene.cavity[LEFT],
        **{name: scene.masks[name] for name in ("heart", "spine", "ribs")},
    }
    return Phantom(
        hu=hu,
        affine=grid.affine,
        spacing=grid.spacing,
        labels=np.array([name in lesion_masks for name in LABELS], np.uint8),
        lesion_masks={name: lesion_masks[name] for name in LABELS if name in lesion_masks},
        organ_masks=organs,
        marker_mask=marker,
        seed=spec.seed,
    )


def make_phantom(
    seed: int | Sequence[int],
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] | None = None,
    prevalence: float | Mapping[str, float] = 0.3,
    present: Mapping[str, bool] | None = None,
    exclude: Sequence[str] = (),
    clever_hans: CleverHans | Mapping[str, object] | None = None,
) -> Phantom:
    """One synthetic chest CT: ``render(draw_spec(seed, prevalence, present, clever_hans), shape, spacing, exclude)``.

    Parameters
    ----------
    seed, prevalence, present, clever_hans
        See :func:`draw_spec`.
    shape, spacing, exclude
        See :func:`render`.

    Returns
    -------
    Phantom
        ``hu`` is ``float32 [S, H, W]`` in axcodes ``"SPL"``; masks are ``bool [S, H, W]``.

    Examples
    --------
    >>> p = make_phantom(0, present={"nodule_right_lung": True}, clever_hans={"label": "nodule_right_lung"})
    >>> q = make_phantom(0, present={"nodule_right_lung": True}, clever_hans={"label": "nodule_right_lung"},
    ...                  exclude=("nodule_right_lung",))  # the same patient and noise without the nodule
    """
    return render(draw_spec(seed, prevalence, present, clever_hans), shape, spacing, exclude)
