"""Pure keep/revert decisions. A score is normalised to the reference measurement (the
baseline, or the first config that measured when the baseline could not boot), so 1.0
means "as good as the baseline"."""

from __future__ import annotations

from dataclasses import dataclass

from aevyra_forge.models import BenchMetrics, Status


@dataclass(frozen=True)
class Decision:
    kept: bool
    reason: str


def score(metrics: BenchMetrics, reference: BenchMetrics) -> float:
    """Output-token throughput relative to the reference (throughput objective)."""
    if reference.output_throughput <= 0:
        return 0.0
    return metrics.output_throughput / reference.output_throughput


def decide(status: Status, candidate: float | None, best: float | None,
           accuracy: float | None, *, min_improvement_pct: float, accuracy_floor: float,
           same_settings_as_best: bool = False) -> Decision:
    """Keep only a measured config that beats the best by more than the threshold and
    stays above the accuracy floor."""
    if status != "ok" or candidate is None:
        return Decision(False, f"not measured ({status})")
    if same_settings_as_best:
        return Decision(False, "identical to the incumbent")
    if accuracy is not None and accuracy < accuracy_floor:
        return Decision(False, f"accuracy {accuracy:.4f} below floor {accuracy_floor}")
    if best is None:
        return Decision(True, "first successful measurement becomes the reference")
    needed = best * (1 + min_improvement_pct / 100)
    gain_pct = (candidate / best - 1) * 100 if best > 0 else float("inf")
    if candidate > needed:
        return Decision(True, f"{gain_pct:+.1f}% vs best (needs > +{min_improvement_pct}%)")
    return Decision(False, f"{gain_pct:+.1f}% vs best, not above +{min_improvement_pct}%")
