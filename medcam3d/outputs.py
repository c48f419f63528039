"""The output folder of one explained scan: names, atomic replacement, montages.

Folder layout (documented in the README; readers -- viewer, batch, reports -- rely on these names)::

    scores.csv                              index,label,score,probability,predicted,full_resolution
    summary.json                            provenance, timings, certificate, per-class metrics (schema below)
    lowres_<method>.nii.gz                  4-D (x, y, z, K): every explained class's SIGNED RAW map at feature
                                            resolution, placed in world space by its affine (align_corners=False
                                            blocks of the network grid); class order = summary["classes"]
    fullres_<method>_<NNN>_<label>.nii.gz   display heatmap in [0, 1] (ReLU, whole-map min-max, trilinear upsampling)
                                            on the scan's own grid: the scan's exact affine and shape, float32
    montage_<NNN>_<label>.png               axial / coronal / sagittal slices through the HiResCAM peak: CT with the
                                            HiResCAM overlay (top row) and with the Grad-CAM overlay (bottom row)

``NNN`` is the zero-padded class index. A folder is written under a temporary name next to its destination and
renamed into place when complete; an existing medcam3d output folder is replaced, anything else is refused.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

__all__ = [
    "SCORES",
    "SUMMARY",
    "WINDOWS",
    "class_stem",
    "fullres_name",
    "lowres_name",
    "montage_name",
    "output_folder",
    "render_montage",
    "to_spl",
    "write_json",
    "write_scores_csv",
]

SUMMARY = "summary.json"
SCORES = "scores.csv"
#: CT display windows: name -> (level, width) in HU
WINDOWS = {"lung": (-600.0, 1500.0), "soft_tissue": (40.0, 400.0)}


def class_stem(index: int, label: str) -> str:
    """``NNN_label`` with the label reduced to file-name-safe characters."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "class"
    return f"{index:03d}_{safe}"


def lowres_name(method: str) -> str:
    return f"lowres_{method}.nii.gz"


def fullres_name(method: str, index: int, label: str) -> str:
    return f"fullres_{method}_{class_stem(index, label)}.nii.gz"


def montage_name(index: int, label: str) -> str:
    return f"montage_{class_stem(index, label)}.png"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str | Path, dest: Path, mode: int = 0o666) -> None:
    """chmod a temp file to normal (umask) permissions, then rename it onto ``dest``."""
    os.chmod(tmp, mode & ~_umask())
    os.replace(tmp, dest)


def _is_output_folder(p: Path) -> bool:
    return (p / SUMMARY).is_file() or (p / SCORES).is_file()


@contextmanager
def output_folder(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``dest``; on success it replaces ``dest`` (renames), on failure it
    is deleted and ``dest`` is untouched.

    ``dest`` may not exist, be empty, or be an earlier medcam3d output folder; anything else is an InputError
    (we never delete a user's files)."""
    d = Path(dest).expanduser().resolve()
    if d.exists() and not d.is_dir():
        raise InputError("output path exists and is not a folder", d)
    if d.is_dir() and any(d.iterdir()) and not _is_output_folder(d):
        raise InputError("output folder is not empty and is not a medcam3d output folder; refusing to replace it", d)
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder's parent ({e.strerror})", d) from None
    if not os.access(d.parent, os.W_OK):
        raise InputError("output folder's parent is not writable", d)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", suffix=".partial", dir=d.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if d.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{d.name}.", suffix=".old", dir=d.parent))
        os.rmdir(old)
        os.replace(d, old)
    os.replace(tmp, d)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write JSON atomically (temp file + rename)."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=True)
        f.write("\n")
    _publish(tmp, p)
    return p


def write_scores_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """``scores.csv``: one row per class (index, label, score, probability, predicted, full_resolution)."""
    p = Path(path)
    fields = ["index", "label", "score", "probability", "predicted", "full_resolution"]
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    _publish(tmp, p)
    return p


# -----------------------------------------------------------------------------------------------------------------
# Montage
# -----------------------------------------------------------------------------------------------------------------


def to_spl(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient a 3-D array to SPL (axis 0 inferior→superior, 1 anterior→posterior, 2 right→left) by flips and
    axis swaps only (no resampling). Returns the view and its voxel spacing (slice, row, column) in mm."""
    from nibabel import orientations as ornt

    src = ornt.io_orientation(affine)
    # nibabel orders the target by the output axes: we want (S, P, L)
    target = ornt.axcodes2ornt(("S", "P", "L"))
    xform = ornt.ornt_transform(src, target)
    out = ornt.apply_orientation(array, xform)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing = tuple(float(zooms[int(src_axis)]) for src_axis in np.argsort(xform[:, 0]))
    return out, spacing  # type: ignore[return-value]


def _overlay_rgba(hm: np.ndarray, cmap: Any, floor: float = 0.2) -> np.ndarray:
    rgba = cmap(np.clip(hm, 0.0, 1.0))
    rgba[..., 3] = np.where(hm > floor, 0.6 * np.clip(hm, 0, 1), 0.0)
    return rgba


def render_montage(
    ct: np.ndarray,
    maps: dict[str, np.ndarray],
    affine: np.ndarray,
    path: str | os.PathLike[str],
    title: str,
    window: str = "lung",
    peak_from: str | None = None,
    dpi: int = 100,
) -> Path:
    """A PNG: one row per method, columns axial / coronal / sagittal through the peak of ``maps[peak_from]``.

    Args:
        ct: ``[I, J, K]`` HU on the scan grid.
        maps: method -> ``[I, J, K]`` heatmap in [0, 1] on the same grid.
        affine: the scan's affine (to orient the slices radiologically and set pixel aspect ratios).
        title: figure title (class, score, ...).
        window: ``"lung"`` (W1500/L−600) or ``"soft_tissue"`` (W400/L40).
        peak_from: the method whose maximum chooses the slices (default: the first).
    The image is 1200 x (400 x rows) pixels at the default dpi."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    methods = list(maps)
    ct_s, sp = to_spl(ct, affine)
    maps_s = {m: to_spl(v, affine)[0] for m, v in maps.items()}
    ref = maps_s[peak_from or methods[0]]
    k, j, i = np.unravel_index(int(np.argmax(ref)), ref.shape)
    level, width = WINDOWS[window]
    lo, hi = level - width / 2, level + width / 2
    cmap = colormaps["inferno"]
    views = [
        ("axial", lambda a: a[k], sp[1] / sp[2]),  # rows P (anterior up), cols L (patient right on the left)
        ("coronal", lambda a: a[::-1, j, :], sp[0] / sp[2]),  # superior up, patient right on the left
        ("sagittal", lambda a: a[::-1, :, i], sp[0] / sp[1]),  # superior up, anterior on the left
    ]
    fig, axes = plt.subplots(len(methods), 3, figsize=(12, 4 * len(methods)), dpi=dpi, squeeze=False)
    for r, m in enumerate(methods):
        for c, (name, cut, aspect) in enumerate(views):
            ax = axes[r, c]
            ax.imshow(cut(ct_s), cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="bilinear")
            ax.imshow(_overlay_rgba(cut(maps_s[m]), cmap), aspect=aspect, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{m} - {name}", fontsize=10)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp.png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        _publish(tmp, p)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p
