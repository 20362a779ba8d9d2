"""Reading a finished or running run: one report model (model.py, best.py) computed from
the run folder, rendered as a rich table, TSV, JSON, Markdown or a self-contained HTML page
with charts, and the deploy exports."""

from __future__ import annotations

from aevyra_forge.report.best import BestVsBaseline, Change, SloVerdict
from aevyra_forge.report.model import (
    ExperimentRow,
    Failure,
    Report,
    RunSummary,
    Totals,
    build_report,
)
from aevyra_forge.report.render import render_json, render_table, render_tsv, summarize

__all__ = [
    "BestVsBaseline", "Change", "ExperimentRow", "Failure", "Report", "RunSummary",
    "SloVerdict", "Totals", "build_report", "render_json", "render_table", "render_tsv",
    "summarize",
]
