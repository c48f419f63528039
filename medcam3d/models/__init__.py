"""Models that medcam3d explains, and how to load them.

* :class:`AxialNet` (Draelos & Carin): ResNet-18 on three-slice groups, four 3x3 convs, per-slice FC, slice mean.
  Declares ``medcam3d_target_layer = "conv2d.7"`` and ``medcam3d_layout = SlicesAsBatch()``.
* :class:`ResNet34v`, :class:`DenseNet121v` (2-D or 3-D): backbone, one 512-filter 2-wide conv, one FC.
* :class:`CAMNet3d`: backbone, global average pooling, FC (CAM = HiResCAM = Grad-CAM).
* Loading: :func:`load_checkpoint` (weights only), :func:`build_model` (MONAI-bundle-style ``_target_`` specs),
  :func:`declare_model` (labels, target layer, layout), :func:`load_demo` (the embedded demo model);
  :func:`load_model_spec` is deprecated (the model YAML format is the config's: :mod:`medcam3d.config`).

Nothing here downloads anything.
"""

from .axialnet import AxialNet, final_conv, load_resnet18_weights
from .loading import (
    DEMO_MODEL,
    TRUSTED_FACTORY_MODULES,
    build_model,
    declare_model,
    load_checkpoint,
    load_demo,
    load_model_spec,
    load_state_dict_checked,
    read_state_dict,
    resolve_package_path,
    resolve_weights,
)
from .resnet import (
    BasicBlock,
    load_torchvision_resnet_weights,
    resnet_feature_size,
    resnet_features,
)
from .variants import CAMNet3d, DenseNet121v, ResNet34v, densenet_feature_size

__all__ = [
    "DEMO_MODEL",
    "TRUSTED_FACTORY_MODULES",
    "AxialNet",
    "BasicBlock",
    "CAMNet3d",
    "DenseNet121v",
    "ResNet34v",
    "build_model",
    "declare_model",
    "densenet_feature_size",
    "final_conv",
    "load_checkpoint",
    "load_demo",
    "load_model_spec",
    "load_resnet18_weights",
    "load_state_dict_checked",
    "load_torchvision_resnet_weights",
    "read_state_dict",
    "resnet_feature_size",
    "resnet_features",
    "resolve_package_path",
    "resolve_weights",
]
