"""Tests for aevyra_forge.decide.verdict: how `judge` wires the loop's state into the keep
rule. Between-boot noise comes from the incumbent's own re-measured boots, pass-to-pass
noise is pooled from earlier configs, and the latency guard compares the candidate with
the incumbent. Each test pairs the scenario with a control that differs only in the input
under test, so a verdict that ignored that input would fail it."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import BenchMetrics, ExperimentRecord, LatencyStats, Status
from aevyra_forge.decide.verdict import Verdict, judge, pass_stop, should_stop
from aevyra_forge.measure.metrics import median_pass

INCUMBENT = "incumbent-recipe"
# An assumed between-boot CV of 1 % and a 1 % threshold, stated here rather than taken
# from the defaults, so that a change of default does not silently change these tests.
SETTINGS = TuneSettings(model="org/model", workload="workload.jsonl", boot_noise=0.01,
                        min_improvement_pct=1.0, confidence=0.95, max_latency_regression=1.5)


def _pass(tps: float, *, e2e_p99: float = 1000.0, ttft_p99: float = 100.0) -> BenchMetrics:
    return BenchMetrics(completed=10, duration_s=10.0, input_tokens=100,
                        output_tokens=int(tps * 10), request_throughput=1.0,
                        output_throughput=tps, total_token_throughput=tps + 10,
                        e2e_ms=LatencyStats(p99=e2e_p99), ttft_ms=LatencyStats(p99=ttft_p99))


def _passes(*tps: float, e2e_p99: float = 1000.0, ttft_p99: float = 100.0
            ) -> tuple[BenchMetrics, ...]:
    return tuple(_pass(t, e2e_p99=e2e_p99, ttft_p99=ttft_p99) for t in tps)


def _boot(mean: float) -> tuple[BenchMetrics, ...]:
    """Three passes on one boot, within ±0.5 % of `mean`."""
    return _passes(mean, mean * 1.005, mean * 0.995)


def _row(exp: int, recipe_id: str, passes: Sequence[BenchMetrics], *, kept: bool = False,
         remeasure: bool = False, status: Status = "ok") -> ExperimentRecord:
    return ExperimentRecord(
        exp=exp, recipe={}, recipe_id=recipe_id, parent_id=None, generation=0, layer=1,
        status=status, passes=tuple(passes), metrics=passes[len(passes) // 2] if passes else None,
        kept=kept, remeasure=remeasure, started_at="t", finished_at="t")


def _judge(passes: Sequence[BenchMetrics], *, incumbent: Sequence[BenchMetrics],
           history: Sequence[ExperimentRecord], settings: TuneSettings = SETTINGS,
           status: Status = "ok") -> Verdict:
    return judge(s=settings, status=status, passes=passes,
                 median=median_pass(passes) if passes else None, accuracy=None,
                 reference=incumbent[0], incumbent=incumbent, incumbent_id=INCUMBENT,
                 best_score=1.0, history=history, identical=False)


def _width(verdict: Verdict) -> float:
    assert verdict.interval is not None
    return verdict.interval.high - verdict.interval.low


# -- between-boot noise: the incumbent's re-measured boots ---------------------------------


def test_incumbent_boots_that_disagree_widen_the_interval_and_refuse_the_keep() -> None:
    """The incumbent measured on three boots (kept, then two drift checks) with means 100,
    108 and 94 tok/s: its boots differ by about 7 %, far more than the assumed 1 %. A
    candidate 10 % above the latest boot, with tight passes, clears the threshold when
    only one boot is known, and must not when the boots show how much a boot moves."""
    latest = _boot(94.0)
    boots = [_row(0, INCUMBENT, _boot(100.0), kept=True),
             _row(4, INCUMBENT, _boot(108.0), remeasure=True),
             _row(8, INCUMBENT, latest, remeasure=True)]
    candidate = tuple(_pass(p.output_throughput * 1.10) for p in latest)

    one_boot = _judge(candidate, incumbent=latest, history=boots[-1:])
    assert one_boot.decision.kept, one_boot.decision.reason

    three_boots = _judge(candidate, incumbent=latest, history=boots)
    assert not three_boots.decision.kept
    assert three_boots.decision.gate == "improvement"
    assert three_boots.interval is not None and three_boots.interval.low * 100 < 1.0
    assert _width(three_boots) > 3 * _width(one_boot)


def test_boots_that_agree_never_narrow_below_the_assumed_boot_noise() -> None:
    """Re-measured boots that agree exactly do not make the interval narrower than the
    assumed --boot-noise allows."""
    latest = _boot(100.0)
    candidate = tuple(_pass(p.output_throughput * 1.10) for p in latest)
    agreeing = [_row(0, INCUMBENT, latest, kept=True), _row(4, INCUMBENT, latest, remeasure=True)]
    assert _width(_judge(candidate, incumbent=latest, history=agreeing)) == pytest.approx(
        _width(_judge(candidate, incumbent=latest, history=agreeing[:1])))


def test_between_boot_noise_is_the_candidates_own_workers() -> None:
    """Two GPUs are two instruments. The incumbent measured on gpu0 at 100 tok/s and on
    gpu1 at 108, twice each, boots on one GPU agreeing: pooled across GPUs its "boot
    noise" would be the gap between the GPUs. A candidate on gpu1 10 % above gpu1's boot
    is judged with gpu1's own boots (tight), and kept; mixing in gpu0's refuses it."""
    on = {0: _boot(100.0), 1: _boot(108.0)}
    boots = [row.model_copy(update={"worker": f"gpu{gpu}"}) for row, gpu in (
        (_row(0, INCUMBENT, on[0], kept=True), 0), (_row(1, INCUMBENT, on[1], remeasure=True), 1),
        (_row(4, INCUMBENT, on[0], remeasure=True), 0),
        (_row(5, INCUMBENT, on[1], remeasure=True), 1))]
    candidate = tuple(_pass(p.output_throughput * 1.10) for p in on[1])

    def verdict(worker: str | None) -> Verdict:
        return judge(s=SETTINGS, status="ok", passes=candidate,
                     median=median_pass(candidate), accuracy=None, reference=on[0][0],
                     incumbent=on[1], incumbent_id=INCUMBENT, best_score=1.0,
                     history=boots, identical=False, worker=worker)

    own, mixed = verdict("gpu1"), verdict(None)
    assert own.decision.kept, own.decision.reason
    assert not mixed.decision.kept
    assert _width(mixed) > 3 * _width(own)
    rule = pass_stop(SETTINGS, on[1], INCUMBENT, boots, "gpu1")
    assert rule is not None and rule.boot_cv == pytest.approx(SETTINGS.boot_cv())
    mixed_rule = pass_stop(SETTINGS, on[1], INCUMBENT, boots)
    assert mixed_rule is not None and mixed_rule.boot_cv > 2 * SETTINGS.boot_cv()


# -- pass-to-pass noise pooled from earlier configs ----------------------------------------


def test_pass_noise_pooled_from_earlier_configs_decides_a_close_call() -> None:
    """A +6 % candidate over three passes each (pass CV about 3 %): the pair alone cannot
    show it clears +1 %. Two earlier configs measured quietly (CV 0.2 %, 8 df) make the
    interval narrow enough to keep it; two earlier noisy ones (CV 8 %) widen it. The
    incumbent's own row is in the history too and is not pooled."""
    incumbent = _passes(100.0, 103.0, 97.0)
    candidate = tuple(_pass(p.output_throughput * 1.06) for p in incumbent)
    own = _row(0, INCUMBENT, incumbent, kept=True)
    quiet = [_row(1, "a", _passes(100.0, 100.2, 99.8, 100.1, 99.9)),
             _row(2, "b", _passes(90.0, 90.2, 89.8, 90.1, 89.9))]
    noisy = [_row(1, "a", _passes(100.0, 110.0, 90.0, 105.0, 95.0)),
             _row(2, "b", _passes(90.0, 99.0, 81.0, 94.0, 86.0))]

    alone = _judge(candidate, incumbent=incumbent, history=[own])
    with_quiet = _judge(candidate, incumbent=incumbent, history=[own, *quiet])
    with_noisy = _judge(candidate, incumbent=incumbent, history=[own, *noisy])

    assert not alone.decision.kept and alone.decision.gate == "improvement"
    assert with_quiet.decision.kept, with_quiet.decision.reason
    assert not with_noisy.decision.kept
    assert _width(with_quiet) < 0.75 * _width(alone)
    assert _width(with_noisy) > 1.5 * _width(alone)


