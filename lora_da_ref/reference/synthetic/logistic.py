"""Binary logistic regression (``d2 = 1``), the setting of Theorem 4.1.

``p(y = 1 | x; W) = σ(f)``, ``f = Wᵀx`` (a scalar, ``W`` is ``(d1, 1)``), labels ``y ∈ {0, 1}``.
Output residual ``e = y − σ(f)``, output Fisher ``Λ = σ(f)(1 − σ(f))``, so
``J(W) = E_x[σ(1 − σ) x xᵀ]`` (d1, d1).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from lora_da_ref.reference.checks import check_class_labels
from lora_da_ref.reference.synthetic.inputs import InputKind
from lora_da_ref.reference.synthetic.model import SyntheticModel

__all__ = ["LogisticRegression"]


class LogisticRegression(SyntheticModel):
    """``y | x ~ Bernoulli(σ(Wᵀx))``, ``x`` uniform on the design pool; ``W`` is ``(d1, 1)``.

    Args:
        d1: input dimension. seed, pool_size, input_kind, spectrum_decay: see
            :class:`SyntheticModel`. Labels ``Y`` are integer arrays of shape ``(n,)`` in {0, 1}.
    """

    def __init__(
        self,
        d1: int,
        *,
        seed: int = 0,
        pool_size: int = 4096,
        input_kind: InputKind = "laplace",
        spectrum_decay: float = 1.0,
    ) -> None:
        super().__init__(
            d1,
            1,
            seed=seed,
            pool_size=pool_size,
            input_kind=input_kind,
            spectrum_decay=spectrum_decay,
        )

    def __repr__(self) -> str:
        return super().__repr__().replace(", d2=1", "")

    def _nll_terms(self, F: np.ndarray, Y: np.ndarray) -> np.ndarray:
        # −log p = softplus(f) − y f = softplus((1 − 2y) f), stable for both signs.
        return np.logaddexp(0.0, (1.0 - 2.0 * Y) * F[:, 0])

    def _residuals(self, F: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return (Y - expit(F[:, 0]))[:, None]  # (n, 1)

    def _output_fisher(self, F: np.ndarray) -> np.ndarray:
        p = expit(F)  # (n, 1)
        return (p * (1.0 - p))[:, :, None]  # (n, 1, 1)

    def _draw_labels(self, F: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return (rng.random(F.shape[0]) < expit(F[:, 0])).astype(np.int64)  # (n,)

    def _check_labels(self, Y: object, n: int) -> np.ndarray:
        return check_class_labels(Y, n, 2)
