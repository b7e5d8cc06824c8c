"""LoRA-DA initialisation of a torch model: Algorithm 1 end to end.

Per target layer (paper orientation, ``W`` (d_in, d_out)):

1. statistics ``Z``, ``Y``, ``G`` from one pass (:mod:`lora_da_ref.torch.statistics`);
2. ``J ≈ (Y + λI) ⊗ (Z + λI)`` (:class:`KroneckerFisher`; diagonal Y uses ``1/(y_i + λ)``) and
   the Fisher–gradient ``ΔW = −Z⁻¹GY⁻¹`` (Eq. 21);
3. optionally (``normalize_delta``, official code) ``ΔW ← ΔW/σ`` with σ the top singular value
   of ΔW, and ``β ← β/σ²``: Ω is divided by σ², its eigenvectors are unchanged;
4. ``Ω = β tr(Y⁻¹)/N · Z⁻¹ − α ΔWΔWᵀ`` (Eq. 19) and ``A0`` = its r smallest eigenvectors
   (Eqs. 5–8) by the configured solver;
5. ``B0 = A0ᵀΔW`` (Eq. 17, with the normalised ΔW when normalising); with ``scale_gamma`` both
   factors are divided by ``√γ``.

The result is float32 on CPU, ``A`` (d_in, r) and ``B`` (r, d_out); PEFT's
``lora_A.weight = Aᵀ``, ``lora_B.weight = Bᵀ``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lora_da_ref.torch.config import LoraDAConfig, LoraFactors
from lora_da_ref.torch.distributed import (
    init_lora_da_distributed,
    resolve_process_group,
)
from lora_da_ref.torch.fisher import CholeskyFactor, KroneckerFisher, damped_cholesky
from lora_da_ref.torch.guidance import fisher_gradient, guidance_matrix
from lora_da_ref.torch.solvers import smallest_eigenpairs
from lora_da_ref.torch.statistics import (
    Batch,
    KFACStatistics,
    LossFn,
    collect_statistics,
    layer_passes,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["find_target_modules", "init_lora_da", "layer_factors"]


def init_lora_da(
    model: nn.Module,
    batches: Iterable[Batch],
    config: LoraDAConfig,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    process_group: ProcessGroup | None = None,
) -> dict[str, LoraFactors]:
    """LoRA-DA factors for every target ``nn.Linear`` of ``model`` (Algorithm 1, Theorem 4.2).

    Args:
        model: the model; left exactly as it was (weights, hooks, requires_grad, train/eval).
        batches: iterable of dicts (``input_ids``, ``attention_mask``, optional ``labels``);
            materialised once, so a generator is fine (and is re-used by ``layers_per_pass``).
        config: :class:`LoraDAConfig` (``rank`` = r, ``n_train`` = N, ``variance_weight`` = β,
            ``bias_weight`` = α, ``damping`` = λ, ...).
        loss_fn: ``loss_fn(model, batch)`` → the batch's mean loss over its loss tokens; default
            ``model(**batch).loss``.
        progress: show a tqdm bar over the batches (on rank 0 only when distributed).
        process_group: a ``torch.distributed.ProcessGroup`` to shard over; ``None`` uses the
            default group when one is initialised. Then ``batches`` is this rank's shard and
            every rank returns the factors of the union of the shards
            (:mod:`lora_da_ref.torch.distributed`).

    Returns:
        ``{module name: LoraFactors}`` in model order, ``A`` (d_in, r), ``B`` (r, d_out).
    """
    if not isinstance(config, LoraDAConfig):
        raise TypeError(f"config must be a LoraDAConfig, got {type(config).__name__}")
    targets = find_target_modules(model, config.target_modules)
    _check_rank(config.rank, targets)
    group = resolve_process_group(process_group)
    # A rank's shard may be empty under distribution (checked collectively there).
    if group is None:
        batches = _materialise(batches)
    elif not isinstance(batches, list | dict):  # a generator must survive several passes
        batches = list(batches)  # (a dict is rejected collectively in the distributed path)
    factors: dict[str, LoraFactors] = {}
    # One group of `layers_per_pass` layers at a time: its statistics are collected, reduced,
    # solved and dropped before the next pass, so peak memory holds one group's statistics.
    for names in layer_passes(list(targets), config.layers_per_pass):
        chunk = {name: targets[name] for name in names}
        if group is not None:
            kwargs = {"loss_fn": loss_fn, "progress": progress}
            factors |= init_lora_da_distributed(model, batches, chunk, config, group, **kwargs)
            continue
        stats = collect_statistics(
            model, batches, chunk, config, loss_fn=loss_fn, progress=progress
        )
        z_factors: dict[str, CholeskyFactor] = {}
        factors |= {name: layer_factors(stats, name, config, z_factors) for name in chunk}
    return factors


def layer_factors(
    stats: KFACStatistics,
    name: str,
    config: LoraDAConfig,
    z_factors: dict[str, CholeskyFactor] | None = None,
) -> LoraFactors:
    """Steps 2–5 of Algorithm 1 for one layer; ``z_factors`` caches Cholesky factors of shared Z."""
    group = stats.group_of[name]
    z_factors = {} if z_factors is None else z_factors
    if group not in z_factors:
        z_factors[group] = damped_cholesky(stats.Z[group], config.damping, name=f"Z of {group}")
    J = KroneckerFisher(stats.Y[name], z_factors[group], damping=config.damping)
    delta_w = fisher_gradient(J, stats.G[name])  # (d_in, d_out)
    sigma = _top_singular_value(delta_w, name) if config.normalize_delta else 1.0
    delta_w = delta_w / sigma
    omega = guidance_matrix(
        J, delta_w, config.n_train,
        variance_weight=config.variance_weight / sigma**2, bias_weight=config.bias_weight,
    )  # fmt: skip  # (d_in, d_in)
    options = {"seed": layer_seed(config.seed, name), **config.solver_options}
    eig = smallest_eigenpairs(omega, config.rank, solver=config.solver, **options)
    A, B = eig.vectors, eig.vectors.mT @ delta_w  # (d_in, r), (r, d_out)
    scale = 1.0 if config.scale_gamma is None else math.sqrt(config.scale_gamma)
    diagnostics = _diagnostics(stats, name, J, sigma, eig.diagnostics)
    return LoraFactors(_out(A / scale), _out(B / scale), _out(eig.eigenvalues), diagnostics)


def find_target_modules(model: nn.Module, target_modules: Iterable[str]) -> dict[str, nn.Linear]:
    """PEFT-style matching: module ``name`` is a target iff ``name == t`` or ends with ``"." + t``.

    Raises ValueError when a suffix matches no module, or matches a module that is not nn.Linear.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found: dict[str, nn.Linear] = {}
    for suffix in target_modules:
        matches = [
            (n, m) for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix)
        ]
        if not matches:
            raise ValueError(f"target module {suffix!r} matches no module of the model")
        for n, m in matches:
            if not isinstance(m, nn.Linear):
                raise ValueError(
                    f"target {suffix!r} matches {n!r} of type {type(m).__name__}; only nn.Linear is supported"
                )
            found[n] = m
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def _check_rank(rank: int, targets: dict[str, nn.Linear]) -> None:
    for name, m in targets.items():
        if rank > min(m.in_features, m.out_features):
            raise ValueError(
                f"rank {rank} exceeds min(d_in, d_out) = {min(m.in_features, m.out_features)} of {name!r}"
            )