def test_one_earlier_config_or_failed_rows_pool_nothing() -> None:
    """Pooling needs two earlier measured configs with repeats; a crash row, a single-pass
    row or the incumbent's own passes do not count towards them."""
    incumbent = _passes(100.0, 103.0, 97.0)
    candidate = tuple(_pass(p.output_throughput * 1.06) for p in incumbent)
    quiet = _passes(100.0, 100.2, 99.8, 100.1, 99.9)
    alone = _judge(candidate, incumbent=incumbent, history=[])
    for history in ([_row(1, "a", quiet)],
                    [_row(1, "a", quiet), _row(2, "b", quiet, status="crash")],
                    [_row(1, "a", quiet), _row(2, "b", quiet[:1])],
                    [_row(1, "a", quiet), _row(2, INCUMBENT, quiet, remeasure=True)]):
        assert _width(_judge(candidate, incumbent=incumbent, history=history)) \
            == pytest.approx(_width(alone)), history


# -- latency guard ------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "label"), [("e2e_p99", "p99 E2E"), ("ttft_p99", "p99 TTFT")])
def test_a_throughput_win_with_a_far_worse_tail_is_refused_by_the_latency_guard(
        field: str, label: str) -> None:
    """+30 % throughput with every pass's p99 three times the incumbent's: the interval
    clears the threshold, the latency guard (1.5x the incumbent's) refuses it. The same
    throughput at the incumbent's latency is kept."""
    incumbent = _passes(100.0, 100.5, 99.5)
    fast = (130.0, 130.5, 129.5)
    slow_tail = {"e2e_p99": 1000.0, "ttft_p99": 100.0}
    slow_tail[field] *= 3
    refused = _judge(_passes(*fast, **slow_tail), incumbent=incumbent, history=[])
    assert not refused.decision.kept
    assert refused.decision.gate == "latency"
    assert label in refused.decision.reason
    assert refused.interval is not None and refused.interval.low > 0.2  # a clear win otherwise

    kept = _judge(_passes(*fast), incumbent=incumbent, history=[])
    assert kept.decision.kept, kept.decision.reason

    unguarded = SETTINGS.model_copy(update={"max_latency_regression": None})
    assert _judge(_passes(*fast, **slow_tail), incumbent=incumbent, history=[],
                  settings=unguarded).decision.kept


