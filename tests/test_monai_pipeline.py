"""Issue 16: MetaTensors out, ``Explaind`` + ``Invertd`` + ``SaveImaged`` -- the README's MONAI pipeline, run."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scan_files import phantom_to_dicom
from torch import nn

from medcam3d import Explainer
from medcam3d.io import read_volume

monai_data = pytest.importorskip("monai.data")
MetaTensor = monai_data.MetaTensor
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippets(section: str = "## Use in a MONAI pipeline") -> list[str]:
    """The ```python blocks of one README section, in order."""
    text = README.read_text(encoding="utf-8")
    body = text[text.index(section):]
    body = body[: body.index("\n## ", 1)] if "\n## " in body[1:] else body
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


class TinyNet(nn.Module):
    """conv -> ReLU -> conv(stride 2) -> ReLU -> GAP -> Linear on [B, 1, 32, 32, 32]: 3 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(1, 4, 3, padding=1)
        self.a1 = nn.ReLU()
        self.c2 = nn.Conv3d(4, 6, 3, stride=2, padding=1)
        self.a2 = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.a2(self.c2(self.a1(self.c1(x)))).flatten(2).mean(2))


def _scans(tmp: Path) -> dict[str, tuple[Path, np.ndarray, tuple[int, ...]]]:
    """An RAS NIfTI, an LPS NIfTI and an axial DICOM series; each with its RAS affine and shape."""
    rng = np.random.default_rng(0)
    out = {}
    ras = np.diag([1.5, 1.2, 2.0, 1.0])
    ras[:3, 3] = [-20, -30, 10]
    data = rng.normal(0, 300, (30, 28, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, ras), str(tmp / "ras.nii.gz"))
    out["ras"] = (tmp / "ras.nii.gz", ras, data.shape)
    lps = np.diag([-1.3, -1.1, 2.5, 1.0])
    lps[:3, 3] = [40, 35, -15]
    data = rng.normal(0, 300, (26, 31, 14)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, lps), str(tmp / "lps.nii.gz"))
    out["lps"] = (tmp / "lps.nii.gz", lps, data.shape)
    spl = np.array([[0, 0, -1.4, 30], [0, -1.4, 0, 40], [2.5, 0, 0, -20], [0, 0, 0, 1.0]])  # [S, P, L] slices
    phantom_to_dicom(rng.normal(0, 200, (12, 24, 22)), spl, tmp / "dicom")
    vol = read_volume(tmp / "dicom")  # medcam3d's reader (SimpleITK): an independent RAS affine
    out["dicom"] = (tmp / "dicom", np.asarray(vol.affine), tuple(vol.array.shape))
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monai_pipeline")
    torch.manual_seed(0)
    return tmp, _scans(tmp), TinyNet().eval()


def _check_written(out_dir: Path, scans, k: int) -> None:
    for name, (path, affine, shape) in scans.items():
        stem = path.name.split(".")[0]
        for method in ("hirescam", "gradcam"):
            found = sorted(out_dir.glob(f"{stem}*_{method}.nii.gz"))
            assert len(found) == 1, (name, method, sorted(p.name for p in out_dir.iterdir()))
            img = nib.load(str(found[0]))
            assert img.shape[:3] == tuple(shape), (name, img.shape, shape)
            assert img.shape[3:] in ((k,), (1, k)) or (k == 1 and img.ndim == 3), img.shape
            np.testing.assert_allclose(img.affine, affine, atol=1e-4, err_msg=name)
            values = np.asarray(img.dataobj)
            assert values.min() >= -1e-6 and values.max() <= 1 + 1e-6 and values.max() > 0


@pytest.mark.parametrize("batched", [False, True])
def test_readme_pipeline_writes_maps_on_the_source_grid(pipeline, batched):
    tmp, scans, model = pipeline
    out_dir = tmp / ("batched" if batched else "single")
    files = [{"image": str(p)} for p, _, _ in scans.values()] + ([{"image": str(scans["ras"][0])}] if batched else [])
    setup, single, loop = readme_snippets()[:3]
    env = {"model": model, "out_dir": str(out_dir), "files": files}
    exec(setup, env)
    exec(loop if batched else single, env)
    _check_written(out_dir, scans, 3)


def test_metatensor_out_batched_explainer(pipeline):
    """The Explainer on a collated batch: heatmaps keep the batch's meta; after decollating, Invertd works."""
    tmp, scans, model = pipeline
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.transforms import Invertd

    env = {"model": model, "out_dir": str(tmp / "unused"), "files": []}
    exec(readme_snippets()[0], env)
    pre = env["pre"]
    files = [{"image": str(scans[n][0])} for n in ("ras", "lps")]
    batch = next(iter(DataLoader(Dataset(files, transform=pre), batch_size=2)))
    exp = Explainer(model)(batch["image"])
    hm = exp.heatmap("hirescam")
    assert isinstance(hm, MetaTensor) and hm.is_batch and hm.shape == (2, 3, 32, 32, 32)
    batch["image_hirescam"] = hm
    for item, name in zip(decollate_batch(batch), ("ras", "lps")):
        inv = Invertd(keys="image_hirescam", transform=pre, orig_keys="image", nearest_interp=False)(item)
        out = inv["image_hirescam"]
        assert tuple(out.shape[1:]) == scans[name][2]
        np.testing.assert_allclose(out.affine.numpy(), scans[name][1], atol=1e-4)


def test_raw_maps_carry_their_own_affine_and_plain_stays_plain():
    torch.manual_seed(0)
    model = TinyNet().eval()
    aff = torch.tensor([[2.0, 0, 0, -10], [0, 3.0, 0, 5], [0, 0, 4.0, 7], [0, 0, 0, 1]], dtype=torch.float64)
    x = torch.randn(1, 1, 32, 32, 32)
    exp = Explainer(model, "a2")(MetaTensor(x, affine=aff))
    raw = exp.raw["hirescam"]
    assert isinstance(raw, MetaTensor) and raw.applied_operations == []
    # stride-2 conv, kernel 3, padding 1: cell i sits at input voxel 2 i (receptive-field centres)
    geo = exp.map_geometry("auto")
    assert geo.kind == "receptive" and geo.offset == (0.0, 0.0, 0.0) and geo.stride == (2.0, 2.0, 2.0)
    want = aff @ torch.tensor([[2.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(raw.affine.double(), want)
    hm = exp.heatmap("hirescam")
    assert isinstance(hm, MetaTensor) and torch.equal(hm.affine.double(), aff)
    (_, first), *_ = list(exp.iter_heatmaps("gradcam"))
    assert isinstance(first, MetaTensor)
    plain = Explainer(model, "a2")(x)
    assert type(plain.raw["hirescam"]) is torch.Tensor and type(plain.heatmap("hirescam")) is torch.Tensor
    torch.testing.assert_close(raw.as_tensor(), plain.raw["hirescam"])


def test_explaind_positive_classes_and_forward_kwargs():
    from medcam3d.monai import Explaind

    class WithAge(TinyNet):
        def forward(self, x, age):
            return super().forward(x) + age[:, None] * torch.tensor([10.0, -10.0, 0.0])

    torch.manual_seed(0)
    model = WithAge().eval()
    img = MetaTensor(torch.randn(1, 32, 32, 32))
    d = Explaind("image", model=model, classes="positive", forward_kwargs={"age": "age"})({"image": img, "age": 1.0})
    scores = model(img.as_tensor()[None], torch.tensor([1.0]))[0]
    positive = [int(i) for i in torch.argsort(scores, descending=True) if torch.sigmoid(scores[i]) >= 0.5]
    assert d["image_classes"].tolist() == positive and d["image_hirescam"].shape[0] == len(positive)
    torch.testing.assert_close(d["image_scores"], scores)


def test_explaind_adds_no_forward_pass():
    """Backbone passes (a hook on the first layer) of Explaind equal those of the explainer called directly."""
    from monai.transforms import Compose, ScaleIntensityd

    from medcam3d.monai import Explaind

    torch.manual_seed(0)
    model = TinyNet().eval()
    explainer = Explainer(model, "a2")
    calls = []
    model.c1.register_forward_hook(lambda *a: calls.append(1))
    image = MetaTensor(torch.rand(1, 16, 16, 16))
    explainer(image[None])
    direct = len(calls)
    calls.clear()
    Compose([ScaleIntensityd("image"), Explaind("image", explainer=explainer)])({"image": image})
    assert len(calls) == direct == 1
