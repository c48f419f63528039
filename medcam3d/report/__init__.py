"""``medcam3d report DIR``: a cohort report for a ``medcam3d batch`` folder.

* :mod:`~medcam3d.report.collect`  finished scans, failures and the (scan, class) table -- (scan, target) for
  segmentation networks, with the targets per scan -- privacy filtering;
* :mod:`~medcam3d.report.plots`    matplotlib figures and montage thumbnails (PNG bytes);
* :mod:`~medcam3d.report.render`   the self-contained HTML (jinja2, autoescaped, templates/), PDF (weasyprint),
  CSV / Parquet table;
* :mod:`~medcam3d.report.command`  the command line.

Importing this package imports neither jinja2 nor matplotlib.
"""

from __future__ import annotations

from .collect import collect, table_rows
from .render import write_report

__all__ = ["collect", "table_rows", "write_report"]
