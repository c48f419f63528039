"""Abnormalities of the phantoms and the spurious marker: random draws and painting (internal).

Every lesion is a frozen dataclass drawn from its own random stream, whether the scan will show it or not, so
that turning a label on or off never changes anything else. Lung lesions are placed in patient-frame reference
mm (see :mod:`._anatomy`) inside their hemithorax, away from the largest heart the patient can have. Painting
overwrites the scene's HU inside the lesion and returns where it painted (``bool [S, H, W]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ._anatomy import LEFT, RIGHT, Anatomy, Heart, Scene, lung_cavity
from ._grid import REF_FOV_MM

__all__ = [
    "LABELS",
    "PAINT_ORDER",
    "HeartChange",
    "Lesion",
    "Marker",
    "draw_lesions",
    "draw_marker",
]

LABELS: tuple[str, ...] = (
    "nodule_right_lung",
    "nodule_left_lung",
    "mass_right_lung",
    "mass_left_lung",
    "consolidation_right_lung",
    "consolidation_left_lung",
    "atelectasis_right_lung",
    "atelectasis_left_lung",
    "pleural_effusion_right",
    "pleural_effusion_left",
    "cardiomegaly",
    "pericardial_effusion",
    "emphysema",
)
"""Abnormality labels; a label's code is its index (the order of :attr:`Phantom.labels`)."""

PAINT_ORDER: tuple[str, ...] = (
    "cardiomegaly",
    "pericardial_effusion",
    "emphysema",
    "consolidation_right_lung",
    "consolidation_left_lung",
    "atelectasis_right_lung",
    "atelectasis_left_lung",
    "mass_right_lung",
    "mass_left_lung",
    "nodule_right_lung",
    "nodule_left_lung",
    "pleural_effusion_right",
    "pleural_effusion_left",
)
"""Order in which lesions are painted: later ones cover earlier ones (fluid layers over everything)."""

Point = tuple[float, float, float]
Range = tuple[float, float]


class Lesion(Protocol):
    """Anything that paints itself into a scene."""

    def paint(self, scene: Scene) -> np.ndarray:
        """Paint into ``scene.hu``; return where, ``bool [S, H, W]``."""
        ...


def _ellipsoid(scene: Scene, centre: Point, radii: Point, reach: float = 1.0) -> tuple[slice, np.ndarray]:
    """The slices within ``reach`` z-radii of an axis-aligned ellipsoid, and its level there (< 1 inside),
    ``float32 [k, H, W]``."""
    sl = scene.slab(centre[0] - reach * radii[0], centre[0] + reach * radii[0])
    level = ((scene.z[sl] - centre[0]) / radii[0]) ** 2 + (
        ((scene.y - centre[1]) / radii[1]) ** 2 + ((scene.x - centre[2]) / radii[2]) ** 2
    )
    return sl, level


@dataclass(frozen=True)
class Blob:
    """Nodules or a mass: a union of ellipsoids of soft-tissue density, clipped to the hemithorax on ``side``."""

    side: int
    centres: tuple[Point, ...]
    radii: tuple[Point, ...]
    hu: float

    def paint(self, scene: Scene) -> np.ndarray:
        mask = np.zeros(scene.hu.shape, bool)
        for centre, radii in zip(self.centres, self.radii):
            sl, level = _ellipsoid(scene, centre, radii)
            mask[sl] |= level < 1
        mask &= scene.cavity[self.side]
        scene.hu[mask] = self.hu + 6.0 * scene.fa[mask]
        return mask


@dataclass(frozen=True)
class Consolidation:
    """Patchy airspace opacity with an irregular edge and air bronchograms in one hemithorax."""

    side: int
    centre: Point
    radii: Point
    hu: float

    def paint(self, scene: Scene) -> np.ndarray:
        sl, level = _ellipsoid(scene, self.centre, self.radii, reach=1.4)
        level = level + 0.35 * scene.fb[sl]  # irregular edge, up to ~1.4 radii out
        mask = np.zeros(scene.hu.shape, bool)
        mask[sl] = (level < 1) & scene.cavity[self.side][sl]
        scene.hu[mask] = self.hu + 30.0 * scene.fa[mask]
        bronchi = mask.copy()
        bronchi[sl] &= level < 0.7
        scene.hu[bronchi & (scene.vessel_ratio < 0.5)] = -900.0
        return mask


