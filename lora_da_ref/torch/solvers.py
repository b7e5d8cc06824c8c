"""Eigensolvers for ``min tr(AᵀΩA)`` s.t. ``AᵀA = I_r`` (Courant–Fischer, Eqs. 5–8), in torch.

Ω (Eq. 19) is symmetric and **indefinite**. Every solver returns the r smallest eigenpairs,
eigenvalues ascending, columns with a deterministic sign (largest-|entry| positive, as
:func:`lora_da_ref.eigen.fix_signs`), and diagnostics. Dispatch goes through :data:`SOLVERS`.

* ``"eigh"``   — dense and exact, O(d³): LAPACK ``syevr`` for the r + 1 smallest pairs on CPU,
  ``torch.linalg.eigh`` elsewhere.
* ``"lobpcg"`` — ``torch.lobpcg(Ω, largest=False)`` run to a tolerance, with a residual check
  ``max_j ‖Ωa_j − λ_j a_j‖ ≤ tol·‖Ω‖_F`` (and ``AᵀA ≈ I``) afterwards. Falls back to ``eigh`` —
  recorded in the diagnostics — when ``d < 3r`` (torch's LOBPCG needs ``d ≥ 3r``), when it raises,
  or when the residual check fails.
  torch documents LOBPCG for SPD input, but its Rayleigh–Ritz steps only need symmetry (B = I).
  Measured on indefinite Ω (d = 64…512, float32/64): unshifted LOBPCG meets the residual check;
  shifting by ``c = ‖Ω‖_F`` (``shift=True``) makes torch's own stopping rule, which is relative to
  ``‖Ω + cI‖``, stop before our check passes, so the shift is off by default.
  ``official=True`` reproduces the official code instead: unshifted Ω, a seeded random orthonormal
  start, ``niter`` (10) iterations, no convergence check and no fallback except ``d < 3r``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._lobpcg import LOBPCG as _TorchLOBPCG  # the worker torch.lobpcg runs

from lora_da_ref.torch.blas import syevr_smallest

__all__ = [
    "SOLVERS",
    "EigenResult",
    "eigh_solver",
    "fix_signs",
    "layer_seed",
    "lobpcg_solver",
    "relative_residual",
    "smallest_eigenpairs",
    "smallest_eigvecs",
]

LOBPCG_DEFAULT_NITER = 200  # LOBPCG typically converges in tens of iterations on these sizes
OFFICIAL_NITER = 10  # conf/lora_da.yaml: lobpcg_niter


# Relative-residual tolerances: float32 ≈ 100·eps (measured floor ≈ 3e-6 at d ≤ 512);
# float64 ≈ √eps (torch.lobpcg's own default).
DEFAULT_TOL = {torch.float32: 1e-5, torch.float64: 1e-8}


def default_tol(dtype: torch.dtype) -> float:
    """Default LOBPCG tolerance of a dtype (:data:`DEFAULT_TOL`, √eps for others)."""
    return DEFAULT_TOL.get(dtype, torch.finfo(dtype).eps ** 0.5)


class EigenResult(tuple):
    """r smallest eigenpairs of a symmetric Ω: the pair ``(eigenvalues, vectors)``, as the NumPy
    reference's :func:`lora_da_ref.eigen.smallest_eigenpairs` returns, plus the solver's record.

    ``values, vectors = smallest_eigenpairs(omega, r)`` reads the same on both sides.

    Attributes:
        eigenvalues: (r,) ascending (item 0).
        vectors: (d, r) orthonormal columns, deterministic signs (item 1).
        diagnostics: ``solver`` (the one that produced the result), ``iterations``, ``residual``
            (max_j ‖Ωa_j − λ_j a_j‖ / ‖Ω‖_F), ``fallback`` (reason or None), ``shift``, and for
            ``eigh`` the eigengap ``gap`` = λ_{r+1} − λ_r.
    """

    diagnostics: dict[str, Any]

    def __new__(
        cls, eigenvalues: Tensor, vectors: Tensor, diagnostics: dict[str, Any] | None = None
    ) -> EigenResult:
        self = super().__new__(cls, (eigenvalues, vectors))
        self.diagnostics = {} if diagnostics is None else diagnostics
        return self

    def __getnewargs__(self) -> tuple[Tensor, Tensor, dict[str, Any]]:
        return (self[0], self[1], self.diagnostics)

    @property
    def eigenvalues(self) -> Tensor:
        return self[0]

    @property
    def vectors(self) -> Tensor:
        return self[1]


def fix_signs(vectors: Tensor) -> Tensor:
    """Flip each column so that its largest-magnitude entry is positive (determinism only)."""
    idx = vectors.abs().argmax(dim=0)  # (r,)
    signs = vectors[idx, torch.arange(vectors.shape[1], device=vectors.device)].sign()
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return vectors * signs


def relative_residual(omega: Tensor, values: Tensor, vectors: Tensor) -> float:
    """``max_j ‖Ω a_j − λ_j a_j‖₂ / ‖Ω‖_F`` (‖Ω‖_F ≥ ‖Ω‖₂, so this under-states nothing twice)."""
    R = omega @ vectors - vectors * values  # (d, r)
    scale = float(torch.linalg.matrix_norm(omega)) or 1.0
    return float(R.norm(dim=0).max()) / scale


def eigh_solver(omega: Tensor, r: int, **_: Any) -> EigenResult:
    """Dense symmetric eigen-solve: the exact r smallest eigenpairs (Eqs. 5–8).

    On CPU, LAPACK's ``syevr`` for the r + 1 smallest pairs only (as ``scipy.linalg.eigh`` with
    ``subset_by_index``, called without the GIL: :func:`lora_da_ref.torch.blas.syevr_smallest`):
    the same Householder tridiagonalisation as a full ``eigh`` but no
    back-transformation of the other eigenvectors, 3–4× faster at d = 1536 (measured 0.26 s vs
    0.97 s, one thread). Elsewhere (CUDA) ``torch.linalg.eigh`` of the full spectrum.
    """
    spectrum, vectors = _dense_smallest(omega, min(r + 1, omega.shape[0]))  # ascending
    values, vectors = spectrum[:r], fix_signs(vectors[:, :r])
    diag = {"solver": "eigh", "iterations": None, "fallback": None, "shift": 0.0}
    # λ_{r+1} − λ_r: how well the r-dimensional subspace is determined (Davis–Kahan)
    diag["gap"] = float(spectrum[r] - spectrum[r - 1]) if r < omega.shape[0] else math.inf
    diag["residual"] = relative_residual(omega, values, vectors)
    return EigenResult(values, vectors, diag)


def _dense_smallest(omega: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest eigenpairs of symmetric ``omega`` (ascending), dense and exact."""
    smallest = syevr_smallest(omega.detach(), k)  # CPU: LAPACK syevr, without the GIL
    if smallest is not None:
        return smallest
    spectrum, vectors = torch.linalg.eigh(omega)
    return spectrum[:k], vectors[:, :k]


