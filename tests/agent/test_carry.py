"""Refinements a model-ranked move carries along (agent/carry.py): the knobs the model of
vLLM predicts to add to a large move, each too small to be kept on an experiment of its
own, measured together with it. On a RAG workload the n-gram drafter comes with its
speculative steps, an fp8 KV cache and a larger token budget. And the other way round: a
later layer's move that an experiment of its own would confirm on top of the open layers'
best move opens its layer now, so the two go in one boot."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from aevyra_forge.agent import AgentContext, Budget, BuiltinStrategy
from aevyra_forge.agent import carry as carry_module
from aevyra_forge.agent.carry import MAX_CARRIED, carry
from aevyra_forge.agent.engine_model import EngineModel
from aevyra_forge.agent.moves import MIN_MODEL_GAIN, Move, confirmable
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import ExperimentRecord, LaunchFailure, Proposal
from aevyra_forge.core.workload import Workload, load_workload
from aevyra_forge.decide.diagnosis import diagnose
from aevyra_forge.engine.sim import layer2 as sim_layer2
from aevyra_forge.engine.sim.engine import SimulatedEngine
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KNOBS, KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import load_playbook

MODEL_1B = "meta-llama/Llama-3.2-1B-Instruct"
CONCURRENCY = 8
SPREAD = (0.97, 1.0, 1.03, 0.99, 1.01)  # five bench passes about 2 % apart
WORDS = ("router", "invoice", "printer", "kernel", "budget", "tenant", "cluster", "ledger")


def _rag(tmp_path: Path) -> Workload:
    """Long retrieved contexts of recurring words and short answers."""
    path = tmp_path / "rag.jsonl"
    rows = [{"prompt": f"Context {i}: " + " ".join(WORDS[(i * 7 + j * 3 + j // 5) % 8]
                                                 for j in range(1500)),
             "expected_output_tokens": 64} for i in range(32)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_workload(path)


def _space() -> KnobSpace:
    space = KnobSpace(gpu_spec("L4").hardware(), profile(MODEL_1B), simulated=True)
    sim_layer2.offer(MODEL_1B, space, lambda _: None)
    return space


def _baseline(space: KnobSpace, workload: Workload, tmp_path: Path) -> ExperimentRecord:
    base = space.baseline(MODEL_1B)
    sim = SimulatedEngine(space.hw, gpu_spec("L4"), space.model, space, noise_cv=0.0)
    server = sim.launch(base, tmp_path / "b.log")
    assert not isinstance(server, LaunchFailure)
    out = sim.bench(server, workload, CONCURRENCY)
    assert out.metrics is not None
    tps = out.metrics.output_throughput
    passes = tuple(out.metrics.model_copy(update={"output_throughput": tps * f})
                   for f in SPREAD)
    return ExperimentRecord(
        exp=0, recipe=base.to_dict(), recipe_id=base.id, parent_id=None, generation=0,
        layer=1, status="ok", metrics=out.metrics, passes=passes, score=1.0,
        kept=True, started_at="t", finished_at="t",
        diagnosis=diagnose("ok", "", out.metrics, base, space, workload.stats, CONCURRENCY))


def _ctx(space: KnobSpace, workload: Workload, history: list[ExperimentRecord],
         layer: int = 2) -> AgentContext:
    return AgentContext(hardware=space.hw, workload=workload.stats, layer=layer,  # type: ignore[arg-type]
                        space=space, best=space.baseline(MODEL_1B), best_score=1.0,
                        history=tuple(history), playbook=load_playbook(),
                        budget=Budget(10, 1.0, None), concurrency=CONCURRENCY,
                        tried_ids=frozenset(r.recipe_id for r in history))


Run = tuple[KnobSpace, Workload, ExperimentRecord]


@pytest.fixture()
def run(tmp_path: Path) -> Run:
    space, workload = _space(), _rag(tmp_path)
    return space, workload, _baseline(space, workload, tmp_path)


def _model(ctx: AgentContext, record: ExperimentRecord) -> EngineModel:
    assert record.metrics is not None
    return EngineModel(ctx, CONCURRENCY, record.metrics.output_throughput)


Setting = tuple[str, object]


def _predicting(model: EngineModel, rewards: dict[Setting, float],
                synergy: Callable[[set[Setting]], dict[Setting, float]] | None = None
                ) -> None:
    """Make `model` predict a flat throughput times each reward a recipe's settings earn:
    what the carry rules do with a figure, whatever the simulator would say. `synergy`
    rewrites the rewards for the settings a recipe has together."""
    space = model.ctx.space

    def throughput(recipe: Recipe) -> float:
        has = {key for key in rewards if space.value(recipe, KNOBS[key[0]]) == key[1]}
        factors = {**rewards, **(synergy(has) if synergy else {})}
        return 100.0 * math.prod(factors[key] for key in has)
    model.throughput = throughput  # type: ignore[method-assign]


def test_a_large_move_carries_what_the_model_predicts_to_add(run: Run) -> None:
    """The builtin's first layer-2 move brings a refinement along, named in the rationale:
    the model predicts the move less without it by at least what it resolves, and by less
    than an experiment of its own would confirm reliably."""
    space, workload, record = run
    ctx = _ctx(space, workload, [record])
    proposal = BuiltinStrategy().propose(ctx).proposal
    assert proposal is not None and "carried along" in proposal.rationale, proposal
    carried = proposal.rationale.split("carried along")[1]
    model = _model(ctx, record)
    full = model.throughput(space.apply(ctx.best, proposal.changes))
    named = [k for k in proposal.changes if f" {k}=" in carried]
    assert 1 <= len(named) <= MAX_CARRIED
    for knob in named:
        without = {k: v for k, v in proposal.changes.items() if k != knob}
        gain = math.log(full / model.throughput(space.apply(ctx.best, without)))
        assert MIN_MODEL_GAIN <= gain < confirmable(ctx), knob
    assert proposal.expected_effect is not None
    ranked = float(proposal.rationale.split(" predicted ")[1].split("%")[0])
    assert float(proposal.expected_effect.split("score ")[1].rstrip("%")) > ranked


def test_a_refinement_one_experiment_confirms_is_a_move_of_its_own(run: Run) -> None:
    """On the n-gram drafter, fp8 weights and spec_tokens=8 each add more than one
    experiment of their own confirms reliably: neither rides (nor another value of the
    knob in its stead); an fp8 KV cache, which adds a few percent, does."""
    space, workload, record = run
    ctx = _ctx(space, workload, [record])
    model = _model(ctx, record)
    move: Move = {"spec_method": "ngram"}
    base = model.throughput(space.apply(ctx.best, move))
    for knob, value in (("quant_method", "fp8"), ("spec_tokens", 8)):
        more = model.throughput(space.apply(ctx.best, {**move, knob: value}))
        assert math.log(more / base) >= confirmable(ctx), knob
    carried = carry(ctx, model, move)
    assert not {"quant_method", "quant_candidate", "spec_tokens"} & set(carried.changes)
    assert carried.changes.get("kv_cache_dtype") == "fp8"
    assert all(MIN_MODEL_GAIN <= gain < confirmable(ctx) for _, gain in carried.added)


def test_the_refinements_go_best_first_and_stop_at_the_cap(
        run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    space, workload, record = run
    ctx = _ctx(space, workload, [record])
    model = _model(ctx, record)
    rewards = {("max_num_batched_tokens", 8192): 1.02, ("block_size", 32): 1.015,
               ("enable_prefix_caching", False): 1.012, ("kv_cache_dtype", "fp8"): 1.025}
    _predicting(model, rewards)
    every = carry(ctx, model, {"spec_method": "ngram"})
    assert [k for k, _ in every.added] == ["kv_cache_dtype", "max_num_batched_tokens",
                                           "block_size"]  # MAX_CARRIED of the four
    assert [round(math.expm1(g), 4) for _, g in every.added] == [0.025, 0.02, 0.015]
    monkeypatch.setattr(carry_module, "MAX_CARRIED", 1)
    [(knob, gain)] = carry(ctx, model, {"spec_method": "ngram"}).added
    assert (knob, gain) == (every.added[0][0], pytest.approx(every.added[0][1]))


def test_a_refinement_a_later_one_makes_pointless_is_dropped(run: Run) -> None:
    """An fp8 KV cache (+2 %) goes first, then a larger token budget (+1.8 %), then
    block_size 32, which with the budget does what the KV cache did and more: the KV
    cache then adds nothing, and is dropped rather than ride along unmeasurable."""
    space, workload, record = run
    ctx = _ctx(space, workload, [record])
    model = _model(ctx, record)
    kv, budget, block = (("kv_cache_dtype", "fp8"), ("max_num_batched_tokens", 8192),
                         ("block_size", 32))

    def synergy(has: set[Setting]) -> dict[Setting, float]:
        return {kv: 1.0, block: 1.035} if {budget, block} <= has else {}

    _predicting(model, {kv: 1.02, budget: 1.018, block: 1.015}, synergy)
    carried = carry(ctx, model, {"spec_method": "ngram"})
    assert carried.changes == {"spec_method": "ngram", "max_num_batched_tokens": 8192,
                               "block_size": 32}
    assert [k for k, _ in carried.added] == ["max_num_batched_tokens", "block_size"]
    assert all(gain >= MIN_MODEL_GAIN for _, gain in carried.added)


def test_only_open_layers_and_never_what_the_workload_makes_nil(run: Run) -> None:
    """At layer 1 a layer-2 knob is not carried (a later layer opens in its turn), nor a
    max_num_seqs cap above the client's concurrency (nil for any config), even where the
    model predicts them to add; nor a gain too small for the model to resolve."""
    space, workload, record = run
    ctx = _ctx(space, workload, [record], layer=1)
    model = _model(ctx, record)
    assert record.diagnosis is not None and record.diagnosis.inert_reason("max_num_seqs", 512)
    _predicting(model, {("kv_cache_dtype", "fp8"): 1.025, ("max_num_seqs", 512): 1.02,
                        ("max_num_batched_tokens", 8192): 1.015, ("block_size", 32): 1.009})
    carried = carry(ctx, model, {"spec_method": "ngram"})
    assert carried.changes == {"spec_method": "ngram", "max_num_batched_tokens": 8192}
    assert carry(_ctx(space, workload, [record], layer=2), model,
                 {"spec_method": "ngram"}).changes["kv_cache_dtype"] == "fp8"


def test_a_refinement_measured_as_a_loss_is_not_carried(run: Run) -> None:
    """Measured down (alone or in another move), the model's figure for it is not trusted
    again as a passenger; measured up but not confirmed, it still rides."""
    space, workload, record = run
    model = _model(_ctx(space, workload, [record]), record)
    _predicting(model, {("max_num_batched_tokens", 8192): 1.02})
    move: Move = {"spec_method": "ngram"}
    for score, expect in ((0.97, False), (1.02, True)):
        tried = space.apply(space.baseline(MODEL_1B), {"max_num_batched_tokens": 8192})
        history = [record, ExperimentRecord(
            exp=1, recipe=tried.to_dict(), recipe_id=tried.id, parent_id=record.recipe_id,
            generation=1, layer=1, status="ok", score=score, kept=False,
            started_at="t", finished_at="t",
            proposal=Proposal(rationale="t", layer=1,
                              changes={"max_num_batched_tokens": 8192}))]
        carried = carry(_ctx(space, workload, history), model, move)
        assert ("max_num_batched_tokens" in carried.changes) == expect, score


def test_a_move_the_model_cannot_serve_carries_nothing(run: Run) -> None:
    space, workload, record = run
    ctx = _ctx(space, workload, [record])
    model = _model(ctx, record)
    model.throughput = lambda recipe: 0.0  # type: ignore[method-assign]
    assert carry(ctx, model, {"spec_method": "ngram"}).added == ()


def test_a_later_layers_large_move_opens_its_layer_to_join_the_best_one(run: Run) -> None:
    """The n-gram drafter (+60 %) leads layer 1; fp8 weights (+40 %) lead layer 2 and add
    as much on top of the drafter: layer 1 hands over, saying why, and in layer 2 the two
    are ranked as one move. fp8 adding what one experiment would not confirm reliably,
    alone or on top of the drafter, leaves layer 1 where it is."""
    space, workload, record = run
    ctx = _ctx(space, workload, [record], layer=1)
    model = _model(ctx, record)
    spec, fp8 = ("spec_method", "ngram"), ("quant_method", "fp8")
    strategy = BuiltinStrategy()
    _predicting(model, {spec: 1.6, fp8: 1.4})
    reason = strategy._hand_over(ctx, model)
    assert reason is not None and "quant_method=fp8" in reason, reason
    assert "adds +40.0% to the best move left up to layer 1 (spec_method=ngram" in reason
    best = strategy._ranked(_ctx(space, workload, [record], layer=2), model, {}, (1, 2))
    assert best is not None and {spec, fp8} <= set(best[1].items()), best
    small = math.expm1(confirmable(ctx)) * 0.9 + 1
    _predicting(model, {spec: 1.6, fp8: small})
    assert strategy._hand_over(ctx, model) is None
    _predicting(model, {spec: 1.6, fp8: 1.4},
                lambda has: {fp8: small} if {spec, fp8} <= has else {})
    assert strategy._hand_over(ctx, model) is None
