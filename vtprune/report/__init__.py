"""``vtprune report``: every run below a results folder → markdown tables + PNG plots (or the merged table).

``show`` (which visual tokens were kept, drawn on the image the model saw) lives in ``show.py``.
"""

from vtprune.report.load import Results, load_results
from vtprune.report.document import write_report
from vtprune.report.tables import accuracy_frame, merged_frame, speed_frame

__all__ = ["Results", "accuracy_frame", "load_results", "merged_frame", "speed_frame", "write_report"]
