"""Command line: ``medcam3d explain | demo | view | batch | report | evaluate``.

A thin layer over the Python API (:mod:`medcam3d.pipeline` and friends). Exit codes: 0 success, 2 bad input or
usage (one line naming the problem; nothing written), 1 internal error (with a hint to report it), 3 (``batch``
only) the run finished but some scans failed or manifest rows were bad.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import __version__
from .argtypes import int_at_least, probability
from .config import SEGMENTATION_TASK, TASKS, Config
from .errors import InputError
from .geometry import GEOMETRIES
from .io import DEFAULT_MAX_VOXELS, Volume, check_dicom_source
from .methods import DEFAULT_METHODS
from .outputs import Summary, check_output_folder
from .pipeline import DicomExport, EmptyScan, ScanResult, Session, read_scan

__all__ = ["build_parser", "main"]

EXPLAIN_EXAMPLES = """examples:
  medcam3d explain scan.nii.gz                       # embedded demo model, all classes, outputs in ./scan_medcam3d
  medcam3d explain dicom_folder/ --out out/          # a DICOM series folder
  medcam3d explain scan.nii.gz --config configs/axialnet_chestct.yaml --model my_axialnet.pt
  medcam3d explain scan.nii.gz --classes positive --full-res top-5 --methods hirescam gradcam gradcampp
  medcam3d explain scan.nii.gz --classes nodule_right_lung 3 --device cuda --quiet
  medcam3d explain dicom_folder/ --dicom-out --dicom-seg 0.5   # also DICOM Parametric Maps and SEGs of the maps
  medcam3d explain scan.nii.gz --config seg.yaml     # a segmentation net (task: segmentation): one target per
                                                     # predicted component; segmentation.nii.gz, targets.csv
  medcam3d explain scan.nii.gz --bundle spleen_ct_segmentation/ --target-mask roi.nii.gz
