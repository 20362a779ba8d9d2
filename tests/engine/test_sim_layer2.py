"""Tests for aevyra_forge.engine.sim.layer2: a dry run's layer 2 offers what a real run
would (simulated Hub siblings, round-to-nearest and calibrated checkpoints), gated by the
quant-facts table, stated as simulated in the run's lines and the prompt, with prepare
times charged once per checkpoint and counted in the simulated budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aevyra_forge.agent import AgentContext, Budget
from aevyra_forge.agent.prompt import build_prompt
from aevyra_forge.core.values import Hardware
from aevyra_forge.core.workload import load_workload
from aevyra_forge.engine.sim import layer2 as sim_layer2
from aevyra_forge.space import layer2, quant
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import load_playbook
from tests.builders import record
from tests.conftest import MODEL_8B, run_cli


def _space(gpu: str) -> KnobSpace:
    return KnobSpace(gpu_spec(gpu).hardware(), profile(MODEL_8B), simulated=True)


@pytest.mark.parametrize("gpu", ["A100-80GB", "H100", "T4", "MI300X"])
def test_the_offer_follows_the_quant_facts_table(gpu: str) -> None:
    space = _space(gpu)
    lines: list[str] = []
    preparer = sim_layer2.offer(MODEL_8B, space, lines.append)
    hw = space.hw
    offered = {c.name: c for c in space.quant_candidates}
    for c in offered.values():
        assert quant.checkpoint_refusal(c.method, hw) is None, c.name
        assert c.note.startswith(sim_layer2.SIMULATED)
    # every round-to-nearest and calibrated scheme the table lets this GPU serve, and no other
    assert {n for n in offered if n.startswith("rtn-")} == {
        f"rtn-{s}" for s, (m, _) in layer2.RTN.items()
        if quant.checkpoint_refusal(m, hw) is None}
    assert {n for n in offered if n.startswith("cal-")} == {
        f"cal-{s}" for s, (m, _, _) in layer2.CALIBRATED.items()
        if quant.checkpoint_refusal(m, hw) is None}
    hub = [c for c in offered.values() if c.kind == "hub"]
    assert hub and all(c.download_bytes for c in hub)
    assert all(line.startswith(sim_layer2.SIMULATED) for line in lines)
    assert lines[-1].endswith(", ".join(offered))
    # the Hub's set-aside copies are said, with the table's reason
    skipped = sim_layer2.hub_answer(MODEL_8B, 8e9, hw).skipped
    assert len(hub) + len(skipped) == len(sim_layer2.HUB_COPIES)
    assert all(": " in why for why in skipped)
    # what the preparer charges: forge's own checkpoints, and a Hub sibling's download
    assert set(preparer.seconds) == {c.checkpoint for c in offered.values()}
    assert all(preparer.seconds[c.checkpoint] == pytest.approx(
        (c.download_bytes or 0) / sim_layer2.SIM_DOWNLOAD_BYTES_S) for c in hub)


def test_an_fp8_checkpoint_is_offered_on_h100_and_not_on_t4() -> None:
    h100, t4 = _space("H100"), _space("T4")
    sim_layer2.offer(MODEL_8B, h100, lambda _: None)
    sim_layer2.offer(MODEL_8B, t4, lambda _: None)
    assert "rtn-fp8" in [c.name for c in h100.quant_candidates]
    assert "rtn-fp8" not in [c.name for c in t4.quant_candidates]
    assert any("fp8 is not served here" in why
               for why in sim_layer2.hub_answer(MODEL_8B, 8e9, t4.hw).skipped)


def test_a_model_that_is_no_hub_id_gets_one_simulated_line(tmp_path: Path) -> None:
    found = sim_layer2.hub_answer(str(tmp_path), 1e9, gpu_spec("H100").hardware())
    assert found.siblings == () and found.note.startswith("(simulated) Hub lookup: ")


@given(st.floats(min_value=1e8, max_value=4e11))
def test_sizes_follow_the_table(params: float) -> None:
    found = sim_layer2.hub_answer(MODEL_8B, params, gpu_spec("H100").hardware())
    for s in found.siblings:
        assert s.size_bytes == int(params * quant.facts(s.method).bytes_per_param)


def test_prepare_is_charged_once_per_checkpoint_and_remembered_on_resume() -> None:
    space = _space("A100-80GB")
    preparer = sim_layer2.offer(MODEL_8B, space, lambda _: None)
    base = space.baseline(MODEL_8B)
    rtn = space.apply(base, {"quant_candidate": "rtn-w8a8"})
    cal = space.apply(base, {"quant_candidate": "cal-w8a8"})
    hub = space.apply(base, {"quant_candidate": space.quant_candidates[0].name})
    log = Path("unused.log")
    first = preparer(rtn, log)
    expected = layer2.RTN_FIXED_S + layer2.RTN_S_PER_GB * space.model.weight_bytes_bf16 / 1e9
    assert first is not None and not first.reused and first.seconds == pytest.approx(expected)
    again = preparer(rtn, log)
    assert again is not None and again.reused and again.seconds == 0.0
    assert preparer(base, log) is None
    fetched = preparer(hub, log)  # a Hub sibling: its download, at the simulated speed
    assert fetched is not None and fetched.seconds == pytest.approx(
        (space.quant_candidates[0].download_bytes or 0) / sim_layer2.SIM_DOWNLOAD_BYTES_S,
        abs=0.01) and fetched.seconds > 0
    # a resumed run: what its records show prepared is not charged again, the rest is
    resumed = sim_layer2.offer(MODEL_8B, _space("A100-80GB"), lambda _: None)
    resumed.remember([record(1, layer=2, recipe=rtn.to_dict(), prepare_s=first.seconds)])
    redone = resumed(rtn, log)
    assert redone is not None and redone.reused
    fresh = resumed(cal, log)
    assert fresh is not None and not fresh.reused and fresh.seconds > expected


def test_the_prompt_lists_the_candidates_as_simulated(small_workload: Path) -> None:
    space = _space("A100-80GB")
    sim_layer2.offer(MODEL_8B, space, lambda _: None)
    base = space.baseline(MODEL_8B)
    ctx = AgentContext(hardware=space.hw, workload=load_workload(small_workload).stats,
                       layer=2, space=space, best=base, best_score=1.0, history=(),
                       playbook=load_playbook(), budget=Budget(10, 2.0, None),
                       tried_ids=frozenset())
    user = build_prompt(ctx).user
    assert "- quant_candidate: one of none, hub:hugging-quants/" in user
    assert "  - rtn-w8a8: w8a8_int8, 8-bit; ~5.5 min to write before its boot" in user
    assert "(simulated) written here by round-to-nearest" in user
    assert "(simulated) pre-quantized on the Hub (awq, group 128" in user


def test_a_dry_run_serves_candidates_and_counts_their_prepare_time(
        tmp_path: Path, small_workload: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`tune --dry-run --start-layer 2` with an LLM agent (a fake on 127.0.0.1) that picks
    candidates from the prompt's list, as it would on a real run: a checkpoint forge
    writes is charged its prepare time once, a Hub sibling none, and the time counts in
    the run's spent budget."""
    from aevyra_forge.core.recipe import recipe_from_dict
    from aevyra_forge.loop.state import LoopState
    from aevyra_forge.store.run_store import read_records
    from tests.fake_provider import FakeProvider, Recorded, Reply, proposal
    wanted = ["rtn-w8a8", "cal-w8a8", "hub:RedHatAI/Llama-3.1-8B-Instruct-quantized.w8a8"]
    prompts: list[str] = []

    def agent(rec: Recorded) -> Reply:
        prompts.append(rec.last_user)
        name = wanted.pop(0) if wanted else None
        return Reply(proposal({"quant_candidate": name} if name else {}, 2,
                              rationale=f"try {name}"))

    run_dir = tmp_path / ".forge"
    with FakeProvider(agent) as fake:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-sim-layer2")
        code, _, err = run_cli(["tune", "--dry-run", "--model", MODEL_8B, "--workload",
                                str(small_workload), "--llm", "openai/gpt-4o-mini",
                                "--llm-base-url", fake.openai_url, "--start-layer", "2",
                                "--skip-kernel", "--max-experiments", "4", "--gpu",
                                "A100-80GB", "--run-dir", str(run_dir)], capsys)
    assert code == 0, err
    assert "(simulated) Hub siblings of meta-llama/Llama-3.1-8B-Instruct: " in err
    assert "(simulated) layer 2 candidates: hub:" in err
    assert "  - cal-w8a8: w8a8_int8, 8-bit; ~32.8 min to write" in prompts[0]
    (run,) = sorted((run_dir / "runs").glob("0*"))
    records = read_records(run)
    assert [r.status for r in records] == ["ok"] * 4, err
    rtn, cal, hub = records[1:]
    assert rtn.recipe["quant"]["checkpoint"] == str(sim_layer2.SIM_FOLDER / "rtn-w8a8")
    assert rtn.prepare_s == pytest.approx(layer2.RTN_FIXED_S + layer2.RTN_S_PER_GB * 16.06,
                                          abs=0.01)
    assert cal.prepare_s is not None and cal.prepare_s > rtn.prepare_s
    assert hub.recipe["quant"]["checkpoint"] == "RedHatAI/Llama-3.1-8B-Instruct-quantized.w8a8"
    assert hub.prepare_s == pytest.approx(8e9 * quant.facts("w8a8_int8").bytes_per_param
                                          / sim_layer2.SIM_DOWNLOAD_BYTES_S, rel=0.05)
    spent = LoopState(records=records, baseline=recipe_from_dict(records[0].recipe)).spent_s()
    assert spent == pytest.approx(sum((r.prepare_s or 0) + (r.boot_s or 0) + (r.bench_s or 0)
                                      for r in records))
    assert spent > rtn.prepare_s + cal.prepare_s


