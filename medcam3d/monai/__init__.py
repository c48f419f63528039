"""medcam3d in MONAI pipelines (issue 16): MetaTensors out, the ``Explaind`` dictionary transform, an Ignite
handler for ``SupervisedEvaluator`` and MONAI bundles.

* :mod:`medcam3d.monai.meta` -- what explanations of a MetaTensor input carry (:class:`MetaOut`); the explainer
  imports it only when the input is a MetaTensor, so the core never imports MONAI.
* :mod:`medcam3d.monai.transforms` -- :class:`Explaind`.
* :mod:`medcam3d.monai.handlers` -- :class:`ExplainHandler` for ``SupervisedEvaluator`` (needs pytorch-ignite, the
  ``[monai]`` extra).

This package imports MONAI (a dependency of medcam3d); see the README's "Use in a MONAI pipeline".
"""

from .handlers import ExplainHandler
from .meta import MetaOut
from .transforms import Explaind

__all__ = ["ExplainHandler", "Explaind", "MetaOut"]
