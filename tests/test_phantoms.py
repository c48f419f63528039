"""Synthetic chest-CT phantoms (medcam3d.data): densities, geometry, determinism, exclusion, files, statistics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medcam3d.data import (
    BLUR_REACH,
    LABELS,
    MARKER_BIT,
    ORGAN_CODES,
    ORGANS,
    CleverHans,
    draw_labels,
    draw_spec,
    make_dataset,
    make_phantom,
    render,
    write_nifti,
)
from medcam3d.errors import InputError

SMALL = (24, 64, 64)
ALL = {name: True for name in LABELS}
NONE = {name: False for name in LABELS}
MARKED = {"label": "mass_left_lung", "p_with": 1.0, "p_without": 0.0}
LATERAL = {
    "right_lung": [n for n in LABELS if n.endswith("_right_lung") or n == "pleural_effusion_right"],
    "left_lung": [n for n in LABELS if n.endswith("_left_lung") or n == "pleural_effusion_left"],
}


def core(mask: np.ndarray) -> np.ndarray:
    """The mask minus its rim in every slice (in-plane erosion by one voxel): away from partial-volume edges."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_erosion(mask, structure)


def world(phantom, mask: np.ndarray) -> np.ndarray:
    """RAS mm of the centroid of ``mask``, through the phantom's affine."""
    return (phantom.affine @ np.append(np.argwhere(mask).mean(axis=0), 1.0))[:3]


@pytest.fixture(scope="module")
def normal():
    return make_phantom(3, present=NONE)


@pytest.fixture(scope="module")
def sick():
    """Every label at once, and the marker."""
    return make_phantom(4, present=ALL, clever_hans=MARKED)


# --- densities ---------------------------------------------------------------------------------------------------