@dataclass(frozen=True)
class Atelectasis:
    """Plate-like (discoid) collapse: a dense band ``thickness`` mm thick across part of one hemithorax."""

    side: int
    centre: Point
    normal: Point
    thickness: float
    radii: Point
    hu: float

    def paint(self, scene: Scene) -> np.ndarray:
        sl, level = _ellipsoid(scene, self.centre, self.radii)
        (cz, cy, cx), (nz, ny, nx) = self.centre, self.normal
        distance = nz * (scene.z[sl] - cz) + (ny * (scene.y - cy) + nx * (scene.x - cx))
        mask = np.zeros(scene.hu.shape, bool)
        mask[sl] = (np.abs(distance) < self.thickness / 2) & (level < 1) & scene.cavity[self.side][sl]
        scene.hu[mask] = self.hu + 5.0 * scene.fa[mask]
        return mask


@dataclass(frozen=True)
class PleuralEffusion:
    """Dependent pleural fluid: a posterior crescent, ``depth`` (fraction of the lung radius) deep at the base,
    thinning to nothing ``height`` mm above the costophrenic level."""

    side: int
    depth: float
    height: float
    hu: float

    def paint(self, scene: Scene) -> np.ndarray:
        lung = scene.anat.lung(self.side)
        around = np.clip((np.sin(lung.theta(scene.y, scene.x)) + 0.35) / 1.35, 0, 1) ** 0.7
        up = np.sqrt(np.clip(1 - (scene.z - lung.z_base) / self.height, 0, 1))
        depth = self.depth * around * up
        mask = scene.cavity[self.side] & (depth > 0) & (scene.rho2[self.side] > (1 - depth) ** 2)
        scene.hu[mask] = self.hu + 4.0 * scene.fa[mask]
        return mask


@dataclass(frozen=True)
class Emphysema:
    """Low-attenuation lung (``hu`` ≈ −950, pruned vessels) above fraction ``level`` of the lung height, with
    ``bullae`` (side, centre, radius) of air."""

    level: float
    hu: float
    bullae: tuple[tuple[int, Point, float], ...]

    def paint(self, scene: Scene) -> np.ndarray:
        threshold = scene.anat.lungs[0].height(self.level)
        lungs = scene.cavity[RIGHT] | scene.cavity[LEFT]
        mask = lungs & (scene.z + 25.0 * scene.fb > threshold)
        scene.hu[mask] = self.hu + 8.0 * scene.fa[mask]
        scene.hu[mask & (scene.vessel_ratio < 0.45)] = scene.anat.hu.blood
        for side, centre, r in self.bullae:
            sl, level = _ellipsoid(scene, centre, (r, r, r))
            bulla = (level < 1) & scene.cavity[side][sl]
            scene.hu[sl][bulla] = -990.0
            mask[sl] |= bulla
        return mask


@runtime_checkable
class HeartChange(Protocol):
    """An organ-level lesion: it changes the heart before the scene is rendered."""

    def apply(self, heart: Heart) -> Heart:
        """The heart with this abnormality."""
        ...

    def paint(self, scene: Scene) -> np.ndarray:
        """Where the scene shows the abnormality, ``bool [S, H, W]`` (nothing is painted here)."""
        ...


@dataclass(frozen=True)
class Cardiomegaly:
    """Heart enlarged ``scale`` times (shifted by ``shift``, mostly to the left); the mask is the whole heart muscle."""

    scale: float
    shift: Point

    def apply(self, heart: Heart) -> Heart:
        return heart.enlarged(self.scale, self.shift)

    def paint(self, scene: Scene) -> np.ndarray:
        return scene.masks["heart_core"].copy()


@dataclass(frozen=True)
class PericardialEffusion:
    """A rim of fluid ``thickness`` mm thick at ``hu`` HU around the heart, between two thin layers of fat."""

    thickness: float
    hu: float

    def apply(self, heart: Heart) -> Heart:
        return replace(heart, fluid=self.thickness, fluid_hu=self.hu)

    def paint(self, scene: Scene) -> np.ndarray:
        return scene.masks["pericardial_fluid"].copy()


@dataclass(frozen=True)
class Marker:
    """A metal token (cube of half-side ``half`` mm at ``hu`` HU) in the air outside the body, image frame.

    On coarse grids each half-side grows to at least 0.55 voxel, so that the token always covers a voxel."""

    centre: Point
    half: float
    hu: float

    def paint(self, scene: Scene) -> np.ndarray:
        voxel = [extent / n for extent, n in zip(REF_FOV_MM, scene.grid.shape)]
        z, y, x = (np.abs(scene.grid.axis(k) - c) < max(self.half, 0.55 * voxel[k]) for k, c in enumerate(self.centre))
        mask = z[:, None, None] & y[None, :, None] & x[None, None, :]
        scene.hu[mask] = self.hu
        return mask


