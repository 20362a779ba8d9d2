"""Running a tune from the terminal: the progress lines, the signals that stop a run
resumably, the artifacts written at the end (deploy.sh, deploy.md, report.html) and
the closing summary."""


from __future__ import annotations

import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.status import Status

from aevyra_forge.cli.console import err, out
from aevyra_forge.core.errors import AgentError
from aevyra_forge.core.values import LAYER_NAMES, ExperimentRecord, takes_the_lead
from aevyra_forge.loop.events import (
    Event,
    LayerEscalated,
    Note,
    Observer,
    Planned,
    ProposalRefused,
    RunFinished,
    RunOutcome,
    RunStarted,
    TrialFinished,
    TrialPhase,
    TrialStarted,
)
from aevyra_forge.loop.plan import Plan
from aevyra_forge.report import export
from aevyra_forge.report.render import REPORT_HTML, render_text

if TYPE_CHECKING:  # the loop and its agents load only when a run starts
    from aevyra_forge.loop.ports import RunLog
    from aevyra_forge.loop.tuner import Tuner

EXIT_INTERRUPTED = 130


class ProgressPrinter:
    """Renders the loop's events: one line per experiment when it ends (with the run's
    elapsed time, its ETA from the plan and the best so far), and the running trial's
    phase, as a live status line on a terminal and as plain lines elsewhere (a log file
    under nohup shows where the run is). Experiments are numbered by their recorded id,
    as in the report."""

    def __init__(self, console: Console, budget: int, verbose: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.budget = budget
        self.verbose = verbose
        self.clock = clock
        self.started = clock()
        self.plan: Plan | None = None
        self.done = 0  # experiments recorded
        self.spent_s = 0.0  # their measured time, as the time budget counts it
        self.round_s: dict[int, float] = {}  # the longest trial of each round seen
        self.best: ExperimentRecord | None = None
        self.status: Status | None = None  # the live phase line, on a terminal

    def notify(self, event: Event) -> None:
        c = self  # every line through print(): never re-wrapped
        match event:
            case Note(text=text):
                c.print(f"[cyan]note[/]: {escape(text)}")
            case RunStarted(recorded=recorded, spent_s=spent_s):
                self.done, self.spent_s = recorded, spent_s
            case Planned(plan=plan):
                self.plan = plan
                c.print(f"[cyan]note[/]: {plan.note()}")
            case TrialStarted(trial=trial) if self.verbose:
                c.print(f"[dim]exp {trial.exp}: booting recipe {trial.recipe_id}...[/]")
            case TrialPhase(exp=exp, phase=phase, detail=detail):
                self.phase(exp, f"{phase} {detail}".strip())
            case TrialFinished(record=record):
                self.end_phase()
                self.done += 1
                self.spent_s += self._took(record)
                if takes_the_lead(record):
                    self.best = record
                c.print(f"{experiment_line(record)}  {self.summary()}")
            case ProposalRefused(reason=reason):
                c.print(f"[yellow]  proposal refused[/] ({reason}); asking again")
            case LayerEscalated(layer=layer, why=why):
                c.print(f"[magenta]layer {layer} ({LAYER_NAMES[layer]}) done:[/] {why}")
            case RunFinished():
                self.end_phase()

    def print(self, line: str) -> None:
        """One line as it is: a log file or pipe gets it whole (a terminal wraps it
        itself), so a command or path in it can be pasted back."""
        self.console.print(line, soft_wrap=True)

    def phase(self, exp: int, what: str) -> None:
        text = f"{_clock(self.clock() - self.started)} exp {exp}: {what}"
        if not self.console.is_terminal:
            self.print(f"[dim]{text}[/]")
        elif self.status is None:
            self.status = self.console.status(text)
            self.status.start()
        else:
            self.status.update(text)

    def end_phase(self) -> None:
        """Stop the live phase line (a run that ended or was interrupted)."""
        if self.status is not None:
            self.status.stop()
            self.status = None

    def _took(self, record: ExperimentRecord) -> float:
        """What `record` adds to the time spent: its own time, or for a trial of a round
        (several at once) what it adds to the round's longest, as loop/state.py counts."""
        took = (record.prepare_s or 0.0) + (record.boot_s or 0.0) + (record.bench_s or 0.0)
        if record.round is None:
            return took
        longest = self.round_s.get(record.round, 0.0)
        self.round_s[record.round] = max(longest, took)
        return max(0.0, took - longest)

    def summary(self) -> str:
        """Elapsed time, experiments done, the ETA (once a plan is known) and the best."""
        parts = [f"{_clock(self.clock() - self.started)}",
                 f"{self.done}/{self.budget} done"]
        if self.plan is not None:
            parts.append(f"ETA ~{_clock(self.plan.eta_s(self.done, self.spent_s))}")
        if self.best is not None:
            parts.append(f"best exp {self.best.exp} ({self.best.score or 0:.3f})")
        return "[dim]\\[" + ", ".join(parts) + "][/]"


def _clock(seconds: float) -> str:
    """h:mm:ss."""
    whole = int(max(0.0, seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def experiment_line(rec: ExperimentRecord) -> str:
    layer = f"L{rec.layer}"
    if rec.remeasure:
        what = "incumbent again (drift check)"
    elif rec.proposal is not None:
        what = ", ".join(f"{k}={v}" for k, v in rec.proposal.changes.items())
    elif rec.exp == 0:
        what = "baseline"
    else:  # a refused reply that held no usable proposal
        what = "(no usable proposal)"
    if rec.status == "ok" and rec.metrics is not None:
        mark = ("[green]kept[/]" if rec.kept
                else f"[dim]reverted[/] ({escape(rec.decision or 'no reason recorded')})")
        acc = f" acc {rec.accuracy:.3f}" if rec.accuracy is not None else ""
        gain = (f"  gain \\[{rec.interval[0] * 100:+.1f}%, {rec.interval[1] * 100:+.1f}%]"
                if rec.interval and all(abs(x) != float("inf") for x in rec.interval)
                else "")
        slo = "  [red]breaks SLO[/]" if rec.slo_violations else ""
        body = (f"{rec.metrics.output_throughput:8.1f} tok/s  p99 "
                f"{rec.metrics.e2e_ms.p99:7.0f} ms  score {rec.score or 0:.3f}{gain}{acc}"
                f"{slo}  {mark}")
    else:
        body = f"[red]{rec.status}[/]: {escape(rec.reason[:100])}"
    return f"[bold]exp {rec.exp:>3}[/] {layer} {escape(what):<40} {body}"


def install_signal_handlers() -> None:
    """SIGTERM (`kill`) and SIGHUP (a dropped SSH session) stop like Ctrl-C: the server in
    flight is torn down and the run stays resumable. A SIGHUP already ignored stays
    ignored: `nohup aevyra-forge tune ... &` asked to outlive the session."""

    def handler(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, handler)


def run_tuner(starter: Callable[[Observer], Tuner], verbose: bool, run_hint: str) -> None:
    printer = ProgressPrinter(err, 0, verbose)
    install_signal_handlers()
    try:
        tuner = starter(printer)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finished = False
    try:
        printer.budget = tuner.s.max_experiments
        err.print(f"[bold]run[/] {tuner.run_log.path}  model {tuner.s.model}  on "
                  f"{tuner.hw.describe()}  agent {tuner.s.llm}")
        outcome = tuner.run()
        deployment = None  # nothing served: no deploy command for an untested recipe
        if outcome.best_record is not None:
            deployment = export.for_recipe(outcome.run_dir, outcome.best,
                                           outcome.best_record)
            tuner.run_log.write_artifact("deploy.sh", export.render_deploy_sh(deployment),
                                         executable=True)
            tuner.run_log.write_artifact("deploy.md", export.render_deploy_md(deployment))
        finished = True
        write_report(tuner.run_log)
    except KeyboardInterrupt:
        if not finished:  # what was recorded so far; a second Ctrl-C skips it
            write_report(tuner.run_log)
        err.print(f"interrupted: the run is resumable with `aevyra-forge tune resume "
                  f"--run-dir {run_hint}`")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except AgentError as exc:  # the provider failed mid-run; another --llm can go on
        raise AgentError(f"{exc}; the run is resumable: aevyra-forge tune resume --run-dir "
                         f"{run_hint} (add --llm builtin to go on offline)") from None
    finally:
        printer.end_phase()
        tuner.run_log.close()  # release the run's lock even when the loop failed
    print_finish(outcome, deployment)
    if deployment is None:
        raise typer.Exit(1)


def write_report(run: RunLog) -> None:
    """report.html into the run folder. The results are already on disk, so a report that
    cannot be drawn costs a warning, never the run's exit status."""
    try:
        run.write_artifact(REPORT_HTML, render_text(run.path, "html"))
    except Exception as exc:  # any failure here is the report's, not the run's
        err.print(f"warning: {REPORT_HTML} not written ({type(exc).__name__}: {exc}); "
                  f"`aevyra-forge report {run.path} --format html` draws it again",
                  markup=False, highlight=False, soft_wrap=True)


def print_finish(outcome: RunOutcome, deployment: export.Deployment | None) -> None:
    best = outcome.best
    score = outcome.best_score
    say(f"finished: {outcome.reason}")
    if deployment is None:
        say(f"nothing served: all {outcome.experiments} experiment(s) failed, the baseline "
            "included, so there is nothing to deploy; the baseline's log under "
            f"{outcome.run_dir / 'logs'} says why")
        say(f"report:      {outcome.run_dir / REPORT_HTML} (or aevyra-forge report "
            f"{outcome.run_dir})")
        return
    say(f"best recipe {best.id} (generation {best.generation}), score "
        f"{score:.3f}" if score is not None else "no configuration could be measured")
    say(f"best recipe: {outcome.run_dir / 'best_recipe.yaml'}")
    say(f"report:      {outcome.run_dir / REPORT_HTML} (or aevyra-forge report "
        f"{outcome.run_dir})")
    say(f"deploy:      {export.render_cmd(deployment).strip()}")
    say(f"             saved as {outcome.run_dir / 'deploy.sh'}; for containers: "
        f"aevyra-forge export {outcome.run_dir} --as docker|compose|k8s|helm-values")
    if deployment.caveat:
        say(f"note: simulated result; {deployment.caveat}")


def say(text: str) -> None:
    """One line of the closing summary, never re-wrapped: paths and commands in it are
    pasted back into a shell, also from a log file."""
    out.print(text, soft_wrap=True, markup=False, highlight=False)
