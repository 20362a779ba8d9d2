"""The experiments table (SPEC §3): one row per experiment record, in COLUMNS order, with
fixed decimals per column; written as TSV and JSON by the run store and shown by the report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aevyra_forge.core.values import ExperimentRecord

# SPEC §3's columns, plus the noise interval of the gain over the incumbent (issue #5) and
# the SLO status, before the free-text rationale.
COLUMNS = ("exp", "id", "gen", "layer", "score", "throughput", "p99_ms", "accuracy",
           "kept", "status", "interval", "slo", "rationale")
# Decimal places per numeric column: score is a ratio to the baseline, throughput in
# output tokens/s, p99_ms in milliseconds, accuracy a fraction of identical outputs.
_DECIMALS = {"score": 3, "throughput": 1, "p99_ms": 1, "accuracy": 4}


def experiment_rows(records: Sequence[ExperimentRecord]) -> list[dict[str, Any]]:
    """The experiments table (TSV, JSON and report): one row per record, COLUMNS order."""
    return [_row(r) for r in records]


def rows_to_tsv(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["\t".join(COLUMNS)]
    lines.extend("\t".join(format_cell(col, row.get(col)) for col in COLUMNS) for row in rows)
    return "\n".join(lines) + "\n"


def format_cell(column: str, value: Any) -> str:
    """One table cell as text: fixed decimals per column, `-` when missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column in _DECIMALS and isinstance(value, int | float):
        return f"{value:.{_DECIMALS[column]}f}"
    return str(value)


def _row(record: ExperimentRecord) -> dict[str, Any]:
    metrics = record.metrics
    values: dict[str, float | None] = {
        "score": record.score,
        "throughput": metrics.output_throughput if metrics else None,
        "p99_ms": metrics.e2e_ms.p99 if metrics else None,
        "accuracy": record.accuracy,
    }
    rounded = {k: None if v is None else round(v, _DECIMALS[k]) for k, v in values.items()}
    return {"exp": record.exp, "id": record.recipe_id, "gen": record.generation,
            "layer": record.layer, **rounded, "kept": record.kept, "status": record.status,
            "interval": _interval(record), "slo": _slo(record),
            "rationale": _rationale(record)}


def _interval(record: ExperimentRecord) -> str | None:
    """The confidence interval of the gain over the incumbent, e.g. `[+4.1%, +20.9%]`."""
    if record.interval is None:
        return None
    return "[" + ", ".join(_signed_pct(x) for x in record.interval) + "]"


def _signed_pct(x: float) -> str:
    return "-inf" if x == float("-inf") else "+inf" if x == float("inf") \
        else f"{x * 100:+.1f}%"


def _slo(record: ExperimentRecord) -> str | None:
    if record.slo_violations:
        return "breaks: " + "; ".join(record.slo_violations)
    return "ok" if record.status == "ok" and record.metrics is not None else None


def _rationale(record: ExperimentRecord) -> str:
    if record.proposal is not None:
        text = record.proposal.rationale
        if record.status != "ok" and record.reason:
            text = f"{text} (failed: {record.reason})"
    else:
        text = record.reason or record.decision or ("baseline" if record.exp == 0 else "")
    return " ".join(text.split())  # one line: tabs and newlines would break the TSV
