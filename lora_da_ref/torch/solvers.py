"""Eigensolvers for ``min tr(AᵀΩA)`` s.t. ``AᵀA = I_r`` (Courant–Fischer, Eqs. 5–8), in torch.

Ω (Eq. 19) is symmetric and **indefinite**. Every solver returns the r smallest eigenpairs,
eigenvalues ascending, columns with a deterministic sign (largest-|entry| positive, as
:func:`lora_da_ref.reference.eigen.fix_signs`), and diagnostics. Dispatch goes through :data:`SOLVERS`.

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
* ``"auto"`` (the default) — ``"eigh"`` below :data:`AUTO_CERTIFIED_MIN_DIM`, ``"certified"``
  from there (:func:`auto_solver`): the size where the certified solver wins was measured.
* ``"certified"`` — block LOBPCG of our own (float64, r + guard vectors, matrix products with Ω
  only), stopped when a Davis–Kahan bound on the largest principal angle to the exact
  eigenspace is ≤ ``tol_angle`` (1e-3 rad), else ``eigh`` once a matvec budget (a fifth of
  eigh's flops) is spent: :func:`certified_solver`, :func:`subspace_certificate`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch._lobpcg import LOBPCG as _TorchLOBPCG  # the worker torch.lobpcg runs

from lora_da_ref.torch.blas import syevr_smallest

__all__ = [
    "AUTO_CERTIFIED_MIN_DIM",
    "DEFAULT_SOLVER",
    "SOLVERS",
    "BlockRun",
    "EigenResult",
    "auto_solver",
    "block_lobpcg",
    "certified_solver",
    "eigh_solver",
    "fix_signs",
    "layer_seed",
    "lobpcg_solver",
    "matvec_rounding",
    "relative_residual",
    "smallest_eigenpairs",
    "smallest_eigvecs",
    "subspace_certificate",
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
    reference's :func:`lora_da_ref.reference.eigen.smallest_eigenpairs` returns, plus the solver's record.

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


# ----------------------------------------------------------------------------- certified solver

CERTIFIED_TOL_ANGLE = 1e-3  # rad: the accuracy asked of the default solver (eigensolver study)
# the matvec budget as a fraction of dense eigh's flops, (4/3)d³ = (2/3)d products with a vector
CERTIFIED_BUDGET = 0.2
CERTIFIED_MIN_GUARD = 8  # guard vectors: max(r, 8) — see certified_solver
# below a budget of this many iterations eigh is cheaper than trying: SmolLM2-like spectra need
# 7–10 at d = 4096 (docs/validation.md, "Certified solver"); the default budget allows 8 from
# d ≈ 1100 at r = 8
CERTIFIED_MIN_ITERATIONS = 8


@dataclass
class BlockRun:
    """State of :func:`block_lobpcg` when it stopped (rows are vectors: ``X`` is (m, d)).

    Attributes:
        values: (m,) Ritz values, ascending.
        X: (m, d) orthonormal Ritz vectors (rows), ``AX = X @ Ω`` (= (ΩXᵀ)ᵀ, Ω symmetric).
        iterations: LOBPCG iterations run (the Rayleigh–Ritz on the start not counted).
        matvecs: products of Ω with one vector, start and verifications included.
        certificate: the last :func:`subspace_certificate` computed (fresh products).
        stop: why it stopped: ``"certified"``, ``"budget"`` or ``"iterations"``.
        history: ``(iteration, matvecs, certificate_rad)`` of every fresh check.
    """

    values: Tensor
    X: Tensor
    AX: Tensor
    iterations: int
    matvecs: int
    certificate: dict[str, Any]
    stop: str
    history: list[tuple[int, int, float]] = field(default_factory=list)


def matvec_rounding(omega: Tensor) -> float:
    """A bound on the rounding error of one computed product ``Ωx`` (‖x‖ = 1) in float64:
    ``|fl(Ωx) − Ωx| ≤ γ_d |Ω||x|`` (Higham, *Accuracy and Stability*, §3.5), whose 2-norm is
    ``≤ γ_d ‖|Ω|‖₂ ≤ γ_d ‖Ω‖_F``, with ``γ_d = d·u/(1 − d·u)`` and u the float64 unit roundoff."""
    u = torch.finfo(torch.float64).eps / 2
    d = omega.shape[0]
    return d * u / (1 - d * u) * float(torch.linalg.matrix_norm(omega.to(torch.float64)))


def subspace_certificate(
    values: Tensor, X: Tensor, AX: Tensor, r: int, rounding: float = 0.0
) -> dict[str, Any]:
    """Davis–Kahan certificate for the r smallest Ritz vectors ``X[:r]`` (rows, orthonormal) of Ω.

    ``values`` (k ≥ r + 1,) ascending Ritz values of the rows of ``X`` (k, d), ``AX = X @ Ω``
    computed afresh; ``rounding`` bounds the error of each computed row of ``AX``
    (:func:`matvec_rounding`). With V = X[:r]ᵀ (d, r), Θ = diag(θ_1 … θ_r),
    R = ΩV − VΘ, ρ_j = ‖Ωx_j − θ_j x_j‖ + ``rounding``:

    * **gap** (a lower bound, under assumption (A) below): ``λ_{r+1} ≥ θ_{r+1} − ρ_{r+1}``,
      so ``δ = θ_{r+1} − ρ_{r+1} − θ_r`` separates Θ's eigenvalues (all ≤ θ_r) from the
      eigenvalues λ_{r+1} ≤ … ≤ λ_d of the complementary spectral subspace;
    * **bound** (Davis & Kahan, SIAM J. Numer. Anal. 7 (1970), the sin Θ theorem in residual
      form; Parlett, *The Symmetric Eigenvalue Problem*, SIAM 1998, Ch. 11): if δ > 0,
      ``sin ∠(span V, span{u_1 … u_r}) ≤ (‖R‖₂ + √r·rounding)/δ + η``, where η = ‖XXᵀ − I‖₂
      (rows 1…r+1) covers the departure of the computed V from orthonormality; the certificate is
      the arcsine (π/2 when the quotient is ≥ 1);
    * **cluster guard**: if the inclusion intervals ``[θ_j − ρ_j, θ_j + ρ_j]`` of j = r and
      j = r + 1 overlap (each contains an eigenvalue of Ω: Parlett, Ch. 4), the two Ritz values
      may approximate one eigenvalue or a cluster straddling r, and no separation can be claimed:
      ``certifiable`` is False and the certificate π/2. (The bound alone already refuses it:
      δ ≤ ρ_r ≤ ‖R‖₂ + √r·``rounding`` makes the quotient ≥ 1; the test names the reason.) A gap
      below ``√r·rounding/sin(tol)`` can therefore never be certified to ``tol``.

    Assumption (A): the eigenvalue in θ_{r+1}'s interval is λ_{r+1} or above, i.e. the search
    subspace has not missed an eigenvalue below θ_{r+1} − ρ_{r+1} besides the r it approximates.
    Rayleigh–Ritz gives θ_j ≥ λ_j (Poincaré), never a lower bound: (A) is the assumption every
    residual-based stopping rule makes, and only a global test can remove it (an inertia count:
    ``certified_solver(..., verify_inertia=True)``).

    Returns ``certificate_rad``, ``certifiable`` (interval test and δ > 0), ``residual_norm``
    (‖R‖₂, absolute), ``rho`` (ρ_r, ρ_{r+1}), ``gap`` (θ_{r+1} − θ_r, the naive Ritz gap),
    ``certificate_gap`` (δ), ``orthogonality`` (η) and ``reason`` when not certifiable.
    """
    X = X[: r + 1].to(torch.float64)
    theta = values[: r + 1].to(torch.float64)
    R = AX[: r + 1].to(torch.float64) - theta[:, None] * X  # (r + 1, d)
    rho = torch.linalg.vector_norm(R, dim=1) + rounding  # (r + 1,)
    res = float(torch.linalg.matrix_norm(R[:r], 2)) + math.sqrt(r) * rounding
    eye = torch.eye(r + 1, dtype=torch.float64, device=X.device)
    eta = float(torch.linalg.matrix_norm(X @ X.mT - eye, 2))
    t_r, t_next = float(theta[r - 1]), float(theta[r])
    rho_r, rho_next = float(rho[r - 1]), float(rho[r])
    delta = t_next - rho_next - t_r
    out: dict[str, Any] = {
        "residual_norm": res,
        "rho": (rho_r, rho_next),
        "gap": t_next - t_r,
        "certificate_gap": delta,
        "orthogonality": eta,
        "certifiable": True,
        "reason": None,
    }
    if not t_next - rho_next > t_r + rho_r:
        out["certifiable"] = False
        out["reason"] = (
            f"inclusion intervals of θ_r = {t_r:.6g} ± {rho_r:.3g} and "
            f"θ_r+1 = {t_next:.6g} ± {rho_next:.3g} overlap (cluster at r)"
        )
        out["certificate_rad"] = math.pi / 2
        return out
    sine = res / delta + eta
    out["certificate_rad"] = math.asin(sine) if sine < 1 else math.pi / 2
    return out


def block_lobpcg(
    omega: Tensor,
    r: int,
    *,
    guard: int | None = None,
    seed: int = 0,
    tol_angle: float = CERTIFIED_TOL_ANGLE,
    max_matvecs: int | None = None,
    max_iterations: int | None = None,
) -> BlockRun:
    """Block LOBPCG (float64, no preconditioner) for the ``m = r + guard`` smallest eigenpairs of
    symmetric Ω, stopped by :func:`subspace_certificate` ≤ ``tol_angle``, the matvec budget or the
    iteration cap. The iteration of :func:`certified_solver`; see its docstring."""
    d = omega.shape[0]
    p = max(r, CERTIFIED_MIN_GUARD) if guard is None else guard
    m = r + p
    if p < 1 or 3 * m > d:
        raise ValueError(
            f"block_lobpcg needs guard >= 1 and 3(r + guard) <= d, got r = {r}, "
            f"guard = {p}, d = {d}"
        )
    A = omega.detach().to(torch.float64).contiguous()
    rounding = matvec_rounding(A)
    limit = math.inf if max_matvecs is None else max_matvecs
    its = math.inf if max_iterations is None else max_iterations
    X = random_start(d, m, seed, A).mT.contiguous()  # (m, d) orthonormal rows
    AX = X @ A  # rows: (ΩXᵀ)ᵀ. Row-major blocks: MKL's X @ Ω ran up to 2.5× faster than Ω @ Xᵀ
    matvecs = m
    values, X, AX = _rayleigh_ritz(X, AX, m)
    P = AP = None
    history: list[tuple[int, int, float]] = []
    cert: dict[str, Any] | None = None  # the last fresh certificate
    iteration = 0
    while True:
        R = AX - values[:, None] * X  # (m, d) residuals, from the updated products
        if _cheap_check(values, torch.linalg.vector_norm(R, dim=1), r, tol_angle, rounding):
            # verify on fresh products: re-orthonormalise, Ω·X afresh, Rayleigh–Ritz
            X = torch.linalg.qr(X.mT)[0].mT.contiguous()
            AX = X @ A
            matvecs += m
            values, X, AX = _rayleigh_ritz(X, AX, m)
            cert = subspace_certificate(values, X, AX, r, rounding)
            cert["iteration"] = iteration
            history.append((iteration, matvecs, cert["certificate_rad"]))
            if cert["certifiable"] and cert["certificate_rad"] <= tol_angle:
                return BlockRun(values, X, AX, iteration, matvecs, cert, "certified", history)
            R = AX - values[:, None] * X
        if iteration >= its or matvecs + m > limit:
            if cert is None or cert["iteration"] != iteration:  # from the updated products
                cert = subspace_certificate(values, X, AX, r, rounding)
                cert["iteration"] = iteration
            stop = "iterations" if iteration >= its else "budget"
            return BlockRun(values, X, AX, iteration, matvecs, cert, stop, history)
        iteration += 1
        basis = X if P is None else torch.cat([X, P])
        W = _orthonormal_against(R, basis)  # (m, d)
        AW = W @ A
        matvecs += m
        S = torch.cat([X, W] if P is None else [X, W, P])  # (k, d) orthonormal rows
        AS = torch.cat([AX, AW] if P is None else [AX, AW, AP])
        H = AS @ S.mT
        theta, C = torch.linalg.eigh(0.5 * (H + H.mT))  # ascending
        Cx = C[:, :m]  # (k, m)
        # P: the part of span{X_new, X_old} orthogonal to X_new (orthonormal; Duersch et al.,
        # SIAM J. Sci. Comput. 40 (2018), "A robust and efficient implementation of LOBPCG")
        E = torch.zeros_like(Cx)
        E[:m] = torch.eye(m, dtype=C.dtype, device=C.device)
        Cp = torch.linalg.qr(torch.cat([Cx, E], dim=1))[0][:, m:]  # (k, m)
        values = theta[:m]
        X, AX = Cx.mT @ S, Cx.mT @ AS
        P, AP = Cp.mT @ S, Cp.mT @ AS


def _cheap_check(values: Tensor, rho: Tensor, r: int, tol: float, rounding: float) -> bool:
    """The certificate from the updated (not fresh) products, with ‖R_r‖₂ ≤ ‖R_r‖_F: worth a
    fresh verification only when this passes."""
    t_r, t_next = float(values[r - 1]), float(values[r])
    rho_r, rho_next = float(rho[r - 1]) + rounding, float(rho[r]) + rounding
    delta = t_next - rho_next - t_r
    if not (t_next - rho_next > t_r + rho_r and delta > 0):
        return False
    res = float(torch.linalg.vector_norm(rho[:r])) + math.sqrt(r) * rounding
    return res / delta < math.sin(tol)


def _rayleigh_ritz(X: Tensor, AX: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz values (ascending) and rows of the orthonormal rows ``X`` with ``AX = X @ Ω``."""
    H = AX @ X.mT
    theta, C = torch.linalg.eigh(0.5 * (H + H.mT))
    return theta[:m], C[:, :m].mT @ X, C[:, :m].mT @ AX


