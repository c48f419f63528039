"""Writing evaluation results: the output folder of ``medcam3d evaluate`` and sections of docs/results.md.

Output folder (every file written atomically with :mod:`medcam3d.files`)::

    evaluation.json        the whole result of :func:`medcam3d.evaluate.suite.evaluate` (per-case records,
                           summary, costs, passes spent, options, command)
    evaluation.md          markdown tables of the summary (:func:`medcam3d.evaluate.result.to_markdown`)
    step_by_step.png       the paper's Figure 7 analogue for one (scan, class), when the figure part ran

:func:`update_section` replaces one named section of a markdown file (between ``<!-- BEGIN name -->`` and
``<!-- END name -->`` markers, appended when absent), so each reproduction script owns its section of
docs/results.md.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import write_json_atomic, write_text_atomic
from .parts import get_part
from .parts.figure import FIGURE_PNG
from .result import EvaluationResult, to_markdown

# write_text_atomic stays importable from here for one release (its home is medcam3d.files)
__all__ = ["EVALUATION_JSON", "EVALUATION_MD", "FIGURE_PNG", "check_out_dir", "update_section", "write_outputs",
           "write_text_atomic"]

EVALUATION_JSON = "evaluation.json"
EVALUATION_MD = "evaluation.md"


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: tuples as lists, NaN as None, tensors and arrays as lists; keys starting with "_"
    dropped."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    return obj


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Refuse, before any work and creating nothing, an ``--out`` the outputs could not be written to: an existing
    file, a folder where an output file goes, or no writable folder above it (InputError, one line)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError("--out exists and is not a folder", out)
    for name in (EVALUATION_JSON, EVALUATION_MD, FIGURE_PNG):
        if (out / name).is_dir():
            raise InputError(f"--out holds a folder named {name}, where an output file goes", out)
    above = out.resolve()
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir() or not os.access(above, os.W_OK):
        raise InputError(f"--out cannot be created: {above} is not a writable folder", out)
    return out


def write_outputs(result: EvaluationResult, out_dir: str | os.PathLike[str], command: str | None = None,
                  title: str = "medcam3d evaluation") -> dict[str, Path]:
    """Write evaluation.json, evaluation.md and each part's files (the step-by-step figure) into ``out_dir``.

    Returns: file kind (``"json"``, ``"figure"``, ``"markdown"``) -> path."""
    out = check_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = _jsonable(result.to_dict())
    if command is not None:
        record["command"] = command
    files = {"json": write_json_atomic(record, out / EVALUATION_JSON, indent=1)}
    md = to_markdown(result, title, command)
    for name, summary in result.summaries.items():
        for written in get_part(name)().write(summary, out):
            files[written.kind] = written.path
            md += written.markdown
    files["markdown"] = write_text_atomic(out / EVALUATION_MD, md)
    return files


def update_section(path: str | os.PathLike[str], name: str, body: str, header: str | None = None) -> Path:
    """Replace (or append) the section ``name`` of the markdown file ``path``.

    The section is delimited by ``<!-- BEGIN name -->`` / ``<!-- END name -->``; ``header`` is written at the top of
    a new file. The write is atomic."""
    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.is_file() else (header or "")
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    return write_text_atomic(p, text if text.endswith("\n") else text + "\n")
