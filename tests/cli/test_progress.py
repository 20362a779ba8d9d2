"""The progress printer: one line per experiment numbered as the report numbers it, with
elapsed time, ETA and the best so far; the reason on every revert; phase lines; and
lines to a file or pipe never re-wrapped."""

from __future__ import annotations

import io

from rich.console import Console

from aevyra_forge.cli.progress import ProgressPrinter
from aevyra_forge.core.values import Proposal
from aevyra_forge.loop.events import Planned, RunStarted, TrialFinished, TrialPhase
from aevyra_forge.loop.plan import Estimate, Plan
from tests.builders import record


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _printer(buf: io.StringIO, clock: Clock) -> ProgressPrinter:
    console = Console(file=buf, width=80, color_system=None)  # not a terminal
    return ProgressPrinter(console, 12, verbose=False, clock=clock)


def test_lines_to_a_pipe_are_not_wrapped_and_carry_elapsed_eta_and_best() -> None:
    buf, clock = io.StringIO(), Clock()
    printer = _printer(buf, clock)
    printer.notify(Planned(Plan(Estimate(boot_s=100, bench_s=500, source="measurement"),
                                3600 * 2, 12)))
    printer.notify(RunStarted(recorded=0))
    clock.now += 3725  # 1:02:05 in
    printer.notify(TrialFinished(record(0, kept=True, score=1.0, boot_s=100.0,
                                        bench_s=500.0)))
    changes = {f"knob_number_{i}": 1000 + i for i in range(6)}
    reverted = record(1, score=1.01, boot_s=100.0, bench_s=500.0,
                      decision="+1.0% [-2.0%, +4.0%]: lower bound not above +1.0%").model_copy(
        update={"proposal": Proposal(rationale="r", layer=1, changes=changes)})
    printer.notify(TrialFinished(reverted))
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("note: plan: about 12 experiments fit in 2 hours")
    base, second = lines[1], lines[2]
    assert len(lines) == 3 and len(second) > 160  # one line each, however long
    assert base.startswith("exp   0 L1 baseline")
    # 1 done, 600 s spent: 6600 s left hold 11 more of 600 s
    assert "[1:02:05, 1/12 done, ETA ~1:50:00, best exp 0 (1.000)]" in base
    assert second.startswith("exp   1 L1 knob_number_0=1000")
    assert "reverted (+1.0% [-2.0%, +4.0%]: lower bound not above +1.0%)" in second
    assert "2/12 done, ETA ~1:40:00, best exp 0" in second


def test_phases_are_plain_lines_off_a_terminal_and_a_resume_counts_what_was_done() -> None:
    buf, clock = io.StringIO(), Clock()
    printer = _printer(buf, clock)
    printer.notify(Planned(Plan(Estimate(boot_s=60, bench_s=540, source="the trace"),
                                3600, 50)))
    printer.notify(RunStarted(recorded=4, spent_s=2400.0))
    clock.now += 65
    printer.notify(TrialPhase(4, "boot"))
    printer.notify(TrialPhase(4, "bench", "pass 2/5"))
    printer.notify(TrialFinished(record(4, status="crash", reason="CUDA error",
                                        boot_s=600.0)))
    lines = buf.getvalue().splitlines()
    assert lines[1:3] == ["0:01:05 exp 4: boot", "0:01:05 exp 4: bench pass 2/5"]
    assert lines[3].startswith("exp   4 L1 ") and "crash: CUDA error" in lines[3]
    assert "5/12 done, ETA ~0:10:00]" in lines[3]  # 3000 s spent of 3600: one more fits


def test_with_four_workers_a_round_counts_once_and_the_eta_in_rounds() -> None:
    """Four trials of one round, 600 s each, ran at once: 600 s spent, not 2400, and
    the 7 experiments left are 2 rounds of 600 s (not 7 experiments of 600 s)."""
    buf, clock = io.StringIO(), Clock()
    printer = _printer(buf, clock)
    printer.notify(Planned(Plan(Estimate(boot_s=100, bench_s=500, source="measurement"),
                                3600 * 2, 12, workers=4)))
    printer.notify(RunStarted(recorded=1, spent_s=600.0))  # the baseline, alone
    for exp in range(1, 5):
        printer.notify(TrialFinished(record(exp, boot_s=100.0, bench_s=500.0 - exp,
                                            round=1, worker=f"gpu{exp - 1}")))
    assert printer.spent_s == 600.0 + 599.0  # the longest of the round
    assert buf.getvalue().splitlines()[-1].endswith("5/12 done, ETA ~0:20:00]")


def test_on_a_terminal_the_phase_is_one_live_line_that_ends_with_the_experiment() -> None:
    buf, clock = io.StringIO(), Clock()
    console = Console(file=buf, width=100, force_terminal=True, color_system=None)
    printer = ProgressPrinter(console, 12, verbose=False, clock=clock)
    printer.notify(TrialPhase(0, "boot"))
    live = printer.status
    assert live is not None
    printer.notify(TrialPhase(0, "bench", "pass 1/5"))
    assert printer.status is live  # updated in place, not a second line
    printer.notify(TrialFinished(record(0, kept=True)))
    assert printer.status is None
    assert "exp   0 L1 baseline" in buf.getvalue()


def test_a_refused_reply_is_not_labelled_as_the_baseline() -> None:
    buf, clock = io.StringIO(), Clock()
    printer = _printer(buf, clock)
    printer.notify(TrialFinished(record(3, status="invalid", reason="no JSON object")))
    (line,) = buf.getvalue().splitlines()
    assert line.startswith("exp   3 L1 (no usable proposal)")
    assert "baseline" not in line and "invalid: no JSON object" in line
