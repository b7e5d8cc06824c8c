"""Assertions that explain themselves: worst entries, norms and the tolerance used."""

from __future__ import annotations

import numpy as np


def allclose_report(
    actual, expected, *, rtol: float, atol: float = 0.0, name: str = "value"
) -> None:
    """``np.allclose`` that, on failure, says where, by how much and against which tolerance."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    bound = atol + rtol * np.abs(expected)
    if np.all(err <= bound):
        return
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    raise AssertionError(
        f"{name}: not close (rtol={rtol:.1e}, atol={atol:.1e}); "
        f"{int(np.sum(err > bound))}/{err.size} entries out; worst at {tuple(int(i) for i in worst)}: "
        f"actual={actual[worst]:.6e} expected={expected[worst]:.6e} |diff|={err[worst]:.3e}; "
        f"‖diff‖={np.linalg.norm(err):.3e}, ‖expected‖={np.linalg.norm(expected):.3e}"
    )


def relative_error(actual, expected) -> float:
    """‖actual − expected‖_F / ‖expected‖_F."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
