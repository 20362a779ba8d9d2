"""The trained tiny model: its corpus is the interpreter's own library (no download), and
training is deterministic (two runs write the same bytes) and learns (the loss falls).
Training runs in vLLM's environment, which has torch; those tests are engine tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from aevyra_forge.testing import trained

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def test_the_corpus_is_the_standard_library_in_a_fixed_order() -> None:
    text = trained.corpus(200_000)
    assert len(text) == 200_000 and text == trained.corpus(200_000)
    assert "def " in text and "import " in text


@pytest.mark.engine
def test_training_is_deterministic_and_learns(tmp_path: Path) -> None:
    if not VLLM_PYTHON.exists():
        pytest.skip("needs .venv-vllm (scripts/setup_vllm_cpu.sh)")
    outputs = []
    for name in ("a", "b"):
        done = subprocess.run(
            [str(VLLM_PYTHON), "-m", "aevyra_forge.testing.trained", str(tmp_path / name),
             "--steps", "6"], cwd=ROOT, check=True, capture_output=True, text=True)
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = outputs
    assert first["last_loss"] < first["first_loss"]
    assert first["last_loss"] == second["last_loss"]
    a, b = ((tmp_path / n / "model.safetensors").read_bytes() for n in "ab")
    assert a == b