def _orthonormal_against(W: Tensor, B: Tensor) -> Tensor:
    """Rows of ``W`` orthogonalised against the orthonormal rows of ``B`` and orthonormalised:
    two rounds of (block Gram–Schmidt, Householder QR) — "twice is enough" (Giraud et al. 2005).
    Rows of W inside span(B) come back as other orthonormal directions (Householder QR always
    returns orthonormal columns): the Rayleigh–Ritz step then simply does not use them."""
    for _ in range(2):
        W = W - (W @ B.mT) @ B
        W = torch.linalg.qr(W.mT)[0].mT
    return W.contiguous()


def certified_solver(
    omega: Tensor,
    r: int,
    *,
    seed: int = 0,
    tol_angle: float = CERTIFIED_TOL_ANGLE,
    guard: int | None = None,
    budget: float = CERTIFIED_BUDGET,
    max_matvecs: int | None = None,
    max_iterations: int | None = None,
    verify_inertia: bool = False,
) -> EigenResult:
    """The r smallest eigenpairs of symmetric Ω by block LOBPCG, **certified** to ``tol_angle``
    (largest principal angle to the exact r-dimensional eigenspace), else dense ``eigh``.

    **Method.** Block LOBPCG (Knyazev 2001) of our own, in float64, without preconditioner, on
    ``m = r + guard`` vectors (``guard = max(r, 8)`` by default): each iteration multiplies Ω by
    one (d, m) block — the only O(d²) work; the rest is O(d·m²) — and does a Rayleigh–Ritz step
    on the orthonormal basis [X, W, P] (3m vectors; residuals W orthonormalised against X and P;
    P orthonormal to X as in Duersch et al. 2018), so no Gram matrix of an ill-conditioned basis
    is ever solved. Chosen over block Lanczos because it needs no growing basis (memory 6m·d,
    no restarts) and over subspace iteration on an inverted operator because that needs a
    factorisation of Ω − σI (O(d³)). The guard vectors make the r wanted vectors converge at a
    rate set by the gap to λ_{m+1} instead of λ_{r+1}, and they supply the (r+1)-th Ritz pair the
    certificate needs; a (d, m) block costs about as much as a (d, r) one while Ω is read from
    memory (measured: X @ Ω with m = 8…32 rows, d = 4096, 26–39 ms on one thread).

    **Certificate** (:func:`subspace_certificate`): with V the r Ritz vectors, R = ΩV − VΘ, and
    δ = θ_{r+1} − ρ_{r+1} − θ_r a lower bound on λ_{r+1} − θ_r (eigenvalue inclusion of the
    (r+1)-th Ritz pair, Parlett Ch. 4), the Davis–Kahan (1970) sin Θ theorem gives
    ``sin θ_max ≤ ‖R‖₂/δ``. It is checked on fresh products (Ω·V recomputed, V re-orthonormalised)
    with a bound on their rounding, and refused when the inclusion intervals of θ_r and θ_{r+1}
    overlap (a cluster at r). It assumes (A) that the search space has not missed an eigenvalue
    below θ_{r+1} − ρ_{r+1}; ``verify_inertia=True`` removes (A) at the cost of one Cholesky
    (d³/3 flops): Ω + cVVᵀ − σ'I ≻ 0 with σ' = θ_r + δ − τ proves λ_{r+1}(Ω) ≥ σ' by Weyl's
    interlacing for the rank-r update cVVᵀ (c = σ − θ_1 + ‖Ω‖_F), with τ ≥ the Cholesky backward
    error γ_{d+1}·tr + the rounding of forming the matrix (Demmel; Rump 2006); δ is then
    reduced by τ.

    **Fallback.** Dense :func:`eigh_solver` when the certificate is not reached within the
    budget: ``max_matvecs`` products of Ω with a vector, by default
    ``budget · (2/3)·d`` (eigh's (4/3)d³ flops in units of a matvec's 2d²: ``budget = 0.2``
    spends at most a fifth of eigh's flops; a count, not a clock, so the result does not depend
    on the machine's load), or ``max_iterations``; at once when d < 3m or when the budget does
    not cover :data:`CERTIFIED_MIN_ITERATIONS` iterations (d ≲ 1100 at r = 8, where eigh takes
    tens of milliseconds); or when the inertia test fails.
    The reason is in ``diagnostics["fallback"]``; the result is then eigh's (``solver: "eigh"``)
    with the attempt's record in ``diagnostics["certified_attempt"]``.

    Diagnostics: ``solver`` ("certified" or "eigh" after a fallback), ``certified`` (bool),
    ``certificate_rad`` (the bound achieved: for a fallback, the attempt's last), ``iterations``,
    ``matvecs``, ``fallback``, ``gap`` (θ_{r+1} − θ_r, the Ritz estimate of λ_{r+1} − λ_r that
    :func:`lora_da_ref.torch.factors.precision_bound` reads; eigh's exact gap after a fallback),
    ``certificate_gap`` (δ, the gap the certificate used), ``residual`` (as the other solvers),
    ``shift`` (0), ``guard``, ``max_matvecs``, ``tol_angle``, ``inertia_verified``.

    Args:
        omega: symmetric (d, d) Ω (any float dtype; solved in float64, returned in its dtype).
        r: number of eigenpairs.
        seed: seeds the random orthonormal start (:func:`random_start`).
        tol_angle: the angle to certify (radians).
        guard: extra block vectors (default ``max(r, 8)``).
        budget: fraction of eigh's flops the iteration may spend (ignored with ``max_matvecs``).
        max_matvecs: the budget as a count of matvecs (overrides ``budget``).
        max_iterations: an iteration cap besides the budget.
        verify_inertia: prove assumption (A) by a Cholesky inertia test (O(d³/3)).
    """
    d = omega.shape[0]
    p = max(r, CERTIFIED_MIN_GUARD) if guard is None else guard
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"guard must be a positive integer, got {guard!r}")
    if not tol_angle > 0:
        raise ValueError(f"tol_angle must be > 0, got {tol_angle!r}")
    limit = max_matvecs if max_matvecs is not None else math.ceil(budget * 2 * d / 3)
    attempt: dict[str, Any] = {"solver": "certified", "guard": p, "max_matvecs": limit}
    attempt |= {"tol_angle": tol_angle, "iterations": 0, "matvecs": 0, "shift": 0.0}
    attempt |= {"certified": False, "certificate_rad": None, "inertia_verified": None}
    m = r + p
    if 3 * m > d:
        reason = f"d = {d} < 3(r + guard) = {3 * m}: the block does not fit"
        return _certified_fallback(omega, r, reason, attempt)
    least = (1 + CERTIFIED_MIN_ITERATIONS) * m  # the start and the iterations worth trying
    if limit < least:
        reason = f"budget {limit} matvecs < {least} (start + {CERTIFIED_MIN_ITERATIONS} blocks)"
        return _certified_fallback(omega, r, f"{reason}: eigh is cheaper at d = {d}", attempt)
    run = block_lobpcg(
        omega, r, guard=p, seed=seed, tol_angle=tol_angle, max_matvecs=limit,
        max_iterations=max_iterations,
    )  # fmt: skip
    cert = run.certificate
    attempt |= {"iterations": run.iterations, "matvecs": run.matvecs, "stop": run.stop}
    attempt |= {"certificate_rad": cert["certificate_rad"], "gap": cert["gap"]}
    attempt |= {"certificate_gap": cert["certificate_gap"]}
    attempt |= {"certificate_residual": cert["residual_norm"]}
    if run.stop != "certified":
        what = f"{run.matvecs} matvecs" if run.stop == "budget" else f"{run.iterations} iterations"
        why = cert["reason"] or f"certificate {cert['certificate_rad']:.3g} rad > {tol_angle:.3g}"
        return _certified_fallback(omega, r, f"not certified within {what}: {why}", attempt)
    delta = cert["certificate_gap"]
    if verify_inertia:
        ok, tau, detail = _inertia_check(omega, run, r)
        attempt |= {"inertia_verified": ok, "inertia_margin": tau}
        if not ok:
            return _certified_fallback(omega, r, f"inertia test failed: {detail}", attempt)
        delta -= tau
    # the returned dtype's rounding of V: ‖ΔV‖₂ ≤ √r·u (0 for float64, which run.X already is)
    u_out = 0.0 if omega.dtype == torch.float64 else torch.finfo(omega.dtype).eps / 2
    sine = cert["residual_norm"] / delta + cert["orthogonality"] + math.sqrt(r) * u_out
    attempt["certificate_gap"] = delta
    attempt["certificate_rad"] = math.asin(sine) if 0 <= sine < 1 else math.pi / 2
    if not (delta > 0 and attempt["certificate_rad"] <= tol_angle):
        why = f"certificate {attempt['certificate_rad']:.3g} rad > {tol_angle:.3g} after margins"
        return _certified_fallback(omega, r, why, attempt)
    values = run.values[:r].to(omega.dtype)
    vectors = fix_signs(run.X[:r].mT.to(omega.dtype))
    attempt |= {"certified": True, "fallback": None}
    attempt["residual"] = relative_residual(omega, values, vectors)
    return EigenResult(values, vectors, attempt)


