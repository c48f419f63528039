"""``medcam3d report DIR``: a cohort report for a ``medcam3d batch`` folder.

* :mod:`~medcam3d.report.collect`  finished scans, failures and the (scan, class) table, privacy filtering;
* :mod:`~medcam3d.report.plots`    matplotlib figures and montage thumbnails (PNG bytes);
* :mod:`~medcam3d.report.render`   the self-contained HTML (jinja2, autoescaped, templates/), PDF (weasyprint),
  CSV / Parquet table;
* :mod:`~medcam3d.report.command`  the command line.

Importing this package imports neither jinja2 nor matplotlib.
"""

from __future__ import annotations

from typing import Any

__all__ = ["collect", "table_rows", "write_report"]


def write_report(*args: Any, **kwargs: Any) -> Any:
    """See :func:`medcam3d.report.render.write_report`."""
    from .render import write_report as _write

    return _write(*args, **kwargs)


def collect(*args: Any, **kwargs: Any) -> Any:
    """See :func:`medcam3d.report.collect.collect`."""
    from .collect import collect as _collect

    return _collect(*args, **kwargs)


def table_rows(*args: Any, **kwargs: Any) -> Any:
    """See :func:`medcam3d.report.collect.table_rows`."""
    from .collect import table_rows as _rows

    return _rows(*args, **kwargs)
