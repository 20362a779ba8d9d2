"""One tuner per device on this host: an exclusive lock per GPU index (or one for the CPU),
held until the process exits, so two `tune` commands can never measure on the same GPU
at once; and a check that the GPU holds no other process's memory before the baseline.
The locks live in a per-user runtime folder, not in a run store: two stores share the
host's GPUs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from aevyra_forge.core.errors import HardwareError
from aevyra_forge.core.values import Hardware

LOCK_FOLDER = "aevyra-forge"
BUSY_MIB = 1024  # memory in use above this on an idle GPU means another process holds it

_HELD: dict[str, int] = {}  # device -> locked descriptor, kept until this process exits


def devices(hw: Hardware) -> tuple[str, ...]:
    """The names of the devices a run on `hw` uses: "gpu<index>" each, or "cpu"."""
    if hw.device == "cpu" or not hw.gpus:
        return ("cpu",)
    return tuple(f"gpu{g.index}" for g in hw.gpus)


def lock_dir(env: Mapping[str, str] | None = None) -> Path:
    """$XDG_RUNTIME_DIR/aevyra-forge (per user, cleared at logout), else
    <tmp>/aevyra-forge-<uid>."""
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / LOCK_FOLDER
    return Path(tempfile.gettempdir()) / f"{LOCK_FOLDER}-{os.getuid()}"


def claim(names: tuple[str, ...], env: Mapping[str, str] | None = None) -> None:
    """Take each device's lock (kept until this process exits; taking one again is a
    no-op), or raise HardwareError naming the tuner that holds it."""
    folder = lock_dir(env)
    for name in names:
        if name in _HELD:
            continue
        _HELD[name] = _take(folder, name)


def _take(folder: Path, name: str) -> int:
    path = folder / f"{name}.lock"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_uid != os.getuid():
            raise HardwareError(f"{folder} belongs to another user; remove it, or set "
                                "XDG_RUNTIME_DIR to a folder of yours")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise HardwareError(f"{path}: {exc.strerror or exc} while taking the lock for "
                            f"{_label(name)}; fix the folder's permissions or set "
                            "XDG_RUNTIME_DIR to a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise HardwareError(
            f"{_label(name)} is in use by another aevyra-forge tuner (pid {holder}): two "
            "tuners on one device distort each other's measurements; wait for it to "
            "finish or stop it, then retry") from None
    # Our pid goes in the file only so that a second tuner can name the holder.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release_all() -> None:
    """Give every device lock back (the process's exit does the same)."""
    for name in list(_HELD):
        fd = _HELD.pop(name)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def busy(used_mib: int | None, names: tuple[str, ...]) -> str | None:
    """Why the GPUs look busy before we boot anything (memory in use by another
    process), or None."""
    if used_mib is None or used_mib <= BUSY_MIB * len(names):
        return None
    return (f"{used_mib} MiB of memory on {', '.join(_label(n) for n in names)} is already "
            "in use by another process")


def _label(name: str) -> str:
    return "this host's CPU" if name == "cpu" else f"GPU {name.removeprefix('gpu')}"
