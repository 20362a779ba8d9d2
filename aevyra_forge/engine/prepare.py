"""The prepare phase of a trial: writing the quantized checkpoint a layer-2 recipe serves,
before vLLM boots. The recipe names the checkpoint's folder literally (so it deploys as it
ran); a `QuantJob` says how to make it. The fast path is round-to-nearest with
compressed-tensors inside vLLM's own environment (rtn_script.py, run by file path: that
environment has no aevyra_forge), about 10 s on the tiny model; calibrated checkpoints
are written by cal_script.py with llm-compressor in its own environment, on samples of
the user's workload (engine/calibrate.py), in minutes, with progress lines while it runs.
A Hub sibling is downloaded into huggingface_hub's cache (engine/hub_fetch.py), so its
minutes are prepare time, not boot time.

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
from aevyra_forge.engine.hub_fetch import HubFetch, Once, fetch
from aevyra_forge.engine.process import terminate_group
from aevyra_forge.space import layer2

SCRIPT = Path(__file__).with_name("rtn_script.py")
CAL_SCRIPT = Path(__file__).with_name("cal_script.py")
MANIFEST = "manifest.json"
SAMPLES_FILE = "calibration_samples.jsonl"  # kept in the checkpoint: what calibrated it
PREPARE_TIMEOUT_S = 3600.0  # one quantization; the tiny model takes ~10 s (calibrated ~1 min)
POLL_S = 2.0  # how often a running prepare's log is read for progress
HEARTBEAT_S = 30.0  # a progress line at least this often, even when the log is quiet
PROGRESS = "forge-progress: "  # the scripts' progress lines (cal_script.PROGRESS)
MAX_PARTIAL = 65536  # of an unfinished log line, what is kept until its end is written
DISK_MARGIN_BYTES = 256 * 2**20  # free space kept beyond the checkpoint's estimated size
# forge's scheme name (layer2.RTN has its method and bits) -> rtn_script's --scheme
SCRIPT_SCHEME = {"w8a8": "W8A8", "w4a16": "W4A16", "fp8": "FP8_DYNAMIC"}
assert set(SCRIPT_SCHEME) == set(layer2.RTN)
# forge's calibrated scheme (layer2.CALIBRATED) -> cal_script's --scheme
CAL_SCHEME = {"w8a8": "W8A8", "w4a16-gptq": "W4A16_GPTQ", "w4a16-awq": "W4A16_AWQ",
              "fp8": "FP8_DYNAMIC"}
assert set(CAL_SCHEME) == set(layer2.CALIBRATED)
# what a checkpoint of each method weighs against the bf16 source (scales and 16-bit
# layers included), for the disk check; generous on purpose
SIZE_FACTOR = {"w8a8_int8": 0.75, "w4a16": 0.5, "fp8": 0.75}
LIBRARIES = ("torch", "transformers", "compressed-tensors", "safetensors")


@dataclass(frozen=True)
class Calibration:
    """A calibrated job's environment and data: the python with llm-compressor, and the
    samples of the workload it calibrates on (JSON lines; empty for data-free schemes)."""

    python: str
    samples: bytes
    digest: str  # sha256 of the samples, in the cache key and the folder's name
    count: int


@dataclass(frozen=True)
class QuantJob:
    """How to make one checkpoint: quantize `source` (a local model folder) with `scheme`
    into `out` (the recipe's quant.checkpoint); by round-to-nearest with the Preparer's
    python, or calibrated with llm-compressor when `calibration` is given."""

    source: Path
    scheme: str  # a key of SCRIPT_SCHEME, or of CAL_SCHEME when calibrated
    out: Path
    key: Mapping[str, Any] = field(default_factory=dict)  # what the folder name hashes
    calibration: Calibration | None = None

    @property
    def name(self) -> str:
        """The layer-2 candidate this job writes (rtn-w8a8, cal-w8a8, ...)."""
        return f"{'cal' if self.calibration else 'rtn'}-{self.scheme}"

    @property
    def method(self) -> str:
        """The quant-facts table's method of the checkpoint."""
        return (layer2.CALIBRATED[self.scheme][0] if self.calibration
                else layer2.RTN[self.scheme][0])


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


def library_versions(python: str, libraries: tuple[str, ...] = LIBRARIES,
                     timeout_s: float = 60.0) -> dict[str, str | None]:
    """The versions of the libraries that write the checkpoint, in the environment that
    runs the script (importlib.metadata: no torch import, a fraction of a second)."""
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n"
            "    try: return m.version(n)\n"
            "    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    try:
        done = subprocess.run([python, "-c", code, *libraries], capture_output=True,
                              text=True, timeout=timeout_s, check=False)
        found = json.loads(done.stdout) if done.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        found = {}
    return {name: found.get(name) for name in libraries}


def job(source: Path, scheme: str, cache_root: Path, versions: Mapping[str, str | None],
        calibration: str = "none", calibrated: Calibration | None = None) -> QuantJob:
    """The job for `scheme` of `source`, its folder under `cache_root` named by the hash
    of everything that decides its bytes (a calibrated one's name also shows its samples'
    hash, so every record of a recipe serving it says what calibrated it)."""
    script = CAL_SCRIPT if calibrated else SCRIPT
    key = {"source": str(source.resolve()), "revision": source_revision(source),
           "scheme": scheme, "method": "llm-compressor" if calibrated else "rtn",
           "calibration": calibrated.digest if calibrated else calibration,
           "versions": dict(versions),
           "script": hashlib.sha256(script.read_bytes()).hexdigest()[:16]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"cal-{scheme}-s{calibrated.digest[:10]}" if calibrated else scheme
    return QuantJob(source=source, scheme=scheme, out=cache_root / f"{name}-{digest}",
                    key=key, calibration=calibrated)


def weights_bytes(source: Path) -> int:
    return sum(p.stat().st_size for p in source.glob("*.safetensors"))


class Preparer:
    """Readies what a recipe serves before its boot: downloads the model itself once when
    it is a Hub id (`model`), a Hub sibling it serves (`fetches`), or makes the checkpoint
    it names when that is one of `jobs` and not yet written (reusing it when its manifest
    is there). `python` runs the round-to-nearest script (a calibrated job brings its
    own); `progress` is told what a running prepare is doing (its scripts' progress lines
    and the time so far), at least every HEARTBEAT_S."""

    def __init__(self, python: str, jobs: Mapping[str, QuantJob], *,
                 fetches: Mapping[str, HubFetch] | None = None, model: HubFetch | None = None,
                 timeout_s: float = PREPARE_TIMEOUT_S,
                 free_bytes: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free,
                 clock: Callable[[], float] = time.perf_counter,
                 progress: Callable[[str], None] | None = None,
                 once: Once | None = None) -> None:
        self.python = python
        self.jobs = dict(jobs)  # keyed by str(job.out)
        self.fetches = dict(fetches or {})  # Hub siblings, keyed by repo id
        self.model = model
        self.once = once or Once()  # shared with the copies `reporting` makes
        self.timeout_s = timeout_s
        self.free_bytes = free_bytes
        self.clock = clock
        self.progress = progress or (lambda text: None)

    def reporting(self, progress: Callable[[str], None]) -> Preparer:
        """This preparer telling `progress` (one worker's phase line) what it does."""
        return Preparer(self.python, self.jobs, fetches=self.fetches, model=self.model,
                        timeout_s=self.timeout_s, free_bytes=self.free_bytes,
                        clock=self.clock, progress=progress, once=self.once)

    def __call__(self, recipe: Recipe, log_path: Path) -> PrepareResult | None:
        """The prepare phase for `recipe`; None when it needs none."""
        model = self._model(log_path.with_suffix(".model.log"))
        if model is not None and model.failure is not None:
            return model
        checkpoint = recipe.quant.checkpoint or ""
        found = self.jobs.get(checkpoint)
        own = (self.fetch(self.fetches[checkpoint], log_path) if checkpoint in self.fetches
               else None if found is None else self.prepare(found, log_path))
        if model is None or own is None:
            return own or model
        return PrepareResult(model.seconds + own.seconds, own.reused, own.failure, own.log)

    def _model(self, log_path: Path) -> PrepareResult | None:
        """The model's download, the first time a trial asks in this process (a pool's
        workers wait for the one that downloads it); None once it is there."""
        if self.model is None:
            return None
        with self.once.lock:
            if self.once.done:
                return None
            result = self.fetch(self.model, log_path, label="model")
            self.once.done = result.failure is None
            return result

    def fetch(self, hub: HubFetch, log_path: Path, label: str = "") -> PrepareResult:
        """Download a Hub repo into huggingface_hub's cache before its boot."""
        start = self.clock()
        label = label or f"hub:{hub.repo}"
        done = fetch(hub, log_path, lambda text: self.progress(f"{label}: {text}"),
                     clock=self.clock, free_bytes=self.free_bytes, timeout_s=self.timeout_s,
                     poll_s=POLL_S, heartbeat_s=HEARTBEAT_S)
        return PrepareResult(seconds=self.clock() - start, reused=done.reused,
                             failure=done.failure, log=log_path)

    def prepare(self, quant: QuantJob, log_path: Path) -> PrepareResult:
        start = self.clock()
        if (quant.out / MANIFEST).is_file():
            return PrepareResult(seconds=self.clock() - start, reused=True)
        root = quant.out.parent
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return PrepareResult(self.clock() - start, failure=f"cannot create {root}: {exc}")
        needed = int(weights_bytes(quant.source) * SIZE_FACTOR[quant.method]) + DISK_MARGIN_BYTES
        free = self.free_bytes(root)
        if free < needed:
            return PrepareResult(self.clock() - start, failure=(
                f"not enough disk to write the {quant.name} checkpoint: ~{_gib(needed)} "
                f"needed, {_gib(free)} free under {root}; free some space or skip layer 2"))
        tmp = root / f".{quant.out.name}.tmp-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        failure = self._run(quant, tmp, log_path, start)
        seconds = self.clock() - start
        if failure is None:
            failure = self._publish(quant, tmp, seconds)
        if failure is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return PrepareResult(seconds=seconds, failure=failure, log=log_path)

    def _argv(self, quant: QuantJob, tmp: Path) -> list[str]:
        """The script's command line; a calibrated job's samples are written beside the
        checkpoint first (they stay there: what calibrated it)."""
        cal = quant.calibration
        if cal is None:
            return [self.python, str(SCRIPT), str(quant.source), str(tmp),
                    "--scheme", SCRIPT_SCHEME[quant.scheme]]
        argv = [cal.python, str(CAL_SCRIPT), str(quant.source), str(tmp),
                "--scheme", CAL_SCHEME[quant.scheme]]
        if cal.samples:
            tmp.mkdir(parents=True)
            (tmp / SAMPLES_FILE).write_bytes(cal.samples)
            argv += ["--samples", str(tmp / SAMPLES_FILE)]
        return argv

    def _run(self, quant: QuantJob, tmp: Path, log_path: Path, start: float) -> str | None:
        """Run the script, telling `progress` how it goes; None when it wrote the
        checkpoint, else why not (its log has the detail)."""
        try:
            argv = self._argv(quant, tmp)
        except OSError as exc:
            return f"cannot write the calibration samples into {tmp}: {exc}"
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("w") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            return f"cannot run {argv[0]}: {exc}"
        watch = _Watch(quant.name, log_path, self.progress, self.clock, start)
        try:
            while True:
                try:
                    code = proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if self.clock() - start > self.timeout_s:
                        return f"preparing {quant.name} took over {self.timeout_s:.0f} s"
                    watch.look()
        finally:
            if proc.poll() is None:  # a timeout, or the user interrupted forge
                terminate_group(proc.pid, proc)
        watch.look(final=True)
        if code != 0:
            return (f"preparing {quant.name} failed with exit code {code}: "
                    f"{_last_line(log_path)}")
        if not (tmp / "config.json").is_file():
            return f"preparing {quant.name} wrote no config.json"
        return None

    def _publish(self, quant: QuantJob, tmp: Path, seconds: float) -> str | None:
        """Write the manifest and move the folder into place in one rename, so a folder
        with a manifest is always complete."""
        cal = quant.calibration
        manifest = {"key": dict(quant.key), "scheme": quant.scheme, "candidate": quant.name,
                    "method": quant.method, "prepare_s": round(seconds, 3),
                    "calibration": None if cal is None else {
                        "samples": cal.count, "sha256": cal.digest,
                        "file": SAMPLES_FILE if cal.samples else None},
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())
                              if p.is_file()}}
        try:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if quant.out.exists():  # another run finished the same key first
                shutil.rmtree(tmp)
            else:
                tmp.rename(quant.out)
        except OSError as exc:
            return f"cannot store the checkpoint in {quant.out}: {exc}"
        return None


