"""summary.json's typed, versioned schema (medcam3d.outputs): round trip, old unversioned files, unknown keys,
newer versions refused, and the certificate serialised by ``Certificate.to_dict``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from core_nets import ConvGAP

from medcam3d import Explainer
from medcam3d.errors import InputError
from medcam3d.outputs import (
    SCHEMA_VERSION,
    BatchRecord,
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
    load_summary,
    summary_from_dict,
    write_summary,
)

# What medcam3d wrote before the schema had a version (the format of `Session._summary` at that time, written out
# by hand): two classes, two methods, a batch scan with organ shares.
OLD_SUMMARY = {
    "medcam3d_version": "0.1.0",
    "created": "2024-05-01T12:00:00+00:00",
    "input": {
        "path": "/data/case1.nii.gz",
        "sha256": "ab" * 32,
        "meta": {"Modality": "CT", "SliceThickness": 2.5},
        "shape": [64, 64, 24],
        "spacing_mm": [2.5, 2.5, 5.0],
        "axcodes": "LPS",
        "affine": [[-2.5, 0.0, 0.0, 80.0], [0.0, -2.5, 0.0, 80.0], [0.0, 0.0, 5.0, -60.0], [0.0, 0.0, 0.0, 1.0]],
    },
    "config": {"name": "demo_axialnet", "path": "/cfg/demo.yaml", "sha256": "cd" * 32},
    "model": {
        "spec": {"name": "axialnet", "n_outputs": 2},
        "weights": "/cfg/demo.pt",
        "weights_sha256": "ef" * 32,
        "target_layer": "conv2d.6",
        "synthetic_data_only": True,
        "card": {"synthetic_data_only": True, "training": {"n_train": 4}},
    },
    "network_grid": {"shape": [60, 128, 128],
                     "affine": [[0.0, 0.0, -2.5, 160.0], [0.0, -2.5, 0.0, 160.0], [5.0, 0.0, 0.0, -150.0],
                                [0.0, 0.0, 0.0, 1.0]]},
    "map_shape": [20, 8, 8],
    "map_affine": [[0.0, 0.0, -40.0, 141.25], [0.0, -40.0, 0.0, 141.25], [15.0, 0.0, 0.0, -145.0],
                   [0.0, 0.0, 0.0, 1.0]],
    "map_geometry": {"kind": "field", "offset_voxels": [1.0, 7.5, 7.5], "stride_voxels": [3.0, 16.0, 16.0]},
    "methods": ["hirescam", "gradcam"],
    "device": "cpu",
    "versions": {"python": "3.11.7", "torch": "2.3.0", "numpy": "1.26.4"},
    "timings_s": {"read": 0.05, "preprocess": 0.2, "explain": 1.5, "explain.forward": 0.4, "write": 2.25},
    "certificate": {
        "kind": "affine-head",
        "exact": True,
        "summary": "Affine head: everything after the explained layer is affine in its activations.",
        "head": "fx",
        "tolerance": 1.2e-4,
        "n_probes": 2,
        "jacobian_test": "sketch",
        "max_jacobian_difference": 3.5e-07,
        "max_probe_residual": 1.0e-08,
        "notes": [],
    },
    "probability": "sigmoid",
    "threshold": 0.5,
    "classes": [
        {"index": 0, "label": "nodule_right_lung", "score": 1.25, "probability": 0.777, "predicted": True,
         "full_resolution": True, "certificate": "affine-head", "completeness_residual": 2.0e-06,
         "relative_residual": 1.0e-07, "bias": -0.5,
         "peak": {"hirescam": {"map_index": [3, 4, 5], "value": 0.75, "world_ras_mm": [-20.0, 10.5, -100.0]},
                  "gradcam": {"map_index": [3, 4, 6], "value": 0.5, "world_ras_mm": [-60.0, 10.5, -100.0]}},
         "disagreement": {"methods": ["hirescam", "gradcam"], "l2": 0.25, "pearson": 0.5, "top_overlap": 0.375}},
        {"index": 1, "label": "cardiomegaly", "score": -2.0, "probability": 0.119, "predicted": False,
         "full_resolution": False, "certificate": "affine-head", "completeness_residual": -1.0e-06,
         "relative_residual": -5.0e-08, "bias": 0.25,
         "peak": {"hirescam": {"map_index": [0, 0, 0], "value": -0.125, "world_ras_mm": None},
                  "gradcam": {"map_index": [1, 2, 3], "value": 0.0625, "world_ras_mm": [100.0, 60.0, -130.0]}},
         "disagreement": {"methods": ["hirescam", "gradcam"], "l2": 1.5, "pearson": -0.25, "top_overlap": 0.0}},
    ],
    "files": ["lowres_gradcam.nii.gz", "lowres_hirescam.nii.gz", "scores.csv", "summary.json"],
    "batch": {"scan_id": "case 1", "folder": "case_1-0123456789", "run_id": "20240501T120000Z-42-abcdef"},
    "organ_shares": {"organs": ["lung", "unlabelled"], "methods": ["hirescam", "gradcam"],
                     "classes": {"nodule_right_lung": {"hirescam": {"lung": 0.75, "unlabelled": 0.25},
                                                       "gradcam": {"lung": 0.5, "unlabelled": 0.5}}},
                     "codes": {"lung": 2}, "resolution": "feature", "map_geometry": "field", "seconds": 0.01},
}


def contains(big: object, small: object) -> bool:
    """Every key of ``small`` (recursively) is in ``big`` with the same value."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and contains(big[k], v) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(big) == len(small) and all(map(contains, big, small))
    return big == small


