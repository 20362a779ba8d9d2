"""Measuring a server the way `vllm bench serve` does: an async streaming client that
replays a workload (closed or open loop), times every request, and hands each pass to
metrics.py for aggregation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from aevyra_forge.core.slo import Slo
from aevyra_forge.core.values import BenchMetrics, IsolationMethod, PassIsolation
from aevyra_forge.core.workload import Request, Workload
from aevyra_forge.measure.isolation import IsolationCheck, check_passes, isolation
from aevyra_forge.measure.metrics import RequestResult, aggregate, counter_deltas

Clock = Callable[[], float]
WARMUP_OUTPUT_TOKENS = 16
_WARMUP_WORDS = ("amber", "basalt", "cobalt", "delta", "ember", "fjord", "granite", "harbor",
                 "indigo", "juniper", "kelp", "lumen", "meadow", "nickel", "onyx", "prairie")


@dataclass(frozen=True)
class BenchConfig:
    """How to replay a workload. `cache_salt` isolates each pass's prefix cache so a second
    pass is not flattered by the first one's cached prompts."""

    concurrency: int = 8
    request_timeout_s: float = 600.0
    bench_timeout_s: float = 3600.0
    warmup_requests: int = 2
    passes: int = 1
    slo: Slo | None = None  # per-request bounds for goodput
    # when salted passes prove not independent, reset the cache or add a warm pass
    # (False only to measure what the fallback saves)
    isolation_fallback: bool = True
    # asked after each timed pass whether the passes so far already decide the verdict
    # (decide.stats.sequential_look): True ends the bench before `passes`
    stop: Callable[[Sequence[BenchMetrics]], bool] | None = None


