"""Layer 2's setup for a run: the Hub siblings of the model (looked up when a run starts,
read back from its folder when it resumes) and the candidates and checkpoint writer built
from them (engine/prepare.offer). Real runs that tune layer 2 only; a dry run's layer 2
is the simulator's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import Hardware
from aevyra_forge.engine import prepare
from aevyra_forge.space.hub import HubLookup, lookup, read_cached
from aevyra_forge.space.knob_space import KnobSpace


def hub_siblings(settings: TuneSettings, hw: Hardware, run_dir: Path | None,
                 note: Callable[[str], None]) -> HubLookup | None:
    """The model's pre-quantized siblings on the Hub, for real runs that tune layer 2."""
    if settings.dry_run or 2 not in settings.layers():
        return None
    found = read_cached(run_dir, settings.model) if run_dir is not None else None
    if found is None:
        found = lookup(settings.model, hw)
    for line in found.lines():
        note(line)
    return found


def offer(settings: TuneSettings, space: KnobSpace, siblings: HubLookup | None,
          note: Callable[[str], None], vllm_bin: Callable[[TuneSettings], str]
          ) -> prepare.Preparer | None:
    """Layer 2's candidates in the space, and what writes forge's own checkpoints (cached
    under the store root's quant/ folder)."""
    if siblings is None:  # a dry run, or layer 2 skipped
        return None
    return prepare.offer(settings.model, space.hw, space, siblings, Path(settings.run_dir),
                         vllm_bin(settings), note)
