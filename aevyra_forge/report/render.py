"""`aevyra-forge report`: what a run found, read from its store without taking the lock, as
a summary plus the experiments table, rendered for a terminal (rich), TSV, JSON, Markdown
or HTML from the one report model (model.py). Returns strings and renderables; cli.py
prints them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from aevyra_forge.core.errors import UsageError
from aevyra_forge.decide.diagnosis import summary as diagnosis_summary
from aevyra_forge.report.cost import one_line
from aevyra_forge.report.model import Report, RunSummary, build_report
from aevyra_forge.store.rows import COLUMNS, format_cell, rows_to_tsv

__all__ = ["FORMATS", "REPORT_HTML", "RunSummary", "as_report", "render_json", "render_table",
           "render_text", "render_tsv", "summarize"]

FORMATS = ("table", "tsv", "json", "md", "html")
REPORT_HTML = "report.html"  # the morning report, written into the run folder

_STATUS_STYLE = {"ok": "green", "duplicate": "dim", "invalid": "yellow"}  # others: red
WIDE_TABLE = 150  # columns from which the experiments table shows every column, boxed
_SHORT = {"layer": "L", "throughput": "tok/s", "p99_ms": "p99 ms", "accuracy": "acc"}


def summarize(run_dir: Path) -> RunSummary:
    return build_report(run_dir).summary


def as_report(source: Report | Path, gpu_price: float | None = None) -> Report:
    """The report model, computed once by the caller or here from a run folder (with
    `gpu_price`, USD per GPU-hour, overriding the run's for the cost estimate)."""
    return source if isinstance(source, Report) else build_report(source, gpu_price)


def render_text(source: Report | Path, format: str, gpu_price: float | None = None) -> str:
    """The report as text in one of FORMATS other than the terminal table."""
    report = as_report(source, gpu_price)
    if format == "tsv":
        return render_tsv(report)
    if format == "json":
        return render_json(report)
    if format == "md":
        from aevyra_forge.report.markdown import render_md

        return render_md(report)
    if format == "html":  # matplotlib loads only for the page that draws charts
        from aevyra_forge.report.html import render_html

        return render_html(report)
    raise UsageError(f"--format {format}: expected one of {', '.join(FORMATS)} (table "
                     "prints to the terminal only)")


def render_tsv(source: Report | Path) -> str:
    """The experiments table as TSV: the run store's experiments.tsv, with round and
    worker columns for a run that had several workers."""
    report = as_report(source)
    if report.columns == COLUMNS:
        return rows_to_tsv(report.table)
    lines = ["\t".join(report.columns)]
    lines += ["\t".join(format_cell(c, row.get(c)) for c in report.columns)
              for row in report.table]
    return "\n".join(lines) + "\n"


def render_json(source: Report | Path) -> str:
    report = as_report(source)
    doc = {"summary": report.summary.model_dump(mode="json"), "experiments": report.table,
           "cost": report.cost.model_dump(mode="json")}
    return json.dumps(doc, indent=2) + "\n"


def render_table(source: Report | Path, gpu_price: float | None = None) -> Group:
    """A summary panel over the experiments table, rationales included."""
    report = as_report(source, gpu_price)
    rows = [dict(row) for row in report.table]
    for row, exp in zip(rows, report.experiments, strict=True):  # also say why it was decided
        if exp.decision and exp.decision not in row["rationale"]:
            row["rationale"] = f"{row['rationale']} -> {exp.decision}"
    return Group(_panel(report), _ExperimentTable(rows, report.columns))


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _panel(report: Report) -> Panel:
    s = report.summary
    speedup = (f" ({s.best_throughput / s.baseline_throughput:.2f}x baseline)"
               if s.best_throughput and s.baseline_throughput else "")
    state = (f"completed: {report.stop_reason}" if s.completed and report.stop_reason
             else "completed" if s.completed else "not completed (resumable)")
    statuses = ", ".join(f"{k} {v}" for k, v in s.statuses.items()) or "-"
    lines = [
        f"model       {s.model}",
        f"hardware    {s.hardware}",
        f"run         {s.run_dir}  [{state}]",
        f"experiments {s.experiments}  ({statuses}); layers "
        f"{', '.join(map(str, s.layers_reached)) or '-'}",
        f"baseline    {_fmt(s.baseline_throughput, '.1f', ' tok/s')}",
        f"best        {_fmt(s.best_throughput, '.1f', ' tok/s')}{speedup}, score "
        f"{_fmt(s.best_score, '.3f')}, p99 {_fmt(s.best_p99_ms, '.1f', ' ms')}, recipe "
        f"{s.best_recipe_id or '-'} gen {_fmt(s.best_generation, 'd')}",
        f"LLM cost    ${s.llm_cost_usd:.{2 if s.llm_cost_usd >= 1 else 3}f}",
        f"serving     {one_line(report.cost)}",
        s.note,
    ]
    if report.best is not None and report.best.deploy_command:
        lines.insert(-1, f"deploy      {report.best.deploy_command}")
        if report.best.deploy_caveat:
            lines.insert(-1, f"            before deploying: {report.best.deploy_caveat}")
    if report.diagnosis is not None:
        binding = diagnosis_summary(report.diagnosis).splitlines()[0]
        lines.insert(-1, f"diagnosis   {binding}")
    return Panel(Text("\n".join(lines)), title="aevyra-forge run", expand=False)


class _ExperimentTable:
    """The experiments table, laid out for the width it is drawn at: every column, boxed,
    from WIDE_TABLE columns up; below that (a 100-column terminal) without the recipe id
    and generation, an unused SLO column, box lines and long headers, so that the
    rationale keeps room to be read."""

    def __init__(self, rows: Sequence[dict[str, Any]],
                 columns: tuple[str, ...] = COLUMNS) -> None:
        self.rows = rows
        self.columns = columns

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        del console
        yield _table(self.rows, wide=options.max_width >= WIDE_TABLE, columns=self.columns)


def _table(rows: Sequence[dict[str, Any]], wide: bool = True,
           columns: tuple[str, ...] = COLUMNS) -> Table:
    if wide:
        table = Table(show_lines=False, header_style="bold")
    else:
        unused_slo = all(format_cell("slo", row["slo"]) in ("", "-", "ok") for row in rows)
        columns = tuple(c for c in columns if c not in ("id", "gen")
                        and not (c == "slo" and unused_slo))
        table = Table(show_lines=False, header_style="bold", box=box.SIMPLE_HEAD,
                      pad_edge=False, collapse_padding=True)
    for col in columns:
        numeric = col not in {"id", "kept", "status", "slo", "rationale", "worker"}
        wraps = col in ("rationale", "slo")
        table.add_column(col if wide else _SHORT.get(col, col),
                         justify="right" if numeric else "left",
                         overflow="fold", no_wrap=not wraps,
                         ratio=1 if col == "rationale" else None)
    for row in rows:
        cells = [Text(format_cell(col, row[col])) for col in columns]
        cells[columns.index("status")].stylize(_STATUS_STYLE.get(row["status"], "red"))
        table.add_row(*cells, style="bold" if row["kept"] else None)
    return table
