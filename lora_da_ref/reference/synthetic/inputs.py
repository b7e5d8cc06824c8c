"""The fixed input distribution of the synthetic models: a finite *design pool*.

Every synthetic model draws its inputs ``x ∈ R^{d1}`` from the **uniform distribution over a fixed
pool of M points** generated once from a seed. Because the x-distribution is finite, every
population expectation ``E_x[·]`` is an exact finite average over the pool, so the population Fisher
``J(W) = E_x E_{y|x}[s sᵀ]`` (Eq. (4)) is available in closed form, with no Monte-Carlo error.
Sampling an input means drawing a pool index uniformly at random.

The pool points are non-Gaussian and anisotropic by construction::

    x = R · diag(√λ) · u,      λ_k = k^(−decay)  (k = 1..d1),

where ``u`` has i.i.d. centred, unit-variance, non-Gaussian entries (scaled Laplace, excess
kurtosis +3, or uniform on [−√3, √3], excess kurtosis −1.2) and ``R`` is a Haar-random rotation
that correlates the coordinates. Before the pool is fixed, ``E[x xᵀ] = R diag(λ) Rᵀ``; the model's
population uses the pool's own second moment, which differs from it by O(1/√M).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from lora_da_ref.reference.checks import check_positive_int
from lora_da_ref.reference.linalg import random_orthonormal

__all__ = ["InputKind", "design_pool"]

InputKind = Literal["laplace", "uniform"]


def _laplace(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.laplace(0.0, 1.0 / np.sqrt(2.0), size=shape)  # Var = 2 b² = 1


def _uniform(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), size=shape)  # Var = 1


_LATENT: dict[str, object] = {"laplace": _laplace, "uniform": _uniform}


def design_pool(
    d1: int,
    size: int = 4096,
    *,
    seed: int = 0,
    kind: InputKind = "laplace",
    decay: float = 1.0,
) -> np.ndarray:
    """The design pool ``{x_m}_{m=1..M}`` defining the x-distribution of the synthetic models.

    ``x = R diag(√λ) u`` with ``λ_k = k^(−decay)`` and ``u`` i.i.d. non-Gaussian (module docstring).

    Args:
        d1: input dimension ``d1`` (rows of ``W``).
        size: number of pool points ``M``; must be at least ``d1`` so that ``E[x xᵀ]`` is SPD.
        seed: seed of the pool (the same seed always gives the same pool).
        kind: latent distribution of ``u``: ``"laplace"`` or ``"uniform"``.
        decay: exponent of the covariance spectrum ``λ_k = k^(−decay)``; 0 gives isotropic ``x``.

    Returns:
        The pool, shape ``(M, d1)``, read-only.
    """
    _check_pool_args(d1, size, kind, decay)
    rng = np.random.default_rng(seed)
    u = _LATENT[kind](rng, (size, d1))  # (M, d1)
    scales = np.arange(1, d1 + 1, dtype=np.float64) ** (-0.5 * decay)  # √λ_k, (d1,)
    R = random_orthonormal(d1, d1, rng)  # (d1, d1)
    pool = (u * scales) @ R.T  # (M, d1): row m is R diag(√λ) u_m
    pool.setflags(write=False)
    return pool


def _check_pool_args(d1: int, size: int, kind: str, decay: float) -> None:
    check_positive_int("d1", d1)
    check_positive_int("pool size", size, minimum=d1)
    if kind not in _LATENT:
        raise ValueError(f"input kind must be one of {sorted(_LATENT)}, got {kind!r}")
    if not isinstance(decay, int | float) or not np.isfinite(decay) or decay < 0:
        raise ValueError(f"spectrum decay must be finite and >= 0, got {decay!r}")
