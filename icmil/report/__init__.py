"""The run report: ``RUN/report.html`` + ``RUN/report_files/``, self-contained and offline.

Example:
    >>> from icmil.report import write_run_report
    >>> write_run_report("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/report.html')
"""

from icmil.report.build import REPORT_HTML, teacher_kept, write_run_report
from icmil.report.collect import RunContents, collect_run

__all__ = ["REPORT_HTML", "RunContents", "collect_run", "teacher_kept", "write_run_report"]
