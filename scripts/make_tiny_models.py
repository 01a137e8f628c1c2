#!/usr/bin/env python3
"""Make the tiny Llama models that `make test-vllm` serves with a real vLLM on the CPU, offline.

Each model is a byte-level BPE tokenizer trained on generated text (about 2,000 tokens, ChatML-style
chat template) and a random-weight LlamaConfig (hidden 128, 2 layers, 4 heads, 2 KV heads, 2,048
positions), written with save_pretrained. Nothing is downloaded. The output is deterministic (fixed
seeds); the models differ in name and weights, so that swapping between them is a real model swap.
tiny-llama-a and -b are LlamaForCausalLM (generating models); tiny-llama-embed is the pooling model of
the tier: the same architecture, served with `--runner pooling` (embeddings, pooling, score, rerank).

Run it with the vLLM venv's Python (it has torch, transformers and tokenizers):

    /var/cache/llm-gateway/vllm-venv/bin/python scripts/make_tiny_models.py [--root DIR] [--force]

Prints one line per model, `<name> <directory>`. A model directory is reused while its stamp file
matches RECIPE; it is built in a temporary directory and renamed into place, so an interrupted run
never leaves a half-written model that looks finished.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

DEFAULT_ROOT = Path(os.environ.get("LLM_GATEWAY_CACHE_DIR", "/var/cache/llm-gateway")) / "models"
# name -> weight seed. Change RECIPE whenever what is written changes: cached models are rebuilt.
MODELS = {"tiny-llama-a": 1234, "tiny-llama-b": 5678, "tiny-llama-embed": 4321}
POOLING_MODELS = frozenset({"tiny-llama-embed"})
RECIPE = "tiny-llama v1: bpe 2000, hidden 128, layers 2, heads 4/2, positions 2048, float32"
POOLING_RECIPE = ("tiny-llama-embed v3: LlamaForCausalLM for --runner pooling, bpe 2000, hidden 128, layers 2, "
                  "heads 4/2, positions 2048")
STAMP = ".llm-gateway-stamp"
VOCAB_SIZE = 2000
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = ("the a an one two three four five six seven eight nine ten once upon time there was little model "
         "that could write haiku hello world gateway runtime batch queue token stream usage request answer "
         "question user assistant system apple banana river mountain sky blue green red quick brown fox "
         "jumps over lazy dog and or but if then else while for with without about above below under "
         "count to say reply short long story poem line word text data json http server client "
         "Denmark Sweden Norway København dansk svenska norsk æble øl å").split()


def corpus(seed: int = 7, lines: int = 4000) -> list[str]:
    """Generated training text: words, digits, punctuation and chat-like lines (deterministic)."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 9999)))
        line = " ".join(words) + rng.choice([".", "!", "?", ",", ":", ""])
        if rng.random() < 0.2:
            line = f"{rng.choice(['user', 'assistant', 'system'])}\n{line.capitalize()}"
        out.append(line)
    return out


def build_tokenizer() -> object:
    """A byte-level BPE tokenizer wrapped as PreTrainedTokenizerFast, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None, chat_template=CHAT_TEMPLATE,
                                   model_max_length=2048)


def build_model(directory: Path, name: str, seed: int) -> None:
    """Write tokenizer and random-weight Llama into `directory`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(directory)  # type: ignore[attr-defined]
    vocab = len(tokenizer)  # type: ignore[arg-type]
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # type: ignore[attr-defined]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")  # type: ignore[attr-defined]
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=bos, tie_word_embeddings=False,
                         torch_dtype="float32")
    torch.manual_seed(seed)
    if name in POOLING_MODELS:
        # vLLM 0.32 serves a Llama checkpoint as a generating model unless told `--runner pooling`; then it
        # is an embedding model (last-token pooling, normalised) and ignores the LM head. Its loader wants
        # LlamaForCausalLM's weight names, so that class writes them.
        LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    else:
        model = LlamaForCausalLM(config)
        # A wider spread than the default init, so that different prompts and seeds give visibly different text.
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.5)
        model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=bos)
        model.save_pretrained(directory, safe_serialization=True)
    (directory / "README.md").write_text(
        f"# {name}\n\nA random-weight test model made by llm-gateway's scripts/make_tiny_models.py "
        f"(seed {seed}). It emits noise; it exists to run a real vLLM server in tests.\n")


def ensure(root: Path, name: str, seed: int, force: bool) -> Path:
    """The model's directory, built unless a finished one with the same recipe is there."""
    target = root / name
    stamp = target / STAMP
    want = json.dumps({"recipe": POOLING_RECIPE if name in POOLING_MODELS else RECIPE, "seed": seed})
    if not force and stamp.is_file() and stamp.read_text() == want:
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        build_model(tmp, name, seed)
        (tmp / STAMP).write_text(want)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"where models go (default {DEFAULT_ROOT})")
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached model matches")
    args = parser.parse_args()
    for name, seed in MODELS.items():
        started = time.monotonic()
        path = ensure(args.root, name, seed, args.force)
        print(f"{name} {path}  ({time.monotonic() - started:.1f} s)", file=sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
