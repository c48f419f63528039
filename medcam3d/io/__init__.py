"""Scans in, maps out, in the scan's own world space.

Reading: :func:`read_volume` (NIfTI, NRRD, MetaImage, DICOM series folders) -> :class:`Volume` (float32 array in the
file's index order + RAS affine). Writing: :func:`write_map_like` (source affine and shape),
:func:`write_lowres_maps` (all classes at feature resolution, 4-D), :func:`write_nifti`,
:func:`write_parametric_map` and :func:`write_segmentation` (DICOM, optional highdicom); all atomic.
Checks: :mod:`medcam3d.io.limits` (size checks before allocating), :mod:`medcam3d.io.modality` (scan vs. the
modality a model reads).
Conventions: ``docs/architecture.md`` (RAS affines everywhere; LPS only at the ITK/DICOM boundary).
"""

from __future__ import annotations

from ..files import atomic_path  # its home is medcam3d.files; re-exported here for one release
from .dicom import SeriesInfo, list_series
from .dicom_export import check_dicom_source, write_parametric_map, write_segmentation
from .limits import DEFAULT_MAX_VOXELS, check_voxels, memory_budget
from .modality import check_modality, looks_like_ct
from .readers import read_volume
from .volume import (
    LPS_TO_RAS,
    Volume,
    affine_to_itk,
    check_min_size,
    itk_to_affine,
    spacing_from_affine,
)
from .writers import (
    lowres_affine,
    read_lowres_labels,
    write_lowres_maps,
    write_map_like,
    write_nifti,
)

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "LPS_TO_RAS",
    "SeriesInfo",
    "Volume",
    "affine_to_itk",
    "atomic_path",
    "check_dicom_source",
    "check_min_size",
    "check_modality",
    "check_voxels",
    "itk_to_affine",
    "list_series",
    "looks_like_ct",
    "lowres_affine",
    "memory_budget",
    "read_lowres_labels",
    "read_volume",
    "spacing_from_affine",
    "write_lowres_maps",
    "write_map_like",
    "write_nifti",
    "write_parametric_map",
    "write_segmentation",
]
