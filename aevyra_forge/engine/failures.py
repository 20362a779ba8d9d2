"""Why a `vllm serve` failed, read from its exit code and the tail of its log, and why a
bench's requests failed: a status (boot_failed, oom, crash, hung, request_error), a
one-line reason without vLLM's log prefix that names the root cause (not vLLM's re-raise)
and keeps vLLM's own "To resolve" hint, and the largest max_model_len vLLM says would fit
when the context was too long."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Sequence
from pathlib import Path

from aevyra_forge.core.values import BenchMetrics, Status, failed_request_share, healthy

# vLLM 0.32 logs the failing worker's traceback, then 50-60 lines of the engine's and the
# API server's re-raises: a 60-line tail ended just below the root cause.
LOG_TAIL_LINES = 200
REASON_CHARS = 400  # a reason's length; vLLM's CPU-memory message alone is ~370
HINT_CHARS = 200  # the most of vLLM's "To resolve ..." hint kept when a reason is cut

_MAX_LEN = re.compile(r"maximum model length is (\d+)")
_CONTEXT = re.compile(r"maximum model length|max_model_len|maximum context length|"
                      r"max seq len", re.IGNORECASE)
_OOM = re.compile(r"OutOfMemoryError|CUDA out of memory|HIP out of memory|"
                  r"No available memory for the cache blocks|Cannot allocate memory|"
                  r"larger than the available KV cache memory|insufficient memory|"
                  r"less than desired [GC]PU memory utilization", re.IGNORECASE)
_UNSUPPORTED = re.compile(r"not supported|unsupported|NotImplementedError|"
                          r"no kernel image is available|requires? (AVX|AMX|compute capab)|"
                          r"only supported on|not compiled", re.IGNORECASE)
_ARG = re.compile(r"error: (unrecognized arguments|argument |invalid choice|"
                  r"the following arguments are required)")
# A traceback's last line, once vLLM's prefix is cut: `ValueError: ...`, `Exception: ...`.
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)(:|$)")
# vLLM's re-raises in the parent processes; the cause is an earlier exception.
_WRAPPER = re.compile(r"See root cause above|See stack trace (\(above\) )?for (the )?root cause|"
                      r"Engine core initialization failed|WorkerProc initialization failed",
                      re.IGNORECASE)
_CHAINED = re.compile(r"^(The above exception was the direct cause|During handling of the "
                      r"above exception)")
_VALIDATION = re.compile(r"\d+ validation errors? for \w+$")
_PREFIX = re.compile(r"^.*?(ERROR|WARNING|INFO|DEBUG)\s+\S+\s+\S+\s+\[[^\]]*\]\s*")


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
    """(status, one-line reason, suggested max_model_len) for a server that died: its
    argparse error, else the root cause of its last traceback classified as memory
    (`oom`), context too long, invalid argument or unsupported on this hardware
    (`boot_failed`), else `crash`."""
    lines = [_strip(ln) for ln in tail.splitlines()]
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):
        if _ARG.search(ln):
            return "boot_failed", "invalid argument: " + one_line(ln), None
    cause = root_cause(lines)
    if cause is not None:
        return _categorise(cause)
    for ln in reversed(lines):  # no traceback: vLLM's message may still be there
        if _MAX_LEN.search(ln) or _OOM.search(ln):
            return _categorise(ln)
    code = f"exit code {exit_code}"
    if exit_code is not None and exit_code < 0:
        code = f"killed by {_signal_name(-exit_code)}"
    return "crash", f"vLLM exited ({code}) without an error message; see the log", None


def log_cause(tail: str) -> tuple[Status, str] | None:
    """The classified root cause in a live (or dying) server's log, None when its log
    shows no exception: what a server answering 5xx says about why."""
    lines = [ln for ln in (_strip(x) for x in tail.splitlines()) if ln]
    cause = root_cause(lines)
    if cause is None:
        return None
    status, reason, _ = _categorise(cause)
    return status, reason


def root_cause(lines: Sequence[str]) -> str | None:
    """The exception that started the failure: from the last exception line, up past
    vLLM's re-raises ("... See root cause above") and chained tracebacks ("The above
    exception was the direct cause ...") to the first exception of the failing chain.
    `lines` are log lines with vLLM's prefix cut (`_strip`)."""
    found = [i for i, ln in enumerate(lines) if _EXCEPTION.match(ln)]
    if not found:
        return None
    pick = found[-1]
    for i in reversed(found):  # the nearest exception above the re-raises
        pick = i
        if not _WRAPPER.search(lines[i]):
            break
    while True:  # a chained traceback: its cause is the exception before it
        earlier = _chained_from(lines, pick, found)
        if earlier is None:
            break
        pick = earlier
    if _VALIDATION.search(lines[pick]) and pick + 1 < len(lines):
        # pydantic puts the message on the next line, then its own metadata
        detail = re.sub(r"\s*\[type=.*$", "", lines[pick + 1])
        return f"{lines[pick]}: {detail}"
    return lines[pick]


