"""npe2 sample data: the demo phantom explained by the demo model, as ``medcam3d demo`` makes it.

A synthetic chest CT with three planted abnormalities, each method's map of the top class, and the planted
lesions as a labels layer (ground truth to judge the maps against).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..data import LABELS, make_phantom, write_nifti
from ..pipeline import explain_scan
from .folder import OutputFolder
from .geometry import WORLD_AXES, place
from .layers import LayerData, folder_layers

__all__ = ["DEMO_CONFIG", "DEMO_LESIONS", "DEMO_SEED", "demo"]

DEMO_CONFIG = "demo_axialnet"
"""Config of the model that explains the phantom (tests point this at a copy with untrained weights)."""
DEMO_SEED = 7
DEMO_LESIONS = ("nodule_right_lung", "pleural_effusion_left", "cardiomegaly")


def demo() -> list[LayerData]:
    """The CT, each method's map of the top class, and the planted lesions (label ``k + 1`` for ``LABELS[k]``)."""
    phantom = make_phantom(DEMO_SEED, present={name: True for name in DEMO_LESIONS}, prevalence=0.0)
    with tempfile.TemporaryDirectory(prefix="medcam3d_demo_") as tmp:
        scan = Path(tmp) / "phantom.nii.gz"
        write_nifti(phantom, scan, masks=False)
        explain_scan(scan, Path(tmp) / "explanation", config=DEMO_CONFIG, full_res=["top-1"])
        layers = folder_layers(OutputFolder(Path(tmp) / "explanation"))  # arrays are read into memory
    labels = np.zeros(phantom.hu.shape, np.uint8)
    for name, mask in phantom.lesion_masks.items():
        labels[mask] = LABELS.index(name) + 1
    placed = place(labels, phantom.affine)
    kwargs = {"name": "planted lesions", "affine": placed.affine, "opacity": 0.4, "axis_labels": WORLD_AXES,
              "units": ("mm", "mm", "mm"), "metadata": {"medcam3d": {"kind": "lesions", "labels": list(LABELS)}}}
    return [*layers, (placed.data, kwargs, "labels")]
