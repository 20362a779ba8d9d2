"""The one report model: everything the morning read needs, computed once from a run
folder (config.json, experiments.jsonl, completed.json), which every renderer (table,
TSV, JSON, Markdown, HTML) reads. Works on a running run too: nothing here takes the lock."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from aevyra_forge.core.errors import ForgeError
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import (
    Diagnosis,
    ExperimentRecord,
    LatencyStats,
    Scalar,
    best_record,
    takes_the_lead,
)
from aevyra_forge.report.best import BestVsBaseline, Model, baseline_record, best_vs_baseline
from aevyra_forge.report.cost import Cost, build_cost
from aevyra_forge.store.rows import COLUMNS, experiment_rows
from aevyra_forge.store.run_store import (
    COMPLETED,
    read_config,
    read_records,
    resolve_run_dir,
)

LOG_TAIL_LINES = 6  # lines of a failed experiment's server log shown beside its reason
# Columns of a run that had several workers (--parallel, --gpus, Ray): which round a trial
# ran in and on which worker, after its layer. A one-worker run's table keeps COLUMNS.
POOL_COLUMNS = ("round", "worker")


class RunSummary(Model):
    """The headline figures of one run. `best_*` describe the incumbent as the loop defines
    it (core.values.best_record: the latest record that took the lead); they are None
    when nothing was kept (then `note` says why)."""

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


class ExperimentRow(Model):
    """One experiment with every recorded figure (latencies in ms, times in seconds)."""

    exp: int
    recipe_id: str
    generation: int
    layer: int
    status: str
    kept: bool
    leads: bool  # it made its recipe the incumbent (core.values.takes_the_lead)
    incumbent_score: float | None  # the score of the incumbent it was judged against
    remeasure: bool
    changes: dict[str, Scalar]
    rationale: str
    reason: str
    decision: str
    score: float | None
    interval: tuple[float, float] | None
    accuracy: float | None
    slo_violations: list[str]
    output_throughput: float | None
    total_token_throughput: float | None
    request_throughput: float | None
    completed_requests: int | None
    failed_requests: int | None
    ttft_ms: LatencyStats | None
    tpot_ms: LatencyStats | None
    itl_ms: LatencyStats | None
    e2e_ms: LatencyStats | None
    preemptions: float | None
    kv_cache_usage: float | None  # fraction of KV-cache blocks in use
    prefix_cache_hit_rate: float | None
    prepare_s: float | None
    boot_s: float | None
    bench_s: float | None
    llm_input_tokens: int
    llm_output_tokens: int
    llm_cost_usd: float
    log: str | None
    round: int | None = None  # several workers: the round it ran in
    worker: str | None = None  # several workers: the GPU (group) or Ray node it ran on


class Failure(Model):
    exp: int
    status: str
    changes: dict[str, Scalar]
    reason: str
    log: str | None
    log_tail: str  # the end of the server log, "" when there is none


class Totals(Model):
    llm_input_tokens: int
    llm_output_tokens: int
    llm_cost_usd: float
    prepare_s: float
    boot_s: float
    bench_s: float
    started_at: str | None
    finished_at: str | None


class Report(Model):
    """A run, read once, for every renderer."""

    summary: RunSummary
    workload: str
    workload_sha256: str | None  # what `report A B` compares; None in older runs
    settings: dict[str, Any]  # the settings that shape what was measured and kept
    best: BestVsBaseline | None
    experiments: list[ExperimentRow]
    table: list[dict[str, Any]]  # store.rows' experiments table, as TSV/JSON write it
    failures: list[Failure]
    stop_reason: str | None  # None while the run is still going (or was interrupted)
    totals: Totals
    cost: Cost  # an estimate: GPU rent per million tokens, against commercial APIs
    # what bound the baseline (or the first config that served); None in older runs
    diagnosis: Diagnosis | None = None
    columns: tuple[str, ...] = COLUMNS  # of `table`, in order (POOL_COLUMNS when pooled)

    @property
    def pooled(self) -> bool:
        """Whether the run had several workers (its rows say round and worker)."""
        return "worker" in self.columns


def build_report(run_dir: Path, gpu_price: float | None = None) -> Report:
    """The report of a run folder, or of the latest run when given the store root;
    `gpu_price` (USD per GPU-hour) overrides the run's and the table's for the cost."""
    path = resolve_run_dir(run_dir)
    config = read_config(path)
    records = read_records(path)
    settings = _settings(config)
    completed = _completed(path)
    columns = table_columns(records)
    return Report(
        summary=_summary(path, config, records, (path / COMPLETED).exists()),
        workload=_workload(config),
        workload_sha256=_workload_sha256(config),
        settings=_shown_settings(config),
        best=best_vs_baseline(path, records, settings),
        experiments=_experiments(records),
        table=_table(records, columns),
        columns=columns,
        failures=[_failure(path, r) for r in records
                  if r.status not in ("ok", "duplicate", "invalid")],
        stop_reason=str(completed.get("reason", "")) or None if completed else None,
        totals=_totals(records),
        cost=build_cost(path, config, records, gpu_price),
        diagnosis=_diagnosis(records),
    )


def table_columns(records: Sequence[ExperimentRecord]) -> tuple[str, ...]:
    """The experiments table's columns: COLUMNS, with round and worker after the layer
    when the run had more than one worker (any trial ran in a round, or two workers
    show), so a one-worker run's TSV and JSON stay as they always were."""
    workers = {r.worker for r in records if r.worker is not None}
    if len(workers) < 2 and all(r.round is None for r in records):
        return COLUMNS
    at = COLUMNS.index("layer") + 1
    return COLUMNS[:at] + POOL_COLUMNS + COLUMNS[at:]


