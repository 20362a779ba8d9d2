"""The command line (SPEC §2): typer + rich. The only module that prints, and the only
place a ForgeError becomes an exit code (1), an interrupt becomes 130."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType, UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, cast, get_args, get_origin

import typer
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aevyra_forge import __version__
from aevyra_forge.core.errors import ForgeError, HardwareError, UsageError
from aevyra_forge.core.settings import Cli, TuneSettings
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
from aevyra_forge.report.render import render_json, render_table, render_tsv
from aevyra_forge.space.playbook import bundled_path, load_playbook, validate
from aevyra_forge.space.rendering import render
from aevyra_forge.store.run_store import resolve_run_dir

if TYPE_CHECKING:  # the loop and its agents load only when a run starts
    from aevyra_forge.loop.tuner import Tuner

EXIT_INTERRUPTED = 130

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Tune a vLLM deployment autonomously: serving config, quantization, "
                       "kernels.")
tune_app = typer.Typer(help="Start a new tuning run (or `tune resume`).")
playbook_app = typer.Typer(help="Show or check a playbook.", no_args_is_help=True)
app.add_typer(tune_app, name="tune")
app.add_typer(playbook_app, name="playbook")

out = Console()
err = Console(stderr=True, soft_wrap=True)


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
                c.print(_experiment_line(record, self.budget))
            case ProposalRefused(reason=reason):
                c.print(f"[yellow]  proposal refused[/] ({reason}); asking again")
            case LayerEscalated(layer=layer, why=why):
                c.print(f"[magenta]layer {layer} ({LAYER_NAMES[layer]}) done:[/] {why}")


def _experiment_line(rec: ExperimentRecord, budget: int) -> str:
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


def _install_sigterm() -> None:
    """SIGTERM (`kill`) and SIGHUP (a dropped SSH session) stop like Ctrl-C:
    the server in flight is torn down and the run stays resumable."""

    def handler(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def _run_tuner(starter: Callable[[Observer], Tuner], verbose: bool, run_hint: str) -> None:
    printer = ProgressPrinter(err, 0, verbose)
    _install_sigterm()
    try:
        tuner = starter(printer)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    try:
        printer.budget = tuner.s.max_experiments
        err.print(f"[bold]run[/] {tuner.run_log.path}  model {tuner.s.model}  on "
                  f"{tuner.hw.describe()}  agent {tuner.s.llm}")
        outcome = tuner.run()
    except KeyboardInterrupt:
        err.print(f"interrupted: the run is resumable with `aevyra-forge tune resume "
                  f"--run-dir {run_hint}`")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        tuner.run_log.close()  # release the run's lock even when the loop failed
    _print_finish(outcome, dry_run=tuner.s.dry_run)


def _print_finish(outcome: RunOutcome, dry_run: bool) -> None:
    best = outcome.best
    argv, env = render(best)
    env_prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    command = " ".join(filter(None, [env_prefix, shlex.join(["vllm", "serve", *argv])]))
    score = outcome.best_score
    out.print(f"finished: {outcome.reason}")
    out.print(f"best recipe {best.id} (generation {best.generation}), score "
              f"{score:.3f}" if score is not None else "no configuration could be measured")
    out.print(f"best recipe: {outcome.run_dir / 'best_recipe.yaml'}")
    out.print(f"report:      aevyra-forge report {outcome.run_dir}")
    out.print(f"deploy:      {command}", soft_wrap=True)
    if dry_run and best.quant.method != "none" and best.quant.checkpoint is None:
        out.print(f"note: simulated result; deploying it needs a {best.quant.method} "
                  f"checkpoint of {best.model}")


# -- tune: one option per TuneSettings field, plus the few options that are not settings


def _settings_as_options(command: Callable[..., None]) -> Callable[..., None]:
    """Put one `tune` option per setting (TuneSettings' fields with an option) where
    `command` takes **options; typer reads the parameters from `__signature__`."""
    signature = inspect.signature(command, eval_str=True)
    ctx, *own = (p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD)
    generated = [_option(name, field) for name, field in TuneSettings.model_fields.items()
                 if _cli(field).option]
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[ctx, *generated, *own])
    return command


def _option(name: str, field: FieldInfo) -> inspect.Parameter:
    """A setting's option: type (None stripped; a path setting parses as a Path, a Literal
    shows its values), default and help from the field. A required setting defaults to
    None here so that `tune resume` never needs it; `tune` names it when it is missing."""
    cli = _cli(field)
    kind: Any = field.annotation
    if get_origin(kind) in (Union, UnionType):
        (kind,) = (arg for arg in get_args(kind) if arg is not type(None))
    choices = get_args(kind) if get_origin(kind) is Literal else ()
    kind = Path if cli.path else type(choices[0]) if choices else kind
    default = None if field.is_required() else field.default
    info = typer.Option(*[_flag(name)] if kind is bool and not default else [],
                        help=field.description, envvar=cli.envvar,
                        metavar="|".join(map(str, choices)) or None)
    # typer reads the type from the annotation, built here at run time
    annotation = cast(Any, Annotated)[kind if default is not None else kind | None, info]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


def _cli(field: FieldInfo) -> Cli:
    return next((m for m in field.metadata if isinstance(m, Cli)), Cli())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@tune_app.callback(invoke_without_command=True)
@_settings_as_options
def tune(
    ctx: typer.Context,
    *,
    llm_api_key: Annotated[str | None, typer.Option(
        help="API key for --llm (default: the provider's variable, e.g. "
             "ANTHROPIC_API_KEY); never written to disk.")] = None,
    no_latency_guard: Annotated[bool, typer.Option(
        "--no-latency-guard", help="Keep a win whatever its latency (turns "
                                   "--max-latency-regression off).")] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="Also print each experiment's start.")] = False,
    **options: Any,
) -> None:
    """Start a new run (all options below), or `tune resume`."""
    if ctx.invoked_subcommand is not None:
        return
    for name, field in TuneSettings.model_fields.items():
        if field.is_required() and options[name] is None:
            raise UsageError(f"tune needs {_flag(name)}; e.g. aevyra-forge tune --dry-run "
                             "--model meta-llama/Llama-3.1-8B-Instruct --workload "
                             "examples/sample_workload.jsonl --llm builtin")
    if no_latency_guard:
        options["max_latency_regression"] = None
    settings = _settings(**{name: str(value) if isinstance(value, Path) else value
                            for name, value in options.items()})
    from aevyra_forge.loop import session

    _run_tuner(lambda obs: session.start(settings, obs, api_key=llm_api_key), verbose,
               settings.run_dir)


def _settings(**values: Any) -> TuneSettings:
    """The settings, or the first validation error as one line naming the option."""
    from pydantic import ValidationError

    try:
        return TuneSettings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = _flag(str(first["loc"][0])) if first["loc"] else "option"
        raise UsageError(f"{name}: {first['msg']}") from None


@tune_app.command("resume")
def tune_resume(
    run_dir: Annotated[Path, typer.Option(help="Store root or a run folder.")]
    = Path(".forge"),
    llm_api_key: Annotated[str | None, typer.Option(
        help="API key for the run's --llm (default: the provider's variable); never "
             "written to disk.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose")] = False,
) -> None:
    """Resume the latest interrupted run; every setting comes from its config.json (the
    API key, never stored, comes from --llm-api-key or the environment again)."""
    from aevyra_forge.loop import session

    def starter(obs: Observer) -> Tuner:
        return session.resume(run_dir, obs, api_key=llm_api_key)

    _run_tuner(starter, verbose, str(run_dir))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Store root (its latest run) or a run.")],
    format: Annotated[str, typer.Option("--format", help="table | tsv | json")] = "table",
    run: Annotated[int | None, typer.Option("--run", help="Run number under the root.")]
    = None,
) -> None:
    """Print a run's summary and experiment table."""
    target = _pick_run(run_dir, run)
    if format == "tsv":
        sys.stdout.write(render_tsv(target))
    elif format == "json":
        sys.stdout.write(render_json(target))
    elif format == "table":
        Console(width=max(out.width, 160)).print(render_table(target))
    else:
        raise UsageError(f"--format {format}: expected table, tsv or json")


