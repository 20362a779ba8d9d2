"""LLM providers behind `--llm provider/model`: where each one lives, which variable holds
its key, and a small chat client over the official SDK (anthropic for Anthropic, openai
for every OpenAI-compatible service). Keys resolve explicit option > environment and
live only in memory; SDK failures become either a retryable ProviderUnavailable or a
one-line AgentError."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from aevyra_forge.core.errors import AgentError, UsageError
from aevyra_forge.core.redact import redact_url

Wire = Literal["anthropic", "openai"]
Role = Literal["user", "assistant"]
NO_KEY = "no-key-needed"  # the SDKs insist on a key; local servers ignore it
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx
MAX_RETRY_AFTER_S = 60.0  # a server asking us to wait longer is treated as down
_MESSAGE_CHARS = 200  # of a provider's error message quoted back to the user
PREFLIGHT_TIMEOUT_S = 20.0  # the check before the baseline: a live API answers in ~1 s
NO_MODELS_LIST = frozenset({404, 405, 501})  # a compatible server without GET /models


@dataclass(frozen=True)
class Provider:
    name: str
    wire: Wire
    base_url: str | None  # None: the SDK's own default endpoint
    key_env: str | None  # None: a local server that needs no key

    @property
    def local(self) -> bool:
        return self.key_env is None


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("anthropic", "anthropic", None, "ANTHROPIC_API_KEY"),
    Provider("openai", "openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
    Provider("openrouter", "openai", "https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    Provider("together", "openai", "https://api.together.ai/v1", "TOGETHER_API_KEY"),
    Provider("groq", "openai", "https://api.groq.com/openai/v1", "GROQ_API_KEY"),
    Provider("fireworks", "openai", "https://api.fireworks.ai/inference/v1",
             "FIREWORKS_API_KEY"),
    Provider("deepinfra", "openai", "https://api.deepinfra.com/v1/openai",
             "DEEPINFRA_API_KEY"),
    Provider("mistral", "openai", "https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
    Provider("ollama", "openai", "http://localhost:11434/v1", None),
    Provider("lmstudio", "openai", "http://localhost:1234/v1", None),
)}


@dataclass(frozen=True)
class ChatTurn:
    role: Role
    content: str


@dataclass(frozen=True)
class Completion:
    """One reply. Token counts are None when the server did not report them."""

    text: str
    input_tokens: int | None
    output_tokens: int | None


class ProviderUnavailable(Exception):
    """A failure worth retrying (rate limit, 5xx, timeout, connection refused)."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class ChatClient(Protocol):
    def complete(self, system: str, turns: Sequence[ChatTurn], max_tokens: int
                 ) -> Completion: ...


def parse_spec(spec: str) -> tuple[Provider, str]:
    """`provider/model` -> (provider, model). The model may itself contain slashes
    (openrouter's anthropic/claude-sonnet-4-6, together's meta-llama/...)."""
    name, _, model = spec.partition("/")
    provider = PROVIDERS.get(name.strip().lower())
    if provider is None or not model.strip():
        raise UsageError(f"--llm {spec}: expected 'builtin' or PROVIDER/MODEL with PROVIDER "
                         f"one of {', '.join(PROVIDERS)}")
    return provider, model.strip()


def resolve_key(provider: Provider, explicit: str | None, base_url: str | None = None,
                env: Mapping[str, str] | None = None) -> str | None:
    """The API key: --llm-api-key, else the provider's variable. None when no key is
    needed (a local server, or a --llm-base-url server the user did not give a key for);
    otherwise a missing key is an AgentError naming the variable."""
    if explicit:
        return explicit
    environ = os.environ if env is None else env
    if provider.key_env and environ.get(provider.key_env):
        return environ[provider.key_env]
    if provider.local or base_url:
        return None
    raise AgentError(f"no API key for {provider.name}: set {provider.key_env} or pass "
                     "--llm-api-key, or use --llm builtin (offline, no key)")


