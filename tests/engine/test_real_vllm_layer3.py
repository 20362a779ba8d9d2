"""Real vLLM (the CPU build) for the wider search space: the sample kernel plug-in
(examples/forge_kernel_demo) installed into a temporary folder on PYTHONPATH (the shared
vLLM environment is not touched) is discovered, proposed in layer 3, proven to run in the
server processes, measured and kept or reverted by `aevyra-forge tune --device cpu`; and
n-gram speculative decoding boots and serves.

Run with `pytest -m engine` under the engine lock (CONTRIBUTING.md); each boot takes
30-90 s on two cores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aevyra_forge.core.values import Hardware, LaunchFailure
from aevyra_forge.core.workload import load_workload
from aevyra_forge.engine.launcher import VllmLauncher
from aevyra_forge.engine.vllm_bench import VllmBenchmarker
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import bundled_path
from aevyra_forge.space.rendering import render
from tests.builders import install_demo_plugin

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
              "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
FIGURES: dict[str, object] = {}
PROOF_PID = re.compile(r"forge-kernel-demo: registered.*\(pid (\d+)\)")


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = [{"prompt": f"Story {i}: once upon a time " * 3, "expected_output_tokens": 24}
             for i in range(8)]
    path = tmp_path_factory.mktemp("wl") / "workload.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module", autouse=True)
def engine_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ENGINE_ENV}
    os.environ.update(ENGINE_ENV)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _playbook(tmp_path: Path, move: str) -> Path:
    """The bundled playbook with `move` as the only first move."""
    text = bundled_path().read_text()
    head, rest = text.split("## What to try first", 1)
    tail = rest[rest.index("\n## "):]
    path = tmp_path / "playbook.md"
    path.write_text(f"{head}## What to try first\n\n1. {move} — the sample plug-in.\n{tail}")
    return path


def test_the_sample_kernel_plugin_end_to_end(vllm_bin: str, tiny_model: Path, workload: Path,
                                             tmp_path: Path) -> None:
    site = install_demo_plugin(tmp_path / "site")
    run_dir = tmp_path / ".forge"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    proc = subprocess.run(
        [sys.executable, "-m", "aevyra_forge", "tune", "--device", "cpu", "--model",
         str(tiny_model), "--workload", str(workload), "--llm", "builtin",
         "--start-layer", "3", "--max-experiments", "2", "--concurrency", "4",
         "--repeats", "3",
         "--playbook", str(_playbook(tmp_path, "`kernel_plugin=demo_cpu_attn`")),
         "--run-dir", str(run_dir), "--vllm-bin", vllm_bin],
        capture_output=True, text=True,
        env={**env, "COLUMNS": "200", "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kernel plug-in candidates for layer 3: demo_cpu_attn" in proc.stdout + proc.stderr
    (run,) = sorted((run_dir / "runs").glob("0*"))
    base, trial = [json.loads(x) for x in (run / "experiments.jsonl").read_text().splitlines()]
    assert trial["layer"] == 3 and trial["proposal"]["changes"] == {
        "kernel_plugin": "demo_cpu_attn"}
    assert trial["recipe"]["kernel"]["env"] == {"VLLM_PLUGINS": "forge_kernel_demo",
                                                "FORGE_KERNEL_DEMO": "1"}
    assert base["status"] == "ok" and trial["status"] == "ok", trial["reason"]
    assert trial["accuracy"] is not None and trial["decision"]
    base_log, trial_log = ((run / r["log"]).read_text() for r in (base, trial))
    assert "forge-kernel-demo" not in base_log  # installed, not chosen: never loaded
    pids = set(PROOF_PID.findall(trial_log))
    assert len(pids) >= 2, trial_log[-3000:]  # the API server and the engine's processes
    assert "forge-kernel-demo: attention kernel ran" in trial_log
    FIGURES["kernel_plugin"] = {"registered_in_pids": len(pids), "kept": trial["kept"],
                                "decision": trial["decision"],
                                "scores": [base["score"], trial["score"]]}


def test_ngram_speculative_decoding_boots_and_serves(vllm_bin: str, tiny_model: Path,
                                                     workload: Path, tmp_path: Path) -> None:
    hw_space = KnobSpace(Hardware(device="cpu", cpu_cores=2, memory_gib=8),
                         profile(str(tiny_model)), simulated=True)
    base = hw_space.baseline(str(tiny_model))
    recipe = hw_space.apply(hw_space.apply(base, {"max_model_len": 1024}),
                            {"spec_method": "ngram"})
    assert render(recipe)[0][-4:] == ["--spec-method", "ngram", "--spec-tokens", "3"]
    launcher = VllmLauncher(vllm_bin, boot_timeout_s=300)
    server = launcher.launch(recipe, tmp_path / "ngram.log")
    assert not isinstance(server, LaunchFailure), server
    try:
        wl = load_workload(workload)
        outcome = VllmBenchmarker().bench(server, wl, concurrency=2, passes=1)
        text = httpx.get(server.url + "/metrics", timeout=30).text
    finally:
        launcher.stop(server)
    assert outcome.status == "ok", outcome.reason
    assert outcome.metrics is not None
    assert outcome.metrics.output_tokens == sum(r.expected_output_tokens for r in wl.requests)
    drafts = _counter(text, "vllm:spec_decode_num_drafts_total")
    assert drafts > 0, "the server never ran a speculative step"
    FIGURES["ngram"] = {"boot_s": round(server.boot_s, 1),
                        "output_tok_s": round(outcome.metrics.output_throughput, 1),
                        "drafts": drafts,
                        "accepted": _counter(text, "vllm:spec_decode_num_accepted_tokens_total"),
                        "draft_tokens": _counter(text, "vllm:spec_decode_num_draft_tokens_total")}


def _counter(text: str, name: str) -> float:
    """A counter summed over its label sets, from Prometheus text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))
