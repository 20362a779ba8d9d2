from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aevyra_forge.core.errors import ForgeError, UsageError
from aevyra_forge.core.slo import (
    METRICS,
    STATS,
    Slo,
    SloError,
    SloTerm,
    check,
    check_passes,
    parse_slo,
)
from aevyra_forge.core.values import BenchMetrics, LatencyStats
from aevyra_forge.measure.metrics import RequestResult, aggregate


def _metrics(ttft_p99: float = 300.0, tpot_p99: float = 30.0, e2e_p99: float = 5000.0,
             completed: int = 10) -> BenchMetrics:
    return BenchMetrics(completed=completed, duration_s=10.0, input_tokens=100,
                        output_tokens=1000, request_throughput=1.0, output_throughput=100.0,
                        total_token_throughput=110.0,
                        ttft_ms=LatencyStats(mean=100.0, p50=90.0, p90=200.0, p99=ttft_p99),
                        tpot_ms=LatencyStats(mean=20.0, p50=19.0, p90=25.0, p99=tpot_p99),
                        e2e_ms=LatencyStats(mean=3000.0, p50=2900.0, p90=4000.0, p99=e2e_p99))


def test_parses_the_documented_example() -> None:
    slo = parse_slo("ttft_p99<500ms,tpot_p99<50ms,e2e_p99<10s")
    assert slo.terms == (
        SloTerm(metric="ttft", stat="p99", op="<", threshold_ms=500.0),
        SloTerm(metric="tpot", stat="p99", op="<", threshold_ms=50.0),
        SloTerm(metric="e2e", stat="p99", op="<", threshold_ms=10_000.0))
    assert str(slo) == "ttft_p99<500ms,tpot_p99<50ms,e2e_p99<10s"


def test_spacing_case_units_and_or_equal() -> None:
    slo = parse_slo(" TTFT_P50 <= 0.25 S , itl_mean<1.5e1ms ")
    assert slo.terms == (SloTerm(metric="ttft", stat="p50", op="<=", threshold_ms=250.0),
                         SloTerm(metric="itl", stat="mean", op="<", threshold_ms=15.0))
    assert str(slo) == "ttft_p50<=250ms,itl_mean<15ms"


@pytest.mark.parametrize(("text", "names"), [
    ("", "empty SLO"),
    ("ttft_p98<5ms", "unknown statistic 'p98'"),
    ("latency_p99<5ms", "unknown metric 'latency'"),
    ("ttft_p99<5", "'ttft_p99<5'"),
    ("ttft_p99>5ms", "'ttft_p99>5ms'"),
    ("ttft_p99<0ms", "positive, finite"),
    ("ttft_p99<1e400s", "positive, finite"),
    ("ttft_p99<5ms,", "bad SLO term ''"),
    ("ttft_p99<5ms,ttft_p99<1s", "ttft_p99 given twice"),
])
def test_bad_input_names_the_term_and_the_grammar(text: str, names: str) -> None:
    with pytest.raises(SloError) as err:
        parse_slo(text)
    message = str(err.value)
    assert names in message and "\n" not in message
    if "twice" not in names:
        assert "ttft|tpot|itl|e2e" in message and "mean|p50|p90|p99" in message
    assert isinstance(err.value, UsageError)


_terms = st.builds(
    SloTerm, metric=st.sampled_from(METRICS), stat=st.sampled_from(STATS),
    op=st.sampled_from(["<", "<="]),
    threshold_ms=st.floats(min_value=1e-6, max_value=1e12, allow_nan=False))


@given(st.lists(_terms, min_size=1, max_size=8, unique_by=lambda t: t.name))
def test_canonical_form_round_trips(terms: list[SloTerm]) -> None:
    slo = Slo(terms=tuple(terms))
    assert parse_slo(str(slo)) == slo


@given(st.sampled_from(METRICS), st.sampled_from(STATS), st.sampled_from(["<", "<="]),
       st.integers(min_value=1, max_value=10**6), st.sampled_from(["ms", "s", "MS", "S"]),
       st.sampled_from(["", " ", "  "]))
