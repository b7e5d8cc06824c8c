"""Linear-Gaussian multi-output regression ``y = Wᵀx + ε``, ``ε ~ N(0, Σ)`` with known SPD ``Σ``.

The output residual is ``e = Σ⁻¹(y − Wᵀx)`` and the output Fisher is ``Λ = Σ⁻¹`` for every ``x``,
so the Fisher factorises EXACTLY as the K-FAC form of Algorithm 1::

    J = E_x[Σ⁻¹ ⊗ x xᵀ] = Y ⊗ Z,    Y = Σ⁻¹ (d2, d2),  Z = E[x xᵀ] (d1, d1)   (column-stacking vec).

``J`` does not depend on ``W``. The (constrained) MLE is ordinary least squares, independent of Σ.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from lora_da_ref.reference.checks import as_array
from lora_da_ref.reference.linalg import random_orthonormal, sym
from lora_da_ref.reference.synthetic.inputs import InputKind
from lora_da_ref.reference.synthetic.mle import DEFAULT_MAX_ITER, ConvergenceError
from lora_da_ref.reference.synthetic.model import SyntheticModel

__all__ = ["LinearGaussian"]


class LinearGaussian(SyntheticModel):
    """``p(y | x; W) = N(y; Wᵀx, Σ)``, ``x`` uniform on the design pool.

    Args:
        d1: input dimension. d2: output dimension.
        noise_cov: the known noise covariance ``Σ`` (d2, d2), SPD. Default: a fixed random SPD
            matrix (seeded by ``seed``) with eigenvalues log-spaced in ``[0.5, 2]``.
        seed, pool_size, input_kind, spectrum_decay: see :class:`SyntheticModel`.
    """

    def __init__(
        self,
        d1: int,
        d2: int,
        *,
        noise_cov: np.ndarray | None = None,
        seed: int = 0,
        pool_size: int = 4096,
        input_kind: InputKind = "laplace",
        spectrum_decay: float = 1.0,
    ) -> None:
        super().__init__(
            d1,
            d2,
            seed=seed,
            pool_size=pool_size,
            input_kind=input_kind,
            spectrum_decay=spectrum_decay,
        )
        Sigma = self._default_cov() if noise_cov is None else self._check_cov(noise_cov)
        self.noise_cov = Sigma  # Σ, (d2, d2)
        self._chol = np.linalg.cholesky(Sigma)  # Σ = L Lᵀ, (d2, d2)
        self._prec = sym(linalg.cho_solve((self._chol, True), np.eye(self.d2)))  # Σ⁻¹
        self._logdet = 2.0 * float(np.sum(np.log(np.diag(self._chol))))

    def _default_cov(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1])  # independent of the pool's stream
        Q = random_orthonormal(self.d2, self.d2, rng)  # (d2, d2)
        return sym((Q * np.geomspace(0.5, 2.0, self.d2)) @ Q.T)

    def _check_cov(self, noise_cov: object) -> np.ndarray:
        S = as_array("noise_cov", noise_cov, (self.d2, self.d2))
        if not np.allclose(S, S.T, rtol=1e-12, atol=0.0):
            raise ValueError("noise_cov must be symmetric")
        if np.linalg.eigvalsh(S)[0] <= 0:
            raise ValueError("noise_cov must be positive definite")
        return sym(S)

    # ---- model maps ---------------------------------------------------------------------------
    def _nll_terms(self, F: np.ndarray, Y: np.ndarray) -> np.ndarray:
        R = linalg.solve_triangular(self._chol, (Y - F).T, lower=True)  # L⁻¹(y − f), (d2, n)
        return 0.5 * (np.sum(R**2, axis=0) + self._logdet + self.d2 * np.log(2 * np.pi))

    def _residuals(self, F: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return (Y - F) @ self._prec  # Σ⁻¹ (y − f) per row (Σ⁻¹ symmetric), (n, d2)

    def _output_fisher(self, F: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self._prec, (F.shape[0], self.d2, self.d2))

    def _draw_labels(self, F: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return F + rng.standard_normal(F.shape) @ self._chol.T  # rows f + L z, (n, d2)

    def _check_labels(self, Y: object, n: int) -> np.ndarray:
        return as_array("Y", Y, (n, self.d2))

    # ---- closed forms -------------------------------------------------------------------------
    def kronecker_factors(self, W: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The exact factors of ``J = Y ⊗ Z`` (Algorithm 1, step 2): ``Y = Σ⁻¹``, ``Z = E[x xᵀ]``.

        Args:
            W: accepted for interface symmetry; ``J`` does not depend on ``W``.

        Returns:
            ``(Y, Z)`` of shapes ``(d2, d2)`` and ``(d1, d1)``.
        """
        if W is not None:
            self._check_W(W)
        Z = sym(self.pool.T @ self.pool / self.pool_size)  # (d1, d1)
        return self._prec.copy(), Z

    def constrained_mle(
        self,
        W0: np.ndarray,
        A: np.ndarray,
        X: np.ndarray,
        Y: np.ndarray,
        *,
        B_init: np.ndarray | None = None,
        max_iter: int = DEFAULT_MAX_ITER,
    ) -> np.ndarray:
        """Constrained MLE (Eq. (10)) in closed form: ``B̂ = (UᵀU)⁻¹ Uᵀ(Y − X W0)``, ``U = XA``.

        Args:
            W0: pre-trained weight ``W0`` (d1, d2). A: fixed factor ``A`` (d1, r).
            X: inputs (n, d1). Y: responses (n, d2). B_init, max_iter: ignored (closed form).

        Raises:
            ConvergenceError: ``XA`` is rank-deficient, so the MLE is not unique.
        """
        W0, A, _, X, Y = self._check_constrained(W0, A, B_init, X, Y)
        U = X @ A  # (n, r)
        try:
            c = linalg.cho_factor(U.T @ U)
        except linalg.LinAlgError as exc:
            raise ConvergenceError(
                f"XA (n={U.shape[0]}, r={U.shape[1]}) is rank-deficient: the MLE is not unique"
            ) from exc
        return linalg.cho_solve(c, U.T @ (Y - X @ W0))  # (r, d2)
