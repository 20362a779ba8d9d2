"""Accuracy against the baseline (SPEC §5). The baseline's greedy continuations of a fixed
sample of workload prompts are the reference; a later config is scored by teacher forcing
them (prompt + reference through vLLM's `prompt_logprobs`): the share of positions whose
top-1 token is the baseline's, and the mean shift of the reference tokens' log-probability
from the baseline's own. Teacher forcing keeps one near-tie flip from derailing the rest.
A server that refuses `prompt_logprobs` falls back to greedy token match (the method is
recorded), so accuracy is never silently absent."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, model_validator

from aevyra_forge.core.errors import ForgeError
from aevyra_forge.core.values import AccuracyMethod, QualityScore
from aevyra_forge.core.workload import Request, Workload
from aevyra_forge.measure.probe_server import ProbeFailure, connect, room

DEFAULT_SAMPLES = 8
DEFAULT_MAX_TOKENS = 32  # reference continuation length per sample, in tokens
MAX_PROMPT_TOKENS = 1024  # longer prompts keep their last this-many (a small Reference)
TIMEOUT_S = 120.0  # for a whole capture or scoring, not one request


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
    cut or skipped and why.

    `method` "greedy_match" (the server refused teacher forcing, `fallback` says how) has
    no logprobs or top tokens: a candidate is scored by the share of each continuation its
    own greedy output reproduces before the first divergence, not position by position,
    because after a divergence the two outputs follow different text and any further match
    is coincidence (a repeated newline), which would flatter a config that changed the
    output. It is the stricter measure: one flipped near-tie costs the rest of the sample.
    Its `self_agreement` is the share the baseline reproduces when asked again."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: AccuracyMethod = "teacher_forced"
    prompts: list[list[int]]
    continuations: list[list[int]]
    logprobs: list[list[float]] = []
    top_tokens: list[list[int]] = []
    lines: list[int] = []
    notes: list[str] = []
    self_agreement: float = 1.0
    fallback: str = ""  # why teacher forcing was not used

    @model_validator(mode="after")
    def _aligned(self) -> Reference:
        n = len(self.prompts)
        forced = self.method == "teacher_forced"
        if len(self.continuations) != n or (forced and len(self.logprobs) != n):
            raise ValueError("prompts, continuations and logprobs differ in length")
        if not forced and (self.logprobs or self.top_tokens):
            raise ValueError("a greedy-match reference has no teacher-forced figures")
        if self.lines and len(self.lines) != n:
            raise ValueError("lines and prompts differ in length")
        if self.top_tokens and [len(t) for t in self.top_tokens] != [
                len(c) for c in self.continuations]:
            raise ValueError("top_tokens and continuations differ in length")
        for i, (p, c) in enumerate(zip(self.prompts, self.continuations, strict=True)):
            if not p or not c or (forced and len(c) != len(self.logprobs[i])):
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

    method: AccuracyMethod = "teacher_forced"
    agreement: float = 0.0  # share of positions with the baseline's token, in [0, 1]
    logprob_shift: float | None = 0.0  # mean (candidate - baseline) log-prob, nats;
    #                                    None by greedy match, which has no log-probs
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
    top-1 tokens. When the server refuses teacher forcing (a vLLM or a config without
    `prompt_logprobs`), the reference falls back to greedy token match for every sample,
    saying why in `fallback`.

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
    fallback = ""
    again: list[list[int]] = []
    try:
        with connect(url, model, timeout_s, transport, api_key) as server:
            limit = server.max_model_len()
            for req in requests:
                want = min(max_tokens, req.expected_output_tokens)
                cap = min(max_prompt_tokens, room(limit, want))
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
                if not fallback:
                    try:
                        forced = server.teacher_force(ids, cont)
                    except ProbeFailure as exc:
                        fallback = f"teacher forcing refused: {exc}"
                    else:
                        logprobs.append([lp for _, lp in forced])
                        tops.append([top for top, _ in forced])
                prompts.append(ids)
                continuations.append(cont)
                lines.append(req.line)
            if fallback:  # how reproducible greedy outputs are on the baseline itself
                again = [server.generate(ids, len(cont))
                         for ids, cont in zip(prompts, continuations, strict=True)]
    except ProbeFailure as exc:
        raise QualityError(f"the baseline server failed the accuracy reference: {exc}; "
                           "its server log says why") from None
    if not prompts:
        raise QualityError(f"no sampled workload prompt fits the baseline's max_model_len "
                           f"({'; '.join(notes) or 'no requests given'}); raise "
                           "max_model_len or add shorter prompts")
    positions = sum(len(c) for c in continuations)
    if fallback:
        same = sum(matched_prefix(out, cont)
                   for out, cont in zip(again, continuations, strict=True))
        return Reference(method="greedy_match", prompts=prompts, continuations=continuations,
                         lines=lines, notes=notes, self_agreement=same / positions,
                         fallback=fallback)
    same = sum(t == c for top, cont in zip(tops, continuations, strict=True)
               for t, c in zip(top, cont, strict=True))
    return Reference(prompts=prompts, continuations=continuations, logprobs=logprobs,
                     top_tokens=tops, lines=lines, notes=notes,
                     self_agreement=same / positions)


def score_against(url: str, model: str, ref: Reference, timeout_s: float = TIMEOUT_S, *,
                  transport: httpx.BaseTransport | None = None,
                  api_key: str | None = None) -> Accuracy:
    """Score the candidate server by the reference's method: teacher-force every sample,
    or (greedy match) generate greedily and count the tokens before the first divergence.
    A sample longer than this server's max_model_len is scored on the continuation prefix
    that fits (or skipped when none does), and noted. Never raises for a server-side
    failure: the returned Accuracy carries the error instead."""
    notes: list[str] = []
    agree = positions = samples = 0
    shift = 0.0
    forced_method = ref.method == "teacher_forced"
    try:
        with connect(url, model, timeout_s, transport, api_key) as server:
            limit = server.max_model_len()
            for i, (ids, cont) in enumerate(zip(ref.prompts, ref.continuations,
                                                strict=True)):
                where = f"line {ref.lines[i]}" if ref.lines else f"sample {i}"
                keep = min(len(cont), room(limit, len(ids)))
                if keep < 1:
                    notes.append(f"{where}: skipped, its prompt of {len(ids)} tokens "
                                 f"leaves no room under max_model_len {limit}")
                    continue
                if keep < len(cont):
                    notes.append(f"{where}: scored on {keep} of {len(cont)} tokens "
                                 f"(max_model_len {limit})")
                if forced_method:
                    forced = server.teacher_force(ids, cont[:keep])
                    agree += sum(top == want for (top, _), want in zip(
                        forced, ref.tops(i), strict=False))
                    shift += sum(lp - b for (_, lp), b in zip(forced, ref.logprobs[i],
                                                              strict=False))
                else:
                    agree += matched_prefix(server.generate(ids, keep), cont[:keep])
                positions += keep
                samples += 1
    except ProbeFailure as exc:
        return Accuracy(method=ref.method, notes=notes, error=str(exc))
    if positions == 0:
        return Accuracy(method=ref.method, notes=notes, error="no reference sample fits "
                        "this server's max_model_len; accuracy was not measured")
    return Accuracy(method=ref.method, agreement=agree / positions,
                    logprob_shift=shift / positions if forced_method else None,
                    positions=positions, samples=samples, notes=notes)


def matched_prefix(output: Sequence[int], reference: Sequence[int]) -> int:
    """How many of `reference`'s tokens `output` reproduces before the first difference."""
    n = 0
    for got, want in zip(output, reference, strict=False):
        if got != want:
            break
        n += 1
    return n


