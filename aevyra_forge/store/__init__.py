"""The only writer under .forge/: the append-only experiment log with exact replay, the
human and machine tables, best_recipe.yaml and the run lock."""

from __future__ import annotations

from aevyra_forge.store.rows import COLUMNS, experiment_rows
from aevyra_forge.store.run_store import Run, RunStore, read_config, read_records, resolve_run_dir

__all__ = [
    "COLUMNS", "Run", "RunStore", "experiment_rows", "read_config", "read_records",
    "resolve_run_dir",
]
