from __future__ import annotations

import json
from pathlib import Path

import pytest

from aevyra_forge.core.recipe import diff
from aevyra_forge.core.values import Diagnosis, InertKnob, best_record
from aevyra_forge.decide.rules import pass_values
from aevyra_forge.decide.stats import relative_interval
from aevyra_forge.loop.state import LoopState
from aevyra_forge.report.best import Change, SloVerdict
from aevyra_forge.report.html import render_html
from aevyra_forge.report.markdown import render_md
from aevyra_forge.report.model import build_report
from aevyra_forge.store.rows import experiment_rows
from tests.report.conftest import BASE, CONFIG, FP8, HISTORY, make_run, rec


def test_best_is_the_loops_best(run_dir: Path) -> None:
    report = build_report(run_dir)
    loop = LoopState(records=list(HISTORY), baseline=BASE)
    assert report.best is not None
    assert report.best.recipe_id == loop.best.id == FP8.id
    assert report.best.exp == best_record(HISTORY).exp == 4  # type: ignore[union-attr]
    assert report.summary.best_exp == 4
    # exp 3 scored higher but was not kept (accuracy below the floor): not the best
    assert max(r.score or 0 for r in HISTORY) == 1.40


def test_diff_against_the_baseline_is_core_recipe_diff(run_dir: Path) -> None:
    best = build_report(run_dir).best
    assert best is not None
    assert best.changes == [Change(setting=k, baseline=a, best=b)
                            for k, (a, b) in diff(BASE, FP8).items()]
    assert {c.setting for c in best.changes} == {"config.max_num_seqs", "quant.kv_cache_dtype"}
    assert "max_num_seqs: 512" in best.recipe_yaml


def test_gain_interval_and_latency_change(run_dir: Path) -> None:
    best = build_report(run_dir).best
    assert best is not None
    assert best.gain == pytest.approx(0.35)
    expected = relative_interval(pass_values(HISTORY[4].passes), pass_values(HISTORY[0].passes),
                                 confidence=0.95, boot_cv=0.01)
    assert best.gain_interval == pytest.approx((expected.low, expected.high))
    assert best.gain_interval is not None
    assert best.gain_interval[0] < 0.35 < best.gain_interval[1]
    assert best.accuracy == 0.995
    assert best.ttft_p99_ms == (200.0, 150.0)
    assert best.e2e_p99_ms == (800.0, 650.25)
    assert (best.baseline_throughput, best.best_throughput) == (1000.0, 1350.0)


def test_slo_verdicts_per_term(run_dir: Path) -> None:
    best = build_report(run_dir).best
    assert best is not None
    assert best.slo == [
        SloVerdict(term="ttft_p99<300ms", baseline="met", best="met"),
        SloVerdict(term="e2e_p99<750ms", baseline="e2e_p99 800 ms, needs <750 ms", best="met"),
    ]


def test_deploy_command_renders_the_recipe(run_dir: Path) -> None:
    best = build_report(run_dir).best
    assert best is not None
    assert "vllm serve meta-llama/Llama-3.2-1B-Instruct" in best.deploy_command
    assert "--max-num-seqs 512" in best.deploy_command
    assert "--kv-cache-dtype fp8" in best.deploy_command


def test_failures_carry_reason_and_log_tail(run_dir: Path) -> None:
    (failure,) = build_report(run_dir).failures
    assert (failure.exp, failure.status) == (2, "oom")
    assert failure.reason == "CUDA out of memory while allocating KV cache"
    assert failure.changes == {"gpu_memory_utilization": 0.98}
    assert failure.log_tail.endswith("Tried to allocate 2.00 GiB")
    assert len(failure.log_tail.splitlines()) == 6


