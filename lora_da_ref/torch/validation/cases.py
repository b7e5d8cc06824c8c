"""Validation cases: a model, calibration batches, the layers to check and the per-token loss.

Built-in cases (``BUILTIN_CASES``, ``--case``) with a dense exact Fisher per layer:
``tiny-llama`` (a random 2-layer LLaMA, hidden 16, all seven projections of layer 0),
``token-mlp`` (a per-token MLP) and ``kfac-exact`` (a control where K-FAC is exact).
The real model (``--case smollm2``) is :mod:`lora_da_ref.torch.validation.smollm2`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lora_da_ref.data import tiny_llama
from lora_da_ref.torch.exact import TokenLossFn, causal_lm_token_losses

__all__ = [
    "BUILTIN_CASES",
    "Batch",
    "ValidationCase",
    "kfac_exact_case",
    "tiny_llama_case",
    "token_mlp_case",
]

Batch = dict[str, Any]


@dataclass
class ValidationCase:
    """A model, its calibration batches, the layers to check and the per-token loss.

    ``token_losses(model, batch)`` returns the batch's per-token losses ``(T_b,)``; their mean is
    the batch loss the production path differentiates. ``label_shift`` as in LoraDAConfig.
    """

    id: str
    model: nn.Module
    batches: list[Batch]
    layers: list[str]
    token_losses: TokenLossFn = causal_lm_token_losses
    label_shift: int = 1
    description: str = ""


def _random_sequences(n: int, length: int, vocab: int, seed: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(4, vocab, (1, length), generator=gen) for _ in range(n)]  # no specials
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]


def tiny_llama_case(n_sequences: int = 32, length: int = 65, seed: int = 0) -> ValidationCase:
    """Random 2-layer LLaMA (hidden 16, MLP 32, 4 heads, 2 KV heads, vocab 64); the seven
    projections of layer 0; ``n_sequences`` random sequences of ``length`` tokens, batch size 1
    (2048 loss tokens by default: 4× the largest layer's d_in·d_out = 512, so J is invertible)."""
    model = tiny_llama(seed, hidden=16, intermediate=32, heads=4, kv_heads=2, vocab=64)
    layers = [n for n, m in model.named_modules() if ".layers.0." in n and isinstance(m, nn.Linear)]
    batches = _random_sequences(n_sequences, length, 64, seed + 1)
    tokens = n_sequences * (length - 1)
    return ValidationCase("tiny-llama", model, batches, layers, description=f"{tokens} tokens")


def _mlp_token_losses(model: nn.Module, batch: Batch) -> Tensor:
    logits = model(batch["inputs"].to(next(model.parameters()).dtype))  # (B, T, C)
    return nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
    )  # (B·T,)


def token_mlp_case(n_batches: int = 32, length: int = 64, seed: int = 0) -> ValidationCase:
    """Per-token MLP 12→16→16→16→10 (tanh), Laplace inputs, labels drawn from a random teacher.

    The three hidden layers are checked; the output layer is not: with all 10 softmax logits
    free its Fisher is singular (adding one vector to every column leaves the loss unchanged)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
            nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 10),
        ).eval()  # fmt: skip
        teacher = nn.Linear(12, 10)
    batches = []
    for _ in range(n_batches):
        x = torch.distributions.Laplace(0.0, 1.0).sample((1, length, 12))  # (1, T, 12)
        logits = teacher(x).detach() * 2.0  # (1, T, 10)
        y = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=gen).view(1, length)
        batches.append({"inputs": x, "labels": y})
    layers = ["0", "2", "4"]
    tokens = n_batches * length
    return ValidationCase(
        "token-mlp", model, batches, layers, _mlp_token_losses, 0, f"{tokens} tokens"
    )


def _mse_token_losses(model: nn.Module, batch: Batch) -> Tensor:
    dtype = next(model.parameters()).dtype
    f = model(batch["inputs"].to(dtype))  # (B, T, d2)
    return 0.5 * ((f - batch["targets"].to(dtype)) ** 2).sum(-1).flatten()  # (B·T,)


def kfac_exact_case(n_inputs: int = 64, n_residuals: int = 32, seed: int = 0) -> ValidationCase:
    """A control where K-FAC is exact: one linear layer 12→6, squared loss ``ℓ = ½‖f − y‖²``, on
    a *factorial* design. Every input ``x_i`` meets every residual ``e_j`` (``y = Wᵀx_i − e_j``),
    so the per-token scores are ``s = e_j`` and ``J = mean_ij (e_j e_jᵀ) ⊗ (x_i x_iᵀ) = Y ⊗ Z``
    exactly; ``kfac-full`` must agree with the exact path up to its damping λ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 6, bias=False)).eval()
    X = torch.randn(n_inputs, 12, generator=gen) + 0.3  # (M, 12), non-zero mean: G ≠ 0
    E = torch.randn(n_residuals, 6, generator=gen) @ torch.randn(6, 6, generator=gen) + 0.2
    with torch.no_grad():
        batches = []
        for x in X:  # one batch per input: T_b = n_residuals tokens, all equal
            inputs = x.expand(1, n_residuals, 12).clone()  # (1, m, 12)
            targets = model(inputs) - E.unsqueeze(0)  # (1, m, 6)
            mask = torch.ones(1, n_residuals, dtype=torch.long)
            batches.append({"inputs": inputs, "targets": targets, "attention_mask": mask})
    tokens = n_inputs * n_residuals
    return ValidationCase(
        "kfac-exact", model, batches, ["0"], _mse_token_losses, 0, f"{tokens} tokens, factorial"
    )


BUILTIN_CASES: dict[str, Callable[[], ValidationCase]] = {
    "tiny-llama": tiny_llama_case,
    "token-mlp": token_mlp_case,
    "kfac-exact": kfac_exact_case,
}
