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

Status = Literal["ok", "crash", "boot_failed", "invalid", "oom", "timeout", "hung",
                 "request_error", "duplicate", "prepare_failed"]
"""`ok` measured, with at most MAX_FAILED_REQUEST_SHARE of its requests failed; `crash` the
server died or answered server errors (5xx); `boot_failed` it never became healthy (bad
argument, context too long); `oom` out of memory at boot or under load; `timeout` the boot
or bench deadline passed; `hung` the server stopped producing tokens with requests in
flight (the stall watchdog, or requests timing out); `request_error` too many requests were
refused by the server as the client's fault (4xx, e.g. prompt + max_tokens over
max_model_len, or an output cut short); `invalid` the proposal was refused before booting;
`duplicate` the proposal repeated a tried recipe; `prepare_failed` the work before the
boot (writing a quantized checkpoint) failed, so nothing was booted."""

MAX_FAILED_REQUEST_SHARE = 0.01  # fraction of timed requests, over all passes
"""The most a measurement may lose to failed requests and still count. Failed requests
are not just slower: they shed load (their tokens are never generated), so a config that
fails some of them can look faster than one that serves them all. 1 % keeps that effect
under the default --min-improvement-pct (1 %) while tolerating a rare transient failure
on long workloads; on a workload of fewer than 100 requests one failure is too many."""

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
    # the CPU's instruction-set flags that decide what vLLM's CPU build serves (avx2,
    # avx512f, avx512_bf16, amx_bf16, ...); empty when unknown (runs recorded before)
    cpu_isa: tuple[str, ...] = ()

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


IsolationMethod = Literal["salt", "reset", "warm_pass", "unchecked"]
"""How a measurement's timed passes were kept independent: `salt` each pass's own
cache_salt, checked against the server's prefix-cache counters and the first pass's
speed; `reset` the server ignored the salt, so its prefix cache was reset before each
pass; `warm_pass` the first pass (cold, or filling a cache the salt did not separate) was
set aside as an untimed warm pass and replaced; `unchecked` one pass, nothing to compare."""


class PassIsolation(Frozen):
    """Whether the timed passes of one measurement were independent, and what the bench did
    when they were not (SPEC §7: checks its own measurements and says so)."""

    method: IsolationMethod
    note: str = ""  # the evidence: hit rates per pass, pass 1's speed against the rest


class Proposal(Frozen):
    """One mutation of the incumbent recipe: knob -> value within one layer."""

    rationale: str
    layer: Layer
    changes: dict[str, Scalar]
    expected_effect: str = ""


AccuracyMethod = Literal["teacher_forced", "greedy_match"]
"""How accuracy was measured: `teacher_forced` (the baseline's greedy tokens forced through
the candidate, top-1 agreement per position) or `greedy_match` (the fallback when the
server refuses prompt_logprobs: the share of the baseline's greedy tokens the candidate's
own greedy output reproduces before its first divergence)."""


class QualityScore(Frozen):
    """A config's outputs against the baseline's: agreement with the baseline's greedy
    tokens by `method` (1.0 = identical) and, teacher-forced, the mean log-probability
    shift."""

    agreement: float
    logprob_shift: float | None = None
    positions: int = 0
    method: AccuracyMethod = "teacher_forced"


class LLMUsage(Frozen):
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


Bottleneck = Literal["kv_capacity", "batch_slots", "token_budget", "prefill_compute",
                     "decode_bandwidth", "client", "boot"]
"""The resource that bound a measurement (decide.diagnosis): KV-cache capacity (requests
preempted or held back for blocks), batch slots (max_num_seqs below the requests in
flight), the per-step token budget (max_num_batched_tokens), prefill compute, decode
memory bandwidth, the client or API server (the offered load, not the engine, set the
pace), or `boot` (the config did not serve at all)."""


class InertKnob(Frozen):
    """A knob the diagnosis shows cannot change the score here, and why: every value,
    only `values`, or (an ordered knob) every value at or above `at_least`."""

    knob: str
    reason: str
    values: tuple[Scalar, ...] = ()
    at_least: float | None = None
    # the workload or the hardware fixes it (the client's concurrency caps what is in
    # flight; auto's dtype), so it holds whatever config leads; else only the one diagnosed
    standing: bool = False

    def covers(self, value: Scalar) -> bool:
        if self.values:
            return value in self.values
        if self.at_least is not None:
            return isinstance(value, int | float) and not isinstance(value, bool) \
                and value >= self.at_least
        return True


class Diagnosis(Frozen):
    """What bound the baseline's measurement (decide.diagnosis), the figures that show
    it, and the knobs that therefore cannot matter."""

    binding: Bottleneck
    why: str
    evidence: dict[str, float] = Field(default_factory=dict)
    inert: tuple[InertKnob, ...] = ()

    def inert_reason(self, knob: str, value: Scalar) -> str | None:
        """Why setting `knob` to `value` cannot change the score, None when it may."""
        return next((i.reason for i in self.inert if i.knob == knob and i.covers(value)),
                    None)


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
    pass_isolation: PassIsolation | None = None  # None: not checked (simulator, older log)
    accuracy: float | None = None  # agreement with the baseline's outputs
    accuracy_method: AccuracyMethod | None = None  # None: not measured (or an older log)
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
    round: int | None = None  # trials asked together (one per worker); None: one at a time
    llm: LLMUsage = LLMUsage()
    diagnosis: Diagnosis | None = None  # what bound it (the baseline's, the reference's)


def failed_request_share(passes: Sequence[BenchMetrics]) -> float:
    """The share of timed requests that failed, over all passes (0.0 with none sent)."""
    failed = sum(m.failed for m in passes)
    sent = failed + sum(m.completed for m in passes)
    return failed / sent if sent else 0.0


def healthy(passes: Sequence[BenchMetrics]) -> bool:
    """Whether a measurement counts: it served requests and failed at most
    MAX_FAILED_REQUEST_SHARE of them. Bench adapters classify by it and the keep rule and
    the loop's lead refuse what fails it, so a log written before the rule cannot
    bring a failing config back as the incumbent either."""
    return any(m.completed for m in passes) and \
        failed_request_share(passes) <= MAX_FAILED_REQUEST_SHARE


def takes_the_lead(record: ExperimentRecord) -> bool:
    """Whether this record made its recipe the incumbent: kept, measured `ok`, and
    healthy (the first such record becomes the reference every score is relative to)."""
    if not record.kept or record.status != "ok" or record.metrics is None:
        return False
    return healthy(record.passes or (record.metrics,))


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
    completion and stayed `healthy` (the few failed requests it allows are counted in
    metrics); `crash` when the server died or answered 5xx, `oom` when it ran out of
    memory under load, `hung` when it stopped producing tokens, `request_error` when too
    many requests were refused as the client's fault, `timeout` when the whole-bench
    deadline passed. Metrics and passes are kept whatever the status, for the audit."""

    status: Status
    reason: str = ""
    metrics: BenchMetrics | None = None
    passes: tuple[BenchMetrics, ...] = ()
    pass_isolation: PassIsolation | None = None
    bench_s: float = 0.0
