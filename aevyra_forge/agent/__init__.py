"""Proposers: the builtin offline strategy and (later) LLM-backed agents, chosen by the
`--llm` spec. Registering a strategy is one entry in PROPOSERS."""

from __future__ import annotations

from collections.abc import Callable

from aevyra_forge.agent.base import AgentContext, Budget, ProposalReply, Proposer
from aevyra_forge.agent.builtin import BuiltinStrategy
from aevyra_forge.errors import AgentError, UsageError

__all__ = ["AgentContext", "Budget", "BuiltinStrategy", "ProposalReply", "Proposer",
           "make_proposer"]

PROPOSERS: dict[str, Callable[[int], Proposer]] = {
    "builtin": lambda seed: BuiltinStrategy(seed=seed),
}

LLM_PROVIDERS = ("anthropic", "openai", "openrouter", "together", "groq", "fireworks",
                 "deepinfra", "mistral", "ollama", "lmstudio")


def make_proposer(spec: str, seed: int = 0) -> Proposer:
    """The proposer for an `--llm` value: `builtin` or `provider/model`."""
    factory = PROPOSERS.get(spec)
    if factory is not None:
        return factory(seed)
    provider, _, model = spec.partition("/")
    if provider in LLM_PROVIDERS and model:
        raise AgentError(f"--llm {spec}: LLM-backed agents are not yet available in this "
                         "release (tracked in issue #4); use --llm builtin")
    raise UsageError(f"--llm {spec}: expected 'builtin' or PROVIDER/MODEL with PROVIDER "
                     f"one of {', '.join(LLM_PROVIDERS)}")
