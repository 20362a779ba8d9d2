"""A fake vLLM OpenAI-compatible server on 127.0.0.1 for the bench and runner tests and the
client-overhead benchmark: raw asyncio HTTP/1.1 (keep-alive, chunked SSE), /health,
/v1/models, /metrics and streaming /v1/completions and /v1/chat/completions shaped like
vLLM 0.32's. It records what it was sent so tests can check the client's behaviour.

For the accuracy probe it also has a deterministic toy language model (FakeLm): POST
/tokenize (a prompt, or messages through a Llama-3-like chat template), and non-streamed
/v1/completions with a token-id prompt, greedy generation, `return_token_ids` and
`prompt_logprobs` (rank and log-probability of every prompt token, vLLM's shapes).
`FakeConfig.logit_noise` perturbs that model's logits, standing in for a lossy config;
`decode_noise` perturbs them in generation only (decode and prefill numerics differ).

Token accounting: a prompt's token count is its number of whitespace-separated words (for
chat, the words of every message plus 4 per message for the template); the fake never
emits EOS, so it always generates exactly `max_tokens` tokens, one word each.

Use it in-process (`with FakeVllm(FakeConfig(...)) as fake: fake.url`, served from a
background thread with its own event loop) or as a script
(`python tests/fake_vllm.py --port N --model M`), which tests/data/fake_vllm/vllm runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

CHAT_TOKENS_PER_MESSAGE = 4  # role markers a chat template adds around each message
BLOCK_TOKENS = 16  # prefix-cache granularity, like vLLM's default block size
KV_CAPACITY_TOKENS = 65536  # tokens the fake "KV cache" holds, for kv_cache_usage_perc
MAX_HEADER_BYTES = 64 * 1024


@dataclass
class FakeConfig:
    """How the fake behaves. `length_policy="reject"` answers HTTP 400 when prompt tokens +
    max_tokens exceed `max_model_len` (older vLLM); `"clamp"` is vLLM 0.32's behaviour: 400
    only when the prompt alone or max_tokens alone is too long, otherwise max_tokens is
    silently cut to fit."""

    model: str = "fake-model"
    max_model_len: int = 4096  # tokens
    token_delay_s: float = 0.0  # between token chunks; 0 answers instantly
    first_token_delay_s: float = 0.0  # "prefill", after the chat role chunk
    tokens_per_chunk: int = 1  # like --stream-interval
    poison: str | None = "POISON-PILL"  # a prompt containing it gets HTTP 400
    length_policy: Literal["reject", "clamp"] = "reject"
    healthy: bool = True  # False: /health answers 503 forever
    preempt_above: int | None = None  # requests admitted above this many in flight count
    #                                   as a preemption (a stand-in for --max-num-seqs)
    die_after_requests: int | None = None  # script only: os._exit on the request after N
    on_die: Callable[[], None] | None = None  # runs instead of os._exit (script hooks)
    error_after_requests: int | None = None  # generation requests after the first N answer
    #                                          HTTP 500, like vLLM after its engine died
    on_error: Callable[[], None] | None = None  # runs once, at the first such 500
    stall_after_tokens: int | None = None  # once this many tokens were generated in all,
    #                                        streams stop sending tokens without closing
    vocab_size: int = 512  # the toy model's vocabulary (ids 0..15 are special tokens)
    logit_noise: float = 0.0  # std of a fixed perturbation added to the toy model's
    #                           logits: 0 is the reference model, >0 a lossy config
    decode_noise: float = 0.0  # the same, in greedy generation only: decode kernels that
    #                            differ slightly from the prefill ones
    api_key: str | None = None  # like vLLM's --api-key: /v1 answers 401 without the
    #                             header "Authorization: Bearer <key>"
    refuse_prompt_logprobs: bool = False  # HTTP 400 for any request with prompt_logprobs,
    #                                       like a vLLM or config that cannot teacher-force
    ignore_cache_salt: bool = False  # prefix-cache blocks shared across salts, like a
    #                                  server (or an older vLLM) that ignores cache_salt
    prefill_s_per_token: float = 0.0  # extra "prefill" delay per prompt token not served
    #                                   from the prefix cache, so cached prompts run faster
    dev_mode: bool = False  # POST /reset_prefix_cache served, like VLLM_SERVER_DEV_MODE=1


@dataclass
class Recorded:
    """One request as the fake saw it; `arrived_s` is time.perf_counter() at arrival."""

    method: str
    path: str
    body: dict[str, Any] | None
    arrived_s: float
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case


@dataclass
class _Counters:
    preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    succeeded: int = 0
    live_tokens: int = 0
    created_s: float = field(default_factory=time.time)


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class FakeLm:
    """A deterministic toy language model: the next-token logits depend on the last two
    tokens only, drawn once per context from a seeded generator (std LOGIT_STD), plus
    `noise` times an independent fixed draw (and, when generating, `decode_noise` times
    another). Ranks follow vLLM's rule (the number of tokens whose log-probability is >=
    the token's), so 1 means strictly top-1."""

    BOS, EOS, HEADER_START, HEADER_END, EOT = 0, 1, 2, 3, 4
    ROLES: ClassVar[dict[str, int]] = {"system": 5, "user": 6, "assistant": 7, "tool": 8,
                                       "developer": 9}
    FIRST_WORD_ID = 16
    LOGIT_STD = 2.0

    def __init__(self, vocab_size: int = 512, noise: float = 0.0,
                 decode_noise: float = 0.0) -> None:
        self.vocab_size, self.noise, self.decode_noise = vocab_size, noise, decode_noise
        self._rows: dict[tuple[int, int, bool], list[float]] = {}

    def word_id(self, word: str) -> int:
        digest = hashlib.sha256(word.encode()).digest()
        span = self.vocab_size - self.FIRST_WORD_ID
        return self.FIRST_WORD_ID + int.from_bytes(digest[:4], "big") % span

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.word_id(w) for w in text.split()]
        return [self.BOS, *ids] if add_special_tokens else ids

    def chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool
             ) -> list[int]:
        ids = [self.BOS]
        for m in messages:
            ids += [self.HEADER_START, self.ROLES.get(str(m.get("role")), 9),
                    self.HEADER_END, *self.encode(str(m.get("content") or ""), False),
                    self.EOT]
        if add_generation_prompt:
            ids += [self.HEADER_START, self.ROLES["assistant"], self.HEADER_END]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(f" t{t}" for t in ids)

    def logprobs(self, context: Sequence[int], decoding: bool = False) -> list[float]:
        """Log-probabilities of every token after `context` (at least one token)."""
        key = (context[-2] if len(context) > 1 else -1, context[-1])
        row = self._rows.get((*key, decoding))
        if row is None:
            clean = random.Random(f"logits:{key}")
            logits = [clean.gauss(0.0, self.LOGIT_STD) for _ in range(self.vocab_size)]
            for kind, scale in (("noise", self.noise),
                                ("decode", self.decode_noise if decoding else 0.0)):
                if scale:
                    jitter = random.Random(f"{kind}:{key}")
                    logits = [x + scale * jitter.gauss(0.0, self.LOGIT_STD)
                              for x in logits]
            top = max(logits)
            norm = top + math.log(sum(math.exp(x - top) for x in logits))
            row = self._rows[(*key, decoding)] = [x - norm for x in logits]
        return row

    @staticmethod
    def rank(row: Sequence[float], token: int) -> int:
        return sum(1 for x in row if x >= row[token])

    def greedy(self, prompt: Sequence[int], n: int, ignore_eos: bool) -> list[int]:
        ids, out = list(prompt), []
        for _ in range(n):
            row = self.logprobs(ids, decoding=True)
            token = max(range(self.vocab_size), key=row.__getitem__)
            ids.append(token)
            out.append(token)
            if token == self.EOS and not ignore_eos:
                break
        return out

    def prompt_logprobs(self, prompt: Sequence[int], top: int
                        ) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's `prompt_logprobs` list: None for the first token, then for each token a
        map id -> {logprob, rank, decoded_token} holding it and the `top` best."""
        out: list[dict[str, dict[str, Any]] | None] = [None]
        for i in range(1, len(prompt)):
            row = self.logprobs(prompt[:i])
            best = sorted(range(self.vocab_size), key=lambda t: -row[t])[:top]
            out.append({str(t): {"logprob": row[t], "rank": self.rank(row, t),
                                 "decoded_token": self.decode([t])}
                        for t in (prompt[i], *best)})
        return out


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 503: "Service Unavailable"}


def count_words(text: str) -> int:
    return len(text.split())


def prompt_tokens(body: dict[str, Any]) -> int:
    """The fake's token count for a request body (see the module docstring)."""
    if "messages" in body:
        msgs = body["messages"]
        return sum(count_words(str(m.get("content") or "")) + CHAT_TOKENS_PER_MESSAGE
                   for m in msgs)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):  # a batch of strings or one prompt as token ids
        if prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return sum(count_words(str(p)) for p in prompt)
    return count_words(str(prompt))


def prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return "\n".join(str(m.get("content") or "") for m in body["messages"])
    prompt = body.get("prompt", "")
    return " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)


class FakeVllm:
    """The server. Thread-safe enough for tests: its state is only mutated on its own loop,
    and tests read it after the client has finished."""

    def __init__(self, config: FakeConfig | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.config = config or FakeConfig()
        self.host, self.port = host, port
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.generation_requests = 0
        self.counters = _Counters()
        self._seen_blocks: set[bytes] = set()
        self.cache_resets = 0
        self._lm: FakeLm | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def lm(self) -> FakeLm:
        """The toy model, built on first use and rebuilt when its settings change."""
        cfg = self.config
        if self._lm is None or (self._lm.vocab_size, self._lm.noise,
                                self._lm.decode_noise) != (
                cfg.vocab_size, cfg.logit_noise, cfg.decode_noise):
            self._lm = FakeLm(cfg.vocab_size, cfg.logit_noise, cfg.decode_noise)
        return self._lm

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> str:
        """Listen on the running loop; returns the base URL."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=MAX_HEADER_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def start_in_thread(self) -> str:
        """Serve from a daemon thread with its own event loop; returns the base URL."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # surface bind errors to the caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.close())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-vllm", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FakeVllm:
        self.start_in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            try:
                writer.close()
                # a connection still open when the server stops is cancelled here
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await writer.wait_closed()
            finally:
                self._tasks.discard(task)  # only now: close() must await the closing too

    async def _one_request(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection should close."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for ln in lines[1:]:
            if ":" in ln:
                k, v = ln.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        keep_alive = headers.get("connection", "").lower() != "close"
        path = target.split("?", 1)[0]
        body: dict[str, Any] | None = None
        if raw:
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                await _send(writer, 400, _error_json("malformed JSON body", 400), keep_alive)
                return keep_alive
        self.requests.append(Recorded(method, path, body, time.perf_counter(), headers))
        key = self.config.api_key
        if key and path.startswith("/v1") and headers.get("authorization") != f"Bearer {key}":
            # vLLM's AuthenticationMiddleware: /v1 only, /health and /metrics stay open
            await _send(writer, 401, json.dumps({"error": "Unauthorized"}).encode(),
                        keep_alive)
            return keep_alive
        try:
            await self._route(method, path, body, writer, keep_alive)
        except HttpError as exc:
            await _send(writer, exc.status, _error_json(exc.message, exc.status, exc.param),
                        keep_alive)
        return keep_alive

    async def _route(self, method: str, path: str, body: dict[str, Any] | None,
                     writer: asyncio.StreamWriter, keep_alive: bool) -> None:
        if path == "/health":
            code = 200 if self.config.healthy else 503
            await _send(writer, code, b"", keep_alive, "application/json")
        elif path == "/v1/models":
            data = {"object": "list", "data": [{
                "id": self.config.model, "object": "model", "created": int(time.time()),
                "owned_by": "vllm", "root": self.config.model, "parent": None,
                "max_model_len": self.config.max_model_len}]}
            await _send(writer, 200, json.dumps(data).encode(), keep_alive)
        elif path == "/reset_prefix_cache" and self.config.dev_mode:
            if method != "POST":
                raise HttpError(405, "Method Not Allowed")
            self.cache_resets += 1
            self._seen_blocks.clear()
            await _send(writer, 200, json.dumps({"success": True}).encode(), keep_alive)
        elif path == "/metrics":
            await _send(writer, 200, self.metrics_text().encode(), keep_alive,
                        "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/tokenize":
            if method != "POST":
                raise HttpError(405, "Method Not Allowed")
            await _send(writer, 200, json.dumps(self.tokenize(body or {})).encode(),
                        keep_alive)
        elif path == "/v1/completions" and not (body or {}).get("stream"):
            if method != "POST":
                raise HttpError(405, "Method Not Allowed")
            await _send(writer, 200, json.dumps(self.complete(body or {})).encode(),
                        keep_alive)
        elif path in ("/v1/completions", "/v1/chat/completions"):
            if method != "POST":
                raise HttpError(405, "Method Not Allowed")
            await self._generate(path, body or {}, writer, keep_alive)
        else:
            raise HttpError(404, "Not Found")

    # -- generation -------------------------------------------------------------------------

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /tokenize: a prompt (BOS added unless add_special_tokens is false) or
        messages through the toy chat template."""
        cfg = self.config
        if body.get("model") not in (None, cfg.model):
            raise HttpError(404, f"The model `{body.get('model')}` does not exist.")
        if cfg.poison and cfg.poison in prompt_text(body):
            raise HttpError(400, "The prompt is poisoned (fake server).", "prompt")
        if "messages" in body:
            ids = self.lm.chat(body["messages"], bool(body.get("add_generation_prompt",
                                                                 True)))
        elif isinstance(body.get("prompt"), str):
            ids = self.lm.encode(body["prompt"], bool(body.get("add_special_tokens", True)))
        else:
            raise HttpError(400, "give 'prompt' (a string) or 'messages'", "prompt")
        return {"count": len(ids), "max_model_len": cfg.max_model_len, "tokens": ids,
                "token_strs": None}

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed /v1/completions answered by the toy model: greedy whatever the
        sampling settings, with vLLM's `return_token_ids` and `prompt_logprobs`."""
        self.generation_requests += 1
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = self.lm.encode(prompt, bool(body.get("add_special_tokens", True)))
        elif isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise HttpError(400, "the fake answers one prompt: a string or a list of token "
                                 "ids", "prompt")
        for t in ids:
            if not 0 <= t < self.config.vocab_size:
                raise HttpError(400, f"Token id {t} is out of vocabulary")
        n_prompt, n_out = self._validate(body, False, len(ids))
        if n_out < 1:
            raise HttpError(400, f"max_tokens must be at least 1, got {n_out}.",
                            "max_tokens")
        top = body.get("prompt_logprobs")
        if top is not None and self.config.refuse_prompt_logprobs:
            raise HttpError(400, "prompt_logprobs is not supported by this server (fake).",
                            "prompt_logprobs")
        if top is not None and (not isinstance(top, int) or top < 0):
            raise HttpError(400, "`prompt_logprobs` must be a positive value or -1.",
                            "prompt_logprobs")
        out = self.lm.greedy(ids, n_out, bool(body.get("ignore_eos")))
        c = self.counters
        c.prompt_tokens += n_prompt
        c.generation_tokens += len(out)
        c.succeeded += 1
        with_ids = bool(body.get("return_token_ids"))
        choice = {
            "index": 0, "text": self.lm.decode(out), "logprobs": None,
            "finish_reason": "stop" if out[-1] == FakeLm.EOS and len(out) < n_out
            else "length", "stop_reason": None,
            "token_ids": out if with_ids else None,
            "prompt_logprobs": None if top is None else self.lm.prompt_logprobs(ids, top),
            "prompt_token_ids": ids if with_ids else None}
        return {"id": "cmpl-" + uuid.uuid4().hex[:16], "object": "text_completion",
                "created": int(time.time()), "model": self.config.model,
                "choices": [choice], "usage": {
                    "prompt_tokens": n_prompt, "total_tokens": n_prompt + len(out),
                    "completion_tokens": len(out)}}

    def _validate(self, body: dict[str, Any], chat: bool, n_prompt: int | None = None
                  ) -> tuple[int, int]:
        """(prompt tokens, tokens to generate) or HttpError like vLLM's."""
        cfg = self.config
        if body.get("model") not in (None, cfg.model):
            raise HttpError(404, f"The model `{body.get('model')}` does not exist.")
        if chat and not body.get("messages"):
            raise HttpError(400, "messages must not be empty", "messages")
        if cfg.poison and cfg.poison in prompt_text(body):
            raise HttpError(400, "The prompt is poisoned (fake server).", "prompt")
        n_prompt = prompt_tokens(body) if n_prompt is None else n_prompt
        limit = cfg.max_model_len
        requested = body.get("max_tokens", body.get("max_completion_tokens"))
        max_tokens = limit - n_prompt if requested is None else int(requested)
        if cfg.length_policy == "reject":
            if n_prompt + max_tokens > limit:
                raise HttpError(
                    400, f"This model's maximum context length is {limit} tokens. However, "
                    f"you requested {n_prompt + max_tokens} tokens ({n_prompt} in the "
                    f"messages, {max_tokens} in the completion). Please reduce the length "
                    "of the messages or completion.", "input_tokens")
            return n_prompt, max_tokens
        if n_prompt > limit:
            raise HttpError(
                400, f"This model's maximum context length is {limit} tokens. However, "
                f"your prompt contains {n_prompt} input tokens, which exceeds this limit "
                "even without any output tokens. Please reduce the length of the input "
                "prompt.", "input_tokens")
        if max_tokens > limit:
            raise HttpError(400, f"max_tokens={max_tokens} cannot be greater than "
                                 f"max_model_len={limit}. Please request fewer output "
                                 "tokens.", "max_tokens")
        return n_prompt, min(max_tokens, limit - n_prompt)

    def _prefix_hits(self, body: dict[str, Any], n_prompt: int) -> int:
        """Full leading blocks already seen under the same cache_salt, like vLLM's
        chained block hashes."""
        words = prompt_text(body).split()
        salt = "" if self.config.ignore_cache_salt else str(body.get("cache_salt", ""))
        digest = hashlib.sha256(salt.encode()).digest()
        hits, hitting = 0, True
        for start in range(0, len(words) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            block = " ".join(words[start:start + BLOCK_TOKENS]).encode()
            digest = hashlib.sha256(digest + block).digest()
            if hitting and digest in self._seen_blocks:
                hits += BLOCK_TOKENS
            else:
                hitting = False
                self._seen_blocks.add(digest)
        return min(hits, n_prompt)

    async def _generate(self, path: str, body: dict[str, Any],
                        writer: asyncio.StreamWriter, keep_alive: bool) -> None:
        cfg = self.config
        self.generation_requests += 1
        if cfg.die_after_requests is not None and \
                self.generation_requests > cfg.die_after_requests:
            (cfg.on_die or _die)()
        if cfg.error_after_requests is not None and \
                self.generation_requests > cfg.error_after_requests:
            if self.generation_requests == cfg.error_after_requests + 1 and cfg.on_error:
                cfg.on_error()
            raise HttpError(500, "EngineCore encountered an issue. See stack trace (above) "
                                 "for the root cause.")
        chat = path.endswith("chat/completions")
        n_prompt, n_out = self._validate(body, chat)
        if not body.get("stream"):
            raise HttpError(400, "the fake server only streams; set stream=true", "stream")
        c = self.counters
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if cfg.preempt_above is not None and self.in_flight > cfg.preempt_above:
            c.preemptions += 1
        c.prompt_tokens += n_prompt
        c.prefix_queries += n_prompt
        hits = self._prefix_hits(body, n_prompt)
        c.prefix_hits += hits
        c.live_tokens += n_prompt
        generated = 0
        released = False
        try:
            await _start_stream(writer, keep_alive)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:16]
            head = {"id": rid, "object": "chat.completion.chunk" if chat
                    else "text_completion", "created": int(time.time()),
                    "model": cfg.model}
            per_chunk = max(cfg.tokens_per_chunk, int(body.get("stream_interval") or 1))
            prefill_s = cfg.first_token_delay_s + cfg.prefill_s_per_token * (n_prompt - hits)
            instant = cfg.token_delay_s <= 0 and prefill_s <= 0
            out: list[bytes] = []  # instant answers go out in one write
            if chat:  # vLLM opens chat streams with a role-only chunk
                out.append(_event({**head, "choices": [{
                    "index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": None, "finish_reason": None}]}))
            if not instant:
                await _flush(writer, out)
                await asyncio.sleep(prefill_s)
            while generated < n_out:
                if cfg.stall_after_tokens is not None and \
                        c.generation_tokens >= cfg.stall_after_tokens:
                    await _flush(writer, out)
                    await asyncio.Event().wait()  # a hung engine: the stream stays open
                if generated and not instant:
                    await asyncio.sleep(cfg.token_delay_s)
                k = min(per_chunk, n_out - generated)
                text = "".join(f" w{(generated + i) % 97}" for i in range(k))
                generated += k
                c.generation_tokens += k
                c.live_tokens += k
                finish = "length" if generated == n_out else None
                choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                          "finish_reason": finish, "stop_reason": None}
                if chat:
                    choice["delta"] = {"content": text}
                else:
                    choice["text"] = text
                out.append(_event({**head, "choices": [choice]}))
                if not instant:
                    await _flush(writer, out)
            if (body.get("stream_options") or {}).get("include_usage"):
                out.append(_event({**head, "choices": [], "usage": {
                    "prompt_tokens": n_prompt, "total_tokens": n_prompt + n_out,
                    "completion_tokens": n_out}}))
            out.append(b"data: [DONE]\n\n")
            # Account before the last bytes leave: the client may act on [DONE] (send its
            # next request, scrape /metrics) before this task runs again.
            c.succeeded += 1
            self._release(n_prompt + generated)
            released = True
            await _flush(writer, out, last=True)
        finally:
            if not released:
                self._release(n_prompt + generated)

    def _release(self, tokens: int) -> None:
        self.in_flight -= 1
        self.counters.live_tokens -= tokens

    # -- /metrics ---------------------------------------------------------------------------

    def metrics_text(self) -> str:
        """Prometheus text in prometheus_client's layout, as vLLM exposes it."""
        c = self.counters
        labels = f'engine="0",model_name="{self.config.model}"'
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, value: float,
                   extra: str = "") -> None:
            lab = labels + (f",{extra}" if extra else "")
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name}{{{lab}}} {float(value)}")
            if kind == "counter":
                created = name.removesuffix("_total") + "_created"
                lines.append(f"# HELP {created} {help_}")
                lines.append(f"# TYPE {created} gauge")
                lines.append(f"{created}{{{lab}}} {c.created_s}")

        metric("vllm:num_requests_running", "gauge",
               "Number of requests in model execution batches.", self.in_flight)
        metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be "
               "processed.", 0)
        metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent "
               "usage.", min(1.0, c.live_tokens / KV_CAPACITY_TOKENS))
        metric("vllm:num_preemptions_total", "counter",
               "Cumulative number of preemption from the engine.", c.preemptions)
        metric("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in "
               "terms of number of queried tokens.", c.prefix_queries)
        metric("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of "
               "number of cached tokens.", c.prefix_hits)
        metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
               c.prompt_tokens)
        metric("vllm:generation_tokens_total", "counter", "Number of generation tokens "
               "processed.", c.generation_tokens)
        metric("vllm:request_success_total", "counter", "Count of successfully processed "
               "requests.", c.succeeded, 'finished_reason="length"')
        return "\n".join(lines) + "\n"