def hand_made() -> Summary:
    """A summary built from its records, as the pipeline does."""
    return Summary(
        medcam3d_version="0.2.0",
        created="2025-01-02T03:04:05+00:00",
        input=InputRecord(path="/scans/a.nii.gz", sha256="12" * 32, meta={"Modality": "CT"}, shape=[4, 5, 6],
                          spacing_mm=[1.0, 1.0, 2.0], axcodes="RAS",
                          affine=[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1.0]]),
        config=ConfigRecord(name="mine", path="/c.yaml", sha256=None),
        model=ModelRecord(spec={"name": "resnet"}, weights=None, target_layer="layer4", card=None),
        network_grid=GridRecord(shape=[8, 8, 8], affine=[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0],
                                                         [0, 0, 0, 1.0]]),
        map_shape=[2, 2, 2],
        map_affine=None,
        map_geometry=MapGeometryRecord(kind="receptive", offset_voxels=[1.0, 1.0, 1.0], stride_voxels=[4.0, 4, 4]),
        methods=["hirescam"],
        device="cuda:0",
        versions={"python": "3.12.1"},
        timings_s={"explain": 0.5},
        certificate=CertificateRecord(kind="none", exact=False, summary="Not proven.", head="rerun", tolerance=1e-4,
                                      n_probes=2, jacobian_test="per-class", max_jacobian_difference=0.5,
                                      max_probe_residual=0.25, notes=["a note"], extra={"classes": [3]}),
        threshold=0.25,
        classes=[ClassRecord(index=3, label="x", score=0.5, probability=0.625, predicted=True, full_resolution=False,
                             certificate="none", completeness_residual=0.125, relative_residual=0.0625, bias=1.0,
                             peak={"hirescam": PeakRecord(map_index=[1, 0, 1], value=2.0, world_ras_mm=None)})],
        files=["scores.csv", "summary.json"],
        batch=BatchRecord(scan_id="s1", folder="s1", run_id="r"),
        extra={"demo": {"seed": 7}},
    )


def test_round_trip_write_then_load_is_equal(tmp_path):
    s = hand_made()
    path = write_summary(s, tmp_path / "summary.json")
    assert load_summary(path) == s
    assert load_summary(tmp_path) == s  # the folder works too
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == SCHEMA_VERSION == 1
    assert raw["demo"] == {"seed": 7} and "extra" not in raw  # extra sections are top-level keys
    assert "disagreement" not in raw["classes"][0]  # one method: no disagreement key (as before versioning)
    assert "organ_shares" not in raw and raw["batch"]["scan_id"] == "s1"
    assert raw["certificate"]["classes"] == [3] and raw["certificate"]["kind"] == "none"


def test_old_summary_without_version_loads(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(OLD_SUMMARY, indent=2))
    s = load_summary(tmp_path / "summary.json")
    assert s.schema_version == SCHEMA_VERSION
    assert s.methods == ["hirescam", "gradcam"] and s.medcam3d_version == "0.1.0"
    assert s.input.path == "/data/case1.nii.gz" and s.input.meta == {"Modality": "CT", "SliceThickness": 2.5}
    assert s.config.name == "demo_axialnet" and s.model.target_layer == "conv2d.6" and s.model.synthetic_data_only
    assert s.network_grid.shape == [60, 128, 128] and s.map_shape == [20, 8, 8]
    assert s.map_geometry == MapGeometryRecord(kind="field", offset_voxels=[1.0, 7.5, 7.5],
                                               stride_voxels=[3.0, 16.0, 16.0])
    assert s.certificate is not None and s.certificate.kind == "affine-head" and s.certificate.exact
    assert s.certificate.max_jacobian_difference == 3.5e-07 and s.certificate.n_probes == 2
    assert s.threshold == 0.5 and s.timings_s["write"] == 2.25
    nodule, cardio = s.classes
    assert (nodule.index, nodule.label, nodule.score, nodule.predicted, nodule.full_resolution) == (
        0, "nodule_right_lung", 1.25, True, True)
    assert nodule.peak["hirescam"] == PeakRecord(map_index=[3, 4, 5], value=0.75, world_ras_mm=[-20.0, 10.5, -100.0])
    assert nodule.disagreement == DisagreementRecord(methods=["hirescam", "gradcam"], l2=0.25, pearson=0.5,
                                                     top_overlap=0.375)
    assert cardio.peak["hirescam"].world_ras_mm is None and cardio.bias == 0.25 and not cardio.predicted
    assert s.batch == BatchRecord(scan_id="case 1", folder="case_1-0123456789", run_id="20240501T120000Z-42-abcdef")
    assert s.organ_shares is not None and s.organ_shares["classes"]["nodule_right_lung"]["hirescam"]["lung"] == 0.75
    # written again, it holds every key and value it had, plus the version
    again = s.to_dict()
    assert contains(again, OLD_SUMMARY)
    assert set(again) - set(OLD_SUMMARY) == {"schema_version"}


