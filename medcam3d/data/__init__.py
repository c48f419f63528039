"""Synthetic chest-CT phantoms with known abnormalities (:mod:`medcam3d.data.phantoms`), their NIfTI export and
datasets of them."""

from .dataset import PhantomDataset, make_dataset
from .nifti import write_nifti
from .phantoms import (
    BLUR_REACH,
    DEFAULT_SHAPE,
    LABELS,
    MARKER_BIT,
    ORGAN_CODES,
    ORGANS,
    CleverHans,
    Phantom,
    PhantomSpec,
    draw_labels,
    draw_spec,
    make_phantom,
    render,
)

__all__ = [
    "BLUR_REACH",
    "DEFAULT_SHAPE",
    "LABELS",
    "MARKER_BIT",
    "ORGANS",
    "ORGAN_CODES",
    "CleverHans",
    "Phantom",
    "PhantomDataset",
    "PhantomSpec",
    "draw_labels",
    "draw_spec",
    "make_dataset",
    "make_phantom",
    "render",
    "write_nifti",
]