def _lung_point(rng: np.random.Generator, anat: Anatomy, side: int, t: Range, rho: Range) -> np.ndarray:
    """A random point (z, y, x) at height fraction in ``t`` and normalised radius in ``rho`` of one lung."""
    lung = anat.lung(side)
    z = lung.height(rng.uniform(*t))
    r = np.sqrt(rng.uniform(rho[0] ** 2, rho[1] ** 2)) * lung.scale(np.float32(z))
    angle = rng.uniform(-np.pi, np.pi)
    return np.array([z, lung.cy + r * lung.by * np.sin(angle), lung.cx + side * r * lung.ax * np.cos(angle)])


def _place(
    rng: np.random.Generator,
    anat: Anatomy,
    heart: Heart,
    side: int,
    t: Range,
    rho: Range,
    clearance: float,
    avoid: Sequence[tuple[Point, float | np.floating[Any]]] = (),
) -> Point | None:
    """A lung point with ``clearance`` mm of lung around it along every axis, and farther than ``d`` mm from
    every ``(point, d)`` in ``avoid``; rejection sampling (deterministic for a given ``rng``), None if no room."""
    steps = clearance * np.concatenate([np.zeros((1, 3)), np.eye(3), -np.eye(3)])
    for _ in range(500):
        p = _lung_point(rng, anat, side, t, rho)
        probes = p + steps
        inside = lung_cavity(anat, heart, side, probes[:, 0], probes[:, 1], probes[:, 2]).all()
        if inside and all(np.linalg.norm(p - np.asarray(c)) > d for c, d in avoid):
            return (float(p[0]), float(p[1]), float(p[2]))
    return None


def _require(point: Point | None, what: str, side: int) -> Point:
    """``point``, or an error if :func:`_place` found no room (never seen in 5 000 draws)."""
    if point is None:
        raise RuntimeError(f"no room for a {what} in the {'right' if side == RIGHT else 'left'} lung")
    return point


def _unit(rng: np.random.Generator) -> np.ndarray:
    """A random unit vector (uniform on the sphere)."""
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _draw_mass(rng: np.random.Generator, anat: Anatomy, heart: Heart, side: int) -> Blob:
    """A lobulated mass in the lung's core: an ellipsoid of radius 17-25 mm (±15 %) and two smaller lobes."""
    r = rng.uniform(17, 25)
    centre = _require(_place(rng, anat, heart, side, (0.3, 0.75), (0.0, 0.35), 0.9 * r), "mass", side)
    lobes = [tuple(np.add(centre, 0.55 * r * _unit(rng)).tolist()) for _ in range(2)]
    radii = [tuple((r * rng.uniform(0.85, 1.15, 3)).tolist())] + [(s, s, s) for s in r * rng.uniform(0.5, 0.7, 2)]
    return Blob(side, (centre, *lobes), tuple(radii), rng.uniform(30, 50))


def _draw_nodules(rng: np.random.Generator, anat: Anatomy, heart: Heart, side: int, mass: Blob) -> Blob:
    """One to three nodules of radius 9-13 mm (±15 % per axis), clear of each other and of the same lung's mass
    (which is drawn whether shown or not); fewer when there is no room for more."""
    mass_reach = max(np.linalg.norm(np.subtract(c, mass.centres[0])) + max(r) for c, r in zip(mass.centres, mass.radii))
    taken: list[tuple[Point, float | np.floating[Any]]] = [(mass.centres[0], mass_reach)]
    centres, radii = [], []
    for k in range(int(rng.integers(1, 4))):
        r = rng.uniform(9, 13)
        centre = _place(rng, anat, heart, side, (0.25, 0.85), (0.1, 0.55), r + 3, [(c, d + r + 4) for c, d in taken])
        if centre is None and k > 0:
            break
        centre = _require(centre, "nodule", side)
        taken.append((centre, 1.15 * r))
        centres.append(centre)
        radii.append(tuple((r * rng.uniform(0.85, 1.15, 3)).tolist()))
    return Blob(side, tuple(centres), tuple(radii), rng.uniform(35, 65))


def _draw_consolidation(rng: np.random.Generator, anat: Anatomy, heart: Heart, side: int) -> Consolidation:
    """A consolidation of radii 28-42 mm, −40 to 30 HU, anywhere from base to apex."""
    centre = _require(_place(rng, anat, heart, side, (0.15, 0.85), (0.3, 0.7), 10.0), "consolidation", side)
    return Consolidation(side, centre, tuple(rng.uniform(28, 42, 3).tolist()), rng.uniform(-40, 30))


