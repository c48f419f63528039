"""npe2 reader: medcam3d output folders, the NIfTI maps inside them, and scans, in medcam3d's napari world.

* an output folder: the scan (when its recorded path still exists), the predicted segmentation (segmentation
  folders) and every method's map of the top class (the first target);
* ``fullres_<method>_<NNN>_<label>.nii.gz`` in an output folder: that map;
* ``lowres_<method>.nii.gz`` in an output folder: one layer per class at feature resolution (the top class shown);
* ``segmentation.nii.gz`` in a segmentation output folder: the predicted segmentation as a labels layer;
* any other NIfTI, NRRD or MetaImage file: a scan in the lung window.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..io import read_volume
from ..outputs import SEGMENTATION, SUMMARY
from .folder import OutputFolder
from .geometry import place
from .layers import LayerData, folder_layers, map_layer, scan_layer, segmentation_layer

__all__ = ["get_reader", "read_file", "read_folder"]

_FULLRES = re.compile(r"^fullres_(?P<method>[^_]+)_(?P<index>\d{3})_.+\.nii(\.gz)?$")
_LOWRES = re.compile(r"^lowres_(?P<method>[^_]+)\.nii(\.gz)?$")
_SCAN_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """The reader for ``path``, or None when it is not for medcam3d (napari then asks other plugins)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_dir():
        return read_folder if (p / SUMMARY).is_file() else None
    return read_file if p.name.lower().endswith(_SCAN_SUFFIXES) else None


def _single(path: str | list[str]) -> Path:
    return Path(path[0] if isinstance(path, list) else path)


def read_folder(path: str | list[str]) -> list[LayerData]:
    """Layers of an output folder."""
    return folder_layers(OutputFolder(_single(path)))


def read_file(path: str | list[str]) -> list[LayerData]:
    """Layers of a map of an output folder, or of a scan."""
    p = _single(path)
    in_folder = (p.parent / SUMMARY).is_file()
    full, low = _FULLRES.match(p.name), _LOWRES.match(p.name)
    if in_folder and full:
        return [map_layer(OutputFolder(p.parent).map(full["method"], int(full["index"])))]
    if in_folder and low:
        folder = OutputFolder(p.parent)
        top = folder.listing()[0]
        return [map_layer(folder.map(low["method"], c.index, feature_resolution=True), visible=c == top)
                for c in folder.classes]
    if in_folder and p.name == SEGMENTATION and (seg := _segmentation(p)) is not None:
        return [seg]
    volume = read_volume(p)
    name = p.name[: -len(next(s for s in _SCAN_SUFFIXES if p.name.lower().endswith(s)))]
    return [scan_layer(place(volume.array, volume.affine), name, source=str(p))]


def _segmentation(p: Path) -> LayerData | None:
    """The labels layer of ``p`` when it is the predicted segmentation of its (segmentation) output folder."""
    folder = OutputFolder(p.parent)
    seg = folder.segmentation()
    if seg is None or folder.segmentation_path != p.resolve():
        return None
    return segmentation_layer(seg, folder.segmentation_labels)
