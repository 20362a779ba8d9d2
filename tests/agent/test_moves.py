"""The builtin strategy's moves: the open layers (the active one and those before it),
explicit defaults and other synonyms counted as the value they select, the diagnosis's
off-lever rule lapsing once the incumbent is no longer the config diagnosed, and a token
budget and max_num_seqs moved together where vLLM requires it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from aevyra_forge.agent import AgentContext, Budget
from aevyra_forge.agent.moves import (
    candidates,
    completed,
    fresh,
    layer_of,
    off_lever,
    open_layers,
    own,
    same_kernels,
)
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import Diagnosis, ExperimentRecord, InertKnob, Layer, Proposal
from aevyra_forge.core.workload import load_workload
from aevyra_forge.decide.diagnosis import nil
from aevyra_forge.engine.sim import layer2 as sim_layer2
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KNOBS, KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import load_playbook
from tests.conftest import MODEL_8B, SAMPLE_WORKLOAD

WORKLOAD = load_workload(SAMPLE_WORKLOAD).stats
H100 = KnobSpace(gpu_spec("H100").hardware(), profile(MODEL_8B), simulated=True)
DECODE = Diagnosis(binding="decode_bandwidth", why="decode takes 94% of request time")


def _rec(exp: int, recipe: Recipe, kept: bool = True, diagnosis: Diagnosis | None = None,
         changes: dict[str, Any] | None = None) -> ExperimentRecord:
    return ExperimentRecord(
        exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id, parent_id=recipe.parent_id,
        generation=recipe.generation, layer=1, status="ok", score=1.0, kept=kept,
        proposal=Proposal(rationale="t", layer=1, changes=changes) if changes else None,
        started_at="t", finished_at="t", diagnosis=diagnosis)


def _ctx(best: Recipe, history: list[ExperimentRecord], layer: Layer = 1) -> AgentContext:
    return AgentContext(hardware=H100.hw, workload=WORKLOAD, layer=layer, space=H100,
                        best=best, best_score=1.0, history=tuple(history),
                        playbook=load_playbook(), budget=Budget(10, 1.0, None),
                        tried_ids=frozenset(r.recipe_id for r in history))


def test_a_later_layer_keeps_the_earlier_ones_open_and_the_next_one_closed() -> None:
    base = H100.baseline(MODEL_8B)
    ctx = _ctx(base, [_rec(0, base)], layer=2)
    assert open_layers(ctx) == (1, 2)
    layers = {KNOBS[k].layer for move in candidates(ctx, open_layers(ctx)) for k in move}
    assert layers == {1, 2}
    assert layer_of({"max_num_batched_tokens": 2048, "kv_cache_dtype": "fp8"}) == 2


def test_explicit_defaults_are_not_fresh_once_the_default_was_measured() -> None:
    """On an H100 vLLM picks FLASH_ATTN, runs -O3 as -O2 and captures up to 512: naming
    any of them measures the baseline again; another backend is a move."""
    base = H100.baseline(MODEL_8B)
    ctx = _ctx(base, [_rec(0, base)], layer=3)
    assert not fresh(ctx, {"attention_backend": "FLASH_ATTN"})
    assert not fresh(ctx, {"optimization_level": 3})
    assert not fresh(ctx, {"max_cudagraph_capture_size": 512})
    assert fresh(ctx, {"attention_backend": "FLASHINFER"})
    assert fresh(ctx, {"max_cudagraph_capture_size": 64})


def test_the_off_lever_rule_lapses_once_a_move_was_kept() -> None:
    """Decode-bound at the baseline, the token budget does not act on what binds; once
    speculative decoding was kept, the engine verifies drafts in larger steps and the
    baseline's diagnosis no longer rules the budget out."""
    base = H100.baseline(MODEL_8B)
    history = [_rec(0, base, diagnosis=DECODE)]
    move = {"max_num_batched_tokens": 2048}
    assert off_lever(_ctx(base, history), move) is not None
    spec = H100.apply(base, {"spec_method": "suffix"})
    history.append(_rec(1, spec, changes={"spec_method": "suffix"}))
    assert off_lever(_ctx(spec, history), move) is None
    assert off_lever(_ctx(base, history), move) is not None  # still the config diagnosed


