"""``medcam3d evaluate``: run the evaluation suite on synthetic phantoms and write a JSON + markdown summary.

Usage::

    medcam3d evaluate --out eval/                                  # demo model, 4 phantoms, seed 0, every part
    medcam3d evaluate --phantoms 20 --seed 3 --out eval/ --parts exactness ground_truth localisation
    medcam3d evaluate --config my.yaml --model my.pt --phantoms 8 --out eval/ --fills air soft_tissue blur
    medcam3d evaluate --model medcam3d/weights/demo_axialnet_cleverhans.pt --clever-hans nodule_right_lung \\
        --present nodule_right_lung --out eval_ch/

What it does: phantoms ``(seed, 0..N-1)`` (:mod:`medcam3d.data`) are rendered, preprocessed with the config's own
pipeline (default: the embedded demo model's), explained once (HiResCAM and Grad-CAM, all classes), and the parts
of :mod:`medcam3d.evaluate.suite` run on them:

* ``exactness``      completeness residuals, Table-1 L2 of Grad-CAM from HiResCAM, CAM equality (free);
* ``ground_truth``   share of positive contribution inside each lesion / the marker vs chance, and the score drop
                     when the lesion / marker is removed from the same patient (1 pass per removal);
* ``localisation``   relevance mass, rank accuracy, pointing game, best-threshold IoU (thresholds chosen on the first
                     half of the phantoms), allowed-region score a/(a+b) (free);
* ``perturbation``   deletion / insertion AUCs over 3-D cells, MoRF / LeRF / random, per fill
                     (``4(T-1)`` passes per (scan, class, method); limited to ``--perturbation-scans`` phantoms);
* ``randomisation``  cascading / independent parameter randomisation curves (1 explanation per layer group and
                     mode; limited to ``--randomisation-scans`` phantoms);
* ``figure``         the step-by-step figure (Figure 7) for one (scan, class).

Outputs in ``--out`` (created if needed; files replaced atomically): ``evaluation.json`` (everything, with the
command and seed), ``evaluation.md`` (tables) and ``step_by_step.png``. Bad arguments exit with code 2 and write
nothing. Cheap to import (no scipy, MONAI or matplotlib): the work happens inside :func:`cmd_evaluate`; the choices
of ``--parts`` are the registered parts (:mod:`medcam3d.evaluate.parts`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING, Any

import torch

from ..argtypes import int_at_least, probability
from ..config import load_config
from ..errors import InputError
from ..methods import DEFAULT_METHODS
from ..pipeline import resolve_device
from .parts import PARTS, REGISTRY, ModelUnderTest, SuiteOptions
from .parts.base import MAP_GEOMETRIES, RANDOMISATION_MODES
from .perturbation import FILLS
from .report import check_out_dir, write_outputs
from .suite import evaluate

if TYPE_CHECKING:  # types only: the phantoms import scipy (see build_suite)
    from .phantoms import PhantomSource

# PARTS (the built-in parts) and FILLS stay importable from here for one release; their homes are
# medcam3d.evaluate.parts and medcam3d.evaluate.perturbation
__all__ = ["FILLS", "PARTS", "build_suite", "cmd_evaluate", "command_line", "register"]

EXAMPLES = """examples:
  medcam3d evaluate --out eval/                                   # demo model, 4 phantoms, seed 0
  medcam3d evaluate --phantoms 20 --seed 3 --out eval/ --parts exactness ground_truth localisation
  medcam3d evaluate --config my.yaml --model my.pt --out eval/ --fills air soft_tissue blur --steps 10
  medcam3d evaluate --model demo_axialnet_cleverhans.pt --clever-hans nodule_right_lung --out eval_ch/
