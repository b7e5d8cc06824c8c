"""Time the exact reference (Theorem 4.2, dense Fisher) against the problem size; prints JSON.

Usage: python benchmarks/reference_scaling.py [--sizes 64x16 128x128 ...] [--rank 8] [--raw-array]

For each (d1, d2) it builds a random dense SPD Fisher of size n = d1·d2 (eigenvalues
geomspace(1, 1e3), so condition number 1e3) and times ``lora_da_init`` end to end: validating J,
its Cholesky factorisation, the Fisher–gradient, Σ_i J⁻¹_[i] (triangular inverse and block sum),
Ω and ``eigh``. One JSON line is printed per size as soon as it finishes.

By default J is handed over as ``DenseFisher(J, d1, d2)``, built inside the timed region: J is
validated and factorised once, and ``seconds_factorisation`` / ``seconds_rest`` split the total.
``--raw-array`` passes the NumPy array itself, as a caller of ``lora_da_init(J, G, n, r)`` does;
``lora_da_init`` then wraps it twice (in ``fisher_gradient`` and in ``guidance_matrix``), so J is
validated and factorised twice. Goals (quiet 2-core machine): ≤ 10 s at d1·d2 = 4096, ≤ 60 s at
16384. Results and the machine they were taken on: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import lora_da_ref as ld
from lora_da_ref.reference.linalg import random_orthonormal


def random_fisher(d1: int, d2: int, rng: np.random.Generator, cond: float) -> np.ndarray:
    """A dense SPD (n, n), n = d1·d2, with eigenvalues geomspace(1, cond) in random order.

    The eigenbasis is ``K = Q2 ⊗ Q1`` (Q1 (d1, d1), Q2 (d2, d2) Haar-orthogonal), so
    ``J = K Λ Kᵀ`` is built one block row of d1 rows at a time in O(n²·d1) flops and no n × n
    temporary (a Haar basis of size n would cost ~5n³ flops: minutes at n = 16384). J is dense and
    not a Kronecker product (Λ is not); the factorisations timed here do not depend on the entries.
    """
    n = d1 * d2
    Q1, Q2 = random_orthonormal(d1, d1, rng), random_orthonormal(d2, d2, rng)
    lam = rng.permutation(np.geomspace(1.0, cond, n)).reshape(d2, d1)  # λ of Q2[:, b] ⊗ Q1[:, a]
    J = np.empty((n, n))
    for j in range(d2):
        # J[(j, i), (j', i')] = Σ_a Q1[i, a] S[a, j'] Q1[i', a],  S[a, j'] = Σ_b Q2[j, b] λ[b, a] Q2[j', b]
        S = (Q2[j][:, None] * lam).T @ Q2.T  # (d1, d2)
        blocks = (Q1[None] * S.T[:, None, :]) @ Q1.T  # (d2, d1, d1): [j', i, i']
        J[j * d1 : (j + 1) * d1].reshape(d1, d2, d1)[:] = blocks.transpose(1, 0, 2)
    return J


def time_one(d1: int, d2: int, r: int, rng: np.random.Generator, raw_array: bool) -> dict:
    J = random_fisher(d1, d2, rng, 1e3)
    G = rng.standard_normal((d1, d2))
    row: dict = {"benchmark": "reference_scaling", "d1": d1, "d2": d2, "params": d1 * d2, "rank": r}
    t0 = time.perf_counter()
    if raw_array:
        A, B = ld.lora_da_init(J, G, 10_000, r)
        row["factorisations"] = 2
    else:
        fisher = ld.DenseFisher(J, d1, d2)
        t1 = time.perf_counter()
        A, B = ld.lora_da_init(fisher, G, 10_000, r)
        row.update(
            factorisations=1,
            cholesky_block=fisher.cholesky_block,
            seconds_factorisation=round(t1 - t0, 3),
            seconds_rest=round(time.perf_counter() - t1, 3),
        )
    row["seconds"] = round(time.perf_counter() - t0, 3)
    row["orthonormality_error"] = float(np.abs(A.T @ A - np.eye(r)).max())  # ‖AᵀA − I‖_max
    row["B_finite"] = bool(np.all(np.isfinite(B)))
    row["loadavg_1min"] = round(os.getloadavg()[0], 2)  # > number of cores: a loaded machine
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["16x4", "32x16", "64x32", "128x32"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--raw-array",
        action="store_true",
        help="pass J as an array (lora_da_init then validates and factorises it twice)",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for size in args.sizes:
        d1, d2 = map(int, size.split("x"))
        print(json.dumps(time_one(d1, d2, args.rank, rng, args.raw_array)), flush=True)


if __name__ == "__main__":
    main()
