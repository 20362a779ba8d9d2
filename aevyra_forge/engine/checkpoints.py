"""Layer 2's candidates on a real host and the Preparer that readies each before its boot:
the Hub siblings the lookup kept (downloaded by engine/hub_fetch.py), the round-to-nearest
checkpoints forge writes in vLLM's own environment, and the calibrated ones
engine/calibrate.offer built on the workload (both written by engine/prepare.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from aevyra_forge.core.values import Hardware
from aevyra_forge.engine.hub_fetch import HubFetch
from aevyra_forge.engine.prepare import (
    SCRIPT_SCHEME,
    Preparer,
    QuantJob,
    job,
    library_versions,
    vllm_python,
)
from aevyra_forge.space import layer2
from aevyra_forge.space.hub import HubLookup
from aevyra_forge.space.knob_space import KnobSpace


def offer(model: str, hw: Hardware, space: KnobSpace, siblings: HubLookup | None,
          store_root: Path, vllm_bin: str, note: Callable[[str], None],
          calibrated: Sequence[tuple[layer2.QuantCandidate, QuantJob]] = (),
          download: HubFetch | None = None) -> Preparer | None:
    """Give the run's KnobSpace layer 2's candidates (the Hub siblings, the
    round-to-nearest checkpoints this hardware serves, and the `calibrated` ones
    engine/calibrate.offer built) and return the Preparer that downloads the siblings
    (and the model itself: `download`, when given) and writes forge's own, or None when
    there is nothing to ready (said in one line)."""
    found = layer2.hub_candidates(siblings)
    cal_jobs = {str(j.out): j for _, j in calibrated}
    cal = [c for c, _ in calibrated]
    written, jobs, why_not = _rtn(model, hw, store_root, vllm_bin)
    listed = [*found, *written, *cal]
    space.offer_quant(listed)
    if why_not:
        note(f"layer 2: {why_not}; {len(found)} Hub candidate(s)"
             + (f", {len(cal)} calibrated" if cal else ""))
    else:
        note("layer 2 candidates: " + (", ".join(c.name for c in listed) or "none"))
    fetches = {} if siblings is None else {
        s.repo: HubFetch(s.repo, s.size_bytes, siblings.endpoint) for s in siblings.siblings}
    if not jobs and not cal_jobs and not fetches and download is None:
        return None
    return Preparer(vllm_python(vllm_bin) or "", {**jobs, **cal_jobs}, fetches=fetches,
                    model=download)


def _rtn(model: str, hw: Hardware, store_root: Path, vllm_bin: str
         ) -> tuple[list[layer2.QuantCandidate], dict[str, QuantJob], str]:
    """The round-to-nearest candidates this hardware serves and their jobs, or why forge
    writes none here."""
    source = Path(model)
    python = vllm_python(vllm_bin)
    if python is None:
        return [], {}, f"no python beside {vllm_bin} to write quantized checkpoints with"
    if not (source / "config.json").is_file():
        return [], {}, ("writing quantized checkpoints here needs the model in a local "
                        f"folder (download {model} and pass its path as --model)")
    versions = library_versions(python)
    if not versions.get("compressed-tensors") or not versions.get("torch"):
        return [], {}, (f"vLLM's environment ({python}) lacks compressed-tensors or torch: "
                        "no round-to-nearest checkpoints")
    jobs = {scheme: job(source, scheme, store_root / "quant", versions)
            for scheme in SCRIPT_SCHEME}
    written = layer2.rtn_candidates([(s, j.out) for s, j in jobs.items()], source, hw)
    kept = {c.checkpoint for c in written}
    return written, {str(j.out): j for j in jobs.values() if str(j.out) in kept}, ""
