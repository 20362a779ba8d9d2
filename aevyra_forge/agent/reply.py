"""Reading an LLM's reply: find the one JSON object in it (bare, fenced, or wrapped in
prose), then validate it strictly: the Proposal schema with no extra keys, the active
layer, at most two knobs, and every value checked by the knob registry for this hardware.
Every refusal is a ReplyError whose message is sent back to the LLM verbatim."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import ValidationError

from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.values import LAYER_NAMES, Layer, Proposal
from aevyra_forge.space.knob_space import KNOBS, KnobSpace

MAX_KNOBS_PER_PROPOSAL = 2  # one knob, or two that only make sense together
MAX_REPLY_CHARS = 100_000  # a longer reply is not a proposal
MAX_CANDIDATES = 64  # '{' positions tried when the object is buried in prose
# A proposal is a few hundred characters. What the log keeps of one reply, and what of a
# refused reply (or of its error) goes back to the LLM, are capped: a rambling 200 kB
# reply was once stored whole and resent, 112k input tokens for one row.
MAX_STORED_REPLY_CHARS = 4000
MAX_ECHOED_REPLY_CHARS = 1000
# Anything naming what is served rather than how: forge decides the model, never the LLM.
MODEL_KEYS = frozenset({"model", "model_path", "model_name", "served_model_name",
                        "checkpoint", "quant_checkpoint", "tokenizer", "download_dir",
                        "path"})
# Every string a knob accepts is a short identifier; anything else (spaces, quotes, `;`,
# `$(`, newlines) is refused here even before the registry's own choice check.
SAFE_STRING = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n(.*?)```", re.DOTALL)
_FIELDS = ("rationale", "layer", "changes", "expected_effect")


class ReplyError(ValueError):
    """The reply cannot be used; the message says exactly why, for the LLM to fix."""


def clip(text: str, limit: int) -> str:
    """`text` cut to its first `limit` characters, saying that it was cut and by how
    much (the LLM, and whoever audits the log, must not mistake it for the whole)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[cut: {len(text) - limit} of {len(text)} characters not shown]"


def extract_json(text: str) -> dict[str, Any]:
    """The JSON object in `text`: the whole reply, a fenced block, or the first object
    embedded in prose (preferring one that has a "changes" key)."""
    if len(text) > MAX_REPLY_CHARS:
        raise ReplyError(f"the reply is {len(text)} characters long; reply with one short "
                         "JSON object")
    found: list[dict[str, Any]] = []
    problem = ""
    for candidate in [text.strip(), *(m.group(1).strip() for m in _FENCE.finditer(text))]:
        obj, why = _loads(candidate)
        if _looks_like_proposal(obj):
            found.append(obj)
        problem = problem or why
    if not found:
        decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_nan)
        starts = [i for i, ch in enumerate(text) if ch == "{"][:MAX_CANDIDATES]
        for start in starts:
            try:
                obj, _ = decoder.raw_decode(text, start)
            except RecursionError:
                continue
            except ValueError as exc:
                problem = problem or (str(exc) if start == starts[0] else "")
                continue
            if _looks_like_proposal(obj):
                found.append(obj)
    if not found:
        detail = f" ({problem.split(':')[0]})" if problem else ""
        raise ReplyError(f"no valid JSON object found in the reply{detail}; reply with "
                         'exactly one object like {"rationale": "...", "layer": 1, '
                         '"changes": {"knob": value}, "expected_effect": "..."}')
    with_changes = [o for o in found if "changes" in o]
    return (with_changes or found)[0]


def _looks_like_proposal(obj: Any) -> bool:
    """An object with at least one of the reply's keys; a fragment found inside broken
    JSON ({"max_num_seqs": 512} from a truncated reply) is not a proposal."""
    return isinstance(obj, dict) and any(key in obj for key in _FIELDS)


