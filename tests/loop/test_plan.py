"""The plan: per-experiment estimates from the trace and from measurement, how many fit,
the ETA, the refusal of a budget too short, and a loop that never starts an experiment
that cannot finish inside --max-hours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aevyra_forge.agent import BuiltinStrategy
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.workload import load_workload
from aevyra_forge.loop import plan, session
from aevyra_forge.loop.events import (
    Note,
    Planned,
    RunFinished,
    RunStarted,
    TrialFinished,
    TrialPhase,
    TrialStarted,
)
from aevyra_forge.loop.plan import Estimate, Plan, PlanError
from tests.builders import record
from tests.conftest import MODEL_8B
from tests.loop.test_tuner import Events, _tuner


def _settings(workload: Path, **extra: object) -> TuneSettings:
    return TuneSettings.model_validate({"model": MODEL_8B, "workload": str(workload),
                                        "llm": "builtin", "dry_run": True, **extra})


def _trace(tmp_path: Path, rows: list[dict[str, object]]) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_closed_loop_estimate_is_tokens_over_streams(tmp_path: Path) -> None:
    path = _trace(tmp_path, [{"prompt": f"q{i}", "expected_output_tokens": 300}
                             for i in range(40)])
    stats = load_workload(path).stats
    est = plan.from_trace(_settings(path, concurrency=4, repeats=3), stats, "cuda",
                          eager=False)
    per_pass = 40 * 300 / (plan.DECODE_TOK_S["cuda"] * 4)  # 100 s
    assert est.bench_s == pytest.approx(per_pass * 4 + plan.ACCURACY_S["cuda"])
    assert est.boot_s == plan.GPU_BOOT_S and est.source == "the trace"
    cpu = plan.from_trace(_settings(path, concurrency=4, repeats=3), stats, "cpu", eager=True)
    assert cpu.boot_s == plan.CPU_EAGER_BOOT_S


def test_open_loop_estimate_is_the_last_arrival_plus_the_longest_request(
        tmp_path: Path) -> None:
    path = _trace(tmp_path, [{"prompt": f"q{i}", "expected_output_tokens": 60 + i,
                              "arrival_offset_s": 10.0 * i} for i in range(10)])
    stats = load_workload(path).stats
    est = plan.from_trace(_settings(path, objective="latency", repeats=2), stats, "cuda",
                          eager=False)
    per_pass = 90.0 + 69 / plan.DECODE_TOK_S["cuda"]
    assert est.bench_s == pytest.approx(per_pass * 3 + plan.ACCURACY_S["cuda"])


def test_fit_note_and_eta() -> None:
    night = Plan(Estimate(boot_s=100, bench_s=500, source="measurement"), 3600, 10)
    assert night.fit == 6
    assert "about 6 experiments fit in 1 hours" in night.note()
    assert "each ~10 min" in night.note()
    # 2 done in 1000 s: 2600 s left hold 4 more of 600 s
    assert night.eta_s(done=2, spent_s=1000) == 2400
    # the experiment budget binds first
    assert night.eta_s(done=9, spent_s=0) == 600
    assert night.eta_s(done=10, spent_s=0) == 0
    assert night.eta_s(done=0, spent_s=5000) == 0


def test_with_workers_the_plan_counts_rounds() -> None:
    """Four workers: a round of four takes as long as one experiment, so an hour of
    600 s experiments holds 6 rounds (24 experiments, the budget of 20 binds), and the
    ETA is the rounds left, not the experiments left (about 4x less)."""
    est = Estimate(boot_s=100, bench_s=500, source="measurement")
    alone, pool = Plan(est, 3600, 20), Plan(est, 3600, 20, workers=4)
    assert (alone.fit, pool.fit) == (6, 20)
    assert "4 at once" in pool.note() and "at once" not in alone.note()
    assert alone.eta_s(done=9, spent_s=600) == 3000  # 5 more fit, one at a time
    assert pool.eta_s(done=9, spent_s=600) == 1800  # 11 left: 3 rounds (4 + 4 + 3)
    assert pool.eta_s(done=1, spent_s=600) == 3000  # 19 left, but only 5 rounds fit
    assert pool.eta_s(done=20, spent_s=1200) == 0
    # two rounds fit in 1200 s: eight experiments, no warning (alone: two, warned)
    assert Plan(est, 1200, 50, workers=4).check() is None
    assert "only 2 experiments fit" in (Plan(est, 1200, 50).check() or "")
    with pytest.raises(PlanError):
        Plan(est, 500, 50, workers=8).check()  # not one round fits


def test_a_budget_without_room_for_one_experiment_is_refused_and_few_warned() -> None:
    est = Estimate(boot_s=60, bench_s=540, source="the trace")
    with pytest.raises(PlanError, match=r"raise --max-hours to at least 0\.4, or replay "
                                         r"fewer requests with --sample N$"):
        Plan(est, 1000, 50).check()
    # 1800 s / 10 experiments = 180 s each, 120 s of it for the bench: 1000 * 120 / 540
    assert (Plan(est, 1800, 50, requests=1000).check() or "").endswith("--sample 222")
    assert "only 3 experiments fit" in (Plan(est, 1800, 50).check() or "")
    assert Plan(est, 3600, 50).check() is None
    assert Plan(est, 1800, 3).check() is None  # the user asked for just 3


def test_the_estimate_from_measurement_is_the_slowest_measured() -> None:
    recs = [record(0, kept=True, boot_s=50.0, bench_s=100.0),
            record(1, boot_s=70.0, bench_s=200.0, prepare_s=5.0),
            record(2, status="crash", boot_s=900.0, bench_s=900.0)]
    est = plan.from_records(recs)
    assert est is not None and (est.boot_s, est.bench_s) == (75.0, 200.0)
    assert plan.from_records([recs[2]]) is None


def test_no_experiment_starts_that_cannot_finish(tmp_path: Path, small_workload: Path) -> None:
    probe, _ = _tuner(tmp_path / "probe", small_workload, BuiltinStrategy(), max_experiments=1)
    probe.run()
    (baseline,) = probe.run_log.records()
    each = (baseline.boot_s or 0) + (baseline.bench_s or 0)
    budget_h = 3.5 * each / 3600
    tuner, _ = _tuner(tmp_path, small_workload, BuiltinStrategy(), max_hours=budget_h,
                      max_experiments=50)
    why = tuner.run().reason
    assert why.startswith("time budget: another experiment")
    assert tuner.state.spent_s() <= budget_h * 3600
    assert 2 <= len(tuner.run_log.records()) <= 3


def test_a_dry_run_reports_its_plan_and_phases_in_order(tmp_path: Path,
                                                         small_workload: Path) -> None:
    events = Events()
    tuner = session.start(_settings(small_workload, run_dir=str(tmp_path / ".forge"),
                                    max_experiments=3, repeats=2, gpu="H100"), events)
    tuner.run()
    kinds = [(type(e).__name__, getattr(e, "exp", None), getattr(e, "phase", None))
             for e in events.seen if not isinstance(e, Note)]
    trial = [("TrialStarted", None, None), ("TrialPhase", None, "boot"),
             ("TrialPhase", None, "bench"), ("TrialPhase", None, "accuracy"),
             ("TrialFinished", None, None)]
    assert kinds[:7] == [("Planned", None, None), ("RunStarted", None, None),
                         *[(k, 0 if k == "TrialPhase" else None, p) for k, _, p in trial]]
    assert kinds[7] == ("Planned", None, None)  # again, from the baseline's measurement
    assert [e.exp for e in events.of(TrialPhase) if e.phase == "boot"] == [0, 1, 2]
    assert [e.trial.exp for e in events.of(TrialStarted)] == [0, 1, 2]
    assert [e.record.exp for e in events.of(TrialFinished)] == [0, 1, 2]
    first, measured = (e.plan for e in events.of(Planned))
    # a dry run plans with the simulator's timings, which the baseline then confirms
    assert first.estimate.source == "the simulator"
    assert measured.estimate.source == "measurement"
    assert (first.estimate.boot_s, first.estimate.bench_s) == pytest.approx(
        (measured.estimate.boot_s, measured.estimate.bench_s))
    assert len(events.of(RunStarted)) == 1 and isinstance(events.seen[-1], RunFinished)


def test_start_refuses_a_night_too_short_before_creating_the_run(
        tmp_path: Path, small_workload: Path) -> None:
    with pytest.raises(PlanError, match="--max-hours"):
        session.start(_settings(small_workload, run_dir=str(tmp_path / ".forge"),
                                max_hours=0.001, gpu="H100"), Events())
    assert not (tmp_path / ".forge").exists()


def test_sample_is_replayed_and_recorded(tmp_path: Path) -> None:
    path = _trace(tmp_path, [{"prompt": f"question {i} " + "x " * (i % 50),
                              "expected_output_tokens": 16 + i % 200} for i in range(300)])
    tuner = session.start(_settings(path, run_dir=str(tmp_path / ".forge"), sample=30,
                                    max_experiments=1, gpu="H100"), Events())
    assert len(tuner.workload.requests) == 30
    config = json.loads((tuner.run_log.path / "config.json").read_text())
    assert config["settings"]["sample"] == 30 and config["workload"]["requests"] == 30
    tuner.run_log.close()
