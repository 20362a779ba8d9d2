"""Layer 2 in a dry run (issue 9 item 7): the same kinds of candidates a real run offers,
built by the same functions (space/layer2.py) from the same quant-facts table, with what
only a real host can answer simulated and said so: the Hub's answer (well-known
publishers' quantized copies of the model; no request is sent), and the preparation of
forge's own checkpoints (round-to-nearest and calibrated), whose estimated minutes are
charged as the trial's prepare time, once per checkpoint as the real cache does, so the
simulated budget counts them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from aevyra_forge.core.recipe import Recipe, recipe_from_dict
from aevyra_forge.core.values import ExperimentRecord, Hardware
from aevyra_forge.engine.calibrate import CAL_SAMPLES
from aevyra_forge.engine.prepare import PrepareResult
from aevyra_forge.space import layer2, quant
from aevyra_forge.space.hub import HubLookup, Sibling
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.layer2 import QuantCandidate

SIMULATED = "(simulated) "  # what every dry-run candidate's note and line begins with
# Where a dry run's own checkpoints would be written: never created, and the same for every
# run (recipe ids hash it, and a resumed run must find the same ids)
SIM_FOLDER = Path("simulated-quant")
# The simulated Hub's answer: (publisher, name suffix, method, config.json's quant_method,
# bits, group size, format, downloads), most downloaded first, as the Hub would sort them.
# Publishers and naming follow space/hub.py's PUBLISHERS and the copies they publish.
HUB_COPIES: tuple[tuple[str, str, str, str, int, int | None, str | None, int], ...] = (
    ("hugging-quants", "-AWQ-INT4", "awq", "awq", 4, 128, "gemm", 41_000),
    ("RedHatAI", "-FP8-dynamic", "fp8", "compressed-tensors", 8, None, "float-quantized",
     23_000),
    ("RedHatAI", "-quantized.w8a8", "w8a8_int8", "compressed-tensors", 8, None,
     "int-quantized", 9_000),
    ("RedHatAI", "-quantized.w4a16", "w4a16", "compressed-tensors", 4, 128,
     "pack-quantized", 6_000),
)


def simulated_repos(model: str) -> list[str]:
    """The repo ids the simulated Hub answer names for `model` on hardware that serves
    every method, in HUB_COPIES' order (none for a model that is no Hub id)."""
    name = model.partition("/")[2]
    return [f"{publisher}/{name}{suffix}" for publisher, suffix, *_ in HUB_COPIES] \
        if name else []


def deploy_caveat(recipe: Recipe) -> str | None:
    """What deploying a dry run's `recipe` needs first, where it serves what the dry run
    only simulated: a checkpoint forge writes (nothing was written), a repo of the
    simulated Hub answer (nothing was looked up), or, in a run recorded before layer 2's
    candidates, a pre-quantized method named without a checkpoint. None: it deploys as
    it stands."""
    checkpoint = recipe.quant.checkpoint
    if checkpoint is None:
        method = recipe.quant.method
        return (f"deploying it needs a {method} checkpoint of {recipe.model} (the simulator "
                "assumed one)") if quant.facts(method).prequantized else None
    if Path(checkpoint).parent == SIM_FOLDER:
        return (f"{checkpoint} names the checkpoint forge writes for layer 2's "
                f"{Path(checkpoint).name}, which the dry run only simulated: run this tune "
                "without --dry-run on the target to write it, then serve the folder it names")
    if checkpoint in simulated_repos(recipe.model):
        return (f"{checkpoint} is from the dry run's simulated Hub answer (its publisher's "
                "usual naming; nothing was looked up): check that it exists on the Hub, or "
                "run this tune without --dry-run to look it up")
    return None


