"""Calibration data for the CLI: JSONL texts -> token batches, plus an offline demo model.

Calibration set ``S`` (docs/equations.md, "N and S"): the statistics of Algorithm 1 are estimated
on a few hundred texts (official code: the first 256 training samples at batch size 1). This module
reads them from a JSONL file, one JSON object per line with the text under a field (default
``"text"``):

    {"text": "The quick brown fox jumps over the lazy dog."}

(:mod:`lora_da_ref.cli.jsonl`, torch-free, re-exported here) and tokenises them into the batches
``init_lora_da`` consumes: dicts of ``input_ids``, ``attention_mask`` and ``labels``
(``labels = input_ids`` with padding set to ``-100``, so only real tokens enter the empirical
Fisher, as the official code's HF mean token cross-entropy).

The last section builds a tiny random-weight LLaMA and a byte-level BPE tokenizer without any
download, for the README's runnable example and for the tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lora_da_ref.cli.jsonl import read_jsonl_pairs, read_jsonl_texts

__all__ = [
    "IGNORE_INDEX",
    "TINY_TEXTS",
    "build_tiny_tokenizer",
    "read_jsonl_pairs",
    "read_jsonl_texts",
    "right_pad",
    "save_tiny_model",
    "tiny_llama",
    "tokenize_batches",
    "tokenize_prompt_completion",
]

IGNORE_INDEX = -100  # HF's CrossEntropyLoss ignore_index: masked label positions.


# ----------------------------------------------------------------------------- tokenisation


def tokenize_batches(
    tokenizer: Any, texts: Sequence[str], *, max_length: int, batch_size: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Batches for ``init_lora_da``: right-padded ``input_ids``, ``attention_mask``, ``labels``.

    Each text is tokenised on its own (with the tokenizer's special tokens) and truncated to
    ``max_length``; texts with fewer than 2 tokens are dropped, as a causal LM's shifted loss has
    no target in them. ``labels`` equals ``input_ids`` except at padding, which is ``-100``.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text, ...)``).
        texts: the calibration texts ``S``.
        max_length: truncation length in tokens.
        batch_size: sequences per batch (official code: 1).

    Raises:
        ValueError: bad sizes, or no text yields 2 or more tokens.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    ids = [seq for seq in ids if len(seq) >= 2]
    if not ids:
        raise ValueError(
            f"none of the {len(texts)} texts has 2 or more tokens; nothing to learn from"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = [_example(seq) for seq in ids]
    return [right_pad(examples[i : i + batch_size], pad_id) for i in range(0, len(ids), batch_size)]


def tokenize_prompt_completion(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    max_length: int,
    batch_size: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """Batches whose loss covers only the completion: ``labels = -100`` on prompt and padding.

    The prompt is tokenised with the tokenizer's special tokens (BOS), the completion without,
    and the two are concatenated, then truncated to ``max_length``. A pair whose completion is
    empty after truncation is dropped (it has no loss token). With a causal LM's shift, the last
    prompt position predicts the first completion token, so it is a loss position.

    Raises:
        ValueError: bad sizes, or no pair keeps a completion token.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seqs: list[list[int]] = []
    prompt_lengths: list[int] = []
    for prompt, completion in pairs:
        p_ids = list(tokenizer(prompt)["input_ids"])
        c_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        ids = (p_ids + c_ids)[:max_length]
        if len(ids) > len(p_ids) and len(ids) >= 2:
            seqs.append(ids)
            prompt_lengths.append(len(p_ids))
    if not seqs:
        raise ValueError(
            f"none of the {len(pairs)} prompt/completion pairs keeps a completion token within "
            f"max_length={max_length}; nothing to learn from"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for i in range(0, len(seqs), batch_size):
        batch = right_pad([_example(seq) for seq in seqs[i : i + batch_size]], pad_id)
        for row, n_prompt in enumerate(prompt_lengths[i : i + batch_size]):
            batch["labels"][row, :n_prompt] = IGNORE_INDEX
        batches.append(batch)
    return batches


def right_pad(
    examples: Sequence[Mapping[str, torch.Tensor]], pad_id: int
) -> dict[str, torch.Tensor]:
    """One batch of 1-D examples, right-padded to the longest: ``input_ids`` with ``pad_id``,
    ``attention_mask`` with 0, ``labels`` with ``-100``.

    The one padding of the batches this package builds from token ids (:func:`tokenize_batches`,
    :func:`tokenize_prompt_completion`, :mod:`lora_da_ref.real`'s HumanEval and GSM8K batches,
    the fine-tuning benchmark). Right padding with mask 0 leaves a causal LM's outputs at the real
    positions those of the unpadded sequence (the pad id's value enters nothing), and label
    ``-100`` keeps the padding out of the loss and out of the statistics' loss tokens.

    Args:
        examples: dicts with 1-D ``input_ids``, ``attention_mask`` and ``labels`` of one length
            each (other keys are ignored).
        pad_id: the id written at padded ``input_ids`` positions.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, each a (b, T) ``torch.long`` tensor.
    """
    T = max(int(e["input_ids"].numel()) for e in examples)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {k: torch.full((len(examples), T), v, dtype=torch.long) for k, v in fill.items()}
    for row, e in enumerate(examples):
        n = int(e["input_ids"].numel())
        for k, padded in batch.items():
            padded[row, :n] = e[k]  # (n,)
    return batch


def _example(seq: Sequence[int]) -> dict[str, torch.Tensor]:
    """Token ids as one example for :func:`right_pad`: every position attended and a label."""
    ids = torch.tensor(seq, dtype=torch.long)  # (n,)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


# ----------------------------------------------------------------------------- offline demo model

TINY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "LoRA-DA initialises low-rank adapters from data: the Fisher and the gradient.",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May.",
    "A low-rank update W0 + A B keeps most weights frozen during fine-tuning.",
    "0123456789 +-*/= ()[]{} ,.;:!? 'quotes' \"double\"",
)
_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3


def build_tiny_tokenizer(vocab_size: int = 288) -> Any:
    """A byte-level BPE tokenizer trained offline on ``TINY_TEXTS`` (any text encodes, no <unk>).

    Returns a ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos = ids 0/1/2, which adds
    ``<s>`` in front of each text. Its vocabulary has at most ``vocab_size`` entries (at least the
    256 bytes plus 4 specials).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_TEXTS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def tiny_llama(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    hidden: int = 32,
    layers: int = 2,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int | None = None,
    vocab: int = 288,
) -> Any:
    """A random-weight ``LlamaForCausalLM`` built from a ``LlamaConfig`` (seeded, no download).

    ``intermediate`` defaults to ``2 * hidden``; ``kv_heads`` to ``heads // 2`` (grouped-query
    attention, so k/v are narrower than q as in LLaMA-2-70B/3) when ``heads`` is even.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if kv_heads is None:
        kv_heads = heads // 2 if heads % 2 == 0 else heads
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def save_tiny_model(
    directory: str | Path, *, seed: int = 0, layers: int = 2, hidden: int = 32
) -> Path:
    """Write a tiny random LLaMA and its tokenizer to ``directory`` (``from_pretrained``-loadable)."""
    directory = Path(directory)
    tiny_llama(seed, layers=layers, hidden=hidden).save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory
