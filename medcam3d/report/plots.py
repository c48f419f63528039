"""Cohort figures (matplotlib, Agg) as PNG bytes, and montage thumbnails; embedded base64 in the HTML.

Figures are deterministic for the same inputs (fixed jitter seed, no dates in the PNG metadata)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["data_uri", "disagreement_figure", "organ_shares_figure", "score_distribution", "thumbnail"]

_META = {"Software": None}


def data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def _plt() -> Any:
    import matplotlib  # heavy: imported when the first figure is drawn, not when the report package is

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata=_META)
    _plt().close(fig)
    return buf.getvalue()


def _height(n: int) -> float:
    return max(2.4, 0.32 * n + 1.2)


def score_distribution(labels: Sequence[str], scores: dict[str, list[float]], threshold_score: float | None,
                       what: str = "raw class score (logit)", title: str = "Score distribution per class") -> bytes:
    """Per class, the raw scores over the cohort: a box with every scan (or target) as a dot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, _height(len(labels))))
    rng = np.random.default_rng(0)
    data = [np.asarray(scores.get(lab, []), float) for lab in labels]
    pos = np.arange(len(labels))[::-1]
    ax.boxplot([d if d.size else np.array([np.nan]) for d in data], positions=pos, orientation="horizontal", widths=0.6,
               showfliers=False)
    for p, d in zip(pos, data):
        if d.size:
            ax.scatter(d, p + rng.uniform(-0.18, 0.18, d.size), s=9, alpha=0.6, color="#1f77b4", linewidths=0)
    if threshold_score is not None:
        ax.axvline(threshold_score, color="#c0392b", lw=1, ls="--", label="decision threshold")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(pos, labels, fontsize=8)
    ax.set_xlabel(what)
    ax.set_title(title)
    fig.tight_layout()
    return _png(fig)


def disagreement_figure(labels: Sequence[str], values: dict[str, list[float]], what: str) -> bytes:
    """Per class, the distribution of a HiResCAM vs Grad-CAM disagreement measure over the cohort."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, _height(len(labels))))
    pos = np.arange(len(labels))[::-1]
    data = [np.asarray(values.get(lab, []), float) for lab in labels]
    ax.boxplot([d if d.size else np.array([np.nan]) for d in data], positions=pos, orientation="horizontal", widths=0.6)
    ax.set_yticks(pos, labels, fontsize=8)
    ax.set_xlabel(what)
    ax.set_title(f"HiResCAM vs Grad-CAM: {what}")
    fig.tight_layout()
    return _png(fig)


def organ_shares_figure(labels: Sequence[str], organs: Sequence[str], mean_shares: dict[str, list[float]],
                        method: str) -> bytes:
    """Per class, the mean share of positive contribution in each organ (stacked bars summing to 1)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, _height(len(labels))))
    pos = np.arange(len(labels))[::-1]
    left = np.zeros(len(labels))
    cmap = plt.get_cmap("tab10")
    for j, o in enumerate(organs):
        w = np.array([mean_shares.get(lab, [0.0] * len(organs))[j] for lab in labels], float)
        w = np.nan_to_num(w)
        color = "#bbbbbb" if o == "unlabelled" else cmap(j % 10)
        ax.barh(pos, w, left=left, color=color, label=o, height=0.7)
        left += w
    ax.set_yticks(pos, labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"mean share of positive {method} contribution")
    ax.set_title(f"Where the model looks ({method})")
    ax.legend(fontsize=7, ncol=min(4, len(organs)), loc="upper center",
              bbox_to_anchor=(0.5, -0.12 - 0.2 / max(1, len(labels))))
    fig.tight_layout()
    return _png(fig)


def thumbnail(png_path: Any, width: int = 900, quality: int = 88) -> bytes:
    """A montage PNG scaled to ``width`` pixels as JPEG bytes (keeps a report of hundreds of scans small)."""
    # Pillow: imported with the images that need it, like matplotlib above
    from PIL import Image

    with Image.open(png_path) as src:
        im = src.convert("RGB")
    if im.width > width:
        im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
