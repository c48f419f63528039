"""Normal chest anatomy of the phantoms: random draws and rendering (internal).

Everything here is in the *patient frame*, in reference mm (see :mod:`._grid`): axes (z, y, x) = (superior,
posterior, patient-left), origin at the centre of the body. The patient lies supine on the table, shifted and
rotated a little in the axial plane (:class:`Pose`). Shape functions take broadcastable coordinate arrays, so
the same code tests a handful of points (lesion placement) or renders a whole grid (``z [S, 1, 1]``,
``y, x [1, H, W]``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, cast

import numpy as np

from ._grid import REF_FOV_MM, Grid, smooth_field

__all__ = ["LEFT", "RIGHT", "Anatomy", "Heart", "Lung", "Scene", "build_scene", "draw_anatomy", "lung_cavity"]

RIGHT, LEFT = -1, 1
"""Sign of patient-frame x on the patient's right and left."""

#: coordinates: a broadcastable array, or one numpy scalar (a single point)
Coord = np.ndarray | np.floating[Any]


def _vec3(values: Iterable[float]) -> tuple[float, float, float]:
    """The three values of ``values`` as a (z, y, x) triple, unchanged."""
    a, b, c = values
    return a, b, c


@dataclass(frozen=True)
class Pose:
    """Position (z, y, x) of the patient's centre in the image frame, and rotation ``yaw`` (rad) in the axial plane."""

    z: float
    y: float
    x: float
    yaw: float

    def to_patient(self, y: Coord, x: Coord) -> tuple[np.ndarray, np.ndarray]:
        """Image-frame (y, x) to patient-frame (y, x)."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        dy, dx = y - self.y, x - self.x
        return c * dy - s * dx, c * dx + s * dy

    def to_image(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patient-frame (y, x) to image-frame (y, x) (inverse of :meth:`to_patient`)."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return self.y + c * y + s * x, self.x + c * x - s * y


@dataclass(frozen=True)
class Body:
    """Superellipse body outline (half-width ``a``, half-depth ``b``, exponent ``e``) with a subcutaneous fat layer."""

    a: float
    b: float
    e: float
    fat: float

    def level(self, y: np.ndarray, x: np.ndarray, inset: float = 0.0) -> np.ndarray:
        """< 1 inside the outline moved ``inset`` mm inwards (fat is thinner at the back: 0.8 × inset)."""
        return np.abs(x / (self.a - inset)) ** self.e + np.abs(y / (self.b - 0.8 * inset)) ** self.e


@dataclass(frozen=True)
class Lung:
    """One hemithorax: an elliptic cross-section (centre ``cx, cy``, half-axes ``ax, by``) tapering to the apex,
    above a diaphragm dome of height ``dome`` over the costophrenic level ``z_base``."""

    side: int
    cx: float
    cy: float
    ax: float
    by: float
    z_base: float
    z_apex: float
    dome: float

    def height(self, t: float) -> float:
        """z at fraction ``t`` of the way from the base to the apex."""
        return self.z_base + t * (self.z_apex - self.z_base)

    def scale(self, z: Coord) -> np.ndarray:
        """Cross-section scale at height ``z``: 1 in the lower half, an elliptic taper to 0 at the apex."""
        t = (z - self.z_base) / (self.z_apex - self.z_base)
        taper = np.sqrt(np.clip(1 - ((t - 0.45) / 0.55) ** 2, 1e-6, 1))
        return np.where(t < 0.45, 1.0, taper).astype(np.float32)

    def q(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Squared normalised radius of the full-size cross-section at (y, x)."""
        return ((x - self.cx) / self.ax) ** 2 + ((y - self.cy) / self.by) ** 2

    def rho2(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Squared normalised radius in the cross-section at height ``z`` (< 1 inside)."""
        return self.q(y, x) / self.scale(z) ** 2

    def theta(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Angle around the lung's axis: 0 lateral, +π/2 posterior, −π/2 anterior, ±π medial."""
        return np.arctan2(y - self.cy, self.side * (x - self.cx))

    def floor(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Height of the diaphragm under (y, x); the dome's top is a little anterior of the lung's centre."""
        q0 = ((x - self.cx) / self.ax) ** 2 + ((y - self.cy + 0.15 * self.by) / self.by) ** 2
        return self.z_base + self.dome * (1 - np.minimum(q0, 1))

    def envelope(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, rho2: np.ndarray) -> np.ndarray:
        """Inside the hemithorax outline (before the mediastinum and heart are carved out)."""
        return (rho2 < 1) & (z > self.floor(y, x)) & (z < self.z_apex)


@dataclass(frozen=True)
class Heart:
    """Ellipsoidal heart (``radii`` along the unit ``axes``, rows in (z, y, x)) resting on the plane ``z_floor``,
    between the sternum (``y_front``) and the oesophagus (``y_back``), inside a pericardial sac: 4 mm of fat, or
    with an effusion 2.5 mm of fat, ``fluid`` mm of fluid at ``fluid_hu`` HU and 3 mm of fat."""

    centre: tuple[float, float, float]
    axes: tuple[tuple[float, float, float], ...]
    radii: tuple[float, float, float]
    z_floor: float
    y_front: float = -np.inf
    y_back: float = np.inf
    fluid: float = 0.0
    fluid_hu: float = 0.0

    @property
    def sac(self) -> float:
        """Thickness in mm of everything outside the heart muscle up to the outer edge of the pericardial fat."""
        return self.fluid + 5.5 if self.fluid > 0 else 4.0

    @property
    def organ(self) -> float:
        """Thickness in mm of the part of the sac that counts as heart (epicardial fat and effusion)."""
        return self.fluid + 2.5 if self.fluid > 0 else 0.0

    def extent(self) -> float:
        """Largest distance in mm from the centre to the outside of the sac."""
        return max(self.radii) + self.sac

    def local(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> list[np.ndarray]:
        """Coordinates along the three ellipsoid axes, relative to the centre."""
        dz, dy, dx = z - self.centre[0], y - self.centre[1], x - self.centre[2]
        return [a[0] * dz + a[1] * dy + a[2] * dx for a in self.axes]

    def level(self, local: list[np.ndarray], grow: float) -> np.ndarray:
        """< 1 inside the ellipsoid with every radius grown by ``grow`` mm."""
        return cast(np.ndarray, sum((u / (r + grow)) ** 2 for u, r in zip(local, self.radii)))

    def room(self, z: np.ndarray, y: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Where the heart may be: above the floor and between sternum and oesophagus (grown by ``margin`` mm)."""
        return (z > self.z_floor - margin) & (y > self.y_front - margin) & (y < self.y_back + margin)

    def sac_mask(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, margin: float) -> np.ndarray:
        """Inside the pericardial sac grown by ``margin`` mm (lungs keep this far away)."""
        return (self.level(self.local(z, y, x), self.sac + margin) < 1) & self.room(z, y, margin)

    def enlarged(self, scale: float, shift: tuple[float, float, float]) -> Heart:
        """The same heart with every radius times ``scale`` and the centre moved by ``shift`` (z, y, x)."""
        centre = _vec3(c + d for c, d in zip(self.centre, shift))
        return replace(self, centre=centre, radii=_vec3(r * scale for r in self.radii))


class Tube(NamedTuple):
    """A vertical tube: centre (y, x) and radius in mm."""

    y: float
    x: float
    r: float

    def level(self, y: np.ndarray, x: np.ndarray, grow: float = 0.0) -> np.ndarray:
        """< 1 inside the tube with its radius grown by ``grow`` mm."""
        return ((y - self.y) ** 2 + (x - self.x) ** 2) / (self.r + grow) ** 2


@dataclass(frozen=True)
class Mediastinum:
    """Fat-filled space between the lungs with the great vessels, oesophagus, trachea and main bronchi."""

    half_width: float
    aorta_descending: Tube
    aorta_ascending: Tube
    z_arch: float
    oesophagus: Tube
    trachea: Tube
    z_carina: float
    bronchus_tips: tuple[tuple[float, float, float], tuple[float, float, float]]  # (z, y, x), right then left
    bronchus_r: float


@dataclass(frozen=True)
class Spine:
    """Vertebral body (elliptic, centre ``y``), canal, posterior elements and discs every ``disc_pitch`` mm."""

    y: float
    rx: float
    ry: float
    canal_r: float
    disc_pitch: float
    disc_phase: float
    spinous: float
    transverse: float

    @property
    def canal_y(self) -> float:
        """y of the spinal canal's centre (just behind the vertebral body)."""
        return self.y + self.ry + self.canal_r + 1.0


@dataclass(frozen=True)
class Ribs:
    """Ribs as bony bands around each lung, ``pitch`` mm apart, ``drop`` mm lower at the front than at the back."""

    pitch: float
    phase: float
    height: float
    drop: float
    gap: float
    thickness: float


@dataclass(frozen=True)
class Tissues:
    """Per-patient tissue densities (HU)."""

    fat: float
    muscle: float
    blood: float
    liver: float
    abdomen: float
    lung: float
    marrow: float
    rib: float


@dataclass(frozen=True)
class Anatomy:
    """One patient's normal anatomy (patient frame, reference mm) and scan noise."""

    pose: Pose
    body: Body
    lungs: tuple[Lung, Lung]
    heart: Heart
    mediastinum: Mediastinum
    spine: Spine
    ribs: Ribs
    sternum: tuple[float, float, float, float]  # half-width, thickness, z_low, z_high
    table_y: float | None  # image-frame y of the table top, None without a table
    hu: Tissues
    noise_sd: float

    def lung(self, side: int) -> Lung:
        """The lung on ``side`` (:data:`RIGHT` or :data:`LEFT`)."""
        return self.lungs[0] if side == RIGHT else self.lungs[1]


def _heart_axes(yaw: float, tilt: float) -> tuple[tuple[float, float, float], ...]:
    """Unit axes (z, y, x) of a heart whose long axis points ``yaw`` rad anterior of patient-left, ``tilt`` rad down."""
    long = np.array([-np.sin(tilt), -np.cos(tilt) * np.sin(yaw), np.cos(tilt) * np.cos(yaw)])
    across = np.array([0.0, np.cos(yaw), np.sin(yaw)])
    third = np.cross(long, across)
    return tuple(_vec3(float(c) for c in a) for a in (long, across, third))


def _draw_lungs(rng: np.random.Generator, body: Body, wall: float) -> tuple[Lung, Lung]:
    """Two lungs filling the chest inside a chest wall ``wall`` mm thick, with a mediastinum between them."""
    a_in, b_in = body.a - body.fat, body.b - 0.8 * body.fat
    medial, lateral = rng.uniform(14, 20), a_in - wall
    front, back = -(b_in - wall), b_in - 1.1 * wall
    size = rng.uniform(0.92, 1.0)
    z_base, z_apex, dome = rng.uniform(-128, -112), rng.uniform(112, 132), rng.uniform(38, 50)
    lungs = []
    for side, dome_drop in ((RIGHT, 0.0), (LEFT, rng.uniform(6, 14))):
        s = size * rng.uniform(0.97, 1.03)
        lungs.append(
            Lung(
                side=side,
                cx=side * (lateral + medial) / 2 + rng.uniform(-3, 3),
                cy=(front + back) / 2 + rng.uniform(-3, 3),
                ax=(lateral - medial) / 2 * s,
                by=(back - front) / 2 * s,
                z_base=z_base + rng.uniform(-3, 3),
                z_apex=z_apex + rng.uniform(-3, 3),
                dome=dome - dome_drop,
            )
        )
    return lungs[0], lungs[1]


def _draw_heart(rng: np.random.Generator, lungs: tuple[Lung, Lung]) -> Heart:
    """A normal-sized heart left of the midline and anterior, resting on the left hemidiaphragm."""
    left = lungs[1]
    axes = _heart_axes(np.deg2rad(rng.uniform(30, 50)), np.deg2rad(rng.uniform(10, 25)))
    radii = _vec3(
        float(r) * rng.uniform(0.93, 1.03) for r in (rng.uniform(52, 58), rng.uniform(40, 46), rng.uniform(36, 42))
    )
    z_floor = left.z_base + 0.8 * left.dome
    half_height = float(np.sqrt(sum((r * a[0]) ** 2 for r, a in zip(radii, axes))))
    y = (lungs[0].cy + left.cy) / 2 - rng.uniform(14, 24)
    return Heart((z_floor + 0.55 * half_height, y, rng.uniform(14, 26)), axes, radii, z_floor)


def _draw_mediastinum(rng: np.random.Generator, lungs: tuple[Lung, Lung], heart: Heart, spine: Spine) -> Mediastinum:
    """Great vessels, oesophagus and airways placed relative to the spine, heart and lungs."""
    top = min(lung.z_apex for lung in lungs)
    r_desc = rng.uniform(10, 13)
    trachea = Tube(spine.y - spine.ry - rng.uniform(24, 30), rng.uniform(-3, 3), rng.uniform(8, 10))
    z_carina = lungs[0].height(rng.uniform(0.55, 0.62))
    right, left = (
        (z_carina - rng.uniform(22, 32), trachea.y + rng.uniform(5, 15), side * rng.uniform(40, 52))
        for side in (RIGHT, LEFT)
    )
    tips = (right, left)
    return Mediastinum(
        half_width=rng.uniform(28, 36),
        aorta_descending=Tube(spine.y - 0.8 * spine.ry, 0.6 * spine.rx + r_desc, r_desc),
        aorta_ascending=Tube(heart.centre[1] + rng.uniform(-4, 6), rng.uniform(2, 10), rng.uniform(13, 16)),
        z_arch=top - rng.uniform(45, 60),
        oesophagus=Tube(trachea.y + trachea.r + 8, rng.uniform(-2, 6), 7.0),
        trachea=trachea,
        z_carina=z_carina,
        bronchus_tips=tips,
        bronchus_r=rng.uniform(5.5, 7),
    )


def _table_top(pose: Pose, body: Body) -> float:
    """Image-frame y just behind the posterior-most point of the (rotated) body outline."""
    t = np.linspace(0, 2 * np.pi, 721)
    c, s = np.cos(t), np.sin(t)
    y = body.b * np.sign(s) * np.abs(s) ** (2 / body.e)
    x = body.a * np.sign(c) * np.abs(c) ** (2 / body.e)
    return float(pose.to_image(y, x)[0].max()) + 1.0


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's normal anatomy, tissue densities and scan noise level."""
    pose = Pose(rng.uniform(-8, 8), rng.uniform(-12, -2), rng.uniform(-8, 8), np.deg2rad(rng.uniform(-4, 4)))
    body = Body(rng.uniform(124, 140), rng.uniform(96, 112), rng.uniform(2.2, 2.6), rng.uniform(8, 20))
    lungs = _draw_lungs(rng, body, wall=rng.uniform(11, 16))
    heart = _draw_heart(rng, lungs)
    b_in = body.b - 0.8 * body.fat
    disc_pitch = rng.uniform(25, 30)
    spine = Spine(
        y=b_in - rng.uniform(36, 44),
        rx=rng.uniform(16, 20),
        ry=rng.uniform(13, 16),
        canal_r=rng.uniform(7, 9),
        disc_pitch=disc_pitch,
        disc_phase=rng.uniform(0, disc_pitch),
        spinous=rng.uniform(22, 30),
        transverse=rng.uniform(26, 32),
    )
    pitch = rng.uniform(24, 30)
    ribs = Ribs(
        pitch, rng.uniform(0, pitch), rng.uniform(8, 10), rng.uniform(90, 130), rng.uniform(2, 4), rng.uniform(5, 7)
    )
    sternum = (
        rng.uniform(11, 15),
        rng.uniform(9, 12),
        heart.centre[0] - rng.uniform(5, 15),
        lungs[0].z_apex - rng.uniform(15, 30),
    )
    mediastinum = _draw_mediastinum(rng, lungs, heart, spine)
    hu = Tissues(
        fat=rng.uniform(-110, -85),
        muscle=rng.uniform(38, 55),
        blood=rng.uniform(35, 48),
        liver=rng.uniform(50, 65),
        abdomen=rng.uniform(25, 40),
        lung=rng.uniform(-885, -860),
        marrow=rng.uniform(550, 700),
        rib=rng.uniform(650, 800),
    )
    table = rng.random() < 0.85
    return Anatomy(
        pose=pose,
        body=body,
        lungs=lungs,
        heart=replace(
            heart,
            y_front=-b_in + 4 + sternum[1],
            y_back=mediastinum.oesophagus.y - mediastinum.oesophagus.r,
        ),
        mediastinum=mediastinum,
        spine=spine,
        ribs=ribs,
        sternum=sternum,
        table_y=_table_top(pose, body) if table else None,
        hu=hu,
        noise_sd=rng.uniform(10, 20),
    )


def _segment_dist2(p: tuple[np.ndarray, ...], a: tuple[float, ...], b: tuple[float, ...]) -> np.ndarray:
    """Squared distance from points ``p`` (tuple of broadcastable coordinate arrays) to the segment a–b."""
    ab = tuple(float(bi - ai) for ai, bi in zip(a, b))
    t = np.clip(sum((pi - ai) * d for pi, ai, d in zip(p, a, ab)) / sum(d * d for d in ab), 0, 1)
    return cast(np.ndarray, sum((pi - ai - t * d) ** 2 for pi, ai, d in zip(p, a, ab)))


def _arch_dist2(m: Mediastinum, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Squared distance to the aortic arch's axis: a horizontal segment from the ascending to the descending aorta."""
    a, d = m.aorta_ascending, m.aorta_descending
    return (z - m.z_arch) ** 2 + _segment_dist2((y, x), (a.y, a.x), (d.y, d.x))


def mediastinal(anat: Anatomy, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Structures the lungs keep 2 mm away from: great vessels, oesophagus, trachea, spine and its muscles."""
    m, s, grow = anat.mediastinum, anat.spine, 2.0
    arch = _arch_dist2(m, z, y, x)
    return (
        ((m.aorta_descending.level(y, x, grow) < 1) & (z < m.z_arch))
        | ((m.aorta_ascending.level(y, x, grow) < 1) & (z > anat.heart.centre[0]) & (z < m.z_arch))
        | (arch < (m.aorta_ascending.r + grow) ** 2)
        | (m.oesophagus.level(y, x, grow) < 1)
        | ((m.trachea.level(y, x, grow) < 1) & (z > m.z_carina))
        | ((x / (s.rx + 8)) ** 2 + ((y - s.y) / (s.ry + 8)) ** 2 < 1)
        | ((np.abs(x) < s.transverse + 4) & (y > s.y))
    )


def lung_cavity(anat: Anatomy, heart: Heart, side: int, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The hemithorax on ``side`` at points (z, y, x): outline minus mediastinum minus the heart's sac (+2 mm)."""
    lung = anat.lung(side)
    inside = lung.envelope(z, y, x, lung.rho2(z, y, x))
    return inside & ~mediastinal(anat, z, y, x) & ~heart.sac_mask(z, y, x, 2.0)


@dataclass
class Scene:
    """A grid being painted: patient-frame coordinates, HU so far, masks and shared texture fields.

    ``z`` is ``float32 [S, 1, 1]``; ``y, x`` are ``float32 [1, H, W]``; 3-D arrays are ``[S, H, W]``: ``hu``,
    the unit-variance texture fields ``fa`` and ``fb``, ``rho2`` and ``cavity`` per side, ``masks`` (``body``,
    ``heart``, ``heart_core``, ``pericardial_fluid``, ``spine``, ``ribs``) and ``vessel_ratio`` (< 1 on lung
    vessels, smaller towards their centre lines)."""

    grid: Grid
    anat: Anatomy
    heart: Heart
    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    hu: np.ndarray
    fa: np.ndarray
    fb: np.ndarray
    rho2: dict[int, np.ndarray] = field(default_factory=dict)
    cavity: dict[int, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    vessel_ratio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def slab(self, z_low: float, z_high: float) -> slice:
        """Slices whose centre lies in [z_low, z_high] (patient-frame z)."""
        zs = self.z.ravel()
        return slice(int(np.searchsorted(zs, z_low)), int(np.searchsorted(zs, z_high, side="right")))


def _paint_outside(scene: Scene) -> None:
    """Table (if any: a carbon-fibre board, two skins at least a voxel thick around foam), body fat, muscle."""
    anat, hu = scene.anat, scene.hu
    if anat.table_y is not None:
        yi = scene.grid.axis(1)[:, None]
        top = anat.table_y - scene.grid.axis(2)[None, :] ** 2 / 1800.0
        depth, skin = yi - top, max(2.5, REF_FOV_MM[1] / scene.grid.shape[1])
        hu[:, (depth >= 0) & (depth < 10 + 2 * skin)] = 250.0
        hu[:, (depth >= skin) & (depth < 10 + skin)] = -900.0
    body = anat.body.level(scene.y[0], scene.x[0]) < 1
    inner = anat.body.level(scene.y[0], scene.x[0], anat.body.fat) < 1
    hu[:, body] = anat.hu.fat
    hu[:, inner] = anat.hu.muscle
    scene.masks["body"] = np.broadcast_to(body, hu.shape).copy()


def _diaphragm(anat: Anatomy, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Height of the diaphragm under every (y, x): both domes and the central tendon under the heart."""
    right, left = anat.lungs
    tendon = anat.heart.z_floor - 40 * (1 - np.clip(1 - (x / 60) ** 2, 0, 1))
    return np.maximum(np.maximum(right.floor(y, x), left.floor(y, x)), tendon)


def _paint_mediastinum(scene: Scene) -> None:
    """Abdomen and liver below the diaphragm; mediastinal fat, great vessels, oesophagus and trachea above it."""
    anat, hu, z, y, x = scene.anat, scene.hu, scene.z, scene.y, scene.x
    m, inner = anat.mediastinum, anat.body.level(y, x, anat.body.fat) < 1
    below = (z < _diaphragm(anat, y, x)) & inner
    hu[below & (x < 20)] = anat.hu.liver
    hu[below & (x >= 20)] = anat.hu.abdomen
    b_in = anat.body.b - 0.8 * anat.body.fat
    fat2d = (np.abs(x) < m.half_width) & (y > -b_in + 2) & (y < anat.spine.y)
    hu[fat2d & ~below & inner] = anat.hu.fat
    arch = _arch_dist2(m, z, y, x)
    hu[(m.aorta_descending.level(y, x) < 1) & (z < m.z_arch)] = anat.hu.blood
    hu[(m.aorta_ascending.level(y, x) < 1) & (z > anat.heart.centre[0]) & (z < m.z_arch)] = anat.hu.blood
    hu[arch < m.aorta_ascending.r**2] = anat.hu.blood
    hu[(m.oesophagus.level(y, x) < 1) & ~below] = anat.hu.muscle
    hu[(m.trachea.level(y, x, 2.0) < 1) & (z > m.z_carina)] = anat.hu.muscle
    hu[(m.trachea.level(y, x) < 1) & (z > m.z_carina)] = -990.0


def _paint_heart(scene: Scene) -> None:
    """Pericardial fat, effusion (if the heart has one) and heart muscle; sets the heart masks."""
    heart, hu = scene.heart, scene.hu
    sl = scene.slab(heart.centre[0] - heart.extent(), heart.centre[0] + heart.extent())
    z, y, x = scene.z[sl], scene.y, scene.x
    local = heart.local(z, y, x)
    anat = scene.anat
    between = np.abs(x) < min(abs(lung.cx) for lung in anat.lungs)
    in_ribcage = (scene.rho2[RIGHT][sl] < 1) | (scene.rho2[LEFT][sl] < 1) | between
    room = heart.room(z, y) & in_ribcage
    core = (heart.level(local, 0.0) < 1) & room
    organ = (heart.level(local, heart.organ) < 1) & room
    sac = (heart.level(local, heart.sac) < 1) & room
    hu[sl][sac] = anat.hu.fat
    fluid = np.zeros(core.shape, bool)
    if heart.fluid > 0:
        epicardial = (heart.level(local, 2.5) < 1) & room
        hu[sl][organ] = heart.fluid_hu
        hu[sl][epicardial] = anat.hu.fat
        fluid = organ & ~epicardial
    hu[sl][core] = anat.hu.blood
    for name, mask in (("heart_sac", sac), ("heart", organ), ("heart_core", core), ("pericardial_fluid", fluid)):
        scene.masks[name] = np.zeros(hu.shape, bool)
        scene.masks[name][sl] = mask


def _paint_lungs(scene: Scene) -> None:
    """Hemithorax masks, aerated parenchyma (denser towards the back), vessels tapering from the hila, bronchi."""
    anat, hu, z, y, x = scene.anat, scene.hu, scene.z, scene.y, scene.x
    med = mediastinal(anat, z, y, x)
    for side in (RIGHT, LEFT):
        scene.cavity[side] = anat.lung(side).envelope(z, y, x, scene.rho2[side]) & ~med
    sl = scene.slab(scene.heart.centre[0] - scene.heart.extent() - 2, scene.heart.centre[0] + scene.heart.extent() + 2)
    sac = scene.heart.sac_mask(z[sl], y, x, 2.0)
    for side in (RIGHT, LEFT):
        scene.cavity[side][sl] &= ~sac
    lungs = scene.cavity[RIGHT] | scene.cavity[LEFT]
    depth = (y - 0.5 * (anat.lungs[0].cy + anat.lungs[1].cy)) / anat.lungs[0].by
    hu[lungs] = (anat.hu.lung + 30.0 * depth + 8.0 * scene.fa)[lungs]
    scene.vessel_ratio = np.maximum(np.abs(scene.fa), np.abs(scene.fb)) / _vessel_width(scene)
    hu[lungs & (scene.vessel_ratio < 1)] = anat.hu.blood
    m = anat.mediastinum
    carina = (m.z_carina, m.trachea.y, m.trachea.x)
    for tip in m.bronchus_tips:
        bsl = scene.slab(tip[0] - 10, m.z_carina + 10)
        d2 = _segment_dist2((z[bsl], y, x), carina, tip)
        outside = ~scene.masks["heart_sac"][bsl]
        hu[bsl][(d2 < (m.bronchus_r + 1.5) ** 2) & outside] = anat.hu.muscle
        hu[bsl][(d2 < m.bronchus_r**2) & outside] = -990.0


def _vessel_width(scene: Scene) -> np.ndarray:
    """Vessels are where ``max(|fa|, |fb|)`` (small along random curves) is below this: wide near the hila."""
    m = scene.anat.mediastinum
    d2 = np.minimum(*(((scene.z - t[0]) ** 2 + (scene.y - t[1]) ** 2 + (scene.x - t[2]) ** 2) for t in m.bronchus_tips))
    return 0.25 * np.clip(1.5 - np.sqrt(d2) / 110.0, 0.45, 1.5)


def _paint_bones(scene: Scene) -> None:
    """Spine (vertebral bodies with discs, canal, posterior elements), ribs and sternum; sets the masks ``spine``
    (the vertebral column without the canal, discs included) and ``ribs`` (ribs and sternum)."""
    anat, hu, z, y, x = scene.anat, scene.hu, scene.z, scene.y, scene.x
    s, inner = anat.spine, anat.body.level(y, x, anat.body.fat + 3) < 1
    vb = (x / s.rx) ** 2 + ((y - s.y) / s.ry) ** 2
    disc = np.mod(z - s.disc_phase, s.disc_pitch) < 6.0
    canal = np.hypot(x, y - s.canal_y)
    posterior = (
        ((canal >= s.canal_r) & (canal < s.canal_r + 5))
        | ((np.abs(x) < 4) & (y > s.canal_y) & (y < s.canal_y + s.canal_r + s.spinous))
        | ((np.abs(x) < s.transverse) & (np.abs(y - s.canal_y) < 5))
    ) & inner
    spine = (vb < 1) | posterior
    hu[:, spine[0]] = anat.hu.marrow
    hu[(vb < 1) & (vb > ((min(s.rx, s.ry) - 2.5) / min(s.rx, s.ry)) ** 2) & ~disc] = 1000.0
    hu[(vb < 1) & disc] = 80.0
    hu[:, canal[0] < s.canal_r] = 30.0
    soft = scene.cavity[RIGHT] | scene.cavity[LEFT] | scene.masks["heart_sac"]
    ribs = (_ribs(scene, RIGHT) | _ribs(scene, LEFT)) & inner & ~soft & ~spine
    hu[ribs] = anat.hu.rib
    half, thick, z_low, z_high = anat.sternum
    front = -(anat.body.b - 0.8 * anat.body.fat) + 2
    sternum = (np.abs(x) < half) & (y > front) & (y < front + thick) & (z > z_low) & (z < z_high) & ~soft
    hu[sternum] = anat.hu.marrow
    scene.masks["spine"] = np.broadcast_to(spine, hu.shape).copy()
    scene.masks["ribs"] = ribs | sternum


def _ribs(scene: Scene, side: int) -> np.ndarray:
    """Rib bands just outside the lung on ``side``: periodic in z, descending towards the front."""
    r, lung = scene.anat.ribs, scene.anat.lung(side)
    theta = lung.theta(scene.y, scene.x)
    offset = -r.drop * (0.85 * np.pi - theta) / (1.6 * np.pi)
    arc = (theta > -0.75 * np.pi) & (theta < 0.85 * np.pi)
    band = np.mod(scene.z - r.phase - offset, r.pitch) < r.height
    size = np.sqrt(lung.ax * lung.by) * lung.scale(scene.z)
    rho2 = scene.rho2[side]
    ring = (rho2 > (1 + r.gap / size) ** 2) & (rho2 < (1 + (r.gap + r.thickness) / size) ** 2)
    height = (scene.z > lung.z_base - 30) & (scene.z < lung.z_apex + 10)
    return ring & band & arc & height


def build_scene(grid: Grid, anat: Anatomy, heart: Heart, texture_seed: int) -> Scene:
    """Render the normal anatomy (with ``heart``, possibly enlarged or with an effusion) on ``grid``.

    Returns a :class:`Scene` whose ``hu`` (``float32 [S, H, W]``) lesions are then painted into; masks
    ``body``, ``heart``, ``heart_core``, ``pericardial_fluid``, ``spine`` and ``ribs``, cavities per side."""
    z = (grid.axis(0) - anat.pose.z)[:, None, None]
    yi, xi = np.meshgrid(grid.axis(1), grid.axis(2), indexing="ij")
    y, x = (c.astype(np.float32)[None] for c in anat.pose.to_patient(yi, xi))
    fa, fb = (smooth_field(np.random.default_rng([texture_seed, k]), grid, 10.0) for k in range(2))
    hu = np.full(grid.shape, -1000.0, np.float32)
    scene = Scene(grid, anat, heart, z, y, x, hu, fa, fb)
    scene.rho2 = {side: anat.lung(side).rho2(z, y, x) for side in (RIGHT, LEFT)}
    for paint in (_paint_outside, _paint_mediastinum, _paint_heart, _paint_lungs, _paint_bones):
        paint(scene)
    del scene.masks["heart_sac"]
    return scene
