"""Published baselines as LoRA factors: LoRA-One (official code) and PiSSA (PEFT's convention).

Conventions (as :mod:`lora_da_ref.torch.config`): the paper's orientation, ``W`` (d_in, d_out),
the layer computes ``x (W0 + A B)`` with ``A`` (d_in, r) and ``B`` (r, d_out);
``torch.nn.Linear.weight`` is ``Wᵀ`` (d_out, d_in); PEFT stores ``lora_A.weight = Aᵀ`` and
``lora_B.weight = Bᵀ`` and adds ``s · x A B`` (``s`` = the layer's ``scaling``). Both functions
return ``{module name: LoraFactors}`` (float32, CPU) that
:func:`~lora_da_ref.torch.adapter.apply_lora_da` writes unchanged:

* :func:`lora_one` — ``apply_lora_da(peft_model, factors)`` (``offset="none"``: the official
  LoRA-One code leaves ``W0`` untouched; the model starts at ``W0 + s·A B``). Its ``A`` spans
  :func:`lora_one_subspace`, the subspace alone (what the figures compare with ``B0 = 0``).
* :func:`pissa` — ``apply_lora_da(peft_model, factors, offset="subtract")``: the base weight
  becomes ``W0 − s·A B``, PiSSA's residual, and the model's output is unchanged at start.

``LoraFactors.eigenvalues`` holds the r largest singular values of the decomposed matrix
(``−∇W L`` or ``W0``); ``diagnostics`` holds them too, with a fingerprint of the base weight
(:func:`~lora_da_ref.torch.adapter.weight_fingerprint`) so the factors cannot be written into
another model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lora_da_ref.torch.adapter import FINGERPRINT_KEY, weight_fingerprint
from lora_da_ref.torch.config import LoraFactors
from lora_da_ref.torch.statistics import (
    TENSOR_KEYS,
    Batch,
    LossFn,
    default_loss_fn,
    materialise_batches,
    model_guard,
)
from lora_da_ref.torch.targets import find_target_modules

__all__ = ["lora_one", "lora_one_subspace", "pissa", "sequence_mean_gradient"]

Targets = str | Iterable[str]


# ----------------------------------------------------------------------------- LoRA-One


def lora_one(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    rank: int,
    target_modules: Targets,
    stable_gamma: float | None = None,
    loss_fn: LossFn | None = None,
) -> dict[str, LoraFactors]:
    """LoRA-One (Zhang, Liu & Chen, ICML 2025) exactly as its official code initialises LoRA.

    The official ``run_exp.py`` with ``init.mode: gradient``, ``direction: LoRA-One`` and
    ``bsz: 1`` (``conf/init/gradient.yaml``):

    1. ``estimate_gradient``: one forward/backward per calibration sequence (batch size 1),
       ``G_t = (1/n) Σ_i ∇ L_i`` with ``L_i`` the model's own (HF) mean token loss of sequence
       ``i`` over its labels, taken at ``W0``; ``G_t`` has the torch weight's shape (d_out, d_in).
    2. ``−G_t = U S Vᵀ`` and, with ``S_0 = S[0]`` the largest singular value,
       ``lora_B = U_r diag(√S_r) / √S_0`` (d_out, r), ``lora_A = diag(√S_r) V_rᵀ / √S_0``
       (r, d_in); both are divided by ``√γ`` when ``scale: stable`` (``stable_gamma`` = γ).
    3. ``W0`` is not changed (no offset).

    Translated to the paper's orientation: ``∇W L = G_tᵀ`` (d_in, d_out), so
    ``−∇W L = V S Uᵀ``: its left singular vectors are ``V``, its right ones ``U``, and

    .. math::

        A = \\mathrm{lora\\_A}^\\top = V_r \\,\\mathrm{diag}(\\sqrt{S_r}) / \\sqrt{S_0 γ}, \\qquad
        B = \\mathrm{lora\\_B}^\\top = \\mathrm{diag}(\\sqrt{S_r})\\, U_r^\\top / \\sqrt{S_0 γ},

    so ``A B = [−∇W L]_r / (S_0 γ)``: the best rank-r approximation of the negative gradient,
    normalised to spectral norm ``1/γ`` (sign-free, whatever signs the SVD picks). This is
    computed directly as ``−∇W L = P S Qᵀ``, ``A = P_r diag(√(S_r/S_0))/√γ``,
    ``B = diag(√(S_r/S_0)) Q_rᵀ/√γ``.

    Differences from the official code, none of which changes the math: the SVD is exact
    (``torch.linalg.svd`` in float32; the official ``torch.svd_lowrank(q=512, niter=16)`` is
    exact up to round-off for layers no wider than 512 and a randomised approximation of the
    top-r triplets beyond); the pass runs in eval mode (the official calls ``model.train()``,
    which differs only for a model with active dropout; LLaMA's is 0) and only the target
    weights get gradients; a padded batch is split into its sequences and each is run without
    its padding, so any batching of the same sequences gives the same factors.

    Args:
        model: the model at ``W0``; left exactly as it was (weights bit for bit, ``.grad``,
            ``requires_grad``, train/eval mode).
        batches: iterable of dicts (``input_ids``, ``attention_mask``, ``labels``, any batch
            size, left or right padding), as :func:`~lora_da_ref.torch.init.init_lora_da`.
        rank: ``r``, 1 ≤ r ≤ min(d_in, d_out) of every target.
        target_modules: a list of name suffixes, a regex or ``"all-linear"``
            (:func:`~lora_da_ref.torch.targets.find_target_modules`).
        stable_gamma: ``γ`` of ``scale: stable`` (official configs: 16 to 128); ``None``: no
            division.
        loss_fn: ``loss_fn(model, sequence_batch)`` → the sequence's mean loss; default
            ``model(**batch).loss``.

    Returns:
        ``{module name: LoraFactors}`` in model order; ``diagnostics``: ``singular_values``
        (the top ``2r`` of ``−∇W L``), ``top_singular_value`` (``S_0``), ``sequences`` (n),
        ``stable_gamma`` and the weight fingerprint.

    Raises:
        TypeError, ValueError: bad batches, as every entry point
            (:func:`~lora_da_ref.torch.statistics.materialise_batches`).
        ValueError: no sequences, a bad ``rank``/``stable_gamma``, no matching target, a
            sequence with a non-finite loss (e.g. no label token), a zero gradient.
    """
    _check_rank(rank)
    gamma = _check_gamma(stable_gamma)
    targets = _targets(model, target_modules, rank)
    grads, n = sequence_mean_gradient(model, batches, targets, loss_fn=loss_fn)
    out = {}
    for name, module in targets.items():
        factors = _lora_one_layer(name, -grads[name], rank, gamma)
        factors.diagnostics.update(sequences=n, stable_gamma=stable_gamma)
        factors.diagnostics[FINGERPRINT_KEY] = weight_fingerprint(module.weight)
        out[name] = factors
    return out


def lora_one_subspace(neg_grad: Tensor, rank: int) -> Tensor:
    """LoRA-One's subspace: the top-r left singular vectors of ``−G`` (Eq. 22, Remark 4.3).

    ``−G = P diag(S) Qᵀ`` (thin SVD), ``U = P[:, :r]``.

    ``col(U)`` is the column space of :func:`lora_one`'s ``A`` (which scales these columns), of
    LoRA-GA's ``A`` and, by Remark 4.3, of LoRA-DA's ``A0`` without its variance term and with
    ``ΔW = −G``. The SVD runs on ``neg_grad`` as given (its dtype and device, no copy): the
    caller picks the precision (:func:`lora_one` float32 on CPU, as the official code; the
    split-half study of ``paper_figs.real_regime`` float64).

    Args:
        neg_grad: ``−G`` (d_in, d_out) in the paper's orientation, ``G = ∇W L``: the transpose
            of ``nn.Linear.weight.grad``'s layout.
        rank: ``r``, 1 ≤ r ≤ min(d_in, d_out).

    Returns:
        ``U`` (d_in, r), orthonormal columns, ordered by decreasing singular value.
    """
    return _top_svd(neg_grad, rank)[0]


def _top_svd(M: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``M = P diag(S) Qᵀ`` (thin SVD, ``M``'s dtype and device): ``(P_r (d_in, r), S (all),
    Qᵀ_r (r, d_out))``. The one SVD behind :func:`lora_one_subspace` and :func:`lora_one`."""
    P, S, Qh = torch.linalg.svd(M, full_matrices=False)
    return P[:, :rank], S, Qh[:rank]


def _lora_one_layer(name: str, neg_grad: Tensor, rank: int, gamma: float) -> LoraFactors:
    """Factors of one layer from ``−∇W L`` (d_in, d_out) (see :func:`lora_one`)."""
    P_r, S, Qh_r = _top_svd(neg_grad.float().cpu(), rank)
    s0 = float(S[0])
    if not (math.isfinite(s0) and s0 > 0):
        raise ValueError(
            f"{name}: the calibration gradient is {'zero' if s0 == 0 else 'not finite'}; "
            "LoRA-One needs a non-zero gradient (do the batches have label tokens?)"
        )
    root = (S[:rank] / s0).sqrt() / math.sqrt(gamma)  # (r,) √(S_r/S_0)/√γ
    A = P_r * root  # (d_in, r): lora_one_subspace's columns, scaled
    B = root[:, None] * Qh_r  # (r, d_out)
    diagnostics = {"singular_values": S[: 2 * rank].tolist(), "top_singular_value": s0}
    return LoraFactors(A.contiguous(), B.contiguous(), S[:rank].clone(), diagnostics)


def sequence_mean_gradient(
    model: nn.Module,
    batches: Iterable[Batch],
    targets: Mapping[str, nn.Linear],
    *,
    loss_fn: LossFn | None = None,
) -> tuple[dict[str, Tensor], int]:
    """``∇W L = (1/n) Σ_i ∇W L_i`` over the n sequences of ``batches``, at batch size 1.

    Each row of each batch is run alone without its padding (``attention_mask == 0``
    positions removed), ``L_i = loss_fn(model, sequence)`` (default: the HF mean token loss over
    its labels), and the gradients of the target weights are averaged over sequences: the
    official LoRA-One ``estimate_gradient`` with ``bsz: 1``. The model is restored exactly.

    Returns:
        ``({name: ∇W L}, n)``, each gradient (d_in, d_out) in the paper's orientation (the
        transpose of ``weight.grad``'s layout), float32 on the weight's device.
    """
    loss_fn = default_loss_fn if loss_fn is None else loss_fn
    weights = {name: m.weight for name, m in targets.items()}
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    device = next(iter(weights.values())).device
    n = 0
    with model_guard(model):  # all frozen, eval; restored in finally
        for w in weights.values():
            w.requires_grad_(True)
        for n, seq in enumerate(_sequences(materialise_batches(batches)), start=1):
            seq = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in seq.items()}
            loss = loss_fn(model, seq)
            if not torch.isfinite(loss):
                raise ValueError(
                    f"sequence {n - 1}: the loss is {loss.item()} (a sequence without label "
                    "tokens?); LoRA-One averages per-sequence gradients, each must be finite"
                )
            # autograd.grad leaves every .grad untouched
            for name, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
                sums[name] += g.float()  # (d_out, d_in)
    if n == 0:  # non-empty batches of zero rows
        raise ValueError("the batches hold no sequences: LoRA-One needs calibration sequences")
    return {name: (s / n).T for name, s in sums.items()}, n


