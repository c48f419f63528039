"""Issue 18 on the command line: refusals exit 2 with one line, write nothing and leave the inputs as they were;
assumptions and warnings are one line on stderr, in summary.json and in the report, and the run completes.

Full runs are few (each loads the demo model and explains a small phantom): a two-series MR DICOM folder explained
with --ignore-modality (series note + modality warning), and a brain-like NIfTI (modality warning).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from scan_files import CT5N, phantom_to_dicom, save_nifti

from medcam3d import Explainer
from medcam3d.cli import main
from medcam3d.config import load_config
from medcam3d.data import make_phantom
from medcam3d.outputs import load_summary

SHAPE = (24, 64, 64)
SPACING = (5.0, 2.5, 2.5)


def sha(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def refused(capsys, argv: list[str], inputs: list[Path], outs: list[Path], what: str) -> str:
    """Run ``medcam3d argv``; assert exit 2, one stderr line containing ``what``, nothing written, inputs kept."""
    before = {p: sha(p) for p in inputs}
    outs_before = {p: p.exists() for p in outs}
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("medcam3d: error: ") and what in lines[0], err
    for p in outs:
        assert p.exists() == outs_before[p]
        assert not list(p.parent.glob(f".{p.name}.*"))  # no temporary folder left either
    for p, digest in before.items():
        assert sha(p) == digest
    return lines[0]


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(11, shape=SHAPE, spacing=SPACING, present={"nodule_right_lung": True}, prevalence=0.0)


@pytest.fixture(scope="module")
def ct_nifti(tmp_path_factory, phantom) -> Path:
    p = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    save_nifti(p, phantom.hu.astype(np.float32), phantom.affine)
    return p


@pytest.fixture(scope="module")
def two_series_mr(tmp_path_factory, phantom) -> tuple[Path, str, str]:
    """A folder with the phantom as a 24-slice MR series and its first 10 slices as a CT series."""
    d = tmp_path_factory.mktemp("dicom") / "two"
    phantom_to_dicom(phantom.hu, phantom.affine, d / "mr")
    phantom_to_dicom(phantom.hu[:10], phantom.affine, d / "ct")
    for f in (d / "mr").iterdir():
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    for sub in ("mr", "ct"):
        for f in (d / sub).iterdir():
            f.rename(d / f"{sub}_{f.name}")
        (d / sub).rmdir()
    mr_uid = str(pydicom.dcmread(next(d.glob("mr_*"))).SeriesInstanceUID)
    ct_uid = str(pydicom.dcmread(next(d.glob("ct_*"))).SeriesInstanceUID)
    return d, mr_uid, ct_uid


# --- refusals -------------------------------------------------------------------------------------------------
def test_labels_not_matching_the_model_outputs_are_refused(tmp_path, capsys, ct_nifti):
    """The demo config's 13 labels on an AxialNet without an n_outputs key (80 outputs by default)."""
    text = Path(load_config("demo_axialnet").path).read_text()
    text = text.replace("  n_outputs: 13\n", "").replace("weights: package:medcam3d/weights/demo_axialnet.pt",
                                                          "weights: null")
    cfg = tmp_path / "eighty.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    line = refused(capsys, ["explain", str(ct_nifti), "--config", str(cfg), "--out", str(out), "--quiet"],
                   [ct_nifti, cfg], [out], "labels: the config names 13 classes but the model gives 80 outputs")
    assert str(cfg) in line


@pytest.mark.parametrize("device", ["tpu9", "xla", "cuda:x"])
def test_unknown_device_is_one_line_exit_2(tmp_path, capsys, ct_nifti, device):
    out = tmp_path / "out"
    refused(capsys, ["explain", str(ct_nifti), "--device", device, "--out", str(out), "--quiet"], [ct_nifti], [out],
            f"--device {device!r}")
    refused(capsys, ["batch", str(ct_nifti.parent), "--device", device, "--out", str(tmp_path / "b"), "--quiet"],
            [ct_nifti], [tmp_path / "b"], f"--device {device!r}")


def test_evaluate_out_is_checked_before_any_work(tmp_path, capsys):
    f = tmp_path / "taken.txt"
    f.write_text("mine")
    refused(capsys, ["evaluate", "--out", str(f), "--phantoms", "1", "--quiet"], [f], [], "--out exists and is not "
                                                                                          "a folder")
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "evaluation.json").mkdir()
    refused(capsys, ["evaluate", "--out", str(tmp_path / "ev"), "--quiet"], [tmp_path / "ev"], [],
            "holds a folder named evaluation.json")


def test_explain_out_is_checked_before_reading(tmp_path, capsys):
    f = tmp_path / "taken.txt"
    f.write_text("mine")
    # the scan does not even exist: the output is checked first
    refused(capsys, ["explain", str(tmp_path / "nope.nii.gz"), "--out", str(f), "--quiet"], [f], [],
            "output path exists and is not a folder")


def test_manifest_with_unknown_header_names_the_accepted_columns(tmp_path, capsys, ct_nifti):
    m = tmp_path / "cohort.csv"
    shutil.copy(ct_nifti, tmp_path / "a.nii.gz")
    m.write_text("case_id,nifti\ncase1,a.nii.gz\n")
    out = tmp_path / "b"
    line = refused(capsys, ["batch", str(m), "--out", str(out), "--quiet"], [m, tmp_path / "a.nii.gz"], [out],
                   "manifest header 'case_id,nifti' names no known columns; accepted: scan id = scan_id/id/")
    assert "scan path = path/scan_path/image" in line and "or no header" in line
    m.write_text("case1,a.nii.gz\n")  # headerless stays positional: not a header-like row (a file name)
    from medcam3d.batch.cohort import read_manifest

    tasks, bad = read_manifest(m)
    assert [t.scan_id for t in tasks] == ["case1"] and not bad


