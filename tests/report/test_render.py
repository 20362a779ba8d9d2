from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from aevyra_forge.core.errors import StoreError
from aevyra_forge.core.values import (
    BenchMetrics,
    ExperimentRecord,
    LatencyStats,
    LLMUsage,
    Proposal,
)
from aevyra_forge.report.render import (
    render_json,
    render_table,
    render_text,
    render_tsv,
    summarize,
)
from aevyra_forge.store.rows import COLUMNS
from aevyra_forge.store.run_store import Run, RunStore

CONFIG = {"model": "meta-llama/Llama-3.2-1B-Instruct",
          "hardware": "1x NVIDIA H100 80GB HBM3 (80 GiB each)",
          "workload": "examples/chat.jsonl"}


def clock() -> datetime:
    return datetime(2026, 11, 22, 11, 5, 1, tzinfo=UTC)


def rec(exp: int, *, status: str = "ok", score: float | None = None, kept: bool = False,
        throughput: float = 1000.0, p99: float = 800.0, layer: int = 1, gen: int = 0,
        rationale: str | None = None, reason: str = "", cost: float = 0.0) -> ExperimentRecord:
    ok = status == "ok"
    return ExperimentRecord(
        exp=exp, recipe={"model": "m"}, recipe_id=f"r{exp:07d}", parent_id=None,
        generation=gen, layer=layer,
        proposal=(Proposal(rationale=rationale, layer=layer,
                           changes={"max_num_seqs": 512}) if rationale else None),
        status=status,
        reason=reason,
        metrics=BenchMetrics(completed=50, duration_s=10.0, input_tokens=1, output_tokens=1,
                             request_throughput=5.0, output_throughput=throughput,
                             total_token_throughput=throughput,
                             e2e_ms=LatencyStats(p99=p99)) if ok else None,
        accuracy=1.0 if ok else None, score=score if ok else None, kept=kept,
        started_at="s", finished_at="f", llm=LLMUsage(cost_usd=cost),
    )


HISTORY = [
    rec(0, score=1.0, kept=True, reason="vLLM defaults for this GPU"),
    rec(1, score=1.21, kept=True, throughput=1210.0, p99=700.0, gen=1, cost=0.012,
        rationale="Raise max_num_seqs so more decodes share each step"),
    rec(2, status="oom", gen=2, cost=0.02, rationale="Push gpu_memory_utilization to 0.98",
        reason="CUDA out of memory while allocating KV cache"),
    rec(3, score=1.15, throughput=1150.0, layer=2, gen=2, cost=0.011,
        rationale="Try the AWQ checkpoint"),
    rec(4, score=1.35, kept=True, throughput=1350.0, p99=650.25, layer=2, gen=2, cost=0.013,
        rationale="FP8 KV cache frees memory for a larger batch"),
]


def make_run(tmp_path: Path, records: list[ExperimentRecord]) -> Run:
    run = RunStore(tmp_path / ".forge", clock=clock).create_run(CONFIG)
    for r in records:
        run.append(r)
    return run


def test_summary_figures(tmp_path: Path) -> None:
    with make_run(tmp_path, HISTORY) as run:
        s = summarize(run.path)  # readable while the tuner holds the lock
    assert s.run_dir == str(run.path)
    assert s.model == "meta-llama/Llama-3.2-1B-Instruct"
    assert s.hardware == CONFIG["hardware"]
    assert s.experiments == 5
    assert s.baseline_throughput == 1000.0
    assert (s.best_exp, s.best_score, s.best_recipe_id, s.best_generation) == (
        4, 1.35, "r0000004", 2)
    assert (s.best_throughput, s.best_p99_ms) == (1350.0, 650.25)
    assert s.layers_reached == [1, 2]
    assert s.statuses == {"ok": 4, "oom": 1}
    assert s.llm_cost_usd == pytest.approx(0.056)
    assert s.completed is False
    assert "experiment 4" in s.note


def test_store_root_means_latest_run_and_completion_is_reported(tmp_path: Path) -> None:
    with make_run(tmp_path, HISTORY[:2]) as run:
        run.complete({"reason": "budget"})
    s = summarize(tmp_path / ".forge")
    assert s.run_dir == str(run.path)
    assert s.completed is True
    assert s.best_exp == 1


def test_an_unkept_higher_score_is_not_best(tmp_path: Path) -> None:
    records = [*HISTORY[:2], rec(2, score=1.9, kept=False, rationale="noisy")]
    with make_run(tmp_path, records) as run:
        assert summarize(run.path).best_score == 1.21


def test_failed_baseline_with_nothing_kept_says_so(tmp_path: Path) -> None:
    records = [rec(0, status="boot_failed", reason="max_model_len exceeds KV cache"),
               rec(1, status="crash", rationale="smaller batch", reason="segfault")]
    with make_run(tmp_path, records) as run:
        s = summarize(run.path)
    assert s.baseline_throughput is None
    assert s.best_exp is None and s.best_score is None and s.best_throughput is None
    # nothing healthy at all, not even the baseline: said plainly
    assert s.note.startswith("nothing served: all 2 experiment(s) failed, the baseline "
                             "included (boot_failed: max_model_len exceeds KV")
    assert "nothing to deploy" in s.note


def test_failed_baseline_with_a_healthy_unkept_experiment(tmp_path: Path) -> None:
    records = [rec(0, status="boot_failed", reason="max_model_len exceeds KV cache"),
               rec(1, rationale="smaller batch", kept=False)]
    with make_run(tmp_path, records) as run:
        s = summarize(run.path)
    assert s.note.startswith("the baseline failed (boot_failed: max_model_len exceeds KV")
    assert "no experiment was kept" in s.note


