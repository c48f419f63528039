"""Numbers as the evaluation outputs show them: JSON numbers, means that skip missing values, markdown tables.

* :func:`json_number` -- a float for ``evaluation.json``, ``None`` for NaN / infinity / non-numbers;
* :func:`mean_of`, :func:`mean_curve` -- means over cases that skip ``None`` and NaN;
* :func:`fmt_number`, :func:`md_table` -- GitHub markdown tables (``None`` and NaN shown as "–").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["fmt_number", "json_number", "md_table", "mean_curve", "mean_of"]


def json_number(value: Any) -> float | None:
    """A JSON number: ``float(value)``, or None for NaN, infinity and values that are not numbers."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def mean_of(values: Iterable[Any]) -> float | None:
    """Mean of the finite values (None and NaN skipped); None when there are none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(xs)) if xs else None


def mean_curve(curves: Sequence[Sequence[float | None]]) -> list[float | None] | None:
    """Point-wise mean of equally long curves (NaN/None skipped at each point); None when there are no curves."""
    if not curves:
        return None
    arr = np.array(curves, dtype=np.float64)  # None -> NaN
    with np.errstate(invalid="ignore"):
        m = np.nanmean(arr, axis=0) if np.isfinite(arr).any() else arr[0]
    return [json_number(v) for v in m]


def fmt_number(value: Any, digits: int = 3) -> str:
    """A number for a markdown table: integers as they are, floats with ``digits`` decimals (scientific notation
    below ``10^-digits``), None / NaN / infinity as "–", anything else as ``str``."""
    if value is None:
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.1e}"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub markdown table; numbers with ``digits`` decimals, None/NaN as "–", strings as they are."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(v if isinstance(v, str) else fmt_number(v, digits) for v in r) + " |")
    return "\n".join(lines)
