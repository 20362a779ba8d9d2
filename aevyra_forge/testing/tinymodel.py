"""Write a tiny random-weight Llama (config, safetensors, tokenizer, chat template) in a few
seconds with no download, so tests and CI can boot real vLLM on something it accepts.

Run it as `python -m aevyra_forge.testing.tinymodel OUT_DIR`; it needs torch, transformers and
tokenizers (the vLLM environment has them)."""

from __future__ import annotations

import argparse
import importlib
import json
import random
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

from aevyra_forge.core.errors import MissingExtraError

HIDDEN_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE_SIZE = 512
VOCAB_SIZE = 2048
MAX_POSITIONS = 2048  # tokens
CORPUS_LINES = 4000  # enough distinct words for the tokenizer to reach VOCAB_SIZE
CORPUS_SEED = 1234  # the tokenizer is the same whatever the weight seed

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
UNK = "<unk>"
# Order fixes the ids: BOS is 0, EOS 1, ..., EOT 4, UNK 5.
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, UNK]

# Llama-3 layout in plain Jinja (no custom filters or extensions), so both transformers and
# vLLM render it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

_SUBJECTS = (
    "the scheduler", "a small model", "our team", "the cache", "every request", "the kernel",
    "this server", "the engineer", "a tired cat", "the river", "my neighbour", "the museum",
    "an old compiler", "the weather report", "each batch", "the database", "a quiet village",
    "the orchestra", "the garden", "a curious student", "the pilot", "the library",
)
_VERBS = (
    "measures", "rewrites", "remembers", "ignores", "carries", "explains", "compresses",
    "schedules", "paints", "follows", "questions", "restarts", "collects", "delivers",
    "predicts", "borrows", "translates", "inspects", "balances", "forgets", "streams",
)
_OBJECTS = (
    "the latency budget", "a long prompt", "seven apples", "the morning train",
    "every token", "the shared prefix", "a broken pipe", "the quarterly numbers",
    "two hundred letters", "the mountain path", "a handwritten note", "the benchmark",
    "the memory pool", "several warm loaves", "the harbour lights", "an empty queue",
    "the final chapter", "a yellow umbrella", "the throughput chart", "old photographs",
)
_TAILS = (
    "before lunch", "without complaint", "under heavy load", "in the rain",
    "after the restart", "with great care", "for the third time", "near the station",
    "during the night shift", "despite the noise", "at exactly noon", "on a slow day",
)
_WORDS = (
    "abstract", "bicycle", "candle", "distance", "elephant", "festival", "granite",
    "harvest", "island", "journey", "kettle", "lantern", "meadow", "notebook", "orange",
    "pepper", "quarter", "rocket", "saddle", "thunder", "umbrella", "velvet", "window",
    "yellow", "zebra", "amplitude", "boundary", "cylinder", "dialogue", "equation",
    "fraction", "gradient", "horizon", "inventory", "junction", "keyboard", "lattice",
    "magnitude", "network", "operator", "parameter", "quantize", "resistance", "symphony",
    "tolerance", "universe", "variable", "wavelength", "exponent", "yesterday", "zenith",
    "allocate", "benchmark", "concurrency", "deadline", "eviction", "fragment", "gateway",
    "heuristic", "iterator", "journal", "kilobyte", "listener", "mutation", "namespace",
    "overflow", "pipeline", "recursion", "semaphore", "timestamp", "upstream", "validator",
)
_CODE = (
    "def {name}(items, limit=10):\n    return [x for x in items if x < limit]\n",
    "for i in range({n}):\n    total += values[i] * {n}\n",
    "if response.status_code != 200:\n    raise RuntimeError('request failed')\n",
    "class {Name}:\n    def __init__(self, size):\n        self.size = size\n",
    "const {name} = async (url) => {{ const r = await fetch(url); return r.json(); }};\n",
    "SELECT id, name FROM users WHERE age > {n} ORDER BY name;\n",
    "import json\nwith open('data.json') as f:\n    config = json.load(f)\n",
    "let {name}: Vec<u32> = (0..{n}).map(|x| x * 2).collect();\n",
    "#include <stdio.h>\nint main(void) {{ printf(\"%d\\n\", {n}); return 0; }}\n",
    "$ curl -s http://localhost:8000/health && echo ok\n",
    "{name} = {{'key': '{word}', 'count': {n}, 'enabled': True}}\n",
    "try:\n    {name}()\nexcept (KeyError, ValueError) as exc:\n    log.warning(exc)\n",
)


def _corpus(lines: int, seed: int) -> Iterator[str]:
    """Varied English prose and code snippets, generated so no text has to be shipped."""
    rng = random.Random(seed)
    for i in range(lines):
        kind = i % 4
        if kind == 0:
            line = (f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} "
                    f"{rng.choice(_OBJECTS)} {rng.choice(_TAILS)}.")
        elif kind == 1:
            words = rng.sample(_WORDS, rng.randint(4, 9))
            line = " ".join(words).capitalize() + rng.choice(".?!;:")
        elif kind == 2:
            name = rng.choice(_WORDS) + "_" + rng.choice(_WORDS)
            line = rng.choice(_CODE).format(
                name=name, Name=name.title().replace("_", ""), n=rng.randint(0, 4096),
                word=rng.choice(_WORDS))
        else:
            # Numbers, punctuation and made-up words widen the merge table.
            made_up = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
            line = (f"Item {rng.randint(0, 999)} of {rng.randint(1000, 9999)} ({made_up}) "
                    f"costs ${rng.randint(1, 500)}.{rng.randint(0, 99):02d}, "
                    f"{rng.choice(_TAILS)}.")
        yield line


def _need(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise MissingExtraError("transformers", "vllm", "Generating the tiny test model") from exc


def _train_tokenizer(tokenizers: ModuleType, out_dir: Path) -> dict[str, int]:
    """Train a sentencepiece-style BPE (Metaspace, whole characters, no byte fallback).

    Byte-level BPE would let the random model emit half a UTF-8 character, which vLLM holds
    back, so chat replies would stream as empty text."""
    models, pre_tokenizers, decoders, trainers, processors = (
        tokenizers.models, tokenizers.pre_tokenizers, tokenizers.decoders,
        tokenizers.trainers, tokenizers.processors)
    tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=list(string.printable), min_frequency=1)
    tok.train_from_iterator(_corpus(CORPUS_LINES, CORPUS_SEED), trainer=trainer)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, ids[BOS])])
    tok.save(str(out_dir / "tokenizer.json"))
    # Written by hand rather than via transformers so the file does not depend on its version.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}, indent=2) + "\n")
    return ids


def write_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """Write a random-weight Llama (about 2.2 M parameters, bfloat16) with its tokenizer,
    chat template and generation config into out_dir and return out_dir."""
    torch = _need("torch")
    transformers = _need("transformers")
    tokenizers = _need("tokenizers")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = _train_tokenizer(tokenizers, out_dir)
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        intermediate_size=INTERMEDIATE_SIZE,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    # Chat turns end with <|eot_id|>, plain text with <|end_of_text|>: stop on either.
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[EOT]], do_sample=False)
    # transformers draws a progress bar on stderr while saving; a library stays quiet.
    hf_logging = transformers.utils.logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out_dir))
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write the tiny model into OUT_DIR and print its path."""
    parser = argparse.ArgumentParser(
        prog="python -m aevyra_forge.testing.tinymodel",
        description="Write a tiny random-weight Llama for tests (no download).")
    parser.add_argument("out_dir", type=Path, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    print(write_tiny_llama(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
