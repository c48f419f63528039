"""`medcam3d report` on a batch of segmentation scans (issue 19): targets where classes are shown today.

The batch folder is written by hand here, following the file contract (summary.json's ``task``, ``targets``;
``targets.csv``; montages named by target index and name), so that every expected number -- components per class,
the largest component, the rows of the tables -- is known without medcam3d computing it. The same report on a real
`medcam3d batch` of a segmentation model is checked in tests/test_seg_batch.py.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcam3d.cli import main

TARGET_FIELDS = ["target", "name", "class", "label", "region", "component", "voxels", "centroid_x_mm",
                 "centroid_y_mm", "centroid_z_mm", "score"]
# per scan: (class channel, class name, component rank, voxels, centroid RAS mm, score)
SCANS = {
    "case-a": [(1, "mass", 1, 224, (-36.25, -32.5, -15.0), 150.25), (1, "mass", 2, 60, (18.75, 20.0, 10.0), 40.5),
               (2, "effusion", 1, 220, (12.5, -42.5, -12.5), 99.0)],
    "case-b": [(2, "effusion", 1, 512, (30.0, 10.0, 5.0), 310.0), (2, "effusion", 2, 8, (-5.0, 0.0, 0.0), 2.5),
               (2, "effusion", 3, 3, (1.0, 2.0, 3.0), -1.25), (1, "mass", 1, 17, (0.5, 0.25, -0.125), 7.0)],
    # the whole predicted mask of a class as one target (region "predicted"): a region, not a component
    "case-c": [(1, "mass", None, 90, (4.0, 5.0, 6.0), 12.0)],
}
# organ shares of case-a, keyed by target name as the batch writes them: "mass" may rest on the lungs only
SHARES_A = {"mass component 1": 0.2, "mass component 2": 0.6, "effusion component 1": 0.1}


def target_name(label: str, component: int | None) -> str:
    return f"{label} component {component}" if component is not None else f"{label} predicted"


def stem(index: int, name: str) -> str:
    return f"{index:03d}_{name.replace(' ', '_')}"


def write_scan(folder: Path, scan_id: str, targets: list[tuple]) -> None:
    """A finished scan of a segmentation batch: summary.json, targets.csv, a montage per target, the done
    marker."""
    folder.mkdir(parents=True)
    records = [{"index": k, "name": target_name(lab, comp), "cls": cls, "label": lab,
                "region": "component" if comp is not None else "predicted", "component": comp, "voxels": vox,
                "centroid_mm": list(xyz), "score": score}
               for k, (cls, lab, comp, vox, xyz, score) in enumerate(targets)]
    summary = {
        "schema_version": 1, "medcam3d_version": "test", "config": {"name": "seg-test"},
        "input": {"path": f"/data/{scan_id}.nii.gz", "shape": [40, 48, 16], "spacing_mm": [2.5, 2.5, 5.0]},
        "methods": ["hirescam", "gradcam"], "certificate": {"kind": "none", "summary": "no proof for this head"},
        "classes": [{"index": r["index"], "label": r["name"], "score": r["score"], "probability": 0.8,
                     "predicted": True, "full_resolution": True, "certificate": "none",
                     "completeness_residual": None, "relative_residual": None,
                     "disagreement": {"methods": ["hirescam", "gradcam"], "l2": 0.5, "pearson": 0.25,
                                      "top_overlap": 0.75}} for r in records],
        "task": "segmentation", "targets": records, "segmentation": "segmentation.nii.gz",
        "segmentation_labels": {"1": "mass", "2": "effusion"}, "batch": {"scan_id": scan_id, "folder": folder.name},
        "notes": ["effusion: 1 smallest component(s) beyond max_targets=3 dropped"] if scan_id == "case-b" else None,
    }
    if scan_id == "case-a":
        summary["organ_shares"] = {"organs": ["lung", "unlabelled"], "methods": ["hirescam"], "classes": {
            name: {"hirescam": {"lung": 1 - out, "unlabelled": out}, "allowed": ["lung"],
                   "outside_allowed": {"hirescam": out}} for name, out in SHARES_A.items()}}
    (folder / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if v is not None}))
    with open(folder / "targets.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TARGET_FIELDS)
        for r in records:
            w.writerow([r["index"], r["name"], r["cls"], r["label"], r["region"],
                        "" if r["component"] is None else r["component"], r["voxels"], *r["centroid_mm"], r["score"]])
    for r in records:
        png = folder / f"montage_{stem(r['index'], r['name'])}.png"
        Image.fromarray(np.full((40, 120, 3), 40 * r["index"], np.uint8)).save(png)
    (folder / ".done").write_text(json.dumps({"scan_id": scan_id}))


@pytest.fixture(scope="module")
def seg_batch(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("segreport") / "batch"
    for scan_id, targets in SCANS.items():
        write_scan(out / "scans" / scan_id, scan_id, targets)
    assert main(["report", str(out), "--quiet", "--montages", "2"]) == 0
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def text_of(html: str) -> str:
    return re.sub(r"data:image/(?:png|jpeg);base64,[A-Za-z0-9+/=]+", "data:", html)


def scan_sections(html: str) -> dict[str, str]:
    parts = re.split(r'<div class="scan" id="[^"]*">', text_of(html))[1:]
    return {re.search(r"<h3>(.*?)</h3>", p, re.S)[1]: p for p in parts}


def cells(row_html: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row_html)]


def test_cohort_table_rows_are_the_targets_csv_rows(seg_batch):
    table = read_csv(seg_batch / "cohort_table.csv")
    header = list(table[0])
    assert header[:11] == ["scan_id", "class_index", "label", "target_class", "class_label", "region", "component",
                           "voxels", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]
    expected = []
    for scan_id in sorted(SCANS):
        for r in read_csv(seg_batch / "scans" / scan_id / "targets.csv"):
            expected.append([scan_id, r["target"], r["name"], r["class"], r["label"], r["region"], r["component"],
                             r["voxels"], *(repr(float(r[f"centroid_{a}_mm"])) for a in "xyz"),
                             repr(float(r["score"]))])
    got = [[t[c] for c in header[:11]] + [t["score"]] for t in table]
    assert got == expected and len(got) == 3 + 4 + 1


def test_targets_per_scan_counts_components_and_the_largest(seg_batch):
    rows = read_csv(seg_batch / "cohort_targets.csv")
    assert list(rows[0]) == ["scan_id", "class_label", "targets", "components", "largest_voxels", "total_voxels"]
    # by hand from SCANS; classes in first-seen order over the cohort (mass, then effusion)
    assert [list(r.values()) for r in rows] == [
        ["case-a", "mass", "2", "2", "224", "284"], ["case-a", "effusion", "1", "1", "220", "220"],
        ["case-b", "mass", "1", "1", "17", "17"], ["case-b", "effusion", "3", "3", "512", "523"],
        ["case-c", "mass", "1", "0", "", "90"]]
    assert (seg_batch / "cohort_targets.parquet").is_file() == (seg_batch / "cohort_table.parquet").is_file()


def test_each_scan_section_lists_its_targets_with_montages_through_centroids(seg_batch):
    html = (seg_batch / "cohort_report.html").read_text(encoding="utf-8")
    sections = scan_sections(html)
    assert sorted(sections) == sorted(SCANS)
    for scan_id, part in sections.items():
        table = part[part.index('<table class="targets">'):]
        table = table[:table.index("</table>")]
        rows = [cells(r) for r in re.findall(r"<tr>(<td.*?)</tr>", table)]
        expected = [[r["name"], r["label"], r["component"], r["voxels"],
                     ", ".join(f"{float(r[f'centroid_{a}_mm']):.1f}" for a in "xyz"), f"{float(r['score']):.3f}",
                     "none"]
                    for r in read_csv(seg_batch / "scans" / scan_id / "targets.csv")]
        assert rows == expected, scan_id
        assert "top findings" not in part and "Predicted positive" not in part
        # --montages 2: the first two targets in their order (largest component first within a class)
        shown = re.findall(r'<img class="montage" alt="montage ([^"]+)"', part)
        assert shown == [r[0] for r in expected[:2]]
        assert "slices through its centroid" in part
    assert "Targets: mass: 2 components, largest 224 voxels; effusion: 1 component, largest 220 voxels." in \
        sections["case-a"]
    assert "Targets: mass: 1 component, largest 17 voxels; effusion: 3 components, largest 512 voxels." in \
        sections["case-b"]
    assert "Targets: mass: 1 region." in sections["case-c"]
    assert "Note: effusion: 1 smallest component(s) beyond max_targets=3 dropped" in sections["case-b"]


def test_cohort_pages_group_targets_by_class(seg_batch):
    html = text_of((seg_batch / "cohort_report.html").read_text(encoding="utf-8"))
    assert "8 (scan, target) rows" in html and "one row per scan and target" in html
    classes = html[html.index('<table class="seg-classes">'):]
    classes = classes[:classes.index("</table>")]
    rows = {c[0]: c[1:] for c in (cells(r) for r in re.findall(r"<tr>(<td.*?)</tr>", classes))}
    # mass: 3 scans, 4 targets (2 + 1 + 1), components per scan 2, 1, 0 (case-c's mask is one region, not a
    # component); each scan's largest component 224 and 17 (case-c has none): median 120.5; scores mean
    # (150.25 + 40.5 + 7 + 12) / 4 = 52.4375
    assert rows["mass"][:6] == ["3", "4", "1.00", "2", "120", "52.438"]
    # effusion: 2 scans, 4 targets, components 1 and 3, largest 220 and 512 (median 366), scores
    # (99 + 310 + 2.5 - 1.25) / 4 = 102.5625
    assert rows["effusion"][:6] == ["2", "4", "2.00", "3", "366", "102.562"]
    per_scan = html[html.index('<table class="per-scan">'):]
    per_scan = [cells(r) for r in re.findall(r"<tr>(<td.*?)</tr>", per_scan[:per_scan.index("</table>")])]
    assert per_scan == [["case-a", "2 (224 vox.)", "1 (220 vox.)"], ["case-b", "1 (17 vox.)", "3 (512 vox.)"],
                        ["case-c", "1 region", "–"]]
    # disagreement per class (every target's top-10 % overlap is 0.75)
    section = html[html.index('id="disagreement"'):html.index('id="where"')]
    assert re.findall(r'<tr><td class="c">([a-z]+)</td><td>(\d+)</td>', section) == [("mass", "4"), ("effusion", "4")]
    # where the model looks, per class: case-a's mass targets rest outside the lungs 20 % and 60 %: mean 40 %
    where = html[html.index('id="where"'):html.index('id="scans"')]
    found = dict(re.findall(r'<td class="c">(?:<span class="tag">FLAG</span> )?([a-z]+)</td><td class="c">lung</td>'
                            r"<td>(\d+) %</td>", where))
    assert found == {"mass": "40", "effusion": "10"}


def test_a_classification_batch_has_no_target_columns(tmp_path):
    """A classification scan's rows keep exactly the former columns (no segmentation columns appear)."""
    from medcam3d.report.collect import SEGMENTATION_COLUMNS, TABLE_COLUMNS, collect, table_rows

    folder = tmp_path / "b" / "scans" / "x"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "methods": ["hirescam"], "classes": [{"index": 0, "label": "c", "score": 1.0, "probability": 0.7,
                                              "predicted": True, "full_resolution": False}]}))
    (folder / ".done").write_text("{}")
    cohort = collect(tmp_path / "b")
    cols, rows = table_rows(cohort)
    assert not cohort.segmentation and cols[:len(TABLE_COLUMNS)] == list(TABLE_COLUMNS)
    assert not set(SEGMENTATION_COLUMNS) & set(cols) and rows[0]["label"] == "c"
