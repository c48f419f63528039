"""Datasets of phantoms: lazily rendered, or written to a folder with a manifest for the batch runner."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import cast

import numpy as np

from ..errors import InputError
from ..files import write_text_atomic
from .nifti import write_nifti
from .phantoms import (
    DEFAULT_SHAPE,
    LABELS,
    Phantom,
    PhantomSpec,
    draw_labels,
    draw_spec,
    render,
)

__all__ = ["PhantomDataset", "make_dataset"]

_DRAW_ARGS = ("prevalence", "present", "clever_hans")
_RENDER_ARGS = ("shape", "spacing", "exclude")


class PhantomDataset(Sequence[Phantom]):
    """``n`` phantoms; case ``i`` has seed ``(seed, i)`` and is rendered when indexed (nothing is cached).

    ``draw`` holds keyword arguments of :func:`~medcam3d.data.phantoms.draw_spec` (prevalence, present,
    clever_hans), ``grid`` those of :func:`~medcam3d.data.phantoms.render` (shape, spacing, exclude)."""

    def __init__(
        self,
        n: int,
        seed: int,
        draw: Mapping[str, object] | None = None,
        grid: Mapping[str, object] | None = None,
        manifest: Path | None = None,
    ) -> None:
        self.n, self.seed = n, seed
        self.draw, self.grid = dict(draw or {}), dict(grid or {})
        self.manifest = manifest
        exclude = self.grid.get("exclude", ())  # a label name, or an iterable of them
        self._excluded = frozenset([exclude] if isinstance(exclude, str) else cast("Iterable[str]", exclude))

    def __len__(self) -> int:
        return self.n

    def _index(self, i: int) -> int:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"PhantomDataset indices are integers, not {type(i).__name__}")
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} phantoms")
        return int(i) % self.n

    def scan_id(self, i: int) -> str:
        """Name of case ``i``, e.g. ``phantom_7_00012``."""
        return f"phantom_{self.seed}_{self._index(i):05d}"

    def spec(self, i: int) -> PhantomSpec:
        """The random draws of case ``i`` (see :func:`~medcam3d.data.phantoms.draw_spec`)."""
        return draw_spec((self.seed, self._index(i)), **self.draw)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Phantom:  # type: ignore[override]
        return render(self.spec(i), **self.grid)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Phantom]:
        return (self[i] for i in range(self.n))

    def labels(self) -> np.ndarray:
        """``uint8 [n, len(LABELS)]`` labels of every case from the draws alone (fast, no rendering); equal to the
        rendered ``Phantom.labels`` unless a grid is too coarse to show a lesion."""
        keep = np.array([name not in self._excluded for name in LABELS])
        rows = [self._draw_labels(i)[0] & keep for i in range(self.n)]
        return np.array(rows, np.uint8).reshape(self.n, len(LABELS))

    def markers(self) -> np.ndarray:
        """``bool [n]``: which cases carry the Clever-Hans marker (from the draws alone)."""
        shown = "marker" not in self._excluded
        return np.array([self._draw_labels(i)[1] and shown for i in range(self.n)], bool)

    def _draw_labels(self, i: int) -> tuple[np.ndarray, bool]:
        return draw_labels((self.seed, i), **self.draw)  # type: ignore[arg-type]


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def make_dataset(n: int, seed: int, out_dir: str | os.PathLike[str] | None = None, **kw: object) -> PhantomDataset:
    """``n`` phantoms drawn from ``seed``: case ``i`` is ``make_phantom((seed, i), **kw)``.

    Parameters
    ----------
    n : int
        Number of cases.
    seed : int
        Dataset seed; datasets with different seeds share no case.
    out_dir : path-like, optional
        If given, every case is rendered and written there as ``<scan_id>.nii.gz`` with its organ label map,
        lesion bitmask and sidecar (see :func:`~medcam3d.data.nifti.write_nifti`), then ``manifest.csv``
        (``scan_id,path,organ_labels_path``, absolute paths) and ``labels.csv`` (``scan_id``, one 0/1 column
        per label, ``marker``).
    **kw
        :func:`~medcam3d.data.phantoms.make_phantom` keywords: shape, spacing, prevalence, present, exclude,
        clever_hans.

    Returns
    -------
    PhantomDataset
        Lazy: cases are rendered when indexed. ``manifest`` is the CSV's path when ``out_dir`` was given.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"n: {n!r} is not a non-negative number of phantoms")
    unknown = sorted(set(kw) - set(_DRAW_ARGS) - set(_RENDER_ARGS))
    if unknown:
        raise InputError(f"make_dataset: unknown argument(s) {', '.join(unknown)}")
    draw = {k: v for k, v in kw.items() if k in _DRAW_ARGS}
    grid = {"shape": DEFAULT_SHAPE, **{k: v for k, v in kw.items() if k in _RENDER_ARGS}}
    dataset = PhantomDataset(n, seed, draw, grid)
    if out_dir is None:
        return dataset
    folder = Path(out_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    manifest, labels = [], []
    for i, phantom in enumerate(dataset):
        scan_id = dataset.scan_id(i)
        paths = write_nifti(phantom, folder / f"{scan_id}.nii.gz")
        manifest.append([scan_id, str(paths["image"]), str(paths["organs"])])
        labels.append([scan_id, *phantom.labels.tolist(), int(phantom.marker_mask is not None)])
    dataset.manifest = folder / "manifest.csv"
    for name, header, rows in (
        ("labels.csv", ["scan_id", *LABELS, "marker"], labels),
        ("manifest.csv", ["scan_id", "path", "organ_labels_path"], manifest),
    ):
        write_text_atomic(folder / name, _csv_text(header, rows))
    return dataset
