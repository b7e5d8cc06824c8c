"""The exact (dense) per-token empirical Fisher of one layer's ``vec(W)``: the ground truth of K-FAC.

For every target ``nn.Linear`` (paper orientation: ``W`` (d1, d2) = (d_in, d_out), torch's
``weight`` is ``Wᵀ``) and every loss token ``t`` of the calibration set, the per-token gradient
``∇_W ℓ_t`` is taken by autograd **through the whole model** (attention mixes positions, so it is
*not* ``x_t s_tᵀ`` in general). Then (Eq. 4 with the true labels, one term per token)::

    J = (1/n) Σ_t vec(c_t ∇_W ℓ_t) vec(c_t ∇_W ℓ_t)ᵀ      (d1·d2, d1·d2)
    G = (1/n) Σ_t ∇_W ℓ_t                                  (d1, d2)

with ``n`` the number of loss tokens, ``vec`` column-stacking (so ``vec(W) = weight.reshape(-1)``)
and ``c_t = 1`` (``score_scale="token"``, the paper's per-token Fisher) or ``c_t = 1/T_b``
(``"batch"``: the gradient of the batch's mean loss, as the official code's statistics). ``G`` is
the gradient of the token-weighted mean loss, the same object as
:class:`~lora_da_ref.torch.statistics.KFACStatistics` ``.G``.

This is what K-FAC approximates: with ``s_t = ∂(Σ_u ℓ_u)/∂o_t`` and ``x_t`` the layer input at
position ``t``, K-FAC replaces ``J`` by ``E[s sᵀ] ⊗ E[x xᵀ]`` (Algorithm 1). It is exact only when
each token's gradient lives at its own position *and* the two factors are independent.

The gradients are taken with respect to detached copies of the target weights passed through
:func:`torch.func.functional_call`, so the model's parameters are never written to; the pass runs in
eval mode with every parameter frozen and restores both in ``finally``. Sizes: ``J`` has
``(d1·d2)²`` entries, meant for layers with ``d1·d2`` up to a few thousand.

Precision: Hugging Face's LLaMA computes RMSNorm and the eager attention softmax in float32 even in
a float64 model (and its causal-LM loss casts the logits to float32), which caps the agreement of
two float64 computations at ~1e-7. :func:`full_precision_copy` removes those casts in a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lora_da_ref.torch.statistics import IGNORE_INDEX, model_guard

__all__ = [
    "ExactFisherStatistics",
    "causal_lm_token_losses",
    "exact_empirical_fisher",
    "exact_fisher_variants",
    "full_precision_copy",
    "per_token_gradients",
]

Batch = dict[str, Any]
TokenLossFn = Callable[[nn.Module, Batch], Tensor]
ScoreScale = Literal["token", "batch"]
GradientWeight = Literal["token", "sequence"]


def causal_lm_token_losses(model: nn.Module, batch: Batch, *, label_shift: int = 1) -> Tensor:
    """Per-token cross-entropies ``ℓ_t`` of a Hugging Face causal LM, in row-major (b, t) order.

    Position ``t`` predicts ``labels[t + label_shift]`` (HF shifts by one); positions whose target
    is ``-100`` are dropped. Their mean is HF's ``model(**batch).loss``.

    Returns:
        ``(T_b,)`` losses, ``T_b`` the batch's number of loss tokens.
    """
    if "labels" not in batch:
        raise ValueError("causal_lm_token_losses needs 'labels' in each batch")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits  # (B, T, V)
    labels = batch["labels"]
    T = labels.shape[-1]
    logits, targets = logits[:, : T - label_shift], labels[:, label_shift:]  # (B, T', V), (B, T')
    keep = targets != IGNORE_INDEX
    return nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")  # (T_b,)


class _RMSNorm(nn.Module):
    """RMSNorm in the input's own dtype: ``w ⊙ h / √(mean(h²) + ε)`` (HF's casts to float32)."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, h: Tensor) -> Tensor:
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))


