"""The command line (SPEC §2): typer + rich. The only module that prints, and the only
place a ForgeError becomes an exit code (1), an interrupt becomes 130."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aevyra_forge import __version__
from aevyra_forge.core.errors import ForgeError, HardwareError, UsageError
from aevyra_forge.core.recipe import Recipe, render
from aevyra_forge.core.settings import DEFAULT_LLM, TuneSettings
from aevyra_forge.core.values import LAYER_NAMES, ExperimentRecord
from aevyra_forge.report.render import render_json, render_table, render_tsv
from aevyra_forge.space.playbook import bundled_path, load_playbook, validate
from aevyra_forge.store.run_store import resolve_run_dir

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

    def event(self, kind: str, **data: Any) -> None:
        c = self.console
        if kind == "note":
            c.print(f"[cyan]note[/]: {data['text']}")
        elif kind == "experiment_start" and self.verbose:
            c.print(f"[dim]exp {data['exp']}: booting recipe {data['recipe'].id}...[/]")
        elif kind == "experiment_end":
            c.print(_experiment_line(data["record"], self.budget))
        elif kind == "refused":
            c.print(f"[yellow]  proposal refused[/] ({data['reason']}); asking again")
        elif kind == "escalate":
            c.print(f"[magenta]layer {data['layer']} ({LAYER_NAMES[data['layer']]}) done:"
                    f"[/] {data['why']}")


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


def _run_tuner(starter: Any, verbose: bool, run_hint: str) -> None:
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
        why = tuner.run()
    except KeyboardInterrupt:
        err.print(f"interrupted: the run is resumable with `aevyra-forge tune resume "
                  f"--run-dir {run_hint}`")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        tuner.run_log.close()  # release the run's lock even when the loop failed
    _print_finish(tuner, why)


def _print_finish(tuner: Any, why: str) -> None:
    best: Recipe = tuner.state.best
    argv, env = render(best)
    env_prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    command = " ".join(filter(None, [env_prefix, shlex.join(["vllm", "serve", *argv])]))
    score = tuner.state.best_score
    out.print(f"finished: {why}")
    out.print(f"best recipe {best.id} (generation {best.generation}), score "
              f"{score:.3f}" if score is not None else "no configuration could be measured")
    out.print(f"best recipe: {tuner.run_log.path / 'best_recipe.yaml'}")
    out.print(f"report:      aevyra-forge report {tuner.run_log.path}")
    out.print(f"deploy:      {command}", soft_wrap=True)
    if tuner.s.dry_run and best.quant.method != "none" and best.quant.checkpoint is None:
        out.print(f"note: simulated result; deploying it needs a {best.quant.method} "
                  f"checkpoint of {best.model}")


@tune_app.callback(invoke_without_command=True)
def tune(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="HF id or local path (required).")] = None,
    workload: Annotated[Path | None, typer.Option(help="Workload JSONL (required).")] = None,
    device: Annotated[str, typer.Option(help="cuda | rocm | cpu.")] = "cuda",
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 8,
    llm: Annotated[str, typer.Option(help="PROVIDER/MODEL, or builtin (offline).")]
    = DEFAULT_LLM,
    llm_base_url: Annotated[str | None, typer.Option(
        help="OpenAI- (or Anthropic-) compatible server for --llm, e.g. a local vLLM's "
             "http://host:8000/v1.")] = None,
    llm_api_key: Annotated[str | None, typer.Option(
        help="API key for --llm (default: the provider's variable, e.g. "
             "ANTHROPIC_API_KEY); never written to disk.")] = None,
    llm_prices: Annotated[Path | None, typer.Option(
        help="YAML/JSON prices, model: {input: USD, output: USD} per million tokens.")]
    = None,
    max_experiments: Annotated[int, typer.Option(help="Experiment budget.")] = 50,
    max_hours: Annotated[float, typer.Option(help="Time budget in hours.")] = 12.0,
    max_dollars: Annotated[float | None, typer.Option(help="LLM spend cap, USD.")] = None,
    accuracy_floor: Annotated[float, typer.Option(help="Minimum accuracy vs baseline.")]
    = 0.99,
    min_improvement_pct: Annotated[float, typer.Option(help="Keep only above this gain.")]
    = 1.0,
    max_config_experiments: Annotated[int | None, typer.Option()] = None,
    max_quant_experiments: Annotated[int | None, typer.Option()] = None,
    skip_config: Annotated[bool, typer.Option("--skip-config")] = False,
    skip_quant: Annotated[bool, typer.Option("--skip-quant")] = False,
    skip_kernel: Annotated[bool, typer.Option("--skip-kernel")] = False,
    start_layer: Annotated[int, typer.Option(min=1, max=3)] = 1,
    playbook: Annotated[Path | None, typer.Option(help="Playbook (default: bundled).")]
    = None,
    run_dir: Annotated[Path, typer.Option(help="Store root.")] = Path(".forge"),
    vllm_bin: Annotated[str | None, typer.Option(envvar="FORGE_VLLM_BIN")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Use the simulator.")] = False,
    gpu: Annotated[str | None, typer.Option(help="GPU to simulate with --dry-run.")] = None,
    recipe: Annotated[Path | None, typer.Option(help="Start from this recipe.yaml.")]
    = None,
    seed: Annotated[int, typer.Option(help="Seed for the builtin strategy/simulator.")] = 0,
    patience: Annotated[int, typer.Option(help="Non-improving experiments before a "
                                               "layer converges.")] = 4,
    repeats: Annotated[int, typer.Option(help="Bench passes per experiment (noise is "
                                               "judged from their spread).")] = 5,
    objective: Annotated[str, typer.Option(help="throughput | latency | goodput.")]
    = "throughput",
    slo: Annotated[str | None, typer.Option(
        help="SLOs every kept config must meet, e.g. "
             "'ttft_p99<500ms,tpot_p99<50ms,e2e_p99<10s'.")] = None,
    max_latency_regression: Annotated[float, typer.Option(
        help="Refuse a win whose p99 E2E or TTFT grows by more than this factor.")] = 1.5,
    no_latency_guard: Annotated[bool, typer.Option("--no-latency-guard")] = False,
    confidence: Annotated[float, typer.Option(help="Confidence of the interval a keep "
                                                   "must clear.")] = 0.95,
    remeasure_every: Annotated[int, typer.Option(
        help="Re-measure the incumbent on a fresh boot every N experiments (0: never).")]
    = 6,
    boot_noise: Annotated[float | None, typer.Option(
        help="Assumed between-boot CV of throughput (default 0.01 on GPUs, 0.08 on CPU).")]
    = None,
    verbose: Annotated[bool, typer.Option("--verbose")] = False,
) -> None:
    """Start a new run (all options below), or `tune resume`."""
    if ctx.invoked_subcommand is not None:
        return
    if model is None or workload is None:
        missing = "--model" if model is None else "--workload"
        raise UsageError(f"tune needs {missing}; e.g. aevyra-forge tune --dry-run --model "
                         "meta-llama/Llama-3.1-8B-Instruct --workload "
                         "examples/sample_workload.jsonl --llm builtin")
    if device not in ("cuda", "rocm", "cpu"):
        raise UsageError(f"--device {device}: expected cuda, rocm or cpu")
    settings = _settings(
        model=model, workload=str(workload), device=device, concurrency=concurrency,
        llm=llm, llm_base_url=llm_base_url,
        llm_prices=str(llm_prices) if llm_prices else None,
        max_experiments=max_experiments, max_hours=max_hours,
        max_dollars=max_dollars, accuracy_floor=accuracy_floor,
        min_improvement_pct=min_improvement_pct,
        max_config_experiments=max_config_experiments,
        max_quant_experiments=max_quant_experiments, skip_config=skip_config,
        skip_quant=skip_quant, skip_kernel=skip_kernel, start_layer=start_layer,
        playbook=str(playbook) if playbook else None, run_dir=str(run_dir),
        vllm_bin=vllm_bin, dry_run=dry_run, gpu=gpu,
        recipe=str(recipe) if recipe else None, seed=seed, patience=patience,
        repeats=repeats, objective=objective, slo=slo, confidence=confidence,
        remeasure_every=remeasure_every, boot_noise=boot_noise,
        max_latency_regression=None if no_latency_guard else max_latency_regression)
    from aevyra_forge.loop import session

    _run_tuner(lambda obs: session.start(settings, obs, api_key=llm_api_key), verbose,
               str(run_dir))


def _settings(**values: Any) -> TuneSettings:
    from pydantic import ValidationError

    try:
        return TuneSettings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "option"
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

    def starter(obs: Any) -> Any:
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
