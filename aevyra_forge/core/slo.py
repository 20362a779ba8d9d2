"""Service-level objectives: parse `--slo` strings such as `ttft_p99<500ms,e2e_p99<10s`,
check a measured config against them, and tell whether one request met them (the
per-request test behind goodput)."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Sequence
from typing import Annotated, Literal, cast

from pydantic import Field

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.values import BenchMetrics, Frozen

Metric = Literal["ttft", "tpot", "itl", "e2e"]
Stat = Literal["mean", "p50", "p90", "p99"]
Op = Literal["<", "<="]
METRICS: tuple[Metric, ...] = ("ttft", "tpot", "itl", "e2e")
STATS: tuple[Stat, ...] = ("mean", "p50", "p90", "p99")
# ITL is pooled over the gaps of every request, so no single request "has" an ITL: only
# TTFT, TPOT and E2E terms take part in the per-request (goodput) test.
PER_REQUEST: tuple[Metric, ...] = ("ttft", "tpot", "e2e")
MS_PER_UNIT = {"ms": 1.0, "s": 1000.0}
GRAMMAR = ("expected METRIC_STAT<VALUE UNIT terms joined by commas: METRIC ttft|tpot|itl|e2e, "
           "STAT mean|p50|p90|p99, operator < or <=, UNIT ms|s, "
           "e.g. --slo ttft_p99<500ms,tpot_p99<50ms,e2e_p99<10s")

_TERM = re.compile(
    r"(?P<metric>[a-z0-9]+)_(?P<stat>[a-z0-9]+)\s*(?P<op><=|<)\s*"
    r"(?P<value>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*(?P<unit>ms|s)",
    re.IGNORECASE | re.ASCII)  # ASCII: no long s or Kelvin sign matching "s" or "k"


class SloError(UsageError):
    """An `--slo` string does not follow the grammar."""


class SloTerm(Frozen):
    """One bound: `<metric>_<stat> <op> threshold`, the threshold in milliseconds."""

    metric: Metric
    stat: Stat
    op: Op = "<"
    threshold_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)]

    @property
    def name(self) -> str:
        return f"{self.metric}_{self.stat}"

    def holds(self, value_ms: float) -> bool:
        return value_ms < self.threshold_ms if self.op == "<" else value_ms <= self.threshold_ms

    def __str__(self) -> str:
        seconds = self.threshold_ms / 1000
        if self.threshold_ms >= 1000 and float(_number(seconds)) * 1000 == self.threshold_ms:
            return f"{self.name}{self.op}{_number(seconds)}s"
        return f"{self.name}{self.op}{_number(self.threshold_ms)}ms"


class Slo(Frozen):
    """A conjunction of bounds. `str(slo)` is its canonical `--slo` form, which parses
    back to an equal Slo."""

    terms: tuple[SloTerm, ...] = ()

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms)

    def __bool__(self) -> bool:
        return bool(self.terms)

    def request_limits(self) -> dict[Metric, SloTerm]:
        """The per-request bound of each of TTFT, TPOT and E2E that has a term: the loosest
        of that metric's terms. A tail term (p99) is the promise each request must keep; a
        tighter central term (`ttft_p50<200ms` beside `ttft_p99<500ms`) bounds the
        distribution, which `check` tests, not every single request."""
        limits: dict[Metric, SloTerm] = {}
        for term in self.terms:
            if term.metric not in PER_REQUEST:
                continue
            held = limits.get(term.metric)
            if held is None or (term.threshold_ms, term.op == "<=") > (
                    held.threshold_ms, held.op == "<="):
                limits[term.metric] = term
        return limits

    def meets(self, ttft_ms: float, tpot_ms: float | None, e2e_ms: float) -> bool:
        """Whether one successful request met every per-request bound. A request with a
        single output token has no TPOT and cannot break a TPOT bound."""
        values: dict[Metric, float | None] = {"ttft": ttft_ms, "tpot": tpot_ms, "e2e": e2e_ms}
        for metric, term in self.request_limits().items():
            value = values[metric]
            if value is not None and not term.holds(value):
                return False
        return True


def parse_slo(text: str) -> Slo:
    """Parse an `--slo` string. Raises SloError naming the bad term and the grammar."""
    if not text.strip():
        raise SloError(f"empty SLO: {GRAMMAR}")
    terms = [_parse_term(piece.strip()) for piece in text.split(",")]
    names = [t.name for t in terms]
    for name in names:
        if names.count(name) > 1:
            raise SloError(f"SLO term {name} given twice in {text.strip()!r}: keep one bound "
                           "per metric and statistic")
    return Slo(terms=tuple(terms))


def _parse_term(piece: str) -> SloTerm:
    match = _TERM.fullmatch(piece)
    if not match:
        raise SloError(f"bad SLO term {piece!r}: {GRAMMAR}")
    metric, stat = match["metric"].lower(), match["stat"].lower()
    if metric not in METRICS:
        raise SloError(f"bad SLO term {piece!r}: unknown metric {metric!r}; {GRAMMAR}")
    if stat not in STATS:
        raise SloError(f"bad SLO term {piece!r}: unknown statistic {stat!r}; {GRAMMAR}")
    threshold_ms = float(match["value"]) * MS_PER_UNIT[match["unit"].lower()]
    if not (math.isfinite(threshold_ms) and threshold_ms > 0):
        raise SloError(f"bad SLO term {piece!r}: the threshold must be a positive, finite "
                       f"time; {GRAMMAR}")
    return SloTerm(metric=cast(Metric, metric), stat=cast(Stat, stat),
                   op=cast(Op, match["op"]), threshold_ms=threshold_ms)


def check(m: BenchMetrics, slo: Slo) -> list[str]:
    """The SLO terms one bench pass breaks, one line each ([] when every term holds). A
    pass where no request completed breaks every term: its latencies are not measured."""
    if not slo:
        return []
    if m.completed == 0:
        return [f"{t}: no request completed" for t in slo.terms]
    return _violations(slo, lambda term: _value(m, term))


def check_passes(passes: Sequence[BenchMetrics], slo: Slo) -> list[str]:
    """The SLO terms a config breaks over repeated passes, each term tested on its median
    across passes so that one noisy pass neither breaks nor rescues a config."""
    if not slo:
        return []
    if not passes or any(m.completed == 0 for m in passes):
        return [f"{t}: no request completed in some pass" for t in slo.terms]
    return _violations(slo, lambda term: statistics.median(_value(m, term) for m in passes))


def _value(m: BenchMetrics, term: SloTerm) -> float:
    stats = {"ttft": m.ttft_ms, "tpot": m.tpot_ms, "itl": m.itl_ms, "e2e": m.e2e_ms}
    return float(getattr(stats[term.metric], term.stat))


def _violations(slo: Slo, value_of: Callable[[SloTerm], float]) -> list[str]:
    out = []
    for term in slo.terms:
        value = value_of(term)
        if not term.holds(value):
            out.append(f"{term.name} {_ms(value)} ms, needs {term.op}{_ms(term.threshold_ms)} ms")
    return out


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _number(value: float) -> str:
    """The shortest text that parses back to exactly `value` (repr), without a bare .0."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text

