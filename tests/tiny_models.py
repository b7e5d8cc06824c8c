"""Tiny offline Hugging Face models for tests (shared by several test files; keep stable).

Thin wrappers around ``lora_da_ref.data``'s offline demo builders: a random-weight
``LlamaForCausalLM`` from a ``LlamaConfig`` and a byte-level BPE tokenizer trained on a few
strings, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_da_ref.data import TINY_TEXTS, build_tiny_tokenizer, tiny_llama

__all__ = ["TINY_TEXTS", "TINY_VOCAB", "make_tiny_llama", "make_tiny_tokenizer", "save_tiny_llama"]

TINY_VOCAB = 288  # >= the tiny tokenizer's vocabulary (256 bytes + 4 specials + merges)


def make_tiny_llama(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    hidden: int = 32,
    layers: int = 2,
    **kwargs,
):
    """A seeded random ``LlamaForCausalLM`` in eval mode (heads=4, GQA kv_heads=2, vocab 288).

    Extra keyword arguments (``intermediate``, ``heads``, ``kv_heads``, ``vocab``) go to
    ``lora_da_ref.data.tiny_llama``.
    """
    return tiny_llama(seed, dtype, hidden=hidden, layers=layers, **kwargs)


def make_tiny_tokenizer(directory: str | Path | None = None):
    """The offline byte-level BPE tokenizer (pad/bos/eos = 0/1/2); saved to ``directory`` if given."""
    tok = build_tiny_tokenizer(TINY_VOCAB)
    if directory is not None:
        tok.save_pretrained(str(directory))
    return tok


def save_tiny_llama(directory: str | Path, seed: int = 0, **kwargs) -> Path:
    """Save a tiny LLaMA (see ``make_tiny_llama``) and the tiny tokenizer to ``directory``."""
    directory = Path(directory)
    make_tiny_llama(seed, **kwargs).save_pretrained(str(directory))
    make_tiny_tokenizer(directory)
    return directory
