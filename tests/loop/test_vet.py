"""The loop's own vetting of a proposal, whichever agent made it: a move the baseline's
diagnosis proves nil in every knob, and a value that is another name for one measured
(or run) already, are refused before a boot, and the reason goes back to the agent."""

from __future__ import annotations

from pathlib import Path

from aevyra_forge.core.values import Diagnosis, InertKnob, Proposal
from aevyra_forge.decide.diagnosis import nil
from aevyra_forge.loop.events import ProposalRefused
from aevyra_forge.loop.tuner import MAX_ASKS
from aevyra_forge.loop.vet import vet
from tests.loop.test_tuner import Scripted, _reply, _tuner

SEQS = "at most 8 requests are ever in flight"
MEMORY = "the KV cache never filled"


def _diagnosis() -> Diagnosis:
    return Diagnosis(binding="decode_bandwidth", why="decode-bound", inert=(
        InertKnob(knob="max_num_seqs", at_least=8.0, reason=SEQS),
        InertKnob(knob="gpu_memory_utilization", reason=MEMORY)))


def test_a_move_is_wholly_nil_only_when_every_knob_it_sets_is_inert() -> None:
    d = _diagnosis()
    assert nil(d, {"max_num_seqs": 512}, wholly=True) == SEQS
    assert nil(d, {"max_num_seqs": 512, "gpu_memory_utilization": 0.95}, wholly=True) \
        == f"{SEQS}; {MEMORY}"
    assert nil(d, {"max_num_seqs": 4}, wholly=True) is None  # below the peak: it may bind
    assert nil(d, {"max_num_seqs": 512, "max_num_batched_tokens": 1024}, wholly=True) is None
    assert nil(d, {"max_num_seqs": 512, "max_num_batched_tokens": 1024}) == SEQS  # partly
    assert nil(None, {"max_num_seqs": 512}, wholly=True) is None  # nothing diagnosed yet
    assert nil(d, {}, wholly=True) is None


def test_an_agents_nil_move_is_refused_with_the_diagnosis_and_costs_no_boot(
        tmp_path: Path, small_workload: Path) -> None:
    """The baseline serves eight requests at a time with a cap of 1024: a cap of 512 is
    the same scheduler, and an agent that proposes it is told so and asked again; a move
    that pairs it with a knob the diagnosis does not rule out runs."""
    proposer = Scripted([_reply(1, max_num_seqs=512),
                         _reply(1, max_num_seqs=512, max_num_batched_tokens=1024)])
    tuner, events = _tuner(tmp_path, small_workload, proposer, max_experiments=2)
    tuner.run()
    recs = tuner.run_log.records()
    assert [r.exp for r in recs] == [0, 1]  # no experiment spent on the nil move
    assert recs[1].recipe["config"] == {"max_num_seqs": 512, "max_num_batched_tokens": 1024}
    feedback = proposer.contexts[1].feedback or ""
    assert feedback.startswith("the baseline's diagnosis shows this move cannot change "
                               "the score: at most 8 requests are ever in flight")
    assert [e.reason for e in events.of(ProposalRefused)] == [feedback]


def test_a_nil_move_proposed_again_and_again_ends_in_a_refusal_row(
        tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([_reply(1, gpu_memory_utilization=0.85)] * MAX_ASKS)
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=3)
    tuner.run()
    refusal = tuner.run_log.records()[1]
    assert refusal.status == "invalid" and refusal.boot_s is None
    assert "the KV cache never filled" in refusal.decision
    assert tuner.state.experiments == 1  # the baseline only


def test_another_name_for_a_measured_value_is_a_repeat(tmp_path: Path,
                                                       small_workload: Path) -> None:
    """On an NVIDIA GPU vLLM's `fp8` KV cache is E4M3, and with no attention backend set
    vLLM picks FLASH_ATTN on an H100: proposing the other name measures nothing new."""
    proposer = Scripted([_reply(2, kv_cache_dtype="fp8"), _reply(2, kv_cache_dtype="fp8_e4m3"),
                         _reply(3, attention_backend="FLASH_ATTN"),
                         _reply(2, kv_cache_dtype="fp8_e5m2")])
    tuner, events = _tuner(tmp_path, small_workload, proposer, max_experiments=3,
                           start_layer=3, remeasure_every=0)
    tuner.run()
    recs = tuner.run_log.records()
    assert [r.recipe["quant"]["kv_cache_dtype"] for r in recs[1:]] == ["fp8", "fp8_e5m2"]
    refused = [e.reason for e in events.of(ProposalRefused)]
    assert refused == [
        "repeat of experiment 1 under another name: kv_cache_dtype=fp8_e4m3 selects the "
        "same engine setting as kv_cache_dtype=fp8 here",
        "no-op: attention_backend=FLASH_ATTN selects the same engine setting as leaving "
        "attention_backend unset here, which the incumbent runs"]


def test_once_a_move_was_kept_only_what_the_workload_fixes_is_refused(
        tmp_path: Path, small_workload: Path) -> None:
    """The diagnosis read the baseline: once another config leads, a cap above the
    client's concurrency is still nil, but a KV cache that never filled may fill now (the
    loop lets that move run; the agent was shown why it may not pay)."""
    tuner, _ = _tuner(tmp_path, small_workload, Scripted([]), max_experiments=1)
    tuner.run()
    (baseline,) = tuner.run_log.records()
    assert baseline.diagnosis is not None
    seqs = Proposal(rationale="t", layer=1, changes={"max_num_seqs": 512})
    memory = Proposal(rationale="t", layer=1, changes={"gpu_memory_utilization": 0.95})
    space, records, base = tuner.space, [baseline], tuner.state.best
    for proposal, why in ((seqs, SEQS), (memory, MEMORY)):
        recipe, said, status = vet(space, base, records, proposal, 1)
        assert recipe is None and status == "invalid" and why in said
    moved = space.apply(base, {"max_num_batched_tokens": 1024})
    recipe, said, status = vet(space, moved, records, seqs, 1)
    assert recipe is None and status == "invalid" and SEQS in said
    recipe, said, status = vet(space, moved, records, memory, 1)
    assert recipe is not None and status == "ok" and said == ""