# -- wire helpers -----------------------------------------------------------------------------

def _error_json(message: str, status: int, param: str | None = None) -> bytes:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "Error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param,
                                 "code": status}}).encode()


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, keep_alive: bool,
                content_type: str = "application/json") -> None:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
            f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    writer.write(head.encode() + body)
    await writer.drain()


async def _start_stream(writer: asyncio.StreamWriter, keep_alive: bool) -> None:
    writer.write(("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                  "transfer-encoding: chunked\r\n"
                  f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
                  ).encode())


async def _flush(writer: asyncio.StreamWriter, events: list[bytes], last: bool = False
                 ) -> None:
    """Write the pending SSE events as one HTTP chunk (and the terminating chunk)."""
    data = b"".join(events)
    events.clear()
    payload = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
    writer.write(payload + (b"0\r\n\r\n" if last else b""))
    await writer.drain()


def _die() -> None:
    # What a dying engine leaves in the log before the API server goes down with it.
    sys.stderr.write("ERROR 01-01 00:00:00 [core.py:1510] EngineCore encountered a fatal "
                     "error.\nRuntimeError: CUDA error: an illegal memory access was "
                     "encountered\n")
    sys.stderr.flush()
    os._exit(1)


# -- script ---------------------------------------------------------------------------------

def config_from_args(argv: list[str] | None = None) -> tuple[FakeConfig, str, int]:
    p = argparse.ArgumentParser(description="A fake vLLM OpenAI-compatible server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="fake-model")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--token-delay-s", type=float, default=0.0)
    p.add_argument("--first-token-delay-s", type=float, default=0.0)
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--length-policy", choices=["reject", "clamp"], default="reject")
    p.add_argument("--die-after-requests", type=int, default=None)
    p.add_argument("--never-healthy", action="store_true")
    a = p.parse_args(argv)
    cfg = FakeConfig(model=a.model, max_model_len=a.max_model_len,
                     token_delay_s=a.token_delay_s, first_token_delay_s=a.first_token_delay_s,
                     tokens_per_chunk=a.tokens_per_chunk, length_policy=a.length_policy,
                     die_after_requests=a.die_after_requests, healthy=not a.never_healthy)
    return cfg, a.host, a.port


async def serve(config: FakeConfig, host: str, port: int,
                ready: Callable[[str], None] | None = None) -> None:
    """Serve until cancelled (script mode)."""
    fake = FakeVllm(config, host, port)
    url = await fake.start()
    if ready:
        ready(url)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.close()


def main(argv: list[str] | None = None) -> None:
    config, host, port = config_from_args(argv)

    def ready(url: str) -> None:
        print(f"INFO:     Uvicorn running on {url} (Press CTRL+C to quit)", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, host, port, ready))


if __name__ == "__main__":
    main()