def _sequences(batches: list[Batch]) -> Iterator[dict[str, Any]]:
    """Every row of every batch (checked by ``materialise_batches``) as a batch of one, its
    padding removed."""
    for index, batch in enumerate(batches):
        rows = _rows(batch)
        for i in range(rows):
            yield _unpadded({k: _row(v, i, rows) for k, v in batch.items()}, index)


def _rows(batch: Mapping[str, Any]) -> int:
    """The batch's rows: the first dimension of its token tensors (labels or attention_mask is
    there, checked)."""
    key = next(k for k in TENSOR_KEYS if batch.get(k) is not None)
    return batch[key].shape[0]


def _row(value: Any, i: int, rows: int) -> Any:
    if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == rows:
        return value[i : i + 1]
    return value


def _unpadded(seq: dict[str, Any], index: int) -> dict[str, Any]:
    """Drop the positions where ``attention_mask == 0`` from every (1, T, ...) tensor."""
    mask = seq.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        return seq
    keep = mask[0].bool()
    kept = keep.nonzero().flatten()
    if kept.numel() and int(kept[-1] - kept[0]) + 1 != kept.numel():
        raise ValueError(
            f"batch {index}: an attention_mask with gaps inside a sequence; only left or right "
            "padding can be removed"
        )
    T = mask.shape[1]
    return {
        k: v[:, keep] if isinstance(v, Tensor) and v.ndim >= 2 and v.shape[1] == T else v
        for k, v in seq.items()
    }


