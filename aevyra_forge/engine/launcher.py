"""Booting and tearing down `vllm serve` the way a careful engineer would: a free port
on 127.0.0.1, its own process group (so the EngineCore child dies with it), a health
deadline, proof that the server answering is ours, failures classified from the exit code
and the log tail, and a teardown that waits until the memory is released."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import functools
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from aevyra_forge.core.recipe import Recipe, render
from aevyra_forge.core.slo import Slo
from aevyra_forge.core.values import BenchMetrics, BenchOutcome, LaunchFailure, Status
from aevyra_forge.core.workload import Workload
from aevyra_forge.measure.client import BenchConfig, bench_passes, median_pass, parse_metrics

WARMUP_SLOTS = 8  # most untimed warm-up requests sent before the first timed pass
BOOT_TIMEOUT_S = 900.0  # first boots compile; CUDA-graph capture alone can take a minute
HEALTH_POLL_S = 1.0
TERM_GRACE_S = 30.0  # SIGTERM -> SIGKILL
RELEASE_TIMEOUT_S = 60.0  # waiting for the GPU memory to come back after teardown
RELEASE_SLACK_MIB = 512
LOG_TAIL_LINES = 60
PORT_ATTEMPTS = 3  # another process can take the free port before vLLM binds it
DEATH_GRACE_S = 2.0  # a server refusing connections is given this long to be reaped
DEFAULT_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
_PR_SET_PDEATHSIG = 1

_LIVE: dict[int, subprocess.Popen[bytes]] = {}  # pgid -> server process, for exit cleanup


@dataclass
class VllmServer:
    """A live `vllm serve` we started."""

    url: str
    served_model: str
    boot_s: float
    process: subprocess.Popen[bytes]
    log_path: Path
    pgid: int = field(init=False)

    def __post_init__(self) -> None:
        self.pgid = self.process.pid  # start_new_session: the pid leads its group

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# -- failure classification -------------------------------------------------------------

_MAX_LEN = re.compile(r"maximum model length is (\d+)")
_OOM = re.compile(r"OutOfMemoryError|CUDA out of memory|HIP out of memory|"
                  r"No available memory for the cache blocks|Cannot allocate memory|"
                  r"larger than the available KV cache memory|insufficient memory|"
                  r"less than desired [GC]PU memory utilization", re.IGNORECASE)
_ARG = re.compile(r"error: (unrecognized arguments|argument |invalid choice|"
                  r"the following arguments are required)")
_ERROR_LINE = re.compile(r"(\w+(Error|Exception)\b.*|error: .*)")
_WRAPPER = re.compile(r"See root cause above")  # vLLM's re-raise; the cause is earlier
_PORT_TAKEN = re.compile(r"address already in use", re.IGNORECASE)


def classify(exit_code: int | None, tail: str) -> tuple[Status, str, int | None]:
    """(status, one-line reason, suggested max_model_len) for a server that died."""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    suggested = None
    match = None
    for ln in reversed(lines):
        match = _MAX_LEN.search(ln)
        if match:
            suggested = int(match.group(1))
            return "boot_failed", _one_line(ln), suggested
    for ln in reversed(lines):
        if _ARG.search(ln):
            return "boot_failed", "invalid argument: " + _one_line(ln), None
    for ln in reversed(lines):
        if _OOM.search(ln):
            return "oom", "out of memory: " + _one_line(ln), None
    for ln in reversed(lines):
        m = _ERROR_LINE.search(ln)
        if m and not _WRAPPER.search(ln):
            return "crash", _one_line(m.group(0)), None
    code = f"exit code {exit_code}"
    if exit_code is not None and exit_code < 0:
        code = f"killed by {_signal_name(-exit_code)}"
    return "crash", f"vLLM exited ({code}) without an error message; see the log", None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"^.*?(ERROR|WARNING|INFO)\s+\S+\s+\S+\s+\[[^\]]*\]\s*", "", text)
    return " ".join(text.split())[:limit]


# -- launching ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent(parent_pid: int) -> None:
    """In the child: get SIGTERM when forge dies, even by SIGKILL (Linux). The kernel
    sends it when the forking *thread* exits, so launch from the main thread."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # forge died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class VllmLauncher:
    """Boots `<vllm_bin> serve` for a recipe and tears it down completely."""

    def __init__(self, vllm_bin: str, *, boot_timeout_s: float = BOOT_TIMEOUT_S,
                 extra_args: tuple[str, ...] = (), env: Mapping[str, str] | None = None,
                 memory_used_mib: Callable[[], int | None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 health_poll_s: float = HEALTH_POLL_S) -> None:
        self.vllm_bin = vllm_bin
        self.boot_timeout_s = boot_timeout_s
        self.health_poll_s = health_poll_s
        self.extra_args = extra_args
        self.env = dict(os.environ if env is None else env)
        self.memory_used_mib = memory_used_mib
        self.clock = clock
        self._memory_before: int | None = None

    def command(self, recipe: Recipe, port: int) -> tuple[list[str], dict[str, str]]:
        argv, env = render(recipe)
        cmd = [self.vllm_bin, "serve", *argv, "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", recipe.model, *self.extra_args]
        return cmd, {**DEFAULT_ENV, **self.env, **env}

    def launch(self, recipe: Recipe, log_path: Path) -> VllmServer | LaunchFailure:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._memory_before = self.memory_used_mib() if self.memory_used_mib else None
        for attempt in range(PORT_ATTEMPTS):
            result = self._launch_once(recipe, log_path, append=attempt > 0)
            if not (isinstance(result, LaunchFailure) and _PORT_TAKEN.search(result.reason)):
                break
        return result

    def _launch_once(self, recipe: Recipe, log_path: Path, append: bool
                     ) -> VllmServer | LaunchFailure:
        port = free_port()
        cmd, env = self.command(recipe, port)
        start = self.clock()
        with log_path.open("ab" if append else "wb") as log:
            log.write(("# " + " ".join(cmd) + "\n").encode())
            log.flush()
            try:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True,
                                        preexec_fn=functools.partial(_die_with_parent,
                                                                     os.getpid()))
            except OSError as exc:
                return LaunchFailure(status="boot_failed",
                                     reason=f"cannot run {self.vllm_bin}: {exc.strerror}")
        _LIVE[proc.pid] = proc
        server = VllmServer(url=f"http://127.0.0.1:{port}", served_model=recipe.model,
                            boot_s=0.0, process=proc, log_path=log_path)
        failure = self._wait_healthy(server, start)
        if failure is not None:
            self.stop(server)
            return failure
        server.boot_s = self.clock() - start
        return server

    def _wait_healthy(self, server: VllmServer, start: float) -> LaunchFailure | None:
        deadline = start + self.boot_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = server.process.poll()
                if code is not None:
                    status, reason, suggested = classify(code, server.log_tail())
                    return LaunchFailure(status=status, reason=reason,
                                         boot_s=self.clock() - start,
                                         suggested_max_model_len=suggested)
                if self._ours_and_ready(client, server):
                    return None
                if self.clock() > deadline:
                    return LaunchFailure(
                        status="timeout", boot_s=self.clock() - start,
                        reason=f"not healthy after {self.boot_timeout_s:.0f} s; last log "
                               f"line: {_one_line(server.log_tail(1))}")
                time.sleep(self.health_poll_s)  # polling a server we do not control

    @staticmethod
    def _ours_and_ready(client: httpx.Client, server: VllmServer) -> bool:
        """/health answers and /v1/models lists our model, while our child is alive (a
        stray server on a reused port would fail the last two checks)."""
        try:
            if client.get(server.url + "/health").status_code != 200:
                return False
            models = client.get(server.url + "/v1/models").json()
        except (httpx.HTTPError, ValueError):
            return False
        data = models.get("data") if isinstance(models, dict) else None
        ids = {m.get("id") for m in data or [] if isinstance(m, dict)}
        return server.served_model in ids and server.alive()

    def stop(self, server: VllmServer) -> None:
        """Terminate the whole process group, then wait until memory is released."""
        terminate_group(server.pgid, server.process)
        _LIVE.pop(server.pgid, None)
        self._wait_released()

    def _wait_released(self) -> None:
        if self.memory_used_mib is None or self._memory_before is None:
            return
        deadline = self.clock() + RELEASE_TIMEOUT_S
        while self.clock() < deadline:
            used = self.memory_used_mib()
            if used is None or used <= self._memory_before + RELEASE_SLACK_MIB:
                return
            time.sleep(self.health_poll_s)  # the driver frees memory asynchronously


