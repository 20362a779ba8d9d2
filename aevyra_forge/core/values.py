"""Value types shared by every layer: layers, experiment statuses, hardware, bench
metrics, proposals and experiment records. Frozen pydantic models; anything a user or an
LLM writes forbids extra keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

Layer = Literal[1, 2, 3]
LAYERS: tuple[Layer, ...] = (1, 2, 3)
LAYER_NAMES: dict[int, str] = {1: "config", 2: "quant", 3: "kernel"}

Device = Literal["cuda", "rocm", "cpu"]

Status = Literal["ok", "crash", "boot_failed", "invalid", "oom", "timeout", "duplicate"]
"""`ok` measured; `crash` the server died; `boot_failed` it never became healthy (bad
argument, context too long); `oom` out of memory at boot or under load; `timeout` the boot
or bench deadline passed; `invalid` the proposal was refused before booting; `duplicate`
the proposal repeated a tried recipe."""

Scalar = int | float | bool | str | None


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GpuInfo(Frozen):
    """One accelerator as the vendor tool reports it."""

    index: int
    name: str
    memory_mib: int
    compute_capability: str | None = None  # "8.0" on NVIDIA, gfx arch on AMD
    driver: str | None = None


class Hardware(Frozen):
    """What the tuner runs on. `gpus` is empty for `cpu`."""

    device: Device
    gpus: tuple[GpuInfo, ...] = ()
    cpu_cores: int = 1
    memory_gib: float = 0.0
    simulated: bool = False  # a GPU named for --dry-run, not detected

    @property
    def gpu(self) -> GpuInfo | None:
        return self.gpus[0] if self.gpus else None

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    @property
    def gpu_memory_gib(self) -> float:
        return self.gpus[0].memory_mib / 1024 if self.gpus else 0.0

    @property
    def mixed(self) -> bool:
        return len({g.name for g in self.gpus}) > 1

    def describe(self) -> str:
        if self.device == "cpu":
            return f"CPU ({self.cpu_cores} cores, {self.memory_gib:.0f} GiB)"
        assert self.gpu is not None
        names = ", ".join(sorted({g.name for g in self.gpus}))
        suffix = " (simulated)" if self.simulated else ""
        return f"{self.gpu_count}x {names} ({self.gpu_memory_gib:.0f} GiB each){suffix}"


class LatencyStats(Frozen):
    """Milliseconds over all successful requests, percentiles by linear interpolation."""

    mean: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0


class BenchMetrics(Frozen):
    """One bench pass, with `vllm bench serve` definitions."""

    completed: int
    failed: int = 0
    duration_s: float
    input_tokens: int
    output_tokens: int
    request_throughput: float  # requests/s
    output_throughput: float  # output tokens/s
    total_token_throughput: float  # (input + output) tokens/s
    ttft_ms: LatencyStats = LatencyStats()
    tpot_ms: LatencyStats = LatencyStats()
    itl_ms: LatencyStats = LatencyStats()
    e2e_ms: LatencyStats = LatencyStats()
    failure_reasons: dict[str, int] = Field(default_factory=dict)
    server: dict[str, float] = Field(default_factory=dict)  # /metrics deltas and gauges
    goodput: float | None = None  # requests/s meeting every per-request SLO bound; None: no SLO


class Proposal(Frozen):
    """One mutation of the incumbent recipe: knob -> value within one layer."""

    rationale: str
    layer: Layer
    changes: dict[str, Scalar]
    expected_effect: str = ""


class QualityScore(Frozen):
    """A config's outputs against the baseline's: teacher-forced top-1 agreement with the
    baseline's greedy tokens (1.0 = identical) and the mean log-probability shift."""

    agreement: float
    logprob_shift: float | None = None
    positions: int = 0


class LLMUsage(Frozen):
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


class ExperimentRecord(Frozen):
    """One line of experiments.jsonl: everything needed to audit and replay a decision."""

    schema_version: int = SCHEMA_VERSION
    exp: int  # 0 is the baseline
    recipe: dict[str, Any]  # Recipe.to_dict()
    recipe_id: str
    parent_id: str | None
    generation: int
    layer: Layer
    proposal: Proposal | None = None
    raw_reply: str | None = None
    status: Status
    reason: str = ""
    metrics: BenchMetrics | None = None  # the median pass
    passes: tuple[BenchMetrics, ...] = ()  # every bench pass, for noise-aware decisions
    accuracy: float | None = None  # teacher-forced agreement with the baseline
    logprob_shift: float | None = None  # mean log-prob change of the baseline's tokens
    score: float | None = None
    interval: tuple[float, float] | None = None  # CI of the relative gain vs the incumbent
    slo_violations: tuple[str, ...] = ()
    remeasure: bool = False  # a drift check of the incumbent, not a proposal
    quality_reference: dict[str, Any] | None = None  # the baseline's outputs (exp 0)
    kept: bool = False
    decision: str = ""
    started_at: str
    finished_at: str
    prepare_s: float | None = None  # work before the boot (quantization calibration)
    boot_s: float | None = None
    bench_s: float | None = None
    log: str | None = None  # path relative to the run folder
    suggested_max_model_len: int | None = None  # vLLM named the largest context that fits
    worker: str | None = None  # where the trial ran, when several places can run trials
    llm: LLMUsage = LLMUsage()


def takes_the_lead(record: ExperimentRecord) -> bool:
    """Whether this record made its recipe the incumbent: kept, with a measurement."""
    return record.kept and record.metrics is not None


def best_record(records: Sequence[ExperimentRecord]) -> ExperimentRecord | None:
    """The one definition of "best" (loop, report and summary alike): the latest record
    that took the lead. The keep rule only keeps what beats the incumbent, so the latest
    kept recipe is the one every later experiment was judged against."""
    return next((r for r in reversed(records) if takes_the_lead(r)), None)


class LaunchFailure(Frozen):
    """A server that never became healthy: the status, a one-line reason the agent sees,
    and vLLM's suggested max_model_len when it named one."""

    status: Status
    reason: str
    boot_s: float = 0.0
    suggested_max_model_len: int | None = None


class BenchOutcome(Frozen):
    """The result of benchmarking a live server. `status` is `ok` when the bench ran to
    completion (individual request failures are counted in metrics), `crash` when the
    server died, `timeout` when the whole-bench deadline passed, `oom` when the server ran
    out of memory under load."""

    status: Status
    reason: str = ""
    metrics: BenchMetrics | None = None
    passes: tuple[BenchMetrics, ...] = ()
    bench_s: float = 0.0
