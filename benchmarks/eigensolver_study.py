"""Eigensolver study: how accurate is LOBPCG with the official 10 iterations on Ω (Eqs. 5–8, 19)?

For synthetic Ω with a controlled eigengap and size, and for Ω of tiny-LLaMA layers (official
preset statistics), this measures, against the exact r-dimensional eigenspace:

* ``official``: the largest principal angle of ``torch.lobpcg`` with the official settings
  (unshifted, seeded random orthonormal start, 10 iterations, no check), in float32 (the official
  statistics dtype) and float64;
* ``iters_to_1e-3``: the first LOBPCG iteration whose iterate is within 1e-3 rad (same start,
  tolerance 0 so it never stops early; ``null`` if not reached within ``--max-iter``);
* ``default``: LoraDAConfig's default solver (``LoraDAConfig().solver``) on the float32 Ω, and
  ``lobpcg-tol`` (LOBPCG to tolerance with the residual check and eigh fallback).

Synthetic Ω = Q diag(λ) Qᵀ, Q Haar, ‖Ω‖₂ = 1: the r smallest eigenvalues evenly in [−1, −0.5],
then a gap ``g`` (relative to ‖Ω‖₂) to ``λ_{r+1} = −0.5 + g``, the rest evenly up to 1. The exact
eigenspace is Q[:, :r]. Prints one JSON document; ``--quick`` is the test-suite variant.

    python benchmarks/eigensolver_study.py [--quick] [--sizes 64 256 1024 4096] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from lora_da_ref.reference.linalg import principal_angles
from lora_da_ref.torch.config import LoraDAConfig
from lora_da_ref.torch.solvers import OFFICIAL_NITER, random_start, smallest_eigenpairs

TARGET_ANGLE = 1e-3  # rad: asked of the default solver (validation.report.SOLVER_TARGET_RAD)
RANK = 8  # official r
SEED = 0
SIZES = (64, 256, 1024, 4096)
GAPS = (1e-1, 1e-2, 1e-3, 1e-4)
MAX_ITER = 200


def synthetic_omega(d: int, gap: float, r: int = RANK, seed: int = SEED) -> tuple[Any, Any]:
    """Ω (d, d) float64 with the spectrum described in the module docstring, and Q[:, :r]."""
    rng = np.random.default_rng([seed, d])
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    Q = Q * np.sign(np.diag(R))  # Haar
    lam = np.concatenate(
        [np.linspace(-1.0, -0.5, r), np.linspace(-0.5 + gap, 1.0, d - r)]
    )  # (d,) ascending, ‖Ω‖₂ = 1
    omega = (Q * lam) @ Q.T
    return torch.from_numpy(0.5 * (omega + omega.T)), torch.from_numpy(Q[:, :r].copy())


def angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal angle between col(A) and col(B) (radians)."""
    a = A.detach().to(torch.float64).cpu().numpy()
    return float(principal_angles(a, B.detach().to(torch.float64).cpu().numpy()).max())


def lobpcg_trace(omega: torch.Tensor, exact: torch.Tensor, r: int, seed: int, max_iter: int):
    """Angle of every LOBPCG iterate to ``exact`` (official start, tolerance 0: no early stop)."""
    angles: list[float] = []

    def tracker(worker: Any) -> None:
        angles.append(angle(worker.X[:, :r], exact))

    X0 = random_start(omega.shape[0], r, seed, omega)
    try:
        torch.lobpcg(omega, k=r, X=X0, niter=max_iter, tol=0.0, largest=False, tracker=tracker)
    except (torch.linalg.LinAlgError, RuntimeError) as err:  # breakdown near convergence
        angles.append(float("nan")) if not angles else None
        return angles, f"{type(err).__name__}: {str(err)[:80]}"
    return angles, None


def first_below(angles: list[float], target: float = TARGET_ANGLE) -> int | None:
    """1-based iteration of the first iterate with angle ≤ target (None: never)."""
    return next((i + 1 for i, a in enumerate(angles) if a <= target), None)