def check_reachable(client: ChatClient, spec: str, url: str | None,
                    timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Before the baseline spends GPU time: one cheap call (the provider's models list,
    no tokens billed) that the provider answers and accepts the key. Unreachable, or the
    key refused, is an AgentError of one line naming `--llm builtin` (never the key); a
    server without a models list, or one rate-limiting us, is reachable enough."""
    check = getattr(client, "check", None)
    if check is None:  # a client without a cheap call: its first proposal will tell
        return
    try:
        check(timeout_s)
    except ProviderUnavailable as exc:
        at = f" at {redact_url(url)}" if url else ""
        hint = "check the network and --llm-base-url" if url else "check the network"
        raise AgentError(f"{spec} is unreachable{at} ({exc}); {hint}, or use --llm "
                         "builtin (offline, no key)") from None


def connect(provider: Provider, model: str, key: str | None, base_url: str | None = None,
            timeout_s: float = 90.0) -> ChatClient:
    """A client for `model` at `provider` (or at `base_url`, any server speaking the same
    wire format). Fails with one line when the SDK is not installed."""
    url = base_url or provider.base_url
    if provider.wire == "anthropic":
        return _AnthropicClient(provider, model, key or NO_KEY, url, timeout_s)
    return _OpenAIClient(provider, model, key or NO_KEY, url, timeout_s)


class _AnthropicClient:
    def __init__(self, provider: Provider, model: str, key: str, url: str | None,
                 timeout_s: float) -> None:
        try:
            import anthropic
        except ImportError:
            raise AgentError(f"--llm {provider.name}/{model} needs the 'anthropic' package: "
                             "pip install anthropic, or use --llm builtin") from None
        self._sdk: Any = anthropic
        self.provider, self.model = provider, model
        # Retries are ours (bounded, with a backoff the tests can shorten), not the SDK's.
        self._client = anthropic.Anthropic(api_key=key, base_url=url, max_retries=0,
                                           timeout=timeout_s)

    def complete(self, system: str, turns: Sequence[ChatTurn], max_tokens: int
                 ) -> Completion:
        try:
            messages: list[Any] = [{"role": t.role, "content": t.content} for t in turns]
            reply = self._client.messages.create(
                model=self.model, max_tokens=max_tokens, system=system, messages=messages)
        except self._sdk.APIError as exc:
            raise _translate(exc, self._sdk, self.provider, self.model) from None
        text = "".join(getattr(block, "text", "") for block in reply.content
                       if getattr(block, "type", "") == "text")
        usage = reply.usage
        return Completion(text, usage.input_tokens, usage.output_tokens)

    def check(self, timeout_s: float) -> None:
        """GET /v1/models (check_reachable)."""
        _check(lambda: self._client.models.list(limit=1, timeout=timeout_s), self._sdk,
               self.provider, self.model)


class _OpenAIClient:
    def __init__(self, provider: Provider, model: str, key: str, url: str | None,
                 timeout_s: float) -> None:
        try:
            import openai
        except ImportError:
            raise AgentError(f"--llm {provider.name}/{model} needs the 'openai' package: "
                             "pip install 'aevyra-forge[openai]', or use --llm "
                             "builtin") from None
        self._sdk: Any = openai
        self.provider, self.model = provider, model
        self._client = openai.OpenAI(api_key=key, base_url=url, max_retries=0,
                                     timeout=timeout_s)

    def complete(self, system: str, turns: Sequence[ChatTurn], max_tokens: int
                 ) -> Completion:
        messages: list[Any] = [{"role": "system", "content": system}]
        messages += [{"role": t.role, "content": t.content} for t in turns]
        try:
            # OpenAI's newer models refuse max_tokens; most compatible servers only know it.
            if self.provider.name == "openai":
                reply = self._client.chat.completions.create(
                    model=self.model, messages=messages, max_completion_tokens=max_tokens)
            else:
                reply = self._client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=max_tokens)
        except self._sdk.APIError as exc:
            raise _translate(exc, self._sdk, self.provider, self.model) from None
        text = (reply.choices[0].message.content or "") if reply.choices else ""
        usage = reply.usage
        if usage is None:
            return Completion(text, None, None)
        return Completion(text, usage.prompt_tokens, usage.completion_tokens)

    def check(self, timeout_s: float) -> None:
        """GET {base}/models (check_reachable)."""
        _check(lambda: self._client.models.list(timeout=timeout_s), self._sdk,
               self.provider, self.model)


def _check(call: Callable[[], object], sdk: Any, provider: Provider, model: str) -> None:
    """Run a models-list call; the SDK's failures as check_reachable reads them."""
    try:
        call()
    except sdk.APIStatusError as exc:
        code = int(exc.status_code)
        if code in NO_MODELS_LIST or code in RETRYABLE_STATUS:
            return  # it answered: no list to read, or busy, but there
        raise _translate(exc, sdk, provider, model) from None
    except sdk.APIError as exc:
        raise _translate(exc, sdk, provider, model) from None


def _translate(exc: Exception, sdk: Any, provider: Provider, model: str) -> Exception:
    """An SDK exception as ProviderUnavailable (retry) or AgentError (stop, say why)."""
    name = provider.name
    if isinstance(exc, sdk.APITimeoutError):
        return ProviderUnavailable("the request timed out")
    if isinstance(exc, sdk.APIConnectionError):
        return ProviderUnavailable("cannot connect")
    if isinstance(exc, sdk.APIStatusError):
        code = int(exc.status_code)
        message = _short(getattr(exc, "message", "") or str(exc))
        if code in RETRYABLE_STATUS or code >= 500:
            return ProviderUnavailable(f"HTTP {code}", _retry_after(exc.response.headers))
        if code in (401, 403):
            where = f"{provider.key_env} or --llm-api-key" if provider.key_env else \
                "--llm-api-key"
            return AgentError(f"{name} rejected the API key (HTTP {code}): check {where}, "
                              "or use --llm builtin")
        if code == 404:
            return AgentError(f"{name} does not serve model '{model}' (HTTP 404: {message}); "
                              "check the model name in --llm")
        return AgentError(f"{name} refused the request (HTTP {code}: {message}); check "
                          "--llm and --llm-base-url, or use --llm builtin")
    return AgentError(f"{name} sent a reply forge cannot read ({type(exc).__name__}: "
                      f"{_short(str(exc))}); check --llm-base-url, or use --llm builtin")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait (retry-after-ms, else retry-after)."""
    for header, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(header)
        if raw is None:
            continue
        try:
            value = float(raw) / scale
        except ValueError:
            continue
        if 0 <= value <= MAX_RETRY_AFTER_S:
            return value
    return None


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MESSAGE_CHARS else flat[:_MESSAGE_CHARS - 3] + "..."