def _table(records: Sequence[ExperimentRecord], columns: tuple[str, ...]
           ) -> list[dict[str, Any]]:
    """store.rows' table, with round and worker when `columns` has them."""
    rows = experiment_rows(records)
    if columns == COLUMNS:
        return rows
    return [{c: (getattr(r, c) if c in POOL_COLUMNS else row[c]) for c in columns}
            for row, r in zip(rows, records, strict=True)]


def _diagnosis(records: Sequence[ExperimentRecord]) -> Diagnosis | None:
    """The diagnosis the run tuned by: the latest of a config that served, else the
    baseline's (why it did not boot)."""
    found = [r.diagnosis for r in records if r.diagnosis is not None]
    return next((d for d in reversed(found) if d.binding != "boot"),
                found[0] if found else None)


# -- summary ---------------------------------------------------------------------------


def _summary(path: Path, config: dict[str, Any], records: Sequence[ExperimentRecord],
             completed: bool) -> RunSummary:
    baseline = baseline_record(records)
    best = best_record(records)
    metrics = best.metrics if best is not None else None
    return RunSummary(
        run_dir=str(path),
        model=str(config.get("model", "?")),
        hardware=str(config.get("hardware", "?")),
        experiments=len(records),
        baseline_throughput=(baseline.metrics.output_throughput
                             if baseline is not None and baseline.metrics else None),
        best_exp=best.exp if best else None,
        best_score=best.score if best else None,
        best_recipe_id=best.recipe_id if best else None,
        best_generation=best.generation if best else None,
        best_throughput=metrics.output_throughput if metrics else None,
        best_p99_ms=metrics.e2e_ms.p99 if metrics else None,
        layers_reached=sorted({r.layer for r in records}),
        statuses=dict(Counter(r.status for r in records).most_common()),
        completed=completed,
        llm_cost_usd=round(sum(r.llm.cost_usd for r in records), 6),
        note=_note(records, next((r for r in records if r.exp == 0), None), best),
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
        if not any(r.status == "ok" for r in records):
            return (f"nothing served: all {len(records)} experiment(s) failed, the "
                    f"baseline included ({baseline.status}{why}); nothing to deploy; check "
                    "the baseline's log under logs/")
        return (f"the baseline failed ({baseline.status}{why}) and no experiment was kept; "
                "check the baseline's log under logs/")
    return "no experiment was kept"


# -- settings --------------------------------------------------------------------------

_SHOWN = ("objective", "slo", "accuracy_floor", "repeats", "confidence",
          "min_improvement_pct", "concurrency", "max_latency_regression", "llm", "dry_run")


def _settings(config: dict[str, Any]) -> TuneSettings | None:
    """The run's settings as the loop read them; None for a config this version cannot
    read (the report then shows what it can without intervals or SLO verdicts)."""
    try:
        return TuneSettings.model_validate(config.get("settings") or {})
    except (ValidationError, ForgeError):
        return None


def _workload(config: dict[str, Any]) -> str:
    workload = config.get("workload", "?")  # {path, requests, sha256}; older runs: the path
    return str(workload.get("path", "?") if isinstance(workload, dict) else workload)


def _workload_sha256(config: dict[str, Any]) -> str | None:
    workload = config.get("workload")
    digest = workload.get("sha256") if isinstance(workload, dict) else None
    return str(digest) if digest else None


def _shown_settings(config: dict[str, Any]) -> dict[str, Any]:
    raw = config.get("settings") or {}
    if "repeats" not in raw and "passes" in raw:  # runs written before the rename
        raw = {**raw, "repeats": raw["passes"]}
    return {name: raw[name] for name in _SHOWN if name in raw}


def _completed(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / COMPLETED).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


# -- experiments ------------------------------------------------------------------------


def _experiments(records: Sequence[ExperimentRecord]) -> list[ExperimentRow]:
    rows = []
    incumbent: float | None = None
    for r in records:
        rows.append(_experiment(r, incumbent))
        if takes_the_lead(r):
            incumbent = r.score
    return rows


def _experiment(r: ExperimentRecord, incumbent: float | None) -> ExperimentRow:
    m = r.metrics
    server = m.server if m is not None else {}
    kv = server.get("kv_cache_usage_peak", server.get("kv_cache_usage"))
    return ExperimentRow(
        exp=r.exp, recipe_id=r.recipe_id, generation=r.generation, layer=r.layer,
        status=r.status, kept=r.kept, leads=takes_the_lead(r), incumbent_score=incumbent,
        remeasure=r.remeasure,
        changes=dict(r.proposal.changes) if r.proposal else {},
        rationale=r.proposal.rationale if r.proposal else "", reason=r.reason,
        decision=r.decision, score=r.score, interval=r.interval, accuracy=r.accuracy,
        slo_violations=list(r.slo_violations),
        output_throughput=m.output_throughput if m else None,
        total_token_throughput=m.total_token_throughput if m else None,
        request_throughput=m.request_throughput if m else None,
        completed_requests=m.completed if m else None, failed_requests=m.failed if m else None,
        ttft_ms=m.ttft_ms if m else None, tpot_ms=m.tpot_ms if m else None,
        itl_ms=m.itl_ms if m else None, e2e_ms=m.e2e_ms if m else None,
        preemptions=server.get("num_preemptions"), kv_cache_usage=kv,
        prefix_cache_hit_rate=server.get("prefix_cache_hit_rate"),
        prepare_s=r.prepare_s, boot_s=r.boot_s, bench_s=r.bench_s,
        llm_input_tokens=r.llm.input_tokens, llm_output_tokens=r.llm.output_tokens,
        llm_cost_usd=r.llm.cost_usd, log=r.log, round=r.round, worker=r.worker,
    )


def _failure(path: Path, r: ExperimentRecord) -> Failure:
    return Failure(exp=r.exp, status=r.status,
                   changes=dict(r.proposal.changes) if r.proposal else {}, reason=r.reason,
                   log=r.log, log_tail=_log_tail(path, r.log))


def _log_tail(path: Path, log: str | None) -> str:
    if not log:
        return ""
    target = (path / log).resolve()
    if not target.is_relative_to(path.resolve()):  # a record names a file in its own run
        return ""
    try:
        lines = target.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _totals(records: Sequence[ExperimentRecord]) -> Totals:
    return Totals(
        llm_input_tokens=sum(r.llm.input_tokens for r in records),
        llm_output_tokens=sum(r.llm.output_tokens for r in records),
        llm_cost_usd=round(sum(r.llm.cost_usd for r in records), 6),
        prepare_s=sum(r.prepare_s or 0.0 for r in records),
        boot_s=sum(r.boot_s or 0.0 for r in records),
        bench_s=sum(r.bench_s or 0.0 for r in records),
        started_at=records[0].started_at if records else None,
        finished_at=records[-1].finished_at if records else None,
    )
