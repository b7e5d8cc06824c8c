"""LoRA-DA's presets: the settings of :class:`~lora_da_ref.torch.config.LoraDAConfig` each fixes
and the PEFT scaling it is meant to be trained with. Adding a preset is one entry of :data:`PRESETS`.

This module imports no torch, so the command line can list and check preset names before torch
loads; ``LoraDAConfig.preset(name)`` (and its ``official()`` / ``paper_literal()`` shortcuts)
builds the config from the entry's ``settings``, every other field keeping LoraDAConfig's default.

- ``default``: LoraDAConfig's own defaults: the official code's objective and scaling (β = 0.03,
  the diagonal output factor, ΔW normalised by its top singular value σ, both factors divided by
  √γ with γ = 1024, per-sequence weighting over all attention positions as the official code at
  batch size 1) with the package's robust numerics (damping relative to each factor's scale,
  float64 solves; a dense eigh below d = 2048, the certified iterative solver from there:
  ``solver="auto"``). Trained with rsLoRA, alpha 16 (the official scaling).
- ``official``: ``conf/lora_da.yaml`` of the official code for fidelity studies: absolute damping
  1e-6 and ``torch.lobpcg`` at 10 iterations with no convergence check (docs/equations.md,
  "Official code"). The official code's 8 transformer layers per pass is ``layers_per_pass=8``; by
  default every preset runs one pass when the statistics fit the memory budget.
- ``paper_literal``: Algorithm 1 as printed: β = α = 1, the full output factor, the exact (dense
  ``eigh``) eigenvectors at every size, no normalisation and no γ, so ``B0 = A0ᵀΔŴ`` can be
  orders of magnitude larger than the weights (SmolLM2's step-0 loss 24.5 against 1.61). **Not for training** with ``offset="none"`` (a ``LiteralPresetWarning``
  says so); kept to check the text, and with ``offset="subtract"`` it starts at W0 exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """A named set of LoraDAConfig settings and the PEFT scaling it is meant to start at.

    ``lora_alpha=None`` means ``alpha = r`` (scaling ``s = 1``: the model starts at exactly
    ``W0 + A0 B0``, Eq. 17); ``for_training=False`` marks a preset whose B0 is not scaled for
    training (it warns when applied without an offset).
    """

    name: str
    summary: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    lora_alpha: float | None = 16.0
    use_rslora: bool = True
    for_training: bool = True

    def scaling(self, rank: int) -> float:
        """The PEFT scaling ``s`` this preset is meant to start at, at LoRA rank ``rank``."""
        alpha = float(rank) if self.lora_alpha is None else self.lora_alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


DEFAULT_PRESET = "default"

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "default": Preset(
            "default",
            "the official objective and scaling with robust numerics (relative damping, "
            "float64 solves, eigh below d = 2048 and a certified solver above); rsLoRA alpha 16",
        ),
        "official": Preset(
            "official",
            "the official code's conf/lora_da.yaml (absolute damping 1e-6, LOBPCG 10 "
            "iterations); rsLoRA alpha 16",
            {
                "damping": 1e-6,
                "damping_scale": "absolute",
                "solver": "lobpcg",
                "solver_options": {"niter": 10, "official": True},
            },
        ),
        "paper_literal": Preset(
            "paper_literal",
            "Algorithm 1 as printed, no normalisation: not for training (B0 = A0ᵀΔŴ unscaled); "
            "alpha = r",
            {
                "variance_weight": 1.0,
                "bias_weight": 1.0,
                "output_factor": "full",
                "normalize_delta": False,
                "scale_gamma": None,
                "token_mask": "labels",
                "score_scale": "token",
                "gradient_weight": "token",
                "solver": "eigh",
            },
            lora_alpha=None,
            use_rslora=False,
            for_training=False,
        ),
    }
)


# Former names, answered with the new one in the error.
_RENAMED = {"paper": "paper_literal"}


def get_preset(name: object) -> Preset:
    """The preset called ``name``; a ``ValueError`` listing the presets otherwise."""
    if not isinstance(name, str) or name not in PRESETS:
        hint = f" ({name!r} is now {_RENAMED[name]!r})" if name in _RENAMED else ""
        raise ValueError(f"unknown LoRA-DA preset {name!r}{hint}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
