"""Running a tune from the terminal: the progress lines, the signals that stop a run
resumably, the artifacts written at the end (deploy.sh, deploy.md, report.html) and
the closing summary."""


from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from aevyra_forge.cli.console import err, out
from aevyra_forge.core.errors import AgentError
from aevyra_forge.core.values import LAYER_NAMES, ExperimentRecord
from aevyra_forge.loop.events import (
    Event,
    LayerEscalated,
    Note,
    Observer,
    ProposalRefused,
    RunOutcome,
    TrialFinished,
    TrialStarted,
)
from aevyra_forge.report import export
from aevyra_forge.report.render import REPORT_HTML, render_text

if TYPE_CHECKING:  # the loop and its agents load only when a run starts
    from aevyra_forge.loop.ports import RunLog
    from aevyra_forge.loop.tuner import Tuner

EXIT_INTERRUPTED = 130


class ProgressPrinter:
    """Renders the loop's events as one line per experiment, with a running summary."""

    def __init__(self, console: Console, budget: int, verbose: bool) -> None:
        self.console = console
        self.budget = budget
        self.verbose = verbose

    def notify(self, event: Event) -> None:
        c = self.console
        match event:
            case Note(text=text):
                c.print(f"[cyan]note[/]: {text}")
            case TrialStarted(trial=trial) if self.verbose:
                c.print(f"[dim]exp {trial.exp}: booting recipe {trial.recipe_id}...[/]")
            case TrialFinished(record=record):
                c.print(experiment_line(record, self.budget))
            case ProposalRefused(reason=reason):
                c.print(f"[yellow]  proposal refused[/] ({reason}); asking again")
            case LayerEscalated(layer=layer, why=why):
                c.print(f"[magenta]layer {layer} ({LAYER_NAMES[layer]}) done:[/] {why}")


def experiment_line(rec: ExperimentRecord, budget: int) -> str:
    layer = f"L{rec.layer}"
    if rec.remeasure:
        what = "incumbent again (drift check)"
    elif rec.proposal is None:
        what = "baseline"
    else:
        what = ", ".join(f"{k}={v}" for k, v in rec.proposal.changes.items())
    if rec.status == "ok" and rec.metrics is not None:
        mark = "[green]kept[/]" if rec.kept else "[dim]reverted[/]"
        acc = f" acc {rec.accuracy:.3f}" if rec.accuracy is not None else ""
        gain = (f"  gain [{rec.interval[0] * 100:+.1f}%, {rec.interval[1] * 100:+.1f}%]"
                if rec.interval and all(abs(x) != float("inf") for x in rec.interval)
                else "")
        slo = "  [red]breaks SLO[/]" if rec.slo_violations else ""
        body = (f"{rec.metrics.output_throughput:8.1f} tok/s  p99 "
                f"{rec.metrics.e2e_ms.p99:7.0f} ms  score {rec.score or 0:.3f}{gain}{acc}"
                f"{slo}  {mark}")
    else:
        body = f"[red]{rec.status}[/]: {rec.reason[:100]}"
    return f"[bold]{rec.exp + 1:>3}/{budget}[/] {layer} {what:<40} {body}"


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
        deployment = export.for_recipe(outcome.run_dir, outcome.best, outcome.best_record)
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
        tuner.run_log.close()  # release the run's lock even when the loop failed
    print_finish(outcome, deployment, dry_run=tuner.s.dry_run)


def write_report(run: RunLog) -> None:
    """report.html into the run folder. The results are already on disk, so a report that
    cannot be drawn costs a warning, never the run's exit status."""
    try:
        run.write_artifact(REPORT_HTML, render_text(run.path, "html"))
    except Exception as exc:  # any failure here is the report's, not the run's
        err.print(f"warning: {REPORT_HTML} not written ({type(exc).__name__}: {exc}); "
                  f"`aevyra-forge report {run.path} --format html` draws it again",
                  markup=False, highlight=False, soft_wrap=True)


def print_finish(outcome: RunOutcome, deployment: export.Deployment, dry_run: bool) -> None:
    best = outcome.best
    score = outcome.best_score
    out.print(f"finished: {outcome.reason}")
    out.print(f"best recipe {best.id} (generation {best.generation}), score "
              f"{score:.3f}" if score is not None else "no configuration could be measured")
    out.print(f"best recipe: {outcome.run_dir / 'best_recipe.yaml'}")
    out.print(f"report:      {outcome.run_dir / REPORT_HTML} (or aevyra-forge report "
              f"{outcome.run_dir})", soft_wrap=True, markup=False, highlight=False)
    out.print(f"deploy:      {export.render_cmd(deployment).strip()}", soft_wrap=True,
              markup=False, highlight=False)
    out.print(f"             saved as {outcome.run_dir / 'deploy.sh'}; for containers: "
              f"aevyra-forge export {outcome.run_dir} --as docker|compose|k8s|helm-values",
              soft_wrap=True, markup=False, highlight=False)
    if dry_run and best.quant.method != "none" and best.quant.checkpoint is None:
        out.print(f"note: simulated result; deploying it needs a {best.quant.method} "
                  f"checkpoint of {best.model}")