def _pick_run(root: Path, number: int | None) -> Path:
    if number is None:
        return resolve_run_dir(root)
    runs = sorted((root / "runs").glob(f"{number:03d}_*"))
    if not runs:
        raise UsageError(f"--run {number}: no run {number:03d} under {root / 'runs'}")
    return runs[0]


@playbook_app.command("show")
def playbook_show(path: Annotated[Path | None, typer.Argument()] = None) -> None:
    """Print the active (or given) playbook."""
    out.print(load_playbook(path).text, markup=False, highlight=False)


@playbook_app.command("validate")
def playbook_validate(path: Annotated[Path | None, typer.Argument()] = None) -> None:
    """Check a playbook's sections and knob names; exit 1 listing each problem."""
    pb = load_playbook(path)
    problems = validate(pb)
    for problem in problems:
        err.print(problem, markup=False, highlight=False)
    if problems:
        raise typer.Exit(1)
    out.print(f"{pb.path}: ok")


@app.command()
def doctor() -> None:
    """What is installed and detected, what is missing, and how to fix it."""
    table = Table("check", "status", "detail / fix")
    table.add_row("aevyra-forge", "ok", f"{__version__} on Python {sys.version.split()[0]}")
    for module, extra, purpose in (("anthropic", None, "Anthropic agent"),
                                   ("openai", "openai", "OpenAI-compatible agents"),
                                   ("vllm", "vllm", "real engine runs")):
        found = importlib.util.find_spec(module) is not None
        version = _version(module) if found else ""
        fix = escape(f"pip install 'aevyra-forge[{extra}]'" if extra else
                     "pip install anthropic")
        table.add_row(module, "ok" if found else "missing",
                      f"{version} ({purpose})" if found else f"{purpose}: {fix}")
    vllm = os.environ.get("FORGE_VLLM_BIN") or shutil.which("vllm")
    table.add_row("vllm binary", "ok" if vllm else "missing",
                  vllm or "needed for real runs: put `vllm` on PATH or set FORGE_VLLM_BIN")
    for device in ("cuda", "rocm"):
        table.add_row(f"{device} GPUs", *_gpu_status(device))
    from aevyra_forge.agent.providers import PROVIDERS

    for provider in PROVIDERS.values():
        var = provider.key_env
        if var is None:
            continue
        table.add_row(var, "set" if os.environ.get(var) else "unset",
                      "" if os.environ.get(var) else f"needed only for --llm {provider.name}/...")
    problems = validate(load_playbook(None))
    table.add_row("bundled playbook", "ok" if not problems else "invalid",
                  str(bundled_path()) if not problems else problems[0])
    out.print(table)


def _version(module: str) -> str:
    for dist in (module, f"{module}-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "?"


def _gpu_status(device: Literal["cuda", "rocm"]) -> tuple[str, str]:
    from aevyra_forge.space.hardware import detect

    try:
        hw = detect(device)
    except HardwareError as exc:
        return "none", str(exc)
    return "ok", hw.describe()


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps user errors to one line and exit 1, interrupts to 130."""
    try:
        code = app(args=argv, prog_name="aevyra-forge", standalone_mode=False)
    except ForgeError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # bad or missing options, from typer's parser
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        err.print(f"error: {exc.format_message()}{hint}", markup=False, highlight=False,
                  soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)
