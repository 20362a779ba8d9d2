"""Accuracy against the baseline (SPEC §5). The baseline's greedy continuations of a fixed
sample of workload prompts are the reference; a later config is scored by teacher forcing
them (prompt + reference through vLLM's `prompt_logprobs`): the share of positions whose
top-1 token is the baseline's, and the mean shift of the reference tokens' log-probability
from the baseline's own. Teacher forcing keeps one near-tie flip from derailing the rest."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, model_validator

from aevyra_forge.core.errors import ForgeError
from aevyra_forge.core.values import QualityScore
from aevyra_forge.core.workload import Request, Workload
from aevyra_forge.measure.client import auth_headers

DEFAULT_SAMPLES = 8
DEFAULT_MAX_TOKENS = 32  # reference continuation length per sample, in tokens
MAX_PROMPT_TOKENS = 1024  # longer prompts keep their last this-many (a small Reference)
TIMEOUT_S = 120.0  # for a whole capture or scoring, not one request
LOGPROB_FLOOR = -1e4  # nats; keeps -inf (a masked token) out of means and JSON
# Greedy must mean the argmax of the raw logits, which is what prompt_logprobs ranks: vLLM
# otherwise applies the model's generation_config.json (repetition_penalty and friends)
# to every request, and a penalised greedy token need not be top-1 when teacher forced.
_GREEDY: dict[str, Any] = {"temperature": 0.0, "repetition_penalty": 1.0,
                           "presence_penalty": 0.0, "frequency_penalty": 0.0}


class QualityError(ForgeError):
    """The baseline could not produce an accuracy reference."""


class Reference(BaseModel):
    """What every later config is scored against; persisted with the baseline's record.
    Sample i: `prompts[i]` (token ids, chat already through the chat template), the
    baseline's greedy `continuations[i]`, `logprobs[i]`, the baseline's own teacher-forced
    log-probability of each continuation token, and `top_tokens[i]`, its teacher-forced
    top-1 token at each position (empty: the continuation itself).

    The top-1 tokens, not the greedy ones, are what a candidate must match: decoding and
    a teacher-forced prefill run different kernels, and where two tokens nearly tie (common
    in small or random models) the baseline's own prefill can prefer the other one.
    `self_agreement` is the share of greedy tokens that are also the baseline's prefill
    top-1. `lines` are the samples' workload line numbers; `notes` say which prompts were
    cut or skipped and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompts: list[list[int]]
    continuations: list[list[int]]
    logprobs: list[list[float]]
    top_tokens: list[list[int]] = []
    lines: list[int] = []
    notes: list[str] = []
    self_agreement: float = 1.0

    @model_validator(mode="after")
    def _aligned(self) -> Reference:
        n = len(self.prompts)
        if len(self.continuations) != n or len(self.logprobs) != n:
            raise ValueError("prompts, continuations and logprobs differ in length")
        if self.lines and len(self.lines) != n:
            raise ValueError("lines and prompts differ in length")
        if self.top_tokens and [len(t) for t in self.top_tokens] != [
                len(c) for c in self.continuations]:
            raise ValueError("top_tokens and continuations differ in length")
        for p, c, lp in zip(self.prompts, self.continuations, self.logprobs, strict=True):
            if not p or not c or len(c) != len(lp):
                raise ValueError("each sample needs a prompt, a continuation and one "
                                 "logprob per continuation token")
        return self

    @property
    def positions(self) -> int:
        return sum(len(c) for c in self.continuations)

    def tops(self, i: int) -> list[int]:
        """The tokens a candidate must rank first in sample i."""
        return self.top_tokens[i] if self.top_tokens else self.continuations[i]


