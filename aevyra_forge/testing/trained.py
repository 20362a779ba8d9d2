"""The tiny Llama trained for a few hundred steps on the Python standard library's own
sources, so its output distributions are peaked and accuracy figures on it mean something
(the random-weight one is a near-tie at every position: bf16 against fp32 agrees 0.98,
W8A8 0.91-0.94, all noise). Deterministic: fixed seeds, one thread, the files in sorted
order; nothing is downloaded (the text is the interpreter's own library).

Run it as `python -m aevyra_forge.testing.trained OUT_DIR [--steps 300]` in an environment
with torch, transformers and tokenizers (vLLM's has them); `cached()` keeps one copy per
(steps, seed, library versions) under a cache folder, since training takes minutes."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aevyra_forge.testing.tinymodel import _need, write_tiny_llama

STEPS = 300  # measured: mean top-1 probability ~0.57, bf16 agreement >= 0.99 (VLLM_NOTES)
BATCH = 16  # sequences per step
SEQ_LEN = 256  # tokens per sequence
LR = 3e-3
CORPUS_CHARS = 3_000_000  # ~2M tokens of the standard library's *.py files (1.2M are drawn)
TRAIN_SEED = 1234


def corpus(limit: int = CORPUS_CHARS) -> str:
    """The standard library's *.py sources in sorted path order, up to `limit` characters
    (the same text for the same Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    size = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "\n".join(parts)[:limit]


def train(out_dir: Path, steps: int = STEPS, seed: int = 0,
          log: Any = None) -> dict[str, float]:
    """Write the tiny Llama into out_dir, train it for `steps` steps on the standard
    library and save it again as bfloat16; returns the first and last training loss."""
    torch = _need("torch")
    transformers = _need("transformers")
    out_dir = write_tiny_llama(Path(out_dir), seed=seed)
    torch.set_num_threads(1)  # the same sums in the same order on every run
    torch.use_deterministic_algorithms(True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    ids = torch.tensor(tokenizer(corpus(), add_special_tokens=False)["input_ids"],
                       dtype=torch.long)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir),
                                                              dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(TRAIN_SEED + seed)
    losses: list[float] = []
    for step in range(steps):
        starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (BATCH,), generator=generator)
        batch = torch.stack([ids[s:s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"step {step}: loss {losses[-1]:.3f}")
    model.to(torch.bfloat16).save_pretrained(str(out_dir))
    return {"first_loss": losses[0] if losses else 0.0,
            "last_loss": losses[-1] if losses else 0.0}


def cached(cache_root: Path, steps: int = STEPS, seed: int = 0) -> Path:
    """The trained model under `cache_root`, trained once per (steps, seed, the libraries'
    versions and this file) and reused after."""
    torch = _need("torch")
    transformers = _need("transformers")
    key = json.dumps({"steps": steps, "seed": seed, "torch": torch.__version__,
                      "transformers": transformers.__version__,
                      "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]},
                     sort_keys=True)
    folder = cache_root / f"tiny-trained-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (folder / "model.safetensors").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    train(tmp, steps=steps, seed=seed)
    tmp.rename(folder)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m aevyra_forge.testing.trained",
        description="Train the tiny Llama on the standard library (deterministic).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    losses = train(args.out_dir, steps=args.steps, seed=args.seed, log=print)
    print(json.dumps({"path": str(args.out_dir), **losses}))


if __name__ == "__main__":
    main()
