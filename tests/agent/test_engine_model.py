"""The builtin strategy's model of vLLM: the simulator on a workload shaped like the run's,
calibrated on the reference's measured throughput, with an uncertainty that grows when
its predictions miss; the strategy ranks moves by it, and falls back to its playbook
where there is no model (the CPU build)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aevyra_forge.agent import AgentContext, Budget, BuiltinStrategy
from aevyra_forge.agent.engine_model import EngineModel, _workload
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import ExperimentRecord, Hardware, LaunchFailure, Proposal
from aevyra_forge.core.workload import Workload, load_workload, ngram_repetition
from aevyra_forge.decide.diagnosis import diagnose
from aevyra_forge.engine.sim.engine import SimulatedEngine
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import load_playbook
from tests.conftest import MODEL_8B, SAMPLE_WORKLOAD

WORKLOAD = load_workload(SAMPLE_WORKLOAD)
CONCURRENCY = 8


def _space(gpu: str = "A100-80GB") -> KnobSpace:
    return KnobSpace(gpu_spec(gpu).hardware(), profile(MODEL_8B), simulated=True)


def _measure(space: KnobSpace, recipe: Recipe, tmp_path: Path, workload: Workload = WORKLOAD
             ) -> float:
    """Noise-free throughput of `recipe` on the real workload: what a measurement says."""
    spec = gpu_spec(space.hw.gpu.name if space.hw.gpu else "A100-80GB")
    sim = SimulatedEngine(space.hw, spec, space.model, space, noise_cv=0.0)
    server = sim.launch(recipe, tmp_path / "m.log")
    assert not isinstance(server, LaunchFailure)
    out = sim.bench(server, workload, CONCURRENCY)
    assert out.metrics is not None
    return out.metrics.output_throughput


def _baseline(space: KnobSpace, tmp_path: Path, measured_scale: float = 1.0
              ) -> ExperimentRecord:
    """The baseline's record, as the loop writes it, measured at `measured_scale` times
    what the simulator says (a host the simulator does not know exactly)."""
    base = space.baseline(MODEL_8B)
    spec = gpu_spec("A100-80GB")
    sim = SimulatedEngine(space.hw, spec, space.model, space, noise_cv=0.0)
    server = sim.launch(base, tmp_path / "b.log")
    assert not isinstance(server, LaunchFailure)
    out = sim.bench(server, WORKLOAD, CONCURRENCY)
    assert out.metrics is not None
    metrics = out.metrics.model_copy(update={
        "output_throughput": out.metrics.output_throughput * measured_scale})
    return ExperimentRecord(
        exp=0, recipe=base.to_dict(), recipe_id=base.id, parent_id=None, generation=0,
        layer=1, status="ok", metrics=metrics, passes=(metrics,), score=1.0, kept=True,
        started_at="t", finished_at="t",
        diagnosis=diagnose("ok", "", metrics, base, space, WORKLOAD.stats, CONCURRENCY))


def _ctx(space: KnobSpace, history: list[ExperimentRecord], layer: int = 1) -> AgentContext:
    return AgentContext(hardware=space.hw, workload=WORKLOAD.stats, layer=layer,  # type: ignore[arg-type]
                        space=space, best=space.baseline(MODEL_8B), best_score=1.0,
                        history=tuple(history), playbook=load_playbook(),
                        budget=Budget(10, 1.0, None),
                        tried_ids=frozenset(r.recipe_id for r in history))


def test_the_models_workload_has_the_runs_shape() -> None:
    model_workload = _workload(_ctx(_space(), []))
    stats, real = model_workload.stats, WORKLOAD.stats
    assert stats.input_tokens.mean == pytest.approx(real.input_tokens.mean, rel=0.05)
    assert stats.output_tokens.mean == pytest.approx(real.output_tokens.mean, rel=0.05)
    assert stats.shared_prefix_fraction == pytest.approx(real.shared_prefix_fraction, abs=0.05)
    texts = [r.text for r in model_workload.requests]
    assert ngram_repetition(texts) == pytest.approx(real.ngram_repetition, abs=0.05)


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.7])
def test_calibration_makes_the_reference_predict_what_it_measured(tmp_path: Path,
                                                                  scale: float) -> None:
    space = _space()
    record = _baseline(space, tmp_path, measured_scale=scale)
    assert record.metrics is not None
    model = EngineModel(_ctx(space, [record]), CONCURRENCY, record.metrics.output_throughput)
    predicted = model.throughput(space.baseline(MODEL_8B))
    assert predicted == pytest.approx(record.metrics.output_throughput, rel=0.03)


def test_uncertainty_grows_when_a_prediction_missed(tmp_path: Path) -> None:
    space = _space()
    record = _baseline(space, tmp_path)
    assert record.metrics is not None
    child = space.apply(space.baseline(MODEL_8B), {"max_num_seqs": 16})
    model = EngineModel(_ctx(space, [record]), CONCURRENCY, record.metrics.output_throughput)
    predicted = model.throughput(child) / model.throughput(space.baseline(MODEL_8B))
    quiet = model.uncertainty(0.0)

    def measured(score: float) -> ExperimentRecord:
        return ExperimentRecord(
            exp=1, recipe=child.to_dict(), recipe_id=child.id, parent_id=record.recipe_id,
            generation=1, layer=1, status="ok", score=score, started_at="t",
            finished_at="t", proposal=Proposal(rationale="t", layer=1,
                                               changes={"max_num_seqs": 16}))
    model.ctx = _ctx(space, [record, measured(predicted)])
    right = model.uncertainty(0.0)
    model.ctx = _ctx(space, [record, measured(predicted * 1.5)])
    wrong = model.uncertainty(0.0)
    assert right < quiet < wrong


def test_the_strategy_proposes_the_move_that_pays_most(tmp_path: Path) -> None:
    """Measured on the real workload, noise-free, the model's first pick in the quant
    layer is its best move that keeps accuracy (the playbook's order would not know)."""
    space = _space()
    record = _baseline(space, tmp_path)
    proposal = BuiltinStrategy().propose(_ctx(space, [record], layer=2)).proposal
    assert proposal is not None and "model of vLLM" in proposal.rationale
    base = space.baseline(MODEL_8B)
    spec = gpu_spec("A100-80GB")
    sim = SimulatedEngine(space.hw, spec, space.model, space, noise_cv=0.0)
    gains = {}
    for knob in space.knobs(2):
        for value in space.grid(knob):
            recipe = space.apply(base, {knob.name: value})
            server = sim.launch(recipe, tmp_path / "g.log")
            if recipe.id == base.id or isinstance(server, LaunchFailure) \
                    or sim.agreement(server) < 0.99:
                continue
            gains[(knob.name, value)] = _measure(space, recipe, tmp_path)
    [(name, value)] = proposal.changes.items()
    assert gains[(name, value)] == max(gains.values())


def test_without_a_model_of_the_hardware_the_playbook_leads(tmp_path: Path) -> None:
    cpu = KnobSpace(Hardware(device="cpu", cpu_cores=4, memory_gib=32.0), profile(MODEL_8B),
                    simulated=True)
    record = _baseline(_space(), tmp_path).model_copy(
        update={"recipe": cpu.baseline(MODEL_8B).to_dict(),
                "recipe_id": cpu.baseline(MODEL_8B).id})
    proposal = BuiltinStrategy().propose(_ctx(cpu, [record])).proposal
    assert proposal is not None and "model of vLLM" not in proposal.rationale


def test_a_layer_of_small_gains_escalates_when_a_later_one_offers_far_more(
        tmp_path: Path) -> None:
    """On the sample workload the best config move is worth a few percent, a quantization
    far more: layers are not revisited, so layer 1 hands over at once."""
    space = _space()
    record = _baseline(space, tmp_path)
    assert BuiltinStrategy().propose(_ctx(space, [record], layer=1)).proposal is None
    later = BuiltinStrategy().propose(_ctx(space, [record], layer=2)).proposal
    assert later is not None and "quant_method" in later.changes
    # control: the playbook-and-search strategy does not look ahead
    assert BuiltinStrategy(use_model=False).propose(
        _ctx(space, [record], layer=1)).proposal is not None
