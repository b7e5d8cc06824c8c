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

from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

from lora_da_ref.torch.config import LoraDAConfig, LoraFactors
from lora_da_ref.torch.distributed import (
    init_lora_da_distributed,
    resolve_process_group,
)
from lora_da_ref.torch.factors import layer_factors, layer_seed
from lora_da_ref.torch.fisher import CholeskyFactor
from lora_da_ref.torch.statistics import (
    Batch,
    LossFn,
    collect_statistics,
    layer_passes,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["find_target_modules", "init_lora_da", "layer_factors", "layer_seed"]


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
