"""Tests for aevyra_forge.engine.launcher against tests/data/fake_vllm/vllm (see conftest.py):
booting, proving the server is ours, failing fast with a classified reason, tearing down."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import LaunchFailure
from aevyra_forge.engine import launcher as runner
from aevyra_forge.engine import process
from aevyra_forge.engine.launcher import VllmLauncher, VllmServer, free_port
from tests.engine.conftest import FAKE_BIN, MODEL, engine_pid, gone, make_launcher
from tests.fake_vllm import FakeConfig, FakeVllm


def test_boot_and_stop(tmp_path: Path, pidfile: Path, recipe: Recipe) -> None:
    launcher = make_launcher(pidfile)
    log = tmp_path / "logs" / "exp_001.log"
    server = launcher.launch(recipe, log)
    assert isinstance(server, VllmServer), server
    assert server.alive() and server.boot_s > 0
    first = log.read_text().splitlines()[0]
    assert first.startswith(f"# {FAKE_BIN} serve {MODEL} ")
    assert "--no-enable-prefix-caching --max-num-seqs 64" in first
    assert f"--host 127.0.0.1 --port {server.url.rsplit(':', 1)[1]}" in first
    child = engine_pid(pidfile)
    launcher.stop(server)
    assert server.process.returncode is not None
    assert gone(child)
    assert server.pgid not in process._LIVE


def test_invalid_argument_fails_fast(tmp_path: Path, pidfile: Path) -> None:
    launcher = make_launcher(pidfile)
    bad = Recipe(model=MODEL, config={"num_scheduler_steps": 8})  # a removed V0 flag
    result = launcher.launch(bad, tmp_path / "exp.log")
    assert isinstance(result, LaunchFailure)
    assert result.status == "boot_failed"
    assert result.reason == ("invalid argument: vllm serve: error: unrecognized arguments: "
                             "--num-scheduler-steps 8")
    assert result.boot_s < 5.0


def test_context_too_long_names_the_largest_that_fits(tmp_path: Path, pidfile: Path
                                                      ) -> None:
    launcher = make_launcher(pidfile)
    result = launcher.launch(Recipe(model=MODEL, config={"max_model_len": 131072}),
                             tmp_path / "exp.log")
    assert isinstance(result, LaunchFailure)
    assert result.status == "boot_failed"
    assert result.suggested_max_model_len == 76464
    assert result.reason.startswith("ValueError: To serve at least one request with the "
                                    "models's max seq len (131072)")
    assert gone(engine_pid(pidfile))


def test_out_of_memory(tmp_path: Path, pidfile: Path) -> None:
    launcher = make_launcher(pidfile)
    result = launcher.launch(Recipe(model=MODEL, config={"gpu_memory_utilization": 0.99}),
                             tmp_path / "exp.log")
    assert isinstance(result, LaunchFailure)
    assert result.status == "oom"
    assert result.reason.startswith("out of memory: torch.OutOfMemoryError: CUDA out of "
                                    "memory. Tried to allocate 1.96 GiB.")


def test_never_healthy_times_out_and_kills_the_group(tmp_path: Path, pidfile: Path
                                                     ) -> None:
    launcher = make_launcher(pidfile, boot_timeout_s=1.0, FAKE_VLLM_NEVER_HEALTHY="1")
    start = time.monotonic()
    result = launcher.launch(Recipe(model=MODEL), tmp_path / "exp.log")
    assert isinstance(result, LaunchFailure)
    assert result.status == "timeout"
    assert result.reason.startswith("not healthy after 1 s; last log line: ")
    assert 1.0 <= result.boot_s < 5.0
    assert time.monotonic() - start < 8.0
    assert gone(engine_pid(pidfile))


def test_a_port_held_by_another_server_is_not_taken_for_ours(
        tmp_path: Path, pidfile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeVllm(FakeConfig(model="someone/else")) as other:
        ports = iter([other.port, free_port()])  # lose the race for the first port
        monkeypatch.setattr(runner, "free_port", lambda: next(ports))
        launcher = make_launcher(pidfile, FAKE_VLLM_BOOT_S="0.3")
        log = tmp_path / "exp.log"
        server = launcher.launch(Recipe(model=MODEL), log)
        assert isinstance(server, VllmServer), server
        try:
            assert server.url != other.url
            asked = [r.path for r in other.requests]
            assert "/v1/models" in asked  # it answered /health, and was turned down
        finally:
            launcher.stop(server)
    text = log.read_text()
    assert "OSError: [Errno 98] Address already in use" in text
    assert len([ln for ln in text.splitlines() if ln.startswith("# ")]) == 2  # two tries


def test_missing_binary(tmp_path: Path) -> None:
    launcher = VllmLauncher(str(tmp_path / "no-such-vllm"), boot_timeout_s=1.0)
    result = launcher.launch(Recipe(model=MODEL), tmp_path / "exp.log")
    assert isinstance(result, LaunchFailure)
    assert result.status == "boot_failed"
    assert result.reason.startswith(f"cannot run {tmp_path / 'no-such-vllm'}: ")


def test_stop_waits_for_memory_release(tmp_path: Path, pidfile: Path) -> None:
    readings = iter([1000, 30000, 30000, 1200, 1100])
    launcher = make_launcher(pidfile)
    launcher.memory_used_mib = lambda: next(readings)
    server = launcher.launch(Recipe(model=MODEL), tmp_path / "exp.log")  # reads 1000
    assert isinstance(server, VllmServer), server
    launcher.stop(server)  # 30000, 30000, then 1200 is within the slack of 1000
    assert next(readings) == 1100
