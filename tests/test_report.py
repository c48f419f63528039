"""`medcam3d report`: the (scan, class) table against the summaries, the self-contained HTML in headless Chromium,
escaping of hostile scan ids, privacy (no DICOM identifiers or paths), PDF/Parquet extras."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scan_files import phantom_to_dicom
from test_batch import SHAPE, SPACING, make_configs

from medcam3d.cli import main
from medcam3d.data import make_phantom, write_nifti

INJECT = "<script>alert(1)</script>"
INJECT2 = "\"><img src=x onerror=\"document.title='PWNED'\">"
PATIENT = ("DOE^JANE", "PID12345", "DOE_JANE")
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("report")
    cfg = make_configs(d / "cfg")["untrained"]
    rows = []
    for i, sid in enumerate((INJECT, INJECT2)):
        ph = make_phantom(20 + i, shape=SHAPE, spacing=SPACING,
                          present={"nodule_right_lung": True, "cardiomegaly": bool(i)}, prevalence=0.0)
        paths = write_nifti(ph, d / "scans" / f"case{i}.nii.gz")
        rows.append([sid, str(paths["image"]), str(paths["organs"])])
    dicom = d / "scans" / "DOE_JANE_PID12345" / "series"
    ph = make_phantom(30, shape=SHAPE, spacing=SPACING, prevalence=0.0)
    phantom_to_dicom(ph.hu, ph.affine, dicom)
    uids = set()
    for f in sorted(dicom.iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID = PATIENT[0], PATIENT[1]
        ds.save_as(f)
        uids.add(str(ds.SeriesInstanceUID))
    rows.append(["dicom-case", str(dicom), ""])
    rows.append(["missing-case", str(d / "scans" / "DOE_JANE_missing.nii.gz"), ""])
    manifest = d / "cohort.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scan_id", "path", "organ_labels_path"])
        w.writerows(rows)
    out = d / "batch"
    code = main(["batch", str(manifest), "--out", str(out), "--config", str(cfg), "--shard", "0/1", "--full-res",
                 "top-2", "--torch-threads", "1", "--quiet"])
    assert code == 3  # one bad row
    assert main(["report", str(out), "--quiet"]) == 0
    return {"out": out, "uids": uids, "root": d, "config": cfg}


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def text_of(html: str) -> str:
    """The page without its embedded images (base64 could contain any short string by chance)."""
    return re.sub(r"data:image/(?:png|jpeg);base64,[A-Za-z0-9+/=]+", "data:", html)


def test_table_has_one_row_per_scan_and_class_matching_the_summaries(batch):
    out = batch["out"]
    table = read_table(out / "cohort_table.csv")
    summaries = {}
    for folder in (out / "scans").iterdir():
        s = json.loads((folder / "summary.json").read_text())
        summaries[s["batch"]["scan_id"]] = s
    assert sorted(summaries) == sorted([INJECT, INJECT2, "dicom-case"])
    assert len(table) == sum(len(s["classes"]) for s in summaries.values()) == 3 * 13
    assert [(r["scan_id"], int(r["class_index"])) for r in table] == sorted(
        (sid, c["index"]) for sid, s in summaries.items() for c in s["classes"])
    for r in table:
        c = next(c for c in summaries[r["scan_id"]]["classes"] if c["index"] == int(r["class_index"]))
        assert r["label"] == c["label"] and float(r["score"]) == c["score"]
        assert float(r["probability"]) == c["probability"] and r["certificate"] == c["certificate"]
        assert float(r["completeness_residual"]) == c["completeness_residual"]
        for k in ("l2", "pearson", "top_overlap"):
            v = c["disagreement"][k]
            assert (r[k] == "") if not math.isfinite(v) else float(r[k]) == v
        assert [int(r[f"peak_hirescam_{a}"]) for a in "ijk"] == c["peak"]["hirescam"]["map_index"]
        shares = [r[f"share_hirescam_{o}"] for o in ("body", "right_lung", "left_lung", "heart", "spine", "ribs",
                                                      "unlabelled")]
        if r["scan_id"] == "dicom-case" or shares[0] == "":
            assert set(shares) == {""}  # no organ map, or no positive contribution
        else:
            assert sum(map(float, shares)) == pytest.approx(1.0, abs=1e-5)
    # the table is a pure function of the scans: writing it again gives the same bytes
    before = (out / "cohort_table.csv").read_bytes()
    assert main(["report", str(out), "--quiet"]) == 0
    assert (out / "cohort_table.csv").read_bytes() == before


def test_html_is_self_contained_escaped_and_private(batch):
    out = batch["out"]
    html = (out / "cohort_report.html").read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=&#34;document.title=&#39;PWNED&#39;&#34;&gt;" in html
    for url in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", html):
        assert url.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "#")), url
    assert "default-src 'none'" in html  # CSP: no script, no remote load even if something slipped through
    n_img = len(re.findall(r"<img class=\"montage\"", html))
    assert n_img == 2 * 3  # --montages 2 per scan (each scan has 2 full-resolution classes)
    text = text_of(html)
    table = (out / "cohort_table.csv").read_text()
    for secret in [*PATIENT, "CompressedSamples", str(batch["root"]), *batch["uids"]]:
        assert secret not in text and secret not in table, secret
    assert "missing-case" in text and "&lt;path&gt;" in text  # the bad row is listed, its path redacted
    # classes relying most on regions outside their allowed organs come first
    where = text[text.index('id="where"'):text.index('id="failures"')]
    order = re.findall(r'<tr(?: class="flag")?><td class="c">(?:<span class="tag">FLAG</span> )?([a-z_]+)</td>', where)
    means = {}
    for lab in {r["label"] for r in read_table(out / "cohort_table.csv")}:
        vals = [float(r["outside_allowed_hirescam"]) for r in read_table(out / "cohort_table.csv")
                if r["label"] == lab and r["outside_allowed_hirescam"]]
        means[lab] = sum(vals) / len(vals)
    assert order == sorted(means, key=lambda k: (-means[k], k))
    flagged = re.findall(r'<span class="tag">FLAG</span> ([a-z_]+)', where)
    assert flagged == [k for k in order if means[k] > 0.5]


def test_include_paths_shows_paths(batch, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(batch["out"], copy)
    assert main(["report", str(copy), "--include-paths", "--quiet"]) == 0
    rows = read_table(copy / "cohort_table.csv")
    assert {r["input_path"] for r in rows if r["scan_id"] == "dicom-case"} == {
        str(batch["root"] / "scans" / "DOE_JANE_PID12345" / "series")}


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                    reason="Debian chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(batch, tmp_path):
    from PIL import Image

    url = (batch["out"] / "cohort_report.html").resolve().as_uri()
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    r = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,900", url], capture_output=True, check=False,
                       timeout=120)
    assert shot.is_file(), r.stderr.decode()[-2000:]
    im = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert im.shape == (900, 1200)
    assert im.std() > 20 and (im < 200).mean() > 0.01  # text, tables and figures, not a blank page
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, timeout=120, check=False).stdout.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # the id is a text node
    assert "<script" not in dom.lower()  # no script element was created
    assert '<img src="x"' not in dom and "PWNED" not in dom.split("</title>")[0]
    assert "<title>medcam3d cohort report</title>" in dom


def test_report_of_a_batch_where_everything_failed(batch, tmp_path):
    import nibabel as nib

    tiny = tmp_path / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([2.5, 2.5, 5.0, 1.0])), str(tiny))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"scan_id,path\nmissing,{tmp_path / 'nope.nii.gz'}\ntiny,{tiny}\n")
    out = tmp_path / "b"
    assert main(["batch", str(manifest), "--out", str(out), "--config", str(batch["config"]), "--shard", "0/1",
                 "--quiet"]) == 3
    assert main(["report", str(out), "--quiet"]) == 0
    html = (out / "cohort_report.html").read_text()
    assert "0 scans finished" in html and "2 failed" in html and "too small" in html
    assert read_table(out / "cohort_table.csv") == []


def test_pdf_needs_weasyprint_and_says_so(batch, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "weasyprint", None)
    target = tmp_path / "r.html"
    assert main(["report", str(batch["out"]), "--pdf", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "weasyprint" in err and "medcam3d[pdf]" in err and err.count("\n") == 1
    assert not target.exists()


def test_pdf_when_weasyprint_is_installed(batch, tmp_path):
    pytest.importorskip("weasyprint")
    target = tmp_path / "r.html"
    assert main(["report", str(batch["out"]), "--pdf", "--out", str(target), "--quiet"]) == 0
    pdf = target.with_suffix(".pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(pdf) > 10_000


def test_parquet_table_when_pyarrow_is_installed(batch, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    copy = tmp_path / "b"
    shutil.copytree(batch["out"], copy)
    assert main(["report", str(copy), "--quiet"]) == 0
    table = pq.read_table(copy / "cohort_table.parquet").to_pylist()
    rows = read_table(copy / "cohort_table.csv")
    assert len(table) == len(rows)
    for a, b in zip(table, rows):
        assert a["scan_id"] == b["scan_id"] and a["score"] == float(b["score"])
        assert (a["l2"] is None) == (b["l2"] == "")


# --- map placement and the cam certificate (issue 14) -----------------------------------------------------------------
def scan_sections(html: str) -> dict[str, str]:
    """Each scan's section of the page (up to the next one; the last one runs to the page's end), by the scan id
    shown in its heading (as escaped in the HTML)."""
    parts = re.split(r'<div class="scan" id="[^"]*">', text_of(html))[1:]
    return {re.search(r"<h3>(.*?)</h3>", p, re.S)[1]: p for p in parts}


def test_placement_text_by_hand():
    from medcam3d.outputs import MapGeometryRecord
    from medcam3d.report.collect import placement_text

    g = MapGeometryRecord(kind="receptive", offset_voxels=[1.0, 32.0, 32.0], stride_voxels=[3.0, 8.0, 8.0])
    how = getattr(g, "source", None)
    expected_how = f"receptive ({how})" if how else "receptive (how found: not recorded)"
    assert placement_text(g) == f"{expected_how}: cell i of each axis at (1, 32, 32) + (3, 8, 8) × i network voxels"
    assert placement_text(MapGeometryRecord(kind="field")).endswith(": the field of view divided evenly")


def test_each_scan_section_names_its_map_placement(batch):
    out = batch["out"]
    sections = scan_sections((out / "cohort_report.html").read_text(encoding="utf-8"))
    assert len(sections) == 3
    for folder in (out / "scans").iterdir():
        s = json.loads((folder / "summary.json").read_text())
        g = s["map_geometry"]
        offset = ", ".join(f"{v:g}" for v in g["offset_voxels"])
        stride = ", ".join(f"{v:g}" for v in g["stride_voxels"])
        how = g.get("source") or "how found: not recorded"
        line = (f"Map placement: {g['kind']} ({how}): cell i of each axis at ({offset}) + ({stride}) × i network "
                "voxels.")
        sid = s["batch"]["scan_id"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        sid = sid.replace('"', "&#34;").replace("'", "&#39;")
        assert line in sections[sid], (sid, line)


def certify_cam(folder: Path) -> None:
    """Rewrite a scan's summary as a GAP + linear head's would be: certificate cam for every class, and the maps of
    HiResCAM and Grad-CAM identical (L2 0, Pearson 1, top-10 % overlap 1)."""
    path = folder / "summary.json"
    s = json.loads(path.read_text())
    s["certificate"]["kind"] = "cam"
    for c in s["classes"]:
        c["certificate"] = "cam"
        c["disagreement"].update({"l2": 0.0, "pearson": 1.0, "top_overlap": 1.0})
    path.write_text(json.dumps(s))


def test_cam_certificate_gives_one_line_instead_of_a_degenerate_comparison(batch, tmp_path):
    every = tmp_path / "every"
    shutil.copytree(batch["out"], every)
    for folder in (every / "scans").iterdir():
        certify_cam(folder)
    assert main(["report", str(every), "--quiet"]) == 0
    html = text_of((every / "cohort_report.html").read_text(encoding="utf-8"))
    section = html[html.index('id="disagreement"'):html.index('id="where"')]
    assert "HiResCAM and Grad-CAM coincide by proof for every scan here" in section
    assert "<table" not in section and "<img" not in section and "0.000" not in section
    for sid, part in scan_sections(html).items():
        assert "HiResCAM and Grad-CAM coincide by proof for this scan (certificate <b>cam</b>)" in part, sid
        assert "<th>L2</th>" not in part and "top-10 % overlap" not in part
    assert "top row HiResCAM, bottom row Grad-CAM" not in html

    # one scan of three with the cam certificate: the comparison stands for the other two, and says what it left out
    mixed = tmp_path / "mixed"
    shutil.copytree(batch["out"], mixed)
    cam = next(f for f in (mixed / "scans").iterdir()
               if json.loads((f / "summary.json").read_text())["batch"]["scan_id"] == "dicom-case")
    certify_cam(cam)
    assert main(["report", str(mixed), "--quiet"]) == 0
    html = text_of((mixed / "cohort_report.html").read_text(encoding="utf-8"))
    section = html[html.index('id="disagreement"'):html.index('id="where"')]
    table = read_table(mixed / "cohort_table.csv")
    left_out = sum(r["scan_id"] == "dicom-case" for r in table)
    assert left_out == 13 and f"Left out: {left_out} (scan, class) pairs with certificate <b>cam</b>" in section
    rows = re.findall(r'<tr><td class="c">([a-z_]+)</td><td>(\d+)</td>', section)
    assert len(rows) == 13
    for label, n in rows:  # per class, the scans counted are the two without the certificate
        assert int(n) == sum(r["label"] == label and r["scan_id"] != "dicom-case" and r["top_overlap"] != ""
                             for r in table)
    parts = scan_sections(html)
    assert "coincide by proof for this scan" in parts["dicom-case"] and "<th>L2</th>" not in parts["dicom-case"]
    assert all("<th>L2</th>" in p and "coincide" not in p for sid, p in parts.items() if sid != "dicom-case")
