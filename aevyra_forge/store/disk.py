"""The run store's file-system primitives: durable appends, atomic replacement, the folder
locks, and OS errors (a full, read-only or forbidden disk) turned into one-line
StoreErrors that say what happened and how to go on."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from aevyra_forge.core.errors import RunLockedError, StoreError

LOCK = ".lock"
# What to do once the disk is fixed: a run already created keeps every recorded line.
RESUME = "then run `aevyra-forge tune resume` (the experiments recorded so far are kept)"
RETRY = "then retry"

_FIXES: dict[int, tuple[str, str]] = {  # errno -> (what happened, how to fix it)
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota"),
    errno.EROFS: ("the file system is read-only",
                  "remount it read-write, or copy the store to a writable disk and pass "
                  "--run-dir there"),
    errno.EACCES: ("permission denied", "give this user write access to it (chmod/chown)"),
    errno.EPERM: ("operation not permitted",
                  "give this user write access to it (chmod/chown)"),
}


def disk_error(exc: OSError, doing: str, where: Path | str, then: str = RESUME
               ) -> StoreError:
    """One line for an OS error met while `doing` something under `where`."""
    place = exc.filename or where
    what, fix = _FIXES.get(exc.errno or 0, (exc.strerror or str(exc), "check the disk"))
    return StoreError(f"{place}: {what} while {doing}; {fix}, {then}")


@contextlib.contextmanager
def on_disk(doing: str, where: Path | str, then: str = RESUME) -> Iterator[None]:
    """Turn an OSError inside the block into disk_error's StoreError."""
    try:
        yield
    except OSError as exc:
        raise disk_error(exc, doing, where, then) from None


def append_line(path: Path, line: str) -> None:
    """Add one line to `path`; it is on disk when this returns. A write that fails part
    way (a full disk) is cut back off, so the file never ends in half a line that the
    next append would run into."""
    data = (line + "\n").encode()
    with on_disk(f"appending to {path.name}", path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(data):  # os.write may write less than asked
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


def atomic_write(path: Path, text: str, mode: int = 0o666, then: str = RESUME) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it, so a reader
    sees the old file or the new one, never half of either. `mode` as for os.open (the
    umask applies)."""
    with on_disk(f"writing {path.name}", path, then):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            # mkstemp creates 0600; give the file the permissions a plain open() would
            os.fchmod(fd, mode & ~_UMASK)
            with os.fdopen(fd, "wb") as fh:
                fh.write(text.encode())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def acquire(path: Path, then: str = RESUME) -> int:
    """The run folder's exclusive lock (a descriptor), or RunLockedError naming the
    process that holds it."""
    if not path.is_dir():
        raise StoreError(f"{path}: run folder not found; pass a folder under .forge/runs/")
    with on_disk("taking the run's lock", path / LOCK, then):
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLockedError(
            f"run {path} is in use by another aevyra-forge process (pid {holder}); wait for "
            "it to finish or stop that process, then retry"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        with on_disk("taking the run's lock", path / LOCK, then):
            # Our pid goes in the file only so a second process can name the holder.
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def store_lock(runs_dir: Path) -> Iterator[None]:
    """The store-wide lock, held while a new run takes its number."""
    with on_disk("taking the store's lock", runs_dir / LOCK, RETRY):
        fd = os.open(runs_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for a scan and a mkdir only: blocking is fine
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
