"""LoRA-One and PiSSA (lora_da_ref.torch.baselines) against independent computations of their
published formulas, on a tiny LLaMA: per-sequence gradients by a plain ``.backward()`` loop on a
copy of the model and NumPy's SVD for LoRA-One; NumPy's SVD and PEFT's own ``pissa`` init for
PiSSA. Factors are compared through sign-free products (A B, A Aᵀ, Bᵀ B), never raw vectors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import peft
from peft.tuners.lora import LoraLayer

from lora_da_ref.torch import apply_lora_da, find_target_modules
from lora_da_ref.torch.baselines import lora_one, lora_one_subspace, pissa, sequence_mean_gradient
from tests.torch_cases import LLAMA_TARGETS, assert_state_equal, model_state, tiny_llama

RANK = 4
VOCAB = 50
# Sequence lengths and prompt lengths: very different loss-token counts, so the mean of
# per-sequence mean losses differs from the token mean of a padded batch.
LENGTHS = [(5, 2), (17, 3), (9, 6), (26, 4), (7, 1), (12, 2)]
BATCH_SIZE = 3
RTOL = 2e-4  # float32 gradients and SVD against the float64 reference, relative to ‖·‖


def sequences(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Unpadded sequences (1, T): random tokens, the first ``prompt`` tokens labelled -100."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length, prompt in LENGTHS:
        ids = torch.randint(3, VOCAB, (1, length), generator=gen)
        labels = ids.clone()
        labels[:, :prompt] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def padded(seqs, batch_size: int, side: str = "right") -> list[dict[str, torch.Tensor]]:
    """The same sequences in padded batches (pad id 0, mask 0, label -100)."""
    batches = []
    for start in range(0, len(seqs), batch_size):
        group = seqs[start : start + batch_size]
        T = max(s["input_ids"].shape[1] for s in group)
        batch = {
            "input_ids": torch.zeros(len(group), T, dtype=torch.long),
            "attention_mask": torch.zeros(len(group), T, dtype=torch.long),
            "labels": torch.full((len(group), T), -100, dtype=torch.long),
        }
        for i, s in enumerate(group):
            n = s["input_ids"].shape[1]
            cols = slice(0, n) if side == "right" else slice(T - n, T)
            for k in batch:
                batch[k][i, cols] = s[k][0]
        batches.append(batch)
    return batches


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def seqs():
    return sequences()


@pytest.fixture(scope="module")
def reference_gradients(model, seqs):
    """The official ``estimate_gradient`` at batch size 1, written out independently: a copy of
    the model in train mode (its dropout is 0), every parameter trainable, ``loss.backward()``
    per sequence, ``weight.grad`` summed and divided by the number of sequences; float64."""
    ref = copy.deepcopy(model).train()
    for p in ref.parameters():
        p.requires_grad_(True)
    names = list(find_target_modules(ref, LLAMA_TARGETS))
    modules = dict(ref.named_modules())
    sums = {n: np.zeros(tuple(modules[n].weight.shape)) for n in names}
    for s in seqs:
        ref(**s).loss.backward()
        for n in names:
            sums[n] += modules[n].weight.grad.double().numpy()  # (d_out, d_in)
        ref.zero_grad(set_to_none=True)
    return {n: g / len(seqs) for n, g in sums.items()}


def official_lora_one(grad_t: np.ndarray, rank: int, gamma: float | None) -> tuple:
    """``reinit_lora_modules`` of the official code for ``direction: LoRA-One`` in its torch
    orientation: returns ``(lora_A (r, d_in), lora_B (d_out, r))``."""
    U, S, Vh = np.linalg.svd(-grad_t, full_matrices=False)
    B = U[:, :rank] @ np.diag(np.sqrt(S[:rank])) / np.sqrt(S[0])
    A = np.diag(np.sqrt(S[:rank])) @ Vh[:rank, :] / np.sqrt(S[0])
    if gamma is not None:
        B, A = B / gamma**0.5, A / gamma**0.5
    return A, B


def relerr(a, b) -> float:
    a, b = (t.detach() if isinstance(t, torch.Tensor) else t for t in (a, b))
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def assert_same_factors(factors, reference: dict, what: str) -> None:
    """A, B against the reference's (lora_A, lora_B) through sign-free products: A B = (lB lA)ᵀ,
    A Aᵀ = lAᵀ lA and Bᵀ B = lB lBᵀ (these fix each factor up to column signs)."""
    worst = []
    for name, (lA, lB) in reference.items():
        A, B = factors[name].A.double().numpy(), factors[name].B.double().numpy()
        assert A.shape == lA.T.shape and B.shape == lB.T.shape, name
        errs = {
            "AB": relerr(A @ B, (lB @ lA).T),
            "AAt": relerr(A @ A.T, lA.T @ lA),
            "BtB": relerr(B.T @ B, lB @ lB.T),
        }
        worst.append((max(errs.values()), name, errs))
    worst.sort(reverse=True)
    assert worst[0][0] <= RTOL, f"{what}: worst layers {worst[:3]} (rtol {RTOL})"


# ----------------------------------------------------------------------------- LoRA-One


@pytest.mark.parametrize("gamma", [None, 16.0])
def test_lora_one_equals_the_official_formula(model, seqs, reference_gradients, gamma):
    """Per-sequence mean gradient, SVD of −∇, √S/√S_0 split, 1/√γ: against the reference.
    Caught: B = 0, the 1/√S_0 dropped, the batch-mean gradient, +∇ for −∇, no √γ."""
    factors = lora_one(model, padded(seqs, BATCH_SIZE), rank=RANK, target_modules=LLAMA_TARGETS,
                       stable_gamma=gamma)  # fmt: skip
    assert list(factors) == list(reference_gradients)
    reference = {n: official_lora_one(g, RANK, gamma) for n, g in reference_gradients.items()}
    assert_same_factors(factors, reference, f"lora_one(γ={gamma})")
    for name, f in factors.items():
        g = reference_gradients[name]
        S = np.linalg.svd(-g, compute_uv=False)
        assert f.diagnostics["sequences"] == len(seqs)
        assert abs(f.diagnostics["top_singular_value"] - S[0]) <= RTOL * S[0]
        assert np.allclose(f.eigenvalues.numpy(), S[:RANK], rtol=RTOL, atol=0)
        # ‖A B‖₂ = 1/γ: the normalisation by S_0
        top = np.linalg.svd(f.A.double().numpy() @ f.B.double().numpy(), compute_uv=False)[0]
        assert abs(top - 1 / (gamma or 1.0)) <= RTOL, (name, top)
        assert f.A.dtype == f.B.dtype == torch.float32 and f.A.device.type == "cpu"


def test_lora_one_is_the_mean_of_per_sequence_gradients_whatever_the_batching(model, seqs):
    """Batch size 1, right- or left-padded batches of 3, one batch of 6: the same gradient, and
    it differs from the token-mean gradient of the padded batches (what HF's loss on a batch
    gives), so the test can tell the two apart."""
    targets = find_target_modules(model, LLAMA_TARGETS)
    one, n = sequence_mean_gradient(model, seqs, targets)
    assert n == len(seqs)
    for batches in (padded(seqs, 3), padded(seqs, 3, "left"), padded(seqs, 6)):
        other, m = sequence_mean_gradient(model, batches, targets)
        assert m == len(seqs)
        for name in one:
            assert relerr(other[name], one[name]) <= 1e-5, name
    # the batch-mean gradient (one backward per padded batch, averaged over batches) differs
    ref = copy.deepcopy(model)
    batches = padded(seqs, 3)
    for b in batches:
        ref(**b).loss.backward()
    name = next(iter(one))
    batch_mean = dict(ref.named_modules())[name].weight.grad.T / len(batches)
    assert relerr(batch_mean, one[name]) > 0.05


def test_lora_one_subspace_is_the_column_space_of_lora_ones_A(model, seqs, reference_gradients):
    """``lora_one_subspace(−∇W L, r)`` (paper orientation: ``weight.grad``'s transpose) is an
    orthonormal (d_in, r) basis of NumPy's top-r left singular subspace of the reference
    gradient (compared as projectors), and ``lora_one``'s A is these very columns scaled by
    ``√(S_r/S_0)``: both come from one SVD. Caught: +∇ for −∇ (other subspace), the torch
    orientation (d_out rows), the bottom-r vectors."""
    factors = lora_one(model, seqs, rank=RANK, target_modules=LLAMA_TARGETS)
    grads, _ = sequence_mean_gradient(model, seqs, find_target_modules(model, LLAMA_TARGETS))
    for name, grad in grads.items():
        U = lora_one_subspace(-grad, RANK)  # (d_in, r)
        assert U.shape == (grad.shape[0], RANK) and U.dtype == grad.dtype, name
        torch.testing.assert_close(U.mT @ U, torch.eye(RANK), rtol=0, atol=1e-5)
        P = np.linalg.svd(-reference_gradients[name].T)[0][:, :RANK]  # (d_in, r), float64
        assert relerr(U.double() @ U.double().mT, P @ P.T) <= RTOL, name
        f = factors[name]
        root = (f.eigenvalues / f.diagnostics["top_singular_value"]).sqrt()  # (r,)
        torch.testing.assert_close(f.A, U * root, rtol=1e-6, atol=1e-7)


def test_lora_one_writes_into_peft_unchanged(model, seqs):
    """apply_lora_da writes lora_A = Aᵀ, lora_B = Bᵀ; the adapter adds s·x A B, W0 unchanged
    (the official code does not offset W0)."""
    factors = lora_one(model, seqs, rank=RANK, target_modules=LLAMA_TARGETS, stable_gamma=16)
    wrapped = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=list(LLAMA_TARGETS), use_rslora=True),
    )
    apply_lora_da(wrapped, factors)
    base = dict(model.named_modules())
    for name, layer in dict(wrapped.get_base_model().named_modules()).items():
        if name in factors:
            f, s = factors[name], layer.scaling["default"]
            assert s == 16 / RANK**0.5
            assert torch.equal(layer.lora_A["default"].weight, f.A.T)
            assert torch.equal(layer.lora_B["default"].weight, f.B.T)
            assert torch.allclose(layer.get_delta_weight("default"), s * (f.A @ f.B).T, atol=1e-7)
            assert torch.equal(layer.get_base_layer().weight, base[name].weight)


def test_lora_one_leaves_the_model_unchanged(seqs):
    """Weights bit for bit, .grad (absent or present), requires_grad, train/eval, hooks."""
    model = tiny_llama().train()
    model.model.embed_tokens.weight.requires_grad_(False)
    q = model.model.layers[0].self_attn.q_proj.weight
    q.grad = torch.full_like(q, 0.5)  # a gradient the user already had
    before = model_state(model)
    lora_one(model, padded(seqs, BATCH_SIZE), rank=RANK, target_modules=LLAMA_TARGETS)
    assert_state_equal(before, model_state(model))
    assert model.training and not model.model.embed_tokens.weight.requires_grad


@pytest.mark.parametrize(
    "kwargs, batches, error, match",
    [
        ({}, [], ValueError, "empty"),
        ({"rank": 0}, None, ValueError, "rank"),
        ({"rank": 2.0}, None, TypeError, "rank"),
        ({"rank": 25}, None, ValueError, "exceeds min"),  # k/v_proj are 48 -> 24 (GQA)
        ({"target_modules": ["nope"]}, None, ValueError, "matches no module"),
        ({"stable_gamma": 0}, None, ValueError, "stable_gamma"),
        ({"stable_gamma": float("nan")}, None, ValueError, "stable_gamma"),
        ({}, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, TypeError, "single"),
        ({}, ["text"], TypeError, "Mapping"),
    ],
)
def test_lora_one_bad_input(model, seqs, kwargs, batches, error, match):
    args = {"rank": RANK, "target_modules": LLAMA_TARGETS, **kwargs}
    before = model_state(model)
    with pytest.raises(error, match=match):
        lora_one(model, seqs if batches is None else batches, **args)
    assert_state_equal(before, model_state(model))


def test_lora_one_rejects_a_sequence_without_labels(model, seqs):
    bad = dict(seqs[0], labels=torch.full_like(seqs[0]["labels"], -100))
    with pytest.raises(ValueError, match="without label"):
        lora_one(model, [*seqs, bad], rank=RANK, target_modules=LLAMA_TARGETS)


# ----------------------------------------------------------------------------- PiSSA


@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_pissa_factors_are_the_top_r_svd(model, scaling):
    """s·A B = [W0]_r, Aᵀ A = B Bᵀ = diag(S_r)/s (A's columns ⟂, B's rows ⟂) from NumPy's SVD.
    Caught: the smallest singular triplets, no division by s, W instead of Wᵀ."""
    factors = pissa(model, rank=RANK, target_modules=LLAMA_TARGETS, scaling=scaling)
    modules = dict(model.named_modules())
    for name, f in factors.items():
        W = modules[name].weight.detach().double().numpy().T  # (d_in, d_out)
        P, S, Qh = np.linalg.svd(W, full_matrices=False)
        top = (P[:, :RANK] * S[:RANK]) @ Qh[:RANK]
        A, B = f.A.double().numpy(), f.B.double().numpy()
        assert relerr(scaling * A @ B, top) <= RTOL, name
        assert relerr(A.T @ A, np.diag(S[:RANK]) / scaling) <= RTOL, name
        assert relerr(B @ B.T, np.diag(S[:RANK]) / scaling) <= RTOL, name
        assert np.allclose(f.eigenvalues.numpy(), S[:RANK], rtol=RTOL)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_with_subtract_matches_peft_and_keeps_the_model(model, seqs, use_rslora):
    """apply_lora_da(offset="subtract") with pissa(scaling=s): the model's logits are unchanged
    at start, and the adapter and residual weights equal PEFT's own init_lora_weights="pissa"."""
    config = dict(r=RANK, lora_alpha=12, target_modules=list(LLAMA_TARGETS), use_rslora=use_rslora)
    ours = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    s = next(m.scaling["default"] for m in ours.modules() if isinstance(m, LoraLayer))
    assert s != 1.0
    factors = pissa(model, rank=RANK, target_modules=LLAMA_TARGETS, scaling=s)
    apply_lora_da(ours, factors, offset="subtract")
    theirs = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(**config, init_lora_weights="pissa")
    )
    batch = padded(seqs, len(seqs))[0]
    with torch.no_grad():
        base_logits = model(**batch).logits
        assert torch.allclose(ours(**batch).logits, base_logits, atol=2e-5)
    mine = dict(ours.get_base_model().named_modules())
    peft_layers = dict(theirs.get_base_model().named_modules())
    for name in factors:
        a, b = mine[name], peft_layers[name]
        delta_a, delta_b = a.get_delta_weight("default"), b.get_delta_weight("default")
        assert relerr(delta_a, delta_b) <= RTOL, name  # s·lora_B lora_A = [W0]_r in both
        w_a, w_b = a.get_base_layer().weight, b.get_base_layer().weight
        assert relerr(w_a, w_b) <= RTOL * 10, name  # the residual W0 − [W0]_r


def test_pissa_bad_input_and_model_unchanged(model):
    before = model_state(model)
    pissa(model, rank=RANK, target_modules="all-linear")
    assert_state_equal(before, model_state(model))
    with pytest.raises(ValueError, match="scaling"):
        pissa(model, rank=RANK, target_modules=LLAMA_TARGETS, scaling=0)
    with pytest.raises(ValueError, match="exceeds min"):
        pissa(model, rank=10_000, target_modules=LLAMA_TARGETS)
    with pytest.raises(ValueError, match="matches no module"):
        pissa(model, rank=RANK, target_modules=["nope"])
