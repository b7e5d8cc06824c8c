"""Memory plan of the statistics pass: bytes per layer from shapes, and ``layers_per_pass`` from a
budget (``LoraDAConfig(max_statistics_bytes=...)``; by default half the memory available on the
model's device), decided once, before any pass: one pass whenever the statistics fit.

What one pass holds (:class:`~lora_da_ref.torch.statistics.KFACSums`, running sums in
:data:`~lora_da_ref.torch.statistics.RUNNING_SUM_DTYPE`), per target ``nn.Linear`` (d_in, d_out):

* ``Z``: d_in² — **once per input group** (modules reading the same tensor share it: q/k/v, and
  gate/up in LLaMA-style blocks). The pass finds the groups by tensor identity; before the pass
  they are *estimated* by :func:`input_groups` (siblings with the same ``d_in`` whose names are
  in one of :data:`SHARED_INPUT_FAMILIES`); an unknown architecture gets one Z per module (an
  upper bound);
* ``Y``: d_out² (``output_factor="full"``) or d_out (``"diagonal"``);
* ``G``: d_in·d_out, and as much again for ``G_odd`` unless ``diagnostics="off"`` (the
  odd-numbered sequences' gradient sum, kept apart for the split-half diagnostics);
* the float64 sketches that measure the rounding (``config.records_rounding``): d_in·k beside
  each Z and G, d_out·k beside a full Y or d_out beside a diagonal one (k =
  :data:`~lora_da_ref.torch.statistics.ROUNDING_PROBES`);
* beside each Z, d_in for the part of its diagonal taken in float64 (products below float64:
  :func:`~lora_da_ref.torch.statistics.records_heavy_rows`).

:func:`~lora_da_ref.torch.statistics.finalize` divides in place, so the normalised statistics
reuse this memory (no second copy). Not counted: the model, its activations, and one transient
product per module and batch (``x xᵀ``, ``s sᵀ``, ``x gᵀ`` in the statistics dtype, freed at once).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lora_da_ref.torch.config import LoraDAConfig, StatisticsConfig, statistics_config_of
from lora_da_ref.torch.statistics import ROUNDING_PROBES, RUNNING_SUM_DTYPE, records_heavy_rows

__all__ = [
    "AUTO_BUDGET_FRACTION",
    "SHARED_INPUT_FAMILIES",
    "LayerBytes",
    "available_bytes",
    "input_groups",
    "layer_passes",
    "plan_layers_per_pass",
    "resolve_layers_per_pass",
    "statistics_budget",
    "statistics_bytes",
]

# Share of the free memory of the model's device that LoraDAConfig(max_statistics_bytes="auto")
# gives one pass's statistics: the rest is left to the model's activations, the solves' float64
# temporaries (a few d × d matrices per worker) and the user's other work.
AUTO_BUDGET_FRACTION = 0.5

# Module-name families that read one input tensor when they are siblings (same parent, same d_in).
SHARED_INPUT_FAMILIES = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)


@dataclass(frozen=True)
class LayerBytes:
    """Bytes of one module's statistics: ``Z`` (0 when it shares its group's), ``Y``, ``G``
    (with ``G_odd`` when the sums are split)."""

    Z: int
    Y: int
    G: int

    @property
    def total(self) -> int:
        return self.Z + self.Y + self.G


Shapes = Mapping[str, tuple[int, int]]  # name → (d_in, d_out)


def _shapes(targets: Mapping[str, nn.Linear] | Shapes) -> dict[str, tuple[int, int]]:
    out = {}
    for name, m in targets.items():
        out[name] = (m.in_features, m.out_features) if isinstance(m, nn.Module) else tuple(m)
    return out


def input_groups(shapes: Shapes) -> dict[str, str]:
    """Estimated input group of each module: the first sibling of its family with the same d_in."""
    groups: dict[str, str] = {}
    first: dict[tuple[str, int, int], str] = {}
    for name, (d_in, _) in shapes.items():
        parent, _, leaf = name.rpartition(".")
        family = next((i for i, f in enumerate(SHARED_INPUT_FAMILIES) if leaf in f), None)
        if family is None:
            groups[name] = name
            continue
        groups[name] = first.setdefault((parent, family, d_in), name)
    return groups


def statistics_bytes(
    targets: Mapping[str, nn.Linear] | Shapes,
    config: StatisticsConfig | LoraDAConfig,
    group_of: Mapping[str, str] | None = None,
) -> dict[str, LayerBytes]:
    """Bytes of every module's running sums in one pass (module docstring), from shapes only.

    Args:
        targets: ``{name: nn.Linear}`` or ``{name: (d_in, d_out)}``.
        config: ``output_factor`` and the optional accumulators decide Y's and G's size.
        group_of: the input groups if known (e.g. ``KFACStatistics.group_of``); else estimated.
    """
    config = statistics_config_of(config)
    shapes = _shapes(targets)
    groups = input_groups(shapes) if group_of is None else dict(group_of)
    size = torch.empty((), dtype=RUNNING_SUM_DTYPE).element_size()
    halves = 2 if config.split_halves else 1  # G, and G_odd with split sums
    k = ROUNDING_PROBES if config.records_rounding else 0  # the sketches' columns
    full = config.output_factor == "full"
    heavy = int(records_heavy_rows(config))  # the float64 part of diag Z
    out = {}
    for name, (d_in, d_out) in shapes.items():
        z = d_in * (d_in + k + heavy) if groups.get(name, name) == name else 0
        y = d_out * (d_out + k) if full else d_out * (1 + bool(k))
        g = d_in * (halves * d_out + k)
        out[name] = LayerBytes(z * size, y * size, g * size)
    return out


def _per_layer(per_module: Mapping[str, LayerBytes]) -> dict[str, int]:
    layers: dict[str, int] = {}
    for name, b in per_module.items():
        key = _layer_key(name)
        layers[key] = layers.get(key, 0) + b.total
    return layers


def plan_layers_per_pass(
    targets: Mapping[str, nn.Linear] | Shapes, config: StatisticsConfig | LoraDAConfig, budget: int
) -> int:
    """The largest ``k`` such that every pass of ``k`` consecutive layers fits in ``budget``
    bytes of statistics. Raises ``ValueError`` naming the layer when one layer alone does not."""
    config = statistics_config_of(config)
    layers = list(_per_layer(statistics_bytes(targets, config)).items())
    worst = max(layers, key=lambda kv: kv[1])
    if worst[1] > budget:
        raise ValueError(
            f"max_statistics_bytes = {budget:,} is below the statistics of one layer: {worst[0]!r} "
            f"needs {worst[1]:,} bytes ({config.output_factor} Y"
            f"{', split-half G' if config.split_halves else ''}); raise the budget, or "
            "use output_factor='diagonal' / diagnostics='off'"
        )
    sizes = [b for _, b in layers]
    for k in range(len(sizes), 0, -1):
        if all(sum(sizes[i : i + k]) <= budget for i in range(0, len(sizes), k)):
            return k
    return 1  # unreachable: k = 1 fits (checked above)


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Memory free for new allocations on ``device`` (default CPU): CUDA's ``mem_get_info``; on
    the CPU the kernel's ``MemAvailable`` (Linux), else free physical pages; ``None`` if unknown."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def statistics_budget(
    config: StatisticsConfig | LoraDAConfig, device: torch.device | str | None = None
) -> int | None:
    """The byte budget of one pass's statistics: ``config.max_statistics_bytes``, where
    ``"auto"`` is :data:`AUTO_BUDGET_FRACTION` of :func:`available_bytes` on ``device``."""
    if config.max_statistics_bytes != "auto":
        return config.max_statistics_bytes
    free = available_bytes(device)
    return None if free is None else int(AUTO_BUDGET_FRACTION * free)


def resolve_layers_per_pass(
    targets: Mapping[str, nn.Linear] | Shapes,
    config: StatisticsConfig | LoraDAConfig,
    device: torch.device | str | None = None,
) -> int | None:
    """The pass plan, decided once before any pass: ``None`` (one pass) when every target's
    statistics fit :func:`statistics_budget`, else the largest number of layers per pass that
    does; an explicit ``config.layers_per_pass`` is kept (or lowered to fit the budget)."""
    budget = statistics_budget(config, device)
    if budget is None:
        return config.layers_per_pass
    planned = plan_layers_per_pass(targets, config, budget)
    if config.layers_per_pass is not None:
        return min(planned, config.layers_per_pass)
    return None if planned >= len(_per_layer(statistics_bytes(targets, config))) else planned


def layer_passes(names: list[str], layers_per_pass: int | None) -> list[list[str]]:
    """Split module names into passes of ``layers_per_pass`` layers (``None``: one pass).

    A module's layer is its name up to the first all-digit component (``model.layers.3``);
    names without one are a layer of their own. Layers keep model order.
    """
    if layers_per_pass is None:
        return [list(names)]
    layers: dict[str, list[str]] = {}
    for name in names:
        layers.setdefault(_layer_key(name), []).append(name)
    keys = list(layers)
    chunks = [keys[i : i + layers_per_pass] for i in range(0, len(keys), layers_per_pass)]
    return [[n for key in chunk for n in layers[key]] for chunk in chunks]


def _layer_key(name: str) -> str:
    match = re.match(r"^(.*?(?:^|\.)\d+)(?:\.|$)", name)
    return match.group(1) if match else name
