"""LoRA-DA in two stages, and its diagnosis: statistics once, solves many.

As staged curvature libraries do (fit the factors once, save them, compute from them many
times), Algorithm 1 splits where its data ends:

1. :func:`collect_statistics` runs the model over the calibration batches once and returns the
   K-FAC statistics ``Z``, ``Y`` and the gradient ``G`` of every target layer
   (:class:`~lora_da_ref.torch.statistics.KFACStatistics`), with what the pass depends on in a
   :class:`~lora_da_ref.torch.config.StatisticsConfig`;
2. :func:`lora_da_factors` solves every layer from those statistics (Eqs. 21, 19, 5–8, 17), with
   the objective and the numerics in a :class:`~lora_da_ref.torch.config.SolveConfig` and a rank
   per layer: no forward pass, so any number of solve configurations can share one pass;
3. :func:`diagnose` adds the calibration and precision diagnostics of a tier to solved factors,
   from the same statistics.

:func:`~lora_da_ref.torch.init.init_lora_da` composes the stages with a memory plan (one layer
group's statistics at a time) and the PEFT calls compose ``init_lora_da``; a
:class:`~lora_da_ref.torch.config.LoraDAConfig` (the user-facing bundle and the presets) splits
into the two configurations (``statistics_config()``, ``solve_config()``) and is accepted
wherever one of them is.

Example (one pass, two solve configurations)::

    stats = collect_statistics(model, batches, target_modules=["q_proj", "v_proj"])
    default = lora_da_factors(stats, rank=8)
    official = lora_da_factors(stats, rank=8, config=LoraDAConfig.official().solve_config())
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lora_da_ref.torch.config import (
    LoraDAConfig,
    LoraFactors,
    SolveConfig,
    StatisticsConfig,
    solve_config_of,
    statistics_config_of,
)
from lora_da_ref.torch.factors import solve_layer
from lora_da_ref.torch.memory import layer_passes, resolve_layers_per_pass
from lora_da_ref.torch.pipeline import solve_layers
from lora_da_ref.torch.progress import RunProgress
from lora_da_ref.torch.statistics import (
    Batch,
    KFACStatistics,
    LossFn,
    accumulate_statistics,
    finalize,
    materialise_batches,
    merge_passes,
)
from lora_da_ref.torch.store import saved_passes
from lora_da_ref.torch.targets import find_target_modules

__all__ = ["collect_statistics", "diagnose", "diagnose_saved", "lora_da_factors"]

Targets = str | Sequence[str] | Mapping[str, nn.Linear]


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Batch],
    target_modules: Targets | None = None,
    config: StatisticsConfig | LoraDAConfig | None = None,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> KFACStatistics:
    """Algorithm 1, step 1: the K-FAC statistics of every target layer of ``model``.

    Args:
        model: the model; left exactly as it was (weights, hooks, requires_grad, train/eval).
        batches: dicts of ``input_ids``, ``attention_mask`` and optional ``labels``;
            materialised once (a generator is fine).
        target_modules: as PEFT's ``LoraConfig.target_modules`` (module-name suffixes, a regex,
            ``"all-linear"``), or the ``{name: nn.Linear}`` already resolved; ``None``: the
            ``config``'s when it is a :class:`LoraDAConfig`, else the LLaMA projections.
        config: :class:`StatisticsConfig` (a :class:`LoraDAConfig` is split); ``None`` = the
            default preset's.
        loss_fn: ``loss_fn(model, batch)`` → the batch's mean loss; default ``model(**batch).loss``.
        progress: a progress bar over the batches.

    Returns:
        :class:`KFACStatistics` of every target. When the memory plan
        (``config.layers_per_pass``, ``max_statistics_bytes``) puts the layers in several
        passes, the model runs once per pass and the passes are joined: the result holds every
        layer's statistics (:func:`~lora_da_ref.torch.init.init_lora_da` solves each pass's
        layers before the next pass instead, holding one pass's statistics at a time).
    """
    if target_modules is None:
        target_modules = (
            config.target_modules
            if isinstance(config, LoraDAConfig)
            else LoraDAConfig().target_modules
        )
    config = statistics_config_of(config)
    if isinstance(target_modules, Mapping):
        targets = dict(target_modules)
    else:
        targets = find_target_modules(model, target_modules)
    batches = materialise_batches(batches)  # the whole calibration set: not empty
    device = next((p.device for p in model.parameters()), None)
    plan = layer_passes(list(targets), resolve_layers_per_pass(targets, config, device))
    bar = RunProgress.of(progress, len(plan) * len(batches))
    try:
        parts = [
            accumulate_statistics(
                model,
                batches,
                {n: targets[n] for n in names},
                config,
                loss_fn=loss_fn,
                progress=bar,
            )
            for names in plan
        ]
    finally:
        if bar is not progress:
            bar.close()
    return finalize(merge_passes(parts))


def lora_da_factors(
    statistics: KFACStatistics,
    *,
    rank: int | Mapping[str, int],
    config: SolveConfig | LoraDAConfig | None = None,
    layers: Iterable[str] | None = None,
) -> dict[str, LoraFactors]:
    """Algorithm 1, steps 2–5, for every layer of ``statistics``: ``A0`` (d_in, r) and
    ``B0`` (r, d_out), float32 on CPU, with the diagnostics of ``config.diagnostics``'s tier
    (:func:`diagnose`). No forward pass.

    Args:
        statistics: the first stage's output (:func:`collect_statistics`, or saved statistics).
        rank: the LoRA rank r of every layer, or ``{layer: r}`` for each one.
        config: :class:`SolveConfig` (a :class:`LoraDAConfig` is split); ``None`` = the default
            preset's.
        layers: the layers to solve (default: every layer of ``statistics``, in model order),
            in this order.
    """
    config = solve_config_of(config)
    names = _layers(statistics, layers)
    missing = [n for n in names if n not in statistics.G]
    if missing:
        raise ValueError(f"no statistics for layer(s) {missing[:5]}: collect them first")
    ranks = _ranks(rank, names)
    return solve_layers(statistics, names, config, ranks=ranks)


def diagnose(
    statistics: KFACStatistics,
    *,
    rank: int | Mapping[str, int],
    config: SolveConfig | LoraDAConfig | None = None,
    tier: Literal["cheap", "full"] = "full",
    layers: Iterable[str] | None = None,
) -> dict[str, dict]:
    """The calibration and precision diagnostics of ``tier`` for the factors
    :func:`lora_da_factors` makes with the same ``rank`` and ``config``: ``{layer:
    diagnostics}`` (``"cheap"``: the plug-in and split-half calibration SNR and the first-order
    precision bound; ``"full"``: also the split-half solves and the precision probe). Each layer
    is solved again from ``statistics`` (no forward pass); the entry points diagnose at their
    tier during the solve instead, from the solve's own intermediates."""
    config = solve_config_of(config).replace(diagnostics=tier)
    names = _layers(statistics, layers)
    ranks = _ranks(rank, names)
    z_factors: dict = {}
    return {
        name: solve_layer(statistics, name, config, z_factors, rank=ranks[name]).diagnostics
        for name in names
    }


