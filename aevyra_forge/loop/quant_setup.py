"""What a run takes from the Hub: the model itself (downloaded in the first trial's
prepare phase), its pre-quantized siblings for layer 2 and its
speculative-decoding heads for layer 1 (looked up when a run starts, read back from its
folder when it resumes), and the candidates built from them: layer 2's with the
checkpoint writer (engine/checkpoints.offer; calibrated ones on the workload,
engine/calibrate.offer), the draft table of spec_method. A dry run's layer 2 is the
simulator's (engine/sim/layer2.offer): the same candidates, simulated."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import Hardware
from aevyra_forge.core.workload import Workload
from aevyra_forge.engine import calibrate, checkpoints, prepare
from aevyra_forge.engine.hub_fetch import HubFetch
from aevyra_forge.engine.sim import layer2 as sim_layer2
from aevyra_forge.space import drafts
from aevyra_forge.space.hub import DEFAULT_ENDPOINT, HubLookup, lookup, read_cached, skip_cause
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
          note: Callable[[str], None], vllm_bin: Callable[[TuneSettings], str],
          workload: Workload | None = None
          ) -> prepare.Preparer | sim_layer2.SimPreparer | None:
    """The heads found for spec_method, layer 2's candidates in the space, and the
    prepare phase: on a real run, the model's download when it is a Hub id (before the
    baseline boots, not inside its boot) and what readies layer 2's checkpoints (cached
    under the store root's quant/ folder); the calibrated ones need the workload they
    calibrate on."""
    if siblings is not None and siblings.drafts is not None and 1 in settings.layers():
        space.offer_drafts(siblings.drafts.table())
    if settings.dry_run:  # the simulator answers for the Hub and the prepare phase
        return sim_layer2.offer(settings.model, space, note, len(workload.requests)
                                if workload is not None else None) if 2 in settings.layers() \
            else None
    model = model_fetch(settings.model, int(space.model.weight_bytes_bf16))
    if 2 not in settings.layers() or siblings is None:
        return None if model is None else prepare.Preparer("", {}, model=model)
    store = Path(settings.run_dir)
    calibrated = [] if workload is None else calibrate.offer(
        settings.model, space.hw, workload, settings.quant_python, store, note)
    return checkpoints.offer(settings.model, space.hw, space, siblings, store,
                             vllm_bin(settings), note, calibrated, model)


def model_fetch(model: str, size_bytes: int, env: Mapping[str, str] | None = None
                ) -> HubFetch | None:
    """The model's download before the baseline, when it is a Hub id and the Hub may be
    reached (not a local folder, HF_HUB_OFFLINE unset); vLLM then finds it in the cache."""
    env = os.environ if env is None else env
    if skip_cause(model, env) is not None:
        return None
    return HubFetch(model, size_bytes, (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"))


class Phases(Protocol):
    """Where a worker's running trial is (session._Phases)."""

    exp: int

    def phase(self, exp: int, phase: str) -> None: ...


def reporting(prepare_phase: prepare.Preparer | sim_layer2.SimPreparer | None,
              phases: Phases) -> prepare.Preparer | sim_layer2.SimPreparer | None:
    """The prepare phase telling a worker's phase line what it does while it runs
    (calibrating takes minutes); the simulator's takes no time to tell."""
    if not isinstance(prepare_phase, prepare.Preparer):
        return prepare_phase
    return prepare_phase.reporting(lambda text: phases.phase(phases.exp, f"prepare {text}"))
