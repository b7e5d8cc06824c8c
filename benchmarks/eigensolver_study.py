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

``--certified`` runs the other study instead: dense ``eigh``, the official 10-iteration LOBPCG
and the certified solver (``solver="certified"``, its default budget) on (a) the synthetic Ω
above and (b) Ω with SmolLM2's measured spectra rescaled to d (:func:`rescale_spectrum`: the
sorted eigenvalues of a real layer's Ω — default statistics, float64, ``--smollm2-texts``
HumanEval train texts — as a function of their relative index, interpolated linearly to d
points, so λ_min, λ_max and the shape of the distribution are kept; ``head`` = the variant that
keeps the smallest 4r eigenvalues exactly, hence the measured gap at r; a Haar basis). Per case:
each solver's time, the largest principal angle of LOBPCG and of the certified solver to eigh's
subspace, the certificate, whether it fell back, its iterations and matvecs. Times depend on the
machine's load: say which machine and load they come from.

    python benchmarks/eigensolver_study.py [--quick] [--sizes 64 256 1024 4096] [--out FILE]
    python benchmarks/eigensolver_study.py --certified --sizes 4096 [--spectra FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from lora_da_ref.reference.linalg import principal_angles
from lora_da_ref.torch.config import LoraDAConfig
from lora_da_ref.torch.solvers import (
    CERTIFIED_BUDGET,
    OFFICIAL_NITER,
    random_start,
    smallest_eigenpairs,
)

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


# ----------------------------------------------------------------------------- certified solver

SMOLLM2_LAYERS = ("model.layers.15.self_attn.q_proj", "model.layers.15.mlp.down_proj")
CERTIFIED_SIZES = (4096,)
CERTIFIED_GAPS = (1e-1, 1e-2, 1e-3)  # synthetic; 1e-3 is the study's worst case
HEAD = 4 * RANK  # eigenvalues the "head" rescaling keeps exactly


def rescale_spectrum(lam: Any, d: int, head: int = 0) -> Any:
    """A spectrum of d points following the sorted spectrum ``lam`` (n points): its quantile
    function ``λ(t)``, t = i/(n−1), interpolated linearly at t = j/(d−1) (λ_min and λ_max kept,
    the fraction of eigenvalues in any interval kept). ``head > 0``: the smallest ``head``
    eigenvalues are kept exactly and only the rest is interpolated to d − head points."""
    lam = np.sort(np.asarray(lam, dtype=np.float64))
    if head:
        return np.concatenate([lam[:head], rescale_spectrum(lam[head:], d - head)])
    return np.interp(np.linspace(0.0, 1.0, d), np.linspace(0.0, 1.0, lam.size), lam)


def omega_with_spectrum(lam: Any, seed: int = SEED) -> torch.Tensor:
    """Ω = Q diag(λ) Qᵀ (float64), Q Haar (the solvers' random starts are Gaussian, so any fixed
    basis gives them the same distribution of runs; Haar is the unbiased choice)."""
    d = len(lam)
    rng = np.random.default_rng([seed, d, 1])
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    Q *= np.sign(np.diag(R))
    omega = (Q * np.asarray(lam)) @ Q.T
    return torch.from_numpy(0.5 * (omega + omega.T))


def smollm2_spectra(layers=SMOLLM2_LAYERS, texts: int = 32) -> dict[str, list[float]]:
    """Sorted eigenvalues, divided by max|λ|, of Ω (Eq. 19) of real SmolLM2-135M-Instruct layers:
    the default :class:`LoraDAConfig` (float64 statistics) on the first ``texts`` HumanEval train
    texts (:mod:`lora_da_ref.real`), Ω from ``lora_da_ref.torch.factors.solve_layer``."""
    from lora_da_ref import real
    from lora_da_ref.torch import collect_statistics
    from lora_da_ref.torch.factors import solve_layer

    model, tokenizer = real.load_smollm2()
    batches = real.humaneval_batches("train", tokenizer, limit=texts)
    config = LoraDAConfig(
        rank=RANK, target_modules=tuple(layers), dtype=torch.float64, diagnostics="off"
    )
    stats = collect_statistics(model, batches, config=config, progress=False)
    out = {}
    for name in layers:
        omega = solve_layer(stats, name, config, probe=False).guidance.omega
        lam = torch.linalg.eigvalsh(omega.double())
        out[name] = (lam / lam.abs().max()).tolist()
    return out


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def certified_case(omega: torch.Tensor, r: int = RANK, seed: int = SEED, **options) -> dict:
    """eigh, the official 10-iteration LOBPCG and the certified solver (``options``: its own,
    default budget when empty) on one float64 Ω; angles are to eigh's subspace."""
    eigh, t_eigh = _timed(smallest_eigenpairs, omega, r, solver="eigh")
    official, t_off = _timed(
        smallest_eigenpairs, omega, r, solver="lobpcg", official=True, seed=seed
    )
    cert, t_cert = _timed(smallest_eigenpairs, omega, r, solver="certified", seed=seed, **options)
    diag = cert.diagnostics
    attempt = diag.get("certified_attempt", diag)
    return {
        "d": omega.shape[0],
        "gap": eigh.diagnostics["gap"],  # λ_{r+1} − λ_r; every Ω here has ‖Ω‖₂ = 1
        "time_eigh_s": t_eigh,
        "time_official_s": t_off,
        "time_certified_s": t_cert,
        "certified_over_eigh": t_cert / t_eigh,
        "angle_official": angle(official.vectors, eigh.vectors),
        "angle_certified": angle(cert.vectors, eigh.vectors),
        "certificate_rad": diag["certificate_rad"],
        "certified": diag["certified"],
        "fallback": diag["fallback"],
        "iterations": diag["iterations"],
        "matvecs": diag["matvecs"],
        "max_matvecs": attempt.get("max_matvecs"),
    }


def certified_rows(
    sizes,
    gaps,
    spectra: dict[str, list[float]] | None,
    rescalings=("quantile", "head"),
    **options,
) -> list[dict[str, Any]]:
    """:func:`certified_case` on the synthetic Ω of each size and gap, then on each spectrum of
    ``spectra`` (normalised to max|λ| = 1) rescaled to each size by each of ``rescalings``."""
    rows = []
    for d in sizes:
        for gap in gaps:
            omega, _ = synthetic_omega(d, gap)
            rows.append({"omega": f"synthetic gap {gap:g}", **certified_case(omega, **options)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for name, lam in (spectra or {}).items():
            for label in rescalings:
                head = HEAD if label == "head" else 0
                omega = omega_with_spectrum(rescale_spectrum(lam, d, head))
                short = name.removeprefix("model.")
                rows.append({"omega": f"smollm2 {short} ({label})", "n": len(lam)})
                rows[-1] |= certified_case(omega, **options)
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def certified_main(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    spectra = None
    if args.spectra and os.path.exists(args.spectra):
        with open(args.spectra) as fh:
            spectra = json.load(fh)["spectra"]
    elif not args.quick:
        spectra = smollm2_spectra(texts=args.smollm2_texts)
        if args.spectra:
            with open(args.spectra, "w") as fh:
                json.dump({"texts": args.smollm2_texts, "rank": RANK, "spectra": spectra}, fh)
                fh.write("\n")
    sources = {
        name: {
            "n": len(lam),
            "gap": lam[RANK] - lam[RANK - 1],
            "negative": sum(x < 0 for x in lam),
        }
        for name, lam in (spectra or {}).items()
    }
    options = {} if args.max_matvecs is None else {"max_matvecs": args.max_matvecs}
    if spectra and args.layers:
        spectra = {k: v for k, v in spectra.items() if any(s in k for s in args.layers)}
    rows = certified_rows(args.sizes, args.gaps, spectra, args.rescalings, **options)
    return {
        "rank": RANK,
        "tol_angle": TARGET_ANGLE,
        "budget_fraction_of_eigh_flops": CERTIFIED_BUDGET,
        "max_matvecs": args.max_matvecs,
        "smollm2_sources": sources,
        "head": HEAD,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d <= 256, two gaps, hidden 32")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--gaps", type=float, nargs="*", default=list(GAPS))
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--max-iter", type=int, default=MAX_ITER)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument(
        "--certified", action="store_true", help="eigh vs official LOBPCG vs certified solver"
    )
    parser.add_argument(
        "--spectra", default=None, help="SmolLM2 spectra JSON: read if present, else written"
    )
    parser.add_argument("--smollm2-texts", type=int, default=32)
    parser.add_argument("--layers", nargs="*", default=None, help="SmolLM2 spectra to use")
    parser.add_argument(
        "--rescalings", nargs="+", choices=("quantile", "head"), default=["quantile", "head"]
    )
    parser.add_argument(
        "--max-matvecs", type=int, default=None, help="certified solver's budget (default: its own)"
    )
    args = parser.parse_args(argv)
    if args.certified:
        if args.quick:
            args.sizes, args.gaps = [256], [1e-1, 1e-3]
        elif args.sizes == list(SIZES):
            args.sizes = list(CERTIFIED_SIZES)
        if args.gaps == list(GAPS):
            args.gaps = list(CERTIFIED_GAPS)
        return _emit(certified_main(args), args.out)
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
    return _emit(report, args.out)


def _emit(report: dict[str, Any], out: str | None) -> int:
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
