"""The result record every claim returns, and the quick/full run modes.

A claim is a function ``run(mode, broken=False) -> list[ClaimResult]``. Each :class:`ClaimResult`
is one row of the ``python -m proofs_check`` table: a measured ``value`` compared with a named
``tolerance`` through ``relation`` (``"<="`` or ``">="``), with the tolerance's justification and,
for Monte-Carlo rows, the standard error ``se``. ``passed`` is computed, never passed in; a NaN
value fails. ``broken=True`` feeds the claim's deliberately wrong input (its module docstring's
"Broken input"), which must make at least one row fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Claim", "ClaimResult", "Mode", "Relation", "check_mode"]

Mode = Literal["quick", "full"]
Relation = Literal["<=", ">="]
Detail = float | int | str


@dataclass(frozen=True)
class ClaimResult:
    """One measured check.

    Attributes:
        id: row id, e.g. ``"3b"`` (claim number + letter).
        ref: the paper reference, e.g. ``"Eq. (33)-(34)"``.
        measured: what ``value`` is, in words.
        value: the measured number.
        tolerance: the threshold ``value`` is compared with.
        relation: ``"<="`` (value must not exceed tolerance) or ``">="``.
        justification: why the tolerance is what it is (one line).
        se: Monte-Carlo standard error of ``value`` (``None`` for deterministic rows).
        details: further measured numbers (gaps, slack, per-setting values) for the report.
        passed: ``value <relation> tolerance`` (computed).
    """

    id: str
    ref: str
    measured: str
    value: float
    tolerance: float
    relation: Relation
    justification: str
    se: float | None = None
    details: dict[str, Detail] = field(default_factory=dict)
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.relation not in ("<=", ">="):
            raise ValueError(f"relation must be '<=' or '>=', got {self.relation!r}")
        value, tol = float(self.value), float(self.tolerance)
        ok = value <= tol if self.relation == "<=" else value >= tol
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "tolerance", tol)
        object.__setattr__(self, "passed", bool(ok) and not math.isnan(value))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict (NaN/inf become strings)."""
        out: dict[str, object] = {}
        for key in (
            "id",
            "ref",
            "measured",
            "value",
            "tolerance",
            "relation",
            "justification",
            "se",
            "passed",
        ):
            out[key] = _jsonable(getattr(self, key))
        out["details"] = {k: _jsonable(v) for k, v in self.details.items()}
        return out


def _jsonable(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


ClaimRun = Callable[..., list[ClaimResult]]


@dataclass(frozen=True)
class Claim:
    """A registered claim: ``id`` (the claim's number in docs/theory.md), a title, and its ``run``
    function."""

    id: str
    title: str
    run: ClaimRun


def check_mode(mode: str) -> Mode:
    """Validate a run mode (``"quick"`` or ``"full"``)."""
    if mode not in ("quick", "full"):
        raise ValueError(f"mode must be 'quick' or 'full', got {mode!r}")
    return mode  # type: ignore[return-value]