def test_baseline_only_says_defaults_won(tmp_path: Path) -> None:
    with make_run(tmp_path, [HISTORY[0], HISTORY[3]]) as run:
        s = summarize(run.path)
    assert s.best_exp == 0
    assert "defaults are the best" in s.note


def test_empty_run(tmp_path: Path) -> None:
    with make_run(tmp_path, []) as run:
        s = summarize(run.path)
    assert (s.experiments, s.layers_reached, s.statuses, s.llm_cost_usd) == (0, [], {}, 0.0)
    assert s.note == "no experiments recorded yet"


def test_tsv_header_and_rows(tmp_path: Path) -> None:
    with make_run(tmp_path, HISTORY) as run:
        lines = render_tsv(run.path).splitlines()
    assert lines[0].split("\t") == list(COLUMNS)
    assert len(lines) == 1 + len(HISTORY)
    assert lines[5].split("\t")[:5] == ["4", "r0000004", "2", "2", "1.350"]
    assert lines[3].endswith("Push gpu_memory_utilization to 0.98 "
                             "(failed: CUDA out of memory while allocating KV cache)")


def test_json_parses_with_summary_and_rows(tmp_path: Path) -> None:
    with make_run(tmp_path, HISTORY) as run:
        doc: dict[str, Any] = json.loads(render_json(run.path))
    assert doc["summary"]["best_exp"] == 4
    assert doc["summary"]["statuses"] == {"ok": 4, "oom": 1}
    assert [row["exp"] for row in doc["experiments"]] == [0, 1, 2, 3, 4]
    assert doc["experiments"][2]["throughput"] is None
    assert doc["experiments"][4]["kept"] is True


def test_a_run_with_several_workers_shows_round_and_worker_in_every_format(
        tmp_path: Path) -> None:
    """Trials of a round ran on two GPUs: every renderer says which round and worker each
    ran on (after the layer), while a one-worker run keeps the store's columns."""
    pooled = [HISTORY[0].model_copy(update={"worker": "gpu0"}),
              *(r.model_copy(update={"round": 1 + (r.exp - 1) // 2,
                                     "worker": f"gpu{(r.exp - 1) % 2}"})
                for r in HISTORY[1:])]
    with make_run(tmp_path, pooled) as run:
        tsv = render_tsv(run.path).splitlines()
        doc: dict[str, Any] = json.loads(render_json(run.path))
        md, page = render_text(run.path, "md"), render_text(run.path, "html")
        group = render_table(run.path)
    header = tsv[0].split("\t")
    assert header[:6] == ["exp", "id", "gen", "layer", "round", "worker"]
    assert header[6:] == list(COLUMNS[4:])
    assert tsv[1].split("\t")[4:6] == ["-", "gpu0"]
    assert tsv[5].split("\t")[4:6] == ["2", "gpu1"]
    assert [(row["round"], row["worker"]) for row in doc["experiments"]] == [
        (None, "gpu0"), (1, "gpu0"), (1, "gpu1"), (2, "gpu0"), (2, "gpu1")]
    top = next(line for line in md.splitlines() if line.startswith("| exp"))
    assert top.split("|")[-3:-1] == [" round ", " worker "]
    best = next(line for line in md.splitlines()
                if line.startswith("|") and line.split("|")[1].strip() == "4")
    assert [c.strip() for c in best.split("|")[-3:-1]] == ["2", "gpu1"]
    assert "<th>round</th><th>worker</th>" in page and "<td>gpu1</td>" in page
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(group)
    assert "worker" in console.export_text()

    with make_run(tmp_path / "alone", HISTORY) as run:
        alone = render_tsv(run.path).splitlines()[0].split("\t")
        alone_doc: dict[str, Any] = json.loads(render_json(run.path))
        alone_md = render_text(run.path, "md")
    assert alone == list(COLUMNS)
    alone_top = next(line for line in alone_md.splitlines() if line.startswith("| exp"))
    assert "worker" not in alone_doc["experiments"][0] and "worker" not in alone_top


def test_table_renders_summary_and_rationales(tmp_path: Path) -> None:
    with make_run(tmp_path, HISTORY) as run:
        group = render_table(run.path)
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(group)
    out = console.export_text()
    assert "FP8 KV cache frees memory for a larger batch" in out
    assert "Raise max_num_seqs so more decodes share each step" in out
    assert "1350.0 tok/s (1.35x baseline)" in out
    assert "meta-llama/Llama-3.2-1B-Instruct" in out
    assert "not completed (resumable)" in out


def test_report_on_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="neither a forge store nor a run folder"):
        summarize(tmp_path)


def test_table_panel_says_why_it_stopped_and_how_to_deploy(tmp_path: Path) -> None:
    with make_run(tmp_path, HISTORY) as run:
        run.complete({"reason": "experiment budget spent (5)"})
    console = Console(record=True, width=250, file=io.StringIO())
    console.print(render_table(run.path))
    out = console.export_text()
    assert "completed: experiment budget spent (5)" in out
    assert "deploy      " in out and "vllm serve m" in out


def test_table_fits_a_100_column_terminal_and_widens_when_there_is_room(
        tmp_path: Path) -> None:
    with make_run(tmp_path, HISTORY) as run:
        group = render_table(run.path)
    narrow = Console(record=True, width=100, file=io.StringIO())
    narrow.print(group)
    text = narrow.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "rationale" in text and "tok/s" in text and "throughput" not in text
    assert " ".join(text.split()).count("Raise max_num_seqs so more decodes share") == 1
    wide = Console(record=True, width=200, file=io.StringIO())
    wide.print(group)
    wide_text = wide.export_text()
    assert "throughput" in wide_text and "┃ id" in wide_text
