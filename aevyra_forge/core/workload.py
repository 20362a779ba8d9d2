"""The workload trace (SPEC §3): one request per JSONL line, prompt or chat messages,
with expected output tokens, optional arrival offsets and free metadata (each line in one
of the formats of core.trace_formats); plus the statistics the agent and the simulator
reason with."""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from aevyra_forge.core.errors import WorkloadError
from aevyra_forge.core.trace_formats import (  # re-exported: the workload's vocabulary
    CHARS_PER_TOKEN as CHARS_PER_TOKEN,
)
from aevyra_forge.core.trace_formats import (
    DEFAULT_OUTPUT_TOKENS as DEFAULT_OUTPUT_TOKENS,
)
from aevyra_forge.core.trace_formats import (
    UNSENT_KEYS,
    RequestLine,
    from_conversation,
)
from aevyra_forge.core.trace_formats import Message as Message
from aevyra_forge.core.trace_formats import estimate_tokens as estimate_tokens

CHAT_TOKENS_PER_MESSAGE = 4  # role markers the chat template adds
_PREFIX_CHUNK_CHARS = 64  # first chunk compared when measuring a shared prefix


class Request(BaseModel):
    """One request of the trace. `line` is its 1-based line number in the file."""

    model_config = ConfigDict(frozen=True)

    line: int
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    expected_output_tokens: int = DEFAULT_OUTPUT_TOKENS
    arrival_offset_s: float | None = None
    metadata: dict[str, Any] = {}

    @property
    def kind(self) -> Literal["completion", "chat"]:
        return "chat" if self.messages is not None else "completion"

    @property
    def text(self) -> str:
        """The prompt as one string (chat messages joined in order), for estimates and
        prefix matching."""
        if self.messages is None:
            return self.prompt or ""
        return "".join(f"<{m.role}>{m.content}\n" for m in self.messages)

    @property
    def input_tokens(self) -> int:
        extra = CHAT_TOKENS_PER_MESSAGE * len(self.messages) if self.messages else 0
        return estimate_tokens(self.text) + extra


class TokenStats(BaseModel):
    model_config = ConfigDict(frozen=True)

    mean: float
    p50: float
    p99: float
    max: int
    total: int


def _token_stats(values: list[int]) -> TokenStats:
    arr = np.asarray(values, dtype=float)
    return TokenStats(mean=float(arr.mean()), p50=float(np.percentile(arr, 50)),
                      p99=float(np.percentile(arr, 99)), max=int(arr.max()),
                      total=int(arr.sum()))


class WorkloadStats(BaseModel):
    """What the agent and the simulator need to know about a trace."""

    model_config = ConfigDict(frozen=True)

    count: int
    chat_fraction: float
    input_tokens: TokenStats
    output_tokens: TokenStats
    shared_prefix_fraction: float  # share of input tokens a prefix cache could serve
    # share of prompt word 3-grams that repeat one earlier in the same prompt: how much
    # n-gram speculative decoding could find to copy (outputs are not in the trace)
    ngram_repetition: float = 0.0
    open_loop: bool  # arrival offsets present: replay at those times
    duration_s: float | None  # last arrival offset, open loop only
    offered_rps: float | None  # requests per second the arrivals offer, open loop only

    def summary(self) -> str:
        loop = (f"open loop, {self.offered_rps:.2f} req/s offered over "
                f"{self.duration_s:.1f} s" if self.open_loop and self.offered_rps
                else "closed loop")
        return (f"{self.count} requests ({self.chat_fraction:.0%} chat), input tokens "
                f"p50 {self.input_tokens.p50:.0f} / p99 {self.input_tokens.p99:.0f}, output "
                f"tokens p50 {self.output_tokens.p50:.0f} / p99 {self.output_tokens.p99:.0f}, "
                f"shared prefix {self.shared_prefix_fraction:.0%}, prompt 3-gram repetition "
                f"{self.ngram_repetition:.0%}, {loop}")