def test_normal_tissue_densities(normal):
    organs = normal.organ_masks
    lungs = core(organs["right_lung"] | organs["left_lung"])
    assert -910 < normal.hu[lungs].mean() < -790  # lung ≈ −850 with vessels
    assert 10 < normal.hu[core(organs["heart"])].mean() < 70  # blood / muscle ≈ 40
    assert normal.hu[organs["spine"] | organs["ribs"]].mean() > 300  # bone
    assert -1010 < normal.hu[:, :3].mean() < -985  # air in front of the patient (noise clipped at −1024)
    # subcutaneous fat (8-20 mm thick): the body's second ring of voxels (2.5-5 mm deep), front third, mid height
    body = organs["body"][30]
    shell = body & ~ndimage.binary_erosion(body, iterations=2) & ndimage.binary_erosion(body)
    front = np.zeros_like(shell)
    front[: shell.shape[0] // 3] = True
    assert -140 < normal.hu[30][shell & front].mean() < -60
    assert 5 < normal.hu[30][shell & front].std() < 60  # 10-20 HU noise


def test_lesion_densities(sick):
    m, hu = sick.lesion_masks, sick.hu
    for name in ("pleural_effusion_right", "pleural_effusion_left", "pericardial_effusion"):
        assert 0 < hu[core(m[name])].mean() < 30, name  # fluid
    for name in ("mass_right_lung", "mass_left_lung", "atelectasis_right_lung", "atelectasis_left_lung"):
        assert 10 < hu[core(m[name])].mean() < 70, name  # soft tissue
    for name in ("nodule_right_lung", "nodule_left_lung"):
        k = m[name].sum(axis=(1, 2)).argmax()  # the nodule's widest slice
        assert -100 < hu[k][core(m[name])[k]].mean() < 70, name  # small: some partial volume with lung in z
    for name in ("consolidation_right_lung", "consolidation_left_lung"):
        assert -300 < hu[core(m[name])].mean() < 60, name  # airspace opacity with air bronchograms
    assert 10 < hu[core(m["cardiomegaly"])].mean() < 70
    assert hu[core(m["emphysema"])].mean() < -900
    assert hu[sick.marker_mask].mean() > 1500 and hu[sick.marker_mask].max() > 2000  # metal


# --- geometry ----------------------------------------------------------------------------------------------------


def test_affine_orientation_and_sides(normal):
    a = normal.affine
    assert a.dtype == np.float64 and a.shape == (4, 4)
    assert nib.aff2axcodes(a) == ("S", "P", "L")
    np.testing.assert_allclose(np.abs(a[:3, :3]).sum(axis=0), (5.0, 2.5, 2.5))
    assert np.abs(a[:3, 3]).max() > 100  # a scanner origin, not 0 or identity
    organs = normal.organ_masks
    right, left, heart, spine = (world(normal, organs[n]) for n in ("right_lung", "left_lung", "heart", "spine"))
    assert right[0] > spine[0] + 40 > spine[0] - 40 > left[0]  # RAS: +x is the patient's right
    assert heart[0] < spine[0] - 5  # heart left of the midline
    assert heart[1] > spine[1] + 40  # heart anterior of the spine
    width = normal.hu.shape[2]
    assert np.argwhere(organs["right_lung"])[:, 2].mean() < width / 2 < np.argwhere(organs["left_lung"])[:, 2].mean()
    assert np.argwhere(organs["heart"])[:, 1].mean() < np.argwhere(organs["spine"])[:, 1].mean()  # anterior = small row
    def top(m):
        return np.nonzero(m.any(axis=(1, 2)))[0].max()
    assert top(organs["right_lung"]) > top(organs["heart"]) + 10  # apices far above the heart (slice axis goes up)


def test_organs_do_not_overlap_and_lie_in_body(sick):
    names = [n for n in ORGANS if n != "body"]
    for i, a in enumerate(names):
        assert sick.organ_masks[a].any()
        assert not (sick.organ_masks[a] & ~sick.organ_masks["body"]).any(), a
        for b in names[i + 1 :]:
            assert not (sick.organ_masks[a] & sick.organ_masks[b]).any(), (a, b)


def test_lesions_lie_in_their_organ(sick):
    organs, masks = sick.organ_masks, sick.lesion_masks
    for organ, names in LATERAL.items():
        for name in names:
            assert masks[name].any() and not (masks[name] & ~organs[organ]).any(), name
    for name in ("cardiomegaly", "pericardial_effusion"):
        assert not (masks[name] & ~organs["heart"]).any(), name
    assert not (masks["emphysema"] & ~(organs["right_lung"] | organs["left_lung"])).any()
    near_body = ndimage.binary_dilation(organs["body"], iterations=3)
    assert sick.marker_mask.any() and not (sick.marker_mask & near_body).any()


def test_lesion_shapes(sick):
    organs, masks = sick.organ_masks, sick.lesion_masks
    for side in ("right", "left"):
        effusion, lung = masks[f"pleural_effusion_{side}"], organs[f"{side}_lung"]
        assert np.argwhere(effusion)[:, 1].mean() > np.argwhere(lung)[:, 1].mean() + 5  # dependent: posterior
        assert np.argwhere(effusion)[:, 0].mean() < np.argwhere(lung)[:, 0].mean()  # and basal
        nodule, mass = masks[f"nodule_{side}_lung"], masks[f"mass_{side}_lung"]
        nodules, count = ndimage.label(nodule)
        sizes = np.bincount(nodules.ravel())[1:]
        assert 1 <= count <= 3 and sizes.min() >= 40  # radius ≥ 9·0.85 mm: 4/3·π·7.65³ mm³ = 60 voxels, less edges
        assert nodule.sum(axis=(1, 2)).max() >= 20  # ≥ π·3² voxels in a nodule's widest slice at 2.5 mm
        assert mass.sum() > 2 * sizes.max()
    emphysema = np.argwhere(masks["emphysema"])[:, 0].mean()
    assert emphysema > np.argwhere(organs["right_lung"] | organs["left_lung"])[:, 0].mean()  # upper lungs
    normal_heart = make_phantom(4, present=ALL, exclude=("cardiomegaly",))
    muscle = normal_heart.organ_masks["heart"] & ~normal_heart.lesion_masks["pericardial_effusion"]
    assert masks["cardiomegaly"].sum() > 1.5 * muscle.sum()  # 1.28³ ≈ 2.1 before the rib cage clips it


# --- determinism, exclusion, presence ------------------------------------------------------------------------------


def test_deterministic_and_seed_dependent():
    a, b, c = make_phantom(8, shape=SMALL), make_phantom(8, shape=SMALL), make_phantom(9, shape=SMALL)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.lesion_masks.keys() == b.lesion_masks.keys()
    for name in ORGANS:
        np.testing.assert_array_equal(a.organ_masks[name], b.organ_masks[name])
    assert np.abs(a.hu - c.hu).mean() > 20


def test_same_patient_whatever_the_labels():
    a = draw_spec(5, prevalence=0.05)
    b = draw_spec(5, prevalence=0.95, present={"emphysema": True}, clever_hans=MARKED)
    assert a.anatomy == b.anatomy and dict(a.lesions) == dict(b.lesions) and a.marker == b.marker
    assert (a.texture_seed, a.noise_seed) == (b.texture_seed, b.noise_seed)
    assert a.labels.sum() < b.labels.sum() and b.labels[LABELS.index("emphysema")]


def test_exclude_removes_only_the_lesion_and_marker():
    kw = {"present": {"nodule_right_lung": True, "mass_right_lung": False}, "clever_hans": MARKED | {"p_without": 1}}
    full = make_phantom(12, **kw)
    bare = make_phantom(12, exclude=("nodule_right_lung", "marker"), **kw)
    nodule = full.lesion_masks["nodule_right_lung"]
    assert not bare.labels[LABELS.index("nodule_right_lung")] and "nodule_right_lung" not in bare.lesion_masks
    assert bare.marker_mask is None and full.marker_mask is not None
    np.testing.assert_array_equal(np.delete(full.labels, 0), np.delete(bare.labels, 0))
    reach = np.ones((3, 5, 5), bool)  # the blur's kernel: 1 slice, 2 rows/columns each way
    assert BLUR_REACH == (1, 2, 2)
    allowed = ndimage.binary_dilation(nodule | full.marker_mask, reach)
    np.testing.assert_array_equal(full.hu[~allowed], bare.hu[~allowed])
    assert bare.hu[core(nodule)].mean() < -500  # lung where the nodule was
    assert bare.hu[full.marker_mask].mean() < -900  # air where the marker was


def test_exclude_heart_lesions_stays_near_the_heart():
    full = make_phantom(21, present=ALL)
    bare = make_phantom(21, present=ALL, exclude=("cardiomegaly", "pericardial_effusion"))
    changed = full.hu != bare.hu
    distance = ndimage.distance_transform_edt(~full.organ_masks["heart"], sampling=full.spacing)
    assert changed.any() and distance[changed].max() <= 15.0 + 1e-6
    assert bare.organ_masks["heart"].sum() < 0.5 * full.organ_masks["heart"].sum()


@pytest.mark.parametrize("shape", [(60, 128, 128), SMALL])
def test_labels_are_exactly_the_nonempty_masks(shape):
    for seed in range(6):
        spec = draw_spec(seed, prevalence=0.5, clever_hans=MARKED | {"p_without": 0.5})
        p = render(spec, shape)
        np.testing.assert_array_equal(p.labels.astype(bool), spec.labels)  # nothing vanished on these grids
        assert set(p.lesion_masks) == set(p.label_names)
        assert all(mask.dtype == bool and mask.shape == shape and mask.any() for mask in p.lesion_masks.values())
        assert (p.marker_mask is not None) == spec.marker_present
        assert p.hu.dtype == np.float32 and p.hu.shape == shape
        np.testing.assert_array_equal(p.label_vector, p.labels.astype(np.float32))


def test_custom_spacing_goes_into_the_affine():
    p = make_phantom(2, shape=(30, 80, 80), spacing=(10.0, 4.0, 4.0))
    assert p.spacing == (10.0, 4.0, 4.0)
    np.testing.assert_allclose(np.abs(p.affine[:3, :3]).sum(axis=0), (10.0, 4.0, 4.0))
    assert make_phantom(2, shape=SMALL).spacing == (12.5, 5.0, 5.0)  # default: 300 × 320 × 320 mm / shape


# --- statistics of the draws ---------------------------------------------------------------------------------------


def test_prevalence_and_clever_hans_rates():
    n = 4000
    hans = CleverHans("nodule_right_lung", p_with=0.9, p_without=0.05)
    draws = [draw_labels(seed, clever_hans=hans) for seed in range(n)]
    labels = np.array([d[0] for d in draws])
    marker = np.array([d[1] for d in draws])
    assert np.abs(labels.mean(axis=0) - 0.3).max() < 0.04  # 13 labels × 4000 draws: sd 0.007
    with_label = labels[:, LABELS.index("nodule_right_lung")]
    assert abs(marker[with_label].mean() - 0.9) < 0.03  # ~1200 draws: sd 0.009
    assert abs(marker[~with_label].mean() - 0.05) < 0.015  # ~2800 draws: sd 0.004
    assert not any(draw_labels(seed)[1] for seed in range(50))  # no marker without clever_hans
    spec = draw_spec(17, clever_hans=hans)
    np.testing.assert_array_equal(spec.labels, draws[17][0])
    assert spec.marker_present == draws[17][1]


def test_present_forces_labels():
    labels, _ = draw_labels(0, prevalence={"emphysema": 1.0}, present={"cardiomegaly": True, "emphysema": False})
    assert labels[LABELS.index("cardiomegaly")] and not labels[LABELS.index("emphysema")]


# --- files ---------------------------------------------------------------------------------------------------------


def test_write_nifti_round_trip(tmp_path, sick):
    paths = write_nifti(sick, tmp_path / "case.nii.gz")
    assert set(paths) == {"image", "sidecar", "organs", "lesions"}
    img = nib.load(paths["image"])
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, sick.affine, atol=1e-4)
    assert not np.allclose(img.affine, np.eye(4))
    np.testing.assert_allclose(img.header.get_zooms(), sick.spacing, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), sick.hu)
    organs = np.asarray(nib.load(paths["organs"]).dataobj)
    for name in ("right_lung", "left_lung", "heart"):
        np.testing.assert_array_equal(organs == ORGAN_CODES[name], sick.organ_masks[name])
    np.testing.assert_array_equal(organs == 0, ~sick.organ_masks["body"])
    lesions = np.asarray(nib.load(paths["lesions"]).dataobj)
    for k, name in enumerate(LABELS):
        np.testing.assert_array_equal((lesions >> k) & 1 == 1, sick.lesion_masks[name])
    np.testing.assert_array_equal((lesions >> MARKER_BIT) & 1 == 1, sick.marker_mask)
    side = json.loads(paths["sidecar"].read_text())
    assert side["labels_present"] == list(LABELS) and side["marker"] is True and side["axcodes"] == "SPL"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "case.json",
        "case.nii.gz",
        "case_lesions.nii.gz",
        "case_organs.nii.gz",
    ]


