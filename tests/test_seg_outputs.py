"""The segmentation part of the output-folder contract (SEG_CONTRACT.md): TargetRecord, the summary's new fields,
targets.csv."""

from __future__ import annotations

import csv
import json
import math

import pytest

from medcam3d.errors import InputError
from medcam3d.outputs import (
    TARGET_FIELDS,
    ClassRecord,
    Summary,
    TargetRecord,
    load_summary,
    read_targets_csv,
    summary_from_dict,
    write_summary,
    write_targets_csv,
)


def _records() -> list[TargetRecord]:
    return [
        TargetRecord(index=0, name="mass component 1", cls=2, label="mass", region="component", component=1,
                     voxels=27, centroid_mm=[-10.5, 3.25, 100.0], score=12.125),
        TargetRecord(index=1, name="nodule predicted", cls=1, label="nodule", region="predicted", component=None,
                     voxels=1, centroid_mm=[0.0, 0.0, 0.0], score=-0.5),
        TargetRecord(index=2, name="box", cls=1, label="nodule", region="box", score=3.0),
    ]


def test_targets_csv_columns_and_round_trip(tmp_path):
    path = write_targets_csv(_records(), tmp_path / "targets.csv")
    rows = list(csv.reader(path.read_text().splitlines()))
    assert rows[0] == list(TARGET_FIELDS) == ["target", "name", "class", "label", "region", "component", "voxels",
                                               "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "score"]
    assert rows[1] == ["0", "mass component 1", "2", "mass", "component", "1", "27", "-10.5", "3.25", "100", "12.125"]
    assert rows[3] == ["2", "box", "1", "nodule", "box", "", "", "", "", "", "3"]
    assert read_targets_csv(path) == _records()


def test_targets_csv_reader_refuses_other_files(tmp_path):
    p = tmp_path / "targets.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="targets.csv"):
        read_targets_csv(p)


def _summary(**kw) -> Summary:
    cls = ClassRecord(index=0, label="mass component 1", score=12.125, probability=math.nan, predicted=True,
                      full_resolution=True)
    return Summary(methods=["hirescam"], classes=[cls], **kw)


def test_summary_segmentation_fields_round_trip(tmp_path):
    s = _summary(task="segmentation", targets=_records(), segmentation="segmentation.nii.gz",
                 segmentation_labels={"1": "nodule", "2": "mass"})
    write_summary(s, tmp_path / "summary.json")
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["task"] == "segmentation"
    assert data["targets"][0] == {"index": 0, "name": "mass component 1", "cls": 2, "label": "mass",
                                  "region": "component", "component": 1, "voxels": 27,
                                  "centroid_mm": [-10.5, 3.25, 100.0], "score": 12.125}
    back = load_summary(tmp_path)
    assert back.targets == _records()
    assert back.segmentation == "segmentation.nii.gz"
    assert back.segmentation_labels == {"1": "nodule", "2": "mass"}
    assert math.isnan(back.classes[0].probability)


def test_classification_summary_keeps_old_shape():
    """Old files (no task, no targets) load as classification and are written back with the same keys."""
    old = {"schema_version": 1, "methods": ["hirescam"],
           "classes": [{"index": 0, "label": "a", "score": 1.0, "probability": 0.7, "predicted": True,
                        "full_resolution": False}]}
    s = summary_from_dict(old)
    assert s.task == "classification" and s.targets is None and s.segmentation is None
    assert not {"task", "targets", "segmentation", "segmentation_labels"} & set(s.to_dict())
