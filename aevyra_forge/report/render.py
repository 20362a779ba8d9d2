"""`aevyra-forge report`: what a run found, read from its store without taking the lock, as
a summary plus the experiments table, rendered for a terminal (rich), TSV or JSON. Returns
strings and renderables; cli.py prints them."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from aevyra_forge.core.values import ExperimentRecord, best_record
from aevyra_forge.store.rows import COLUMNS, experiment_rows, format_cell, rows_to_tsv
from aevyra_forge.store.run_store import read_config, read_records, resolve_run_dir

_STATUS_STYLE = {"ok": "green", "duplicate": "dim", "invalid": "yellow"}  # others: red


class RunSummary(BaseModel):
    """The headline figures of one run. `best_*` describe the incumbent as the loop defines
    it (core.values.best_record: the latest record that took the lead); they are None
    when nothing was kept (then `note` says why)."""

    model_config = ConfigDict(frozen=True)

    run_dir: str
    model: str
    hardware: str
    experiments: int
    baseline_throughput: float | None  # output tokens/s
    best_exp: int | None
    best_score: float | None
    best_recipe_id: str | None
    best_generation: int | None
    best_throughput: float | None  # output tokens/s
    best_p99_ms: float | None  # E2E latency p99, milliseconds
    layers_reached: list[int]
    statuses: dict[str, int]
    completed: bool
    llm_cost_usd: float
    note: str


def summarize(run_dir: Path) -> RunSummary:
    path = resolve_run_dir(run_dir)
    return _summary(path, read_config(path), read_records(path))


def render_tsv(run_dir: Path) -> str:
    return rows_to_tsv(experiment_rows(read_records(resolve_run_dir(run_dir))))


def render_json(run_dir: Path) -> str:
    path = resolve_run_dir(run_dir)
    records = read_records(path)
    doc = {"summary": _summary(path, read_config(path), records).model_dump(mode="json"),
           "experiments": experiment_rows(records)}
    return json.dumps(doc, indent=2) + "\n"


def render_table(run_dir: Path) -> Group:
    """A summary panel over the experiments table, rationales included."""
    path = resolve_run_dir(run_dir)
    records = read_records(path)
    summary = _summary(path, read_config(path), records)
    rows = experiment_rows(records)
    for row, rec in zip(rows, records, strict=True):  # the table also says why it was decided
        if rec.decision and rec.decision not in row["rationale"]:
            row["rationale"] = f"{row['rationale']} -> {rec.decision}"
    return Group(_panel(summary), _table(rows))


def _summary(path: Path, config: dict[str, Any],
             records: Sequence[ExperimentRecord]) -> RunSummary:
    baseline = next((r for r in records if r.exp == 0), None)
    baseline_tp = (baseline.metrics.output_throughput
                   if baseline is not None and baseline.status == "ok" and baseline.metrics
                   else None)
    best = best_record(records)
    metrics = best.metrics if best is not None else None
    return RunSummary(
        run_dir=str(path),
        model=str(config.get("model", "?")),
        hardware=str(config.get("hardware", "?")),
        experiments=len(records),
        baseline_throughput=baseline_tp,
        best_exp=best.exp if best else None,
        best_score=best.score if best else None,
        best_recipe_id=best.recipe_id if best else None,
        best_generation=best.generation if best else None,
        best_throughput=metrics.output_throughput if metrics else None,
        best_p99_ms=metrics.e2e_ms.p99 if metrics else None,
        layers_reached=sorted({r.layer for r in records}),
        statuses=dict(Counter(r.status for r in records).most_common()),
        completed=(path / "completed.json").exists(),
        llm_cost_usd=round(sum(r.llm.cost_usd for r in records), 6),
        note=_note(records, baseline, best),
    )


def _note(records: Sequence[ExperimentRecord], baseline: ExperimentRecord | None,
          best: ExperimentRecord | None) -> str:
    if not records:
        return "no experiments recorded yet"
    if best is not None:
        if best.exp == 0:
            return "no change beat the baseline; vLLM's defaults are the best recipe found"
        return f"best is experiment {best.exp} (recipe {best.recipe_id})"
    if baseline is not None and baseline.status != "ok":
        why = f": {baseline.reason}" if baseline.reason else ""
        return (f"the baseline failed ({baseline.status}{why}) and no experiment was kept; "
                "check the baseline's log under logs/")
    return "no experiment was kept"


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _panel(s: RunSummary) -> Panel:
    speedup = (f" ({s.best_throughput / s.baseline_throughput:.2f}x baseline)"
               if s.best_throughput and s.baseline_throughput else "")
    state = "completed" if s.completed else "not completed (resumable)"
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
        s.note,
    ]
    return Panel(Text("\n".join(lines)), title="aevyra-forge run", expand=False)


def _table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(show_lines=False, header_style="bold")
    for col in COLUMNS:
        numeric = col not in {"id", "kept", "status", "slo", "rationale"}
        wraps = col in ("rationale", "slo")
        table.add_column(col, justify="right" if numeric else "left",
                         overflow="fold", no_wrap=not wraps,
                         ratio=1 if col == "rationale" else None)
    for row in rows:
        cells = [Text(format_cell(col, row[col])) for col in COLUMNS]
        cells[COLUMNS.index("status")].stylize(_STATUS_STYLE.get(row["status"], "red"))
        table.add_row(*cells, style="bold" if row["kept"] else None)
    return table