def hub_answer(model: str, params: float, hw: Hardware) -> HubLookup:
    """What the Hub would plausibly answer for `model` (`params` parameters): its
    publishers' quantized copies, kept where the quant-facts table says `hw` serves them,
    the rest set aside with the reason, as space/hub.py's lookup does."""
    name = model.partition("/")[2]
    if not name or Path(model).exists():
        return HubLookup(base=model, note=f"{SIMULATED}Hub lookup: {model} is not a Hub id "
                                          "(owner/name): no pre-quantized siblings")
    kept: list[Sibling] = []
    skipped: list[str] = []
    for repo, (_, _, method, quant_method, bits, group, fmt, downloads) in zip(
            simulated_repos(model), HUB_COPIES, strict=True):
        why = quant.checkpoint_refusal(method, hw)
        if why:
            skipped.append(f"{repo}: {method} is not served here: {why}")
            continue
        kept.append(Sibling(repo=repo, method=method, quant_method=quant_method, bits=bits,
                            group_size=group, format=fmt, downloads=downloads,
                            size_bytes=int(params * quant.facts(method).bytes_per_param),
                            found_by="tag"))
    return HubLookup(base=model, endpoint="simulated", siblings=tuple(kept),
                     skipped=tuple(skipped))


# A Hub download's speed in a dry run: a modest datacenter link (the Hub's CDN often
# gives several times this; a laptop's home line a tenth).
SIM_DOWNLOAD_BYTES_S = 100e6


class SimPreparer:
    """The prepare phase of a dry run: a recipe serving one of forge's own checkpoints is
    charged its estimated preparation time the first time, and one serving a Hub sibling
    its download at SIM_DOWNLOAD_BYTES_S, nothing after (the real caches keep them);
    nothing is written. `remember` takes a resumed run's records, so the checkpoints it
    prepared before are not charged again."""

    def __init__(self, candidates: Iterable[QuantCandidate]) -> None:
        self.seconds = {c.checkpoint: (c.download_bytes or 0) / SIM_DOWNLOAD_BYTES_S
                        if c.kind == "hub" else c.prepare_s or 0.0 for c in candidates}
        self.done: set[str] = set()
        self.lock = threading.Lock()  # a pool of simulated workers shares one preparer

    def remember(self, records: Iterable[ExperimentRecord]) -> None:
        for rec in records:
            checkpoint = recipe_from_dict(rec.recipe).quant.checkpoint
            if rec.prepare_s and checkpoint in self.seconds:
                self.done.add(checkpoint)

    def __call__(self, recipe: Recipe, log_path: Path) -> PrepareResult | None:
        checkpoint = recipe.quant.checkpoint or ""
        if checkpoint not in self.seconds:
            return None
        with self.lock:
            reused = checkpoint in self.done
            self.done.add(checkpoint)
        return PrepareResult(seconds=0.0 if reused else round(self.seconds[checkpoint], 2),
                             reused=reused)


def offer(model: str, space: KnobSpace, note: Callable[[str], None],
          requests: int | None = None) -> SimPreparer:
    """Give a dry run's KnobSpace layer 2's candidates, as a real run on this hardware
    would have them (the Hub's siblings, round-to-nearest and calibrated checkpoints of a
    local copy, calibrated on as many of the trace's `requests` as a real run samples),
    each stated as simulated; returns the preparer that charges their time."""
    hw, params = space.hw, space.model.params_b * 1e9
    found = hub_answer(model, params, hw)
    for line in found.lines():
        note(line if line.startswith(SIMULATED) else f"{SIMULATED}{line.lstrip()}")
    weights = int(space.model.weight_bytes_bf16)
    written = [
        *layer2.rtn_candidates([(s, SIM_FOLDER / f"rtn-{s}") for s in layer2.RTN],
                               SIM_FOLDER, hw, weights_bytes=weights),
        *layer2.calibrated_candidates([(s, SIM_FOLDER / f"cal-{s}")
                                       for s in layer2.CALIBRATED], weights, hw,
                                      min(CAL_SAMPLES, requests or CAL_SAMPLES))]
    candidates = [c.model_copy(update={"note": SIMULATED + c.note})
                  for c in [*layer2.hub_candidates(found), *written]]
    space.offer_quant(candidates)
    note(f"{SIMULATED}layer 2 candidates: "
         + (", ".join(c.name for c in space.quant_candidates) or "none"))
    return SimPreparer(space.quant_candidates)
