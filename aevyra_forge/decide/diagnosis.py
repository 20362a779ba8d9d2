"""What bound a measurement, read from the baseline's own figures: the server's counters
(KV-cache usage and size, preemptions, running and waiting requests, batch tokens per
step, where requests spent their time), the latency split and the workload's shape. It
names the binding resource and the knobs that therefore cannot change the score, each
with the figure that proves it, so that no boot is spent on a move that cannot matter
(the builtin strategy skips them, the LLM prompt and the report show them).

A rule marks a knob inert only from a bound that holds whatever the noise: at most
--concurrency requests are ever in flight; a KV cache that never filled and preempted
nothing gains nothing from more memory; a step never asked for more tokens than the
prompts in flight hold; `auto` already is the dtype it resolves to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import (
    BenchMetrics,
    Bottleneck,
    Diagnosis,
    ExperimentRecord,
    InertKnob,
    Scalar,
    Status,
)
from aevyra_forge.core.workload import WorkloadStats
from aevyra_forge.space.knob_space import KNOBS, KnobSpace
from aevyra_forge.space.registry import auto_attention_backend, auto_capture_size

KV_FULL = 0.95  # peak KV-cache usage (share of blocks) from which the cache counts as full
QUEUED = 0.10  # share of E2E latency spent waiting to be scheduled that counts as queueing
CLIENT_SHARE = 0.30  # share of E2E latency outside the engine that blames the client side
KEPT_UP = 0.90  # open loop: served this share of the offered request rate = kept up
SMALL_BUDGET = 4096  # tokens per step below which a GPU step is not yet compute-bound
MEMORY_KNOBS = ("gpu_memory_utilization", "VLLM_CPU_KVCACHE_SPACE")
SIXTEEN_BIT = ("bfloat16", "float16")
SAME_LEVELS = (2, 3)  # -O levels vLLM 0.32 runs alike ("3 currently as 2")

_MEMORY = frozenset(MEMORY_KNOBS)
OFF_LEVERS: dict[Bottleneck, frozenset[str] | None] = {
    "kv_capacity": frozenset({"dtype", "long_prefill_token_threshold", "enforce_eager"}),
    "batch_slots": _MEMORY | {"block_size", "enable_prefix_caching", "dtype",
                              "long_prefill_token_threshold"},
    "token_budget": _MEMORY | {"block_size", "dtype", "max_num_seqs"},
    "prefill_compute": _MEMORY | {"block_size", "max_num_seqs", "spec_method", "spec_tokens"},
    "decode_bandwidth": _MEMORY | {"enable_prefix_caching", "max_num_batched_tokens",
                                   "long_prefill_token_threshold"},
    "client": None,  # the offered load sets the pace: no engine knob raises throughput
}
"""Per binding resource, the knobs that do not act on it (None: none does). In layer 1 a
throughput search skips them, so a layer whose levers are spent escalates early
(agent/builtin.py); layers 2 and 3 only rank them last, so a misjudged binding costs
ordering, not a lever never tried. A knob not named here (a new one) counts as a lever."""


def acts_on(binding: Bottleneck, knob: str) -> bool:
    """Whether `knob` can act on the `binding` resource (OFF_LEVERS)."""
    off = OFF_LEVERS.get(binding, frozenset())
    return off is not None and knob not in off


def diagnose(status: Status, reason: str, metrics: BenchMetrics | None, recipe: Recipe,
             space: KnobSpace, workload: WorkloadStats, concurrency: int) -> Diagnosis:
    """The binding resource of one measurement and the knobs that cannot matter. A config
    that did not serve is diagnosed `boot` with vLLM's reason (the builtin strategy
    repairs it from that reason before anything else)."""
    if status != "ok" or metrics is None or not metrics.completed:
        return Diagnosis(binding="boot", why=f"did not serve ({status}): {reason[:300]}")
    ev = _evidence(metrics, recipe, space, workload, concurrency)
    binding, why = _binding(ev, workload)
    return Diagnosis(binding=binding, why=why, evidence=ev,
                     inert=tuple(_inert(ev, recipe, space, workload)))


def _evidence(m: BenchMetrics, recipe: Recipe, space: KnobSpace, workload: WorkloadStats,
              concurrency: int) -> dict[str, float]:
    """The figures the rules read: the server's own where present, else bounds from the
    workload and the client's latencies (the report shows which were measured)."""
    server: Mapping[str, float] = m.server
    ev: dict[str, float] = {"concurrency": float(concurrency)}
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        value = space.value(recipe, KNOBS[name])
        if isinstance(value, int | float):
            ev[name] = float(value)
    for key in ("kv_cache_usage_peak", "kv_cache_capacity_tokens", "num_preemptions",
                "prefix_cache_hit_rate", "num_requests_running_peak",
                "num_requests_waiting_peak", "batch_tokens_peak"):
        if key in server:
            ev[key] = float(server[key])
    # KV demand: every request in flight at its longest (prompt + output, p99)
    in_flight = min(concurrency, workload.count)
    ev["kv_demand_tokens"] = in_flight * (workload.input_tokens.p99 + workload.output_tokens.p99)
    n = max(1, m.completed)
    e2e_s = m.e2e_ms.mean / 1000 * n
    phases = [server.get(k) for k in ("queue_time_s", "prefill_time_s", "decode_time_s")]
    if all(p is not None for p in phases) and e2e_s > 0:
        queue, prefill, decode = (float(p or 0.0) for p in phases)
        ev["queue_share"] = queue / e2e_s
        ev["client_share"] = max(0.0, 1.0 - (queue + prefill + decode) / e2e_s)
        prefill += queue  # with slots and blocks free, a request waits behind prefills
    else:  # TTFT holds queueing and prefill; what follows it is decode
        queue, prefill = 0.0, m.ttft_ms.mean / 1000 * n
        decode = max(0.0, e2e_s - prefill)
    ev["prefill_share"] = prefill / (prefill + decode) if prefill + decode > 0 else 0.0
    if workload.open_loop and workload.offered_rps:
        ev["served_share"] = m.request_throughput / workload.offered_rps
    return ev


