"""Evaluation: is an explanation faithful, and what does it say about the model.

Draelos & Carin are explicit that IoU against object masks does not measure whether an explanation is correct:
faithfulness comes from the model's own computation, and localisation metrics describe the *model* only once the
explanation is faithful. This package gives both kinds of evidence, in 3-D, layered above the core (it takes raw
maps, masks and score functions, never files):

=====================================  ===========================================================================
module                                 what
=====================================  ===========================================================================
:mod:`~medcam3d.evaluate.metrics`      pure metrics: relevance mass (share of positive contribution in a mask) and
                                       its chance level, allowed-region score a/(a+b), relevance rank accuracy,
                                       pointing game (ties), IoU at thresholds and best-threshold IoU, Spearman,
                                       3-D SSIM, areas under curves, AUROC
:mod:`~medcam3d.evaluate.exactness`    completeness residuals, Table-1 L2, CAM-architecture equality (0 passes)
:mod:`~medcam3d.evaluate.perturbation` deletion / insertion curves over 3-D cells, MoRF / LeRF / random, CT fills
:mod:`~medcam3d.evaluate.randomization` cascading / independent parameter randomisation curves
:mod:`~medcam3d.evaluate.figure`       the paper's step-by-step figure (Figure 7)
:mod:`~medcam3d.evaluate.phantoms`     phantoms on a network grid with masks; the same patient without a lesion
:mod:`~medcam3d.evaluate.parts`        the suite's parts (exactness, ground truth, localisation, perturbation,
                                       randomisation, figure), one module each, and their protocol and registry
:mod:`~medcam3d.evaluate.suite`        everything on phantoms in one call (:func:`evaluate`)
:mod:`~medcam3d.evaluate.result`       the typed result, its JSON form and its markdown summary
:mod:`~medcam3d.evaluate.numbers`      JSON numbers, means over cases, markdown tables
:mod:`~medcam3d.evaluate.report`       output folder and docs/results.md sections
:mod:`~medcam3d.evaluate.small_models` the small 3-D ResNet-34v-style model of the reproduction scripts
:mod:`~medcam3d.evaluate.command`      ``medcam3d evaluate`` (command line)
=====================================  ===========================================================================

Names listed in ``__all__`` are importable from here; submodules load on first use (``import medcam3d.evaluate``
stays cheap, as the command line needs).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "metrics": ("IOU_THRESHOLDS", "auroc", "block_fractions", "chance_share", "relevance_mass", "allowed_region_score",
                "relevance_rank_accuracy", "pointing_game", "iou_curve", "best_threshold_iou", "spearman", "ssim",
                "area_under_curve"),
    "exactness": ("completeness_residual", "table1_distance", "cam_equality", "exactness_record"),
    "perturbation": ("cell_partition", "make_fill", "cell_orders", "perturbation_curves", "PerturbationCurves",
                     "demo_hu_to_input"),
    "randomization": ("randomization_groups", "randomized_models", "randomization_curves", "map_similarity"),
    "figure": ("step_by_step", "plot_step_by_step", "FeatureBreakdown"),
    "phantoms": ("PhantomSource", "ConfigGrid", "DirectGrid", "Case"),
    "parts": ("SuiteOptions", "ModelUnderTest", "PARTS", "Part", "PartBase", "register_part", "get_part"),
    "suite": ("evaluate",),
    "result": ("EvaluationResult", "to_markdown"),
    "numbers": ("md_table",),
    "report": ("write_outputs", "update_section"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)  # noqa: PLE0605 - built from _EXPORTS


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
