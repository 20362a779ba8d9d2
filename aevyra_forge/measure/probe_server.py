"""The accuracy probe's side of one vLLM OpenAI server (measure/accuracy.py): blocking
calls under a shared deadline to tokenize a prompt, generate greedily with token ids, and
teacher-force a continuation through `prompt_logprobs`. Every server-side failure is a
ProbeFailure with a one-line message."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from aevyra_forge.core.workload import Request
from aevyra_forge.measure.client import auth_headers

LOGPROB_FLOOR = -1e4  # nats; keeps -inf (a masked token) out of means and JSON
# Greedy must mean the argmax of the raw logits, which is what prompt_logprobs ranks: vLLM
# otherwise applies the model's generation_config.json (repetition_penalty and friends)
# to every request, and a penalised greedy token need not be top-1 when teacher forced.
GREEDY: dict[str, Any] = {"temperature": 0.0, "repetition_penalty": 1.0,
                          "presence_penalty": 0.0, "frequency_penalty": 0.0}


class ProbeFailure(Exception):
    """The server failed a request; the message is one line."""


def room(limit: int | None, used: int) -> int:
    """Tokens that fit beside `used` others: a teacher-forced request generates one token
    of its own, so prompt + continuation must stay below max_model_len."""
    return 1 << 30 if limit is None else limit - used - 1


class ProbeServer:
    """Blocking calls to one vLLM OpenAI server under a shared deadline."""

    def __init__(self, http: httpx.Client, url: str, model: str, timeout_s: float) -> None:
        self.http, self.url, self.model = http, url.rstrip("/"), model
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def call(self, method: str, path: str, body: dict[str, Any] | None = None
             ) -> dict[str, Any]:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ProbeFailure(f"timeout after {self.timeout_s:g} s")
        try:
            resp = self.http.request(method, self.url + path, json=body, timeout=left)
        except httpx.TimeoutException:
            raise ProbeFailure(f"timeout after {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ProbeFailure(f"{path}: connection error: {type(exc).__name__}"
                                 ) from None
        if resp.status_code != 200:
            raise ProbeFailure(f"{path} answered HTTP {resp.status_code}: "
                                 f"{error_message(resp.text)}")
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ProbeFailure(f"{path} answered something other than a JSON object")
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
            raise ProbeFailure("/v1/completions generated no tokens")
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
            raise ProbeFailure("/v1/completions answered no prompt_logprobs for every "
                                 "prompt token")
        return [_position(entry, token)
                for entry, token in zip(entries[len(prompt):], cont, strict=True)]

    def _completion(self, extra: dict[str, Any]) -> dict[str, Any]:
        data = self.call("POST", "/v1/completions", {"model": self.model, **GREEDY,
                                                     **extra})
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ProbeFailure("/v1/completions answered no choices")
        return choices[0]


@contextmanager
def connect(url: str, model: str, timeout_s: float, transport: httpx.BaseTransport | None,
            api_key: str | None = None) -> Iterator[ProbeServer]:
    """`transport` replaces the network (tests answer with httpx.MockTransport)."""
    with httpx.Client(transport=transport, headers=auth_headers(api_key)) as http:
        yield ProbeServer(http, url, model, timeout_s)


def _position(entry: Any, token: int) -> tuple[int, float]:
    """(top-1 token, logprob of `token`) from one prompt_logprobs entry."""
    try:
        ranks = {int(k): int(v["rank"]) for k, v in entry.items()}
        logprob = float(entry[str(token)]["logprob"])
        top = token if ranks[token] == 1 else next(k for k, r in ranks.items() if r == 1)
    except (AttributeError, TypeError, KeyError, ValueError, StopIteration):
        raise ProbeFailure(f"prompt_logprobs lack token {token} or the top-1 token "
                             "at its position") from None
    # -inf (a masked token) and NaN count as the floor
    return top, LOGPROB_FLOOR if math.isnan(logprob) else max(logprob, LOGPROB_FLOOR)


def _ids(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ProbeFailure(f"the server answered no {what}")
    return value


def error_message(text: str) -> str:
    """vLLM's {"error": {"message": ...}} body as one short line (else the raw text)."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error", data)
        text = str(err.get("message", err) if isinstance(err, dict) else err)
    return " ".join(text.split())[:200] or "no message"
