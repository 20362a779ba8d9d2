"""Pre-quantized siblings of the served model on the Hugging Face Hub (SPEC §6, layer 2):
the Hub tags quantized derivatives `base_model:quantized:<base id>`, and well-known
publishers name theirs after the base model; each candidate's config.json says how it is
quantized, and the quant-facts table says whether this vLLM serves it on this hardware.

A lookup never stops a run: a local model path, HF_HUB_OFFLINE, no network, a private or
gated repository without a token each give one line, and the run goes on without Hub
siblings (calibrating instead). The token, when there is one, is read by huggingface_hub
from its usual places (HF_TOKEN, its login file) and never written anywhere."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from aevyra_forge.core.values import Frozen, Hardware
from aevyra_forge.space.quant import checkpoint_refusal, facts

DEFAULT_ENDPOINT = "https://huggingface.co"
CACHE_FILE = "hub.json"  # the lookup's result, in the run folder: a resume reads it back
LIST_LIMIT = 50  # candidates per list query, most downloaded first
MAX_CONFIG_READS = 12  # config.json files read per lookup (one request each)
TIMEOUT_S = 10.0  # per request that huggingface_hub lets us bound
# Publishers whose quantized copies are named after the base model (name search).
PUBLISHERS = ("RedHatAI", "neuralmagic", "hugging-quants", "Qwen", "TheBloke",
              "casperhansen", "unsloth", "nm-testing")
# How a checkpoint's name shows it is quantized (publishers' naming).
_QUANT_NAME = re.compile(r"awq|gptq|fp8|int4|int8|w4a16|w8a8|w8a16|quantized|marlin",
                         re.IGNORECASE)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2,
                "I16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_EXPAND: list[Any] = ["downloads", "gated", "private", "safetensors", "sha", "tags"]


class Sibling(Frozen):
    """One pre-quantized copy of the base model that this vLLM can serve here."""

    repo: str
    revision: str | None = None  # the commit whose config.json was read
    method: str  # the quant-facts table's name (w8a8_int8, w4a16, awq, gptq, fp8, ...)
    quant_method: str  # config.json's own name (compressed-tensors, awq, gptq, fp8, ...)
    bits: int | None = None
    group_size: int | None = None
    format: str | None = None  # compressed-tensors format (int-quantized, pack-quantized)
    size_bytes: int | None = None  # weights, from the Hub's safetensors parameter counts
    downloads: int = 0
    found_by: Literal["tag", "name"] = "tag"

    def describe(self) -> str:
        bits = f"{self.bits}-bit" if self.bits else "?-bit"
        group = f", group {self.group_size}" if self.group_size else ""
        size = f", {self.size_bytes / 2**30:.2f} GiB" if self.size_bytes else ""
        return f"{self.repo} ({self.method}, {bits}{group}{size})"


class Draft(Frozen):
    """A speculative-decoding head for the base model found on the Hub (space/drafts.py):
    its repo is spec_model, `method` the spec_method vLLM runs it with."""

    repo: str
    revision: str | None = None  # the commit whose config.json was read
    method: Literal["eagle", "eagle3", "draft_model"]
    vocab_size: int  # equal to the base model's (checked)
    downloads: int = 0
    found_by: Literal["tag", "name"] = "tag"


class DraftLookup(Frozen):
    """What the draft lookup found, the candidates it set aside and why, or the one line
    saying why it could not look."""

    drafts: tuple[Draft, ...] = ()
    skipped: tuple[str, ...] = ()
    note: str = ""

    def table(self) -> dict[str, str]:
        """spec method -> draft repo, the most downloaded draft per method (KnobSpace)."""
        out: dict[str, str] = {}
        for draft in self.drafts:
            out.setdefault(draft.method, draft.repo)
        return out

    def lines(self, base: str) -> list[str]:
        if self.note:
            return [self.note]
        found = ", ".join(f"{d.repo} ({d.method})" for d in self.drafts) or "none"
        return [f"speculative-decoding heads for {base} on the Hub: {found}",
                *(f"  not used: {why}" for why in self.skipped)]


class HubLookup(Frozen):
    """What a lookup found: the siblings this host can serve, the candidates it set aside
    and why, and, when it could not look at all, the one line saying so. `drafts` holds the
    draft lookup (None when the run did not tune layer 1 or predates it)."""

    base: str
    endpoint: str = DEFAULT_ENDPOINT
    siblings: tuple[Sibling, ...] = ()
    skipped: tuple[str, ...] = ()  # "repo: why" for candidates not kept
    note: str = ""  # why the lookup did not run or stopped early; empty when it ran
    drafts: DraftLookup | None = None

    def lines(self) -> list[str]:
        """What to tell the user, one line each."""
        if self.note:
            return [self.note]
        found = ", ".join(s.describe() for s in self.siblings) or "none this host can serve"
        return [f"Hub siblings of {self.base}: {found}",
                *(f"  not used: {why}" for why in self.skipped)]


def lookup(model: str, hw: Hardware, *, endpoint: str | None = None,
           env: Mapping[str, str] | None = None, limit: int = LIST_LIMIT) -> HubLookup:
    """The pre-quantized siblings of hub model `model` that this vLLM serves on `hw`,
    most downloaded first. Never raises for the Hub's sake: see HubLookup.note."""
    env = os.environ if env is None else env
    endpoint = (endpoint or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    skip = _why_not_look(model, env)
    if skip:
        return HubLookup(base=model, endpoint=endpoint, note=skip)
    try:
        from huggingface_hub import HfApi
    except ImportError:
        return HubLookup(base=model, endpoint=endpoint, note=(
            "no Hub lookup for pre-quantized checkpoints: huggingface_hub is not "
            "installed (pip install huggingface_hub)"))
    api = HfApi(endpoint=endpoint)
    try:
        api.model_info(model, timeout=TIMEOUT_S, expand=["sha"])
        tagged = list(api.list_models(filter=f"base_model:quantized:{model}",
                                      sort="downloads", limit=limit, expand=_EXPAND))
        named = list(api.list_models(search=model.split("/", 1)[1], sort="downloads",
                                     limit=limit, expand=_EXPAND))
    except Exception as exc:  # the Hub's failure is data here: one line, the run goes on
        return HubLookup(base=model, endpoint=endpoint, note=_failure(model, endpoint, exc))
    candidates = _merge(model, tagged, named)
    siblings: list[Sibling] = []
    skipped: list[str] = []
    for info, found_by in candidates[:MAX_CONFIG_READS]:
        kept = _examine(api, endpoint, info, found_by, hw)
        if isinstance(kept, Sibling):
            siblings.append(kept)
        else:
            skipped.append(f"{info.id}: {kept}")
    return HubLookup(base=model, endpoint=endpoint, siblings=tuple(siblings),
                     skipped=tuple(skipped))


def read_cached(run_dir: Path, model: str) -> HubLookup | None:
    """The lookup a run recorded (so a resumed run offers the same siblings without asking
    the Hub again), or None when it has none for `model` or it does not parse."""
    try:
        found = HubLookup.model_validate_json((run_dir / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return found if found.base == model else None


SkipCause = Literal["local", "offline", "not_id"]
FailureCause = Literal["offline", "gated", "not_found", "no_entry", "network"]


def skip_cause(model: str, env: Mapping[str, str]) -> SkipCause | None:
    """Why no Hub lookup should be tried for `model` (a local folder, HF_HUB_OFFLINE, not
    an owner/name id), or None; shared by the sibling and the draft lookups, each of which
    words it for what it looks for."""
    if Path(model).exists():
        return "local"
    if env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "offline"
    return None if _REPO_ID.match(model) else "not_id"


def failure_cause(exc: Exception) -> FailureCause:
    """What a lookup the Hub or the network refused ran into, by huggingface_hub's error."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )
    if isinstance(exc, OfflineModeIsEnabled):
        return "offline"
    if isinstance(exc, LocalEntryNotFoundError):  # an EntryNotFoundError: the network failed
        return "network"
    if isinstance(exc, GatedRepoError):
        return "gated"
    if isinstance(exc, RepositoryNotFoundError):
        return "not_found"
    return "no_entry" if isinstance(exc, EntryNotFoundError) else "network"


def _why_not_look(model: str, env: Mapping[str, str]) -> str:
    """One line when no lookup should be tried, else empty."""
    return {"local": f"{model} is a local folder: no Hub lookup for pre-quantized siblings "
                     "(layer 2 quantizes it here instead)",
            "offline": "HF_HUB_OFFLINE is set: no Hub lookup for pre-quantized siblings "
                       "(unset it to let forge look; layer 2 quantizes here instead)",
            "not_id": f"'{model}' is not a Hub id (owner/name): no Hub lookup for "
                      "pre-quantized siblings",
            None: ""}[skip_cause(model, env)]


def _failure(model: str, endpoint: str, exc: Exception) -> str:
    """One line for a lookup the Hub or the network refused."""
    cause = failure_cause(exc)
    if cause == "offline":
        line = "HF_HUB_OFFLINE is set: no Hub lookup for pre-quantized siblings"
    elif cause == "gated":
        line = (f"{model} is gated on {endpoint}: accept its terms there and set HF_TOKEN "
                "to look for its quantized siblings")
    elif cause == "not_found":
        line = f"{model} was not found on {endpoint} (a private repository needs HF_TOKEN)"
    else:
        line = f"cannot reach the Hub at {endpoint} ({type(exc).__name__}: {_first_line(exc)})"
    return line + "; going on without Hub siblings"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no detail"


def _merge(model: str, tagged: Iterable[Any], named: Iterable[Any]) -> list[tuple[Any, str]]:
    """Tagged derivatives, then publishers' copies found by name; each once, the base
    itself never, most downloaded first."""
    seen = {model.lower()}
    out: list[tuple[Any, str]] = []
    for info in tagged:
        if info.id.lower() not in seen:
            seen.add(info.id.lower())
            out.append((info, "tag"))
    base_name = model.split("/", 1)[1].lower()
    for info in named:
        owner, _, name = info.id.partition("/")
        if (info.id.lower() in seen or base_name not in name.lower()
                or not (owner in PUBLISHERS or _QUANT_NAME.search(name))):
            continue
        seen.add(info.id.lower())
        out.append((info, "name"))
    out.sort(key=lambda item: -(item[0].downloads or 0))
    return out


def candidate_config(endpoint: str, info: Any) -> dict[str, Any] | str:
    """A candidate repository's config.json at the listed commit, or why it cannot be read
    (private, gated, absent, unreadable): one reason both Hub lookups record."""
    if info.private:
        return "private"
    try:
        return _read_config(endpoint, info.id, info.sha)
    except Exception as exc:
        from huggingface_hub.errors import EntryNotFoundError, GatedRepoError
        if isinstance(exc, GatedRepoError):
            return "gated: accept its terms on the Hub and set HF_TOKEN to use it"
        if isinstance(exc, EntryNotFoundError):
            return "no config.json"
        return f"config.json unreadable ({type(exc).__name__}: {_first_line(exc)})"


def _examine(api: Any, endpoint: str, info: Any, found_by: str, hw: Hardware
             ) -> Sibling | str:
    """The candidate as a Sibling, or why it is not kept."""
    config = candidate_config(endpoint, info)
    if isinstance(config, str):
        return config
    parsed = parse_quantization(config)
    if isinstance(parsed, str):
        return parsed
    refusal = checkpoint_refusal(parsed["method"], hw)
    if refusal:
        return f"{parsed['method']} is not served here: {refusal}"
    return Sibling(repo=info.id, revision=info.sha, downloads=info.downloads or 0,
                   size_bytes=_size_bytes(info.safetensors), found_by=found_by, **parsed)


def _read_config(endpoint: str, repo: str, revision: str | None) -> dict[str, Any]:
    """config.json of `repo` at `revision`, read into memory (nothing is cached on disk):
    GET {endpoint}/{repo}/resolve/{revision}/config.json through huggingface_hub's session
    (its offline guard, headers and token) and its error classification."""
    from huggingface_hub import get_session, hf_hub_url, hf_raise_for_status

    # public in huggingface_hub.utils' documentation, not re-exported for type checkers
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]
    url = hf_hub_url(repo, "config.json", revision=revision or "main", endpoint=endpoint)
    response = get_session().get(url, headers=build_hf_headers(), timeout=TIMEOUT_S,
                                 follow_redirects=True)
    hf_raise_for_status(response)
    data = json.loads(response.content)
    if not isinstance(data, dict):
        raise ValueError("config.json is not a JSON object")
    return data


def parse_quantization(config: Mapping[str, Any]) -> dict[str, Any] | str:
    """Sibling fields from a config.json's quantization_config, or why it has none forge
    can use (vLLM picks the kernel from the same config; forge never forces one)."""
    qc = config.get("quantization_config") or config.get("compression_config")
    if not isinstance(qc, Mapping):
        return "no quantization_config in config.json"
    name = str(qc.get("quant_method", "")).lower()
    if name in ("awq", "gptq"):
        bits = _int(qc.get("bits"))
        if bits != 4:
            return f"{name} with {bits} bits (forge knows 4-bit {name})"
        return {"method": name, "quant_method": name, "bits": bits,
                "group_size": _int(qc.get("group_size")), "format": qc.get("version")}
    if name == "fp8":
        return {"method": "fp8", "quant_method": name, "bits": 8, "group_size": None,
                "format": qc.get("activation_scheme")}
    if name == "compressed-tensors":
        return _compressed_tensors(qc)
    return f"quant_method '{name or '?'}' is not one forge serves"


def _compressed_tensors(qc: Mapping[str, Any]) -> dict[str, Any] | str:
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        return "compressed-tensors config without config_groups"
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    acts = group.get("input_activations")
    bits, kind = _int(weights.get("num_bits")), weights.get("type", "int")
    fmt = group.get("format") or qc.get("format")
    if kind == "float" and bits == 8:
        method = "fp8"
    elif kind == "int" and bits == 8 and acts:
        method = "w8a8_int8"
    elif kind == "int" and bits == 4 and not acts:
        method = "w4a16"
    else:
        return (f"compressed-tensors {kind}{bits} weights"
                f"{' with activations' if acts else ''} (not a scheme forge knows)")
    assert facts(method).name == method
    return {"method": method, "quant_method": "compressed-tensors", "bits": bits,
            "group_size": _int(weights.get("group_size")), "format": fmt}


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _size_bytes(safetensors: Any) -> int | None:
    """Weight bytes from the Hub's parameter counts per dtype (packed int4 counts as the
    I32 words that hold it, so the sum is the stored size)."""
    params = getattr(safetensors, "parameters", None)
    if not params:
        return None
    return sum(int(n) * _DTYPE_BYTES.get(str(dtype), 2) for dtype, n in params.items())
