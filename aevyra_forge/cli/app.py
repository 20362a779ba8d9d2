"""The `aevyra-forge` commands (SPEC §2) and `main`, the one place a ForgeError becomes an
exit code (1) and an interrupt becomes 130."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aevyra_forge import __version__
from aevyra_forge.cli.console import err, out
from aevyra_forge.cli.options import amendments_as_options, flag, settings_as_options
from aevyra_forge.cli.progress import EXIT_INTERRUPTED, run_tuner
from aevyra_forge.core.errors import ForgeError, HardwareError, UsageError
from aevyra_forge.core.settings import TuneSettings, validated
from aevyra_forge.loop.events import (
    Observer,
)
from aevyra_forge.report import export
from aevyra_forge.report.render import FORMATS, render_table, render_text
from aevyra_forge.space.playbook import bundled_path, load_playbook, validate
from aevyra_forge.store.run_store import resolve_run_dir

if TYPE_CHECKING:  # the loop and its agents load only when a run starts
    from aevyra_forge.loop.tuner import Tuner

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Tune a vLLM deployment autonomously: serving config, quantization, "
                       "kernels.")
tune_app = typer.Typer(help="Start a new tuning run (or `tune resume`).")
playbook_app = typer.Typer(help="Show or check a playbook.", no_args_is_help=True)
app.add_typer(tune_app, name="tune")
app.add_typer(playbook_app, name="playbook")


def _print_version(value: bool) -> None:
    if value:
        out.print(f"aevyra-forge {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _forge(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the version and exit.")] = False) -> None:
    del version  # handled by its callback, before any command runs





@tune_app.callback(invoke_without_command=True)
@settings_as_options
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
            raise UsageError(f"tune needs {flag(name)}; e.g. aevyra-forge tune --dry-run "
                             "--model meta-llama/Llama-3.1-8B-Instruct --workload "
                             "examples/sample_workload.jsonl --llm builtin")
    if no_latency_guard:
        options["max_latency_regression"] = None
    settings = validated({name: str(value) if isinstance(value, Path) else value
                          for name, value in options.items()})
    from aevyra_forge.loop import session

    run_tuner(lambda obs: session.start(settings, obs, api_key=llm_api_key), verbose,
               settings.run_dir)


@tune_app.command("resume")
@amendments_as_options
def tune_resume(
    *,
    run_dir: Annotated[Path, typer.Option(help="Store root or a run folder.")]
    = Path(".forge"),
    llm_api_key: Annotated[str | None, typer.Option(
        help="API key for the run's --llm (default: the provider's variable); never "
             "written to disk.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose")] = False,
    **amendments: Any,
) -> None:
    """Resume the latest interrupted run; every setting comes from its config.json (the
    API key, never stored, comes from --llm-api-key or the environment again). Only the
    agent and the budgets may change (recorded in config.json as an amendment, kept on
    later resumes); what is measured (model, workload, device, repeats, concurrency,
    objective, SLOs...) cannot: start a new run for that."""
    from aevyra_forge.loop import session

    given = {name: value for name, value in amendments.items() if value is not None}

    def starter(obs: Observer) -> Tuner:
        return session.resume(run_dir, obs, api_key=llm_api_key, amendments=given)

    run_tuner(starter, verbose, os.path.abspath(run_dir))


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR [RUN_B]", help="Store root (its latest run) or a run; a second "
                                        "one compares the two side by side.")],
    format: Annotated[str, typer.Option("--format", help=" | ".join(FORMATS))] = "table",
    run: Annotated[int | None, typer.Option("--run", help="Run number under the root.")]
    = None,
    output: Annotated[Path | None, typer.Option(
        "--output", help="Write to this file instead of stdout (not for table).")] = None,
    gpu_price: Annotated[float | None, typer.Option(
        "--gpu-price", min=0.01, metavar="USD_PER_HOUR",
        help="USD per GPU-hour for the cost estimate; overrides the run's --gpu-price and "
             "the dated price table.")] = None,
) -> None:
    """Print a run's summary and experiment table (md: for a pull request; html: the
    self-contained morning report with charts). Given two runs (A B): B against A, side
    by side: same workload or not, the best recipes and their diff, the headline figures."""
    if len(run_dirs) > 2:
        raise UsageError(f"report takes one run, or two to compare, not {len(run_dirs)}; "
                         "e.g. aevyra-forge report .forge/runs/001_* .forge/runs/002_*")
    if format not in FORMATS:
        raise UsageError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    if format == "table" and output is not None:
        raise UsageError("--output writes tsv, json, md or html; add --format html (or md)")
    if len(run_dirs) == 2:
        if run is not None:
            raise UsageError("--run picks a run under one store root; to compare two runs "
                             "pass their folders (.forge/runs/NNN_...)")
        from aevyra_forge.report import compare as cmp
        from aevyra_forge.report.model import build_report

        if format not in cmp.FORMATS:  # before reading the runs: the cheaper mistake first
            raise UsageError(f"--format {format}: comparing two runs writes "
                             f"{', '.join(cmp.FORMATS)}")
        comparison = cmp.compare(*(build_report(d, gpu_price) for d in run_dirs))
        if format == "table":
            Console(width=max(out.width, 120)).print(cmp.render_compare_table(comparison))
            return
        text = cmp.render_compare(comparison, format)
    elif format == "table":
        # a terminal's own width (the table lays itself out for it); a file or pipe: wide
        Console(width=out.width if out.is_terminal else 160).print(
            render_table(_pick_run(run_dirs[0], run), gpu_price))
        return
    else:
        text = render_text(_pick_run(run_dirs[0], run), format, gpu_price)
    _emit(text, output)


def _emit(text: str, output: Path | None) -> None:
    """`text` to stdout, or to --output with a one-line error when it cannot be written."""
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        raise UsageError(f"--output {output}: cannot write it ({exc.strerror}); pick a "
                         "writable path") from None
    err.print(f"wrote {output}", markup=False, highlight=False)


def _pick_run(root: Path, number: int | None) -> Path:
    if number is None:
        return resolve_run_dir(root)
    runs = sorted((root / "runs").glob(f"{number:03d}_*"))
    if not runs:
        raise UsageError(f"--run {number}: no run {number:03d} under {root / 'runs'}")
    return runs[0]


@app.command("export")
def export_command(
    run_dir: Annotated[Path, typer.Argument(help="Store root (its latest run) or a run.")],
    as_: Annotated[str, typer.Option("--as", metavar="|".join(export.FORMATS),
                                     help="What to write: a shell line, a docker run line, "
                                          "a compose file, a Kubernetes manifest or Helm "
                                          "values for the vLLM production stack.")],
    recipe: Annotated[str | None, typer.Option(
        "--recipe", help="A recorded recipe id (default: the run's best).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Deploy a run's best recipe (or --recipe ID) with the argv and environment it was
    measured with."""
    export.check_format(as_)  # before reading the run: the cheaper mistake first
    text = export.export(export.load(run_dir, recipe), as_)
    _emit(text, output)


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
    from aevyra_forge.engine.calibrate import MISSING, environment

    quant_python, libs = environment(os.environ.get("FORGE_QUANT_PYTHON"))
    table.add_row("calibration env", "ok" if libs.get("llmcompressor") else "missing",
                  escape(f"{quant_python}: " + ", ".join(f"{n} {v}" for n, v in libs.items())
                         if libs.get("llmcompressor") else f"layer 2: {MISSING}"))
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
        if type(exc).__name__ == "NoArgsIsHelpError":  # typer's own test: not exported
            sys.exit(0)  # a bare command: its help is printed, nothing went wrong
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        err.print(f"error: {exc.format_message()}{hint}", markup=False, highlight=False,
                  soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)