def _binding(ev: Mapping[str, float], workload: WorkloadStats) -> tuple[Bottleneck, str]:
    c, seqs = ev["concurrency"], ev.get("max_num_seqs", float("inf"))
    budget = ev.get("max_num_batched_tokens", float("inf"))
    kv_peak, preempted = ev.get("kv_cache_usage_peak"), ev.get("num_preemptions", 0.0)
    queued = ev.get("queue_share", 0.0)
    if preempted > 0 or (kv_peak is not None and kv_peak >= KV_FULL):
        peak = f"KV cache peaked at {kv_peak:.0%}" if kv_peak is not None else "KV cache full"
        return "kv_capacity", f"{peak} with {preempted:.0f} preemptions: requests wait for blocks"
    running = ev.get("num_requests_running_peak", seqs)
    if seqs < min(c, workload.count) and running >= seqs:
        return "batch_slots", (f"max_num_seqs {seqs:.0f} is below the {c:.0f} requests in "
                               f"flight: the rest queue for a slot")
    tokens = ev.get("batch_tokens_peak")
    if queued >= QUEUED and budget <= SMALL_BUDGET and (
            tokens >= budget if tokens is not None
            else c * workload.input_tokens.max > budget):
        return "token_budget", (f"steps filled the token budget (max_num_batched_tokens "
                                f"{budget:.0f}) while requests queued {queued:.0%} of E2E")
    served = ev.get("served_share")
    if served is not None and served >= KEPT_UP:
        return "client", (f"open loop: the server kept up with the offered "
                          f"{workload.offered_rps:.2f} req/s, so the arrivals set the pace")
    if ev.get("client_share", 0.0) >= CLIENT_SHARE:
        return "client", (f"{ev['client_share']:.0%} of E2E latency passes outside the "
                          "engine (client or API server)")
    share = ev["prefill_share"]
    if share >= 0.5:
        return "prefill_compute", f"prefill takes {share:.0%} of request time in the engine"
    return "decode_bandwidth", (f"decode takes {1 - share:.0%} of request time in the engine: "
                                "each step reads the weights and the KV cache")


def _inert(ev: Mapping[str, float], recipe: Recipe, space: KnobSpace,
           workload: WorkloadStats) -> list[InertKnob]:
    names = {k.name for k in space.knobs()}
    c = min(ev["concurrency"], float(workload.count))
    out: list[InertKnob] = []
    seqs = ev.get("max_num_seqs")
    if "max_num_seqs" in names and seqs is not None and seqs >= c:
        out.append(InertKnob(
            knob="max_num_seqs", at_least=c, standing=True,
            reason=(f"at most {c:.0f} requests are ever in flight (concurrency) and the cap "
                    f"is {seqs:.0f}: any cap from {c:.0f} up schedules the same batches")))
    kv_peak, capacity = ev.get("kv_cache_usage_peak"), ev.get("kv_cache_capacity_tokens")
    demand = ev["kv_demand_tokens"]
    roomy = ev.get("num_preemptions", 0.0) == 0 and (
        (kv_peak is not None and kv_peak < KV_FULL)
        or (kv_peak is None and capacity is not None and demand < capacity))
    if roomy:
        seen = (f"peaked at {kv_peak:.0%}" if kv_peak is not None
                else f"holds {capacity:.0f} tokens, the requests in flight need at most "
                     f"{demand:.0f}")
        for name in MEMORY_KNOBS:
            if name in names:
                out.append(InertKnob(knob=name, reason=(
                    f"the KV cache never filled ({seen}, no preemptions): more or less "
                    "memory for it changes nothing")))
    budget, tokens = ev.get("max_num_batched_tokens"), ev.get("batch_tokens_peak")
    bound = tokens if tokens is not None else c * (workload.input_tokens.max + 1)
    if "max_num_batched_tokens" in names and budget is not None and bound < budget:
        seen = (f"the largest step held {bound:.0f} tokens" if tokens is not None else
                f"{c:.0f} prompts of at most {workload.input_tokens.max} tokens fill no "
                f"more than {bound:.0f}")
        out.append(InertKnob(knob="max_num_batched_tokens", at_least=max(bound, 1.0),
                             reason=f"the token budget {budget:.0f} was never reached "
                                    f"({seen}): any budget from {bound:.0f} up is the same"))
    if "dtype" in names and space.value(recipe, KNOBS["dtype"]) == "auto":
        auto = space.auto_dtype()
        if space.hw.device == "cpu":
            out.append(InertKnob(knob="dtype", values=(auto,), standing=True,
                                 reason=f"auto already resolves to {auto} on this hardware"))
        else:  # a GPU runs either 16-bit type on the same tensor cores, same bytes per weight
            out.append(InertKnob(knob="dtype", values=SIXTEEN_BIT, standing=True, reason=(
                f"auto already resolves to {auto} here, and the other 16-bit type moves "
                "the same bytes at the same tensor-core rate")))
    return out


