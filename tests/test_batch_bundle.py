"""Issue 16: ``medcam3d batch --bundle DIR`` -- the cohort explained with a MONAI bundle's network, preprocessing
and label names, as ``medcam3d explain --bundle`` does for one scan."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medcam3d.cli import main
from medcam3d.outputs import load_summary

pytest.importorskip("monai.bundle")

from test_monai_bundle import _bad, _direct_scores, make_bundle  # noqa: E402  (after the skip guard)

ARGS = ["--shard", "0/1", "--torch-threads", "1", "--quiet", "--no-report"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two scans of different grids and orientations (RAS and LPS affines)."""
    tmp = tmp_path_factory.mktemp("bundle_cohort")
    rng = np.random.default_rng(1)
    affines = {"a": np.diag([1.5, 1.5, 2.0, 1.0]), "b": np.diag([-1.2, -1.4, 2.5, 1.0])}
    for name, aff in affines.items():
        data = rng.normal(-300, 400, (30, 28, 18)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, aff), str(tmp / f"{name}.nii.gz"))
    return tmp


def test_batch_bundle_same_scores_as_the_bundle_network(tmp_path, cohort):
    bundle = make_bundle(tmp_path / "bundle")
    out = tmp_path / "out"
    assert main(["batch", str(cohort), "--bundle", str(bundle), "--out", str(out), *ARGS]) == 0
    for name in ("a", "b"):
        summary = load_summary(out / "scans" / name)
        got = {c.label: c.score for c in summary.classes}
        want = _direct_scores(bundle, cohort / f"{name}.nii.gz")
        assert set(got) == {"no_nodule", "nodule"}  # label names from the bundle's metadata
        np.testing.assert_allclose([got["no_nodule"], got["nodule"]], want, rtol=1e-4, atol=1e-5)
    fp = json.loads((out / "medcam3d_batch.json").read_text())["fingerprint"]
    assert fp["bundle"] == str(bundle.resolve())
    assert fp["config_name"] == "tiny_ct_classifier"  # the bundle's metadata name


@pytest.mark.parametrize("name", ["no network_def", "network_def does not build", "weights do not match"])
def test_batch_bad_bundle_exit_2_one_line_nothing_written(tmp_path, cohort, capsys, name):
    bundle = _bad(tmp_path, name)
    out = tmp_path / "out"
    assert main(["batch", str(cohort), "--bundle", str(bundle), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("medcam3d: error:") and str(bundle) in err, err
    assert not out.exists()


def test_batch_config_and_bundle_refused(tmp_path, cohort, capsys):
    bundle = make_bundle(tmp_path / "bundle")
    out = tmp_path / "out"
    assert main(["batch", str(cohort), "--bundle", str(bundle), "--config", "demo_axialnet", "--out", str(out),
                 *ARGS]) == 2
    assert "give --config or --bundle, not both" in capsys.readouterr().err
    assert not out.exists()
