"""A run written by an earlier release must keep loading: the store replays it, the loop
rebuilds the same state from it, and the report renders it (STYLE habit 3). The
notebooks are executed by a kernel on a fresh dry run in tests/test_notebooks.py."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.loop.tuner import LoopState
from aevyra_forge.report.render import render_table, summarize
from aevyra_forge.store.run_store import read_config, read_records, resolve_run_dir

GOLDEN = Path(__file__).parents[1] / "data" / "golden_run"


def test_golden_run_replays() -> None:
    run = resolve_run_dir(GOLDEN)
    records = read_records(run)
    assert [r.exp for r in records] == list(range(8))
    assert records[0].status == "boot_failed"  # A10G cannot hold the default context
    completed = json.loads((run / "completed.json").read_text())
    state = LoopState(records=records, baseline=Recipe(model=read_config(run)["model"]))
    assert state.best.id == completed["best_recipe_id"]
    assert state.best_score == completed["best_score"]
    assert state.reference is not None and state.reference == records[1].metrics


def test_golden_run_reports() -> None:
    summary = summarize(GOLDEN)
    assert summary.experiments == 8 and summary.completed
    assert summary.layers_reached == [1, 2]
    console = Console(record=True, width=200)
    console.print(render_table(GOLDEN))
    assert "quant_method" in console.export_text()