def _inertia_check(omega: Tensor, run: BlockRun, r: int) -> tuple[bool, float, str]:
    """Cholesky of ``T = Ω + cVVᵀ − σI`` (σ = θ_{r+1} − ρ_{r+1}, V the r certified Ritz vectors,
    c = σ − θ_1 + ‖Ω‖_F). Success proves ``λ_{r+1}(Ω) ≥ λ_1(Ω + cVVᵀ) ≥ σ − τ`` (Weyl: a rank-r
    PSD update moves each eigenvalue up by at most r places), τ bounding the rounding: the
    computed factor satisfies ``LLᵀ = fl(T) + E`` with ``‖E‖₂ ≤ γ_{d+1}·tr(fl(T))`` (Demmel 1989;
    Higham, *Accuracy and Stability*, Thm 10.5, with ``(|L||Lᵀ|)_ij ≤ √(t_ii t_jj)``; Rump 2006
    builds a verified positive-definiteness test on it), and forming T costs
    ``‖fl(T) − T‖₂ ≤ (r + 2)·u·(‖Ω‖_F + c·r + |σ|√d)``; τ is twice their sum.
    Returns (success, τ, detail)."""
    A = omega.detach().to(torch.float64)
    d = A.shape[0]
    theta = run.values.to(torch.float64)
    sigma = float(theta[r - 1]) + run.certificate["certificate_gap"]
    norm = float(torch.linalg.matrix_norm(A))
    c = sigma - float(theta[0]) + norm
    V = run.X[:r].mT  # (d, r), fresh and orthonormal
    T = A + c * (V @ V.mT)
    T.diagonal().sub_(sigma)
    u = torch.finfo(torch.float64).eps / 2
    gamma = (d + 1) * u / (1 - (d + 1) * u)
    tau = gamma * float(T.diagonal().clamp_min(0).sum())
    tau += (r + 2) * u * (norm + c * r + abs(sigma) * math.sqrt(d))
    tau *= 2
    _, info = torch.linalg.cholesky_ex(T)
    if int(info) != 0:
        detail = f"Ω + cVVᵀ − σI is not positive definite at σ = {sigma:.6g} (pivot {int(info)})"
        return False, tau, detail
    return True, tau, ""


