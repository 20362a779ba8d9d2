"""Tests for aevyra_forge.engine.device_lock: a device locked by another process (a real
second process holding the lock file) is refused with its pid; the lock folder; the
busy-GPU verdict."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aevyra_forge.core.errors import HardwareError
from aevyra_forge.core.values import GpuInfo, Hardware
from aevyra_forge.engine import device_lock
from aevyra_forge.engine.device_lock import BUSY_MIB, busy, claim, devices, lock_dir

HOLDER = """\
import sys
from aevyra_forge.engine.device_lock import claim
claim(tuple(sys.argv[1:]), {"XDG_RUNTIME_DIR": sys.argv[0].rsplit("/", 1)[0]})
print("held", flush=True)
sys.stdin.read()  # hold until the test closes our stdin
"""


@pytest.fixture(autouse=True)
def _released() -> Iterator[None]:
    yield
    device_lock.release_all()


def _holder(runtime: Path, *names: str) -> subprocess.Popen[str]:
    script = runtime / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), *names], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_device_held_by_another_process_is_refused_with_its_pid(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    holder = _holder(tmp_path, "gpu0")
    try:
        with pytest.raises(HardwareError) as exc:
            claim(("gpu1", "gpu0"), env)
        message = str(exc.value)
        assert f"GPU 0 is in use by another aevyra-forge tuner (pid {holder.pid})" in message
        assert "\n" not in message and "wait for it to finish" in message
        claim(("gpu1",), env)  # another GPU of the host is free
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    claim(("gpu0",), env)  # free once the first tuner has exited
    claim(("gpu0",), env)  # taking a lock this process holds is a no-op


def test_the_cpu_lock_names_the_host(tmp_path: Path) -> None:
    holder = _holder(tmp_path, "cpu")
    try:
        with pytest.raises(HardwareError, match=r"^this host's CPU is in use .*pid"):
            claim(("cpu",), {"XDG_RUNTIME_DIR": str(tmp_path)})
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()


def test_the_lock_folder(tmp_path: Path) -> None:
    assert lock_dir({"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "aevyra-forge"
    fallback = lock_dir({"XDG_RUNTIME_DIR": str(tmp_path / "missing")})
    assert fallback.name.startswith("aevyra-forge-") and fallback.parent != tmp_path


def test_an_unwritable_lock_folder_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "aevyra-forge"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(HardwareError, match="XDG_RUNTIME_DIR") as exc:
        claim(("cpu",), {"XDG_RUNTIME_DIR": str(tmp_path)})
    assert "\n" not in str(exc.value)


def test_devices_of_a_host() -> None:
    gpus = tuple(GpuInfo(index=i, name="NVIDIA H100", memory_mib=81559) for i in (2, 3))
    assert devices(Hardware(device="cuda", gpus=gpus)) == ("gpu2", "gpu3")
    assert devices(Hardware(device="cpu")) == ("cpu",)


@given(st.integers(min_value=0, max_value=10**7), st.integers(min_value=1, max_value=8))
def test_busy_only_above_an_idle_gpus_share(used: int, count: int) -> None:
    names = tuple(f"gpu{i}" for i in range(count))
    why = busy(used, names)
    assert (why is not None) == (used > BUSY_MIB * count)
    if why is not None:
        assert why.startswith(f"{used} MiB of memory on GPU 0") and "in use" in why
    assert busy(None, names) is None
