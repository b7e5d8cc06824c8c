"""Softmax (multinomial logistic) regression with ``K`` classes, identifiable parametrisation.

Class ``K − 1`` (zero-based) is the reference class with logit fixed at 0; ``W`` is
``(d1, K − 1)`` and holds the logits ``f = Wᵀx`` of the free classes ``0..K−2``, so
``p = softmax([f, 0])``. Writing ``p̄ = p[:K−1]`` and ``ȳ = onehot(y)[:K−1]``:

* output residual ``e = ȳ − p̄``;
* output Fisher ``Λ = diag(p̄) − p̄ p̄ᵀ`` ((K−1) × (K−1), positive definite since ``p_K > 0``);
* Fisher ``J(W) = E_x[(diag(p̄) − p̄ p̄ᵀ) ⊗ x xᵀ]`` (column-stacking vec, so the class index is the
  slow one), SPD whenever ``E[x xᵀ]`` is.

With all ``K`` columns free (``W`` of shape ``(d1, K)``) the Fisher would be singular: the softmax
is invariant under adding the same vector to every column, so ``(1_K ⊗ v)`` is a null vector for
every ``v``. That is why the reference class is fixed.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax

from lora_da_ref.reference.checks import check_class_labels, check_positive_int
from lora_da_ref.reference.synthetic.inputs import InputKind
from lora_da_ref.reference.synthetic.model import SyntheticModel

__all__ = ["SoftmaxRegression"]


class SoftmaxRegression(SyntheticModel):
    """``y | x ~ Categorical(softmax([Wᵀx, 0]))``, ``x`` uniform on the pool; ``W`` is ``(d1, K−1)``.

    Args:
        d1: input dimension.
        n_classes: number of classes ``K >= 2`` (``d2 = K − 1``).
        seed, pool_size, input_kind, spectrum_decay: see :class:`SyntheticModel`.
        Labels ``Y`` are integer arrays of shape ``(n,)`` in ``{0, …, K − 1}``.
    """

    def __init__(
        self,
        d1: int,
        n_classes: int,
        *,
        seed: int = 0,
        pool_size: int = 4096,
        input_kind: InputKind = "laplace",
        spectrum_decay: float = 1.0,
    ) -> None:
        self.n_classes = check_positive_int("n_classes", n_classes, minimum=2)
        super().__init__(
            d1,
            self.n_classes - 1,
            seed=seed,
            pool_size=pool_size,
            input_kind=input_kind,
            spectrum_decay=spectrum_decay,
        )

    def _repr_extra(self) -> str:
        return f", n_classes={self.n_classes}"

    @staticmethod
    def _full_logits(F: np.ndarray) -> np.ndarray:
        return np.concatenate([F, np.zeros((F.shape[0], 1))], axis=1)  # (n, K)

    def probabilities(self, F: np.ndarray) -> np.ndarray:
        """Class probabilities ``softmax([f, 0])`` (n, K) for logits ``F = X W`` (n, K−1)."""
        return softmax(self._full_logits(F), axis=1)

    def _nll_terms(self, F: np.ndarray, Y: np.ndarray) -> np.ndarray:
        Fk = self._full_logits(F)  # (n, K)
        return logsumexp(Fk, axis=1) - Fk[np.arange(F.shape[0]), Y]

    def _residuals(self, F: np.ndarray, Y: np.ndarray) -> np.ndarray:
        onehot = np.eye(self.n_classes)[Y, : self.d2]  # (n, K−1)
        return onehot - self.probabilities(F)[:, : self.d2]

    def _output_fisher(self, F: np.ndarray) -> np.ndarray:
        p = self.probabilities(F)[:, : self.d2]  # (n, K−1)
        return p[:, :, None] * np.eye(self.d2) - p[:, :, None] * p[:, None, :]  # (n, K−1, K−1)

    def _draw_labels(self, F: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cdf = np.cumsum(self.probabilities(F), axis=1)  # (n, K)
        y = np.sum(cdf < rng.random(F.shape[0])[:, None], axis=1)  # inverse-CDF sampling
        return np.minimum(y, self.n_classes - 1).astype(np.int64)  # guard cdf[-1] = 1 − ulp

    def _check_labels(self, Y: object, n: int) -> np.ndarray:
        return check_class_labels(Y, n, self.n_classes)