def study_omega(
    omega: torch.Tensor,
    exact: torch.Tensor,
    r: int = RANK,
    seed: int = SEED,
    max_iter: int = MAX_ITER,
) -> dict[str, Any]:
    """All measurements on one Ω (float64) with known exact eigenspace ``exact`` (d, r)."""
    out: dict[str, Any] = {"d": omega.shape[0], "r": r}
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        om = omega.to(dtype)
        res = smallest_eigenpairs(om, r, solver="lobpcg", official=True, seed=seed)
        out[f"official_{name}"] = angle(res.vectors, exact)
        out[f"official_{name}_iterations"] = res.diagnostics.get("iterations")
        angles, error = lobpcg_trace(om, exact, r, seed, max_iter)
        out[f"iters_to_1e-3_{name}"] = first_below(angles)
        out[f"angle_at_{OFFICIAL_NITER}_{name}"] = (
            angles[OFFICIAL_NITER - 1] if len(angles) >= OFFICIAL_NITER else None
        )
        out[f"trace_error_{name}"] = error
    default = LoraDAConfig()
    om = omega.to(default.dtype)
    out["default_solver"] = f"{default.solver} ({str(default.dtype).removeprefix('torch.')})"
    out["default"] = angle(smallest_eigenpairs(om, r, solver=default.solver).vectors, exact)
    tol = smallest_eigenpairs(om, r, solver="lobpcg", seed=seed)
    out["lobpcg_tol"] = angle(tol.vectors, exact)
    out["lobpcg_tol_fallback"] = tol.diagnostics.get("fallback")
    return out


def synthetic_rows(sizes, gaps, max_iter: int) -> list[dict[str, Any]]:
    rows = []
    for d in sizes:
        for gap in gaps:
            omega, exact = synthetic_omega(d, gap)
            rows.append(
                {"omega": "synthetic", "gap": gap, **study_omega(omega, exact, max_iter=max_iter)}
            )
    return rows


def llama_rows(hidden: int, max_iter: int) -> list[dict[str, Any]]:
    """Ω of every linear layer of a random 2-layer LLaMA, official preset statistics (float64
    here, so the float32/float64 solver columns isolate the solver), exact space by eigh."""
    from lora_da_ref.cli.validate import METHODS
    from lora_da_ref.data import tiny_llama
    from lora_da_ref.torch import collect_statistics
    from lora_da_ref.torch.fisher import KroneckerFisher
    from lora_da_ref.torch.guidance import layer_guidance  # the production Ω of a layer
    from lora_da_ref.torch.init import find_target_modules

    model = tiny_llama(0, hidden=hidden, vocab=128)
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(4, 128, (1, 65), generator=gen) for _ in range(16)]
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    config = METHODS["official"].config(rank=RANK, dtype=torch.float64)
    targets = find_target_modules(model, config.target_modules)
    stats = collect_statistics(model, batches, targets, config, progress=False)
    rows = []
    for name in targets:
        J = KroneckerFisher(stats.Y[name], stats.Z[stats.group_of[name]], damping=config.damping)
        omega = layer_guidance(J, stats.G[name], config).omega  # (d_in, d_in) float64
        values, vectors = torch.linalg.eigh(omega)
        scale = float(values.abs().max())
        gap = float(values[RANK] - values[RANK - 1]) / scale
        row = {"omega": f"llama-{hidden} {name.split('.', 2)[-1]}", "gap": gap}
        rows.append(row | study_omega(omega, vectors[:, :RANK], max_iter=max_iter))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d <= 256, two gaps, hidden 32")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--gaps", type=float, nargs="+", default=list(GAPS))
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--max-iter", type=int, default=MAX_ITER)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.gaps, args.hidden, args.max_iter = [64, 256], [1e-1, 1e-3], [32], 60
    start = time.perf_counter()
    rows = synthetic_rows(args.sizes, args.gaps, args.max_iter)
    for hidden in args.hidden:
        rows += llama_rows(hidden, args.max_iter)
    worst_default = max(r["default"] for r in rows)
    report = {
        "rank": RANK,
        "target_angle": TARGET_ANGLE,
        "official_niter": OFFICIAL_NITER,
        "default_solver": rows[0]["default_solver"],
        "default_meets_target_everywhere": worst_default <= TARGET_ANGLE,
        "worst_default_angle": worst_default,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
