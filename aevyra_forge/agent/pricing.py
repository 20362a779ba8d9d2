"""What an LLM call costs: a dated table of list prices (USD per million tokens) for the
models forge knows, matched by model-id prefix, which a user can extend or override with
a YAML/JSON file (`--llm-prices`). An unknown model costs 0 and says so."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aevyra_forge.core.errors import UsageError

PRICES_AS_OF = "2026-11-05"  # when the list prices below were read from the vendors' pages
TOKENS_PER_UNIT = 1_000_000  # prices are quoted per million tokens
_SEPARATORS = ("-", ":", "@")  # what may follow a known prefix: dated or tagged variants


@dataclass(frozen=True)
class Price:
    """List price of one model, USD per million tokens."""

    input_per_mtok: float
    output_per_mtok: float
    source: str = f"list price as of {PRICES_AS_OF}"

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok
                + output_tokens * self.output_per_mtok) / TOKENS_PER_UNIT


FREE = Price(0.0, 0.0, "local server: no charge")

# Keys are model-id prefixes, optionally scoped to a provider ("groq/llama-3.3-70b...");
# the longest key that matches wins, so "gpt-4o-mini" beats "gpt-4o".
DEFAULT_PRICES: dict[str, Price] = {
    # Anthropic
    "claude-opus-4-6": Price(5.0, 25.0),
    "claude-opus-4-5": Price(5.0, 25.0),
    "claude-opus-4-1": Price(15.0, 75.0),
    "claude-opus-4": Price(15.0, 75.0),
    "claude-sonnet-4-6": Price(3.0, 15.0),
    "claude-sonnet-4-5": Price(3.0, 15.0),
    "claude-sonnet-4": Price(3.0, 15.0),
    "claude-3-7-sonnet": Price(3.0, 15.0),
    "claude-haiku-4-5": Price(1.0, 5.0),
    "claude-3-5-haiku": Price(0.8, 4.0),
    # OpenAI
    "gpt-5.4": Price(2.5, 15.0),
    "gpt-5.4-mini": Price(0.75, 4.5),
    "gpt-5.2": Price(1.75, 14.0),
    "gpt-5": Price(1.25, 10.0),
    "gpt-5-mini": Price(0.25, 2.0),
    "gpt-5-nano": Price(0.05, 0.4),
    "gpt-4.1": Price(2.0, 8.0),
    "gpt-4.1-mini": Price(0.4, 1.6),
    "gpt-4.1-nano": Price(0.1, 0.4),
    "gpt-4o": Price(2.5, 10.0),
    "gpt-4o-mini": Price(0.15, 0.6),
    "o3": Price(2.0, 8.0),
    "o4-mini": Price(1.1, 4.4),
    # Groq
    "groq/llama-3.3-70b-versatile": Price(0.59, 0.79),
    "groq/llama-3.1-8b-instant": Price(0.05, 0.08),
}


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0)  # USD per million input tokens
    output: float = Field(ge=0)  # USD per million output tokens


class PriceTable:
    """Prices by model-id prefix; `lookup` returns None for a model it does not know."""

    def __init__(self, entries: Mapping[str, Price] | None = None) -> None:
        self.entries = {k.lower(): v for k, v in (entries or DEFAULT_PRICES).items()}

    def lookup(self, provider: str, model: str) -> Price | None:
        """The price of `model` served by `provider`. Aggregators name models
        `vendor/model` (openrouter: anthropic/claude-sonnet-4-6), so the last path
        segment is tried after the full id."""
        low = model.lower()
        candidates = [f"{provider.lower()}/{low}", low]
        if "/" in low:
            candidates.append(low.rsplit("/", 1)[1])
        for name in candidates:
            best: str | None = None
            for key in self.entries:
                if _matches(name, key) and (best is None or len(key) > len(best)):
                    best = key
            if best is not None:
                return self.entries[best]
        return None

    def merged(self, overrides: Mapping[str, Price]) -> PriceTable:
        return PriceTable({**self.entries, **{k.lower(): v for k, v in overrides.items()}})


def _matches(name: str, key: str) -> bool:
    return name == key or any(name.startswith(key + sep) for sep in _SEPARATORS)


def load_prices(path: Path | None) -> PriceTable:
    """The default table, extended by a user's file when given. The file maps a model id
    (or prefix, optionally `provider/model`) to `{input: USD, output: USD}` per million
    tokens, in YAML or JSON."""
    table = PriceTable()
    if path is None:
        return table
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--llm-prices {path}: cannot read it ({exc.strerror}); pass a "
                         "YAML or JSON file of model: {input: USD, output: USD}") from None
    except yaml.YAMLError:
        raise UsageError(f"--llm-prices {path}: not valid YAML or JSON; expected model: "
                         "{input: USD, output: USD} per million tokens") from None
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"--llm-prices {path}: expected a mapping of model id to "
                         "{input: USD, output: USD} per million tokens")
    overrides: dict[str, Price] = {}
    for name, value in raw.items():
        try:
            entry = _Entry.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "value"
            raise UsageError(f"--llm-prices {path}: {name}: {where}: {first['msg']}; "
                             "expected {input: USD, output: USD} per million "
                             "tokens") from None
        overrides[str(name)] = Price(entry.input, entry.output, f"from {path}")
    return table.merged(overrides)