# ----------------------------------------------------------------------------- PiSSA


def pissa(
    model: nn.Module, *, rank: int, target_modules: Targets, scaling: float = 1.0
) -> dict[str, LoraFactors]:
    """PiSSA (Meng, Wang & Zhang, NeurIPS 2024) in PEFT's convention (``init_lora_weights="pissa"``).

    PEFT's ``LoraLayer.pissa_init`` (torch orientation, weight (d_out, d_in) in float32):
    ``weight = V S Uh``, ``S_r ← S_r / s`` with ``s`` the layer's ``scaling``,
    ``lora_A = diag(√S_r) Uh_r`` (r, d_in), ``lora_B = V_r diag(√S_r)`` (d_out, r), and the
    base weight becomes the residual ``weight − s · lora_B lora_A``. Dividing by ``s`` makes
    ``s · lora_B lora_A`` the top-r part of the weight for any ``lora_alpha``, so the residual
    is ``W0 − [W0]_r`` and the adapter carries ``[W0]_r``.

    In the paper's orientation ``W0 = weightᵀ = P S Qᵀ`` (``P = Uhᵀ``, ``Q = V``):

    .. math::

        A = P_r \\,\\mathrm{diag}(\\sqrt{S_r / s}), \\qquad
        B = \\mathrm{diag}(\\sqrt{S_r / s})\\, Q_r^\\top, \\qquad s A B = [W_0]_r .

    The residual is not computed here: ``apply_lora_da(peft_model, factors, offset="subtract")``
    sets the base weight to ``W0 − s·A B`` with the PEFT layer's own ``s``, so the model's output
    is unchanged at start whatever ``scaling`` is; it equals PEFT's PiSSA (adapter ``[W0]_r``,
    residual ``W0 − [W0]_r``) when ``scaling`` is that ``s`` (``lora_alpha / r``, or
    ``lora_alpha / √r`` with rsLoRA).

    Args:
        model: the model whose weights are ``W0`` (before ``get_peft_model``, or the PEFT model's
            base model before any offset); not modified.
        rank: ``r``, 1 ≤ r ≤ min(d_in, d_out) of every target.
        target_modules: as :func:`lora_one`.
        scaling: the PEFT layers' ``s``, by which PEFT divides the singular values.

    Returns:
        ``{module name: LoraFactors}``; ``diagnostics``: ``singular_values`` (top ``r`` of
        ``W0``), ``scaling`` and the weight fingerprint.

    Raises:
        ValueError: a bad ``rank`` or ``scaling``, no matching target, a non-finite weight.
    """
    _check_rank(rank)
    if isinstance(scaling, bool) or not isinstance(scaling, int | float):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling must be a finite number > 0, got {scaling}")
    out = {}
    for name, module in _targets(model, target_modules, rank).items():
        out[name] = _pissa_layer(name, module.weight.detach(), rank, float(scaling))
    return out


