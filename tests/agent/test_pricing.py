"""The price table: prefix matching (dated and aggregator-style ids), costs, and user
price files that extend or override it."""

from __future__ import annotations

from pathlib import Path

import pytest

from aevyra_forge.agent.pricing import DEFAULT_PRICES, PriceTable, load_prices
from aevyra_forge.core.errors import UsageError


@pytest.mark.parametrize(("provider", "model", "expected"), [
    ("anthropic", "claude-sonnet-4-6", (3.0, 15.0)),
    ("anthropic", "claude-sonnet-4-5-20250929", (3.0, 15.0)),  # dated id
    ("anthropic", "claude-opus-4-6", (5.0, 25.0)),
    ("anthropic", "claude-opus-4-20250514", (15.0, 75.0)),
    ("anthropic", "claude-haiku-4-5", (1.0, 5.0)),
    ("openai", "gpt-4o", (2.5, 10.0)),
    ("openai", "gpt-4o-mini", (0.15, 0.6)),  # longest prefix wins over gpt-4o
    ("openai", "gpt-4o-2024-08-06", (2.5, 10.0)),
    ("openai", "gpt-5-mini-2025-08-07", (0.25, 2.0)),
    ("openrouter", "anthropic/claude-sonnet-4-6", (3.0, 15.0)),  # vendor/model
    ("openrouter", "openai/gpt-4.1-mini", (0.4, 1.6)),
    ("groq", "llama-3.3-70b-versatile", (0.59, 0.79)),  # provider-scoped entry
])
def test_known_models(provider: str, model: str, expected: tuple[float, float]) -> None:
    price = PriceTable().lookup(provider, model)
    assert price is not None
    assert (price.input_per_mtok, price.output_per_mtok) == expected


@pytest.mark.parametrize(("provider", "model"), [
    ("openai", "gpt-5.9"),  # gpt-5 must not swallow a different version
    ("openai", "gpt-4oz"),  # a prefix without a separator is another model
    ("together", "llama-3.3-70b-versatile"),  # groq's price is not together's
    ("mistral", "mistral-large-latest"),
])
def test_unknown_models(provider: str, model: str) -> None:
    assert PriceTable().lookup(provider, model) is None


def test_cost_is_per_million_tokens() -> None:
    price = DEFAULT_PRICES["claude-sonnet-4-6"]
    assert price.cost(1_000_000, 0) == pytest.approx(3.0)
    assert price.cost(2000, 500) == pytest.approx((2000 * 3 + 500 * 15) / 1e6)
    assert "as of 20" in price.source


def test_price_file_extends_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("mistral-large: {input: 2, output: 6}\n"
                    "claude-sonnet-4-6: {input: 1.5, output: 7.5}\n")
    table = load_prices(path)
    large = table.lookup("mistral", "mistral-large-latest")
    assert large is not None and large.cost(1_000_000, 1_000_000) == pytest.approx(8.0)
    assert str(path) in large.source
    sonnet = table.lookup("anthropic", "claude-sonnet-4-6")
    assert sonnet is not None and sonnet.input_per_mtok == 1.5
    still = table.lookup("openai", "gpt-4o-mini")
    assert still is not None and still.output_per_mtok == 0.6


def test_price_file_as_json(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"together/meta-llama/llama-3.3-70b-instruct-turbo": '
                    '{"input": 0.88, "output": 0.88}}')
    price = load_prices(path).lookup("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo")
    assert price is not None and price.input_per_mtok == 0.88


@pytest.mark.parametrize(("text", "needle"), [
    ("just a string\n", "mapping"),
    ("m: {input: -1, output: 2}\n", "greater than or equal"),
    ("m: {input: 1}\n", "output"),
    ("m: {input: 1, output: 2, cached: 0.1}\n", "cached"),
    ("m: [1, 2\n", "not valid YAML"),
])
def test_bad_price_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as exc:
        load_prices(path)
    message = str(exc.value)
    assert "--llm-prices" in message and needle in message
    assert "\n" not in message


def test_missing_price_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        load_prices(tmp_path / "nope.yaml")