def lobpcg_solver(
    omega: Tensor,
    r: int,
    *,
    seed: int = 0,
    niter: int | None = None,
    tol: float | None = None,
    official: bool = False,
    shift: bool = False,
) -> EigenResult:
    """LOBPCG for the r smallest eigenpairs of symmetric Ω (Algorithm 1, step 3).

    Args:
        omega: symmetric (d, d) Ω.
        r: number of eigenpairs.
        seed: seeds the random orthonormal start (a private generator; global RNG untouched).
        niter: maximum iterations (default 200; official 10).
        tol: convergence tolerance of both torch's criterion and our residual check
            (default :data:`DEFAULT_TOL`).
        official: reproduce the official code (no shift, no check, no fallback but d < 3r).
        shift: solve ``Ω + ‖Ω‖_F·I`` (PSD) instead of Ω (off: see the module docstring);
            ignored when ``official``.
    """
    d = omega.shape[0]
    if d < 3 * r:
        return _fallback(omega, r, f"d = {d} < 3r = {3 * r} (torch.lobpcg needs d >= 3r)")
    niter = (OFFICIAL_NITER if official else LOBPCG_DEFAULT_NITER) if niter is None else niter
    tol = default_tol(omega.dtype) if tol is None else tol
    c = 0.0 if official or not shift else float(torch.linalg.matrix_norm(omega))
    X0 = random_start(d, r, seed, omega)
    try:
        values, vectors, iterations = _run_lobpcg(omega, c, X0, niter, tol)
    except (torch.linalg.LinAlgError, RuntimeError, ValueError) as err:
        return _fallback(omega, r, f"torch.lobpcg raised {type(err).__name__}: {err}")
    order = torch.argsort(values)
    values, vectors = values[order], fix_signs(vectors[:, order])
    residual = relative_residual(omega, values, vectors)
    diag = {"solver": "lobpcg", "iterations": iterations, "residual": residual, "shift": c}
    diag |= {"fallback": None, "official": official, "tol": tol, "niter": niter}
    if not official and not _converged(residual, vectors, tol):
        return _fallback(omega, r, f"LOBPCG residual {residual:.3g} > tol {tol:.3g}", diag)
    return EigenResult(values, vectors, diag)


def _run_lobpcg(
    omega: Tensor, c: float, X0: Tensor, niter: int, tol: float
) -> tuple[Tensor, Tensor, int]:
    A = omega + c * torch.eye(omega.shape[0], dtype=omega.dtype, device=omega.device)
    values, vectors, iterations = torch_lobpcg(A, X0, niter, tol)
    return values - c, vectors, iterations


