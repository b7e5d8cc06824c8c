"""LoRA-DA initialisation of a torch model: Algorithm 1 end to end (:func:`init_lora_da`).

``init_lora_da`` checks the inputs, finds the target layers and runs
:func:`lora_da_ref.torch.pipeline.run_pipeline` (collect → reduce → solve → gather) with the
strategy of the run: :class:`~lora_da_ref.torch.pipeline.SingleProcess`, or
:class:`~lora_da_ref.torch.distributed.DataParallel` over a process group. The per-layer math
(steps 2–5: ``J ≈ Y ⊗ Z``, ``ΔW = −Z⁻¹GY⁻¹`` (Eq. 21), Ω (Eq. 19), ``A0`` (Eqs. 5–8),
``B0 = A0ᵀΔW`` (Eq. 17)) is :mod:`lora_da_ref.torch.factors`.

The result is float32 on CPU, ``A`` (d_in, r) and ``B`` (r, d_out); PEFT's
``lora_A.weight = Aᵀ``, ``lora_B.weight = Bᵀ``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from torch import nn

from lora_da_ref.torch.config import LoraDAConfig, LoraFactors
from lora_da_ref.torch.distributed import DataParallel, resolve_process_group
from lora_da_ref.torch.pipeline import SingleProcess, Strategy, layer_ranks, run_pipeline
from lora_da_ref.torch.statistics import Batch, LossFn
from lora_da_ref.torch.store import StatisticsStore, statistics_key
from lora_da_ref.torch.targets import find_target_modules

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["find_target_modules", "init_lora_da"]


def init_lora_da(
    model: nn.Module,
    batches: Iterable[Batch],
    config: LoraDAConfig | None = None,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    process_group: ProcessGroup | None = None,
    statistics_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    ranks: Mapping[str, int] | None = None,
) -> dict[str, LoraFactors]:
    """LoRA-DA factors for every target ``nn.Linear`` of ``model`` (Algorithm 1, Theorem 4.2).

    Args:
        model: the model; left exactly as it was (weights, hooks, requires_grad, train/eval).
        batches: iterable of dicts (``input_ids``, ``attention_mask``, optional ``labels``);
            materialised once, so a generator is fine (and is re-used by ``layers_per_pass``).
        config: :class:`LoraDAConfig` (``rank`` = r, ``n_train`` = N, ``variance_weight`` = β,
            ``bias_weight`` = α, ``damping`` = λ, ...); ``None`` = ``LoraDAConfig()``, the
            ``default`` preset (as every entry point).
        loss_fn: ``loss_fn(model, batch)`` → the batch's mean loss over its loss tokens; default
            ``model(**batch).loss``.
        progress: show a tqdm bar over the batches (on rank 0 only when distributed).
        process_group: a ``torch.distributed.ProcessGroup`` to shard over; ``None`` uses the
            default group when one is initialised. Then ``batches`` is this rank's shard and
            every rank returns the factors of the union of the shards
            (:mod:`lora_da_ref.torch.distributed`).
        ranks: ``{module name: r}`` for targets whose rank differs from ``config.rank`` (a PEFT
            ``rank_pattern``); the statistics do not depend on r, so one pass serves every rank.
        statistics_dir: save each pass's statistics there as it completes
            (:mod:`lora_da_ref.torch.store`; one process only); with ``resume`` first read the
            passes already saved there by an interrupted run with the same model, data and
            statistics settings (bit-identical factors). Without ``resume`` a directory that
            already holds saved passes is refused.

    Returns:
        ``{module name: LoraFactors}`` in model order, ``A`` (d_in, r), ``B`` (r, d_out).
    """
    config = LoraDAConfig() if config is None else config
    if not isinstance(config, LoraDAConfig):
        raise TypeError(f"config must be a LoraDAConfig, got {type(config).__name__}")
    _refuse_lora_layers(model)
    targets = find_target_modules(model, config.target_modules)
    ranks = layer_ranks(targets, config, ranks)
    _check_ranks(ranks, targets)
    group = resolve_process_group(process_group)
    strategy: Strategy = SingleProcess() if group is None else DataParallel(group)
    store = None
    if statistics_dir is not None:
        if group is not None:
            raise ValueError("statistics_dir is for a single process, not a process group")
        batches = strategy.prepare(batches)
        key = statistics_key(config, targets, batches)
        store = StatisticsStore(statistics_dir, key, resume=resume)
    return run_pipeline(
        model,
        batches,
        targets,
        config,
        strategy,
        loss_fn=loss_fn,
        progress=progress,
        ranks=ranks,
        store=store,
    )


def _refuse_lora_layers(model: nn.Module) -> None:
    """A model that already holds LoRA layers (a PEFT model) would be matched wrongly: suffix
    targets hit the wrapper (not nn.Linear) and "all-linear" silently skips the wrapped layers,
    and the statistics would include the adapter. Its entry point is the PEFT-native call."""
    if not isinstance(model, nn.Module):
        return  # find_target_modules names the type
    wrapped = [
        n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")
    ]
    if wrapped:
        raise TypeError(
            f"model already holds LoRA layers ({len(wrapped)}, e.g. {wrapped[0]!r}): "
            "init_lora_da takes the base model; for a PEFT model use "
            "lora_da_ref.torch.initialize_lora_da_weights(peft_model, dataloader, config)"
        )


def _check_ranks(ranks: Mapping[str, int], targets: dict[str, nn.Linear]) -> None:
    for name, m in targets.items():
        rank = ranks[name]
        if not 1 <= rank:
            raise ValueError(f"rank {rank} of {name!r} must be at least 1")
        if rank > min(m.in_features, m.out_features):
            raise ValueError(
                f"rank {rank} exceeds min(d_in, d_out) = {min(m.in_features, m.out_features)} of {name!r}"
            )
