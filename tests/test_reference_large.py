"""The exact reference at large sizes.

Above ``DPOTRF_MAX_SIZE`` :class:`~lora_da_ref.reference.fisher.DenseFisher` factorises J by a
blocked Cholesky (the threaded ``dpotrf`` of the bundled OpenBLAS segfaults at n = 16384). Here the
blocked path is forced on small J by ``cholesky_block`` and compared with LAPACK's single call
(``scipy.linalg.cholesky``), and Theorem 4.2 runs end to end at d1·d2 = 16384 in a subprocess
(slow), so that a crash fails the test instead of killing pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import linalg

import lora_da_ref as ld
from lora_da_ref.reference import fisher as fisher_module
from tests.report import allclose_report

ROOT = Path(__file__).resolve().parents[1]
# Two float64 Cholesky factors of a cond-1e3 matrix computed in different orders differ by
# ~n·eps·‖L‖ (measured ≤ 3e-15 relative up to n = 3000); 1e-12 leaves a wide margin, while any
# algebraic slip (a wrong update, a transposed panel) is O(1).
FACTOR_RTOL = 1e-12

BLOCKED = [  # (d1, d2, block)
    (12, 5, 7),  # n = 60: 9 blocks, the last one of 4 (a ragged edge)
    (30, 20, 128),  # n = 600: 5 blocks, the last one of 88
    (40, 3, 16),  # d1 = 40 > block: the block sum's output rows go in chunks
    (6, 4, 1),  # blocks of 1: every dpotrf is 1 × 1, all the work is in the updates
    (60, 50, 700),  # n = 3000, a size LAPACK factorises safely in one call: 5 blocks
]
BLOCKED_IDS = [f"{d1}x{d2}-block{b}" for d1, d2, b in BLOCKED]


def _problem(d1: int, d2: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(J, G): J = D (I + εS) D, S symmetric Gaussian with ‖εS‖₂ ≈ 0.35, D = diag(geomspace(1, 30))
    shuffled: dense SPD with cond ≈ 2e3 in O(n²) flops (a random eigenbasis is ~5n³: most of the
    test's time at n = 3000)."""
    n = d1 * d2
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((n, n))
    C = (0.125 / np.sqrt(n)) * (S + S.T)  # εS, ε = 0.25/√n
    C[np.diag_indices(n)] += 1.0
    d = rng.permutation(np.geomspace(1.0, 30.0, n))
    return d[:, None] * C * d[None, :], rng.standard_normal((d1, d2))


def _scale(M: np.ndarray) -> float:
    return float(np.abs(M).max())


@pytest.mark.parametrize(("d1", "d2", "block"), BLOCKED, ids=BLOCKED_IDS)
def test_blocked_cholesky_equals_lapack(d1, d2, block):
    """Catches a wrong update (a missing or doubled −UᵀU term, the diagonal block not updated),
    a transposed panel (U_kk⁻¹ instead of U_kk⁻ᵀ), an off-by-one at a block edge, and J's upper
    triangle left below the diagonal blocks (the factor must be exactly lower triangular)."""
    J, _ = _problem(d1, d2)
    expected = linalg.cholesky(J, lower=True)
    fisher = ld.DenseFisher(J, d1, d2, cholesky_block=block)
    assert fisher.cholesky_block == block
    L = fisher.cholesky_factor
    assert np.all(np.triu(L, 1) == 0.0), "the lower factor has entries above its diagonal"
    allclose_report(L, expected, rtol=0, atol=FACTOR_RTOL * _scale(expected), name="L")


@pytest.mark.parametrize(("d1", "d2", "block"), BLOCKED, ids=BLOCKED_IDS)
def test_blocked_path_gives_the_same_theorem_42_quantities(d1, d2, block):
    """Σ_i J⁻¹_[i] and J⁻¹G from the blocked factor equal the single-call ones. Catches a block
    sum that takes columns of U⁻¹ instead of rows, skips or repeats a chunk of output rows, or
    drops the part of a row right of its diagonal."""
    J, G = _problem(d1, d2, seed=1)
    blocked = ld.DenseFisher(J, d1, d2, cholesky_block=block)
    plain = ld.DenseFisher(J, d1, d2)
    assert plain.cholesky_block == d1 * d2  # one LAPACK call at these sizes
    want = plain.inverse_block_sum()
    allclose_report(blocked.inverse_block_sum(), want, rtol=0, atol=FACTOR_RTOL * _scale(want))
    want = plain.solve(G)
    allclose_report(blocked.solve(G), want, rtol=0, atol=FACTOR_RTOL * _scale(want), name="J⁻¹G")


