"""medcam3d: where a 3-D CNN looked when it predicted each abnormality -- told truthfully.

Public API::

    from medcam3d import Explainer, explain
    with Explainer(model, target_layer="layer4", methods=("hirescam", "gradcam")) as explainer:
        exp = explainer(x)          # x: [B, C, *spatial]
    exp.raw["hirescam"]             # [B, K, *map_spatial] signed maps
    exp.heatmap("gradcam")          # [B, K, *input_spatial] in [0, 1]
    exp.certificate                 # what is proven about the maps

    # a segmentation net: each connected component of class 2's predicted mask is one target
    from medcam3d import SegmentationRegions
    exp = Explainer(unet, targets=SegmentationRegions(2, "components"))(x)
    exp.targets                     # [TargetInfo(name, cls, region, component, voxels, centroid), ...]
"""

from __future__ import annotations

from .certificate import Certificate
from .errors import InputError
from .explainer import Explainer, explain
from .explanation import Explanation
from .layouts import ChannelsFirst, ChannelsLast, SlicesAsBatch
from .methods import METHODS, register_method
from .targets import BoundTargets, Classes, SegmentationRegions, TargetInfo, Targets

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BoundTargets",
    "Certificate",
    "ChannelsFirst",
    "ChannelsLast",
    "Classes",
    "Explainer",
    "Explanation",
    "InputError",
    "SegmentationRegions",
    "SlicesAsBatch",
    "TargetInfo",
    "Targets",
    "__version__",
    "explain",
    "register_method",
]
