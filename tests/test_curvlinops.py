"""The torch path against an independent library, curvlinops-for-pytorch 3.0.1 (pinned test extra).

Normalisation between curvlinops and ``lora_da_ref`` (float64, unpadded fully labelled sequences of
length T, lm_head excluded, CrossEntropyLoss with ``reduction="mean"``):

* curvlinops' KFAC-expand with ``fisher_type="empirical"`` keeps, per layer,
  ``A = Σ_{n,t} x xᵀ / (N·S)`` (S = the layer's weight-sharing length, N = sequences) and
  ``B = Σ_{n,t} ĝ ĝᵀ / (N·L)`` with ``ĝ = R·∂(mean loss)/∂o`` (R = B_b·L loss terms of the batch,
  L per sequence): the gradient of the batch's **summed** token loss, i.e. our score ``s_t``.
* Ours (``token_mask="labels"``, ``label_shift=1``, ``score_scale="token"``) averages over the
  loss positions: ``Y = Σ s sᵀ / (N·L)`` = curvlinops' ``B`` exactly; ``Z`` over the T−1 positions
  that predict a token = curvlinops' ``A`` when it is fed the inputs ``ids[:, :-1]`` (a causal LM's
  activations at those positions do not depend on the last token).
* ``token_mask="attention"`` averages over all T positions: ``Z`` = curvlinops' ``A`` on the full
  input, ``Y = (T−1)/T · B`` (the last position's score is 0 but counted).
* ``score_scale="batch"`` (official) uses ``∂(mean loss of the sequence)/∂o``: ``Y = B / L²`` (L loss terms per sequence).
* curvlinops' ``EFLinearOperator`` is ``(1/#tokens) Σ_t ∇ℓ_t ∇ℓ_tᵀ`` over the flattened
  (sequence, position) loss terms: exactly our per-token empirical Fisher, same ``vec``
  (torch's row-major ``weight`` (d_out, d_in) flattened = column-stacked ``W`` = weightᵀ).
"""

from __future__ import annotations

import functools

import pytest
import torch
from curvlinops import EFLinearOperator, KFACLinearOperator
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lora_da_ref.data import tiny_llama
from lora_da_ref.torch import LoraDAConfig, collect_statistics
from lora_da_ref.torch.exact import (
    causal_lm_token_losses,
    exact_empirical_fisher,
    full_precision_copy,
)
from tests.report import relative_error
from tests.torch_cases import TokenMLP

# Both sides sum the same float64 products in a different order: ~ n·eps ≈ 1e-14 relative;
# 1e-10 is far above that round-off and far below any real difference of the factors.
FACTOR_RTOL = 1e-10
# The dense per-token EF two ways (reverse-mode rows vs curvlinops' forward/reverse GGN products).
EF_RTOL = 1e-10
# A normalisation slip (T/(T−1) with T = 9, or 1/R²) is ≥ 1e-2 relative: the checks can fail.
WRONG_NORMALISATION_MIN = 1e-3

VOCAB, SEQ, BATCH, N_BATCHES = 64, 9, 2, 3
LLAMA_LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")
ALL_LLAMA = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip


class _Logits(nn.Module):
    """curvlinops' view of a causal LM: ids (B, T') -> logits (B, V, T'') for CrossEntropyLoss."""

    def __init__(self, lm: nn.Module, drop_last: bool) -> None:
        super().__init__()
        self.lm, self.drop_last = lm, drop_last

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=ids).logits  # (B, T', V)
        logits = logits[:, :-1] if self.drop_last else logits
        return logits.transpose(1, 2)


def _llama(hidden: int = 32, intermediate: int = 24) -> nn.Module:
    model = tiny_llama(0, hidden=hidden, intermediate=intermediate, vocab=VOCAB)
    return full_precision_copy(model)


def _ids(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(N_BATCHES)]


def _lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """HF's mean token cross-entropy, but in the model's dtype (HF's own casts logits to float32)."""
    return causal_lm_token_losses(model, batch).mean()


def _targets(model: nn.Module, names) -> dict[str, nn.Linear]:
    return {n: model.get_submodule(n) for n in names}


def _curvlinops_kfac(model, targets, data) -> KFACLinearOperator:
    params = [m.weight for m in targets.values()]
    kfac = KFACLinearOperator(
        model, nn.CrossEntropyLoss(), params, data,
        fisher_type="empirical", kfac_approx="expand", check_deterministic=False,
    )  # fmt: skip
    kfac.compute_kronecker_factors()
    return kfac


@functools.cache
def _llama_factors(token_mask: str, score_scale: str):
    model = _llama()
    names = [n for n, m in model.named_modules() if n.endswith(ALL_LLAMA) and ".layers." in n]
    targets = _targets(model, names)
    ids = _ids()
    batches = [{"input_ids": x, "labels": x} for x in ids]
    config = LoraDAConfig.paper_literal(
        dtype=torch.float64, target_modules=ALL_LLAMA, token_mask=token_mask,
        score_scale=score_scale,
    )  # fmt: skip
    ours = collect_statistics(model, batches, targets, config, loss_fn=_lm_loss, progress=False)
    drop_last = token_mask == "attention"  # feed all T positions, drop the last logits
    inputs = [(x if drop_last else x[:, :-1], x[:, 1:]) for x in ids]
    theirs = _curvlinops_kfac(_Logits(model, drop_last), targets, inputs)
    return ours, theirs, names


