"""Tiny LLaMA models and tokenizers built offline, for tests and the CPU quickstart.

This is test infrastructure: the product path loads real checkpoints. A "skeleton" directory holds a
``config.json`` and a tokenizer (no weights) and is used with ``model.init: random`` to pre-train a small
short-context base; :func:`make_tiny_model` also writes random weights for tests that need a checkpoint.

The shipped skeleton ``llmft/assets/tiny-llama`` was made with::

    python -m llmft.testing.tiny llmft/assets/tiny-llama
"""

from __future__ import annotations

import gzip
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BOOK = ASSETS / "frankenstein.txt.gz"  # Mary Shelley, Project Gutenberg #84, public domain
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def read_text(path: Path) -> str:
    """Read a .txt or .txt.gz file as UTF-8."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (deterministic for the same input) with <s>, </s>, <pad>, <unk>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
    rope_theta: float = 10000.0,
) -> LlamaConfig:
    """A small LLaMA config (same architecture as LLaMA-2, fewer and narrower layers)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or int(hidden_size * 8 / 3 // 8 * 8),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )


def make_tiny_skeleton(out_dir: str | Path, text: str | None = None, vocab_size: int = 2048, **config_kwargs) -> Path:
    """Write config.json and a BPE tokenizer trained on ``text`` (default: the bundled book) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = read_text(BOOK) if text is None else text
    tokenizer = train_bpe_tokenizer([text], vocab_size)
    tokenizer.save_pretrained(out)
    tiny_llama_config(len(tokenizer), **config_kwargs).save_pretrained(out)
    return out


def make_tiny_model(out_dir: str | Path, seed: int = 0, text: str | None = None, vocab_size: int = 512,
                    **config_kwargs) -> Path:
    """A complete tiny checkpoint (config, tokenizer, random safetensors weights) for tests."""
    out = make_tiny_skeleton(out_dir, text=text, vocab_size=vocab_size, **config_kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(out))
    model.save_pretrained(out)
    return out


if __name__ == "__main__":
    make_tiny_skeleton(sys.argv[1] if len(sys.argv) > 1 else ASSETS / "tiny-llama")
