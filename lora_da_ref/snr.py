"""The one SNR a user reads (the init's summary, ``lora-da plan``, ``lora-da report``), from a
layer's recorded diagnostics. No torch: the command line reads it before torch loads.

``SNR = (‖ΔŴ‖² − noise)/noise``: the calibration noise's share of the Fisher–gradient ΔŴ = −Ĵ⁻¹Ĝ
(0: as much noise as signal; negative: noise only). The noise is the **split-half** estimate
(``split_snr``, from the data's own two halves, kept by every diagnostics tier but ``"off"``)
where recorded, else the plug-in model's (``calibration_snr``). On SmolLM2 the split-half SNR
ranks layers by split-half stability within one calibration size (Spearman ρ −0.49 to −0.64 at
|S| ≥ 128) where the plug-in does not (−0.17 to +0.35), and the plug-in turns negative when an
absolute damping dominates Y (docs/real_regime.md). Neither is a stability forecast: the SNR
says whether the data determine a layer, and no layer fails on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["SNR_KEYS", "SNR_LIMIT", "layer_snr"]

SNR_KEYS = ("split_snr", "calibration_snr", "snr")  # in order of preference; "snr": older files
SNR_LIMIT = 1.0  # below it the noise is larger than the signal


def layer_snr(diagnostics: Mapping[str, Any]) -> float | None:
    """The layer's SNR: the first of :data:`SNR_KEYS` recorded as a number, else ``None``."""
    for key in SNR_KEYS:
        value = diagnostics.get(key)
        if isinstance(value, str) and value.lower() in ("inf", "-inf", "nan", "infinity"):
            value = float(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value) if not math.isnan(value) else None
    return None