# -- the rest of the wiring ---------------------------------------------------------------


def test_a_failed_measurement_has_no_score_and_is_not_kept() -> None:
    verdict = _judge((), incumbent=_boot(100.0), history=[], status="oom")
    assert verdict.score is None and verdict.interval is None
    assert not verdict.decision.kept and verdict.decision.gate == "status"


def test_score_is_relative_to_the_reference_and_the_interval_is_the_one_decided_on() -> None:
    incumbent = _boot(100.0)
    verdict = _judge(_boot(120.0), incumbent=incumbent, history=[])
    assert verdict.score == pytest.approx(1.2)
    assert verdict.interval is not None and verdict.decision.interval == verdict.interval
    assert verdict.interval.point == pytest.approx(0.2)


def test_a_single_pass_falls_back_to_the_point_rule() -> None:
    """With one pass there is no noise estimate: no interval, the score against the best
    score decides."""
    better = _judge(_passes(120.0), incumbent=_boot(100.0), history=[])
    assert better.interval is None and better.decision.interval is None
    assert better.decision.kept
    level = _judge(_passes(100.5), incumbent=_boot(100.0), history=[])
    assert not level.decision.kept and level.decision.gate == "improvement"


# -- failed requests: never kept, never the reference --------------------------------------


def _failing(tps: float, failed: int) -> BenchMetrics:
    return _pass(tps).model_copy(update={"failed": failed,
                                         "failure_reasons": {"HTTP 500: boom": failed}})


def test_an_ok_measurement_with_too_many_failed_requests_is_never_kept() -> None:
    """An adapter that called it `ok` is not trusted: a config 35 % "faster" because it
    failed 2 of 12 requests is refused, while the same passes without failures are kept."""
    incumbent = _boot(100.0)
    failing = tuple(_failing(t, 2) for t in (135.0, 135.5, 134.5))
    refused = _judge(failing, incumbent=incumbent, history=[])
    assert not refused.decision.kept and refused.decision.gate == "status"
    assert refused.decision.reason.startswith("17% of requests failed (at most 1% allowed)")
    kept = _judge(_boot(135.0), incumbent=incumbent,
                  history=[_row(0, INCUMBENT, incumbent, kept=True)])
    assert kept.decision.kept, kept.decision.reason


