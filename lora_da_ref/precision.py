"""The one precision verdict a user reads (the init's warning, ``lora-da report``), from a
layer's recorded diagnostics. No torch: the command line reads it before torch loads.

Two numbers estimate how far rounding the statistics to their dtype rotates A0 (radians; the
torch path computes both, :mod:`lora_da_ref.torch.factors`):

* ``precision_bound``, first order and conservative: on SmolLM2 (210 layers, three calibration
  sources, float32 against float64 statistics) it was 4.3–444× the measured angle, never below;
* ``precision_probe``, one seeded re-solve from statistics perturbed at the rounding's size:
  an estimate, not a bound. Its one draw read below the measured angle: at the rounding
  model's size (``precision_rounding = "model"``, the default tier) down to 0.78× (median
  ≈ 5×), at the rounding the pass measured (``"measured"``, the full tier) down to 0.20×
  (median 1.1–1.3×), over the 135 layers the bound did not clear. docs/numerics.md has the
  sweep.

A layer is **cleared** when its bound is at most :data:`TRUST_RAD`, or its probe at most
``TRUST_RAD / PROBE_MARGIN[rounding]``: the margin covers the lowest reading of the sweep with
room (1/0.78 = 1.3 against 2; 1/0.20 = 5.1 against 10). On the sweep it cleared every layer
re-solved at the model's size (largest reading 3.3e-4 rad) and 134 of the 135 re-solved at the
measured rounding (the other read 1.2e-4 rad for a measured 8.8e-5: a false alarm, reported as
unverified). It has **failed** when a probe at the measured rounding is above :data:`TRUST_RAD`
(a re-solve at the pass's own rounding turned A0 that far). Anything else checked is
**unverified**: not known to be wrong, not cleared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["PROBE_MARGIN", "TRUST_RAD", "Precision", "layer_precision"]

TRUST_RAD = 1e-3  # rad: the rotation of A0 by rounding that a layer must be cleared below
# how far below TRUST_RAD a probe's one draw must read to clear a layer, by the rounding it used
PROBE_MARGIN = {"model": 2.0, "measured": 10.0}


class Precision(NamedTuple):
    """One layer's precision verdict (:func:`layer_precision`)."""

    verdict: str | None  # "failed", "unverified", or None: cleared, or not checked
    key: str  # the number that decided: "precision_probe" where it ran, else "precision_bound"
    angle: float  # its value (rad; NaN when neither was recorded)
    limit: float  # what it was compared with: TRUST_RAD, or TRUST_RAD / margin for a probe


def layer_precision(diagnostics: Mapping[str, Any]) -> Precision:
    """The precision verdict of one layer from its diagnostics (the rule in the module's
    docstring). Float64 statistics record neither number: not checked. A probe counts as a
    measurement unless ``precision_rounding`` is ``"model"`` (files without the key come from
    the full tier, where alone the probe ran); a NaN or negative number clears nothing."""
    probe = _number(diagnostics.get("precision_probe"))
    bound = _number(diagnostics.get("precision_bound"))
    # only the default tier's "model" re-solve is not a measurement; anything else counts as one
    rounding = "model" if diagnostics.get("precision_rounding") == "model" else "measured"
    if probe is not None and rounding == "measured" and not probe <= TRUST_RAD:
        return Precision("failed", "precision_probe", probe, TRUST_RAD)
    if bound is not None and bound <= TRUST_RAD:
        return Precision(None, "precision_bound", bound, TRUST_RAD)
    if probe is not None:
        limit = TRUST_RAD / PROBE_MARGIN[rounding]
        return Precision(None if probe <= limit else "unverified", "precision_probe", probe, limit)
    if bound is not None:  # above the limit, or NaN: it clears nothing
        return Precision("unverified", "precision_bound", bound, TRUST_RAD)
    return Precision(None, "precision_bound", math.nan, TRUST_RAD)


def _number(value: Any) -> float | None:
    """A recorded angle: a number, or a string JSON-like writers use for one ("nan", "inf");
    ``None`` when absent. A negative or unreadable one is NaN: it clears nothing."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value) if value >= 0 else math.nan