def parse_reply(text: str, space: KnobSpace, layer: Layer) -> Proposal | None:
    """The validated proposal in `text`, with values normalised by the knob registry, or
    None when the LLM says nothing in this layer is worth trying ("changes": {})."""
    obj = extract_json(text)
    changes_in = obj.get("changes")
    names = [*obj, *(changes_in if isinstance(changes_in, dict) else ())]
    for key in names:  # the most important refusal comes first
        if _is_model_key(key):
            raise ReplyError(_model_refusal(key))
    raw_layer = obj.get("layer")
    if "layer" in obj and (isinstance(raw_layer, bool) or not isinstance(raw_layer, int)):
        raise ReplyError(f"layer must be the active layer's number, {layer} (got "
                         f"{json.dumps(raw_layer, default=str)[:40]})")
    try:
        proposal = Proposal.model_validate(obj, strict=True)
    except ValidationError as exc:
        raise ReplyError(_describe(exc)) from None
    if not proposal.rationale.strip():
        raise ReplyError("rationale is empty; say why this change should help")
    if proposal.layer != layer:
        raise ReplyError(f"the proposal is for layer {proposal.layer}, but the active layer "
                         f"is {layer} ({LAYER_NAMES[layer]}); propose knobs of layer {layer}")
    changes = proposal.changes
    if not changes:
        return None
    if len(changes) > MAX_KNOBS_PER_PROPOSAL:
        raise ReplyError(f"the proposal changes {len(changes)} knobs "
                         f"({', '.join(changes)}); change one knob per experiment "
                         f"(two at most when they only make sense together) so the result "
                         "can be attributed")
    allowed = [k.name for k in space.knobs(layer)]
    for name, value in changes.items():
        _check_name(name, allowed, layer)
        # a listed choice passes as it is: layer-2 candidates are named hub:<org>/<repo>
        if isinstance(value, str) and not SAFE_STRING.fullmatch(value) \
                and value not in space.choices(space.get(name)):
            raise ReplyError(f"{name}={json.dumps(value)[:80]} is not a value any knob "
                             f"accepts; use one of the listed values, spelled exactly")
        if isinstance(value, float) and not math.isfinite(value):
            raise ReplyError(f"{name} must be a finite number")
    try:
        checked = space.validate(changes, layer)
    except KnobError as exc:
        raise ReplyError(str(exc)) from None
    return Proposal(rationale=proposal.rationale.strip(), layer=proposal.layer,
                    changes=checked, expected_effect=proposal.expected_effect.strip())


def _check_name(name: str, allowed: list[str], layer: Layer) -> None:
    listed = ", ".join(allowed) or "none"
    knob = KNOBS.get(name)
    if knob is None:
        raise ReplyError(f"unknown knob '{name}'; knobs allowed in layer {layer} here: "
                         f"{listed}")
    if knob.layer != layer:
        raise ReplyError(f"knob '{name}' belongs to layer {knob.layer} "
                         f"({LAYER_NAMES[knob.layer]}), not the active layer {layer}; "
                         f"allowed now: {listed}")
    if name not in allowed:
        raise ReplyError(f"knob '{name}' is not available on this hardware or vLLM; "
                         f"allowed now: {listed}")


def _is_model_key(name: str) -> bool:
    low = name.lower()
    return low in MODEL_KEYS or "checkpoint" in low or low.endswith(("_path", "_dir"))


def _model_refusal(key: str) -> str:
    return (f"'{key}' is not a knob: forge decides which model and checkpoint are served "
            "(layer 2 picks quantized checkpoints itself); propose serving knobs only")


