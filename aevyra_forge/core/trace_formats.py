"""The trace formats one workload line may take, read into forge's own request fields:
forge's JSONL (SPEC §3), OpenAI chat/completions request bodies, vLLM's custom dataset
(`vllm bench serve --dataset-name custom`) and ShareGPT-style conversations (as guidellm
and most exports write them). A line that fits none fails with the reason."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_serializer

DEFAULT_OUTPUT_TOKENS = 128
CHARS_PER_TOKEN = 4.0  # rough English/code average for Llama-class tokenizers

# Keys that carry the output length, first found wins: forge's own, OpenAI's newer name
# (which supersedes max_tokens), OpenAI's older one, then vLLM's custom dataset.
OUTPUT_TOKEN_KEYS = ("expected_output_tokens", "max_completion_tokens", "max_tokens",
                     "output_tokens")
# Request keys the replay does not send, although the server would have used them.
UNSENT_KEYS = ("tools", "tool_choice")
# ShareGPT speaker names, as ShareGPT, guidellm and their exports write them.
SPEAKERS: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant",
    "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant"}


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


class Message(BaseModel):
    """One chat message. `content` may be given as OpenAI content parts: text parts are
    joined with newlines, as vLLM joins them for a chat template that takes a string; any
    other part (an image, audio, a file) is refused, since the replay sends text only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        texts = []
        for part in v:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {kind!r} cannot be replayed (text "
                                 "parts only); drop the part or the request")
            texts.append(part["text"])
        return "\n".join(texts)

    @model_serializer(mode="wrap")
    def _as_sent(self, handler: Any) -> dict[str, Any]:
        # Sent to the server as dumped: a name only where the trace gave one.
        data: dict[str, Any] = handler(self)
        if data.get("name") is None:
            data.pop("name", None)
        return data


def _tokens(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("must be a whole number")
    if v < 1:
        raise ValueError("must be at least 1")
    return v


class RequestLine(BaseModel):
    """One line as forge, an OpenAI request body or vLLM's custom dataset writes it;
    other keys are kept (as metadata)."""

    model_config = ConfigDict(extra="allow")

    prompt: str | None = None
    messages: list[Message] | None = None
    expected_output_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    output_tokens: int | None = None
    arrival_offset_s: float | None = None

    _int_tokens = field_validator(*OUTPUT_TOKEN_KEYS, mode="before")(_tokens)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        # The completions API also takes a list of prompts (a batch): one is one request.
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            return v[0]
        if isinstance(v, list):
            raise ValueError("give one prompt as text (a list of several prompts or of "
                             "token ids is not one request)")
        return v

    @field_validator("arrival_offset_s", mode="before")
    @classmethod
    def _offset(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError("must be a number of seconds")
        if v < 0:
            raise ValueError("must not be negative")
        return v

    def output_tokens_given(self) -> int | None:
        return next((n for key in OUTPUT_TOKEN_KEYS if (n := getattr(self, key))), None)


def from_conversation(obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A ShareGPT conversation as forge's request fields, and whether its output length
    was estimated. The turns up to the last human one become the chat messages (earlier
    gpt turns as assistant messages). Unless the line gives an output count (any key of
    OUTPUT_TOKEN_KEYS), the gpt turn answering that last human turn sets
    expected_output_tokens, estimated from its length like every prompt here
    (CHARS_PER_TOKEN characters a token); without such a turn, the default."""
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("conversations: give a list of {from, value} turns")
    parsed = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"conversations.{i}: expected an object {{from, value}}")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(speaker, str) or speaker.lower() not in SPEAKERS:
            raise ValueError(f"conversations.{i}.from: {speaker!r} is not one of "
                             f"{', '.join(sorted(SPEAKERS))}")
        if not isinstance(text, str):
            raise ValueError(f"conversations.{i}.value: expected text")
        parsed.append((SPEAKERS[speaker.lower()], text))
    asks = [i for i, (role, _) in enumerate(parsed) if role == "user"]
    if not asks:
        raise ValueError("conversations: no human turn to replay")
    last = asks[-1]
    rest = {k: v for k, v in obj.items() if k != "conversations"}
    fields: dict[str, Any] = {
        **rest, "messages": [{"role": role, "content": text}
                             for role, text in parsed[: last + 1]]}
    given = any(rest.get(key) is not None for key in OUTPUT_TOKEN_KEYS)
    reply = next((text for role, text in parsed[last + 1:] if role == "assistant"), None)
    estimated = not given and reply is not None
    if estimated:
        fields["expected_output_tokens"] = estimate_tokens(reply or "")
    return fields, estimated