class Accuracy(BaseModel):
    """One config scored against the Reference. Failure is data: when the server failed
    or no sample fit it, `error` says why, `positions` is 0 and `agreement` is 0.0, so an
    accuracy floor rejects the config; check `ok` before reading the figures."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    agreement: float = 0.0  # share of positions with the baseline's top-1, in [0, 1]
    logprob_shift: float = 0.0  # mean (candidate - baseline) log-probability, nats
    positions: int = 0  # reference tokens scored
    samples: int = 0  # samples scored (some maybe shortened; see notes)
    notes: list[str] = []
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def sample_requests(workload: Workload, n: int = DEFAULT_SAMPLES, seed: int = 0
                    ) -> list[Request]:
    """A fixed sample of up to `n` distinct prompts, in trace order: the same workload and
    seed always give the same requests. Repeated prompts count once (they would measure
    the same thing twice)."""
    if n < 1:
        raise ValueError("n must be at least 1")
    distinct: dict[tuple[str, str], Request] = {}
    for req in workload.requests:
        distinct.setdefault((req.kind, req.text), req)
    pool = list(distinct.values())
    picked = sorted(random.Random(seed).sample(range(len(pool)), min(n, len(pool))))
    return [pool[i] for i in picked]


def capture_reference(url: str, model: str, requests: Sequence[Request],
                      max_tokens: int = DEFAULT_MAX_TOKENS, timeout_s: float = TIMEOUT_S,
                      max_prompt_tokens: int = MAX_PROMPT_TOKENS, *,
                      transport: httpx.BaseTransport | None = None,
                      api_key: str | None = None) -> Reference:
    """Greedy-generate up to `max_tokens` (and no more than the request expects) for each
    request on the baseline server, then teacher-force the result for its log-probs and
    top-1 tokens.

    A prompt longer than `max_prompt_tokens`, or too long to leave room for its
    continuation under the server's max_model_len, keeps its last tokens (the ones the
    continuation depends on most); a request is skipped only when max_model_len leaves no
    room for any prompt. Both are noted. Raises QualityError when the server fails or no
    sample fits: without a reference nothing can be scored."""
    prompts: list[list[int]] = []
    continuations: list[list[int]] = []
    logprobs: list[list[float]] = []
    tops: list[list[int]] = []
    lines: list[int] = []
    notes: list[str] = []
    try:
        with _client(url, model, timeout_s, transport, api_key) as server:
            limit = server.max_model_len()
            for req in requests:
                want = min(max_tokens, req.expected_output_tokens)
                cap = min(max_prompt_tokens, _room(limit, want))
                if cap < 1:
                    notes.append(f"line {req.line}: skipped, max_model_len {limit} leaves "
                                 f"no room for a prompt and {want} tokens")
                    continue
                ids = server.tokenize(req)
                if len(ids) > cap:
                    notes.append(f"line {req.line}: prompt cut to its last {cap} of "
                                 f"{len(ids)} tokens")
                    ids = ids[-cap:]
                if not ids:
                    notes.append(f"line {req.line}: skipped, its prompt has no tokens")
                    continue
                cont = server.generate(ids, want)
                forced = server.teacher_force(ids, cont)
                prompts.append(ids)
                continuations.append(cont)
                logprobs.append([lp for _, lp in forced])
                tops.append([top for top, _ in forced])
                lines.append(req.line)
    except _ServerFailure as exc:
        raise QualityError(f"the baseline server failed the accuracy reference: {exc}; "
                           "its server log says why") from None
    if not prompts:
        raise QualityError(f"no sampled workload prompt fits the baseline's max_model_len "
                           f"({'; '.join(notes) or 'no requests given'}); raise "
                           "max_model_len or add shorter prompts")
    same = sum(t == c for top, cont in zip(tops, continuations, strict=True)
               for t, c in zip(top, cont, strict=True))
    return Reference(prompts=prompts, continuations=continuations, logprobs=logprobs,
                     top_tokens=tops, lines=lines, notes=notes,
                     self_agreement=same / sum(len(c) for c in continuations))


def score_against(url: str, model: str, ref: Reference, timeout_s: float = TIMEOUT_S, *,
                  transport: httpx.BaseTransport | None = None,
                  api_key: str | None = None) -> Accuracy:
    """Teacher-force every reference sample through the candidate server. A sample longer
    than this server's max_model_len is scored on the continuation prefix that fits (or
    skipped when none does), and noted. Never raises for a server-side failure: the
    returned Accuracy carries the error instead."""
    notes: list[str] = []
    agree = positions = samples = 0
    shift = 0.0
    try:
        with _client(url, model, timeout_s, transport, api_key) as server:
            limit = server.max_model_len()
            for i, (ids, cont, base) in enumerate(zip(ref.prompts, ref.continuations,
                                                      ref.logprobs, strict=True)):
                where = f"line {ref.lines[i]}" if ref.lines else f"sample {i}"
                keep = min(len(cont), _room(limit, len(ids)))
                if keep < 1:
                    notes.append(f"{where}: skipped, its prompt of {len(ids)} tokens "
                                 f"leaves no room under max_model_len {limit}")
                    continue
                if keep < len(cont):
                    notes.append(f"{where}: scored on {keep} of {len(cont)} tokens "
                                 f"(max_model_len {limit})")
                forced = server.teacher_force(ids, cont[:keep])
                agree += sum(top == want for (top, _), want in zip(forced, ref.tops(i),
                                                                   strict=False))
                shift += sum(lp - b for (_, lp), b in zip(forced, base, strict=False))
                positions += keep
                samples += 1
    except _ServerFailure as exc:
        return Accuracy(notes=notes, error=str(exc))
    if positions == 0:
        return Accuracy(notes=notes, error="no reference sample fits this server's "
                        "max_model_len; accuracy was not measured")
    return Accuracy(agreement=agree / positions, logprob_shift=shift / positions,
                    positions=positions, samples=samples, notes=notes)


# -- the server side ------------------------------------------------------------------------

class _ServerFailure(Exception):
    """The server failed a request; the message is one line."""


def _room(limit: int | None, used: int) -> int:
    """Tokens that fit beside `used` others: a teacher-forced request generates one token
    of its own, so prompt + continuation must stay below max_model_len."""
    return 1 << 30 if limit is None else limit - used - 1


class _Server:
    """Blocking calls to one vLLM OpenAI server under a shared deadline."""

    def __init__(self, http: httpx.Client, url: str, model: str, timeout_s: float) -> None:
        self.http, self.url, self.model = http, url.rstrip("/"), model
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def call(self, method: str, path: str, body: dict[str, Any] | None = None
             ) -> dict[str, Any]:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _ServerFailure(f"timeout after {self.timeout_s:g} s")
        try:
            resp = self.http.request(method, self.url + path, json=body, timeout=left)
        except httpx.TimeoutException:
            raise _ServerFailure(f"timeout after {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise _ServerFailure(f"{path}: connection error: {type(exc).__name__}"
                                 ) from None
        if resp.status_code != 200:
            raise _ServerFailure(f"{path} answered HTTP {resp.status_code}: "
                                 f"{_error_message(resp.text)}")
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise _ServerFailure(f"{path} answered something other than a JSON object")
        return data

    def max_model_len(self) -> int | None:
        for entry in self.call("GET", "/v1/models").get("data") or []:
            if isinstance(entry, dict) and entry.get("id") == self.model:
                value = entry.get("max_model_len")
                return value if isinstance(value, int) else None
        return None

    def tokenize(self, req: Request) -> list[int]:
        """Prompt token ids as the server's endpoints would build them: chat through the
        model's chat template with the assistant turn opened."""
        body: dict[str, Any] = {"model": self.model}
        if req.messages is not None:
            body |= {"messages": [m.model_dump() for m in req.messages],
                     "add_generation_prompt": True}
        else:
            body["prompt"] = req.prompt or ""
        return _ids(self.call("POST", "/tokenize", body).get("tokens"), "/tokenize tokens")

    def generate(self, prompt: list[int], max_tokens: int) -> list[int]:
        choice = self._completion({"prompt": prompt, "max_tokens": max_tokens,
                                   "return_token_ids": True})
        out = _ids(choice.get("token_ids"),
                   "token_ids (does this vLLM accept return_token_ids?)")
        if not out:
            raise _ServerFailure("/v1/completions generated no tokens")
        return out

    def teacher_force(self, prompt: list[int], cont: list[int]) -> list[tuple[int, float]]:
        """(top-1 token, log-probability of the continuation token) at each continuation
        position, given prompt + the tokens before it, from one prefill. vLLM skips its
        prefix cache for requests with prompt_logprobs."""
        # prompt_logprobs=1: each position maps the actual token to its logprob and rank
        # (1 + the number of other tokens at least as likely) and adds the top-1 token.
        choice = self._completion({"prompt": prompt + cont, "max_tokens": 1,
                                   "prompt_logprobs": 1})
        entries = choice.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(prompt) + len(cont):
            raise _ServerFailure("/v1/completions answered no prompt_logprobs for every "
                                 "prompt token")
        return [_position(entry, token)
                for entry, token in zip(entries[len(prompt):], cont, strict=True)]

    def _completion(self, extra: dict[str, Any]) -> dict[str, Any]:
        data = self.call("POST", "/v1/completions", {"model": self.model, **_GREEDY,
                                                     **extra})
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise _ServerFailure("/v1/completions answered no choices")
        return choices[0]


