"""Memory plan of the statistics pass: bytes per layer from shapes, and ``layers_per_pass`` from a
budget (``LoraDAConfig(max_statistics_bytes=...)``), decided before any pass.

What one pass holds (:class:`~lora_da_ref.torch.statistics.KFACSums`, running sums in
:data:`~lora_da_ref.torch.statistics.RUNNING_SUM_DTYPE`), per target ``nn.Linear`` (d_in, d_out):

* ``Z``: d_in² — **once per input group** (modules reading the same tensor share it: q/k/v, and
  gate/up in LLaMA-style blocks). The pass finds the groups by tensor identity; before the pass
  they are *estimated* by :func:`input_groups` (siblings with the same ``d_in`` whose names are
  in one of :data:`SHARED_INPUT_FAMILIES`); an unknown architecture gets one Z per module (an
  upper bound);
* ``Y``: d_out² (``output_factor="full"``) or d_out (``"diagonal"``);
* ``G``: d_in·d_out, twice with ``calibration_diagnostics`` (the even/odd halves).

:func:`~lora_da_ref.torch.statistics.finalize` divides in place, so the normalised statistics
reuse this memory (no second copy). Not counted: the model, its activations, and one transient
product per module and batch (``x xᵀ``, ``s sᵀ``, ``x gᵀ`` in the statistics dtype, freed at once).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lora_da_ref.torch.config import LoraDAConfig
from lora_da_ref.torch.statistics import RUNNING_SUM_DTYPE, _layer_key

__all__ = [
    "SHARED_INPUT_FAMILIES",
    "LayerBytes",
    "input_groups",
    "plan_layers_per_pass",
    "resolve_layers_per_pass",
    "statistics_bytes",
]

# Module-name families that read one input tensor when they are siblings (same parent, same d_in).
SHARED_INPUT_FAMILIES = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)


@dataclass(frozen=True)
class LayerBytes:
    """Bytes of one module's statistics: ``Z`` (0 when it shares its group's), ``Y``, ``G``."""

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
    config: LoraDAConfig,
    group_of: Mapping[str, str] | None = None,
) -> dict[str, LayerBytes]:
    """Bytes of every module's running sums in one pass (module docstring), from shapes only.

    Args:
        targets: ``{name: nn.Linear}`` or ``{name: (d_in, d_out)}``.
        config: ``output_factor`` and ``calibration_diagnostics`` decide Y's and G's size.
        group_of: the input groups if known (e.g. ``KFACStatistics.group_of``); else estimated.
    """
    shapes = _shapes(targets)
    groups = input_groups(shapes) if group_of is None else dict(group_of)
    size = torch.empty((), dtype=RUNNING_SUM_DTYPE).element_size()
    halves = 2 if config.calibration_diagnostics else 1
    out = {}
    for name, (d_in, d_out) in shapes.items():
        z = d_in * d_in if groups.get(name, name) == name else 0
        y = d_out * d_out if config.output_factor == "full" else d_out
        out[name] = LayerBytes(z * size, y * size, halves * d_in * d_out * size)
    return out


def _per_layer(per_module: Mapping[str, LayerBytes]) -> dict[str, int]:
    layers: dict[str, int] = {}
    for name, b in per_module.items():
        key = _layer_key(name)
        layers[key] = layers.get(key, 0) + b.total
    return layers


def plan_layers_per_pass(
    targets: Mapping[str, nn.Linear] | Shapes, config: LoraDAConfig, budget: int
) -> int:
    """The largest ``k`` such that every pass of ``k`` consecutive layers fits in ``budget``
    bytes of statistics. Raises ``ValueError`` naming the layer when one layer alone does not."""
    layers = list(_per_layer(statistics_bytes(targets, config)).items())
    worst = max(layers, key=lambda kv: kv[1])
    if worst[1] > budget:
        raise ValueError(
            f"max_statistics_bytes = {budget:,} is below the statistics of one layer: {worst[0]!r} "
            f"needs {worst[1]:,} bytes ({config.output_factor} Y"
            f"{', split-half G' if config.calibration_diagnostics else ''}); raise the budget, or "
            "use output_factor='diagonal' / calibration_diagnostics=False"
        )
    sizes = [b for _, b in layers]
    for k in range(len(sizes), 0, -1):
        if all(sum(sizes[i : i + k]) <= budget for i in range(0, len(sizes), k)):
            return k
    return 1  # unreachable: k = 1 fits (checked above)


def resolve_layers_per_pass(
    targets: Mapping[str, nn.Linear] | Shapes, config: LoraDAConfig
) -> int | None:
    """``config.layers_per_pass``, lowered to fit ``config.max_statistics_bytes`` when set."""
    if config.max_statistics_bytes is None:
        return config.layers_per_pass
    planned = plan_layers_per_pass(targets, config, config.max_statistics_bytes)
    return planned if config.layers_per_pass is None else min(planned, config.layers_per_pass)