def test_a_log_outside_the_run_is_never_read(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("do not show")
    bad = rec(0, BASE, status="crash", reason="died").model_copy(
        update={"log": "../../../secret.txt"})
    with make_run(tmp_path, [bad]) as run:
        (failure,) = build_report(run.path).failures
    assert failure.log_tail == ""


def test_every_recorded_metric_is_in_the_rows(run_dir: Path) -> None:
    rows = build_report(run_dir).experiments
    assert [r.exp for r in rows] == [0, 1, 2, 3, 4]
    four = rows[4]
    assert four.ttft_ms is not None and four.ttft_ms.p99 == 150.0
    assert four.tpot_ms is not None and four.tpot_ms.p99 == 14.0
    assert four.itl_ms is not None and four.itl_ms.p99 == 16.0
    assert four.e2e_ms is not None and four.e2e_ms.p99 == 650.25
    assert (four.preemptions, four.kv_cache_usage, four.prefix_cache_hit_rate) == (
        2.0, 0.61, 0.42)
    assert (four.prepare_s, four.boot_s, four.bench_s) == (120.0, 34.0, 60.0)
    assert four.interval == (0.05, 0.18)
    assert [r.leads for r in rows] == [True, True, False, False, True]
    # each experiment was judged against the incumbent of its time
    assert [r.incumbent_score for r in rows] == [None, 1.0, 1.21, 1.21, 1.21]
    assert rows[2].output_throughput is None and rows[2].status == "oom"


def test_table_is_the_stores_table(run_dir: Path) -> None:
    assert build_report(run_dir).table == experiment_rows(HISTORY)


def test_stop_reason_totals_and_settings(run_dir: Path) -> None:
    report = build_report(run_dir)
    assert report.stop_reason == "every layer converged"
    assert report.summary.completed
    t = report.totals
    assert (t.llm_input_tokens, t.llm_output_tokens) == (10_000, 1_000)
    assert t.llm_cost_usd == pytest.approx(0.053)
    assert t.boot_s == sum(30.0 + i for i in range(5))
    assert (t.started_at, t.finished_at) == ("2026-11-22T11:00:00Z", "2026-11-22T11:04:50Z")
    assert report.settings["slo"] == "ttft_p99<300ms,e2e_p99<750ms"
    assert report.settings["accuracy_floor"] == 0.99
    assert report.workload == "examples/chat.jsonl"


def test_a_running_run_has_no_stop_reason(tmp_path: Path) -> None:
    with make_run(tmp_path, HISTORY[:2]) as run:  # the tuner holds the lock
        report = build_report(run.path)
    assert report.stop_reason is None and not report.summary.completed
    assert report.best is not None and report.best.exp == 1


def test_baseline_only_and_empty_runs(tmp_path: Path) -> None:
    with make_run(tmp_path / "a", HISTORY[:1]) as run:
        only = build_report(run.path)
    assert only.best is not None and only.best.gain == 0.0 and only.best.changes == []
    with make_run(tmp_path / "b", []) as run:
        empty = build_report(run.path)
    assert empty.best is None and empty.experiments == [] and empty.failures == []


def test_a_config_this_version_cannot_read_still_reports(tmp_path: Path) -> None:
    config = {**CONFIG, "settings": {"objective": "no-such-objective"}}
    with make_run(tmp_path, HISTORY, config=config) as run:
        best = build_report(run.path).best
    assert best is not None
    assert best.gain == pytest.approx(0.35) and best.gain_interval is None
    assert best.slo == []


def test_completed_json_damaged_reads_as_running(run_dir: Path) -> None:
    (run_dir / "completed.json").write_text("{not json")
    assert build_report(run_dir).stop_reason is None
    assert json.loads((run_dir / "config.json").read_text())["model"] == CONFIG["model"]


def test_the_baselines_diagnosis_reaches_every_renderer(tmp_path: Path) -> None:
    diagnosis = Diagnosis(binding="kv_capacity", why="KV cache peaked at 99% with 40 preemptions",
                          inert=(InertKnob(knob="dtype", values=("bfloat16",),
                                           reason="auto already resolves to bfloat16"),))
    records = [HISTORY[0].model_copy(update={"diagnosis": diagnosis}), *HISTORY[1:]]
    with make_run(tmp_path, records) as run:
        run.complete({"reason": "every layer converged"})
    report = build_report(run.path)
    assert report.diagnosis == diagnosis
    for text in (render_md(report), render_html(report)):
        assert "What bound the baseline" in text
        assert "dtype=bfloat16 cannot matter: auto already resolves to bfloat16" in text
    with make_run(tmp_path / "old", HISTORY) as old:  # a run logged before diagnoses
        pass
    assert build_report(old.path).diagnosis is None
    assert "What bound" not in render_md(build_report(old.path))
