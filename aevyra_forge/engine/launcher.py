"""Booting and tearing down `vllm serve` the way a careful engineer would: a free port
on 127.0.0.1, its own process group (so the EngineCore child dies with it), a health
deadline, proof that the server answering is ours, failures classified from the exit code
and the log tail, and a teardown that waits until the memory is released."""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import LaunchFailure
from aevyra_forge.engine.failures import LOG_TAIL_LINES, classify, log_tail, one_line
from aevyra_forge.engine.process import die_with_parent, terminate_group, track, untrack
from aevyra_forge.space.rendering import render

BOOT_TIMEOUT_S = 900.0  # first boots compile; CUDA-graph capture alone can take a minute
HEALTH_POLL_S = 1.0
RELEASE_TIMEOUT_S = 60.0  # waiting for the GPU memory to come back after teardown
RELEASE_SLACK_MIB = 512
PORT_ATTEMPTS = 3  # another process can take the free port before vLLM binds it
DEFAULT_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
_PORT_TAKEN = re.compile(r"address already in use", re.IGNORECASE)


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
                                        preexec_fn=functools.partial(die_with_parent,
                                                                     os.getpid()))
            except OSError as exc:
                return LaunchFailure(status="boot_failed",
                                     reason=f"cannot run {self.vllm_bin}: {exc.strerror}")
        track(proc)
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
                               f"line: {one_line(server.log_tail(1))}")
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
        untrack(server.pgid)
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
