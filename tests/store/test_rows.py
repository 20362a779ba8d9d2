from __future__ import annotations

from typing import Any

from aevyra_forge.core.values import BenchMetrics, ExperimentRecord, LatencyStats, Proposal
from aevyra_forge.store.rows import COLUMNS, experiment_rows, rows_to_tsv


def metrics(throughput: float, p99: float) -> BenchMetrics:
    return BenchMetrics(completed=50, duration_s=10.0, input_tokens=5000, output_tokens=6400,
                        request_throughput=5.0, output_throughput=throughput,
                        total_token_throughput=throughput * 1.8,
                        e2e_ms=LatencyStats(mean=150.0, p50=140.0, p90=200.0, p99=p99))


def record(exp: int, *, status: str = "ok", score: float | None = 1.0, kept: bool = False,
           rationale: str | None = None, reason: str = "", layer: int = 1,
           accuracy: float | None = 1.0, **extra: Any) -> ExperimentRecord:
    proposal = (Proposal(rationale=rationale, layer=layer, changes={"max_num_seqs": 512})
                if rationale is not None else None)
    data: dict[str, Any] = dict(
        exp=exp, recipe={"model": "m", "config": {}}, recipe_id=f"id{exp:06d}",
        parent_id=None if exp == 0 else "id000000", generation=exp, layer=layer,
        proposal=proposal, status=status, reason=reason,
        metrics=metrics(1000.0, 250.0) if status == "ok" else None,
        accuracy=accuracy if status == "ok" else None,
        score=score if status == "ok" else None, kept=kept,
        started_at="2026-11-22T11:05:01Z", finished_at="2026-11-22T11:06:01Z",
    )
    data.update(extra)
    return ExperimentRecord.model_validate(data)


def test_rows_format_numbers_and_flatten_rationales() -> None:
    rec = record(3, rationale="raise\tmax_num_seqs\nfor  batching", score=1.23456, kept=True,
                 accuracy=0.987654, layer=2, metrics=metrics(1234.5678, 456.789),
                 interval=(0.041, 0.2093))
    failed = record(4, status="oom", rationale="bigger batch", reason="CUDA OOM\nat boot")
    base = record(0, reason="vLLM defaults", kept=True)
    rows = experiment_rows([base, rec, failed])
    assert list(rows[1]) == list(COLUMNS)
    assert rows[1] == {"exp": 3, "id": "id000003", "gen": 3, "layer": 2, "score": 1.235,
                       "throughput": 1234.6, "p99_ms": 456.8, "accuracy": 0.9877,
                       "kept": True, "status": "ok", "interval": "[+4.1%, +20.9%]",
                       "slo": "ok", "rationale": "raise max_num_seqs for batching"}
    assert rows[0]["rationale"] == "vLLM defaults"
    assert rows[2]["rationale"] == "bigger batch (failed: CUDA OOM at boot)"
    lines = rows_to_tsv(rows).splitlines()
    assert lines[2].split("\t") == ["3", "id000003", "3", "2", "1.235", "1234.6", "456.8",
                                    "0.9877", "yes", "ok", "[+4.1%, +20.9%]", "ok",
                                    "raise max_num_seqs for batching"]
    assert lines[3].split("\t")[4:12] == ["-", "-", "-", "-", "no", "oom", "-", "-"]
