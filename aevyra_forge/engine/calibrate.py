"""Calibrated layer-2 candidates: the samples of the user's own workload a checkpoint is
calibrated on (a stratified, seeded subsample of its requests' messages, hashed), where
the calibration environment is (llm-compressor in its own virtual environment, from
scripts/setup_quant_env.sh), and the candidates and jobs engine/prepare.py runs with it.
The chat template is applied inside cal_script.py, which has the tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aevyra_forge.core.values import Hardware
from aevyra_forge.core.workload import Workload
from aevyra_forge.engine.prepare import (
    Calibration,
    QuantJob,
    job,
    library_versions,
    weights_bytes,
)
from aevyra_forge.space import layer2, quant

CAL_SAMPLES = 64  # requests calibrated on (llm-compressor's examples use 512 on GPUs)
CAL_SEED = 0  # fixed, not the run's --seed: the same workload reuses the same checkpoint
LIBRARIES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "datasets")
QUANT_ENV = ".venv-quant"  # where scripts/setup_quant_env.sh puts the environment
MISSING = ("calibrated candidates need llm-compressor: run scripts/setup_quant_env.sh "
           "(or pass --quant-python)")


@dataclass(frozen=True)
class Samples:
    """The calibration samples as cal_script.py reads them: one JSON object per line,
    {"messages": [...]} for chat requests, {"prompt": "..."} for completions."""

    lines: bytes
    count: int

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.lines).hexdigest()


def samples(workload: Workload, n: int = CAL_SAMPLES) -> Samples:
    """`n` of the workload's requests (all when it has fewer), chosen by the stratified
    sampler that --sample uses (input- and output-length quartiles and prefix groups,
    each stratum its proportional share) with a fixed seed, in trace order."""
    chosen = workload.sample(n, CAL_SEED).requests
    rows = [{"messages": [{"role": m.role, "content": m.content} for m in r.messages]}
            if r.messages is not None else {"prompt": r.prompt or ""} for r in chosen]
    text = "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)
    return Samples(lines=text.encode(), count=len(rows))


def quant_python(setting: str | None, roots: tuple[Path, ...] | None = None) -> str | None:
    """The calibration environment's python: --quant-python (or FORGE_QUANT_PYTHON), else
    .venv-quant/bin/python in this checkout or the current directory, when it exists."""
    if setting:
        return shutil.which(setting)
    here = roots if roots is not None else (Path(__file__).resolve().parents[2], Path.cwd())
    found = (root / QUANT_ENV / "bin" / "python" for root in here)
    return next((str(p) for p in found if os.access(p, os.X_OK)), None)


def environment(setting: str | None) -> tuple[str | None, dict[str, str | None]]:
    """The calibration python and its libraries' versions (None where missing), for
    `offer` and `doctor`."""
    python = quant_python(setting)
    if python is None:
        return None, {name: None for name in LIBRARIES}
    return python, library_versions(python, LIBRARIES)


def offer(model: str, hw: Hardware, workload: Workload, setting: str | None,
          store_root: Path, note: Callable[[str], None]
          ) -> list[tuple[layer2.QuantCandidate, QuantJob]]:
    """The calibrated candidates this hardware serves, each with the job that writes it
    (cached under the store root's quant/ folder), or none and one line saying why."""
    source = Path(model)
    if not (source / "config.json").is_file():
        return []  # checkpoints.offer says why (the same for every checkpoint forge writes)
    python, versions = environment(setting)
    if python is None or not versions.get("llmcompressor"):
        where = f" ({setting} not found)" if setting and python is None else (
            f" ({python} lacks llmcompressor)" if python else "")
        note(f"layer 2: {MISSING}{where}; going on with round-to-nearest and Hub candidates")
        return []
    chosen = samples(workload)
    data = Calibration(python=python, samples=chosen.lines, digest=chosen.digest,
                       count=chosen.count)
    # FP8 dynamic reads no data: its key and folder do not depend on the workload
    none = Calibration(python=python, samples=b"", digest="none", count=0)
    jobs = {scheme: job(source, scheme, store_root / "quant", versions,
                        calibrated=none if scheme == "fp8" else data)
            for scheme in layer2.CALIBRATED}
    listed = layer2.calibrated_candidates([(s, j.out) for s, j in jobs.items()],
                                          weights_bytes(source), hw, chosen.count)
    offered = {c.checkpoint for c in listed}
    refused = {layer2.CALIBRATED[s][0] for s, j in jobs.items() if str(j.out) not in offered}
    for method in sorted(refused):  # one line per reason: the hardware gate of the method
        names = [f"cal-{s}" for s in jobs if layer2.CALIBRATED[s][0] == method]
        note(f"layer 2: {', '.join(names)} not offered here: "
             f"{quant.checkpoint_refusal(method, hw)}")
    by_out = {str(j.out): j for j in jobs.values()}
    return [(c.model_copy(update={"note": _note(c, by_out[c.checkpoint])}),
             by_out[c.checkpoint]) for c in listed]


def _note(candidate: layer2.QuantCandidate, quant: QuantJob) -> str:
    cal = quant.calibration
    if cal is None or not cal.samples:
        return "written here with llm-compressor (FP8 dynamic: no calibration data)"
    return f"{candidate.note} (samples sha256 {cal.digest[:12]})"
