"""BLAS ``syrk`` (``C ← α·MMᵀ + β·C``) and LAPACK ``syevr`` (the k smallest eigenpairs) for the
per-layer solves, called without holding the GIL.

torch has no ``syrk``: ``addmm(C, M, Mᵀ)`` computes both triangles, twice the flops. SciPy's
BLAS has it, but its Python wrappers hold the GIL for the whole call, so layers solved side by
side in threads (``LoraDAConfig.solve_workers``) would queue on it. This module calls the
``dsyrk``/``ssyrk`` that SciPy exports for Cython (``scipy.linalg.cython_blas``, a documented API)
through ``ctypes``, which releases the GIL during the call, on the tensors' own memory (no copy).
Likewise ``syevr`` (``scipy.linalg.cython_lapack``) for the ``eigh`` solver, with the arguments
``scipy.linalg.eigh(…, subset_by_index=…, driver="evr", lower=True)`` passes: the same result
to the bit, but two threads solve two layers in the time of one.

Measured on the benchmark machine (one BLAS thread, float64): ΔWΔWᵀ of a (1376, 512) ΔW 42.6 →
19.0 ms, (512, 1376) 14.7 → 7.4 ms, (512, 512) 5.9 → 2.9 ms against ``torch.addmm``; two threads
run two calls in half the time of one after the other (SciPy's wrapper: no speed-up).

CPU tensors of float32/float64 only; anything else (CUDA, other dtypes) takes ``torch.addmm``.
"""

from __future__ import annotations

import ctypes
import importlib
from functools import cache

import torch
from torch import Tensor

__all__ = ["gram_lower", "mirror_lower_", "syevr_smallest", "symmetric_update"]

MIRROR_PANEL = 384  # rows per panel of mirror_lower_

_P = ctypes.c_void_p
_SYRK = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, _P, _P, _P, _P, _P, _P, _P, _P)
_SYEVR = ctypes.CFUNCTYPE(None, *([ctypes.c_char_p] * 3), *([_P] * 18))
_SCALAR = {torch.float64: ctypes.c_double, torch.float32: ctypes.c_float}


@cache
def _syrk(dtype: torch.dtype) -> _SYRK | None:
    """SciPy's ``dsyrk``/``ssyrk`` as a GIL-releasing ctypes function (``None`` if unavailable)."""
    return _cython_function(
        "cython_blas", {torch.float64: "dsyrk", torch.float32: "ssyrk"}[dtype], _SYRK
    )


@cache
def _syevr(dtype: torch.dtype) -> _SYEVR | None:
    """SciPy's ``dsyevr``/``ssyevr`` as a GIL-releasing ctypes function (``None`` if unavailable)."""
    return _cython_function(
        "cython_lapack", {torch.float64: "dsyevr", torch.float32: "ssyevr"}[dtype], _SYEVR
    )


def _cython_function(module: str, name: str, prototype: type) -> object | None:
    try:
        capsule = importlib.import_module(f"scipy.linalg.{module}").__pyx_capi__[name]
    except (ImportError, AttributeError, KeyError):  # pragma: no cover - SciPy is a dependency
        return None
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    pointer = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    return prototype(pointer) if pointer else None


def _blas_ok(M: Tensor, C: Tensor | None) -> bool:
    if M.device.type != "cpu" or M.dtype not in _SCALAR or M.ndim != 2 or 0 in M.shape:
        return False
    if C is not None and (C.device.type != "cpu" or C.dtype != M.dtype):
        return False
    return _syrk(M.dtype) is not None


def _call_syrk(M: Tensor, alpha: float, C: Tensor, beta: float) -> None:
    """The C-order lower triangle of the contiguous (n, n) ``C`` ← that of ``α·MMᵀ + β·C``."""
    n, k = M.shape
    if M.stride(1) == 1 and M.stride(0) >= max(k, 1):  # rows contiguous: Fortran view is Mᵀ
        trans, lda = b"T", M.stride(0)
    elif M.stride(0) == 1 and M.stride(1) >= max(n, 1):  # columns contiguous: Fortran view is M
        trans, lda = b"N", M.stride(1)
    else:
        M = M.contiguous()
        trans, lda = b"T", k
    scalar = _SCALAR[M.dtype]
    ints = [ctypes.c_int(v) for v in (n, k, lda, n)]
    a, b = scalar(alpha), scalar(beta)
    # BLAS is column-major: its upper triangle of C is the C-order lower triangle.
    _syrk(M.dtype)(
        b"U", trans, ctypes.byref(ints[0]), ctypes.byref(ints[1]), ctypes.byref(a),
        _P(M.data_ptr()), ctypes.byref(ints[2]), ctypes.byref(b), _P(C.data_ptr()),
        ctypes.byref(ints[3]),
    )  # fmt: skip