def test_an_unhealthy_baseline_says_so_and_the_first_healthy_config_becomes_the_reference(
        ) -> None:
    baseline = judge(s=SETTINGS, status="crash", passes=(), median=None, accuracy=None,
                     reference=None, incumbent=(), incumbent_id=INCUMBENT, best_score=None,
                     history=[], identical=False)
    assert not baseline.decision.kept
    assert baseline.decision.reason == (
        "not measured (crash): vLLM's defaults cannot serve this workload here; the run "
        "continues from the first healthy config")
    failed = _row(0, INCUMBENT, (), status="crash")
    first = judge(s=SETTINGS, status="ok", passes=_boot(90.0),
                  median=median_pass(_boot(90.0)), accuracy=None, reference=None,
                  incumbent=(), incumbent_id=INCUMBENT, best_score=None, history=[failed],
                  identical=False)
    assert first.decision.kept
    assert first.decision.reason == (
        "first healthy measurement becomes the reference (the baseline, vLLM's defaults, "
        "was not healthy: experiment 0 crash)")


def test_a_lossy_change_without_an_accuracy_figure_is_refused_however_fast() -> None:
    incumbent = _boot(100.0)
    history = [_row(0, INCUMBENT, incumbent, kept=True)]
    fast = _boot(150.0)
    control = _judge(fast, incumbent=incumbent, history=history)
    assert control.decision.kept
    blind = judge(s=SETTINGS, status="ok", passes=fast, median=median_pass(fast),
                  accuracy=None, reference=incumbent[0], incumbent=incumbent,
                  incumbent_id=INCUMBENT, best_score=1.0, history=history, identical=False,
                  output_changes=["kv_cache_dtype"])
    assert not blind.decision.kept and blind.decision.gate == "accuracy"
    assert "no accuracy figure: kv_cache_dtype" in blind.decision.reason


# -- stopping a bench early -------------------------------------------------------------------


def test_the_stop_rule_carries_what_judge_will_use_and_decides_like_it() -> None:
    history = [_row(i, f"earlier-{i}", _boot(900.0 + 10 * i)) for i in range(3)]
    incumbent = _boot(1000.0)
    rule = pass_stop(SETTINGS.model_copy(update={"repeats": 5}), incumbent, INCUMBENT,
                     history)
    assert rule is not None and rule.max_passes == 5 and rule.threshold == 0.01
    assert rule.incumbent == tuple(m.output_throughput for m in incumbent)
    assert rule.noise_df == 6.0  # three earlier configs of three passes pooled
    assert should_stop(rule, _passes(800.0, 805.0))  # clearly worse: drop now
    # clearly better: it runs four passes all the same, to be the next yardstick
    assert not should_stop(rule, _passes(1300.0, 1305.0))
    assert not should_stop(rule, _passes(1300.0, 1305.0, 1302.0))
    assert should_stop(rule, _passes(1300.0, 1305.0, 1302.0, 1298.0))
    assert not should_stop(rule, _passes(1000.0))  # one pass shows no spread
    assert pass_stop(SETTINGS.model_copy(update={"repeats": 2}), incumbent, INCUMBENT,
                     history) is None  # no look before the last pass
    assert pass_stop(SETTINGS, (), INCUMBENT, []) is None  # the baseline runs every pass


def test_a_verdict_on_fewer_passes_than_asked_says_so() -> None:
    """A bench the sequential test ended early is judged on the passes it ran, and the
    decision says how many of --repeats that was; a full bench says nothing."""
    five = SETTINGS.model_copy(update={"repeats": 5})
    incumbent = _passes(1000.0, 1004.0, 996.0, 1001.0, 999.0)
    early = _judge(_passes(1300.0, 1305.0, 1302.0, 1298.0), incumbent=incumbent,
                   history=[], settings=five)
    assert early.decision.kept and early.decision.reason.endswith("(decided on 4 of 5 passes)")
    full = _judge(_passes(1300.0, 1305.0, 1302.0, 1298.0, 1301.0), incumbent=incumbent,
                  history=[], settings=five)
    assert full.decision.kept and "decided on" not in full.decision.reason
    dropped = _judge(_passes(800.0, 805.0), incumbent=incumbent, history=[], settings=five)
    assert not dropped.decision.kept
    assert dropped.decision.reason.endswith("(decided on 2 of 5 passes)")
