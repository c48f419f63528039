"""Scans in, maps out, in the scan's own world space.

Reading: :func:`read_volume` (NIfTI, NRRD, MetaImage, DICOM series folders) -> :class:`Volume` (float32 array in the
file's index order + RAS affine). Writing: :func:`write_map_like` (source affine and shape),
:func:`write_lowres_maps` (all classes at feature resolution, 4-D), :func:`write_nifti`,
:func:`write_parametric_map` (DICOM, optional highdicom); all atomic.
Conventions: ``docs/architecture.md`` (RAS affines everywhere; LPS only at the ITK/DICOM boundary).
"""

from __future__ import annotations

from ..files import atomic_path  # its home is medcam3d.files; re-exported here for one release
from .dicom import SeriesInfo, list_series
from .dicom_export import write_parametric_map
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
    "LPS_TO_RAS",
    "SeriesInfo",
    "Volume",
    "affine_to_itk",
    "atomic_path",
    "check_min_size",
    "itk_to_affine",
    "list_series",
    "lowres_affine",
    "read_lowres_labels",
    "read_volume",
    "spacing_from_affine",
    "write_lowres_maps",
    "write_map_like",
    "write_nifti",
    "write_parametric_map",
]
