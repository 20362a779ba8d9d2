"""Why a `vllm serve` died, read from its exit code and the tail of its log: a status
(boot_failed, oom, crash), a one-line reason without vLLM's log prefix, and the largest
max_model_len vLLM says would fit when the context was too long."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from aevyra_forge.core.values import Status

LOG_TAIL_LINES = 60

_MAX_LEN = re.compile(r"maximum model length is (\d+)")
_OOM = re.compile(r"OutOfMemoryError|CUDA out of memory|HIP out of memory|"
                  r"No available memory for the cache blocks|Cannot allocate memory|"
                  r"larger than the available KV cache memory|insufficient memory|"
                  r"less than desired [GC]PU memory utilization", re.IGNORECASE)
_ARG = re.compile(r"error: (unrecognized arguments|argument |invalid choice|"
                  r"the following arguments are required)")
_ERROR_LINE = re.compile(r"(\w+(Error|Exception)\b.*|error: .*)")
_WRAPPER = re.compile(r"See root cause above")  # vLLM's re-raise; the cause is earlier


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def classify(exit_code: int | None, tail: str) -> tuple[Status, str, int | None]:
    """(status, one-line reason, suggested max_model_len) for a server that died."""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    suggested = None
    match = None
    for ln in reversed(lines):
        match = _MAX_LEN.search(ln)
        if match:
            suggested = int(match.group(1))
            return "boot_failed", one_line(ln), suggested
    for ln in reversed(lines):
        if _ARG.search(ln):
            return "boot_failed", "invalid argument: " + one_line(ln), None
    for ln in reversed(lines):
        if _OOM.search(ln):
            return "oom", "out of memory: " + one_line(ln), None
    for ln in reversed(lines):
        m = _ERROR_LINE.search(ln)
        if m and not _WRAPPER.search(ln):
            return "crash", one_line(m.group(0)), None
    code = f"exit code {exit_code}"
    if exit_code is not None and exit_code < 0:
        code = f"killed by {_signal_name(-exit_code)}"
    return "crash", f"vLLM exited ({code}) without an error message; see the log", None


def one_line(text: str, limit: int = 300) -> str:
    """A log line as a reason: vLLM's `ERROR date time [file:line]` prefix cut off,
    whitespace collapsed, at most `limit` characters."""
    text = re.sub(r"^.*?(ERROR|WARNING|INFO)\s+\S+\s+\S+\s+\[[^\]]*\]\s*", "", text)
    return " ".join(text.split())[:limit]


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
