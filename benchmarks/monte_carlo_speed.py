"""Speed of ``monte_carlo_error`` (200 replicates of the constrained MLE); prints JSON.

Goal: 200 reps at d1·d2 ≈ 100 in seconds, so that a Monte-Carlo check fits in a unit test.
"""

from __future__ import annotations

import json
import time

import numpy as np

from lora_da_ref import (
    LinearGaussian,
    LogisticRegression,
    SoftmaxRegression,
    monte_carlo_error,
    random_orthonormal,
)

SETTINGS = [
    (LinearGaussian(20, 5), 1000, 4),
    (LogisticRegression(100), 1000, 4),
    (SoftmaxRegression(20, 6), 1000, 4),
    (SoftmaxRegression(20, 6), 5000, 4),
]


def main() -> None:
    rows = []
    for model, n, r in SETTINGS:
        rng = np.random.default_rng(0)
        W0 = model.random_weight(rng)
        W_tgt = W0 + model.random_weight(rng, 0.3)
        A = random_orthonormal(model.d1, r, rng)
        t0 = time.perf_counter()
        res = monte_carlo_error(model, W0, W_tgt, A, n, 200, rng)
        rows.append(
            {
                "model": repr(model),
                "n": n,
                "r": r,
                "reps": 200,
                "seconds": round(time.perf_counter() - t0, 3),
                "mean": res.mean,
                "std_error": res.std_error,
            }
        )
    print(json.dumps({"benchmark": "monte_carlo_speed", "results": rows}, indent=1))


if __name__ == "__main__":
    main()
