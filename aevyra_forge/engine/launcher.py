"""Booting and tearing down `vllm serve` the way a careful engineer would: a free port
on 127.0.0.1, its own process group (so the EngineCore child dies with it), a health
deadline, proof that the server answering is ours, failures classified from the exit code
and the log tail, and a teardown that waits until the memory is released. Each server's
process group is reported to a recorder as soon as it exists and again once it is gone,
so that one left behind by a forge killed in between can be found. The child gets
an environment built from an allow-list (never the LLM provider's key), and the server's
API key, when it has one, goes with every request and never into a file."""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

import httpx

from aevyra_forge.core.errors import StoreError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.redact import REDACTED
from aevyra_forge.core.values import LaunchFailure
from aevyra_forge.engine.failures import LOG_TAIL_LINES, classify, log_tail, one_line
from aevyra_forge.engine.process import (
    ServerGroup,
    die_with_parent,
    terminate_group,
    track,
    untrack,
)
from aevyra_forge.measure.client import auth_headers
from aevyra_forge.space.child_env import child_env
from aevyra_forge.space.rendering import serve_argv, served_name

BOOT_TIMEOUT_S = 900.0  # first boots compile; CUDA-graph capture alone can take a minute
HEALTH_POLL_S = 1.0
RELEASE_TIMEOUT_S = 60.0  # waiting for the GPU memory to come back after teardown
RELEASE_SLACK_MIB = 512
PORT_ATTEMPTS = 3  # another process can take the free port before vLLM binds it
# VLLM_PLUGINS is always set: unset, vLLM would load every installed general plug-in, so
# installing one could change the baseline. The user's own list (inherited) wins over the
# empty default, and a recipe that chose a kernel plug-in (space/plugins.py) over both.
DEFAULT_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_PLUGINS": ""}
_PORT_TAKEN = re.compile(r"address already in use", re.IGNORECASE)
API_KEY_ENV = "VLLM_API_KEY"  # vLLM's own: the server then refuses /v1 without it
API_KEY_FLAG = "--api-key"  # takes precedence over VLLM_API_KEY, as in vLLM


class GroupRecorder(Protocol):
    """Keeps a durable record of the server groups we start (store/servers.py)."""

    def launched(self, group: ServerGroup, log_path: Path) -> None: ...
    def gone(self, group: ServerGroup) -> None: ...


