"""``medcam3d report DIR``: the command line. Cheap to import (jinja2 and matplotlib load inside the command)."""

from __future__ import annotations

import argparse
from typing import Any

from ..argtypes import probability
from ..errors import InputError
from .render import write_report

__all__ = ["cmd_report", "register"]

EXAMPLES = """examples:
  medcam3d report audit/                      # audit/cohort_report.html + audit/cohort_table.csv
  medcam3d report audit/ --pdf                # also audit/cohort_report.pdf (extra: pdf, weasyprint)
  medcam3d report audit/ --out /tmp/r.html --max-scans 50 --montages 1
"""


def cmd_report(args: argparse.Namespace) -> int:
    for name in ("max_scans", "findings", "montages"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0")
    files = write_report(args.dir, html=args.out, pdf=args.pdf, include_paths=args.include_paths, title=args.title,
                         max_scans=args.max_scans, findings=args.findings, montages=args.montages,
                         disagree_below=args.disagree_below, flag_outside=args.flag_outside)
    if not args.quiet:
        print(f"report: {files.html}")
        print(f"table:  {files.csv}" + (f" and {files.parquet}" if files.parquet else ""))
        if files.pdf:
            print(f"pdf:    {files.pdf}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="cohort report (HTML, optional PDF, CSV/Parquet table) of a batch folder",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="a medcam3d batch folder (--out of medcam3d batch)")
    p.add_argument("--out", help="HTML file to write (default: DIR/cohort_report.html)")
    p.add_argument("--pdf", action="store_true", help="also write a PDF next to the HTML (needs weasyprint)")
    p.add_argument("--title", help="report title")
    p.add_argument("--max-scans", type=int, default=200, help="scans with their own section (default 200)")
    p.add_argument("--findings", type=int, default=5, help="top findings listed per scan (default 5)")
    p.add_argument("--montages", type=int, default=2, help="montages embedded per scan (default 2)")
    p.add_argument("--disagree-below", type=probability, default=0.5,
                   help="a scan's methods disagree when their top-10%% overlap is below this (default 0.5)")
    p.add_argument("--flag-outside", type=probability, default=0.5,
                   help="flag classes whose mean positive contribution outside allowed organs exceeds this (0.5)")
    p.add_argument("--include-paths", action="store_true",
                   help="show input paths and unredacted error messages (off by default: paths may identify patients)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=cmd_report)
