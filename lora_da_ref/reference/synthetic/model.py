"""Common interface of the synthetic models: GLMs ``p(y | x; W)`` whose mean/logits are ``f = Wᵀx``.

Conventions (see :mod:`lora_da_ref.reference.linalg`): ``W`` is ``(d1, d2)`` = ``(d_in, d_out)``; ``vec`` stacks
columns; data are stored row-wise, ``X`` is ``(n, d1)`` and the logits of all samples are
``F = X W``, ``(n, d2)``.

Every model here has a canonical link, so with the *output residual*
``e(x, y) = ∂ log p(y | x; W) / ∂f`` (a ``d2``-vector) and the *output Fisher*
``Λ(x) = E_{y|x}[e eᵀ] = −∂² log p / ∂f ∂fᵀ`` (``d2 × d2``, independent of ``y``):

* per-sample score (Eq. (4)): ``s = vec(x eᵀ) = e ⊗ x``;
* Fisher (Eq. (4)): ``J(W) = E_x[Λ(x) ⊗ x xᵀ]``, the expectation over ``y | x`` taken in closed form;
* Hessian of the mean NLL on a sample: ``H = (1/n) Σ_n Λ(x_n) ⊗ x_n x_nᵀ`` (exact, not Gauss–Newton,
  because the link is canonical).

``E_x`` is the uniform average over the model's design pool (``inputs.design_pool``), so the
population Fisher is exact. A concrete model only supplies the four maps ``F ↦ NLL terms, e, Λ,
labels`` and a label validator; everything else (gradients, Fishers, the (constrained) MLE) is
here, the MLE by the Newton solver of :mod:`lora_da_ref.reference.synthetic.mle`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from lora_da_ref.reference.checks import as_array, check_generator, check_positive_int
from lora_da_ref.reference.linalg import kron_average, sym
from lora_da_ref.reference.synthetic.inputs import InputKind, design_pool
from lora_da_ref.reference.synthetic.mle import DEFAULT_MAX_ITER, newton_constrained_mle

__all__ = ["SyntheticModel"]


class SyntheticModel(ABC):
    """A GLM ``p(y | x; W)`` with logits ``f = Wᵀx`` and x uniform on a fixed design pool.

    Args:
        d1: input dimension (rows of ``W``).
        d2: output dimension (columns of ``W``).
        seed: seed of the design pool (and of any fixed model constants).
        pool_size: number ``M`` of design-pool points.
        input_kind: latent distribution of the pool, ``"laplace"`` or ``"uniform"``.
        spectrum_decay: ``E[x xᵀ]`` has spectrum ``k^(−spectrum_decay)``.
    """

    def __init__(
        self,
        d1: int,
        d2: int,
        *,
        seed: int = 0,
        pool_size: int = 4096,
        input_kind: InputKind = "laplace",
        spectrum_decay: float = 1.0,
    ) -> None:
        self.d1 = check_positive_int("d1", d1)
        self.d2 = check_positive_int("d2", d2)
        self.seed = check_positive_int("seed", seed, minimum=0)
        self.input_kind = input_kind
        self.spectrum_decay = spectrum_decay
        self.pool = design_pool(
            self.d1, pool_size, seed=self.seed, kind=input_kind, decay=spectrum_decay
        )  # (M, d1), read-only

    # ---- model-specific maps of the logits F = X W, shape (n, d2) --------------------------------
    @abstractmethod
    def _nll_terms(self, F: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Per-sample ``−log p(y_n | x_n)``, shape ``(n,)``."""

    @abstractmethod
    def _residuals(self, F: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """``e_n = ∂ log p(y_n | x_n) / ∂f``, shape ``(n, d2)``."""

    @abstractmethod
    def _output_fisher(self, F: np.ndarray) -> np.ndarray:
        """``Λ_n = E_{y|x_n}[e eᵀ] = −∂² log p / ∂f²``, shape ``(n, d2, d2)``."""

    @abstractmethod
    def _draw_labels(self, F: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``y_n ~ p(· | x_n)``."""

    @abstractmethod
    def _check_labels(self, Y: object, n: int) -> np.ndarray:
        """Validate labels for ``n`` samples (ValueError naming the problem)."""

    def _repr_extra(self) -> str:
        return ""

    # ---- shapes ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(d1, d2)`` of ``W``."""
        return (self.d1, self.d2)

    @property
    def n_params(self) -> int:
        """``d1·d2``, the size of ``vec(W)`` and of each side of the Fisher."""
        return self.d1 * self.d2

    @property
    def pool_size(self) -> int:
        """Number ``M`` of design-pool points."""
        return self.pool.shape[0]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(d1={self.d1}, d2={self.d2}{self._repr_extra()}, "
            f"seed={self.seed}, pool_size={self.pool_size}, input_kind={self.input_kind!r}, "
            f"spectrum_decay={self.spectrum_decay})"
        )

    # ---- validation -----------------------------------------------------------------------------
    def _check_W(self, W: object, name: str = "W") -> np.ndarray:
        return as_array(name, W, self.shape)

    def _check_data(self, X: object, Y: object) -> tuple[np.ndarray, np.ndarray]:
        X = as_array("X", X, (None, self.d1))
        if X.shape[0] < 1:
            raise ValueError("X must hold at least one sample (got n = 0)")
        return X, self._check_labels(Y, X.shape[0])

    # ---- data ---------------------------------------------------------------------------------
    def random_weight(self, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
        """A random ``W`` (d1, d2) whose logits have standard deviation ≈ ``scale`` on the pool.

        Entries are i.i.d. ``N(0, scale² / tr E[x xᵀ])``.
        """
        check_generator(rng)
        if not np.isfinite(scale) or scale < 0:
            raise ValueError(f"scale must be finite and >= 0, got {scale!r}")
        tr_Z = float(np.mean(np.sum(self.pool**2, axis=1)))
        return scale / np.sqrt(tr_Z) * rng.standard_normal(self.shape)  # (d1, d2)

    def sample(
        self, W: np.ndarray, n: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` i.i.d. pairs ``(x, y)``: ``x`` uniform on the pool, ``y ~ p(· | x; W)`` (Eq. (9)).

        Args:
            W: the parameter ``W`` (d1, d2) of the data-generating model (``W_tgt`` in Eq. (9)).
            n: number of samples ``N``.
            rng: the random generator.

        Returns:
            ``X`` (n, d1) and ``Y`` (labels; shape depends on the model).
        """
        W = self._check_W(W)
        n = check_positive_int("n", n)
        check_generator(rng)
        X = self.pool[rng.integers(0, self.pool_size, size=n)]  # (n, d1), a fresh copy
        return X, self._draw_labels(X @ W, rng)

    # ---- likelihood -----------------------------------------------------------------------------
    def nll(self, W: np.ndarray, X: np.ndarray, Y: np.ndarray) -> float:
        """Mean negative log-likelihood ``L(W) = −(1/n) Σ_n log p(y_n | x_n; W)`` (Eq. (10)).

        Args:
            W: parameter ``W`` (d1, d2). X: inputs (n, d1). Y: labels of the n samples.
        """
        W = self._check_W(W)
        X, Y = self._check_data(X, Y)
        return float(np.mean(self._nll_terms(X @ W, Y)))

    def gradient(self, W: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Gradient ``G = ∇_W L(W) = −(1/n) Σ_n x_n e_nᵀ`` (d1, d2) of the mean NLL (Eq. (14)).

        Args:
            W: parameter ``W`` (d1, d2). X: inputs (n, d1). Y: labels of the n samples.
        """
        W = self._check_W(W)
        X, Y = self._check_data(X, Y)
        return -X.T @ self._residuals(X @ W, Y) / X.shape[0]  # (d1, d2)

    def per_sample_scores(self, W: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Rows ``s_nᵀ`` with ``s_n = ∇ vec(W) log p(y_n | x_n; W) = e_n ⊗ x_n`` (Eq. (4)), (n, d1·d2)."""
        W = self._check_W(W)
        X, Y = self._check_data(X, Y)
        E = self._residuals(X @ W, Y)  # (n, d2)
        return (E[:, :, None] * X[:, None, :]).reshape(X.shape[0], -1)  # (n, d2·d1)

    def hessian(self, W: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Hessian of the mean NLL in ``vec(W)``: ``(1/n) Σ_n Λ(x_n) ⊗ x_n x_nᵀ`` (Eq. (14), H0).

        Exact for these canonical-link models (it does not depend on the labels).

        Args:
            W: parameter ``W`` (d1, d2). X: inputs (n, d1).
        """
        W = self._check_W(W)
        X = as_array("X", X, (None, self.d1))
        return kron_average(self._output_fisher(X @ W), X)

    # ---- Fisher ---------------------------------------------------------------------------------
    def population_fisher(self, W: np.ndarray) -> np.ndarray:
        """Exact Fisher ``J(W) = E_x[Λ(x) ⊗ x xᵀ]`` of ``vec(W)`` (Eq. (4)), (d1·d2, d1·d2).

        ``E_x`` is the exact average over the design pool; ``E_{y|x}`` is taken in closed form.

        Args:
            W: parameter ``W`` (d1, d2) at which the Fisher is evaluated (``W0`` in Eq. (19)).
        """
        return self.hessian(W, self.pool)

    def empirical_fisher(self, W: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Empirical Fisher ``(1/n) Σ_n s_n s_nᵀ`` with the TRUE labels ``y_n`` (Eq. (4)).

        Args:
            W: parameter ``W`` (d1, d2). X: inputs (n, d1). Y: observed labels of the n samples.
        """
        S = self.per_sample_scores(W, X, Y)  # (n, d1·d2)
        return sym(S.T @ S / S.shape[0])

    # ---- maximum likelihood ---------------------------------------------------------------------
    def mle(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Unconstrained MLE ``Ŵ = argmin_W L(W)`` (Eq. (2)), (d1, d2).

        Raises:
            ConvergenceError: no finite unique maximiser (e.g. separable data) or Newton failed.
        """
        return self.constrained_mle(np.zeros(self.shape), np.eye(self.d1), X, Y)

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
        """Constrained MLE ``B̂ = argmin_B L(W0 + A B)`` for fixed ``A`` (Eq. (10), LoRA-FA).

        Newton's method in ``B`` with Armijo backtracking: gradient ``(I⊗A)ᵀ vec G = vec(AᵀG)``,
        Hessian ``(I⊗A)ᵀ H (I⊗A) = (1/n) Σ Λ_n ⊗ u_n u_nᵀ`` with ``u_n = Aᵀ x_n``.

        Args:
            W0: pre-trained weight ``W0`` (d1, d2).
            A: fixed LoRA factor ``A`` (d1, r) of full column rank (orthonormality not required).
            X: inputs (n, d1). Y: labels of the n samples.
            B_init: Newton's starting point (r, d2); zeros if omitted.
            max_iter: maximum number of Newton iterations.

        Returns:
            ``B̂`` (r, d2); the fitted weight is ``W0 + A B̂``.

        Raises:
            ConvergenceError: the likelihood has no finite unique maximiser in ``B`` (separable
                data, rank-deficient ``XA``) or Newton did not converge in ``max_iter`` steps.
        """
        W0, A, B, X, Y = self._check_constrained(W0, A, B_init, X, Y)
        max_iter = check_positive_int("max_iter", max_iter)
        return newton_constrained_mle(
            X @ W0,
            X @ A,
            Y,
            B,
            nll_terms=self._nll_terms,
            residuals=self._residuals,
            output_fisher=self._output_fisher,
            max_iter=max_iter,
        )

    def _check_constrained(self, W0, A, B_init, X, Y):
        W0 = self._check_W(W0, "W0")
        A = as_array("A", A, (self.d1, None))
        if A.shape[1] < 1:
            raise ValueError("A must have at least one column (rank r >= 1)")
        r = A.shape[1]
        B = np.zeros((r, self.d2)) if B_init is None else as_array("B_init", B_init, (r, self.d2))
        X, Y = self._check_data(X, Y)
        return W0, A, B, X, Y