def test_another_checkpoint_of_the_incumbents_method_is_no_speed_move() -> None:
    """Once a W8A8 Hub copy serves, forge's own W8A8 checkpoints run the same kernels (a
    calibrated one would cost minutes to write for accuracy the keep rule does not
    reward); another method is still a move, and from the baseline every candidate is."""
    space = KnobSpace(gpu_spec("H100").hardware(), profile(MODEL_8B), simulated=True)
    sim_layer2.offer(MODEL_8B, space, lambda _: None)
    hub = space.apply(space.baseline(MODEL_8B), {
        "quant_candidate": "hub:RedHatAI/Llama-3.1-8B-Instruct-quantized.w8a8"})
    ctx = replace(_ctx(hub, []), space=space)
    for name in ("rtn-w8a8", "cal-w8a8"):
        why = same_kernels(ctx, {"quant_candidate": name})
        assert why is not None and why.startswith("serves w8a8_int8 as the incumbent's hub:")
    assert same_kernels(ctx, {"quant_candidate": "rtn-fp8"}) is None
    assert same_kernels(ctx, {"max_num_seqs": 64}) is None
    base = replace(ctx, best=space.baseline(MODEL_8B))
    assert all(same_kernels(base, {"quant_candidate": c.name}) is None
               for c in space.quant_candidates)


SEQS, TOKENS = KNOBS["max_num_seqs"], KNOBS["max_num_batched_tokens"]


def test_a_smaller_token_budget_brings_max_num_seqs_down_with_it() -> None:
    """An H100 defaults to max_num_seqs 1024: a budget of 512 tokens alone is a config
    vLLM refuses, so the move lowers max_num_seqs to the largest of its values within the
    budget; a larger max_num_seqs raises the budget to the smallest value covering it."""
    base = H100.baseline(MODEL_8B)
    ctx = _ctx(base, [_rec(0, base)])
    assert H100.value(base, SEQS) == 1024 and H100.value(base, TOKENS) == 8192
    assert completed(ctx, {"max_num_batched_tokens": 512}) == {
        "max_num_batched_tokens": 512, "max_num_seqs": 512}
    assert completed(ctx, {"max_num_batched_tokens": 4096}) == {"max_num_batched_tokens": 4096}
    small = H100.apply(base, {"max_num_batched_tokens": 1024})
    assert completed(_ctx(small, [_rec(0, small)]), {"max_num_seqs": 2048}) == {
        "max_num_seqs": 2048, "max_num_batched_tokens": 2048}
    both = {"max_num_batched_tokens": 512, "max_num_seqs": 64}
    assert completed(ctx, both) == both  # the move's own choice stands
    assert {"max_num_batched_tokens": 512, "max_num_seqs": 512} in candidates(ctx, (1,))
    assert {"max_num_batched_tokens": 512} not in candidates(ctx, (1,))


def test_what_vllm_requires_is_not_what_makes_a_move_nil() -> None:
    """max_num_seqs from the concurrency up is nil by the diagnosis; brought down to 512 by
    a smaller token budget it is what vLLM requires, not the move: the move is judged on
    its token budget alone."""
    base = H100.baseline(MODEL_8B)
    ctx = _ctx(base, [_rec(0, base)])
    diagnosis = DECODE.model_copy(update={"inert": (InertKnob(knob="max_num_seqs", at_least=32,
                                                             reason="32 in flight"),)})
    move = completed(ctx, {"max_num_batched_tokens": 512})
    assert nil(diagnosis, move) == "32 in flight"
    assert own(ctx, move) == {"max_num_batched_tokens": 512}
    assert nil(diagnosis, own(ctx, move)) is None
    chosen = {"max_num_batched_tokens": 512, "max_num_seqs": 64}
    assert own(ctx, chosen) == chosen and own(ctx, {"kv_cache_dtype": "fp8"}) == {
        "kv_cache_dtype": "fp8"}


@given(st.sampled_from(H100.grid(SEQS)), st.sampled_from(H100.grid(TOKENS)),
       st.sampled_from(["max_num_seqs", "max_num_batched_tokens"]), st.integers(0, 8))
def test_a_completed_move_is_a_config_vllm_accepts(seqs: int, tokens: int, name: str,
                                                   pick: int) -> None:
    """From any valid incumbent, any value of either knob completes to a config vLLM
    accepts, changing the other knob only when it must, and as little as its grid allows;
    what it brings is not the move's own."""
    if tokens < seqs:
        return  # not a valid incumbent
    best = H100.apply(H100.baseline(MODEL_8B), {"max_num_seqs": seqs,
                                                "max_num_batched_tokens": tokens})
    ctx = _ctx(best, [_rec(0, best)])
    grid = H100.grid(KNOBS[name])
    value = grid[pick % len(grid)]
    move = completed(ctx, {name: value})
    recipe = H100.apply(best, move)
    H100.check_combination(recipe)
    assert move[name] == value and own(ctx, move) == {name: value}
    other = next(k for k in move if k != name) if len(move) == 2 else None
    if other == "max_num_seqs":
        assert H100.value(recipe, SEQS) == max(v for v in H100.grid(SEQS) if v <= value)
    elif other == "max_num_batched_tokens":
        assert H100.value(recipe, TOKENS) == min(v for v in H100.grid(TOKENS) if v >= value)