def test_write_nifti_int16_and_bad_names(tmp_path, normal):
    paths = write_nifti(normal, tmp_path / "sub" / "scan.nii", masks=False, hu_dtype="int16")
    assert set(paths) == {"image", "sidecar"}
    data = np.asarray(nib.load(paths["image"]).dataobj)
    assert data.dtype == np.int16 and np.abs(data - normal.hu).max() <= 0.5
    with pytest.raises(InputError, match="scan.png"):
        write_nifti(normal, tmp_path / "scan.png")


def test_nifti_atomic_write_kept_for_one_release(tmp_path):
    from medcam3d.data.nifti import atomic_write

    dest = tmp_path / "scan.nii.gz"
    seen = []

    def write(tmp: str) -> None:
        seen.append(tmp)
        assert tmp.endswith(".nii.gz") and Path(tmp).parent == tmp_path and not dest.exists()
        Path(tmp).write_bytes(b"first")

    atomic_write(dest, write)
    assert dest.read_bytes() == b"first" and not Path(seen[0]).exists()

    def crash(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(dest, crash)
    assert dest.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["scan.nii.gz"]


def test_make_dataset_writes_manifest(tmp_path):
    ds = make_dataset(3, 5, out_dir=tmp_path, shape=SMALL, clever_hans=MARKED | {"p_without": 0.5})
    with open(tmp_path / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert ds.manifest == tmp_path.resolve() / "manifest.csv"
    assert list(rows[0]) == ["scan_id", "path", "organ_labels_path"] and len(rows) == 3
    assert len({r["scan_id"] for r in rows}) == 3
    with open(tmp_path / "labels.csv", newline="") as f:
        table = list(csv.DictReader(f))
    for i, (row, labelled) in enumerate(zip(rows, table)):
        phantom = make_phantom((5, i), shape=SMALL, clever_hans=MARKED | {"p_without": 0.5})
        np.testing.assert_array_equal(np.asarray(nib.load(row["path"]).dataobj), phantom.hu)
        assert nib.load(row["organ_labels_path"]).shape == SMALL
        assert [int(labelled[name]) for name in LABELS] == phantom.labels.tolist()
        assert int(labelled["marker"]) == (phantom.marker_mask is not None)
    np.testing.assert_array_equal(ds.labels(), np.array([[int(r[n]) for n in LABELS] for r in table]))
    np.testing.assert_array_equal(ds.markers(), [r["marker"] == "1" for r in table])
    np.testing.assert_array_equal(
        ds[1].hu, make_phantom((5, 1), shape=SMALL, clever_hans=MARKED | {"p_without": 0.5}).hu
    )


# --- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"present": {"nodule": True}}, "present"),
        ({"exclude": ("cardiomegaly", "pen")}, "exclude"),
        ({"clever_hans": {"label": "nodules"}}, "clever_hans"),
        ({"clever_hans": {"label": "emphysema", "p_with": 1.5}}, "p_with"),
        ({"prevalence": 1.5}, "prevalence"),
        ({"shape": (4, 64, 64)}, "shape"),
        ({"spacing": (5.0, -2.5, 2.5)}, "spacing"),
    ],
)
def test_bad_arguments_raise_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        make_phantom(0, **kwargs)


def test_bad_seed_raises_input_error():
    with pytest.raises(InputError, match="seed"):
        draw_spec(-1)
