"""Writing evaluation results: the output folder of ``medcam3d evaluate`` and sections of docs/results.md.

Output folder (every file written atomically: temporary file in the folder, then ``os.replace``)::

    evaluation.json        the whole result of :func:`medcam3d.evaluate.suite.evaluate` (per-case records,
                           summary, costs, passes spent, options, command)
    evaluation.md          markdown tables of the summary (:func:`medcam3d.evaluate.suite.to_markdown`)
    step_by_step.png       the paper's Figure 7 analogue for one (scan, class), when the figure part ran

:func:`update_section` replaces one named section of a markdown file (between ``<!-- BEGIN name -->`` and
``<!-- END name -->`` markers, appended when absent), so each reproduction script owns its section of
docs/results.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["EVALUATION_JSON", "EVALUATION_MD", "FIGURE_PNG", "update_section", "write_outputs", "write_text_atomic"]

EVALUATION_JSON = "evaluation.json"
EVALUATION_MD = "evaluation.md"
FIGURE_PNG = "step_by_step.png"


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same folder and ``os.replace``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    return obj


def write_outputs(result: Mapping[str, Any], out_dir: str | os.PathLike[str], command: str | None = None,
                  title: str = "medcam3d evaluation") -> dict[str, Path]:
    """Write evaluation.json, evaluation.md and (if computed) step_by_step.png into ``out_dir``.

    Returns: file kind -> path."""
    from .figure import plot_step_by_step
    from .suite import to_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = _jsonable(result)
    if command is not None:
        record["command"] = command
    files = {"json": write_text_atomic(out / EVALUATION_JSON, json.dumps(record, indent=1) + "\n")}
    md = to_markdown(result, title, command)
    if result.get("_figure") is not None and result.get("figure"):
        info = result["figure"]
        files["figure"] = plot_step_by_step(
            result["_figure"], out / FIGURE_PNG,
            title=f"{info['label']} on {info['case']} (score {info['score']:+.3f}): Grad-CAM = Σ α_f A^f, "
                  "HiResCAM = Σ ∂s/∂A^f ⊙ A^f")
        md += f"\n![step by step]({FIGURE_PNG})\n"
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