"""


FULL_RES_HELP = (
    "classes also written at full resolution (a heatmap per method on the scan's own grid, uint8, and a montage): "
    "'all', 'none', 'top-N', 'positive', labels or indices (default: predicted positive, at least the top 3 and at "
    "most 10, highest scores first; a note says when the cap cuts). Cost on a 512 x 512 x 300 CT with HiResCAM + "
    "Grad-CAM: about 10 MB and 1 s per class (2 idle CPU cores; scripts/bench_e2e.py); 'none' writes the "
    "low-resolution maps only (under a second, a few MB)"
)


TARGET_LAYER_HELP = (
    "the explained layer, a dotted module name (e.g. a UNet's bottleneck, to see the context the decoder used) or "
    "'auto', overriding the config's target_layer (default: the config's, else the model's declared layer, else "
    "auto); the certificate says whether the head after it is affine"
)


class _Stages:
    """Progress over named stages: a tqdm bar when stderr is a terminal; otherwise (log files, SLURM) one line per
    stage on stderr, ``medcam3d [  12.3 s] <stage>``, with the time since the command started; nothing when
    quiet."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.t0 = time.perf_counter()
        self.lines = not quiet and not sys.stderr.isatty()
        self.bar = tqdm(total=total, disable=quiet or not sys.stderr.isatty(), leave=False, unit="step")

    def __call__(self, name: str, advance: bool = True) -> None:
        self.bar.set_description(name)
        if advance:
            self.bar.update(1)
        if self.lines:
            print(f"medcam3d [{time.perf_counter() - self.t0:7.1f} s] {name}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _default_out(scan: str) -> Path:
    name = Path(scan.rstrip("/")).name
    for suf in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    return Path(f"{name}_medcam3d")


def _note_placement(result: ScanResult) -> None:
    """One line on stderr (even when quiet) when the map placement fell back to the field (no receptive geometry
    found); it is also recorded in the summary's ``map_geometry.source``."""
    placement = result.explanation.placement
    if placement is not None and placement.fallback:
        tqdm.write(f"medcam3d: note: {placement.note()}", file=sys.stderr)  # above a progress bar, if any


def cmd_explain(args: argparse.Namespace) -> int:
    out = check_output_folder(args.out if args.out else _default_out(args.scan))  # before any work
    if args.dicom_seg is not None and not args.dicom_out:
        raise InputError("--dicom-seg needs --dicom-out")
    dicom = DicomExport(seg_threshold=args.dicom_seg) if args.dicom_out else None
    stages = _Stages(4, args.quiet)
    try:
        stages("reading scan", advance=False)
        volume, t_read = read_scan(args.scan, args.series_uid, args.allow_resample, max_voxels=args.max_voxels)
        if dicom is not None:
            check_dicom_source(volume)
        mask = read_scan(args.target_mask, max_voxels=args.max_voxels)[0] if args.target_mask else None
        stages("loading model")
        session = Session(_config_or_bundle(args), args.model, args.methods, args.device,
                          map_geometry=args.map_geometry, max_voxels=args.max_voxels,
                          ignore_modality=args.ignore_modality, target_layer=args.target_layer)
        stages("explaining")
        written = _explain_and_write(session, volume, out, stages, classes=args.classes, full_res=args.full_res,
                                     read_seconds=t_read, target_mask=mask, dicom=dicom)
        stages("done")
    finally:
        stages.close()
    summary = written.summary
    for line in (summary.assumptions or [])[written.read_notes:]:  # made while writing (DICOM export)
        print(f"medcam3d: note: {line}", file=sys.stderr)
    if not args.quiet:
        _print_notes(summary, written.printed)
        _print_result(summary, out)
    return 0


@dataclass
class _Written:
    """What :func:`_explain_and_write` wrote: the summary, how many of its assumptions were made when reading the
    scan, and the notes already printed."""

    summary: Summary
    read_notes: int
    printed: list[str]


def _explain_and_write(session: Session, volume: Volume, out: Path, stages: _Stages, *,
                       classes: Sequence[str] | None = None, full_res: Sequence[str] | None = None,
                       read_seconds: float | None = None, target_mask: Volume | None = None,
                       dicom: DicomExport | None = None, extra: dict[str, Any] | None = None) -> _Written:
    """Explain ``volume`` and write ``out``, saying what was assumed on the way; a segmentation with nothing to
    explain is written without maps (:meth:`Session.write_empty`), its note printed even when quiet."""
    try:
        result = session.explain_volume(volume, classes, read_seconds=read_seconds, target_mask=target_mask)
    except EmptyScan as e:
        empty = e.result
        for line in [*empty.notes, empty.note]:
            print(f"medcam3d: note: {line}", file=sys.stderr)
        for line in empty.warnings:
            print(f"medcam3d: warning: {line}", file=sys.stderr)
        stages("writing")
        summary = session.write_empty(empty, out, progress=lambda s: stages(s, False), extra=extra)
        return _Written(summary, len(empty.notes), [empty.note])
    _say(result)
    _note_placement(result)
    stages("writing")
    summary = session.write_folder(result, out, classes, full_res, progress=lambda s: stages(s, False), extra=extra,
                                   dicom=dicom)
    return _Written(summary, len(result.notes), list(result.target_notes))


def _say(result: ScanResult) -> None:
    """Print what was assumed (``note``) and what to check (``warning``) on stderr, one line each, even when quiet:
    they are also in the summary."""
    for line in [*result.notes, *result.target_notes]:
        print(f"medcam3d: note: {line}", file=sys.stderr)
    for line in result.warnings:
        print(f"medcam3d: warning: {line}", file=sys.stderr)


def _config_or_bundle(args: argparse.Namespace) -> Config | str | None:
    """``--config`` (a path or name), or the config of the MONAI bundle given with ``--bundle``."""
    if getattr(args, "bundle", None) is None:
        return args.config
    from .monai.bundle import config_or_bundle  # lazy: MONAI's bundle parser is needed only with --bundle

    return config_or_bundle(args.config, args.bundle)


def _print_notes(summary: Summary, printed: Sequence[str] = ()) -> None:
    """The summary's one-line notes (e.g. the full-resolution cap) not ``printed`` already, on stderr."""
    for note in summary.notes or []:
        if note not in printed:
            print(f"medcam3d: note: {note}", file=sys.stderr)


def _print_result(summary: Summary, out: Path) -> None:
    print(f"medcam3d {summary.medcam3d_version}: explained {summary.input.path}")
    if summary.model.synthetic_data_only:
        print("NOTE: the embedded demo model was trained on SYNTHETIC phantoms only; its scores are not clinical.")
    if summary.certificate is not None:
        print(f"certificate: {summary.certificate.kind} - {summary.certificate.summary}")
    if summary.task == SEGMENTATION_TASK:
        _print_targets(summary)
    elif summary.classes:
        _print_classes(summary)
    print(f"outputs: {out.resolve()}  (view: medcam3d view {out})")


def _print_targets(summary: Summary) -> None:
    """A segmentation net's targets: voxels, raw region score (a sum of logits), mean probability over the region."""
    values = ", ".join(f"{v}={n}" for v, n in (summary.segmentation_labels or {}).items())
    print(f"segmentation: {summary.segmentation} ({values})")
    if not summary.targets:
        print("no target explained: the predicted segmentation holds none of the explained classes")
        return
    full = {c.index: c.full_resolution for c in summary.classes}
    width = max(len(t.name) for t in summary.targets)
    print(f"{'target':<{width}}  {'voxels':>7}  {'region score':>12}  {'mean p':>6}  full-res")
    probs = {c.index: c.probability for c in summary.classes}
    for t in summary.targets:
        print(f"{t.name:<{width}}  {t.voxels or 0:7d}  {t.score:12.3f}  {probs.get(t.index, float('nan')):6.3f}  "
              f"{'yes' if full.get(t.index) else '-':>8}")


def _print_classes(summary: Summary) -> None:
    """Classes by score: score, probability, full resolution, HiResCAM-vs-Grad-CAM distance."""
    rows = sorted(summary.classes, key=lambda c: -c.score)
    width = max(len(c.label) for c in rows)
    print(f"{'class':<{width}}  {'score':>8}  {'prob':>6}  full-res  HiResCAM-vs-Grad-CAM L2")
    for c in rows:
        l2 = c.disagreement.l2 if c.disagreement is not None else None
        print(
            f"{c.label:<{width}}  {c.score:8.3f}  {c.probability:6.3f}  "
            f"{'yes' if c.full_resolution else '-':>8}  {'' if l2 is None else f'{l2:.3f}'}"
        )


#: `medcam3d demo`'s phantom seed when the model card names none
DEMO_SEED = 7
#: `medcam3d demo --task segmentation`'s config (the demo segmentation net)
SEG_DEMO_CONFIG = "demo_segnet"
#: the lesions planted in the demo phantom, per task
DEMO_LESIONS = {
    "classification": ("nodule_right_lung", "pleural_effusion_left", "cardiomegaly"),
    "segmentation": ("mass_right_lung", "nodule_left_lung", "pleural_effusion_left"),
}


def cmd_demo(args: argparse.Namespace) -> int:
    # medcam3d.data imports scipy (about half a second): only the demo needs it, not every command line
    from .data import make_phantom, write_nifti

    out = Path(args.out)
    scan_dir = out / "scan"
    exp_dir = check_output_folder(out / "explanation")  # before any work
    stages = _Stages(4, args.quiet)
    try:
        stages("loading demo model", advance=False)
        config = SEG_DEMO_CONFIG if args.task == SEGMENTATION_TASK else None
        session = Session(config, None, args.methods, args.device, map_geometry=args.map_geometry,
                          max_voxels=args.max_voxels, ignore_modality=args.ignore_modality,
                          target_layer=args.target_layer)
        # the model card names a phantom where HiResCAM and Grad-CAM differ visibly (scripts/reproduce_figure8.py)
        chosen = (session.model_card or {}).get("demo") or {}
        seed = args.seed if args.seed is not None else int(chosen.get("seed", DEMO_SEED))
        stages("making a synthetic phantom")
        present = dict.fromkeys(DEMO_LESIONS[args.task], True)
        phantom = make_phantom(seed, present=present, prevalence=0.0)
        scan_dir.mkdir(parents=True, exist_ok=True)
        scan_path = scan_dir / "phantom.nii.gz"
        write_nifti(phantom, scan_path)
        stages("explaining")
        volume, t_read = read_scan(scan_path, max_voxels=args.max_voxels)
        written = _explain_and_write(session, volume, exp_dir, stages, read_seconds=t_read,
                                     extra={"demo": {"seed": seed, "planted": sorted(present)}})
        stages("done")
    finally:
        stages.close()
    if not args.quiet:
        _print_notes(written.summary, written.printed)
        _print_result(written.summary, exp_dir)
        print(f"planted lesions: {', '.join(sorted(present))}; phantom scan and masks: {scan_dir.resolve()}")
        if seed == chosen.get("seed") and chosen.get("look_at"):
            print(f"what to look at: {chosen['look_at']}")
    return 0


def _add_explain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the embedded demo model's)")
    p.add_argument("--model", metavar="CHECKPOINT", help="weights file overriding the config's (torch state_dict)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help="methods to compute (hirescam gradcam gradcampp xgradcam layercam; cam on GAP+FC heads)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    p.add_argument("--target-layer", metavar="LAYER", help=TARGET_LAYER_HELP)
    p.add_argument("--map-geometry", choices=list(GEOMETRIES), default=None,
                   help="where feature-resolution cells go on the scan: auto (the receptive-field centres the model "
                        "declares or its layers give, else the field with a note; default, unless the config sets "
                        "map_geometry), field (the field of view divided evenly, the paper's convention) or "
                        "receptive (the receptive-field centres, else an error)")
    p.add_argument("--max-voxels", type=int_at_least(1), default=None, metavar="N",
                   help=f"largest scan or preprocessing grid, in voxels, checked from headers and spacings before "
                        f"anything that size is allocated (default {DEFAULT_MAX_VOXELS:.3g}; see the README's "
                        "'What medcam3d refuses' table)")
    p.add_argument("--ignore-modality", action="store_true",
                   help="explain a DICOM scan whose Modality the config does not accept (default: refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or printed result (notes and warnings "
                                                         "are still printed on stderr)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medcam3d", description="Truthful 3-D explanations of CNNs on CT scans.")
    ap.add_argument("--version", action="version", version=f"medcam3d {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("explain", help="explain one scan (NIfTI file or DICOM folder)", epilog=EXPLAIN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scan", help="NIfTI (.nii/.nii.gz), NRRD/MHA file, or a DICOM series folder")
    p.add_argument("--out", help="output folder (default: <scan name>_medcam3d)")
    p.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="labels, indices, 'positive' or 'top-K' (default: all classes, at feature resolution)")
    p.add_argument("--full-res", nargs="+", metavar="CLASS", help=FULL_RES_HELP)
    p.add_argument("--series-uid", help="DICOM SeriesInstanceUID to read when the folder holds several series")
    p.add_argument("--allow-resample", action="store_true",
                   help="accept irregularly spaced DICOM series by resampling")
    p.add_argument("--dicom-out", action="store_true",
                   help="DICOM inputs: also write each full-resolution heatmap as a DICOM Parametric Map referencing "
                        "the source series (dicom_pm_*.dcm beside the NIfTIs; needs highdicom)")
    p.add_argument("--dicom-seg", type=probability, metavar="LEVEL",
                   help="with --dicom-out: also each heatmap >= LEVEL (0-1) as a binary DICOM SEG (dicom_seg_*.dcm)")
    p.add_argument("--bundle", metavar="DIR", help="a MONAI bundle folder (configs/inference.json, models/model.pt) "
                                                   "instead of --config")
    p.add_argument("--target-mask", metavar="MASK",
                   help="segmentation models: a mask on the scan's grid (same shape; non-zero = inside), explained as "
                        "the one region of each explained class instead of the predicted components")
    _add_explain_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="explain a synthetic phantom with the embedded demo model")
    p.add_argument("--out", default="medcam3d_demo", help="output folder (default: medcam3d_demo)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"phantom seed (default: the one the model card names, where HiResCAM and Grad-CAM differ "
                        f"visibly; else {DEMO_SEED})")
    p.add_argument("--task", choices=list(TASKS), default="classification",
                   help=f"classification (the demo AxialNet, default) or segmentation (the demo segmentation net, "
                        f"config {SEG_DEMO_CONFIG}: one target per predicted lesion component)")
    _add_explain_options(p)
    p.set_defaults(func=cmd_demo)

    for module in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise  # a missing dependency inside an existing command module is a real error
            continue
        mod.register(sub)
    return ap


#: modules adding sub-commands: each has ``register(subparsers)`` adding a parser whose ``func(args) -> int`` runs
#: the command. They must be cheap to import (heavy imports go inside the command functions).
_COMMAND_MODULES = (
    "medcam3d.viewer.command",
    "medcam3d.batch.command",
    "medcam3d.report.command",
    "medcam3d.evaluate.command",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"medcam3d: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medcam3d: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: say it is our fault
        traceback.print_exc(file=sys.stderr)
        print(
            f"medcam3d: internal error: {type(e).__name__}: {e}\n"
            "This is a bug in medcam3d; please report it with the command line and the traceback above.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
