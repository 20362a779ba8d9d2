"""What a run takes from the Hub: the model's pre-quantized siblings for layer 2 and its
speculative-decoding heads for layer 1 (looked up when a run starts, read back from its
folder when it resumes), and the candidates built from them: layer 2's with the
checkpoint writer (engine/prepare.offer), the draft table of spec_method. Real runs only;
a dry run's are the simulator's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import Hardware
from aevyra_forge.engine import prepare
from aevyra_forge.space import drafts
from aevyra_forge.space.hub import HubLookup, lookup, read_cached
from aevyra_forge.space.knob_space import KnobSpace


def hub_siblings(settings: TuneSettings, hw: Hardware, run_dir: Path | None,
                 note: Callable[[str], None]) -> HubLookup | None:
    """The model's pre-quantized siblings (layer 2) and speculative-decoding heads (layer
    1) on the Hub, for real runs that tune either layer; one line each on what was found."""
    layers = settings.layers()
    if settings.dry_run or not {1, 2} & set(layers):
        return None
    found = read_cached(run_dir, settings.model) if run_dir is not None else None
    if found is None:
        found = lookup(settings.model, hw) if 2 in layers else HubLookup(
            base=settings.model, note="layer 2 is not tuned: no lookup of quantized siblings")
    if 1 in layers and found.drafts is None:  # a run folder from before the draft lookup
        found = found.model_copy(update={"drafts": drafts.lookup(settings.model)})
    for line in (found.lines() if 2 in layers else []):
        note(line)
    for line in (found.drafts.lines(settings.model) if found.drafts and 1 in layers else []):
        note(line)
    return found


def offer(settings: TuneSettings, space: KnobSpace, siblings: HubLookup | None,
          note: Callable[[str], None], vllm_bin: Callable[[TuneSettings], str]
          ) -> prepare.Preparer | None:
    """The heads found for spec_method, layer 2's candidates in the space, and what
    writes forge's own checkpoints (cached under the store root's quant/ folder)."""
    if siblings is not None and siblings.drafts is not None and 1 in settings.layers():
        space.offer_drafts(siblings.drafts.table())
    if siblings is None or 2 not in settings.layers():  # a dry run, or layer 2 skipped
        return None
    return prepare.offer(settings.model, space.hw, space, siblings, Path(settings.run_dir),
                         vllm_bin(settings), note)