def test_factor_reads_the_lower_triangle_like_scipy():
    """J may be asymmetric within SYMMETRY_RTOL; the factor is that of its lower triangle, as
    ``scipy.linalg.cholesky(J, lower=True)``. Catches the blocked path reading J's upper triangle
    (factorising J instead of Jᵀ in Fortran order)."""
    d1, d2 = 30, 20
    J, _ = _problem(d1, d2, seed=2)
    rng = np.random.default_rng(3)
    J = J + np.triu(rng.uniform(-1, 1, J.shape), 1) * 5e-9 * _scale(J)  # upper triangle only
    lower, upper = linalg.cholesky(J, lower=True), linalg.cholesky(J, lower=False).T
    assert _scale(lower - upper) > 100 * FACTOR_RTOL * _scale(lower)  # the test can tell them apart
    for block in (None, 128):
        L = ld.DenseFisher(J, d1, d2, cholesky_block=block).cholesky_factor
        allclose_report(L, lower, rtol=0, atol=FACTOR_RTOL * _scale(lower), name=f"L ({block})")


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("block", [None, 7])
def test_not_positive_definite_raises_value_error_naming_J(where, block):
    """A J that fails in the first or in the last block raises ValueError naming J and the
    failing minor. Catches a blocked path that checks dpotrf's info of the first block only (a
    garbage factor from the later blocks)."""
    d1, d2 = 12, 5
    J, _ = _problem(d1, d2, seed=4)
    i = 0 if where == "first" else d1 * d2 - 1
    J[i, i] = -1.0  # a negative diagonal entry: the leading minor of order i + 1 is not positive
    with pytest.raises(ValueError, match=r"J must be positive definite") as info:
        ld.DenseFisher(J, d1, d2, cholesky_block=block)
    assert f"order {i + 1} " in str(info.value)
    with pytest.raises(ValueError, match=r"J must be positive definite"):
        ld.fisher_gradient(J, np.ones((d1, d2)))


def test_size_threshold_selects_the_blocked_path(monkeypatch):
    """Above DPOTRF_MAX_SIZE the automatic choice is the blocked path (here with the threshold
    lowered to a small n). Catches a threshold that is defined but not used: at n = 16384 one
    dpotrf call would take the interpreter down."""
    assert fisher_module.CHOLESKY_BLOCK_SIZE <= fisher_module.DPOTRF_MAX_SIZE < 16384
    monkeypatch.setattr(fisher_module, "DPOTRF_MAX_SIZE", 50)
    monkeypatch.setattr(fisher_module, "CHOLESKY_BLOCK_SIZE", 16)
    J, _ = _problem(12, 5)  # n = 60 > 50
    fisher = ld.DenseFisher(J, 12, 5)
    assert fisher.cholesky_block == 16
    expected = linalg.cholesky(J, lower=True)
    allclose_report(fisher.cholesky_factor, expected, rtol=0, atol=FACTOR_RTOL * _scale(expected))
    small = ld.DenseFisher(J[:40, :40], 8, 5)  # n = 40 ≤ 50: one call
    assert small.cholesky_block == 40
    with pytest.raises(ValueError, match="cholesky_block must be <= DPOTRF_MAX_SIZE"):
        ld.DenseFisher(J, 12, 5, cholesky_block=51)


# Theorem 4.2 end to end at d1·d2 = 16384 with J as a plain array (lora_da_init factorises it in
# fisher_gradient and again in guidance_matrix). J = B diag(w) Bᵀ + I is dense SPD and costs
# O(n²·64) flops; it is formed by a gemm of two different arrays (B @ Bᵀ would be a SYRK with a
# 16384 × 16384 output: the crashing call itself). Peak memory ≈ 6.5 GB (J, the factor, U⁻¹).
_LARGE = """
import json, time
import numpy as np
import lora_da_ref as ld
d1, d2, r = 128, 128, 8
rng = np.random.default_rng(0)
B = rng.standard_normal((d1 * d2, 64))
J = (B * rng.uniform(0.5, 2.0, 64)) @ B.T
J[np.diag_indices_from(J)] += 1.0
del B
G = rng.standard_normal((d1, d2))
t0 = time.perf_counter()
A, Bf = ld.lora_da_init(J, G, 10_000, r)
print(json.dumps({
    "seconds": time.perf_counter() - t0,
    "A_shape": list(A.shape), "B_shape": list(Bf.shape),
    "orthonormality_error": float(np.abs(A.T @ A - np.eye(r)).max()),
    "B_finite": bool(np.all(np.isfinite(Bf))),
}))
"""


@pytest.mark.slow
@pytest.mark.timeout(3700)
def test_theorem_42_end_to_end_at_16384_in_a_subprocess():
    """lora_da_init at d1·d2 = 16384 finishes: A (128, 8) orthonormal, B finite. A segfault in the
    BLAS is a negative return code here, not a dead pytest. Several minutes on a loaded machine."""
    proc = subprocess.run(
        [sys.executable, "-c", _LARGE], capture_output=True, text=True, timeout=3600, cwd=ROOT
    )
    assert proc.returncode == 0, (
        f"the subprocess ended with {proc.returncode} (negative: killed by that signal, -11 is a "
        f"segfault)\n{proc.stderr[-3000:]}"
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["A_shape"] == [128, 8] and out["B_shape"] == [8, 128]
    assert out["orthonormality_error"] < 1e-12
    assert out["B_finite"]
