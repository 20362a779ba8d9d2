"""Downloading a Hub sibling before its boot: the prepare phase of a recipe that serves a
pre-quantized checkpoint from the Hub. huggingface_hub writes it into its own cache, where
vLLM (started with the same environment) then finds it, so the download is prepare time,
with progress lines and the budget charged, and not boot time racing the boot timeout
(gigabytes at tens of MB/s take minutes). A download that fails is a reason, never an
exception: the trial becomes a `prepare_failed` row."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aevyra_forge.space.hub import failure_cause

# What `vllm serve <repo>` reads: config and tokenizer files, safetensors weights (the
# lookup keeps only checkpoints it sized from their safetensors); never .bin or .gguf twins.
PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
MARGIN_BYTES = 256 * 2**20  # free space kept beyond the download
ETAG_TIMEOUT_S = 10.0  # per metadata request


@dataclass(frozen=True)
class HubFetch:
    """One Hub checkpoint a recipe may serve: its repo (the recipe's quant.checkpoint, as
    `vllm serve` takes it, so the branch vLLM would serve: main), the weights' size from
    the lookup (for the disk check and the progress line) and the endpoint looked up."""

    repo: str
    size_bytes: int | None
    endpoint: str


@dataclass(frozen=True)
class Fetched:
    reused: bool  # every file was in the cache already
    failure: str | None = None


class Once:
    """Whether the model was downloaded in this process, shared by a pool's workers; a
    copy sent to another node (a Ray task) starts afresh, as that node's cache does."""

    def __init__(self) -> None:
        self.done = False
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


def cache_folder(repo: str) -> Path:
    """Where huggingface_hub keeps `repo` (its cache layout: models--owner--name)."""
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"


def fetch(job: HubFetch, log: Path, say: Callable[[str], None], *,
          clock: Callable[[], float], free_bytes: Callable[[Path], int],
          timeout_s: float, poll_s: float, heartbeat_s: float) -> Fetched:
    """Download `job`'s checkpoint into the cache, telling `say` how far it got (at the
    start, every `heartbeat_s`, and at the end) and writing the same to `log`."""
    folder = cache_folder(job.repo)
    have = _bytes_in(folder)
    lines = _Log(log, say)
    needed = max(0, (job.size_bytes or 0) - have) + MARGIN_BYTES
    free = free_bytes(_existing(folder))
    if free < needed:
        return Fetched(False, lines.fail(
            f"not enough disk to download {job.repo}: ~{_gib(needed)} needed, {_gib(free)} "
            f"free under {_existing(folder)}; free some space or set HF_HOME elsewhere"))
    total = f" of ~{_gib(job.size_bytes)}" if job.size_bytes else ""
    lines.say(f"downloading {job.repo} from {job.endpoint}{total}")
    box: dict[str, object] = {}

    def work() -> None:
        from huggingface_hub import snapshot_download
        try:
            box["path"] = snapshot_download(job.repo, endpoint=job.endpoint,
                                            allow_patterns=list(PATTERNS),
                                            etag_timeout=ETAG_TIMEOUT_S)
        except Exception as exc:  # any error of the Hub or the network is the reason
            box["error"] = exc

    start = said_at = clock()
    worker = threading.Thread(target=work, name=f"fetch {job.repo}", daemon=True)
    worker.start()
    while True:
        worker.join(poll_s)
        if not worker.is_alive():
            break
        now = clock()
        if now - start > timeout_s:  # the thread cannot be stopped; its files stay partial
            return Fetched(False, lines.fail(
                f"downloading {job.repo} took over {timeout_s:.0f} s "
                f"({_gib(_bytes_in(folder) - have)} so far)"))
        if now - said_at >= heartbeat_s:
            said_at = now
            lines.say(f"downloading {job.repo}: {_gib(_bytes_in(folder) - have)}{total} "
                      f"({now - start:.0f} s)")
    got = _bytes_in(folder) - have
    error = box.get("error")
    if isinstance(error, Exception):
        return Fetched(False, lines.fail(_why(job, error)))
    lines.say(f"downloaded {job.repo}: {_gib(got)} in {clock() - start:.0f} s into "
              f"{box.get('path')}" if got else f"{job.repo} was already in {folder}")
    return Fetched(reused=got == 0)


def _why(job: HubFetch, exc: Exception) -> str:
    """One line for a failed download, by huggingface_hub's error."""
    cause = {"offline": "HF_HUB_OFFLINE is set (unset it, or download it first)",
             "gated": "it is gated: accept its terms on the Hub and set HF_TOKEN",
             "not_found": "the Hub has no such repository (or it is private: set HF_TOKEN)",
             "no_entry": "a file it lists is missing on the Hub",
             "network": "the Hub or the network failed"}[failure_cause(exc)]
    return f"downloading {job.repo} failed: {cause}: {type(exc).__name__}: {str(exc)[:300]}"


class _Log:
    """The download's lines, to the prepare log and to the progress line alike."""

    def __init__(self, path: Path, say: Callable[[str], None]) -> None:
        self.path, self.tell = path, say
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def say(self, text: str) -> None:
        with self.path.open("a") as f:
            f.write(text + "\n")
        self.tell(text)

    def fail(self, reason: str) -> str:
        with self.path.open("a") as f:
            f.write(f"failed: {reason}\n")
        return reason


def _bytes_in(folder: Path) -> int:
    """Bytes under the repo's cache folder (its blobs, partial downloads included)."""
    try:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()
                   and not p.is_symlink())
    except OSError:
        return 0


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (for the disk check before the first
    download creates the cache)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _gib(n: int | None) -> str:
    return f"{(n or 0) / 2**30:.2f} GiB"