class VllmBenchmarker:
    """Replays the workload against a live server, watching that it stays alive: a server
    that dies mid-bench makes the experiment a crash (or oom) with its log tail."""

    def __init__(self, *, request_timeout_s: float = 600.0, bench_timeout_s: float = 3600.0,
                 warmup_requests: int | None = None,
                 clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        self.request_timeout_s = request_timeout_s
        self.bench_timeout_s = bench_timeout_s
        self.warmup_requests = warmup_requests
        self.clock = clock

    def bench(self, server: VllmServer, workload: Workload, concurrency: int,
              passes: int = 1, slo: Slo | None = None) -> BenchOutcome:
        config = BenchConfig(concurrency=concurrency, passes=passes, slo=slo,
                             request_timeout_s=self.request_timeout_s,
                             bench_timeout_s=self.bench_timeout_s,
                             warmup_requests=self._warmup(concurrency))
        start = self.clock()
        try:
            result = asyncio.run(self._watched(server, workload, config))
        except TimeoutError:
            return BenchOutcome(status="timeout", bench_s=self.clock() - start,
                                reason=f"bench did not finish within "
                                       f"{self.bench_timeout_s:.0f} s")
        elapsed = self.clock() - start
        if result is None:
            status, reason, _ = classify(server.process.poll(), server.log_tail())
            return BenchOutcome(status="oom" if status == "oom" else "crash",
                                bench_s=elapsed,
                                reason=f"server died during the bench: {reason}")
        metrics = median_pass(result)
        reason = ""
        if metrics.completed == 0 and metrics.failure_reasons:
            top = max(metrics.failure_reasons.items(), key=lambda kv: kv[1])[0]
            reason = f"all {metrics.failed} requests failed: {top}"
        return BenchOutcome(status="ok", metrics=metrics, passes=tuple(result),
                            bench_s=elapsed, reason=reason)

    def _warmup(self, concurrency: int) -> int:
        """Untimed requests before the first pass: one per slot up to 8 (by default), so
        the batch sizes the bench will use have run once on the fresh server (a first pass
        after two tiny warm-ups measured several times the TTFT of later passes)."""
        if self.warmup_requests is not None:
            return self.warmup_requests
        return min(max(2, concurrency), WARMUP_SLOTS)

    async def _watched(self, server: VllmServer, workload: Workload, config: BenchConfig
                       ) -> list[BenchMetrics] | None:
        async with httpx.AsyncClient(timeout=10.0) as client:
            async def scrape() -> dict[str, float]:
                try:
                    resp = await client.get(server.url + "/metrics")
                except httpx.HTTPError:
                    return {}
                return parse_metrics(resp.text) if resp.status_code == 200 else {}

            task = asyncio.create_task(bench_passes(
                server.url, server.served_model, workload, config, self.clock,
                scrape=scrape))
            while True:
                done, _ = await asyncio.wait({task}, timeout=HEALTH_POLL_S)
                if done:
                    passes = task.result()
                    # Requests to a dead server fail at once, so the bench can finish
                    # before this watch notices the death: refused connections are a
                    # crash when the server is gone, not a pass full of failures.
                    if _refused(passes) and _dies_within(server, DEATH_GRACE_S):
                        return None
                    return passes
                if not server.alive():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                    return None


def _refused(passes: list[BenchMetrics]) -> bool:
    return any(reason.startswith("connection error") for m in passes
               for reason in m.failure_reasons)


def _dies_within(server: VllmServer, grace_s: float) -> bool:
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=grace_s)
    return not server.alive()


def terminate_group(pgid: int, proc: subprocess.Popen[bytes] | None = None,
                    grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM the group, SIGKILL what is left after `grace_s`, reap our child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.1)  # grandchildren exit on their own once the leader is gone
    if _group_alive(pgid):  # never signal a group id that may have been reused
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    if proc is not None:
        proc.wait()
    deadline = time.monotonic() + 10.0
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: an orphaned
    EngineCore is reparented to init, and an init that never reaps (common in containers)
    would keep the group "alive" forever."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:  # not Linux: signal 0 is all we have
        return True
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _stop_all() -> None:
    for pgid, proc in list(_LIVE.items()):
        terminate_group(pgid, proc, grace_s=5.0)
        _LIVE.pop(pgid, None)


atexit.register(_stop_all)
