"""Time the exact reference (Theorem 4.2, dense Fisher) against the problem size; prints JSON.

Usage: python benchmarks/reference_scaling.py [--sizes 64x16 128x32 ...] [--rank 8]

For each (d1, d2) it builds a random SPD Fisher of size d1·d2 (condition number 1e3) and times
``lora_da_init`` end to end (Cholesky, Σ_i J⁻¹_[i], Fisher–gradient, Ω, eigh). Goal: ≤ 10 s at
d1·d2 = 4096 on 2 cores, so that the exact reference can check layers of that size in a test.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import lora_da_ref as ld


def random_spd(n: int, rng: np.random.Generator, cond: float) -> np.ndarray:
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.geomspace(1.0, cond, n)) @ Q.T


def time_one(d1: int, d2: int, r: int, rng: np.random.Generator) -> dict:
    J = random_spd(d1 * d2, rng, 1e3)
    G = rng.standard_normal((d1, d2))
    t0 = time.perf_counter()
    ld.lora_da_init(J, G, 10_000, r)
    seconds = time.perf_counter() - t0
    return {"d1": d1, "d2": d2, "params": d1 * d2, "rank": r, "seconds": round(seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["16x4", "32x16", "64x32", "128x32"])
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = [time_one(*map(int, s.split("x")), args.rank, rng) for s in args.sizes]
    print(json.dumps({"benchmark": "reference_scaling", "results": rows}, indent=2))


if __name__ == "__main__":
    main()