def torch_lobpcg(A: Tensor, X0: Tensor, niter: int, tol: float) -> tuple[Tensor, Tensor, int]:
    """``torch.lobpcg(A, k=X0.shape[1], X=X0, niter=niter, tol=tol, largest=False)`` (method
    ``"ortho"``, torch's default parameters) and the number of iterations it ran.

    The same worker that ``torch.lobpcg`` builds (``torch._lobpcg.LOBPCG``, same parameters:
    bit-identical results, ``tests/test_torch_solvers.py``), built here so that no tracker is
    needed to count the iterations: ``torch.lobpcg`` switches a tracker on by assigning the
    class attribute ``LOBPCG.call_tracker`` and off when it returns, so a call finishing in
    another thread silenced this one's tracker (seen: "iterations" 9 instead of 10 with layers
    solved side by side), and calls had to be serialised. Without it, layers' LOBPCG solves run
    side by side (its matrix products release the GIL)."""
    if A.requires_grad:
        raise ValueError("torch_lobpcg: A must not require grad (detach it)")
    m, n = A.shape[-1], X0.shape[-1]
    if m < 3 * n:
        raise ValueError(f"LOBPCG needs d >= 3k, got d = {m}, k = {n}")
    iparams = {"m": m, "n": n, "k": n, "niter": niter, "ortho_i_max": 3, "ortho_j_max": 3}
    fparams = {"tol": tol, "ortho_tol": tol, "ortho_tol_drop": tol, "ortho_tol_replace": tol}
    bparams = {"largest": False, "ortho_use_drop": False}
    worker = _TorchLOBPCG(A, None, X0, None, iparams, fparams, bparams, "ortho", None)
    worker.run()
    return worker.E[:n], worker.X[:, :n], int(worker.ivars["istep"])


def _converged(residual: float, vectors: Tensor, tol: float) -> bool:
    eye = torch.eye(vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    ortho = float(torch.linalg.matrix_norm(vectors.mT @ vectors - eye))
    return math.isfinite(residual) and residual <= tol and ortho <= math.sqrt(tol)


def random_start(d: int, r: int, seed: int, like: Tensor) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(d, r, generator=gen, dtype=torch.float64)  # CPU draw: same on every device
    Q, _ = torch.linalg.qr(X)  # (d, r)
    return Q.to(dtype=like.dtype, device=like.device)


def _fallback(
    omega: Tensor, r: int, reason: str, tried: dict[str, Any] | None = None
) -> EigenResult:
    result = eigh_solver(omega, r)
    result.diagnostics["fallback"] = f"eigh used: {reason}"
    if tried is not None:
        result.diagnostics["lobpcg"] = tried
    return result


Solver = Callable[..., EigenResult]
SOLVERS: dict[str, Solver] = {"eigh": eigh_solver, "lobpcg": lobpcg_solver}


def smallest_eigenpairs(
    omega: Tensor, r: int, *, solver: str = "eigh", **options: Any
) -> EigenResult:
    """The r smallest eigenpairs of symmetric Ω, Eqs. (5)–(8), by a solver of :data:`SOLVERS`.

    Args:
        omega: Ω (d, d), symmetric, possibly indefinite.
        r: rank, ``1 ≤ r ≤ d``.
        solver: key of :data:`SOLVERS`.
        options: passed to the solver (``seed``, ``niter``, ``tol``, ``official``, ``shift``).
    """
    _check_omega(omega)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= omega.shape[0]:
        raise ValueError(f"r must be an integer with 1 <= r <= d = {omega.shape[0]}, got {r!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[solver](omega, r, **options)


def smallest_eigvecs(omega: Tensor, r: int, *, solver: str = "eigh", **options: Any) -> Tensor:
    """A* = [u1 … ur] (d, r), minimiser of ``tr(AᵀΩA)`` over ``AᵀA = I_r``, Eqs. (5)–(8).

    Unique only up to ``A*·Q`` (Q orthogonal): compare results as subspaces.
    """
    return smallest_eigenpairs(omega, r, solver=solver, **options).vectors


def _check_omega(omega: object) -> None:
    if not isinstance(omega, Tensor):
        raise TypeError(f"omega must be a torch.Tensor, got {type(omega).__name__}")
    if omega.ndim != 2 or omega.shape[0] != omega.shape[1]:
        raise ValueError(f"omega must be a square matrix, got shape {tuple(omega.shape)}")
    if not bool(torch.isfinite(omega).all()):
        raise ValueError("omega contains non-finite values (nan or inf)")


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed, stable across processes (no Python hash randomisation)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)
