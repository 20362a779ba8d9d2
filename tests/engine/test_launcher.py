"""Tests for aevyra_forge.engine.launcher against tests/data/fake_vllm/vllm (see conftest.py):
booting, proving the server is ours, failing fast with a classified reason, tearing down."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aevyra_forge.core.errors import StoreError
from aevyra_forge.core.recipe import KernelSettings, Recipe
from aevyra_forge.core.values import LaunchFailure
from aevyra_forge.core.workload import Request, Workload
from aevyra_forge.engine import launcher as runner
from aevyra_forge.engine import process
from aevyra_forge.engine.launcher import VllmLauncher, VllmServer, free_port, redact_argv
from aevyra_forge.engine.vllm_bench import VllmBenchmarker
from aevyra_forge.measure.accuracy import VllmQualityProbe
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


def test_a_fixed_served_model_name_is_what_the_server_answers_to(
        tmp_path: Path, pidfile: Path) -> None:
    launcher = make_launcher(pidfile)
    recipe = Recipe(model=MODEL, config={"served_model_name": "chat-prod"})
    server = launcher.launch(recipe, tmp_path / "exp.log")
    assert isinstance(server, VllmServer), server
    try:
        assert server.served_model == "chat-prod"  # healthy only once it lists that name
        workload = Workload(path="mem.jsonl", sha256="0" * 64, requests=(
            Request(line=1, prompt="hello there", expected_output_tokens=3),))
        outcome = VllmBenchmarker(request_timeout_s=10.0, warmup_requests=0).bench(
            server, workload, 1)
    finally:
        launcher.stop(server)
    assert outcome.status == "ok", outcome.reason
    first = (tmp_path / "exp.log").read_text().splitlines()[0]
    assert first.count("--served-model-name") == 1 and "--served-model-name chat-prod" in first


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
    assert result.reason.startswith("context too long: ValueError: To serve at least one "
                                    "request with the models's max seq len (131072)")
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


# -- what the child inherits, and the server's API key ---------------------------------------

def _dumping_wrapper(tmp_path: Path) -> tuple[Path, Path]:
    """A `vllm` that writes the environment it was given to a file, then runs the fake."""
    dump = tmp_path / "child.env"
    wrapper = tmp_path / "vllm"
    wrapper.write_text(f'#!/bin/sh\nenv > "{dump}"\nexec "{FAKE_BIN}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, dump


def test_the_child_gets_the_allow_list_and_the_server_key_is_sent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GROQ_API_KEY"):
        monkeypatch.setenv(name, f"provider-secret-{name}")
    monkeypatch.setenv("MY_DATABASE_URL", "postgres://me:pw@db")
    monkeypatch.setenv("HF_TOKEN", "hf-token-for-gated-models")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("VLLM_API_KEY", "server-key-123")  # the fake then demands it
    wrapper, dump = _dumping_wrapper(tmp_path)
    launcher = VllmLauncher(str(wrapper), boot_timeout_s=15.0, health_poll_s=0.05)
    log = tmp_path / "exp_000.log"
    server = launcher.launch(Recipe(model=MODEL, kernel=KernelSettings(
        env={"VLLM_CPU_KVCACHE_SPACE": "4"})), log)
    assert isinstance(server, VllmServer), server  # readiness sent the key
    try:
        workload = Workload(path="w.jsonl", sha256="0" * 64, requests=tuple(
            Request(line=i, prompt=f"tell me about item {i}", expected_output_tokens=4)
            for i in range(1, 4)))
        outcome = VllmBenchmarker(request_timeout_s=10.0, bench_timeout_s=30.0,
                                  warmup_requests=1).bench(server, workload, 2)
        reference = VllmQualityProbe(workload, samples=2).reference(server)
    finally:
        launcher.stop(server)
    assert outcome.status == "ok" and outcome.metrics is not None
    assert (outcome.metrics.completed, outcome.metrics.failed) == (3, 0)
    assert reference is not None  # the accuracy probe sent it too
    child = dict(line.split("=", 1) for line in dump.read_text().splitlines()
                 if "=" in line)
    assert not {"ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GROQ_API_KEY",
                "MY_DATABASE_URL"} & child.keys()
    assert child["HF_TOKEN"] == "hf-token-for-gated-models"
    assert child["CUDA_VISIBLE_DEVICES"] == "0"
    assert child["VLLM_API_KEY"] == "server-key-123"
    assert child["VLLM_CPU_KVCACHE_SPACE"] == "4"  # the recipe's own environment
    assert "PATH" in child
    assert "server-key-123" not in log.read_text()
    assert "server-key-123" not in repr(server)


def test_a_server_refusing_our_key_fails_at_once(tmp_path: Path) -> None:
    with FakeVllm(FakeConfig(model=MODEL, api_key="the-right-key")) as fake:
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                 stdin=subprocess.PIPE)
        try:
            server = VllmServer(url=fake.url, served_model=MODEL, boot_s=0.0,
                                process=child, log_path=tmp_path / "exp.log",
                                api_key="a-wrong-key")
            launcher = VllmLauncher("vllm", boot_timeout_s=600.0)
            failure = launcher._wait_healthy(server, launcher.clock())
            server.api_key = "the-right-key"
            assert launcher._wait_healthy(server, launcher.clock()) is None
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait()
    assert isinstance(failure, LaunchFailure)
    assert failure.status == "boot_failed"
    assert "refused our API key (HTTP 401 on /v1/models)" in failure.reason
    assert [r.headers.get("authorization") for r in fake.requests
            if r.path == "/v1/models"] == ["Bearer a-wrong-key", "Bearer the-right-key"]


def test_api_key_flag_wins_and_is_never_logged() -> None:
    cmd = ["vllm", "serve", "m", "--api-key", "flag-key"]
    assert runner._api_key(cmd, {"VLLM_API_KEY": "env-key"}) == "flag-key"
    assert runner._api_key(["vllm", "--api-key=eq-key"], {}) == "eq-key"
    assert runner._api_key(["vllm"], {"VLLM_API_KEY": "env-key"}) == "env-key"
    assert runner._api_key(["vllm"], {"VLLM_API_KEY": ""}) is None
    assert redact_argv([*cmd, "--api-key=eq-key"]) == [
        "vllm", "serve", "m", "--api-key", "REDACTED", "--api-key=REDACTED"]


def test_a_rerun_keeps_the_interrupted_attempts_log(tmp_path: Path, pidfile: Path,
                                                     recipe: Recipe) -> None:
    launcher = make_launcher(pidfile)
    log = tmp_path / "logs" / "exp_003.log"
    for _ in range(3):  # the first two stand for attempts cut short by a kill
        server = launcher.launch(recipe, log)
        assert isinstance(server, VllmServer), server
        launcher.stop(server)
    earlier = sorted(p.name for p in log.parent.iterdir())
    assert earlier == ["exp_003.attempt1.log", "exp_003.attempt2.log", "exp_003.log"]
    for name in earlier:
        text = (log.parent / name).read_text()
        assert text.startswith(f"# {FAKE_BIN} serve {MODEL} ")
        assert text.count("\n# ") == 0  # one attempt per file


def test_a_full_disk_for_the_server_log_is_one_line(tmp_path: Path, pidfile: Path,
                                                    recipe: Recipe,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: Path, *args: object, **kwargs: object) -> object:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "open", full)
    log = tmp_path / "exp_001.log"
    with pytest.raises(StoreError, match=r"exp_001\.log: No space left on device while "
                                         r"writing the server log; free space .* tune resume"):
        make_launcher(pidfile).launch(recipe, log)
    assert not pidfile.exists()  # nothing was started


class _Recorder:
    """Keeps what the launcher reports, and whether the server was up when it did."""

    def __init__(self, fail: bool = False) -> None:
        self.events: list[tuple[str, process.ServerGroup, bool]] = []
        self.fail = fail

    def launched(self, group: process.ServerGroup, log_path: Path) -> None:
        self.events.append(("launched", group, process.ours(group) != []))
        if self.fail:
            raise StoreError("disk full")

    def gone(self, group: process.ServerGroup) -> None:
        self.events.append(("gone", group, process.group_alive(group.pgid)))


def test_each_server_group_is_recorded_before_it_serves_and_when_gone(
        tmp_path: Path, pidfile: Path, recipe: Recipe) -> None:
    launcher = make_launcher(pidfile)
    launcher.recorder = recorder = _Recorder()
    server = launcher.launch(recipe, tmp_path / "exp_000.log")
    assert isinstance(server, VllmServer), server
    ((event, group, alive),) = recorder.events  # recorded while booting, before the bench
    assert (event, alive) == ("launched", True)
    assert group.pgid == server.pgid and group.start_time == process.start_time(server.pgid)
    assert group.port == int(server.url.rsplit(":", 1)[1])
    launcher.stop(server)
    assert recorder.events[1] == ("gone", group, False)  # after the whole group is gone
    failed = launcher.launch(Recipe(model=MODEL, config={"gpu_memory_utilization": 0.99}),
                             tmp_path / "exp_001.log")
    assert isinstance(failed, LaunchFailure)
    assert [e for e, _, _ in recorder.events[2:]] == ["launched", "gone"]


def test_a_server_that_cannot_be_recorded_is_stopped(tmp_path: Path, pidfile: Path,
                                                     recipe: Recipe) -> None:
    launcher = make_launcher(pidfile)
    launcher.recorder = _Recorder(fail=True)
    with pytest.raises(StoreError, match="disk full"):
        launcher.launch(recipe, tmp_path / "exp_000.log")
    ((_, group, _),) = launcher.recorder.events
    assert not process.group_alive(group.pgid) and group.pgid not in process._LIVE