def _materialise(batches: Iterable[Batch]) -> list[Batch]:
    if isinstance(batches, dict):
        raise TypeError("batches must be an iterable of dicts, not a single dict")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: LoRA-DA needs calibration data")
    return batches


def _top_singular_value(delta_w: Tensor, name: str) -> float:
    """σ_max(ΔW) as √λ_max of the smaller Gram matrix: 2–6× faster than a full SVD here, and as
    accurate for the top singular value (λ_max of MᵀM has relative error O(eps))."""
    gram = delta_w.mT @ delta_w if delta_w.shape[0] >= delta_w.shape[1] else delta_w @ delta_w.mT
    sigma = math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))
    if not math.isfinite(sigma) or sigma <= 0.0:
        raise ValueError(
            f"cannot normalise ΔW of {name!r}: its top singular value is {sigma} (zero gradient?)"
        )
    return sigma


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed, stable across processes (no Python hash randomisation)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _diagnostics(
    stats: KFACStatistics, name: str, J: KroneckerFisher, sigma: float, solver: dict[str, Any]
) -> dict[str, Any]:
    return {
        "group": stats.group_of[name],
        "damping": J.damping,
        "delta_sigma": sigma,
        "tokens": stats.tokens,
        "loss_tokens": stats.loss_tokens,
        "sequences": stats.sequences,
        **solver,
    }


def _out(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()