def test_dicom_out_needs_a_dicom_series_checked_before_work(tmp_path, capsys, ct_nifti):
    out = tmp_path / "out"
    refused(capsys, ["explain", str(ct_nifti), "--dicom-out", "--out", str(out), "--quiet"], [ct_nifti], [out],
            "is not a DICOM series; DICOM export (--dicom-out) needs a DICOM source")
    refused(capsys, ["explain", str(CT5N), "--dicom-seg", "0.5", "--out", str(out), "--quiet"], [CT5N], [out],
            "--dicom-seg needs --dicom-out")


def test_dicom_modality_not_accepted_is_refused(tmp_path, capsys, two_series_mr):
    folder, mr_uid, _ = two_series_mr
    out = tmp_path / "out"
    line = refused(capsys, ["explain", str(folder), "--out", str(out), "--quiet"], [folder], [out],
                   "DICOM Modality is MR but the config")
    assert "reads CT; refused (--ignore-modality" in line


def test_api_refuses_nan_like_the_command_line():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1),
                              torch.nn.Flatten(), torch.nn.Linear(2, 3))
    x = torch.randn(1, 1, 6, 6, 6)
    x[0, 0, 1, 2, 3] = float("nan")
    x[0, 0, 0, 0, 0] = float("inf")
    from medcam3d.errors import InputError

    with Explainer(net, "0") as ex:
        with pytest.raises(InputError, match=r"^x: 2 value\(s\) are NaN or Inf \(allow_nonfinite=True"):
            ex(x)
        exp = ex(x, allow_nonfinite=True)  # the option: explained anyway
        assert tuple(exp.scores.shape) == (1, 3)
        # +Inf and -Inf together (their sum is NaN, not Inf) are caught; finite values whose float32 sum overflows
        # are not refused
        y = torch.randn(1, 1, 6, 6, 6)
        y[0, 0, 0, 0, 0], y[0, 0, 5, 5, 5] = float("inf"), float("-inf")
        with pytest.raises(InputError, match=r"^x: 2 value\(s\) are NaN or Inf"):
            ex(y)
        big = torch.full((1, 1, 6, 6, 6), 3e38)
        assert not torch.isfinite(big.sum()) and tuple(ex(big).scores.shape) == (1, 3)


# --- warnings and notes: the run completes -------------------------------------------------------------------------
def test_two_series_and_mr_explained_with_ignore_modality(tmp_path, capsys, two_series_mr):
    folder, mr_uid, ct_uid = two_series_mr
    out = tmp_path / "out"
    code = main(["explain", str(folder), "--out", str(out), "--quiet", "--ignore-modality", "--full-res", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0
    note = [e for e in err if e.startswith("medcam3d: note: ")]
    warning = [e for e in err if e.startswith("medcam3d: warning: ")]
    assert len(note) == 1 and len(warning) == 1, err
    assert f"2 DICOM series; read {mr_uid} (24 files), the one with the most slices (others: {ct_uid} (10 files))" \
        in note[0] and note[0].endswith("choose another with --series-uid UID")
    assert warning[0].endswith("DICOM Modality is MR but the config "
                               f"{load_config('demo_axialnet').path} reads CT; explained anyway (--ignore-modality)")
    s = load_summary(out)
    assert s.input.meta["series_uid"] == mr_uid
    assert s.assumptions == [note[0].removeprefix("medcam3d: note: ")]
    assert s.warnings == [warning[0].removeprefix("medcam3d: warning: ")]


def test_non_ct_looking_nifti_warns_in_stderr_summary_and_report(tmp_path, capsys, phantom):
    brain = tmp_path / "brain.nii.gz"
    mri = np.clip((phantom.hu + 1000.0) / 8.0, 0, 255).astype(np.float32)  # 0-255, no Hounsfield air
    save_nifti(brain, mri, phantom.affine)
    out = tmp_path / "out"
    code = main(["explain", str(brain), "--out", str(out), "--quiet", "--full-res", "top-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith(f"medcam3d: warning: {brain}: intensities do not look like CT in Hounsfield units "
                             "(1st percentile 0, range 0 to ")
    s = load_summary(out)
    assert s.warnings == [err[0].removeprefix("medcam3d: warning: ")] and s.assumptions == []
    assert json.loads((out / "summary.json").read_text())["warnings"] == s.warnings
    # the cohort report shows it (paths redacted): the folder as one finished scan of a batch folder
    batch = tmp_path / "batch"
    shutil.copytree(out, batch / "scans" / "brain")
    (batch / "scans" / "brain" / ".done").write_text("{}")
    assert main(["report", str(batch)]) == 0
    html = (batch / "cohort_report.html").read_text()
    assert "Warning: &lt;path&gt; intensities do not look like CT in Hounsfield units" in html  # path redacted


def test_ct_nifti_gives_no_warning(tmp_path, capsys, ct_nifti):
    out = tmp_path / "out"
    assert main(["explain", str(ct_nifti), "--out", str(out), "--quiet", "--full-res", "none"]) == 0
    assert capsys.readouterr().err == ""
    s = load_summary(out)
    assert s.warnings == [] and s.assumptions == []