def gram_lower(M: Tensor) -> Tensor:
    """``MMᵀ`` (n, n) for M (n, k), exact in its lower triangle only (the upper is zero on the
    BLAS path): for ``torch.linalg.eigvalsh(·, UPLO="L")`` and other lower-triangle readers."""
    if not _blas_ok(M, None):
        return M @ M.mT
    C = torch.zeros(M.shape[0], M.shape[0], dtype=M.dtype)
    _call_syrk(M, 1.0, C, 0.0)
    return C


def symmetric_update(M: Tensor, alpha: float, C: Tensor | None = None, beta: float = 0.0) -> Tensor:
    """``α·MMᵀ + β·C`` for M (n, k) and symmetric C (n, n) (``None``: 0), exactly symmetric: the
    lower triangle by ``syrk`` mirrored to the upper (a non-symmetric ``C`` contributes its lower
    triangle). ``C`` is not modified."""
    n = M.shape[0]
    if not _blas_ok(M, C):
        out = alpha * (M @ M.mT) if C is None else torch.addmm(C, M, M.mT, beta=beta, alpha=alpha)
        return mirror_lower_(out)
    out = torch.zeros(n, n, dtype=M.dtype) if C is None else C.contiguous().clone()
    _call_syrk(M, alpha, out, 0.0 if C is None else beta)
    return mirror_lower_(out)


def mirror_lower_(M: Tensor) -> Tensor:
    """``M`` (d, d) made symmetric in place from its lower triangle (the upper is overwritten),
    panel by panel: no (d, d) temporary."""
    d = M.shape[0]
    for a in range(0, d, MIRROR_PANEL):
        b = min(a + MIRROR_PANEL, d)
        block = M[a:b, a:b]
        block.copy_(block.tril() + block.tril(-1).mT)
        M[a:b, b:].copy_(M[b:, a:b].mT)
    return M


def syevr_smallest(omega: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """The k smallest eigenpairs (ascending values (k,), vectors (n, k)) of symmetric ``omega``
    from its lower triangle, by LAPACK ``syevr`` as ``scipy.linalg.eigh(omega, lower=True,
    subset_by_index=[0, k − 1], driver="evr")`` computes them; ``None`` where this path does not
    apply (not a CPU float32/float64 matrix, SciPy's LAPACK not found). Raises
    ``torch.linalg.LinAlgError`` if LAPACK reports a failure."""
    if omega.device.type != "cpu" or omega.dtype not in _SCALAR or omega.ndim != 2:
        return None
    fn = _syevr(omega.dtype)
    n = omega.shape[0]
    if fn is None or n == 0 or not 1 <= k <= n:
        return None
    scalar, dtype = _SCALAR[omega.dtype], omega.dtype
    A = torch.empty(n, n, dtype=dtype).copy_(omega.mT)  # column-major Ω (destroyed by LAPACK)
    w = torch.empty(n, dtype=dtype)
    Z = torch.empty(k, n, dtype=dtype)  # column-major (n, k)
    isuppz = (ctypes.c_int * (2 * k))()
    ints = {key: ctypes.c_int(v) for key, v in dict(n=n, il=1, iu=k, m=0, ldz=n, info=0).items()}
    vl, vu, abstol = scalar(0.0), scalar(1.0), scalar(0.0)

    def call(work: object, lwork: ctypes.c_int, iwork: object, liwork: ctypes.c_int) -> None:
        fn(
            b"V", b"I", b"L", ctypes.byref(ints["n"]), _P(A.data_ptr()), ctypes.byref(ints["n"]),
            ctypes.byref(vl), ctypes.byref(vu), ctypes.byref(ints["il"]), ctypes.byref(ints["iu"]),
            ctypes.byref(abstol), ctypes.byref(ints["m"]), _P(w.data_ptr()), _P(Z.data_ptr()),
            ctypes.byref(ints["ldz"]), isuppz, work, ctypes.byref(lwork), iwork,
            ctypes.byref(liwork), ctypes.byref(ints["info"]),
        )  # fmt: skip

    query, iquery = scalar(0.0), ctypes.c_int(0)
    call(ctypes.byref(query), ctypes.c_int(-1), ctypes.byref(iquery), ctypes.c_int(-1))
    lwork, liwork = max(1, int(query.value)), max(1, iquery.value)
    work, iwork = (scalar * lwork)(), (ctypes.c_int * liwork)()
    call(work, ctypes.c_int(lwork), iwork, ctypes.c_int(liwork))
    info = ints["info"].value
    if info != 0 or ints["m"].value != k:
        raise torch.linalg.LinAlgError(
            f"LAPACK syevr failed (info = {info}, {ints['m'].value} of {k} eigenpairs)"
        )
    return w[:k], Z.mT