def _draw_atelectasis(rng: np.random.Generator, anat: Anatomy, heart: Heart, side: int) -> Atelectasis:
    """Plate atelectasis in the lower half of the lung: a band 11-16 mm thick, 80-110 mm across, nearly vertical."""
    centre = _require(_place(rng, anat, heart, side, (0.15, 0.55), (0.4, 0.75), 8.0), "atelectasis", side)
    phi, tilt = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3)
    normal = (float(np.sin(tilt)), float(np.cos(tilt) * np.sin(phi)), float(np.cos(tilt) * np.cos(phi)))
    radii = (rng.uniform(22, 32), rng.uniform(40, 55), rng.uniform(40, 55))
    return Atelectasis(side, centre, normal, rng.uniform(11, 16), radii, rng.uniform(40, 70))


def _draw_emphysema(rng: np.random.Generator, anat: Anatomy) -> Emphysema:
    """Emphysema above 35-55 % of the lung height, with 2-5 bullae (radius 8-18 mm) under the apical pleura."""
    level, hu = rng.uniform(0.35, 0.55), rng.uniform(-965, -945)
    bullae = []
    for _ in range(int(rng.integers(2, 6))):
        side = RIGHT if rng.random() < 0.5 else LEFT
        z, y, x = _lung_point(rng, anat, side, (0.55, 0.9), (0.6, 0.85))
        bullae.append((side, (float(z), float(y), float(x)), rng.uniform(8, 18)))
    return Emphysema(level, hu, tuple(bullae))


def draw_lesions(seed: np.random.SeedSequence, anat: Anatomy) -> dict[str, Lesion]:
    """Draw every label's lesion for ``anat`` (one independent stream per label), keyed in :data:`LABELS` order."""
    rng = {name: np.random.default_rng(s) for name, s in zip(LABELS, seed.spawn(len(LABELS)))}
    cardiomegaly = Cardiomegaly(
        rng["cardiomegaly"].uniform(1.28, 1.42),
        (0.0, -rng["cardiomegaly"].uniform(0, 5), rng["cardiomegaly"].uniform(4, 10)),
    )
    pericardial = PericardialEffusion(
        rng["pericardial_effusion"].uniform(9, 15), rng["pericardial_effusion"].uniform(8, 22)
    )
    largest = cardiomegaly.apply(pericardial.apply(anat.heart))
    out: dict[str, Lesion] = {
        "cardiomegaly": cardiomegaly,
        "pericardial_effusion": pericardial,
        "emphysema": _draw_emphysema(rng["emphysema"], anat),
    }
    for side, lung, pleura in ((RIGHT, "right_lung", "right"), (LEFT, "left_lung", "left")):
        mass = _draw_mass(rng[f"mass_{lung}"], anat, largest, side)
        out[f"mass_{lung}"] = mass
        out[f"nodule_{lung}"] = _draw_nodules(rng[f"nodule_{lung}"], anat, largest, side, mass)
        out[f"consolidation_{lung}"] = _draw_consolidation(rng[f"consolidation_{lung}"], anat, largest, side)
        out[f"atelectasis_{lung}"] = _draw_atelectasis(rng[f"atelectasis_{lung}"], anat, largest, side)
        r = rng[f"pleural_effusion_{pleura}"]
        out[f"pleural_effusion_{pleura}"] = PleuralEffusion(
            side, r.uniform(0.25, 0.4), r.uniform(70, 130), r.uniform(8, 22)
        )
    return {name: out[name] for name in LABELS}


def draw_marker(rng: np.random.Generator, anat: Anatomy) -> Marker:
    """A metal token 16-22 mm wide (a coin, an ECG electrode snap), at least 12 mm in front of the body's outline,
    inside the field of view."""
    half, hu = rng.uniform(8, 11), rng.uniform(2500, 3000)
    for _ in range(500):
        z, y = rng.uniform(-90, 90), rng.uniform(-152 + half, -100)
        x = (1 if rng.random() < 0.5 else -1) * rng.uniform(30, 130)
        py, px = anat.pose.to_patient(np.float64(y), np.float64(x))
        if anat.body.level(py, px, inset=-12.0 - 1.5 * half) > 1:  # 1.5 > √2: the cube's corners too
            return Marker((z, y, x), half, hu)
    raise RuntimeError("no room for the marker in front of the body")
