"""The prepare phase of a trial: writing the quantized checkpoint a layer-2 recipe serves,
before vLLM boots. The recipe names the checkpoint's folder literally (so it deploys as it
ran); a `QuantJob` says how to make it. The fast path is round-to-nearest with
compressed-tensors inside vLLM's own environment (rtn_script.py, run by file path: that
environment has no aevyra_forge), about 10 s on the tiny model.

Checkpoints are cached under the store root's quant/ folder keyed by (model and revision,
scheme, calibration hash, library versions, the script's own hash), each with a manifest,
so a resumed or later run reuses them. A failed prepare is data (a PrepareResult with the
reason and its log), never an exception: the trial becomes a `prepare_failed` row."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import Hardware
from aevyra_forge.space import layer2
from aevyra_forge.space.hub import HubLookup
from aevyra_forge.space.knob_space import KnobSpace

SCRIPT = Path(__file__).with_name("rtn_script.py")
MANIFEST = "manifest.json"
PREPARE_TIMEOUT_S = 3600.0  # one quantization; the tiny model takes ~10 s
DISK_MARGIN_BYTES = 256 * 2**20  # free space kept beyond the checkpoint's estimated size
# forge's scheme name (layer2.RTN has its method and bits) -> rtn_script's --scheme
SCRIPT_SCHEME = {"w8a8": "W8A8", "w4a16": "W4A16", "fp8": "FP8_DYNAMIC"}
assert set(SCRIPT_SCHEME) == set(layer2.RTN)
# what each scheme's checkpoint weighs against the bf16 source (scales and 16-bit layers
# included), for the disk check; generous on purpose
SIZE_FACTOR = {"w8a8": 0.75, "w4a16": 0.5, "fp8": 0.75}
LIBRARIES = ("torch", "transformers", "compressed-tensors", "safetensors")


@dataclass(frozen=True)
class QuantJob:
    """How to make one checkpoint: quantize `source` (a local model folder) with `scheme`
    into `out` (the recipe's quant.checkpoint)."""

    source: Path
    scheme: str  # a key of SCRIPT_SCHEME
    out: Path
    key: Mapping[str, Any] = field(default_factory=dict)  # what the folder name hashes


@dataclass(frozen=True)
class PrepareResult:
    seconds: float
    reused: bool = False
    failure: str | None = None  # why nothing was written; None when the checkpoint is there
    log: Path | None = None


def vllm_python(vllm_bin: str) -> str | None:
    """The python of the environment the `vllm` executable belongs to (its script's
    shebang, else the python beside it), or None when neither is there."""
    path = Path(vllm_bin)
    try:
        with path.open("rb") as f:
            first = f.readline(512).decode(errors="replace")
    except OSError:
        first = ""
    if first.startswith("#!"):
        interpreter = first[2:].strip().split(" ")[0]
        if interpreter and os.access(interpreter, os.X_OK) and "python" in Path(interpreter).name:
            return interpreter
    beside = path.parent / "python"
    return str(beside) if os.access(beside, os.X_OK) else None


def source_revision(source: Path) -> str:
    """A cheap fingerprint of a model folder: every file's name, size and modification
    time, and config.json's text (hashing gigabytes of weights would take minutes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(source)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                      .encode())
    config = source / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return digest.hexdigest()[:16]


def library_versions(python: str, timeout_s: float = 60.0) -> dict[str, str | None]:
    """The versions of the libraries that write the checkpoint, in the environment that
    runs the script (importlib.metadata: no torch import, a fraction of a second)."""
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n"
            "    try: return m.version(n)\n"
            "    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    try:
        done = subprocess.run([python, "-c", code, *LIBRARIES], capture_output=True,
                              text=True, timeout=timeout_s, check=False)
        found = json.loads(done.stdout) if done.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        found = {}
    return {name: found.get(name) for name in LIBRARIES}


def job(source: Path, scheme: str, cache_root: Path, versions: Mapping[str, str | None],
        calibration: str = "none") -> QuantJob:
    """The job for `scheme` of `source`, its folder under `cache_root` named by the hash
    of everything that decides its bytes."""
    key = {"source": str(source.resolve()), "revision": source_revision(source),
           "scheme": scheme, "method": "rtn", "calibration": calibration,
           "versions": dict(versions),
           "script": hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:16]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return QuantJob(source=source, scheme=scheme, out=cache_root / f"{scheme}-{digest}",
                    key=key)


def weights_bytes(source: Path) -> int:
    return sum(p.stat().st_size for p in source.glob("*.safetensors"))


class Preparer:
    """Makes the checkpoint a recipe names when it is one of `jobs` and not yet written;
    reuses it when its manifest is there."""

    def __init__(self, python: str, jobs: Mapping[str, QuantJob], *,
                 timeout_s: float = PREPARE_TIMEOUT_S,
                 free_bytes: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.python = python
        self.jobs = dict(jobs)  # keyed by str(job.out)
        self.timeout_s = timeout_s
        self.free_bytes = free_bytes
        self.clock = clock

    def __call__(self, recipe: Recipe, log_path: Path) -> PrepareResult | None:
        """The prepare phase for `recipe`; None when it needs none."""
        found = self.jobs.get(recipe.quant.checkpoint or "")
        return None if found is None else self.prepare(found, log_path)

    def prepare(self, quant: QuantJob, log_path: Path) -> PrepareResult:
        start = self.clock()
        if (quant.out / MANIFEST).is_file():
            return PrepareResult(seconds=self.clock() - start, reused=True)
        root = quant.out.parent
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return PrepareResult(self.clock() - start, failure=f"cannot create {root}: {exc}")
        needed = int(weights_bytes(quant.source) * SIZE_FACTOR[quant.scheme]) + DISK_MARGIN_BYTES
        free = self.free_bytes(root)
        if free < needed:
            return PrepareResult(self.clock() - start, failure=(
                f"not enough disk to write the {quant.scheme} checkpoint: ~{_gib(needed)} "
                f"needed, {_gib(free)} free under {root}; free some space or skip layer 2"))
        tmp = root / f".{quant.out.name}.tmp-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        failure = self._run(quant, tmp, log_path)
        seconds = self.clock() - start
        if failure is None:
            failure = self._publish(quant, tmp, seconds)
        if failure is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return PrepareResult(seconds=seconds, failure=failure, log=log_path)

    def _run(self, quant: QuantJob, tmp: Path, log_path: Path) -> str | None:
        """Run the script; None when it wrote the checkpoint, else why not (its log has
        the detail)."""
        argv = [self.python, str(SCRIPT), str(quant.source), str(tmp),
                "--scheme", SCRIPT_SCHEME[quant.scheme]]
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("w") as log:
                done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=self.timeout_s,
                                      check=False, start_new_session=True)
        except subprocess.TimeoutExpired:
            return f"quantizing ({quant.scheme}) took over {self.timeout_s:.0f} s"
        except OSError as exc:
            return f"cannot run {self.python}: {exc}"
        if done.returncode != 0:
            return (f"quantizing ({quant.scheme}) failed with exit code {done.returncode}: "
                    f"{_last_line(log_path)}")
        if not (tmp / "config.json").is_file():
            return f"quantizing ({quant.scheme}) wrote no config.json"
        return None

    def _publish(self, quant: QuantJob, tmp: Path, seconds: float) -> str | None:
        """Write the manifest and move the folder into place in one rename, so a folder
        with a manifest is always complete."""
        manifest = {"key": dict(quant.key), "scheme": quant.scheme,
                    "method": layer2.RTN[quant.scheme][0], "prepare_s": round(seconds, 3),
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}}
        try:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if quant.out.exists():  # another run finished the same key first
                shutil.rmtree(tmp)
            else:
                tmp.rename(quant.out)
        except OSError as exc:
            return f"cannot store the checkpoint in {quant.out}: {exc}"
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _last_line(path: Path) -> str:
    """The log's last non-empty line (a traceback's error), for the row's reason."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()
                 if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def offer(model: str, hw: Hardware, space: KnobSpace, siblings: HubLookup | None,
          store_root: Path, vllm_bin: str, note: Callable[[str], None]) -> Preparer | None:
    """Give the run's KnobSpace layer 2's candidates (the Hub siblings, and the
    round-to-nearest checkpoints this hardware serves) and return the Preparer that writes
    the latter, or None when forge writes none here (said in one line)."""
    found = layer2.hub_candidates(siblings)
    source = Path(model)
    python = vllm_python(vllm_bin)
    why_not = ("" if python is not None else
               f"no python beside {vllm_bin} to write quantized checkpoints with")
    if not why_not and not (source / "config.json").is_file():
        why_not = ("writing quantized checkpoints here needs the model in a local folder "
                   f"(download {model} and pass its path as --model)")
    if why_not or python is None:
        space.offer_quant(found)
        note(f"layer 2: {why_not}; {len(found)} Hub candidate(s)")
        return None
    versions = library_versions(python)
    if not versions.get("compressed-tensors") or not versions.get("torch"):
        space.offer_quant(found)
        note(f"layer 2: vLLM's environment ({python}) lacks compressed-tensors or torch: "
             "no round-to-nearest checkpoints")
        return None
    jobs = {scheme: job(source, scheme, store_root / "quant", versions)
            for scheme in SCRIPT_SCHEME}
    written = layer2.rtn_candidates([(s, j.out) for s, j in jobs.items()], source, hw)
    space.offer_quant([*found, *written])
    note("layer 2 candidates: " + (", ".join(c.name for c in [*found, *written]) or "none"))
    return Preparer(python, {str(j.out): j for j in jobs.values()
                             if str(j.out) in {c.checkpoint for c in written}})