def reference_quality(reference: Mapping[str, Any]) -> tuple[QualityScore, str]:
    """The reference config's own score (its outputs are the reference, so 1.0) and,
    when the reference is not teacher-forced, the warning to show the user once."""
    if reference.get("method") != "greedy_match":
        return QualityScore(agreement=1.0, logprob_shift=0.0), ""
    ref = Reference.model_validate(reference)
    return QualityScore(agreement=1.0, positions=ref.positions, method="greedy_match"), (
        f"accuracy by greedy token match ({ref.fallback}): a config scores the share of "
        "the baseline's greedy tokens its own greedy output reproduces before the first "
        "divergence, which is stricter than teacher forcing (one flipped near-tie costs "
        f"the rest of a sample; the baseline itself reproduced {ref.self_agreement:.1%})")


class VllmQualityProbe:
    """The loop's QualityProbe for a real server: the baseline's outputs on a fixed sample
    of the workload become the reference (kept in the baseline's record), and every later
    config is scored against them. A reference that cannot be captured raises
    QualityError (the executor records why, and changes that can alter outputs are then
    never kept); a config that cannot be scored gets agreement 0, so the accuracy floor
    refuses it (the reason is in the record's decision)."""

    def __init__(self, workload: Workload, samples: int = DEFAULT_SAMPLES) -> None:
        self.requests = sample_requests(workload, n=samples)

    def reference(self, server: Any) -> dict[str, Any]:
        ref = capture_reference(server.url, server.served_model, self.requests,
                                api_key=getattr(server, "api_key", None))
        return ref.model_dump(mode="json")

    def accuracy(self, server: Any, reference: dict[str, Any] | None) -> QualityScore | None:
        if reference is None:
            return None
        ref = Reference.model_validate(reference)
        acc = score_against(server.url, server.served_model, ref,
                            api_key=getattr(server, "api_key", None))
        if not acc.ok:
            return QualityScore(agreement=0.0, positions=0, method=ref.method)
        return QualityScore(agreement=acc.agreement, logprob_shift=acc.logprob_shift,
                            positions=acc.positions, method=ref.method)
