"""Round-to-nearest quantization with compressed-tensors alone: no calibration data, so it
runs inside vLLM's own environment (which has torch, transformers and compressed-tensors,
not aevyra_forge) and writes a checkpoint vLLM serves (W8A8 INT8, W4A16, FP8 dynamic).

A standalone script: forge runs it by file path with the vLLM environment's python,
`python rtn_script.py SRC OUT --scheme W8A8`; it imports nothing of aevyra_forge. It
prints one JSON line {"ok": true, "versions": {...}} at the end, or exits non-zero with
the reason on stderr."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# forge's scheme name -> compressed-tensors' preset (only those vLLM's CPU build or GPUs
# serve from a round-to-nearest checkpoint)
PRESETS = {"W8A8": "W8A8", "W4A16": "W4A16", "FP8_DYNAMIC": "FP8_DYNAMIC"}
# files copied from the source folder as they are (tokenizer, chat template, generation)
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "generation_config.json", "tokenizer.model", "chat_template.jinja",
          "chat_template.json", "vocab.json", "merges.txt")


def _weight_qparams(torch: Any, weight: Any, args: Any, calculate_qparams: Any) -> Any:
    """Scale and zero point of one weight for the scheme's strategy (channel, group or
    tensor), from its min and max: round-to-nearest, no data."""
    w = weight.detach().float()
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "group":
        rows, cols = w.shape
        grouped = w.reshape(rows, cols // args.group_size, args.group_size)
        lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    elif strategy == "channel":
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    elif strategy == "tensor":
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    else:
        raise SystemExit(f"weight strategy {strategy!r} is not supported by this script")
    return calculate_qparams(lo, hi, args)


def quantize(src: Path, out: Path, scheme: str) -> dict[str, str]:
    """Write `src` quantized with `scheme` into `out`; return the library versions."""
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    ct = importlib.import_module("compressed_tensors")
    q = importlib.import_module("compressed_tensors.quantization")
    helpers = importlib.import_module("compressed_tensors.quantization.utils")
    compressors = importlib.import_module("compressed_tensors.compressors")
    safetensors_torch = importlib.import_module("safetensors.torch")

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(src), dtype=torch.bfloat16, low_cpu_mem_usage=True)
    model.eval()
    preset = q.preset_name_to_scheme(PRESETS[scheme], targets=["Linear"])
    config = q.QuantizationConfig(config_groups={"group_0": preset}, ignore=["lm_head"])
    q.apply_quantization_config(model, config)
    with torch.no_grad():
        for _, module in model.named_modules():
            qscheme = getattr(module, "quantization_scheme", None)
            if qscheme is None or qscheme.weights is None:
                continue
            scale, zero_point = _weight_qparams(torch, module.weight, qscheme.weights,
                                                helpers.calculate_qparams)
            module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(
                    zero_point.to(module.weight_zero_point.dtype))
    compressor = compressors.ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # safetensors refuses shared tensors
    safetensors_torch.save_file(state, str(out / "model.safetensors"),
                                metadata={"format": "pt"})
    model.config.save_pretrained(str(out))
    compressor.update_config(str(out))
    for name in COPIED:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "compressed-tensors": ct.__version__}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="model folder (config.json, safetensors)")
    parser.add_argument("out", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--scheme", choices=sorted(PRESETS), required=True)
    args = parser.parse_args(argv)
    versions = quantize(args.src, args.out, args.scheme)
    print(json.dumps({"ok": True, "versions": versions}), flush=True)


if __name__ == "__main__":
    try:
        main()
    except ImportError as exc:
        print(f"missing in this environment: {exc}", file=sys.stderr)
        sys.exit(3)