def _describe(exc: ValidationError) -> str:
    """pydantic's errors as one line: each field once, an extra key with the four
    allowed ones, a knob value of the wrong JSON type with the types accepted."""
    parts: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc[:1] == ["changes"] and len(loc) >= 2:
            where = f"changes.{loc[1]}"
            shown = json.dumps(err.get("input"), default=str)[:60]
            parts.setdefault(where, f"{where} must be a number, true/false or a string "
                                    f"(got {shown})")
            continue
        where = ".".join(loc) or "reply"
        if err["type"] == "extra_forbidden":
            parts.setdefault(where, f"unexpected key '{where}' (the object has exactly the "
                                    f"keys {', '.join(_FIELDS)})")
        elif err["type"] == "missing":
            parts.setdefault(where, f"missing key '{where}'")
        else:
            shown = json.dumps(err.get("input"), default=str)[:60]
            parts.setdefault(where, f"{where}: {err['msg']} (got {shown})")
    return "; ".join(list(parts.values())[:4])


def _loads(text: str) -> tuple[Any, str]:
    """The decoded value and "", or None and why not (only for text that looks like an
    object, so prose around JSON does not count as a problem)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_nan), ""
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as exc:
        return None, str(exc) if text.startswith("{") else ""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_nan(name: str) -> Any:
    raise ValueError(f"{name} is not a number forge accepts")


# -- several proposals in one reply (one per free worker) ---------------------------------

def batch_instructions(want: int, pending: tuple[Proposal, ...]) -> str:
    """What the prompt adds when `want` experiments will run at once: the reply shape for
    a list, and the proposals already chosen for this round (not to be repeated)."""
    lines = [f"{want} experiments will run at once on separate GPUs, each judged against the "
             f"current best. Propose {want} DIFFERENT experiments instead of one: reply with "
             'ONE JSON object {"proposals": [...]} holding up to '
             f"{want} objects of the shape above, each changing other values."]
    if pending:
        chosen = "; ".join(", ".join(f"{k}={json.dumps(v)}" for k, v in p.changes.items())
                           for p in pending)
        lines.append(f"Already chosen for this round (do not repeat): {chosen}.")
    return "\n".join(lines)


def parse_replies(text: str, space: KnobSpace, layer: Layer, want: int
                  ) -> tuple[Proposal, ...]:
    """Up to `want` validated, distinct proposals from a {"proposals": [...]} reply (a
    single proposal object is accepted as a list of one); () when the LLM says nothing
    is worth trying. Any invalid entry refuses the whole reply, naming the entry."""
    obj = _batch_object(text)
    if obj is None:
        one = parse_reply(text, space, layer)
        return (one,) if one is not None else ()
    extra = sorted(set(obj) - {"proposals"})
    if extra:
        raise ReplyError(f"unexpected key '{extra[0]}' (the object has exactly one key, "
                         '"proposals")')
    items = obj["proposals"]
    if not isinstance(items, list):
        raise ReplyError('"proposals" must be a list of proposal objects')
    if len(items) > want:
        raise ReplyError(f"{len(items)} proposals, but only {want} experiments run at "
                         f"once; reply with at most {want}")
    out: list[Proposal] = []
    for i, item in enumerate(items, start=1):
        try:
            proposal = parse_reply(json.dumps(item), space, layer)
        except ReplyError as exc:
            raise ReplyError(f"proposal {i}: {exc}") from None
        if proposal is None:
            continue
        for j, earlier in enumerate(out, start=1):
            if earlier.changes == proposal.changes:
                raise ReplyError(f"proposals {j} and {i} make the same change; each "
                                 "experiment of a round must try something different")
        out.append(proposal)
    return tuple(out)


def _batch_object(text: str) -> dict[str, Any] | None:
    """The {"proposals": ...} object in `text` (bare or fenced), or None when there is
    none (the reply may be a single proposal)."""
    if len(text) > MAX_REPLY_CHARS:
        return None  # parse_reply says why
    for candidate in [text.strip(), *(m.group(1).strip() for m in _FENCE.finditer(text))]:
        obj, _ = _loads(candidate)
        if isinstance(obj, dict) and "proposals" in obj:
            return obj
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_nan)
    for start in [i for i, ch in enumerate(text) if ch == "{"][:MAX_CANDIDATES]:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict) and "proposals" in obj:
            return obj
    return None