def test_no_candidates_without_layer_two(small_workload: Path) -> None:
    from aevyra_forge.core.settings import TuneSettings
    from aevyra_forge.loop.quant_setup import offer
    settings = TuneSettings(model=MODEL_8B, workload=str(small_workload), dry_run=True,
                            skip_quant=True)
    space = _space("H100")
    assert offer(settings, space, None, lambda _: None, lambda _: "vllm") is None
    assert space.quant_candidates == ()
    with_layer_two = settings.model_copy(update={"skip_quant": False})
    assert isinstance(offer(with_layer_two, space, None, lambda _: None, lambda _: "vllm"),
                      sim_layer2.SimPreparer)
    assert space.quant_candidates


def test_an_avx2_cpu_is_offered_no_four_bit_copy() -> None:
    """The table's CPU gates hold for the simulated Hub too: 4-bit needs AVX-512 + BF16."""
    cpu = Hardware(device="cpu", cpu_cores=2, memory_gib=16, cpu_isa=("avx2",))
    found = sim_layer2.hub_answer(MODEL_8B, 8e9, cpu)
    assert [s.method for s in found.siblings] == ["fp8", "w8a8_int8"]
    assert len(found.skipped) == 2 and all("this CPU lacks avx512_bf16 + avx512f" in why
                                           for why in found.skipped)
