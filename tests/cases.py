"""Small random problems for the reference tests ("cases are data")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def random_spd(d: int, rng: np.random.Generator, cond: float = 100.0) -> np.ndarray:
    """SPD matrix with eigenvalues log-spaced in [1, cond] and a random eigenbasis."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (Q * np.geomspace(1.0, cond, d)) @ Q.T


def random_symmetric(d: int, rng: np.random.Generator) -> np.ndarray:
    M = rng.standard_normal((d, d))
    return 0.5 * (M + M.T)


@dataclass(frozen=True)
class Case:
    id: str
    d1: int
    d2: int
    r: int
    n: int
    seed: int
    cond: float = 100.0

    def problem(self):
        """(J dense SPD, G, ΔW, W0) for this case."""
        rng = np.random.default_rng(self.seed)
        J = random_spd(self.d1 * self.d2, rng, self.cond)
        G = rng.standard_normal((self.d1, self.d2))
        delta = rng.standard_normal((self.d1, self.d2)) / np.sqrt(self.n)
        W0 = rng.standard_normal((self.d1, self.d2))
        return J, G, delta, W0


CASES = [
    Case("vector-d2=1", d1=7, d2=1, r=2, n=500, seed=0),
    Case("matrix-5x3", d1=5, d2=3, r=2, n=200, seed=1),
    Case("matrix-8x4-ill", d1=8, d2=4, r=3, n=1000, seed=2, cond=1e4),
    Case("wide-3x6", d1=3, d2=6, r=1, n=50, seed=3),
]
CASE_IDS = [c.id for c in CASES]
