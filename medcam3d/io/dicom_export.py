"""Optional DICOM export: a map on a DICOM scan's grid as a DICOM Parametric Map (highdicom) in the source study.

The Parametric Map references the source series (same Study, Frame of Reference; one float32 frame per source
slice, positioned like it), so PACS viewers and 3D Slicer show it over the scan. Being part of the patient's study,
it necessarily carries the source's patient and study modules (highdicom copies them): unlike ``Volume.meta``, this
file is not de-identified. Needs ``highdicom`` (``pip install medcam3d[dicom-seg]``).

Only volumes read from a single-frame DICOM series without resampling can be exported: then slice ``k`` of the
volume is file ``meta["dicom_files"][k]``.
"""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..files import atomic_path
from .volume import Volume
from .writers import _to_numpy

__all__ = ["write_parametric_map"]


def write_parametric_map(
    map_on_source_grid: Any,
    source_volume: Volume,
    path: str | os.PathLike[str],
    *,
    label: str = "HiResCAM",
    description: str = "medcam3d explanation map",
    series_number: int = 900,
) -> Path:
    """Write ``map_on_source_grid`` ``[I, J, K]`` as a DICOM Parametric Map referencing ``source_volume``'s series.

    Args:
        map_on_source_grid: map with exactly the source volume's shape (e.g. ``Preprocessor.invert(...)[k]``).
        source_volume: a Volume read by :func:`medcam3d.io.read_volume` from a DICOM series folder.
        path: output ``*.dcm`` file (written atomically).
        label: short name of the quantity (the real-world value mapping's LUT label, <= 16 characters).
        description: content description.
        series_number: series number of the new series.
    """
    p = Path(path)
    if p.suffix.lower() != ".dcm":
        raise InputError("output file name must end with .dcm", p)
    files = list(source_volume.meta.get("dicom_files") or [])
    if source_volume.meta.get("format") != "dicom" or not files:
        raise InputError(f"{source_volume.source} is not a DICOM series; a Parametric Map needs a DICOM source", p)
    if source_volume.meta.get("resampled_slices"):
        raise InputError(f"{source_volume.source} was resampled on reading; its grid is not the DICOM slices'", p)
    m = np.asarray(_to_numpy(map_on_source_grid), dtype=np.float32)
    if m.shape != source_volume.shape:
        raise InputError(f"map has shape {m.shape} but the scan has {source_volume.shape}", p)
    if len(files) != m.shape[2]:
        raise InputError(f"{source_volume.source}: multi-frame DICOM sources are not supported for export", p)
    if not np.isfinite(m).all():
        raise InputError("map contains NaN or Inf", p)
    try:  # lazy: highdicom is an optional extra, and pydicom is only needed with it here
        import highdicom as hd
        import pydicom
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("DICOM Parametric Map export needs highdicom: pip install 'medcam3d[dicom-seg]'") from e

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    frames = np.stack([m[:, :, k].T for k in range(m.shape[2])])  # [slices, rows (j), columns (i)]
    lo, hi = float(frames.min()), float(frames.max())
    if hi <= lo:
        hi = lo + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label[:16], lut_explanation=description[:64], unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        value_range=(lo, hi), slope=1, intercept=0,
    )
    try:
        software = version("medcam3d")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        software = "medcam3d"
    pm = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=frames,
        series_instance_uid=hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medcam3d",
        manufacturer_model_name="medcam3d",
        software_versions=software,
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(lo + hi) / 2, window_width=hi - lo)],
        content_label=label.upper().replace(" ", "_")[:16],
        content_description=description[:64],
    )
    with atomic_path(p) as tmp:
        pm.save_as(str(tmp))
    return p