def full_precision_copy(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A deep copy of ``model`` in ``dtype`` whose RMSNorms and attention compute in ``dtype``.

    Modules whose class name ends in ``RMSNorm`` (with ``weight`` and ``variance_epsilon``, as HF's)
    are replaced by an RMSNorm without the float32 cast, and a HF model's attention is switched to
    ``"sdpa"`` (the eager path takes its softmax in float32). The original model is not touched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    copy = deepcopy(model).to(dtype)
    for parent in list(copy.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RMSNorm") and hasattr(child, "variance_epsilon"):
                setattr(parent, child_name, _RMSNorm(child.weight, float(child.variance_epsilon)))
    config = getattr(copy, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "eager":
        config._attn_implementation = "sdpa"
    return copy.eval()


class _TokenLosses(nn.Module):
    """``forward(batch) = token_losses(model, batch)``, so ``functional_call`` can swap weights."""

    def __init__(self, model: nn.Module, token_losses: TokenLossFn) -> None:
        super().__init__()
        self.model = model
        self.token_losses = token_losses

    def forward(self, batch: Batch) -> Tensor:
        return self.token_losses(self.model, batch)


def per_token_gradients(
    model: nn.Module,
    batch: Batch,
    targets: dict[str, nn.Linear],
    *,
    token_losses: TokenLossFn | None = None,
) -> dict[str, Tensor]:
    """Rows ``vec(∇_W ℓ_t)ᵀ`` of every loss token ``t`` of one batch (Eq. 4, per token).

    Args:
        model: the model; not modified (the caller freezes it, see :func:`exact_empirical_fisher`).
        batch: one calibration batch.
        targets: name → ``nn.Linear`` (names as in ``model.named_modules()``).
        token_losses: ``(model, batch) → (T_b,)`` per-token losses; default
            :func:`causal_lm_token_losses`.

    Returns:
        name → ``(T_b, d1·d2)`` in the model's dtype; column-stacked ``vec(W)`` = ``weight.reshape(-1)``.
    """
    token_losses = causal_lm_token_losses if token_losses is None else token_losses
    wrapper = _TokenLosses(model, token_losses)
    weights = {
        f"model.{name}.weight": m.weight.detach().clone().requires_grad_(True)
        for name, m in targets.items()
    }
    with torch.enable_grad():
        losses = torch.func.functional_call(wrapper, weights, (batch,))  # (T_b,)
        _check_losses(losses)
        grads = _jacobian_rows(losses, list(weights.values()))
    return {name: g.reshape(g.shape[0], -1) for name, g in zip(targets, grads, strict=True)}


def _jacobian_rows(losses: Tensor, weights: list[Tensor]) -> tuple[Tensor, ...]:
    """``∂ℓ_t/∂weight`` for every t: one vmapped backward, or a loop if vmap is unsupported."""
    eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)  # (T_b, T_b)
    try:
        return torch.autograd.grad(
            losses, weights, grad_outputs=eye, is_grads_batched=True, retain_graph=True
        )
    except RuntimeError:  # an op without a batching rule: the same rows, one backward each
        rows = [torch.autograd.grad(l, weights, retain_graph=True) for l in losses]
        return tuple(torch.stack(parts) for parts in zip(*rows, strict=True))


def _check_losses(losses: object) -> None:
    if not isinstance(losses, Tensor) or losses.ndim != 1:
        raise ValueError("token_losses must return a 1-D tensor of per-token losses")
    if not bool(torch.isfinite(losses.detach()).all()):
        raise ValueError("non-finite per-token loss (nan or inf)")
    if not losses.requires_grad:
        raise ValueError("the per-token losses do not depend on the target weights")


@dataclass
class ExactFisherStatistics:
    """Exact per-token empirical Fisher ``J`` (d1·d2, d1·d2) and mean gradient ``G`` (d1, d2) per
    layer, with ``tokens`` = n, the number of loss tokens they average over."""

    J: dict[str, Tensor]
    G: dict[str, Tensor]
    shapes: dict[str, tuple[int, int]]
    tokens: int


def exact_empirical_fisher(
    model: nn.Module,
    batches: Sequence[Batch],
    targets: dict[str, nn.Linear],
    *,
    token_losses: TokenLossFn | None = None,
    score_scale: ScoreScale = "token",
    gradient_weight: GradientWeight = "token",
    dtype: torch.dtype = torch.float64,
) -> ExactFisherStatistics:
    """The exact per-token empirical Fisher of each target's ``vec(W)`` and the mean gradient.

    .. math:: J = \\frac1n \\sum_t \\operatorname{vec}(c_t ∇_W ℓ_t)\\operatorname{vec}(c_t ∇_W ℓ_t)^⊤,
              \\quad G = \\frac1n \\sum_t ∇_W ℓ_t

    (Eq. 4 with true labels; ``G`` is Eq. 14's gradient; ``c_t`` see the module docstring.)

    Args:
        model: left exactly as it was (weights, requires_grad, train/eval; no hooks are added).
        batches: calibration batches (dicts of tensors on the model's device).
        targets: name → ``nn.Linear`` of ``model``.
        token_losses: per-token loss function (default :func:`causal_lm_token_losses`).
        score_scale: ``"token"`` (c_t = 1) or ``"batch"`` (c_t = 1/T_b).
        gradient_weight: ``G = Σ_b w_b ∇L_b / Σ_b w_b`` with ``L_b`` the batch's mean token loss
            and ``w_b = T_b`` (``"token"``: the token-mean loss, as above) or ``w_b`` = the
            batch's number of sequences (``"sequence"``, the official code), as
            :class:`~lora_da_ref.torch.config.LoraDAConfig` ``.gradient_weight``.
        dtype: accumulation dtype (the gradients themselves are in the model's dtype).

    Returns:
        :class:`ExactFisherStatistics`; ``G`` in the paper's orientation (d_in, d_out).
    """
    variant = (score_scale, gradient_weight)
    return exact_fisher_variants(
        model, batches, targets, [variant], token_losses=token_losses, dtype=dtype
    )[variant]


def exact_fisher_variants(
    model: nn.Module,
    batches: Sequence[Batch],
    targets: dict[str, nn.Linear],
    variants: Sequence[tuple[ScoreScale, GradientWeight]],
    *,
    token_losses: TokenLossFn | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[tuple[ScoreScale, GradientWeight], ExactFisherStatistics]:
    """:func:`exact_empirical_fisher` for several ``(score_scale, gradient_weight)`` settings
    from ONE pass of per-token gradients (the expensive part)."""
    for score_scale, gradient_weight in variants:
        _check_arguments(model, batches, targets, score_scale, gradient_weight)
    shapes = {n: (m.in_features, m.out_features) for n, m in targets.items()}
    J = {(s, n): torch.zeros(d1 * d2, d1 * d2, dtype=dtype)
         for s, _ in variants for n, (d1, d2) in shapes.items()}  # fmt: skip
    G = {(w, n): torch.zeros(d1 * d2, dtype=dtype)
         for _, w in variants for n, (d1, d2) in shapes.items()}  # fmt: skip
    weights = {w: 0.0 for _, w in variants}
    tokens = 0
    with model_guard(model):
        for batch in batches:
            rows = per_token_gradients(model, batch, targets, token_losses=token_losses)
            n_b = next(iter(rows.values())).shape[0]
            if n_b == 0:
                continue  # no loss token: the batch's mean loss is 0/0 (skipped, as statistics)
            c = {"token": 1.0, "batch": 1.0 / n_b}
            w = {"token": float(n_b), "sequence": float(_sequences(batch))}
            for name, g in rows.items():
                g = g.detach().to(device="cpu", dtype=dtype)  # (T_b, d1·d2)
                gram = g.mT @ g  # (d1·d2, d1·d2)
                for s in {s for s, _ in variants}:
                    J[s, name] += c[s] ** 2 * gram
                for k in weights:
                    G[k, name] += (w[k] / n_b) * g.sum(0)  # w_b ∇L_b
            tokens += n_b
            weights = {k: v + w[k] for k, v in weights.items()}
    if tokens == 0:
        raise ValueError("the calibration batches contain no loss tokens")
    return {(s, w): _finish(J, G, s, w, weights[w], shapes, tokens) for s, w in variants}


def _finish(J, G, s, w, weight, shapes, tokens) -> ExactFisherStatistics:
    Js = {n: 0.5 * (J[s, n] + J[s, n].mT) / tokens for n in shapes}
    Gs = {n: (G[w, n] / weight).reshape(d2, d1).mT for n, (d1, d2) in shapes.items()}
    return ExactFisherStatistics(Js, Gs, dict(shapes), tokens)


def _sequences(batch: Batch) -> int:
    """The batch's number of sequences: the leading size of its first 2-D tensor (else 1)."""
    for value in batch.values():
        if isinstance(value, Tensor) and value.ndim >= 2:
            return int(value.shape[0])
    return 1


def _check_arguments(
    model: object, batches: object, targets: object, score_scale: object, gradient_weight: object
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batches, dict) or not isinstance(batches, Sequence) or not batches:
        raise ValueError("batches must be a non-empty sequence of dicts")
    if not isinstance(targets, dict) or not targets:
        raise ValueError("targets must be a non-empty dict name -> nn.Linear")
    modules = dict(model.named_modules())
    for name, m in targets.items():
        if not isinstance(m, nn.Linear) or modules.get(name) is not m:
            raise ValueError(f"target {name!r} is not an nn.Linear of the model under that name")
    if score_scale not in ("token", "batch"):
        raise ValueError(f"score_scale must be 'token' or 'batch', got {score_scale!r}")
    if gradient_weight not in ("token", "sequence"):
        raise ValueError(f"gradient_weight must be 'token' or 'sequence', got {gradient_weight!r}")