class _Watch:
    """Reads a running prepare's log as it grows and tells `progress` each progress line
    the scripts print, with the time so far (none is lost between two looks, however fast
    the script moves on), and the newest again every HEARTBEAT_S while the log is quiet,
    so a calibration of many minutes never looks stuck."""

    def __init__(self, name: str, log: Path, progress: Callable[[str], None],
                 clock: Callable[[], float], start: float) -> None:
        self.name, self.log, self.progress = name, log, progress
        self.clock, self.start = clock, start
        self.read = 0  # bytes of the log already looked at
        self.partial = b""  # a line the script has not finished writing
        self.said = ""
        self.said_at = start

    def look(self, final: bool = False) -> None:
        now = self.clock()
        fresh = self._new_lines(final)
        for line in fresh:
            self.progress(f"{self.name}: {line} ({now - self.start:.0f} s)")
        if fresh:
            self.said, self.said_at = fresh[-1], now
        elif not final and now - self.said_at >= HEARTBEAT_S:
            self.said_at = now
            self.progress(f"{self.name}: {self.said or 'starting'} ({now - self.start:.0f} s)")

    def _new_lines(self, final: bool) -> list[str]:
        """The progress lines written since the last look (a last unfinished line too
        when the script has ended)."""
        try:
            with self.log.open("rb") as f:
                f.seek(self.read)
                chunk = f.read()
        except OSError:
            return []
        self.read += len(chunk)
        text = self.partial + chunk
        lines = text.replace(b"\r", b"\n").split(b"\n")
        self.partial = b"" if final else lines.pop()[-MAX_PARTIAL:]
        return [ln[len(PROGRESS):].strip() for ln in
                (raw.decode(errors="replace") for raw in lines) if ln.startswith(PROGRESS)]


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
