"""Shared fixtures: small workloads written to tmp_path and the repository paths."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from aevyra_forge.cli import main

# Nothing is downloaded at test time: real (non-dry) runs look on the Hub for quantized
# siblings, so the suite and the processes it starts run offline; tests/space/test_hub.py
# turns it back on for its fake Hub on 127.0.0.1.
os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_WORKLOAD = ROOT / "examples" / "sample_workload.jsonl"
MODEL_8B = "meta-llama/Llama-3.1-8B-Instruct"


# The tiny Llama trained 300 steps on the standard library (aevyra_forge/testing/trained.py:
# minutes to train, so it is shipped, ~4.6 MB). Regenerate it with vLLM's environment:
# `.venv-vllm/bin/python -m aevyra_forge.testing.trained tests/data/tiny-trained`.
TRAINED_TINY = ROOT / "tests" / "data" / "tiny-trained"


@pytest.fixture
def trained_tiny(tmp_path: Path) -> Path:
    """A copy of the trained tiny Llama (engine tests serve and quantize it; the copy keeps
    the shipped folder as it is)."""
    out = tmp_path / "tiny-trained"
    shutil.copytree(TRAINED_TINY, out)
    return out


@pytest.fixture
def small_workload(tmp_path: Path) -> Path:
    """Twelve requests, a third sharing a long system prompt."""
    system = "You answer questions about the Orbit data platform. " * 40
    lines = []
    for i in range(12):
        if i % 3 == 0:
            lines.append({"messages": [{"role": "system", "content": system},
                                       {"role": "user", "content": f"Question {i}?"}],
                          "expected_output_tokens": 64})
        else:
            lines.append({"prompt": f"Write a haiku about the number {i}.",
                          "expected_output_tokens": 32 + 8 * i})
    path = tmp_path / "workload.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the command line in process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 0), captured.out, captured.err


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the figures the engine tests measured (boot times, throughput), so CI logs
    carry them."""
    import json
    import sys

    for name, module in list(sys.modules.items()):
        figures = getattr(module, "FIGURES", None)
        if name.rsplit(".", 1)[-1].startswith("test_real_vllm") and figures:
            terminalreporter.write_line(f"engine figures ({name}): "
                                        + json.dumps(figures, indent=1))
