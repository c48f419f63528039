"""The parts of the evaluation suite, one module each, registered by name (:mod:`.base` has the protocol).

==================  ===================================================================  ============================
part                what                                                                 model passes
==================  ===================================================================  ============================
``exactness``       completeness residuals, Table-1 L2 (Grad-CAM from HiResCAM), CAM      0 extra
                    equality
``ground_truth``    share of positive contribution in the lesion / marker vs chance;      1 per (scan, removed object)
                    score change when it is removed
``localisation``    relevance mass, rank accuracy, pointing game, best-threshold IoU      0 extra
                    (threshold chosen on the cohort's validation phantoms), a/(a+b)
``perturbation``    deletion / insertion curves and areas per fill                        4(T−1) per (scan, class,
                                                                                         method) + 2T per (scan, fill)
``randomisation``   cascading / independent parameter randomisation curves (layer         1 explanation per (scan,
                    groups shared by the cohort)                                          layer group, mode)
``figure``          the step-by-step figure for one (scan, class)                         0 extra
==================  ===================================================================  ============================

Adding a part: subclass :class:`PartBase` (or implement :class:`Part`), give it a ``name`` and a ``cost``, and
decorate it with :func:`register_part`; ``SuiteOptions(parts=(..., "my_part"))`` and ``medcam3d evaluate --parts``
then run it, and its records, summary, cost, timing and markdown section appear in the outputs.
"""

from __future__ import annotations

# importing the built-in parts registers them; they run in this order
from . import exactness, ground_truth, localisation, perturbation, randomisation, figure  # noqa: F401  # isort: skip
from .base import (
    REGISTRY,
    CaseRecord,
    CaseView,
    JsonRecord,
    ModelUnderTest,
    Part,
    PartBase,
    SuiteOptions,
    SuiteRun,
    WrittenFile,
    get_part,
    register_part,
)

__all__ = [
    "PARTS",
    "REGISTRY",
    "CaseRecord",
    "CaseView",
    "JsonRecord",
    "ModelUnderTest",
    "Part",
    "PartBase",
    "SuiteOptions",
    "SuiteRun",
    "WrittenFile",
    "get_part",
    "register_part",
]

PARTS: tuple[str, ...] = tuple(REGISTRY)
"""The built-in parts, in the order they run."""
