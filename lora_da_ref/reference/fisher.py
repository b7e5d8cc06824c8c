"""Fisher representations: *which* matrix (the Fisher of vec W) separate from *how it is stored*.

The theory (Theorems 4.1/4.2) needs three things from the Fisher ``J`` of ``vec(W)``, ``W`` (d1, d2):

* ``solve(G)``            — ``unvec(J⁻¹ vec G)``, for the Fisher–gradient (Eqs. 16, 21);
* ``inverse_block_sum()`` — ``Σ_i J⁻¹_[i]``, the sum of the d2 diagonal (d1, d1) blocks of ``J⁻¹``
  (Eqs. 19, 48);
* ``to_dense()``          — the explicit (d1·d2, d1·d2) matrix, for checks.

:class:`DenseFisher` is exact (the reference); :class:`KroneckerFisher` is K-FAC's ``J ≈ Y ⊗ Z``
(Algorithm 1), with ``Y`` (d2, d2) over outputs — optionally diagonal — and ``Z`` (d1, d1) over
inputs. Kronecker order follows column-stacking ``vec``: ``vec(x gᵀ) = g ⊗ x`` (see :mod:`lora_da_ref.reference.linalg`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from scipy import linalg
from scipy.linalg import blas, lapack
from threadpoolctl import threadpool_limits

from lora_da_ref.reference.checks import as_symmetric, check_positive_int
from lora_da_ref.reference.linalg import sym, unvec, vec

__all__ = [
    "CHOLESKY_BLOCK_SIZE",
    "DPOTRF_MAX_SIZE",
    "TRTRI_THREADED_MAX_SIZE",
    "DenseFisher",
    "FisherMatrix",
    "KroneckerFisher",
    "as_fisher",
]


class FisherMatrix(ABC):
    """A symmetric positive-definite Fisher of ``vec(W)`` with ``W`` of shape (d1, d2)."""

    d1: int
    d2: int

    @abstractmethod
    def solve(self, G: np.ndarray) -> np.ndarray:
        """``unvec(J⁻¹ vec(G))`` for ``G`` (d1, d2)."""

    @abstractmethod
    def inverse_block_sum(self) -> np.ndarray:
        """``Σ_{i=1..d2} J⁻¹_[i]`` (d1, d1), Eqs. (19)/(48)."""

    @abstractmethod
    def to_dense(self) -> np.ndarray:
        """The explicit (d1·d2, d1·d2) matrix."""

    def _check_G(self, G: np.ndarray) -> np.ndarray:
        G = np.asarray(G, dtype=np.float64)
        if G.shape != (self.d1, self.d2):
            raise ValueError(f"G must have shape ({self.d1}, {self.d2}) to match J, got {G.shape}")
        return G


# The NumPy/SciPy wheels bundle OpenBLAS (0.3.30 in SciPy's, 0.3.31 in NumPy's) whose threaded
# SYRK driver segfaults on large outputs with the SkylakeX kernels, 2 threads (backtrace:
# dgemm_oncopy_SKYLAKEX ← inner_thread ← dsyrk_thread_UT ← dpotrf_U_parallel). Measured on the
# 2-core development machine, each size in a fresh subprocess: scipy.linalg.cholesky,
# numpy.linalg.cholesky and lapack.dpotrf (upper) all die with SIGSEGV at n = 16384; dpotrf
# succeeds at n = 12000, 13000 and 14000; dsyrk alone dies at n = 16384 (k = 1024; not at k ≤ 512)
# and succeeds at n = 15000 (k = 1024), 12288 (k = 4096), 8192 (k = 8192), 2048 (k = 14336). One
# BLAS thread, or the Haswell kernels, factorise n = 16384. dpotrf runs as one LAPACK call only up
# to DPOTRF_MAX_SIZE, half the smallest crashing size; above it, DenseFisher factorises by blocks.
DPOTRF_MAX_SIZE = 8192
# Block of the blocked Cholesky: every dpotrf and every SYRK output is CHOLESKY_BLOCK_SIZE at most
# (a quarter of the crashing size). One BLAS thread, n = 16384, CPU seconds on the loaded machine
# (indicative): one dpotrf call 29.5; blocks of 2048 39.2, 4096 33.2, 8192 35.2.
CHOLESKY_BLOCK_SIZE = 4096
# Largest n at which the threaded dtrtri (triangular inverse, both triangles) was measured to
# succeed on the same machine (75–81 s loaded). Above it, inverse_block_sum runs dtrtri on one
# BLAS thread: the crashes of this class need several threads, and larger sizes were not measured.
TRTRI_THREADED_MAX_SIZE = 16384


class DenseFisher(FisherMatrix):
    """The exact Fisher as a dense SPD (d1·d2, d1·d2) matrix, factorised once by Cholesky.

    The factor is stored upper, ``J = UᵀU`` with ``U = Lᵀ`` (:attr:`cholesky_factor` is the lower
    ``L``), computed from ``J``'s lower triangle like ``scipy.linalg.cholesky(J, lower=True)``.
    Up to :data:`DPOTRF_MAX_SIZE` it is one LAPACK ``dpotrf`` call. Above, the bundled OpenBLAS's
    threaded ``dpotrf`` segfaults (n = 16384 on 2 threads, see the constant), so the factor is
    computed by a left-looking blocked Cholesky, exact in float64 and equal to LAPACK's to
    round-off: for each block column ``k`` of width ``b`` (:data:`CHOLESKY_BLOCK_SIZE`),
    ``U_kk = chol(J_kk − U_:k,kᵀ U_:k,k)`` (``dsyrk`` b × b, ``dpotrf`` b × b) and
    ``U_k,rest = U_kk⁻ᵀ (J_k,rest − U_:k,kᵀ U_:k,rest)`` (``gemm``, ``dtrsm``). All of it is level-3
    BLAS on both cores; no ``dpotrf`` and no SYRK output is larger than ``b``. The alternative,
    one ``dpotrf`` on one BLAS thread, factorises n = 16384 too but leaves a core idle
    (docs/benchmarks.md, "Exact reference at large sizes").

    Args:
        J: (d1·d2, d1·d2) symmetric positive definite; only its lower triangle is factorised.
        cholesky_block: block size of the factorisation; ``None`` = automatic (one call up to
            :data:`DPOTRF_MAX_SIZE`, else :data:`CHOLESKY_BLOCK_SIZE`). A small value forces the
            blocked path on a small J (the tests).
    """

    def __init__(
        self, J: np.ndarray, d1: int, d2: int, *, cholesky_block: int | None = None
    ) -> None:
        self.d1, self.d2 = check_positive_int("d1", d1), check_positive_int("d2", d2)
        self.J = as_symmetric("J", J, size=self.d1 * self.d2)
        n = self.J.shape[0]
        if cholesky_block is None:
            cholesky_block = n if n <= DPOTRF_MAX_SIZE else CHOLESKY_BLOCK_SIZE
        self.cholesky_block = min(check_positive_int("cholesky_block", cholesky_block), n)
        if self.cholesky_block > DPOTRF_MAX_SIZE:
            raise ValueError(
                f"cholesky_block must be <= DPOTRF_MAX_SIZE = {DPOTRF_MAX_SIZE}, "
                f"got {self.cholesky_block}"
            )
        self._U = _blocked_cholesky_upper(self.J, self.cholesky_block)  # J = UᵀU, F-order
        self._block_sum: np.ndarray | None = None

    @property
    def cholesky_factor(self) -> np.ndarray:
        """The lower Cholesky factor ``L`` (n, n), ``J = L Lᵀ`` (a read-only view of ``Uᵀ``)."""
        L = self._U.T
        L.flags.writeable = False
        return L

    def solve(self, G: np.ndarray) -> np.ndarray:
        x = linalg.cho_solve((self._U, False), vec(self._check_G(G)), check_finite=False)
        return unvec(x, self.d1, self.d2)

    def inverse_block_sum(self) -> np.ndarray:
        # J⁻¹ = U⁻¹U⁻ᵀ, so block i of J⁻¹ is R_i R_iᵀ with R_i the rows i·d1…(i+1)·d1 of U⁻¹
        # (zero left of column i·d1). Summing R_i R_iᵀ never forms J⁻¹: ~n³/3 flops for the
        # triangular inverse, ~n²·d1 for the sum.
        if self._block_sum is None:
            n, d1, b = self._U.shape[0], self.d1, self.cholesky_block
            if n <= TRTRI_THREADED_MAX_SIZE:
                Uinv, info = lapack.dtrtri(self._U, lower=0)  # (n, n) upper, F-order
            else:
                with threadpool_limits(1, user_api="blas"):
                    Uinv, info = lapack.dtrtri(self._U, lower=0)
            if info != 0:
                raise ValueError(f"triangular inverse of chol(J) failed (LAPACK info={info})")
            total = np.zeros((d1, d1))
            for i in range(self.d2):
                R = Uinv[i * d1 : (i + 1) * d1, i * d1 :]  # (d1, n − i·d1)
                # Output rows in chunks of b: NumPy turns R @ Rᵀ into a SYRK, kept at b × b.
                # R is upper triangular from its left edge: row a is zero left of column a.
                for a in range(0, d1, b):
                    total[a : a + b] += R[a : a + b, a:] @ R[:, a:].T
            self._block_sum = sym(total)
        return self._block_sum

    def to_dense(self) -> np.ndarray:
        return self.J


def _blocked_cholesky_upper(J: np.ndarray, block: int) -> np.ndarray:
    """Upper ``U`` (F-order), ``J = UᵀU``, from ``J``'s lower triangle; left-looking, blocks of ``block``.

    ``J.T`` is ``J`` read in Fortran order, so the copy below is a plain memory copy and its upper
    triangle is ``J``'s lower one. With ``block ≥ n`` this is one ``dpotrf`` call.
    """
    n = J.shape[0]
    U = np.array(J.T, order="F")  # (n, n); upper triangle = J's lower triangle
    for k in range(0, n, block):
        e = min(k + block, n)
        if k > 0:  # subtract the contribution of the rows above: U_:k,kᵀ U_:k,(k…n)
            Uk = U[:k, k:e]  # (k, b)
            U[k:e, k:e] = blas.dsyrk(-1.0, Uk, beta=1.0, c=U[k:e, k:e], trans=1, lower=0)
            if e < n:
                U[k:e, e:] -= (U[:k, e:].T @ Uk).T  # (b, n − e); gemm
        # dpotrf works in place when the block is contiguous (one block), else on a copy.
        Ukk, info = lapack.dpotrf(U[k:e, k:e], lower=0, clean=1, overwrite_a=1)
        if info > 0:
            raise ValueError(
                "J must be positive definite (Cholesky factorisation failed: the leading minor "
                f"of order {k + info} is not positive)"
            )
        if info < 0:
            raise ValueError(f"Cholesky factorisation of J failed (LAPACK info={info})")
        if not np.may_share_memory(Ukk, U):
            U[k:e, k:e] = Ukk
        if e < n:
            U[e:, k:e] = 0.0  # below the diagonal block: J's upper triangle, not part of U
            U[k:e, e:] = linalg.solve_triangular(
                Ukk, U[k:e, e:], trans="T", lower=False, check_finite=False
            )  # U_kk⁻ᵀ (…); dtrsm
    return U


class KroneckerFisher(FisherMatrix):
    """K-FAC Fisher ``J = Y ⊗ Z`` (Algorithm 1).

    Args:
        Y: (d2, d2) SPD output factor ``E[g gᵀ]``, or a (d2,) positive vector for a diagonal ``Y``
            (the official code keeps only diag Y).
        Z: (d1, d1) SPD input factor ``E[x xᵀ]``.

    Then ``J⁻¹_[i] = [Y⁻¹]_ii Z⁻¹``, ``Σ_i J⁻¹_[i] = tr(Y⁻¹) Z⁻¹`` and ``J⁻¹ vec G = vec(Z⁻¹ G Y⁻¹)``.
    """

    def __init__(self, Y: np.ndarray, Z: np.ndarray) -> None:
        self.Z = as_symmetric("Z", Z)
        self.d1 = self.Z.shape[0]
        Y = np.asarray(Y, dtype=np.float64)
        self.diagonal_Y = Y.ndim == 1
        if self.diagonal_Y:
            if not (np.all(np.isfinite(Y)) and np.all(Y > 0)):
                raise ValueError("diagonal Y must be finite and strictly positive")
            self.Y = Y
        else:
            self.Y = as_symmetric("Y", Y)
        self.d2 = self.Y.shape[0]
        self._Z_chol = _cholesky("Z", self.Z)
        self._Y_chol = None if self.diagonal_Y else _cholesky("Y", self.Y)

    def _Y_inv(self) -> np.ndarray:
        if self.diagonal_Y:
            return np.diag(1.0 / self.Y)
        return linalg.cho_solve((self._Y_chol, True), np.eye(self.d2))

    def solve(self, G: np.ndarray) -> np.ndarray:
        ZinvG = linalg.cho_solve((self._Z_chol, True), self._check_G(G))  # (d1, d2)
        if self.diagonal_Y:
            return ZinvG / self.Y  # Z⁻¹ G Y⁻¹ with diagonal Y
        return linalg.cho_solve((self._Y_chol, True), ZinvG.T).T  # (d1, d2); Y symmetric

    def inverse_block_sum(self) -> np.ndarray:
        Zinv = linalg.cho_solve((self._Z_chol, True), np.eye(self.d1))  # (d1, d1)
        return sym(np.trace(self._Y_inv()) * Zinv)

    def to_dense(self) -> np.ndarray:
        Y = np.diag(self.Y) if self.diagonal_Y else self.Y
        return np.kron(Y, self.Z)


def _cholesky(name: str, M: np.ndarray) -> np.ndarray:
    try:
        return linalg.cholesky(M, lower=True)
    except linalg.LinAlgError as err:
        raise ValueError(
            f"{name} must be positive definite (Cholesky factorisation failed)"
        ) from err


def as_fisher(J: np.ndarray | FisherMatrix, d1: int, d2: int) -> FisherMatrix:
    """Wrap a dense ``J`` as :class:`DenseFisher`; check a representation's sizes against (d1, d2)."""
    if isinstance(J, FisherMatrix):
        if (J.d1, J.d2) != (d1, d2):
            raise ValueError(f"J is for W of shape ({J.d1}, {J.d2}), expected ({d1}, {d2})")
        return J
    return DenseFisher(J, d1, d2)