def test_written_terms_parse_to_their_values(metric: str, stat: str, op: str, value: int,
                                            unit: str, pad: str) -> None:
    term = parse_slo(f"{pad}{metric}_{stat}{pad}{op}{pad}{value}{pad}{unit}{pad}").terms[0]
    scale = 1000.0 if unit.lower() == "s" else 1.0
    assert (term.metric, term.stat, term.op, term.threshold_ms) == (metric, stat, op,
                                                                    value * scale)


@given(st.text(max_size=60) | st.text(alphabet="ttfpoie2_<=.,0123456789ms ", max_size=40))
def test_any_text_parses_or_raises_a_forge_error(text: str) -> None:
    try:
        slo = parse_slo(text)
    except ForgeError:
        return
    assert slo.terms and parse_slo(str(slo)) == slo


def test_check_lists_each_broken_term_with_its_value() -> None:
    slo = parse_slo("ttft_p99<500ms,tpot_p99<50ms,e2e_p99<=5s")
    assert check(_metrics(), slo) == []
    assert check(_metrics(e2e_p99=5000.0), slo) == []  # <= holds at the bound
    assert check(_metrics(ttft_p99=612.4, e2e_p99=5001.0), slo) == [
        "ttft_p99 612 ms, needs <500 ms", "e2e_p99 5001 ms, needs <=5000 ms"]
    assert check(_metrics(), Slo()) == []


def test_a_pass_with_no_completed_request_breaks_every_term() -> None:
    slo = parse_slo("ttft_p99<500ms,e2e_p99<5s")
    assert len(check(_metrics(completed=0), slo)) == 2
    assert len(check_passes([_metrics(), _metrics(completed=0)], slo)) == 2


def test_check_passes_uses_the_median_pass_value() -> None:
    slo = parse_slo("ttft_p99<500ms")
    one_noisy = [_metrics(ttft_p99=400.0), _metrics(ttft_p99=900.0), _metrics(ttft_p99=450.0)]
    assert check_passes(one_noisy, slo) == []
    two_bad = [_metrics(ttft_p99=400.0), _metrics(ttft_p99=900.0), _metrics(ttft_p99=600.0)]
    assert check_passes(two_bad, slo) == ["ttft_p99 600 ms, needs <500 ms"]


def test_per_request_bounds_take_the_loosest_term_and_skip_itl() -> None:
    slo = parse_slo("ttft_p50<200ms,ttft_p99<500ms,itl_p99<10ms,tpot_mean<=40ms")
    limits = slo.request_limits()
    assert set(limits) == {"ttft", "tpot"}
    assert limits["ttft"].threshold_ms == 500.0
    assert slo.meets(ttft_ms=450.0, tpot_ms=40.0, e2e_ms=1e9)
    assert not slo.meets(ttft_ms=500.0, tpot_ms=10.0, e2e_ms=1.0)
    assert not slo.meets(ttft_ms=10.0, tpot_ms=40.1, e2e_ms=1.0)
    assert slo.meets(ttft_ms=10.0, tpot_ms=None, e2e_ms=1.0)  # one output token: no TPOT


def test_aggregate_counts_goodput_per_second() -> None:
    def done(ttft_s: float, latency_s: float, tokens: int = 11) -> RequestResult:
        return RequestResult(success=True, prompt_tokens=5, output_tokens=tokens,
                             ttft_s=ttft_s, latency_s=latency_s)

    results = [done(0.1, 0.6),  # TPOT 50 ms: meets tpot<60ms
               done(0.1, 1.1),  # TPOT 100 ms: misses
               done(0.7, 0.8),  # TTFT 700 ms: misses
               done(0.2, 0.2, tokens=1),  # no TPOT: meets
               RequestResult(success=False, error="timeout")]
    slo = parse_slo("ttft_p99<500ms,tpot_p99<60ms")
    assert aggregate(results, duration_s=2.0, slo=slo).goodput == pytest.approx(1.0)
    assert aggregate(results, duration_s=2.0).goodput is None
