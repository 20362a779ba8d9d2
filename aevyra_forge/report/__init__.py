"""Reading a finished or running run: its summary and experiment table, rendered as a rich
table, TSV or JSON."""

from __future__ import annotations

from aevyra_forge.report.render import RunSummary, render_json, render_table, render_tsv, summarize

__all__ = [
    "RunSummary", "render_json", "render_table", "render_tsv", "summarize",
]