@dataclass
class VllmServer:
    """A live `vllm serve` we started."""

    url: str
    served_model: str
    boot_s: float
    process: subprocess.Popen[bytes]
    log_path: Path
    api_key: str | None = field(default=None, repr=False)  # sent, never logged
    group: ServerGroup | None = None  # as recorded, for marking it gone
    pgid: int = field(init=False)

    def __post_init__(self) -> None:
        self.pgid = self.process.pid  # start_new_session: the pid leads its group

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)

    @property
    def headers(self) -> dict[str, str]:
        """What every request to this server carries (its API key, when it has one)."""
        return auth_headers(self.api_key)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VllmLauncher:
    """Boots `<vllm_bin> serve` for a recipe and tears it down completely. `env` is the
    environment the child starts from (default: ours, narrowed to CHILD_ENV)."""

    def __init__(self, vllm_bin: str, *, boot_timeout_s: float = BOOT_TIMEOUT_S,
                 extra_args: tuple[str, ...] = (), env: Mapping[str, str] | None = None,
                 memory_used_mib: Callable[[], int | None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 health_poll_s: float = HEALTH_POLL_S,
                 recorder: GroupRecorder | None = None) -> None:
        self.vllm_bin = vllm_bin
        self.recorder = recorder
        self.boot_timeout_s = boot_timeout_s
        self.health_poll_s = health_poll_s
        self.extra_args = extra_args
        self.env = child_env(os.environ) if env is None else dict(env)
        self.memory_used_mib = memory_used_mib
        self.clock = clock
        self._memory_before: int | None = None

    def command(self, recipe: Recipe, port: int) -> tuple[list[str], dict[str, str]]:
        argv, env = serve_argv(recipe, "127.0.0.1", port)
        cmd = [self.vllm_bin, "serve", *argv, *self.extra_args]
        return cmd, {**DEFAULT_ENV, **self.env, **env}

    def launch(self, recipe: Recipe, log_path: Path) -> VllmServer | LaunchFailure:
        """Boot and wait until healthy. A log already at `log_path` (an experiment
        interrupted and now run again) is kept, renumbered, not overwritten."""
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            _set_aside(log_path)
        except OSError as exc:
            raise _log_error(log_path, exc) from None
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
        with _open_log(log_path, append, "# " + " ".join(redact_argv(cmd))) as log:
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
        server = VllmServer(url=f"http://127.0.0.1:{port}", served_model=served_name(recipe),
                            boot_s=0.0, process=proc, log_path=log_path,
                            api_key=_api_key(cmd, env), group=ServerGroup.of(proc.pid, port))
        if self.recorder is not None and server.group is not None:
            try:  # on disk before the server can be healthy, let alone benched
                self.recorder.launched(server.group, log_path)
            except BaseException:  # an unrecorded server must not outlive this call
                terminate_group(server.pgid, server.process)
                untrack(server.pgid)
                raise
        failure = self._wait_healthy(server, start)
        if failure is not None:
            self.stop(server)
            return failure
        server.boot_s = self.clock() - start
        return server

    def _wait_healthy(self, server: VllmServer, start: float) -> LaunchFailure | None:
        deadline = start + self.boot_timeout_s
        with httpx.Client(timeout=5.0, headers=server.headers) as client:
            while True:
                code = server.process.poll()
                if code is not None:
                    status, reason, suggested = classify(code, server.log_tail())
                    return LaunchFailure(status=status, reason=reason,
                                         boot_s=self.clock() - start,
                                         suggested_max_model_len=suggested)
                state = self._ours_and_ready(client, server)
                if state == "ready":
                    return None
                if state == "unauthorized":
                    return LaunchFailure(
                        status="boot_failed", boot_s=self.clock() - start,
                        reason=f"the server refused our API key (HTTP 401 on /v1/models); "
                               f"set {API_KEY_ENV} to the key the server expects")
                if self.clock() > deadline:
                    return LaunchFailure(
                        status="timeout", boot_s=self.clock() - start,
                        reason=f"not healthy after {self.boot_timeout_s:.0f} s; last log "
                               f"line: {one_line(server.log_tail(1))}")
                time.sleep(self.health_poll_s)  # polling a server we do not control

    @staticmethod
    def _ours_and_ready(client: httpx.Client, server: VllmServer
                        ) -> Literal["ready", "waiting", "unauthorized"]:
        """/health answers and /v1/models lists our model, while our child is alive (a
        stray server on a reused port would fail the last two checks). A 401 from our
        live child will not change by waiting: the key is wrong."""
        try:
            if client.get(server.url + "/health").status_code != 200:
                return "waiting"
            resp = client.get(server.url + "/v1/models")
            if resp.status_code == 401 and server.alive():
                return "unauthorized"
            models = resp.json()
        except (httpx.HTTPError, ValueError):
            return "waiting"
        data = models.get("data") if isinstance(models, dict) else None
        ids = {m.get("id") for m in data or [] if isinstance(m, dict)}
        return "ready" if server.served_model in ids and server.alive() else "waiting"

    def stop(self, server: VllmServer) -> None:
        """Terminate the whole process group, then wait until memory is released."""
        terminate_group(server.pgid, server.process)
        untrack(server.pgid)
        if self.recorder is not None and server.group is not None:
            self.recorder.gone(server.group)
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


def _api_key(cmd: Sequence[str], env: Mapping[str, str]) -> str | None:
    """The key the server will demand: --api-key, else VLLM_API_KEY (vLLM's order)."""
    for i, arg in enumerate(cmd):
        if arg == API_KEY_FLAG and i + 1 < len(cmd):
            return cmd[i + 1] or None
        if arg.startswith(API_KEY_FLAG + "="):
            return arg.split("=", 1)[1] or None
    return env.get(API_KEY_ENV) or None


def redact_argv(cmd: Sequence[str]) -> list[str]:
    """`cmd` as it may be written to a log: the value of --api-key hidden."""
    out = []
    for i, arg in enumerate(cmd):
        if i and cmd[i - 1] == API_KEY_FLAG:
            arg = REDACTED
        elif arg.startswith(API_KEY_FLAG + "="):
            arg = f"{API_KEY_FLAG}={REDACTED}"
        out.append(arg)
    return out


def _open_log(log_path: Path, append: bool, header: str) -> BinaryIO:
    """The server log, opened with `header` as its first line of this attempt."""
    try:
        log = log_path.open("ab" if append else "wb")
        try:
            log.write((header + "\n").encode())
            log.flush()
        except BaseException:
            log.close()
            raise
    except OSError as exc:
        raise _log_error(log_path, exc) from None
    return log


def _log_error(log_path: Path, exc: OSError) -> StoreError:
    # The log lives in the run folder: a full or read-only disk there is the user's to
    # fix, and the run resumes from its last recorded experiment.
    return StoreError(f"{exc.filename or log_path}: {exc.strerror or exc} while writing "
                      "the server log; free space or fix the folder's permissions, then "
                      "run `aevyra-forge tune resume`")


def _set_aside(log_path: Path) -> None:
    """Keep an earlier attempt's log as `<name>.attempt<N><suffix>` (the first free N),
    so the experiment's record points at the attempt it describes and the failure
    classifier reads only this attempt's lines."""
    if not log_path.exists() or log_path.stat().st_size == 0:
        return
    n = 1
    while (earlier := log_path.with_name(
            f"{log_path.stem}.attempt{n}{log_path.suffix}")).exists():
        n += 1
    os.replace(log_path, earlier)
