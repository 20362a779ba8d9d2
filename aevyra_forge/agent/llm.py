"""The LLM-backed proposer: builds the prompt, calls the provider with bounded retries,
sends an invalid reply back with the exact error (both capped, as is what the log keeps
of each reply), and counts every token and dollar.
It never raises on a bad reply (that becomes ProposalReply.error, an `invalid` row); it
raises BudgetExceeded before a call that could cross --max-dollars, and AgentError when
the provider stays down, which ends the run resumably."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from aevyra_forge.agent.base import AgentContext, BudgetExceeded, ProposalReply
from aevyra_forge.agent.pricing import FREE, Price, load_prices
from aevyra_forge.agent.prompt import USER_BUDGET_TOKENS, build_prompt
from aevyra_forge.agent.providers import (
    ChatClient,
    ChatTurn,
    Completion,
    Provider,
    ProviderUnavailable,
    check_reachable,
    connect,
    parse_spec,
    resolve_key,
)
from aevyra_forge.agent.reply import (
    MAX_ECHOED_REPLY_CHARS,
    MAX_STORED_REPLY_CHARS,
    ReplyError,
    batch_instructions,
    clip,
    parse_replies,
)
from aevyra_forge.core.errors import AgentError
from aevyra_forge.core.values import LLMUsage
from aevyra_forge.core.workload import estimate_tokens

MAX_OUTPUT_TOKENS = 1024  # a proposal is a few hundred tokens; this caps a rambling one
FIX_ROUNDS = 2  # times an invalid reply is sent back with its error before giving up
MAX_TRIES = 4  # calls per request before the provider counts as down
BACKOFF_BASE_S = 1.0  # first wait after a 429/5xx/timeout; doubles each try
BACKOFF_CAP_S = 30.0
TIMEOUT_S = 90.0  # per call
PROMPT_TOKEN_MARGIN = 1.25  # our chars/4 estimate can undercount a real tokenizer
_RETRY_SEPARATOR = "\n----- reply after refusal -----\n"


class LLMProposer:
    """One provider/model as a Proposer."""

    def __init__(self, provider: Provider, model: str, client: ChatClient,
                 price: Price | None, *, max_output_tokens: int = MAX_OUTPUT_TOKENS,
                 fix_rounds: int = FIX_ROUNDS, max_tries: int = MAX_TRIES,
                 backoff_base_s: float | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 prompt_budget_tokens: int = USER_BUDGET_TOKENS,
                 notes: Sequence[str] = (), base_url: str | None = None) -> None:
        self.name = f"{provider.name}/{model}"
        self.base_url = base_url  # --llm-base-url, for the reachability check's message
        self.provider = provider
        self.model = model
        self.client = client
        self.price = price
        self.max_output_tokens = max_output_tokens
        self.fix_rounds = fix_rounds
        self.max_tries = max(1, max_tries)
        # Read at construction so a test can shorten the module default.
        self.backoff_base_s = BACKOFF_BASE_S if backoff_base_s is None else backoff_base_s
        self.sleep = sleep
        self.prompt_budget_tokens = prompt_budget_tokens
        self.notes = tuple(notes)

    def propose(self, ctx: AgentContext) -> ProposalReply:
        prompt = build_prompt(ctx, self.prompt_budget_tokens)
        user = prompt.user
        if ctx.want > 1:  # several workers: k proposals in this one call
            user += "\n\n" + batch_instructions(ctx.want, ctx.pending)
        turns = [ChatTurn("user", user)]
        usage = LLMUsage()
        texts: list[str] = []
        error = ""
        for round_ in range(1 + self.fix_rounds):
            worst = self.worst_case_usd(prompt.system, turns)
            left = ctx.budget.dollars_left
            if left is not None and usage.cost_usd + worst > left:
                why = (f"LLM budget spent: the next call to {self.name} could cost up to "
                       f"${worst:.4f} and only ${max(left - usage.cost_usd, 0.0):.4f} of "
                       "--max-dollars is left")
                if round_ == 0:
                    raise BudgetExceeded(why)
                # Tokens were already spent on this experiment: record them with the row.
                return ProposalReply(None, raw=_RETRY_SEPARATOR.join(texts), usage=usage,
                                     error=f"{error}; then {why}")
            completion = self._call(prompt.system, turns)
            usage = _add(usage, self._usage(prompt.system, turns, completion))
            texts.append(clip(completion.text, MAX_STORED_REPLY_CHARS))
            try:
                proposals = parse_replies(completion.text, ctx.space, ctx.layer, ctx.want)
            except ReplyError as exc:
                error = clip(str(exc), MAX_ECHOED_REPLY_CHARS)
                echoed = clip(completion.text.strip(), MAX_ECHOED_REPLY_CHARS)
                turns += [ChatTurn("assistant", echoed or "(empty reply)"),
                          ChatTurn("user", f"That reply was refused: {error}. Reply again "
                                           "with one corrected JSON object and nothing "
                                           "else.")]
                continue
            return ProposalReply(proposals[0] if proposals else None,
                                 raw=_RETRY_SEPARATOR.join(texts), usage=usage,
                                 more=proposals[1:])
        return ProposalReply(None, raw=_RETRY_SEPARATOR.join(texts), usage=usage,
                             error=f"invalid reply after {len(texts)} tries: {error}")

    def preflight(self) -> None:
        """Before the baseline: the provider answers and accepts the key (one free call)."""
        check_reachable(self.client, self.name, self.base_url or self.provider.base_url)

    # -- cost -----------------------------------------------------------------------------
    def worst_case_usd(self, system: str, turns: Sequence[ChatTurn]) -> float:
        """What the next call could cost at most: the estimated prompt (with a margin for
        tokenizer differences) plus every output token it may generate."""
        if self.price is None:
            return 0.0
        prompt_tokens = math.ceil(_prompt_tokens(system, turns) * PROMPT_TOKEN_MARGIN)
        return self.price.cost(prompt_tokens, self.max_output_tokens)

    def _usage(self, system: str, turns: Sequence[ChatTurn], done: Completion) -> LLMUsage:
        # Some OpenAI-compatible servers omit usage; estimate rather than count zero.
        tokens_in = done.input_tokens if done.input_tokens is not None else \
            _prompt_tokens(system, turns)
        tokens_out = done.output_tokens if done.output_tokens is not None else \
            estimate_tokens(done.text)
        cost = self.price.cost(tokens_in, tokens_out) if self.price else 0.0
        return LLMUsage(input_tokens=tokens_in, output_tokens=tokens_out, cost_usd=cost)

    # -- transport ------------------------------------------------------------------------
    def _call(self, system: str, turns: Sequence[ChatTurn]) -> Completion:
        last = ""
        for attempt in range(self.max_tries):
            try:
                return self.client.complete(system, turns, self.max_output_tokens)
            except ProviderUnavailable as exc:
                last = str(exc)
                if attempt + 1 < self.max_tries:
                    self.sleep(self.delay(attempt, exc.retry_after_s))
        # The CLI adds how to resume: it knows the run's folder.
        raise AgentError(f"{self.name} unreachable after {self.max_tries} tries (last: "
                         f"{last})")

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        """Exponential backoff, at least what the server asked for, capped."""
        return min(BACKOFF_CAP_S, max(retry_after_s or 0.0,
                                      self.backoff_base_s * 2.0 ** attempt))


def make_llm_proposer(spec: str, *, api_key: str | None = None,
                      base_url: str | None = None, prices: str | None = None,
                      max_dollars: float | None = None,
                      env: Mapping[str, str] | None = None) -> LLMProposer:
    """The proposer for `--llm provider/model`. Everything that can be wrong (provider,
    key, SDK, price file, an uncapped --max-dollars) fails here, before a run starts."""
    provider, model = parse_spec(spec)
    key = resolve_key(provider, api_key, base_url, env)
    table = load_prices(Path(prices) if prices else None)
    price = table.lookup(provider.name, model)
    notes: list[str] = []
    if price is None and provider.local:
        price = FREE
    elif price is None:
        if max_dollars is not None:
            raise AgentError(f"--max-dollars needs the price of {spec}, which forge does not "
                             "know: give it in a file passed with --llm-prices (model: "
                             "{input: USD, output: USD} per million tokens), or drop "
                             "--max-dollars")
        notes.append(f"no price known for {spec}: its LLM calls are recorded at $0; give "
                     "one with --llm-prices FILE")
    client = connect(provider, model, key, base_url, TIMEOUT_S)
    return LLMProposer(provider, model, client, price, notes=notes, base_url=base_url)


def _prompt_tokens(system: str, turns: Sequence[ChatTurn]) -> int:
    return estimate_tokens(system) + sum(estimate_tokens(t.content) for t in turns)


def _add(a: LLMUsage, b: LLMUsage) -> LLMUsage:
    return LLMUsage(input_tokens=a.input_tokens + b.input_tokens,
                    output_tokens=a.output_tokens + b.output_tokens,
                    cost_usd=a.cost_usd + b.cost_usd)