def _certified_fallback(omega: Tensor, r: int, reason: str, attempt: dict[str, Any]) -> EigenResult:
    result = eigh_solver(omega, r)
    diag = result.diagnostics
    diag["fallback"] = f"eigh used: {reason}"
    diag |= {"certified": False, "certificate_rad": attempt.get("certificate_rad")}
    diag |= {"iterations": attempt["iterations"], "matvecs": attempt["matvecs"]}
    diag |= {"certificate_gap": attempt.get("certificate_gap"), "tol_angle": attempt["tol_angle"]}
    diag["certified_attempt"] = attempt
    return result


# The dimension from which "auto" solves by the certified solver instead of eigh. Measured on one
# thread, quiet machine (benchmarks/results/auto_solver_crossover.json, docs/validation.md "Which
# solver by default"): on Ω with SmolLM2's measured spectra the certified solver takes 0.36-0.40×
# eigh's time at d = 1536, 0.22-0.26× at 2048, 0.12-0.13× at 3072 (within 3e-5 rad of eigh); where
# it cannot certify (the synthetic gaps 1e-1 and 1e-2 up to 2048) its budget makes it 1.3-1.45×
# eigh. From 2048 the gain is 4×; below, eigh stays, so every result up to SmolLM2's sizes
# (d ≤ 1536) is eigh's, bit for bit, as it was validated.
AUTO_CERTIFIED_MIN_DIM = 2048


def auto_solver(omega: Tensor, r: int, **options: Any) -> EigenResult:
    """Dense :func:`eigh_solver` for ``d < AUTO_CERTIFIED_MIN_DIM``, :func:`certified_solver`
    (with ``options``) from there; ``diagnostics["auto"]`` records which and why."""
    d = omega.shape[0]
    if d < AUTO_CERTIFIED_MIN_DIM:
        result = eigh_solver(omega, r)
        why = f"eigh: d = {d} < {AUTO_CERTIFIED_MIN_DIM}"
    else:
        result = certified_solver(omega, r, **options)
        why = f"certified: d = {d} >= {AUTO_CERTIFIED_MIN_DIM}"
    result.diagnostics["auto"] = why
    return result


Solver = Callable[..., EigenResult]
SOLVERS: dict[str, Solver] = {
    "auto": auto_solver,
    "eigh": eigh_solver,
    "lobpcg": lobpcg_solver,
    "certified": certified_solver,
}
DEFAULT_SOLVER = "auto"  # the default of LoraDAConfig.solver and SolveConfig.solver


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
