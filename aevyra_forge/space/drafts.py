"""Speculative-decoding heads for the served model on the Hugging Face Hub (SPEC §6,
layer 1): EAGLE / EAGLE-3 heads and small draft models. The Hub tags a derivative
`base_model:<base id>`; well-known publishers (RedHatAI's `*-speculator.eagle3`) name
theirs after the base model, and the speculators format says in config.json which model
it verifies. Each candidate's config.json tells EAGLE from EAGLE-3 from a plain draft
(the method forge passes as --spec-method, so vLLM's guess from the repo name is never
relied on); only a head whose vocabulary is the base model's is kept, as vLLM refuses a
draft with another one and an EAGLE head shares the base model's embeddings.

A lookup never stops a run, as for quantized siblings (space/hub.py): a local model path,
HF_HUB_OFFLINE, no network, a gated or private repository each give one line and no
heads; the token stays where huggingface_hub keeps it."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from aevyra_forge.space.hub import (
    _EXPAND,
    DEFAULT_ENDPOINT,
    LIST_LIMIT,
    TIMEOUT_S,
    Draft,
    DraftLookup,
    _first_line,
    _read_config,
    candidate_config,
    failure_cause,
    skip_cause,
)

MAX_CONFIG_READS = 8  # candidates' config.json files read per lookup
# How a repository's name or tags show it is a speculative-decoding head.
_SPEC_NAME = re.compile(r"eagle|speculator|draft", re.IGNORECASE)
_SPEC_TAGS = frozenset({"eagle", "eagle3", "speculators", "speculative-decoding"})
_THEN = "; going on without them (n-gram and suffix decoding are still offered)"


def lookup(model: str, *, endpoint: str | None = None, env: Mapping[str, str] | None = None,
           limit: int = LIST_LIMIT) -> DraftLookup:
    """The EAGLE / EAGLE-3 heads and draft models for hub model `model`, most downloaded
    first. Never raises for the Hub's sake: see DraftLookup.note."""
    env = os.environ if env is None else env
    endpoint = (endpoint or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    skip = _why_not_look(model, env)
    if skip:
        return DraftLookup(note=skip)
    try:
        from huggingface_hub import HfApi
    except ImportError:
        return DraftLookup(note="no Hub lookup for draft models or EAGLE heads: "
                                "huggingface_hub is not installed")
    api = HfApi(endpoint=endpoint)
    try:
        sha = api.model_info(model, timeout=TIMEOUT_S, expand=["sha"]).sha
        target = _read_config(endpoint, model, sha)
        tagged = list(api.list_models(filter=f"base_model:{model}", sort="downloads",
                                      limit=limit, expand=_EXPAND))
        named = list(api.list_models(search=model.split("/", 1)[1], sort="downloads",
                                     limit=limit, expand=_EXPAND))
    except Exception as exc:  # the Hub's failure is data here: one line, the run goes on
        return DraftLookup(note=_failure(model, endpoint, exc))
    vocab = _vocab(target)
    if vocab is None:
        return DraftLookup(note=f"{model}'s config.json names no vocab_size: no draft "
                                "model or EAGLE head is offered")
    drafts: list[Draft] = []
    skipped: list[str] = []
    for info, found_by in _candidates(model, tagged, named)[:MAX_CONFIG_READS]:
        kept = _examine(endpoint, info, found_by, model, target, vocab)
        if isinstance(kept, Draft):
            drafts.append(kept)
        else:
            skipped.append(f"{info.id}: {kept}")
    return DraftLookup(drafts=tuple(drafts), skipped=tuple(skipped))


def classify(config: Mapping[str, Any], repo: str, base: str,
             target: Mapping[str, Any]) -> tuple[str, int] | str:
    """(spec method, vocabulary size) of a candidate's config.json, or why it is not a
    head for `base` (whose config.json is `target`)."""
    want = _vocab(target)
    spec = config.get("speculators_model_type")
    if spec is not None:  # the speculators format (RedHatAI, nm-testing)
        sc = config.get("speculators_config")
        verifier = sc.get("verifier") if isinstance(sc, Mapping) else None
        made_for = verifier.get("name_or_path") if isinstance(verifier, Mapping) else None
        if isinstance(made_for, str) and made_for.lower() != base.lower():
            return f"made for {made_for}, not {base}"
        if spec not in ("eagle", "eagle3"):
            return f"speculators type {spec!r} (forge offers eagle and eagle3)"
        layer = config.get("transformer_layer_config")
        method, vocab = str(spec), _vocab(layer if isinstance(layer, Mapping) else {})
    else:
        archs = config.get("architectures")
        names = " ".join(a for a in archs if isinstance(a, str)) if isinstance(
            archs, list) else ""
        name = repo.rsplit("/", 1)[-1].lower()
        vocab = _vocab(config)
        if "Eagle3" in names or "eagle3" in name or "draft_vocab_size" in config:
            method = "eagle3"
        elif "Eagle" in names or "eagle" in name:
            method = "eagle"
        else:
            layers, deep = _int(config.get("num_hidden_layers")), _int(
                target.get("num_hidden_layers"))
            if layers is None or (deep is not None and layers >= deep):
                return "not smaller than the base model: no draft"
            method = "draft_model"
    if vocab != want:
        return f"vocabulary of {vocab} tokens, the base model has {want}"
    assert vocab is not None
    return method, vocab


def _why_not_look(model: str, env: Mapping[str, str]) -> str:
    return {"local": f"{model} is a local folder: no Hub lookup for draft models or EAGLE "
                     "heads (n-gram and suffix decoding are still offered)",
            "offline": "HF_HUB_OFFLINE is set: no Hub lookup for draft models or EAGLE heads "
                       "(n-gram and suffix decoding are still offered)",
            "not_id": f"'{model}' is not a Hub id (owner/name): no Hub lookup for EAGLE heads",
            None: ""}[skip_cause(model, env)]


def _failure(model: str, endpoint: str, exc: Exception) -> str:
    cause = failure_cause(exc)
    if cause == "offline":
        line = "HF_HUB_OFFLINE is set: no Hub lookup for draft models or EAGLE heads"
    elif cause == "gated":
        line = (f"{model} is gated on {endpoint}: accept its terms there and set HF_TOKEN "
                "to look for its EAGLE heads")
    elif cause == "not_found":
        line = f"{model} was not found on {endpoint} (a private repository needs HF_TOKEN)"
    elif cause == "no_entry":
        line = f"{model} has no config.json on {endpoint}: no draft model or EAGLE head"
    else:
        line = (f"cannot reach the Hub at {endpoint} for EAGLE heads ({type(exc).__name__}: "
                f"{_first_line(exc)})")
    return line + _THEN


def _candidates(model: str, tagged: Iterable[Any], named: Iterable[Any]
                ) -> list[tuple[Any, str]]:
    """Derivatives tagged with the base whose name or tags say speculative decoding, then
    those named after the base that say so; each once, most downloaded first."""
    seen = {model.lower()}
    out: list[tuple[Any, str]] = []
    base_name = model.split("/", 1)[1].lower()
    for infos, found_by in ((tagged, "tag"), (named, "name")):
        for info in infos:
            name = info.id.split("/", 1)[-1]
            if info.id.lower() in seen or (found_by == "name" and base_name not in name.lower()):
                continue
            if not (_SPEC_NAME.search(name) or _SPEC_TAGS & set(info.tags or ())):
                continue
            seen.add(info.id.lower())
            out.append((info, found_by))
    out.sort(key=lambda item: -(item[0].downloads or 0))
    return out


def _examine(endpoint: str, info: Any, found_by: str, base: str,
             target: Mapping[str, Any], vocab: int) -> Draft | str:
    config = candidate_config(endpoint, info)
    if isinstance(config, str):
        return config
    found = classify(config, info.id, base, target)
    if isinstance(found, str):
        return found
    method, size = found
    return Draft(repo=info.id, revision=info.sha, method=method,
                 vocab_size=size, downloads=info.downloads or 0, found_by=found_by)


def _vocab(config: Mapping[str, Any]) -> int | None:
    """vocab_size, or a multimodal model's text_config.vocab_size."""
    text = config.get("text_config")
    value = config.get("vocab_size")
    if value is None and isinstance(text, Mapping):
        value = text.get("vocab_size")
    return _int(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError, OverflowError):
        return None