# (token_mask, score_scale) -> factor c with  Y_ours = c · B_curvlinops  (see the module docstring)

Y_SCALE = {
    ("labels", "token"): 1.0,
    ("attention", "token"): (SEQ - 1) / SEQ,
    # "batch": s_t = ∂L_i/∂o_t with L_i the mean over sequence i's SEQ − 1 loss terms (per sequence,
    # so the result does not depend on the batch grouping)
    ("attention", "batch"): (SEQ - 1) / SEQ / (SEQ - 1) ** 2,
}


@pytest.mark.parametrize("token_mask,score_scale", list(Y_SCALE))
def test_llama_kfac_factors_match_curvlinops(token_mask, score_scale):
    ours, theirs, names = _llama_factors(token_mask, score_scale)
    c = Y_SCALE[token_mask, score_scale]
    for name in names:
        A = theirs._input_covariances[f"lm.{name}"]
        B = theirs._gradient_covariances[f"lm.{name}"]
        Z, Y = ours.Z[ours.group_of[name]], ours.Y[name]
        assert relative_error(Z, A) <= FACTOR_RTOL, (name, "Z", relative_error(Z, A))
        assert relative_error(Y, c * B) <= FACTOR_RTOL, (name, "Y", relative_error(Y, c * B))
        if c != 1.0:  # the documented factor is needed: without it the check fails
            assert relative_error(Y, B) > WRONG_NORMALISATION_MIN


def test_llama_kfac_operator_is_our_kronecker_product():
    """curvlinops' public matrix (densified) = Y ⊗ Z in our column-stacked vec order."""
    ours, theirs, names = _llama_factors("labels", "token")  # cached from the test above
    name = "model.layers.0.self_attn.k_proj"
    d = ours.Z[ours.group_of[name]].shape[0] * ours.Y[name].shape[0]
    eye = torch.eye(sum(p.numel() for p in theirs._params), dtype=torch.float64)
    pos = names.index(name)
    start = sum(p.numel() for p in theirs._params[:pos])
    dense = theirs @ eye[:, start : start + d]  # (D, d): columns of this layer's block
    block = dense[start : start + d]
    expected = torch.kron(ours.Y[name], ours.Z[ours.group_of[name]])
    assert relative_error(block, expected) <= FACTOR_RTOL


def test_mlp_kfac_factors_match_curvlinops():
    """A per-token MLP on (B, T, d) sequences; every position labelled (label_shift = 0)."""
    model = TokenMLP((6, 8, 7, 5), seed=3).to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(BATCH, 5, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randint(0, 5, (BATCH, 5), generator=gen) for _ in range(3)]
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    config = LoraDAConfig.paper_literal(
        dtype=torch.float64, target_modules=tuple(targets), label_shift=0
    )

    def loss_fn(m, batch):
        logits = m(batch["inputs"])  # (B, T, C)
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    batches = [{"inputs": x, "labels": y} for x, y in zip(xs, ys, strict=True)]
    ours = collect_statistics(model, batches, targets, config, loss_fn=loss_fn, progress=False)

    class Transposed(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).transpose(1, 2)  # (B, C, T)

    wrapped = {f"inner.{n}": m for n, m in targets.items()}
    theirs = _curvlinops_kfac(Transposed(model), wrapped, list(zip(xs, ys, strict=True)))
    for name in targets:
        A = theirs._input_covariances[f"inner.{name}"]
        B = theirs._gradient_covariances[f"inner.{name}"]
        assert relative_error(ours.Z[ours.group_of[name]], A) <= FACTOR_RTOL, name
        assert relative_error(ours.Y[name], B) <= FACTOR_RTOL, name


def test_exact_per_token_fisher_matches_curvlinops_ef():
    """Dense per-token EF of q_proj and down_proj (hidden 32): our per-token Jacobians vs
    curvlinops' EFLinearOperator applied to the identity."""
    model = _llama()
    targets = _targets(model, LLAMA_LAYERS)
    ids = _ids(seed=2)
    batches = [{"input_ids": x, "labels": x} for x in ids]
    with sdpa_kernel(SDPBackend.MATH):  # curvlinops needs forward-mode AD through attention
        ours = exact_empirical_fisher(model, batches, targets)
        params = [m.weight for m in targets.values()]
        ef = EFLinearOperator(
            _Logits(model, drop_last=False), nn.CrossEntropyLoss(), params,
            [(x[:, :-1], x[:, 1:]) for x in ids], check_deterministic=False,
        )  # fmt: skip
        start = 0
        for name, p in zip(LLAMA_LAYERS, params, strict=True):
            k = p.numel()
            cols = torch.zeros(sum(q.numel() for q in params), k, dtype=torch.float64)
            cols[start : start + k] = torch.eye(k, dtype=torch.float64)
            block = (ef @ cols)[start : start + k]  # (k, k)
            start += k
            err = relative_error(ours.J[name], block)
            assert err <= EF_RTOL, f"{name}: ‖J_ours − J_curvlinops‖/‖J‖ = {err:.2e}"
            assert ours.tokens == N_BATCHES * BATCH * (SEQ - 1)
