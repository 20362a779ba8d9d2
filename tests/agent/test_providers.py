"""Providers: `--llm` parsing, key resolution (explicit > environment, never required for
local servers), clients built on the real SDKs, and how each wire failure is classified
(retry or stop with one line), all against the fake provider on 127.0.0.1."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator

import pytest

from aevyra_forge.agent.providers import (
    PROVIDERS,
    ChatClient,
    ChatTurn,
    ProviderUnavailable,
    check_reachable,
    connect,
    parse_spec,
    resolve_key,
)
from aevyra_forge.core.errors import AgentError, UsageError
from tests.fake_provider import Fail, FakeProvider, Reply

HI = [ChatTurn("user", "hi")]


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as server:
        yield server


def _client(fake: FakeProvider, wire: str, key: str = "SECRET-1") -> ChatClient:
    provider = PROVIDERS["anthropic" if wire == "anthropic" else "openrouter"]
    url = fake.url if wire == "anthropic" else fake.openai_url
    return connect(provider, "some-model", key, url, timeout_s=2.0)


def test_every_provider_is_registered() -> None:
    assert set(PROVIDERS) == {"anthropic", "openai", "openrouter", "together", "groq",
                              "fireworks", "deepinfra", "mistral", "ollama", "lmstudio"}
    for p in PROVIDERS.values():
        if p.local:
            assert p.base_url is not None and p.base_url.startswith("http://localhost:")
        elif p.name != "anthropic":
            assert p.base_url is not None and p.base_url.startswith("https://")
            assert p.key_env == f"{p.name.upper()}_API_KEY"
    assert PROVIDERS["deepinfra"].base_url == "https://api.deepinfra.com/v1/openai"
    assert PROVIDERS["groq"].base_url == "https://api.groq.com/openai/v1"


@pytest.mark.parametrize(("spec", "provider", "model"), [
    ("anthropic/claude-sonnet-4-6", "anthropic", "claude-sonnet-4-6"),
    ("openrouter/anthropic/claude-sonnet-4-6", "openrouter", "anthropic/claude-sonnet-4-6"),
    ("together/meta-llama/Llama-3.3-70B-Instruct-Turbo", "together",
     "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
    ("ollama/qwen2.5:7b", "ollama", "qwen2.5:7b"),
])
def test_parse_spec(spec: str, provider: str, model: str) -> None:
    got, name = parse_spec(spec)
    assert (got.name, name) == (provider, model)


@pytest.mark.parametrize("spec", ["nope/model", "anthropic/", "anthropic", "gpt-4o"])
def test_parse_spec_rejects(spec: str) -> None:
    with pytest.raises(UsageError, match="PROVIDER/MODEL"):
        parse_spec(spec)


def test_key_precedence_and_missing_key() -> None:
    groq = PROVIDERS["groq"]
    env = {"GROQ_API_KEY": "from-env"}
    assert resolve_key(groq, "explicit", env=env) == "explicit"
    assert resolve_key(groq, None, env=env) == "from-env"
    assert resolve_key(groq, "", env=env) == "from-env"
    with pytest.raises(AgentError) as exc:
        resolve_key(groq, None, env={})
    message = str(exc.value)
    assert "GROQ_API_KEY" in message and "--llm builtin" in message and "\n" not in message


def test_local_and_custom_servers_need_no_key() -> None:
    assert resolve_key(PROVIDERS["ollama"], None, env={}) is None
    assert resolve_key(PROVIDERS["lmstudio"], None, env={}) is None
    # A local vLLM behind --llm-base-url: no key unless one is given or set.
    assert resolve_key(PROVIDERS["openai"], None, "http://127.0.0.1:8000/v1", env={}) is None


@pytest.mark.parametrize("wire", ["anthropic", "openai"])
def test_round_trip_through_the_sdk(fake: FakeProvider, wire: str) -> None:
    fake.script(Reply("hello", input_tokens=11, output_tokens=3))
    done = _client(fake, wire).complete("be brief", HI, 77)
    assert (done.text, done.input_tokens, done.output_tokens) == ("hello", 11, 3)
    rec = fake.requests[0]
    assert rec.wire == wire and rec.key == "SECRET-1"
    assert rec.system == "be brief" and rec.last_user == "hi"
    assert rec.body["model"] == "some-model"
    assert rec.body.get("max_tokens") == 77


def test_openai_itself_gets_max_completion_tokens(fake: FakeProvider) -> None:
    client = connect(PROVIDERS["openai"], "gpt-5", "k", fake.openai_url, timeout_s=2.0)
    client.complete("s", HI, 55)
    assert fake.requests[0].body.get("max_completion_tokens") == 55
    assert "max_tokens" not in fake.requests[0].body


def test_missing_usage_is_reported_as_unknown(fake: FakeProvider) -> None:
    fake.script(Reply("x", usage=False))
    done = _client(fake, "openai").complete("s", HI, 10)
    assert done.input_tokens is None and done.output_tokens is None


@pytest.mark.parametrize("wire", ["anthropic", "openai"])
@pytest.mark.parametrize(("status", "retry_after"), [
    (429, 0.25), (500, None), (503, None), (529, None), (408, None)])
def test_transient_failures_are_retryable(fake: FakeProvider, wire: str, status: int,
                                          retry_after: float | None) -> None:
    headers = {"retry-after-ms": "250"} if retry_after else {}
    fake.script(Fail(status, headers=headers))
    with pytest.raises(ProviderUnavailable) as exc:
        _client(fake, wire).complete("s", HI, 10)
    assert f"HTTP {status}" in str(exc.value)
    assert exc.value.retry_after_s == retry_after


def test_retry_after_in_seconds_and_absurd_values(fake: FakeProvider) -> None:
    fake.script(Fail(429, headers={"retry-after": "2"}), Fail(429, headers={
        "retry-after": "86400"}))
    client = _client(fake, "openai")
    for expected in (2.0, None):
        with pytest.raises(ProviderUnavailable) as exc:
            client.complete("s", HI, 10)
        assert exc.value.retry_after_s == expected


@pytest.mark.parametrize("wire", ["anthropic", "openai"])
@pytest.mark.parametrize(("status", "needle"), [
    (401, "rejected the API key"), (403, "rejected the API key"),
    (404, "does not serve model 'some-model'"), (400, "refused the request (HTTP 400")])
def test_fatal_failures_say_why(fake: FakeProvider, wire: str, status: int,
                                needle: str) -> None:
    fake.script(Fail(status, message="scripted failure"))
    with pytest.raises(AgentError) as exc:
        _client(fake, wire).complete("s", HI, 10)
    message = str(exc.value)
    assert needle in message and "\n" not in message
    assert "SECRET-1" not in message


def test_nothing_listening_is_retryable() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = connect(PROVIDERS["openai"], "m", "k", f"http://127.0.0.1:{port}/v1",
                     timeout_s=1.0)
    with pytest.raises(ProviderUnavailable, match="cannot connect"):
        client.complete("s", HI, 10)


@pytest.mark.parametrize(("module", "spec", "needle"), [
    ("openai", "openrouter", "pip install 'aevyra-forge[openai]'"),
    ("anthropic", "anthropic", "pip install anthropic"),
])
def test_missing_sdk_is_one_line(monkeypatch: pytest.MonkeyPatch, module: str, spec: str,
                                 needle: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(AgentError) as exc:
        connect(PROVIDERS[spec], "m", "k")
    assert needle in str(exc.value) and "--llm builtin" in str(exc.value)


# -- the check before the baseline ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("wire", ["anthropic", "openai"])
def test_the_check_lists_models_with_the_key_and_costs_no_tokens(fake: FakeProvider,
                                                                  wire: str) -> None:
    check_reachable(_client(fake, wire), "x/some-model", fake.url)
    (headers,) = fake.models_asked
    assert "SECRET-1" in (headers.get("x-api-key", "") + headers.get("authorization", ""))
    assert fake.requests == []  # no chat call: nothing billed, nothing scripted consumed


@pytest.mark.parametrize("wire", ["anthropic", "openai"])
@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_is_one_line_naming_builtin(fake: FakeProvider, wire: str,
                                                  status: int) -> None:
    fake.models_reply = Fail(status, message="invalid x-api-key SECRET-1")
    with pytest.raises(AgentError) as exc:
        check_reachable(_client(fake, wire), "x/some-model", fake.url)
    message = str(exc.value)
    assert f"rejected the API key (HTTP {status})" in message
    assert "--llm builtin" in message and "\n" not in message
    assert "SECRET-1" not in message


@pytest.mark.parametrize("status", [404, 405, 429])
def test_a_server_without_a_models_list_or_busy_counts_as_reachable(
        fake: FakeProvider, status: int) -> None:
    fake.models_reply = Fail(status)
    check_reachable(_client(fake, "openai"), "x/some-model", fake.openai_url)
    assert len(fake.models_asked) == 1


@pytest.mark.parametrize("status", [500, 503])
def test_a_failing_server_is_unreachable(fake: FakeProvider, status: int) -> None:
    fake.models_reply = Fail(status)
    with pytest.raises(AgentError, match=rf"unreachable at {fake.url} \(HTTP {status}\)"):
        check_reachable(_client(fake, "anthropic"), "x/some-model", fake.url)


def test_nothing_listening_is_unreachable_without_the_credentials_in_the_url() -> None:
    url = f"http://me:pw-SECRET@127.0.0.1:{_free_port()}/v1"
    client = connect(PROVIDERS["openai"], "m", "SECRET-1", url, timeout_s=1.0)
    with pytest.raises(AgentError) as exc:
        check_reachable(client, "openai/m", url, timeout_s=1.0)
    message = str(exc.value)
    assert message.startswith("openai/m is unreachable at http://REDACTED@127.0.0.1:")
    assert "(cannot connect); check the network and --llm-base-url, or use --llm " \
        "builtin" in message
    assert "SECRET" not in message
