"""The LLM agent's prompt. The system message is the playbook plus the reply format; the
user message is the run's facts: hardware, model and memory budget, workload, active
layer, the objective and SLOs it is scored on, the knobs allowed now, the best recipe, the
history with metrics and failures, the budget left, and why a previous proposal was
refused. Older history is compressed so the message stays within a token budget."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from aevyra_forge.agent.base import AgentContext
from aevyra_forge.agent.reply import MAX_KNOBS_PER_PROPOSAL
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.settings import Objective
from aevyra_forge.core.slo import Slo
from aevyra_forge.core.values import LAYER_NAMES, ExperimentRecord, Scalar
from aevyra_forge.core.workload import estimate_tokens
from aevyra_forge.decide.diagnosis import in_force
from aevyra_forge.decide.diagnosis import summary as diagnosis_summary
from aevyra_forge.space.knob_space import KNOBS, KnobSpace, has_fp8
from aevyra_forge.space.layer2 import refused_here
from aevyra_forge.space.quant import QUANT_METHODS
from aevyra_forge.space.registry import format_number

USER_BUDGET_TOKENS = 6000  # the user message; the playbook in the system adds ~3.5k
RECENT_ROWS = 12  # history rows shown in full before older ones are compressed
MIN_RECENT_ROWS = 3
GIB = 1024**3  # bytes
ACTIVATION_RESERVE_GIB = 2.0  # activations, CUDA graphs, sampler: a rough allowance
_TEXT_CHARS = 160  # of a rationale or failure reason quoted in a history row
_SHORT_REASON_CHARS = 60  # of a failure reason in a one-line row

# The score under each --objective, as objective_value in decide/ computes it, and what
# the agent might otherwise get wrong about it.
SCORED: dict[Objective, tuple[str, str]] = {
    "throughput": ("output tokens per second", ""),
    "latency": ("1000 / p99 end-to-end (E2E) request latency in ms",
                "A lower p99 E2E scores higher: 1.10 means p99 E2E divided by 1.1. TTFT, "
                "TPOT and mean latency do not enter the score."),
    "goodput": ("goodput, the requests per second that met every per-request SLO bound", ""),
}

ROLE = ("You are forge's tuning agent. Forge tunes a vLLM deployment one experiment at a "
        "time: you propose ONE change to the best recipe, forge boots vLLM with it, "
        "replays the user's workload, and keeps the change only if it beats the best. The "
        "playbook below is your guide; the facts of this run (hardware, workload, knobs "
        "allowed now, history) come in the user message. Every experiment costs minutes "
        "of GPU time, so prefer a change with a clear reason over a sweep.")

REPLY_FORMAT = "\n".join([
    "## Reply format",
    "",
    "Reply with ONE JSON object and nothing else, exactly these four keys:",
    '{"rationale": "why this change, citing the history and the numbers", "layer": <the '
    'active layer number>, "changes": {"<knob>": <value>}, "expected_effect": "what you '
    'expect to see in the metrics"}',
    "",
    "Rules forge enforces (a reply that breaks one is sent back to you):",
    f"- change one knob; at most {MAX_KNOBS_PER_PROPOSAL} when they only make sense together "
    "(max_num_seqs with max_num_batched_tokens);",
    "- only knobs listed as allowed now, all in the active layer;",
    "- values of the listed type inside the listed range or choices: integers without a "
    "decimal point, numbers for floats, true/false for booleans, choices spelled exactly;",
    "- never the model, a checkpoint or any path: forge decides what model is served;",
    "- do not repeat an experiment from the history or propose the best recipe's own "
    "values;",
    '- when nothing in this layer is worth an experiment, reply with "changes": {} and say '
    "why in the rationale: forge moves on to the next layer.",
])


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str

    @property
    def tokens(self) -> int:
        return estimate_tokens(self.system) + estimate_tokens(self.user)


def build_prompt(ctx: AgentContext, budget_tokens: int = USER_BUDGET_TOKENS) -> Prompt:
    system = f"{ROLE}\n\n{ctx.playbook.text.strip()}\n\n{REPLY_FORMAT}\n"
    head = "\n\n".join(filter(None, [_hardware(ctx), _memory(ctx), _workload(ctx),
                                     _diagnosis(ctx), _layer(ctx), _objective(ctx),
                                     _knobs(ctx), _best(ctx)]))
    tail = "\n\n".join(filter(None, [_budget(ctx), _feedback(ctx), _ask(ctx)]))
    room = budget_tokens - estimate_tokens(f"{head}\n\n\n\n{tail}\n")  # with separators
    return Prompt(system=system, user=f"{head}\n\n{history(ctx, room)}\n\n{tail}\n")


# -- sections --------------------------------------------------------------------------
def _hardware(ctx: AgentContext) -> str:
    hw = ctx.hardware
    lines = [f"## Hardware\n{hw.describe()}; device {hw.device}"]
    if hw.gpu is not None:
        lines.append(f"compute capability {hw.gpu.compute_capability or '?'}; FP8 support: "
                     f"{'yes' if has_fp8(hw) else 'no'}")
    if hw.simulated:
        lines.append("(a dry run: vLLM is replaced by forge's performance simulator)")
    return "\n".join(lines)


def _memory(ctx: AgentContext) -> str:
    space, best, hw = ctx.space, ctx.best, ctx.hardware
    model = space.model
    method = best.quant.method if best.quant.method in QUANT_METHODS else "none"
    weights = model.params_b * 1e9 * QUANT_METHODS[method].bytes_per_param / GIB
    kv_dtype = str(best.quant.kv_cache_dtype)
    kv_token = model.kv_bytes_per_token(1.0 if kv_dtype.startswith("fp8") else 2.0)
    per_seq = ctx.workload.input_tokens.p99 + ctx.workload.output_tokens.p99
    lines = [f"## Model and memory budget (estimate)\n{model.name}: {model.params_b:.2f} B "
             f"parameters, {model.num_layers} layers, {model.num_kv_heads} KV heads x "
             f"{model.head_dim} head dim, max context {model.max_context}"
             + ("" if model.known else " (shape estimated from the name)"),
             f"weights ~{weights:.1f} GiB ({method}); KV cache {kv_token / 1024:.0f} KiB "
             f"per token ({kv_dtype}; fp8 halves it)"]
    if hw.device == "cpu":
        kv_gib = _number(_value(space, best, "VLLM_CPU_KVCACHE_SPACE"), 4.0)
        budget = f"KV cache space {kv_gib:.0f} GiB (VLLM_CPU_KVCACHE_SPACE)"
    else:
        tp = int(_number(_value(space, best, "tensor_parallel_size"), 1.0))
        util = _number(_value(space, best, "gpu_memory_utilization"), 0.9)
        total = hw.gpu_memory_gib * tp
        kv_gib = max(0.0, total * util - weights - ACTIVATION_RESERVE_GIB * tp)
        budget = (f"GPU memory {total:.0f} GiB x gpu_memory_utilization {util:g} minus "
                  f"weights and ~{ACTIVATION_RESERVE_GIB * tp:.0f} GiB of activations "
                  f"leaves ~{kv_gib:.1f} GiB for the KV cache")
    tokens = kv_gib * GIB / kv_token if kv_token else 0.0
    lines.append(f"{budget}: ~{tokens / 1000:.0f}k tokens, about {tokens / max(per_seq, 1):.0f}"
                 f" sequences of the workload's p99 length ({per_seq:.0f} tokens)")
    return "\n".join(lines)


def _workload(ctx: AgentContext) -> str:
    return f"## Workload\n{ctx.workload.summary()}"


def _diagnosis(ctx: AgentContext) -> str:
    """What bound the baseline, and the moves that cannot matter (decide.diagnosis)."""
    found = next((r for r in reversed(ctx.history) if r.diagnosis is not None), None)
    if found is None or found.diagnosis is None:
        return ""
    d = found.diagnosis
    moved = ""
    still = in_force(ctx.history, ctx.best.id)
    if d.binding != "boot" and found.recipe_id != ctx.best.id and still is not None:
        held = ", ".join(dict.fromkeys(i.knob for i in still.inert))
        moved = ("\nThe incumbent is another config now, so what binds may have moved: "
                 + (f"of these only {held} still cannot matter (fixed by the workload "
                    "or the hardware)." if held
                    else "none of these knobs is ruled out any more."))
    return (f"## What bound experiment {found.exp} (its server counters)\n"
            f"{diagnosis_summary(d)}{moved}\nA move that only touches knobs that "
            "cannot matter is refused before it boots: spend experiments on what binds.")


def _layer(ctx: AgentContext) -> str:
    return (f"## Active layer\n{ctx.layer} ({LAYER_NAMES[ctx.layer]}): propose knobs of this "
            "layer only.")


def _objective(ctx: AgentContext) -> str:
    """What the score is under --objective and the SLOs a kept config must meet (each term
    on its median over the passes, as core.slo.check_passes tests it)."""
    metric, detail = SCORED[ctx.objective]
    slo = ", meets every SLO below" if ctx.slo else ""
    scored = " ".join(filter(None, [
        f"Score = {metric}, relative to the baseline's (1.0 = vLLM's defaults; higher is "
        "better).", detail,
        "A change is kept only when it beats the best score by more than the minimum "
        f"improvement (+{ctx.min_improvement * 100:g}%, judged over repeated bench passes"
        f"){slo} and keeps accuracy above the floor."]))
    lines = [f"## Objective: {ctx.objective}\n{scored}"]
    if ctx.slo:
        lines.append("SLOs (each bound tested on its median over the bench passes): "
                     + ", ".join(str(term) for term in ctx.slo.terms))
        if ctx.objective == "goodput":
            lines.append(f"A request counts toward goodput when {_per_request(ctx.slo)}.")
    return "\n".join(lines)


def _per_request(slo: Slo) -> str:
    bounds = [f"its {metric.upper()} {str(term).removeprefix(term.name)}"
              for metric, term in slo.request_limits().items()]
    return ", ".join(bounds[:-1]) + " and " + bounds[-1] if len(bounds) > 1 else bounds[0]


def _knobs(ctx: AgentContext) -> str:
    space = ctx.space
    lines = [f"## Knobs you may change now (layer {ctx.layer}, this hardware)"]
    for knob in space.knobs(ctx.layer):
        if knob.kind in ("int", "float"):
            low, high = space.bounds(knob)
            kind = f"{knob.kind} in [{format_number(low)}, {format_number(high)}]"
        elif knob.kind == "bool":
            kind = "bool (true or false)"
        else:  # null (JSON) turns off a choice whose default is unset (spec_method)
            kind = "one of " + ", ".join("null" if c is None else _show(c)
                                         for c in space.choices(knob))
        lines.append(f"- {knob.name}: {kind}; default here {_show(space.default(knob))}; "
                     f"best recipe has {_show(space.value(ctx.best, knob))}. {knob.note}")
        if knob.name == "kernel_plugin":  # what each installed plug-in offers, in its words
            lines.extend(f"  - {c.name} (from {c.generator}): {_clip(c.note) or 'no note'}"
                         for c in space.plugins.candidates)
        if knob.name == "spec_method":  # the heads found on the Hub, which bring spec_model
            lines.extend(f"  - {m}: runs {d} (found on the Hub for this model; spec_model "
                         "follows)" for m, d in space.drafts.items()
                         if m in space.choices(knob))
        if knob.name == "quant_candidate":  # each checkpoint with what it costs
            lines.extend(f"  - {c.describe()}" for c in space.quant_candidates
                         if c.name in space.choices(knob))
    if len(lines) == 1:
        lines.append("(none on this hardware: reply with \"changes\": {})")
    if ctx.layer == 2 and (refused := [*refused_here(ctx.hardware), *(
            f"{name}: refused when it booted here ({_clip(why)})"
            for name, why in space.quant_refused.items()), *(
            f"{name}: {why}" for name, why in space.quant_unserved.items())]):
        lines.append("Not possible on this hardware (do not propose): " + "; ".join(refused))
    return "\n".join(lines)


def _best(ctx: AgentContext) -> str:
    settings = ", ".join(f"{k}={_show(v)}" for k, v in ctx.space.effective(ctx.best).items())
    score = "not measured yet" if ctx.best_score is None else f"{ctx.best_score:.3f}"
    model = ctx.best.serve_model
    return (f"## Best recipe so far\nid {ctx.best.id}, generation {ctx.best.generation}, "
            f"score {score}, serves {model}\neffective settings: {settings}")


def _budget(ctx: AgentContext) -> str:
    b = ctx.budget
    dollars = "no cap" if b.dollars_left is None else f"${max(b.dollars_left, 0.0):.4f}"
    return (f"## Budget left\n{b.experiments_left} experiments, {max(b.hours_left, 0.0):.1f} "
            f"GPU hours, LLM spend {dollars}")


def _feedback(ctx: AgentContext) -> str:
    if not ctx.feedback:
        return ""
    return (f"## Your previous proposal was refused\n{ctx.feedback}\nPropose something "
            f"different (this is ask {ctx.attempt + 1} for this experiment).")


def _ask(ctx: AgentContext) -> str:
    return (f"Propose the next experiment for layer {ctx.layer} as one JSON object in the "
            "reply format.")


# -- history -----------------------------------------------------------------------------
def history(ctx: AgentContext, budget_tokens: int) -> str:
    """The history: the last rows in full, older rows one short line each, and when even
    that does not fit, the oldest folded into one aggregate paragraph."""
    records = list(ctx.history)
    title = f"## Experiment history ({len(records)} so far, oldest first)"
    if not records:
        return f"{title}\n(none yet)"
    recent = min(RECENT_ROWS, len(records))
    while True:
        older = records[:-recent] if recent < len(records) else []
        for short in _shrink(len(older)):
            text = _render(title, ctx.space, older, records[len(older):], short)
            if estimate_tokens(text) <= budget_tokens:
                return text
        if recent <= MIN_RECENT_ROWS:
            return text  # the floor: always show the last few rows in full
        recent = max(MIN_RECENT_ROWS, recent // 2)


def _shrink(n: int) -> list[int]:
    """How many older rows to keep as short lines: all, then halves, then none."""
    out = [n]
    while n > 0:
        n //= 2
        out.append(n)
    return out


def _render(title: str, space: KnobSpace, older: Sequence[ExperimentRecord],
            recent: Sequence[ExperimentRecord], short: int) -> str:
    folded, shown = older[:len(older) - short], older[len(older) - short:]
    parts = [title]
    if folded:
        parts.append(_aggregate(folded))
    if shown:
        parts.append("Older, one line each:\n" + "\n".join(_short_row(r) for r in shown))
    parts.append("Recent, in full:\n" + "\n".join(_full_row(space, r) for r in recent))
    return "\n".join(parts)


def _changes(rec: ExperimentRecord) -> str:
    if rec.proposal is None:
        return "baseline" if rec.exp == 0 else "(no proposal)"
    return ", ".join(f"{k}={_show(v)}" for k, v in rec.proposal.changes.items()) or "{}"


def _short_row(rec: ExperimentRecord) -> str:
    score = f" {rec.score:.3f}" if rec.score is not None else ""
    why = f" ({_clip(rec.reason)[:_SHORT_REASON_CHARS]})" if rec.status != "ok" else ""
    return (f"exp {rec.exp} L{rec.layer} {_changes(rec)}: {rec.status}{score}"
            f"{' kept' if rec.kept else ''}{why}")


def _full_row(space: KnobSpace, rec: ExperimentRecord) -> str:
    head = f"exp {rec.exp} [layer {rec.layer}] {_changes(rec)} -> {rec.status}"
    if rec.status in ("invalid", "duplicate"):
        return f"{head} (refused before booting): {_clip(rec.reason)}"
    if rec.status != "ok" or rec.metrics is None:
        return f"{head}: {_clip(rec.reason) or 'no reason recorded'}"
    m = rec.metrics
    bits = [f"{'KEPT' if rec.kept else 'reverted'}",
            f"score {rec.score:.3f}" if rec.score is not None else "score -",
            f"output {m.output_throughput:.1f} tok/s",
            f"TTFT p99 {m.ttft_ms.p99:.0f} ms", f"TPOT p99 {m.tpot_ms.p99:.1f} ms",
            f"E2E p99 {m.e2e_ms.p99:.0f} ms"]
    if rec.boot_s is not None:  # compilation settings trade boot time for speed
        bits.append(f"boot {rec.boot_s:.0f} s")
    if rec.accuracy is not None:
        bits.append(f"accuracy {rec.accuracy:.3f}")
    if m.failed:
        bits.append(f"failed requests {m.failed}")
    bits += [f"{k} {v:.3g}" for k, v in sorted(m.server.items())]
    row = f"{head}: {', '.join(bits)}; {rec.decision}"
    if rec.proposal is not None and rec.proposal.rationale:
        row += f" | rationale: {_clip(rec.proposal.rationale)}"
    return row


def _aggregate(records: Sequence[ExperimentRecord]) -> str:
    """Many old experiments in one paragraph: counts, the kept path, failed values (never
    to be retried) and values that made no difference."""
    statuses = Counter(r.status for r in records)
    kept = [f"{_changes(r)} ({r.score:.3f})" for r in records
            if r.kept and r.score is not None]
    failed = sorted({f"{_changes(r)} ({r.status})" for r in records
                     if r.status not in ("ok", "invalid", "duplicate")})
    flat = sorted({_changes(r) for r in records if r.status == "ok" and not r.kept
                   and r.proposal is not None})
    counts = ", ".join(f"{n} {s}" for s, n in statuses.most_common())
    parts = [f"Experiments {records[0].exp}-{records[-1].exp} in brief: {counts}."]
    if kept:
        parts.append("Kept, in order: " + "; ".join(kept) + ".")
    if failed:
        parts.append("Failed (do not retry these or values beyond them): "
                     + "; ".join(failed) + ".")
    if flat:
        parts.append("Measured without a kept gain: " + "; ".join(flat) + ".")
    return " ".join(parts)


# -- formatting --------------------------------------------------------------------------
def _value(space: KnobSpace, recipe: Recipe, name: str) -> Scalar:
    knob = KNOBS[name]
    return space.value(recipe, knob) if space.available(knob) else space.default(knob)


def _number(value: Scalar, fallback: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return fallback
    return float(value)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "unset" if value is None else str(value)


def _clip(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _TEXT_CHARS else flat[:_TEXT_CHARS - 3] + "..."
