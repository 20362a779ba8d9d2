"""Checking that a bench's timed passes were independent. Each pass sends its own
cache_salt so it cannot reuse the prefix cache an earlier pass filled; a server that
ignores the salt serves later passes from that cache, which flatters them, widens every
interval and inflates the gains of KV-related changes. The check reads the server's
prefix-cache counters per pass and compares the first pass's speed with the rest."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from aevyra_forge.core.values import BenchMetrics, IsolationMethod, PassIsolation

HIT_RATE_RISE = 0.10
"""Share of prompt tokens: a later pass whose prefix-cache hit rate exceeds the first
pass's by more than this hit cache the first pass filled. Passes replay the same requests,
so isolated passes have the same hit rate (the within-pass sharing) up to the order in
which concurrent requests arrive, a few blocks' worth."""
FIRST_PASS_SLOW = 0.75
"""A first pass below this fraction of the later passes' median output throughput (or
with a mean E2E latency above theirs divided by it) is markedly slower: a cold server or
cache, not noise (one server's passes vary 3-11 % on the CPU build, far less on a GPU)."""


@dataclass(frozen=True)
class IsolationCheck:
    """What the passes show: `leaked` later passes hit cache the first filled (the salt was
    ignored); `slow_first` the first pass was markedly slower than the rest."""

    leaked: bool
    slow_first: bool
    note: str

    @property
    def isolated(self) -> bool:
        return not (self.leaked or self.slow_first)


def hit_rate(m: BenchMetrics) -> float | None:
    """The pass's prefix-cache hit rate from the server's counters; None without them."""
    return m.server.get("prefix_cache_hit_rate")


def check_passes(passes: Sequence[BenchMetrics]) -> IsolationCheck:
    """Pass 1 against the later passes (at least two passes)."""
    rates = [hit_rate(m) for m in passes]
    leaked = rates[0] is not None and any(
        r is not None and r - rates[0] > HIT_RATE_RISE for r in rates[1:])
    speed = first_pass_speed(passes)
    slow = speed is not None and speed < FIRST_PASS_SLOW
    return IsolationCheck(leaked, slow, describe(rates, speed))


def first_pass_speed(passes: Sequence[BenchMetrics]) -> float | None:
    """Pass 1's speed relative to the later passes' median (1.0 = as fast): the lower of
    its throughput ratio and its inverse mean-E2E ratio, so an open-loop pass (throughput
    fixed by the arrival times) is judged by its latency."""
    first, rest = passes[0], passes[1:]
    ratios = []
    thr = statistics.median(m.output_throughput for m in rest) if rest else 0.0
    if thr > 0:
        ratios.append(first.output_throughput / thr)
    e2e = statistics.median(m.e2e_ms.mean for m in rest) if rest else 0.0
    if e2e > 0 and first.e2e_ms.mean > 0:
        ratios.append(e2e / first.e2e_ms.mean)
    return min(ratios) if ratios else None


def describe(rates: Sequence[float | None], speed: float | None) -> str:
    """The evidence in a few words: hit rates per pass and pass 1's relative speed."""
    parts = []
    if any(r is not None for r in rates):
        shown = "/".join("-" if r is None else f"{r:.0%}" for r in rates)
        parts.append(f"prefix-cache hit rate per pass {shown}")
    else:
        parts.append("no prefix-cache counters")
    if speed is not None:
        parts.append(f"pass 1 at {speed:.0%} of the rest")
    return ", ".join(parts)


def isolation(method: IsolationMethod, passes: Sequence[BenchMetrics],
              found: IsolationCheck | None = None) -> PassIsolation:
    """The record of how the kept passes were isolated: the `method` used, why (what the
    salted passes showed, `found`, when the bench had to fall back) and the kept passes'
    own hit rates and first-versus-rest speed."""
    if method == "unchecked":
        return PassIsolation(method=method, note="one pass: nothing to compare")
    kept = describe([hit_rate(m) for m in passes],
                    first_pass_speed(passes) if len(passes) > 1 else None)
    if found is None:
        return PassIsolation(method=method, note=f"passes independent: {kept}")
    why = ("later passes hit the prefix cache pass 1 filled (cache_salt ignored)"
           if found.leaked else "pass 1 markedly slower than the rest")
    how = {"reset": "reset the prefix cache before each pass",
           "warm_pass": "pass 1 set aside as an untimed warm pass and replaced",
           "salt": "kept as measured"}[method]
    return PassIsolation(method=method,
                         note=f"salted passes not independent: {why} ({found.note}); "
                              f"{how}; kept passes: {kept}")