class Workload(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str
    requests: tuple[Request, ...]
    notes: tuple[str, ...] = ()  # what the user should know about how it was read

    def sample(self, n: int, seed: int) -> Workload:
        """A representative `n`-request subsample, the same for the same seed: requests
        are grouped by input-length and output-length quartile and by prefix group (the
        prompts sharing their first characters with another), each group gives its
        proportional share (largest remainders first), and the chosen requests keep their
        trace order and arrival offsets. The whole trace when `n` covers it."""
        reqs = self.requests
        if n >= len(reqs):
            return self
        strata: dict[tuple[int, int, str], list[int]] = {}
        for i, key in enumerate(_strata(reqs)):
            strata.setdefault(key, []).append(i)
        groups = sorted(strata.values())
        quotas = [len(g) * n / len(reqs) for g in groups]
        counts = [int(q) for q in quotas]
        by_remainder = sorted(range(len(groups)), key=lambda g: (counts[g] - quotas[g], g))
        for g in by_remainder[:n - sum(counts)]:
            counts[g] += 1
        rng = np.random.default_rng(seed)
        chosen = sorted(int(i) for g, k in zip(groups, counts, strict=True) if k
                        for i in rng.choice(g, size=k, replace=False))
        # a new model, not model_copy: that would carry the cached stats of the whole trace
        return Workload(path=self.path, sha256=self.sha256,
                        requests=tuple(reqs[i] for i in chosen),
                        notes=(*self.notes, f"{self.path}: replaying a stratified sample of "
                                            f"{n} of its {len(reqs)} requests (seed {seed})"))

    @cached_property
    def stats(self) -> WorkloadStats:
        reqs = self.requests
        offsets = [r.arrival_offset_s for r in reqs if r.arrival_offset_s is not None]
        open_loop = bool(offsets)
        duration = max(offsets) if offsets else None
        rps = (len(reqs) / duration) if duration else None
        return WorkloadStats(
            count=len(reqs),
            chat_fraction=sum(r.kind == "chat" for r in reqs) / len(reqs),
            input_tokens=_token_stats([r.input_tokens for r in reqs]),
            output_tokens=_token_stats([r.expected_output_tokens for r in reqs]),
            shared_prefix_fraction=shared_prefix_fraction([r.text for r in reqs]),
            ngram_repetition=ngram_repetition([r.text for r in reqs]),
            open_loop=open_loop, duration_s=duration, offered_rps=rps,
        )


def _strata(reqs: Sequence[Request]) -> list[tuple[int, int, str]]:
    """Each request's stratum: its input and output length quartiles and its prefix group
    (the first chunk of its prompt when another prompt starts the same way, else "")."""
    ins = np.asarray([r.input_tokens for r in reqs], dtype=float)
    outs = np.asarray([r.expected_output_tokens for r in reqs], dtype=float)
    in_q = np.searchsorted(np.percentile(ins, [25, 50, 75]), ins, side="right")
    out_q = np.searchsorted(np.percentile(outs, [25, 50, 75]), outs, side="right")
    heads = [r.text[:_PREFIX_CHUNK_CHARS] for r in reqs]
    shared = {h for h, k in Counter(heads).items() if k > 1}
    return [(int(a), int(b), h if h in shared else "")
            for a, b, h in zip(in_q, out_q, heads, strict=True)]


def ngram_repetition(texts: Sequence[str], n: int = 3) -> float:
    """Share of the trace's word n-grams that already occurred earlier in the same prompt
    (summaries, code edits and retrieval answers quote their input; chit-chat does not):
    the repetition n-gram speculative decoding proposes from."""
    seen_total = repeated = 0
    for text in texts:
        words, seen = text.split(), set()
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            repeated += gram in seen
            seen.add(gram)
        seen_total += max(0, len(words) - n + 1)
    return repeated / seen_total if seen_total else 0.0


def shared_prefix_fraction(texts: Sequence[str]) -> float:
    """Fraction of prompt characters that repeat a prefix already seen earlier in the
    trace, which is what an (unbounded) prefix cache could serve."""
    total = sum(len(t) for t in texts)
    if total == 0:
        return 0.0
    return sum(seen_prefix_lengths(texts)) / total


def seen_prefix_lengths(texts: Sequence[str]) -> list[int]:
    """For each text, the length of its longest common prefix with any EARLIER text.

    Earlier texts are kept sorted. For sorted strings a <= b <= c, lcp(a, c) =
    min(lcp(a, b), lcp(b, c)), so the earlier text sharing the longest prefix with a new
    one is one of its two sorted neighbours: a binary search and two comparisons per
    request instead of a scan of the whole history (10k prompts of 4k chars in well
    under a second)."""
    seen: list[str] = []
    out: list[int] = []
    for text in texts:
        pos = bisect.bisect_left(seen, text)
        best = _common_prefix(text, seen[pos - 1]) if pos > 0 else 0
        if pos < len(seen):
            best = max(best, _common_prefix(text, seen[pos]))
        seen.insert(pos, text)  # a memmove of pointers: cheap next to the comparisons
        out.append(best)
    return out


def longest_seen_prefix(texts: Sequence[str], i: int) -> int:
    """Length of the longest common prefix between texts[i] and any earlier text (one
    query; use seen_prefix_lengths for the whole trace)."""
    target = texts[i]
    best = 0
    for prior in texts[:i]:
        n = _common_prefix(target, prior)
        if n > best:
            best = n
            if best == len(target):
                break
    return best


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of a and b. Compares growing chunks, then bisects the
    first chunk that differs, so the work is proportional to the shared length rather
    than to the longer string."""
    limit = min(len(a), len(b))
    lo, step = 0, _PREFIX_CHUNK_CHARS
    while lo < limit:
        hi = min(limit, lo + step)
        if a[lo:hi] != b[lo:hi]:
            break
        lo, step = hi, step * 2
    else:
        return limit
    # a[:lo] matches and a[lo:hi] differs somewhere: bisect inside that chunk.
    hi -= 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def load_workload(path: Path) -> Workload:
    """Parse a JSONL trace; the first bad line fails the load with `file:line: reason`."""
    if not path.is_file():
        raise WorkloadError(f"{path}: workload file not found; pass a JSONL file with "
                            "--workload (see examples/sample_workload.jsonl)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate the BOM some Windows editors write
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    # JSONL lines end at "\n" only: str.splitlines would also split inside JSON strings
    # that carry U+2028, U+0085 and friends unescaped (json.dumps(ensure_ascii=False)).
    parsed = [got for n, line in enumerate(text.split("\n"), start=1)
              if (got := _parse_line(path, n, line)) is not None]
    if not parsed:
        raise WorkloadError(f"{path}: no requests; add one JSON object per line")
    requests = tuple(req for req, _ in parsed)
    unsent = sum(any(r.metadata.get(key) is not None for key in UNSENT_KEYS)
                 for r in requests)
    estimated = sum(guessed for _, guessed in parsed)
    notes = [f"{path}: {unsent} requests carry {'/'.join(UNSENT_KEYS)}, which the replay "
             "does not send (kept as metadata): their prompts are shorter than in "
             "production"] if unsent else []
    notes += [f"{path}: {estimated} conversations take their output length from the "
              f"recorded reply (about {CHARS_PER_TOKEN:g} characters a token)"
              ] if estimated else []
    return Workload(path=str(path), sha256=hashlib.sha256(raw).hexdigest(),
                    requests=requests, notes=tuple(notes))


def _parse_line(path: Path, n: int, line: str) -> tuple[Request, bool] | None:
    """The line's request and whether its output length was estimated (None: blank)."""
    if not line.strip():
        return None
    where = f"{path}:{n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
                            ) from None
    except RecursionError:
        raise WorkloadError(f"{where}: JSON nested too deeply; a request is one flat "
                            "object with 'prompt' or 'messages'") from None
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a JSON object with 'prompt', 'messages' or "
                            "'conversations'")
    shapes = [key for key in ("prompt", "messages", "conversations") if obj.get(key) is not None]
    if len(shapes) != 1:
        raise WorkloadError(f"{where}: give exactly one of 'prompt' (a string), 'messages' "
                            "(a list of {role, content}) or 'conversations' (ShareGPT "
                            "turns {from, value})")
    estimated = False
    try:
        if shapes == ["conversations"]:
            obj, estimated = from_conversation(obj)
        parsed = RequestLine.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise WorkloadError(f"{where}: {loc}: {err['msg']}") from None
    except ValueError as exc:
        raise WorkloadError(f"{where}: {exc}") from None
    if parsed.prompt is not None and not parsed.prompt.strip():
        raise WorkloadError(f"{where}: prompt is empty")
    if parsed.messages is not None and not parsed.messages:
        raise WorkloadError(f"{where}: messages is empty")
    return Request(line=n, prompt=parsed.prompt,
                   messages=tuple(parsed.messages) if parsed.messages is not None else None,
                   expected_output_tokens=parsed.output_tokens_given() or DEFAULT_OUTPUT_TOKENS,
                   arrival_offset_s=parsed.arrival_offset_s,
                   metadata=dict(parsed.model_extra or {})), estimated