@dataclass
class Progress:
    """What a stall watchdog watches while a bench runs: how many requests are in flight,
    and when (on the bench clock) the latest token arrived or, after an idle spell, the
    first request of a busy one was sent."""

    in_flight: int = 0
    last_token_s: float = 0.0
    # told (k, n) as timed pass k of n begins (the warm-up not counted), for progress lines
    on_pass: Callable[[int, int], None] | None = None


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The header a server started with an API key (vLLM's --api-key / VLLM_API_KEY)
    demands on /v1; none without a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def request_payload(req: Request, model: str, salt: str | None) -> tuple[str, dict[str, Any]]:
    """The endpoint path and JSON body for one request: greedy, fixed length, streamed."""
    body: dict[str, Any] = {
        "model": model, "max_tokens": req.expected_output_tokens, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    if salt:
        body["cache_salt"] = salt
    if req.messages is not None:
        body["messages"] = [m.model_dump() for m in req.messages]
        return "/v1/chat/completions", body
    body["prompt"] = req.prompt
    return "/v1/completions", body


def _quick_token(data: bytes) -> bool:
    """True when a compact (vLLM-serialised) chunk surely carries tokens and nothing else
    we need (no error, no usage): parsing thousands of such chunks a second was the bench
    client's main cost. Anything else, e.g. JSON with spaces, goes to the full parser.
    Quotes inside generated text are escaped, so the markers cannot come from the text."""
    if b'"error"' in data or b'"usage":{' in data or b'"choices":[{' not in data:
        return False
    if b'"delta":' not in data:  # completions: any chunk with a choice
        return True
    return b'"content":"' in data and b'"content":""' not in data


def _token_bearing(chunk: Mapping[str, Any]) -> bool:
    """A chunk that carries generated tokens: vllm bench serve's rule (any chunk with a
    choice), except that in a chat stream the opening role-only chunk carries none. The
    finishing chunk always does: vLLM sends it with an empty delta when the last tokens'
    text is held back (an incomplete UTF-8 sequence), and it marks the last token."""
    choices = chunk.get("choices") or []
    if not choices:
        return False
    choice = choices[0]
    delta = choice.get("delta")
    if delta is None:  # completions
        return True
    return bool(delta.get("content") or delta.get("reasoning_content")
                or delta.get("reasoning") or delta.get("tool_calls")
                or choice.get("finish_reason"))


async def send_request(transport: httpx.AsyncBaseTransport, base_url: str, path: str,
                       body: Mapping[str, Any], timeout_s: float, clock: Clock,
                       start_offset_s: float = 0.0,
                       headers: Mapping[str, str] | None = None, *,
                       progress: Progress | None = None) -> RequestResult:
    """Stream one request and time it. Never raises for a server-side failure.

    It talks to an httpx transport directly: the client layer above it (URL merging,
    auth, cookies, redirects, hooks) is nothing a benchmark needs and cost a fifth of the
    request rate. `timeout_s` bounds the whole request (httpx's own timeout only bounds
    each read, which a slow but steady stream never trips). `progress`, when given, is
    told about the request and each of its tokens."""
    request = httpx.Request("POST", base_url + path, json=body, headers=headers,
                            extensions={"timeout": httpx.Timeout(timeout_s).as_dict()})
    result = RequestResult(start_s=start_offset_s)
    sent = clock()
    last = sent
    chunks = 0
    if progress is not None:
        if progress.in_flight == 0:  # a stall is counted from when work was pending
            progress.last_token_s = sent
        progress.in_flight += 1
    try:
        async with asyncio.timeout(timeout_s), _response(transport, request) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {_error_message(text)}"
                return result
            # Lines split by hand from the bytes: httpx's aiter_lines decodes to text first,
            # a measurable cost at thousands of chunks per second. The body is read to its
            # end (no break at [DONE]): a response left unread closes its connection, and a
            # new TCP connection per request made us slower than `vllm bench serve`.
            pending = b""
            async for piece in resp.aiter_bytes():
                *lines, pending = (pending + piece).split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    if _quick_token(data):  # the common case, without parsing the JSON
                        token, usage = True, None
                    else:
                        chunk = json.loads(data.decode())  # str skips encoding sniffing
                        if not isinstance(chunk, dict):
                            raise ValueError("a stream chunk is not a JSON object")
                        if "error" in chunk:
                            text = data.decode(errors="replace")
                            result.error = f"stream error: {_error_message(text)}"
                            return result
                        token, usage = _token_bearing(chunk), chunk.get("usage")
                    if token:
                        now = clock()
                        if progress is not None:
                            progress.last_token_s = now
                        if chunks == 0:
                            result.ttft_s = now - sent
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        chunks += 1
                    if usage:
                        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        result.output_tokens = int(usage.get("completion_tokens") or 0)
    except (TimeoutError, httpx.TimeoutException):
        result.error = f"timeout after {timeout_s:g} s"
        return result
    except httpx.HTTPError as exc:
        result.error = f"connection error: {type(exc).__name__}"
        return result
    except ValueError:  # bad JSON, bad UTF-8, a non-numeric usage count
        result.error = "malformed stream chunk"
        return result
    finally:
        if progress is not None:
            progress.in_flight -= 1
    if chunks == 0:
        result.error = "no tokens received"
        return result
    result.latency_s = last - sent
    wanted = body.get("max_tokens")
    if result.output_tokens and isinstance(wanted, int) and result.output_tokens < wanted:
        # vLLM (0.32) silently cuts max_tokens to fit max_model_len; a config that
        # generates fewer tokens must not look faster for it.
        result.error = (f"short output: {result.output_tokens} of {wanted} tokens "
                        "(prompt + max_tokens over max_model_len?)")
        return result
    result.output_tokens = result.output_tokens or chunks  # no usage chunk: count chunks
    result.success = True
    return result


@contextlib.asynccontextmanager
async def _response(transport: httpx.AsyncBaseTransport, request: httpx.Request
                    ) -> AsyncIterator[httpx.Response]:
    response = await transport.handle_async_request(request)
    try:
        yield response
    finally:
        await response.aclose()


def _error_message(text: str) -> str:
    try:
        data = json.loads(text)
        msg = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        text = str(msg)
    except (json.JSONDecodeError, AttributeError):
        pass
    return " ".join(text.split())[:200]


async def run_pass(transports: Sequence[httpx.AsyncBaseTransport], base_url: str,
                   model: str, requests: Sequence[Request], timeout_s: float, clock: Clock,
                   salt: str | None, headers: Mapping[str, str] | None = None, *,
                   progress: Progress | None = None) -> tuple[list[RequestResult], float]:
    """One replay: closed loop with one request in flight per transport, or open loop at
    the arrival offsets (capped by the number of transports) when the trace has them.
    Returns the results in trace order and the pass duration."""
    open_loop = any(r.arrival_offset_s is not None for r in requests)
    start = clock()
    if not open_loop:  # one worker per transport, each taking the next request in turn
        results: list[RequestResult | None] = [None] * len(requests)
        pending = iter(range(len(requests)))

        async def worker(transport: httpx.AsyncBaseTransport) -> None:
            for i in pending:
                path, body = request_payload(requests[i], model, salt)
                results[i] = await send_request(transport, base_url, path, body, timeout_s,
                                                clock, clock() - start, headers,
                                                progress=progress)

        await asyncio.gather(*(worker(t) for t in transports))
        return [r for r in results if r is not None], clock() - start
    idle: asyncio.Queue[httpx.AsyncBaseTransport] = asyncio.Queue()
    for transport in transports:
        idle.put_nowait(transport)

    async def one(req: Request) -> RequestResult:
        if open_loop:
            delay = (req.arrival_offset_s or 0.0) - (clock() - start)
            if delay > 0:
                await asyncio.sleep(delay)
        transport = await idle.get()
        try:
            path, body = request_payload(req, model, salt)
            return await send_request(transport, base_url, path, body, timeout_s, clock,
                                      clock() - start, headers, progress=progress)
        finally:
            idle.put_nowait(transport)

    replies = await asyncio.gather(*(one(r) for r in requests))
    return list(replies), clock() - start


def warmup_requests(count: int, seed: int) -> list[Request]:
    """Short prompts made of words that do not open any workload prompt, so warm-up does
    not seed the prefix cache for the timed requests (a distinct cache salt also keeps
    them apart)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        words = " ".join(rng.choice(_WARMUP_WORDS) for _ in range(24))
        out.append(Request(line=0, prompt=f"{i} {words}",
                           expected_output_tokens=WARMUP_OUTPUT_TOKENS))
    return out


@dataclass(frozen=True)
class BenchRun:
    """The timed passes of one bench and how they were kept independent."""

    passes: list[BenchMetrics]
    isolation: PassIsolation


async def bench_passes(base_url: str, model: str, workload: Workload, config: BenchConfig,
                       clock: Clock = time.perf_counter,
                       transport: httpx.AsyncBaseTransport | None = None,
                       scrape: Callable[[], Awaitable[dict[str, float]]] | None = None,
                       api_key: str | None = None, progress: Progress | None = None,
                       reset_cache: Callable[[], Awaitable[bool]] | None = None
                       ) -> list[BenchMetrics]:
    """The timed passes of `bench_run` (see there)."""
    run = await bench_run(base_url, model, workload, config, clock, transport, scrape,
                          api_key, progress, reset_cache)
    return run.passes


async def bench_run(base_url: str, model: str, workload: Workload, config: BenchConfig,
                    clock: Clock = time.perf_counter,
                    transport: httpx.AsyncBaseTransport | None = None,
                    scrape: Callable[[], Awaitable[dict[str, float]]] | None = None,
                    api_key: str | None = None, progress: Progress | None = None,
                    reset_cache: Callable[[], Awaitable[bool]] | None = None
                    ) -> BenchRun:
    """Warm up, then replay the workload `config.passes` times, each under its own cache
    salt. The whole bench is bounded by `config.bench_timeout_s` (asyncio.TimeoutError).
    `transport` (a test double) replaces the HTTP connections when given; `api_key` is
    sent with every request when the server demands one; `progress` is kept up to date
    for a stall watchdog.

    After the second pass the salting is checked (measure/isolation.py, from the
    prefix-cache counters `scrape` reads and pass 1's speed). When later passes hit cache
    pass 1 filled, `reset_cache` (the server's POST /reset_prefix_cache; False where it
    is not offered) is called before every later pass and pass 2 is measured again; when
    it cannot reset, or pass 1 was slow for another reason, pass 1 becomes an untimed warm
    pass and one more pass replaces it, so every timed pass sees the same cache state."""
    headers = auth_headers(api_key)
    # One transport, holding one keep-alive connection, per request in flight: a shared
    # pool scans every connection for every queued request, which made one pool the
    # bottleneck at high concurrency (64 req/s at 64 in flight on an instant server).
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()  # built once: loading the CA store takes ~50 ms
    run_id = f"{random.getrandbits(32):08x}"
    async with contextlib.AsyncExitStack() as stack:
        transports = [transport] * config.concurrency if transport else []
        while len(transports) < config.concurrency:
            own = httpx.AsyncHTTPTransport(limits=limits, verify=tls)
            stack.push_async_callback(own.aclose)
            transports.append(own)

        async def body() -> BenchRun:
            if config.warmup_requests:
                await run_pass(transports[:config.warmup_requests], base_url, model,
                               warmup_requests(config.warmup_requests, 0),
                               config.request_timeout_s, clock, f"forge-warmup-{run_id}",
                               headers, progress=progress)
            out: list[BenchMetrics] = []
            method: IsolationMethod = "salt"
            found: IsolationCheck | None = None
            sent = 0  # passes run, set-aside ones included: each gets a fresh salt
            while len(out) < config.passes:
                if progress is not None and progress.on_pass is not None:
                    progress.on_pass(len(out) + 1, config.passes)
                if method == "reset" and not (reset_cache and await reset_cache()):
                    # The reset stopped working: the cache now holds the last pass's
                    # prompts, so the cold passes so far cannot be pooled with what follows.
                    method, out = "warm_pass", []
                before = await scrape() if scrape else {}
                results, duration = await run_pass(
                    transports, base_url, model, workload.requests,
                    config.request_timeout_s, clock, f"forge-{run_id}-pass{sent}", headers,
                    progress=progress)
                sent += 1
                after = await scrape() if scrape else {}
                out.append(aggregate(results, duration, counter_deltas(before, after),
                                     slo=config.slo))
                if method == "salt" and found is None and len(out) == 2:
                    check = check_passes(out)
                    if not check.isolated:
                        found = check
                        method, out = await _fall_back(check, out, config, reset_cache)
                if config.stop is not None and len(out) < config.passes \
                        and config.stop(tuple(out)):
                    break
            if len(out) < 2:  # one pass asked for, or a stop after the first
                return BenchRun(out, isolation("unchecked", out))
            return BenchRun(out, isolation(method, out, found))

        return await asyncio.wait_for(body(), timeout=config.bench_timeout_s)


async def _fall_back(check: IsolationCheck, out: list[BenchMetrics], config: BenchConfig,
                     reset_cache: Callable[[], Awaitable[bool]] | None
                     ) -> tuple[IsolationMethod, list[BenchMetrics]]:
    """The method the remaining passes use, and the passes kept so far. A cache the salt
    did not separate is reset where the server allows it (pass 1 saw an empty cache of
    its prompts, so it stands; pass 2 is measured again after a reset); otherwise pass 1
    is the warm pass and pass 2, which ran warm, stands."""
    if not config.isolation_fallback:
        return "salt", out
    if check.leaked and reset_cache is not None and await reset_cache():
        return "reset", out[:1]
    return "warm_pass", out[1:]