def _pissa_layer(name: str, weight: Tensor, rank: int, scaling: float) -> LoraFactors:
    work = torch.promote_types(weight.dtype, torch.float32)  # PEFT: float32 (f64 stays f64)
    W = weight.to(work).cpu().T  # (d_in, d_out)
    if not torch.isfinite(W).all():
        raise ValueError(f"{name}.weight has non-finite entries")
    P, S, Qh = torch.linalg.svd(W, full_matrices=False)
    root = (S[:rank] / scaling).sqrt()  # (r,) √(S_r/s)
    A = (P[:, :rank] * root).float().contiguous()  # (d_in, r)
    B = (root[:, None] * Qh[:rank]).float().contiguous()  # (r, d_out)
    diagnostics = {
        "singular_values": S[:rank].tolist(),
        "scaling": scaling,
        FINGERPRINT_KEY: weight_fingerprint(weight),
    }
    return LoraFactors(A, B, S[:rank].float().clone(), diagnostics)


# ----------------------------------------------------------------------------- checks


def _check_rank(rank: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an integer, got {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")


def _check_gamma(gamma: object) -> float:
    if gamma is None:
        return 1.0
    if isinstance(gamma, bool) or not isinstance(gamma, int | float):
        raise TypeError(f"stable_gamma must be a real number or None, got {type(gamma).__name__}")
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"stable_gamma must be a finite number > 0 or None, got {gamma}")
    return float(gamma)


def _targets(model: nn.Module, target_modules: Targets, rank: int) -> dict[str, nn.Linear]:
    targets = find_target_modules(model, target_modules)
    for name, m in targets.items():
        if rank > min(m.in_features, m.out_features):
            raise ValueError(
                f"rank {rank} exceeds min(d_in, d_out) = {min(m.in_features, m.out_features)} "
                f"of {name} ({m.in_features} -> {m.out_features})"
            )
    return targets
