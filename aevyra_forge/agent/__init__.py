"""Proposers: the builtin offline strategy and LLM-backed agents, chosen by the `--llm`
spec. Registering a strategy is one entry in PROPOSERS; an LLM provider is one entry in
agent.providers.PROVIDERS."""

from __future__ import annotations

from collections.abc import Callable

from aevyra_forge.agent.base import (
    AgentContext,
    Budget,
    BudgetExceeded,
    ProposalReply,
    Proposer,
)
from aevyra_forge.agent.builtin import BuiltinStrategy
from aevyra_forge.agent.llm import make_llm_proposer
from aevyra_forge.agent.providers import PROVIDERS

__all__ = ["AgentContext", "Budget", "BudgetExceeded", "BuiltinStrategy", "ProposalReply",
           "Proposer", "make_proposer"]

PROPOSERS: dict[str, Callable[[int], Proposer]] = {
    "builtin": lambda seed: BuiltinStrategy(seed=seed),
}

LLM_PROVIDERS = tuple(PROVIDERS)


def make_proposer(spec: str, seed: int = 0, *, api_key: str | None = None,
                  base_url: str | None = None, prices: str | None = None,
                  max_dollars: float | None = None) -> Proposer:
    """The proposer for an `--llm` value: `builtin` or `provider/model`. The LLM options
    (an explicit key, a base URL, a price file, the dollar cap) only apply to the latter;
    a missing key or SDK, an unreachable provider or a refused key fail here with one
    line, before the baseline spends GPU time."""
    factory = PROPOSERS.get(spec)
    if factory is not None:
        return factory(seed)
    proposer = make_llm_proposer(spec, api_key=api_key, base_url=base_url, prices=prices,
                                 max_dollars=max_dollars)
    proposer.preflight()
    return proposer