def _chained_from(lines: Sequence[str], at: int, found: Sequence[int]) -> int | None:
    """The exception chained into the traceback that ends at `at`, if any."""
    start = next((i for i in range(at - 1, -1, -1)
                  if lines[i].startswith("Traceback (most recent call last)")), None)
    if start is None or start == 0 or not _CHAINED.match(lines[start - 1]):
        return None
    before = [i for i in found if i < start - 1]
    return before[-1] if before else None


def _categorise(cause: str) -> tuple[Status, str, int | None]:
    match = _MAX_LEN.search(cause)
    if match:
        return "boot_failed", "context too long: " + one_line(cause), int(match.group(1))
    if _OOM.search(cause):
        return "oom", "out of memory: " + one_line(cause), None
    if _UNSUPPORTED.search(cause):
        return "boot_failed", "unsupported on this hardware: " + one_line(cause), None
    if _CONTEXT.search(cause):
        return "boot_failed", "context too long: " + one_line(cause), None
    if cause.startswith(("ValueError", "TypeError", "argparse")):
        return "boot_failed", "invalid argument: " + one_line(cause), None
    return "crash", one_line(cause), None


def request_failures(passes: Sequence[BenchMetrics]) -> tuple[Status, str] | None:
    """How a bench whose requests failed beyond MAX_FAILED_REQUEST_SHARE is classified,
    None when it stays healthy. Server-side failures (5xx, broken streams, refused
    connections) make it a `crash`, then requests that timed out `hung`, then requests the
    server refused as the client's fault (4xx, short outputs) `request_error`; the reason
    gives the count and the first such error."""
    if healthy(passes):
        return None
    reasons: dict[str, int] = {}
    for m in passes:
        for text, n in m.failure_reasons.items():
            reasons[text] = reasons.get(text, 0) + n
    failed = sum(m.failed for m in passes)
    sent = failed + sum(m.completed for m in passes)
    share = f"{failed} of {sent} requests failed ({failed_request_share(passes):.0%})"
    for status, kinds in _REQUEST_FAILURES:
        first = next((text for text in reasons if text.startswith(kinds)), None)
        if first is not None:
            return status, f"{share}, first: {first}"
    first = next(iter(reasons), "no request completed")
    return "crash", f"{share}, first: {first}"


# The client's error texts by what they say about the server, most serious first.
_REQUEST_FAILURES: tuple[tuple[Status, tuple[str, ...]], ...] = (
    ("crash", ("HTTP 5", "stream error", "connection error", "malformed", "no tokens")),
    ("hung", ("timeout",)),
    ("request_error", ("HTTP 4", "short output")),
)


def one_line(text: str, limit: int = REASON_CHARS) -> str:
    """A log line as a reason: vLLM's `ERROR date time [file:line]` prefix cut off,
    whitespace collapsed, at most `limit` characters; when it must be cut, vLLM's own
    "To resolve ..." hint is kept at the end."""
    text = " ".join(_strip(text).split())
    if len(text) <= limit:
        return text
    at = text.find("To resolve")
    if at < 0:
        return text[:limit]
    hint = text[at:at + HINT_CHARS]
    return text[:max(0, limit - len(hint) - 5)].rstrip() + " ... " + hint


def _strip(line: str) -> str:
    return _PREFIX.sub("", line.strip()).strip()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
