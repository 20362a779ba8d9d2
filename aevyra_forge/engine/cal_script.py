"""Calibrated quantization with llm-compressor on the user's own workload: reads the
calibration samples forge chose (engine/calibrate.py), applies the model's chat template,
runs `oneshot` with the scheme's recipe and saves a compressed-tensors checkpoint vLLM
serves (W8A8 INT8 by SmoothQuant + GPTQ, W4A16 by GPTQ or AWQ, FP8 dynamic).

A standalone script: forge runs it by file path with the calibration environment's python
(scripts/setup_quant_env.sh; llm-compressor's pins clash with vLLM's, so it has its own),
`python cal_script.py SRC OUT --scheme W8A8 --samples FILE`; it imports nothing of
aevyra_forge. It prints `forge-progress: ...` lines as it goes (the CLI shows the last
one) and one JSON line {"ok": true, "versions": {...}} at the end, or exits non-zero with
the reason on stderr."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROGRESS = "forge-progress: "  # the prefix engine/prepare.py looks for in the log
# forge's script scheme -> (the algorithm, whether it reads calibration data)
SCHEMES = {"W8A8": ("SmoothQuant + GPTQ", True), "W4A16_GPTQ": ("GPTQ", True),
           "W4A16_AWQ": ("AWQ", True), "FP8_DYNAMIC": ("FP8 dynamic", False)}
SMOOTHING_STRENGTH = 0.8  # llm-compressor's W8A8 examples; 0.5 is the paper's default
IGNORE = ["lm_head"]  # the output projection stays 16-bit, as in every published recipe


def say(text: str) -> None:
    print(f"{PROGRESS}{text}", flush=True)


def recipe(scheme: str) -> list[Any]:
    """llm-compressor's modifiers for `scheme` (looked up in 0.14: SmoothQuant and AWQ
    moved to modifiers.transform; AWQ only smooths, a QuantizationModifier quantizes)."""
    quantization = importlib.import_module("llmcompressor.modifiers.quantization")
    transform = importlib.import_module("llmcompressor.modifiers.transform")
    if scheme == "W8A8":
        return [transform.SmoothQuantModifier(smoothing_strength=SMOOTHING_STRENGTH),
                quantization.GPTQModifier(targets="Linear", scheme="W8A8", ignore=IGNORE)]
    if scheme == "W4A16_GPTQ":
        return [quantization.GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)]
    if scheme == "W4A16_AWQ":
        return [transform.AWQModifier(),
                quantization.QuantizationModifier(targets="Linear", scheme="W4A16",
                                                  ignore=IGNORE)]
    return [quantization.QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC",
                                              ignore=IGNORE)]


def texts(samples: Path, tokenizer: Any) -> list[str]:
    """Each sample as the model sees it: chat messages through the chat template (no
    generation prompt: the conversation as sent), completion prompts as they are."""
    out = []
    for line in samples.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        sample = json.loads(line)
        if sample.get("messages") and getattr(tokenizer, "chat_template", None):
            out.append(tokenizer.apply_chat_template(sample["messages"], tokenize=False))
        elif sample.get("messages"):  # a base model without a template: the plain turns
            out.append("\n".join(m["content"] for m in sample["messages"]))
        else:
            out.append(sample.get("prompt") or "")
    return [t for t in out if t]


def _cpu_only_awq(torch: Any) -> None:
    """llm-compressor's AWQ pins its cached activations for faster GPU copies, which
    CPU-only torch refuses (`Cannot access accelerator device`); without an accelerator
    there is nothing to copy to, so pinning is skipped."""
    if torch.accelerator.is_available():
        return
    cache = importlib.import_module("llmcompressor.pipelines.cache")
    cache.IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def calibrate(src: Path, out: Path, scheme: str, samples: Path | None,
              max_seq_length: int) -> dict[str, str]:
    """Write `src` quantized with `scheme`, calibrated on `samples`, into `out`; return
    the library versions."""
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    llmcompressor = importlib.import_module("llmcompressor")
    ct = importlib.import_module("compressed_tensors")
    datasets = importlib.import_module("datasets")
    torch.manual_seed(0)
    say(f"loading {src.name}")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
    kwargs: dict[str, Any] = {}
    if SCHEMES[scheme][1]:
        if samples is None:
            raise SystemExit(f"{scheme} needs calibration samples (--samples FILE)")
        found = texts(samples, tokenizer)
        if not found:
            raise SystemExit(f"{samples}: no calibration samples in it")
        # the template already holds the special tokens the model expects
        encoded = [tokenizer(t, add_special_tokens=False, truncation=True,
                             max_length=max_seq_length) for t in found]
        kwargs = {"dataset": datasets.Dataset.from_list(
                      [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}
                       for e in encoded]),
                  "num_calibration_samples": len(encoded), "max_seq_length": max_seq_length,
                  "shuffle_calibration_samples": False}
        tokens = sum(len(e["input_ids"]) for e in encoded)
        say(f"calibrating with {SCHEMES[scheme][0]} on {len(encoded)} samples "
            f"({tokens} tokens)")
    else:
        say(f"quantizing with {SCHEMES[scheme][0]} (no calibration data needed)")
    if scheme == "W4A16_AWQ":
        _cpu_only_awq(torch)
    llmcompressor.oneshot(model=model, tokenizer=tokenizer, recipe=recipe(scheme),
                          output_dir=str(out), **kwargs)
    say("saved the compressed checkpoint")
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "llmcompressor": llmcompressor.__version__, "compressed-tensors": ct.__version__}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="model folder (config.json, safetensors)")
    parser.add_argument("out", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--scheme", choices=sorted(SCHEMES), required=True)
    parser.add_argument("--samples", type=Path, help="calibration samples (JSON lines)")
    parser.add_argument("--max-seq-length", type=int, default=512)
    args = parser.parse_args(argv)
    versions = calibrate(args.src, args.out, args.scheme, args.samples, args.max_seq_length)
    print(json.dumps({"ok": True, "versions": versions}), flush=True)


if __name__ == "__main__":
    try:
        main()
    except ImportError as exc:
        print(f"missing in this environment: {exc}", file=sys.stderr)
        sys.exit(3)
