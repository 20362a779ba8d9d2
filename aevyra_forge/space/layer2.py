"""Layer 2's concrete candidates (SPEC §6): the quantized checkpoints this run may serve,
built by forge and chosen by name through the `quant_candidate` knob, never a free path or
repo id from the agent. Pre-quantized siblings found on the Hub (space/hub.py) and
checkpoints forge writes itself (round-to-nearest now; calibrated ones later), each with
what it costs (download size, minutes of preparation) and only where the quant-facts
table says this hardware serves it. On-the-fly fp8 and the KV-cache dtype stay their own
knobs (quant_method, kv_cache_dtype), gated by the same table."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import Frozen, Hardware, Scalar
from aevyra_forge.space import quant
from aevyra_forge.space.hub import HubLookup
from aevyra_forge.space.placement import Draft, RecipeField, Rendered

if TYPE_CHECKING:
    from aevyra_forge.space.registry import Knob

NO_CANDIDATE = "none"
# Round-to-nearest schemes forge writes with compressed-tensors (engine/prepare.py), by
# the name a candidate carries -> (the quant-facts method, weight bits)
RTN: dict[str, tuple[str, int]] = {"w8a8": ("w8a8_int8", 8), "w4a16": ("w4a16", 4),
                                   "fp8": ("fp8", 8)}
RTN_S_PER_GB = 20.0  # seconds per GB of bf16 weights (the tiny model: ~8 s, mostly start-up)
RTN_FIXED_S = 8.0  # python, torch and transformers start-up
# Schemes forge calibrates with llm-compressor on the user's own workload, by the name a
# candidate carries (cal-<name>) -> (the quant-facts method, weight bits, the algorithm)
CALIBRATED: dict[str, tuple[str, int, str]] = {
    "w8a8": ("w8a8_int8", 8, "SmoothQuant + GPTQ"),
    "w4a16-gptq": ("w4a16", 4, "GPTQ"),
    "w4a16-awq": ("w4a16", 4, "AWQ"),
    "fp8": ("fp8", 8, "FP8 dynamic"),
}
CAL_FIXED_S = 40.0  # llm-compressor's imports and the calibration pass's set-up (tiny: ~43 s)
CAL_S_PER_GB = 120.0  # per GB of bf16 weights, a guess from GPTQ's per-layer Hessians


class QuantCandidate(Frozen):
    """One quantized checkpoint this run may serve. `checkpoint` is what the recipe's
    quant.checkpoint becomes: a Hub repo id, or the folder forge writes it into."""

    name: str  # what the agent chooses: hub:<repo>, rtn-w8a8, ...
    kind: Literal["hub", "rtn", "calibrated"]
    method: str  # the quant-facts table's method
    bits: int | None = None
    checkpoint: str
    download_bytes: int | None = None  # a Hub sibling's weights
    prepare_s: float | None = None  # estimated time to write it before the boot
    note: str = ""

    def describe(self) -> str:
        cost = []
        if self.download_bytes:
            cost.append(f"download ~{self.download_bytes / 2**30:.2f} GiB")
        if self.prepare_s is not None:
            cost.append(f"~{self.prepare_s / 60:.1f} min to write before its boot (cached "
                        "for later runs)")
        bits = f", {self.bits}-bit" if self.bits else ""
        return (f"{self.name}: {self.method}{bits}; {'; '.join(cost) or 'no extra cost'}"
                + (f". {self.note}" if self.note else ""))


@dataclass(frozen=True)
class CandidateSlot(RecipeField):
    """The recipe's quant.checkpoint (and quant.method, informational), chosen by candidate
    name. A checkpoint that is no candidate of this run (a user's own recipe) is left as it
    is and not counted as set, as before candidates existed."""

    candidates: tuple[QuantCandidate, ...] = ()

    def chosen(self, recipe: Recipe) -> QuantCandidate | None:
        return next((c for c in self.candidates if c.checkpoint == recipe.quant.checkpoint),
                    None)

    def read(self, recipe: Recipe, knob: Knob) -> Scalar:
        found = self.chosen(recipe)
        return found.name if found else None

    def keys_set(self, recipe: Recipe) -> list[str]:
        return ["checkpoint"] if self.chosen(recipe) else []

    def write(self, draft: Draft, knob: Knob, value: Scalar, is_default: bool) -> None:
        q = draft["quant"]
        if is_default or value == NO_CANDIDATE:
            if any(c.checkpoint == q.get("checkpoint") for c in self.candidates):
                q["checkpoint"], q["method"] = None, "none"
            return
        found = next((c for c in self.candidates if c.name == value), None)
        if found is None:
            raise KnobError(f"no layer-2 candidate named {value!r} in this run")
        q["checkpoint"], q["method"] = found.checkpoint, found.method

    def engine_arg(self, knob: Knob) -> str | None:
        return None  # the checkpoint is what `vllm serve` is given, not a flag

    def render(self, recipe: Recipe) -> Rendered:
        return [], {}


SLOT = CandidateSlot(("quant", "checkpoint"), "", (None,))  # the registry's: no candidates


def is_candidate_name(value: str) -> bool:
    """Whether `value` names a candidate some run may list (what a playbook may name:
    which of them a run has is known only once it starts): rtn-<scheme>, cal-<scheme> or
    hub:<owner>/<name>."""
    kind, _, rest = value.partition("-")
    if (kind == "rtn" and rest in RTN) or (kind == "cal" and rest in CALIBRATED):
        return True
    return value.startswith("hub:") and value.count("/") == 1 and not value.endswith("/")


def hub_candidates(found: HubLookup | None) -> list[QuantCandidate]:
    """The Hub siblings this host serves (the lookup kept only those)."""
    if found is None:
        return []
    return [QuantCandidate(
        name=f"hub:{s.repo}", kind="hub", method=s.method, bits=s.bits, checkpoint=s.repo,
        download_bytes=s.size_bytes,
        note=f"pre-quantized on the Hub ({s.quant_method}"
             f"{', group ' + str(s.group_size) if s.group_size else ''}, "
             f"{s.downloads} downloads)") for s in found.siblings]


def rtn_candidates(outputs: Iterable[tuple[str, Path]], source: Path,
                   hw: Hardware, weights_bytes: int | None = None) -> list[QuantCandidate]:
    """Round-to-nearest checkpoints forge writes (scheme, output folder), where this
    hardware serves them; no calibration data, so accuracy may drop more than calibrated.
    `weights_bytes` stands for the source's safetensors where there is no folder to
    measure (the dry run's simulated model)."""
    if weights_bytes is None:
        weights_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    weights_gb = weights_bytes / 1e9
    out = []
    for scheme, folder in outputs:
        method, bits = RTN[scheme]
        if quant.checkpoint_refusal(method, hw) is None:
            out.append(QuantCandidate(
                name=f"rtn-{scheme}", kind="rtn", method=method, bits=bits,
                checkpoint=str(folder), prepare_s=RTN_FIXED_S + RTN_S_PER_GB * weights_gb,
                note="written here by round-to-nearest (no calibration data)"))
    return out


def calibrated_candidates(outputs: Iterable[tuple[str, Path]], weights_bytes: int,
                          hw: Hardware, samples: int) -> list[QuantCandidate]:
    """Checkpoints forge calibrates on the run's own workload (scheme, output folder),
    where this hardware serves them; `samples` is how many workload prompts calibrate."""
    weights_gb = weights_bytes / 1e9
    out = []
    for scheme, folder in outputs:
        method, bits, algorithm = CALIBRATED[scheme]
        if quant.checkpoint_refusal(method, hw) is None:
            out.append(QuantCandidate(
                name=f"cal-{scheme}", kind="calibrated", method=method, bits=bits,
                checkpoint=str(folder), prepare_s=CAL_FIXED_S + CAL_S_PER_GB * weights_gb,
                note=f"calibrated here with llm-compressor ({algorithm}) on {samples} "
                     "prompts of this workload"))
    return out


def refused_here(hw: Hardware) -> list[str]:
    """What layer 2 cannot try on this hardware and why, one line each (for the prompt)."""
    lines = [f"{scheme} checkpoints: {why}" for scheme, (method, _) in RTN.items()
             if (why := quant.checkpoint_refusal(method, hw))]
    fly = quant.refusal(quant.QUANT_METHODS["fp8"].on_the_fly, hw)
    if fly:
        lines.append(f"fp8 applied while loading (quant_method=fp8): {fly}")
    kv = quant.refusal(quant.FP8_KV, hw)
    if kv:
        lines.append(f"fp8 KV cache: {kv}")
    return lines