@contextmanager
def _client(url: str, model: str, timeout_s: float, transport: httpx.BaseTransport | None,
            api_key: str | None = None) -> Iterator[_Server]:
    """`transport` replaces the network (tests answer with httpx.MockTransport)."""
    with httpx.Client(transport=transport, headers=auth_headers(api_key)) as http:
        yield _Server(http, url, model, timeout_s)


def _position(entry: Any, token: int) -> tuple[int, float]:
    """(top-1 token, logprob of `token`) from one prompt_logprobs entry."""
    try:
        ranks = {int(k): int(v["rank"]) for k, v in entry.items()}
        logprob = float(entry[str(token)]["logprob"])
        top = token if ranks[token] == 1 else next(k for k, r in ranks.items() if r == 1)
    except (AttributeError, TypeError, KeyError, ValueError, StopIteration):
        raise _ServerFailure(f"prompt_logprobs lack token {token} or the top-1 token "
                             "at its position") from None
    # -inf (a masked token) and NaN count as the floor
    return top, LOGPROB_FLOOR if math.isnan(logprob) else max(logprob, LOGPROB_FLOOR)


def _ids(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise _ServerFailure(f"the server answered no {what}")
    return value


def _error_message(text: str) -> str:
    """vLLM's {"error": {"message": ...}} body as one short line (else the raw text)."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error", data)
        text = str(err.get("message", err) if isinstance(err, dict) else err)
    return " ".join(text.split())[:200] or "no message"


class VllmQualityProbe:
    """The loop's QualityProbe for a real server: the baseline's outputs on a fixed sample
    of the workload become the reference (kept in the baseline's record), and every later
    config is scored against them. A reference that cannot be captured leaves accuracy
    unmeasured for the run; a config that cannot be scored gets agreement 0, so the
    accuracy floor refuses it (the reason is in the record's decision)."""

    def __init__(self, workload: Workload, samples: int = 8) -> None:
        self.requests = sample_requests(workload, n=samples)

    def reference(self, server: Any) -> dict[str, Any] | None:
        try:
            ref = capture_reference(server.url, server.served_model, self.requests,
                                    api_key=getattr(server, "api_key", None))
        except QualityError:
            return None
        return ref.model_dump(mode="json")

    def accuracy(self, server: Any, reference: dict[str, Any] | None) -> QualityScore | None:
        if reference is None:
            return None
        acc = score_against(server.url, server.served_model,
                            Reference.model_validate(reference),
                            api_key=getattr(server, "api_key", None))
        if not acc.ok:
            return QualityScore(agreement=0.0, positions=0)
        return QualityScore(agreement=acc.agreement, logprob_shift=acc.logprob_shift,
                            positions=acc.positions)