def test_unknown_keys_are_ignored(tmp_path):
    newer = copy.deepcopy(OLD_SUMMARY)
    newer["schema_version"] = SCHEMA_VERSION
    newer["placement"] = {"kind": "declared"}  # a field a later release adds
    newer["classes"][0]["target"] = {"kind": "logit"}
    newer["classes"][0]["peak"]["hirescam"]["confidence"] = 0.5
    newer["model"]["assumptions"] = ["eval mode"]
    newer["certificate"]["sketch_seed"] = 11
    s = summary_from_dict(newer)
    base = summary_from_dict(OLD_SUMMARY)
    assert s.classes == base.classes and s.model == base.model and s.input == base.input
    assert s.extra == {"placement": {"kind": "declared"}}  # top-level: kept, uninterpreted
    assert s.certificate is not None and s.certificate.extra == {"sketch_seed": 11}
    out = s.to_dict()
    assert out["placement"] == {"kind": "declared"} and "target" not in out["classes"][0]
    assert "assumptions" not in out["model"] and "confidence" not in out["classes"][0]["peak"]["hirescam"]


def test_newer_or_foreign_summaries_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "summary.json"
    cases = [
        ({**OLD_SUMMARY, "schema_version": SCHEMA_VERSION + 1}, "newer than this medcam3d reads"),
        ({k: v for k, v in OLD_SUMMARY.items() if k != "classes"}, "missing 'classes'"),
        ({**OLD_SUMMARY, "methods": "hirescam"}, "'methods' should be list"),
        ({**OLD_SUMMARY, "classes": [{**OLD_SUMMARY["classes"][0], "score": "high"}]}, "'score' should be float"),
        ([1, 2, 3], "not a JSON object"),
    ]
    for doc, message in cases:
        path.write_text(json.dumps(doc))
        with pytest.raises(InputError, match=message) as err:
            load_summary(path)
        assert str(path) in str(err.value)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_summary(path)
    with pytest.raises(InputError, match="unreadable"):
        load_summary(tmp_path / "nowhere" / "summary.json")


def test_sections_added_by_writers_replace_and_extend(tmp_path):
    s = hand_made().with_sections({"organ_shares": {"organs": ["lung"]}, "batch": {"scan_id": "s2"}, "k": 1})
    assert s.organ_shares == {"organs": ["lung"]} and s.batch == BatchRecord(scan_id="s2")
    assert s.extra == {"demo": {"seed": 7}, "k": 1}
    assert hand_made().with_sections(None) == hand_made()


def test_certificate_record_is_certificate_to_dict_plus_maxima():
    torch.manual_seed(0)
    model = ConvGAP(nd=3, classes=3)
    exp = Explainer(model, "act")(torch.randn(1, 1, 4, 5, 6))
    cert = exp.certificate
    record = CertificateRecord.from_certificate(cert).to_dict()
    expected = cert.to_dict()
    assert contains(record, json.loads(json.dumps(expected)))  # every key Certificate.to_dict writes, unchanged
    assert record["max_jacobian_difference"] == pytest.approx(max(expected["jacobian_difference"]))
    probe = expected["probe_residual"]
    assert record["max_probe_residual"] == pytest.approx(max(probe) if probe else 0.0)
    assert record["kind"] == "cam" and record["exact"] is True  # a GAP + linear head


def test_pipeline_names_moved_in_this_refactor_keep_working():
    import medcam3d.files
    import medcam3d.methods
    import medcam3d.outputs
    import medcam3d.pipeline
    import medcam3d.selection

    assert medcam3d.pipeline.sha256_of is medcam3d.files.sha256_of
    assert medcam3d.pipeline.select_classes is medcam3d.selection.select_classes
    assert medcam3d.pipeline.DEFAULT_METHODS is medcam3d.methods.DEFAULT_METHODS == ("hirescam", "gradcam")
    assert medcam3d.outputs.write_json is medcam3d.files.write_json_atomic


def test_write_json_reexport_still_writes_atomically(tmp_path):
    from medcam3d.outputs import write_json

    p = write_json({"a": float("nan")}, tmp_path / "x.json")
    assert Path(p).read_text() == '{\n  "a": NaN\n}\n'
    assert sorted(q.name for q in tmp_path.iterdir()) == ["x.json"]