def diagnosed(records: Sequence[ExperimentRecord]) -> ExperimentRecord | None:
    """The latest record of a config that served with its diagnosis (the baseline's,
    normally)."""
    return next((r for r in reversed(records)
                 if r.diagnosis is not None and r.diagnosis.binding != "boot"), None)


def in_force(records: Sequence[ExperimentRecord], incumbent_id: str) -> Diagnosis | None:
    """The latest diagnosis as it bears on moves from the incumbent: whole while the
    incumbent is the config it read; once another config leads, only the inert knobs the
    workload or the hardware fixes (`standing`: the client's concurrency, auto's dtype),
    since a kept move can move what binds (a draft model's memory can make the KV cache
    fill, speculative decoding makes each step larger)."""
    found = diagnosed(records)
    d = found.diagnosis if found is not None else None
    if found is None or d is None or found.recipe_id == incumbent_id:
        return d
    return d.model_copy(update={"inert": tuple(i for i in d.inert if i.standing)})


def nil(diagnosis: Diagnosis | None, changes: Mapping[str, Scalar], *, wholly: bool = False
        ) -> str | None:
    """Why a move is nil: a knob it sets is inert (the rest of a combined move, when it
    matters, is a move of its own), or with `wholly` every knob it sets is (a move only
    partly nil runs: its other knobs are the experiment); None when it may matter."""
    if diagnosis is None:
        return None
    reasons = [diagnosis.inert_reason(k, v) for k, v in changes.items()]
    if wholly and not all(reasons):
        return None
    return "; ".join(dict.fromkeys(r for r in reasons if r)) or None


def synonyms(space: KnobSpace, knob: str, value: Scalar, recipe: Recipe | None = None
             ) -> tuple[Scalar, ...]:
    """Other values of `knob` that select the same engine setting here (in `recipe`, for a
    default that depends on another knob), so trying one after the other measures nothing
    new: `auto` and the dtype it resolves to; on NVIDIA GPUs the `fp8` and `fp8_e4m3` KV
    caches (vLLM's `fp8` is E4M3 there); an unset attention backend and the one vLLM picks
    here; -O3 and -O2 (vLLM 0.32 runs 3 as 2); an unset CUDA-graph capture size and
    vLLM's default for the recipe's max_num_seqs."""
    if knob == "dtype":
        auto = space.auto_dtype()
        return (auto,) if value == "auto" else ("auto",) if value == auto else ()
    if knob == "kv_cache_dtype" and space.hw.device == "cuda":
        pair = ("fp8", "fp8_e4m3")
        return tuple(v for v in pair if v != value) if value in pair else ()
    if knob == "attention_backend":
        return _unset_or(auto_attention_backend(space.hw), value)
    if knob == "optimization_level" and value in SAME_LEVELS:
        return tuple(v for v in SAME_LEVELS if v != value)
    if knob == "max_cudagraph_capture_size" and recipe is not None:
        seqs = space.value(recipe, KNOBS["max_num_seqs"])
        return _unset_or(auto_capture_size(seqs) if isinstance(seqs, int) else None, value)
    return ()


def _unset_or(auto: Scalar, value: Scalar) -> tuple[Scalar, ...]:
    """`auto` (what vLLM uses when the knob is unset) and unset are one value."""
    if auto is None:
        return ()
    return (auto,) if value is None else (None,) if value == auto else ()


def summary(d: Diagnosis) -> str:
    """One paragraph for the prompt and the report: the binding resource, why, and the
    knobs that cannot matter."""
    lines = [f"binding: {d.binding.replace('_', ' ')} ({d.why})"]
    lines += [f"- {i.knob}{_which(i)} cannot matter: {i.reason}" for i in d.inert]
    return "\n".join(lines)


def _which(i: InertKnob) -> str:
    if i.values:
        return "=" + "/".join(str(v) for v in i.values)
    if i.at_least is not None:
        return f" >= {i.at_least:g}"
    return ""
