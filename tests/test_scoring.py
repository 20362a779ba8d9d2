from __future__ import annotations

from aevyra_forge.models import BenchMetrics
from aevyra_forge.scoring import decide, score


def _metrics(tps: float) -> BenchMetrics:
    return BenchMetrics(completed=10, duration_s=10.0, input_tokens=100,
                        output_tokens=int(tps * 10), request_throughput=1.0,
                        output_throughput=tps, total_token_throughput=tps + 10)


def test_score_is_relative_to_the_reference() -> None:
    assert score(_metrics(150), _metrics(100)) == 1.5
    assert score(_metrics(100), _metrics(0)) == 0.0


def test_keep_needs_more_than_the_threshold() -> None:
    common = {"min_improvement_pct": 1.0, "accuracy_floor": 0.99}
    assert decide("ok", 1.02, 1.0, 1.0, **common).kept
    assert not decide("ok", 1.01, 1.0, 1.0, **common).kept
    assert not decide("ok", 0.9, 1.0, None, **common).kept


def test_failures_accuracy_and_identity_are_never_kept() -> None:
    common = {"min_improvement_pct": 1.0, "accuracy_floor": 0.99}
    assert not decide("crash", None, 1.0, None, **common).kept
    low = decide("ok", 2.0, 1.0, 0.98, **common)
    assert not low.kept and "floor" in low.reason
    assert not decide("ok", 2.0, 1.0, 1.0, same_settings_as_best=True, **common).kept


def test_first_measurement_becomes_the_reference() -> None:
    first = decide("ok", 1.0, None, None, min_improvement_pct=1.0, accuracy_floor=0.99)
    assert first.kept and "reference" in first.reason