def diagnose_saved(
    directory: str | os.PathLike[str], settings: Mapping[str, Any], ranks: Mapping[str, int]
) -> dict[str, dict[str, Any]]:
    """:func:`diagnose` at the ``"full"`` tier for every layer of a statistics directory saved
    by an init (:mod:`lora_da_ref.torch.store`), with the config recorded in an adapter's
    provenance (``settings``) and each layer's rank: no pass over the data
    (``lora-da report --full``)."""
    fields = {f.name for f in dataclasses.fields(LoraDAConfig)}
    values = {k: v for k, v in settings.items() if k in fields}
    values["dtype"] = getattr(torch, str(values.get("dtype", "float32")))
    if isinstance(values.get("target_modules"), list):
        values["target_modules"] = tuple(values["target_modules"])
    config = LoraDAConfig(**values)
    out: dict[str, dict[str, Any]] = {}
    for names, stats in saved_passes(directory):
        mine = [n for n in names if n in ranks]
        out |= diagnose(stats, rank=ranks, config=config, tier="full", layers=mine)
    return out


def _layers(statistics: KFACStatistics, layers: Iterable[str] | None) -> list[str]:
    """``layers``, else every layer of ``statistics`` in model order (the order the forward pass
    met them: ``group_of``'s; the gradients arrive in reverse)."""
    return list(statistics.group_of) if layers is None else list(layers)


def _ranks(rank: int | Mapping[str, int], names: list[str]) -> dict[str, int]:
    if isinstance(rank, Mapping):
        missing = [n for n in names if n not in rank]
        if missing:
            raise ValueError(f"rank has no entry for layer(s) {missing[:5]}")
        return {n: int(rank[n]) for n in names}
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer or {{layer: rank}}, got {rank!r}")
    return dict.fromkeys(names, rank)