"""


def build_suite(args: argparse.Namespace) -> tuple[ModelUnderTest, PhantomSource, SuiteOptions]:
    """(ModelUnderTest, PhantomSource, SuiteOptions) from parsed arguments; InputError for bad ones."""
    # lazy: the phantoms (medcam3d.data) import scipy, which the command line must not load to show its help
    from ..data import LABELS
    from .phantoms import ConfigGrid, PhantomSource

    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    cfg = load_config(args.config or "demo_axialnet")
    labels = list(cfg.labels)
    for name, values in (("--classes", args.classes), ("--present", args.present)):
        if values and name == "--classes" and values in (["present"], ["all"]):
            continue
        for v in values or []:
            if v not in labels:
                raise InputError(f"{name}: unknown label {v!r} (labels: {', '.join(labels[:5])}, ...)")
    for name, v in (("--clever-hans", args.clever_hans), ("--figure-label", args.figure_label)):
        if v is not None and v not in labels:
            raise InputError(f"{name}: unknown label {v!r} (labels: {', '.join(labels[:5])}, ...)")
    phantom_labels = [v for v in (args.present or []) + ([args.clever_hans] if args.clever_hans else [])]
    for v in phantom_labels:
        if v not in LABELS:
            raise InputError(f"the phantoms have no label {v!r}")
    mut = ModelUnderTest.from_config(cfg, args.model, device)
    clever = {"label": args.clever_hans, "p_with": 1.0, "p_without": 1.0} if args.clever_hans else None
    source = PhantomSource(ConfigGrid(cfg), args.phantoms, args.seed, prevalence=args.prevalence,
                           present={v: True for v in args.present or []} or None, clever_hans=clever)
    classes: Any = "present"
    if args.classes and args.classes not in (["present"],):
        classes = "all" if args.classes == ["all"] else list(args.classes)
    options = SuiteOptions(
        methods=tuple(args.methods), parts=tuple(args.parts), classes=classes, removal=not args.no_removal,
        fills=tuple(args.fills), steps=args.steps, perturbation_scans=args.perturbation_scans,
        batch_size=args.batch_size, randomisation=tuple(args.randomisation), randomisation_depth=args.depth or None,
        randomisation_scans=args.randomisation_scans, figure_label=args.figure_label, seed=args.seed, device=device,
        map_geometry=args.map_geometry or cfg.map_geometry or "auto",
    )
    try:
        options.check()
    except ValueError as e:
        raise InputError(str(e)) from None
    return mut, source, options


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``medcam3d evaluate``: the suite, then the output folder (checked first: nothing runs for a bad one)."""
    check_out_dir(args.out)
    mut, source, options = build_suite(args)
    say = (lambda s: None) if args.quiet else (lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    result = evaluate(mut, source, options, progress=say)
    files = write_outputs(result, args.out, command=command_line(args))
    if not args.quiet:
        print(f"evaluated {mut.name} on {len(source)} phantoms (seed {source.seed}); certificate: "
              f"{', '.join(result.certificates)}; cells placed: {'; '.join(result.placements)}")
        for kind, path in files.items():
            print(f"{kind}: {path}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate explanations and the model on synthetic phantoms",
                              description="Is an explanation faithful, and what does it say about the model? Runs the "
                                          "evaluation suite on synthetic chest-CT phantoms.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (evaluation.json, evaluation.md, step_by_step.png)")
    p.add_argument("--phantoms", type=int_at_least(1), default=4, help="number of phantoms (default 4)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="phantom dataset seed; case i is seed (S, i) (default 0)")
    p.add_argument("--config", help="YAML config (default: the embedded demo model's)")
    p.add_argument("--model", metavar="CHECKPOINT", help="weights file overriding the config's")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help=f"methods to evaluate (default: {' '.join(DEFAULT_METHODS)})")
    parts = list(REGISTRY)
    p.add_argument("--parts", nargs="+", default=parts, choices=parts, metavar="PART",
                   help=f"parts to run (default all: {' '.join(parts)})")
    p.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="'present' (default: each phantom's shown labels), 'all', or labels")
    p.add_argument("--prevalence", type=probability, default=0.3, help="probability of each label (default 0.3)")
    p.add_argument("--present", nargs="+", metavar="LABEL", help="labels shown on every phantom")
    p.add_argument("--clever-hans", metavar="LABEL",
                   help="put the spurious marker on every phantom (the marker-trained model's label)")
    p.add_argument("--no-removal", action="store_true", help="skip the score change when lesions are removed")
    p.add_argument("--fills", nargs="+", default=["air"], choices=FILLS, metavar="FILL",
                   help=f"perturbation fills: {' '.join(FILLS)} (default: air)")
    p.add_argument("--steps", type=int_at_least(1), default=8, help="perturbation steps T (default 8)")
    p.add_argument("--perturbation-scans", type=int_at_least(0), default=2,
                   help="phantoms with perturbation curves (default 2)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="inputs per forward pass (default 8)")
    p.add_argument("--randomisation", nargs="*", default=list(RANDOMISATION_MODES), choices=RANDOMISATION_MODES,
                   metavar="MODE", help=f"randomisation modes (default: {' '.join(RANDOMISATION_MODES)})")
    p.add_argument("--randomisation-scans", type=int_at_least(0), default=2,
                   help="phantoms with randomisation curves (default 2)")
    p.add_argument("--depth", type=int_at_least(0), default=2,
                   help="group layers for randomisation by this many name parts (0: every layer; default 2)")
    p.add_argument("--figure-label", metavar="LABEL", help="label of the step-by-step figure")
    p.add_argument("--map-geometry", choices=list(MAP_GEOMETRIES), default=None,
                   help="where feature cells lie for shares, localisation heatmaps and a/(a+b): auto (the "
                        "receptive-field centres the model declares or its layers give, else the field; default, "
                        "unless the config sets map_geometry), field (the paper's convention) or receptive (the "
                        "receptive-field centres, else an error)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int_at_least(0), default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=cmd_evaluate)


def command_line(args: argparse.Namespace) -> str:
    """The command, rebuilt from the parsed arguments with every option explicit (recorded in the outputs)."""
    parts = ["medcam3d", "evaluate", "--out", str(args.out), "--phantoms", str(args.phantoms), "--seed", str(args.seed)]
    for opt, value in (("--config", args.config), ("--model", args.model), ("--clever-hans", args.clever_hans),
                       ("--figure-label", args.figure_label)):
        if value is not None:
            parts += [opt, str(value)]
    for opt, values in (("--methods", args.methods), ("--parts", args.parts), ("--classes", args.classes),
                        ("--present", args.present), ("--fills", args.fills), ("--randomisation", args.randomisation)):
        if values:
            parts += [opt, *map(str, values)]
    parts += ["--prevalence", str(args.prevalence), "--steps", str(args.steps), "--perturbation-scans",
              str(args.perturbation_scans), "--randomisation-scans", str(args.randomisation_scans), "--depth",
              str(args.depth)]
    if args.no_removal:
        parts.append("--no-removal")
    return " ".join(shlex.quote(p) for p in parts)
