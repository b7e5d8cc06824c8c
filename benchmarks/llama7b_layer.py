"""LoRA-DA at the scale users fine-tune: one LLaMA-2-7B decoder layer, measured part by part (JSON).

Usage:
    python benchmarks/llama7b_layer.py [--quick] [--device cpu|cuda] [--out FILE]
        [--parts statistics fisher eigen extrapolate] [--redo PART ...] [--repeats 3]
        [--solve-repeats 1] [--sequences 2] [--length 512] [--calib-sequences 256]
        [--calib-length 512] [--model-dtype float32|bfloat16] [--threads N]

**Model.** Random-weight LLaMA (``lora_da_ref.data.tiny_llama``) with LLaMA-2-7B's layer: hidden
4096, intermediate 11008, 32 heads, no grouped-query attention, and a small vocabulary (512), so
the embedding and the output head cost next to nothing. The cost of *one decoder layer* is the
**marginal** cost: the same pass timed on a 2-layer and on a 1-layer model (same data), and the
difference taken, so whatever the embedding, the final norm, the head and the loss cost drops out.
Targets: the seven projections q, k, v, o, gate, up, down (d_in 4096, or 11008 for down). Rank
r = 8. ``--quick``: hidden 64, intermediate 176, 4 heads, vocab 128, 2 sequences × 16 tokens
(seconds; a smoke run, not a measurement).

**Parts** (each resumable: the JSON file ``--out`` keeps the finished parts and a rerun skips
them unless ``--redo PART``; ``extrapolate`` is arithmetic and always recomputed; a file measured
with other settings is refused rather than mixed). Each part prints one JSON line when done.

1. ``statistics``: ``collect_statistics`` with the default ``StatisticsConfig()`` (float32
   products, float64 running sums, split halves on; forced to one pass with
   ``max_statistics_bytes=None`` so that neither model is re-run by the memory plan, the plan
   ``"auto"`` would have made is recorded) and a plain training pass (forward+backward, every
   parameter requiring grad: ``init_overhead.plain_pass``), each on the 2- and the 1-layer model,
   ``--sequences`` × ``--length`` tokens at batch size 1 (default 2 × 512: sequences as long as the
   extrapolation's calibration texts, so that the per-batch costs, the running-sum adds of
   d_in² + d_in·d_out entries, are spread over as many tokens as there), run alternately
   ``--repeats`` times, fastest kept. ``*_per_token_per_layer_s`` = (2-layer − 1-layer seconds) /
   tokens (tokens = sequences × length, every position: the attention mask is all ones);
   ``statistics_over_plain`` their ratio. Memory: the peak resident-set growth during the pass
   (CPU; sampled every 2 ms) or the CUDA allocator peak, 2-layer − 1-layer, against the memory plan
   ``lora_da_ref.torch.memory.statistics_bytes`` of one layer's seven targets.
2. ``fisher``: per projection, in the pipeline's order with a shared Z-factor cache (k/v reuse
   q's Cholesky factor of Z, up reuses gate's: ``z_factor_cached``), float64, the default preset:
   ``kfac_fisher`` (damped Cholesky of Z, Y), ``fisher_gradient`` (ΔW = −Z⁻¹GY⁻¹) and
   ``guidance_from_delta`` (σ-normalisation and Ω = c·Z⁻¹ − ΔWΔWᵀ; Z⁻¹ is cached with the factor),
   on the 1-layer model's statistics of part 1 (recomputed, untimed, when part 1 ran in another
   process: same seed, same data). ``--solve-repeats`` times, fastest kept.
3. ``eigen``: per distinct d_in (4096: q's Ω; 11008: down's Ω, from part 2's Ω), the r = 8 smallest
   eigenpairs by dense float64 ``eigh`` (``solver="eigh"``; on the CPU LAPACK ``syevr`` for r + 1
   pairs), by the official 10-iteration LOBPCG (``LoraDAConfig.official().solver_options``: seeded
   start, no check) and by the certified solver when ``lora_da_ref.torch.solvers.SOLVERS`` has
   ``"certified"`` (a note otherwise), each with the largest principal angle to eigh's subspace
   (``diagnostics.principal_angles``; eigh to itself as a check: 0). The official LOBPCG's products
   with Ω are counted once more, untimed (``omega_products``: matvecs and reads of Ω), for the
   on-paper model. Then the same solvers on Ω = Q diag(λ) Qᵀ whose spectrum follows SmolLM2's
   measured spectra (``benchmarks/results/smollm2_omega_spectra.json``: the sorted eigenvalues of
   layer 15's q_proj and down_proj Ω, real SmolLM2-135M statistics, ÷ max|λ|): the q_proj spectrum
   at d = hidden, the down_proj one at d = intermediate, rescaled to d points by linear
   interpolation of the quantile function (``eigensolver_study.rescale_spectrum``; λ_min, λ_max and
   the distribution's shape kept) in a Haar-random basis (``eigensolver_study.omega_with_spectrum``;
   the solvers' starts are Gaussian, so any fixed basis gives the same distribution of runs). If
   that helper does not import, the same two steps are done here (``np.interp``, QR of a Gaussian
   matrix); without the spectra file this half is skipped with a note.
4. ``extrapolate`` (no compute): a whole LLaMA-2-7B init, 32 layers × 7 projections = 224 solves,
   on a calibration set of ``--calib-sequences`` × ``--calib-length`` tokens (default 256 × 512):

   - ours: statistics = statistics per token per layer × tokens × 32 (one pass); solves =
     32 × Σ_projections (Fisher + ΔW + Ω + eigen-solve at its d_in), one figure per solver;
   - the official code (docs/equations.md, "Official code"): one gradient pass, then one Fisher pass
     per 8 layers: **5 passes** over the calibration set for 32 layers (``ceil(32/8) + 1``). Per
     layer one of them collects its products (costed as our statistics pass) and the other 4 run
     it forward and backward (costed as a plain training pass): statistics = tokens × 32 ×
     (statistics + 4 × plain per token per layer); solves = 32 × Σ (Fisher + ΔW + Ω + its
     10-iteration LOBPCG). Its Fisher work is costed as ours (the same factorisations);
   - ``over_official`` = ours ÷ official per solver choice;
   - ``h100_on_paper``: the same two inits on one H100 SXM from flop and byte counts at published
     peaks (so lower bounds on time): BF16 dense 989 TFLOPS for the model's forward/backward,
     FP32 67 TFLOPS for the statistics' products (float32, and torch's matmuls do not use TF32
     unless asked; ``*_if_products_tf32`` at 495), FP64 67 TFLOPS (FP64 tensor cores; 34 without)
     for the solves, 3.35 TB/s of HBM for the running sums and for reading Ω. Per token per layer
     (P = 4h² + 3hm projection weights, T the context): plain pass 6P + 6Th (forward 2P, backward
     4P; causal attention QKᵀ and AV, 2Th forward); statistics pass 4P + 6Th (no weight gradients)
     + products in FP32: G = x gᵀ 2P, Z = x xᵀ 2·(lower-triangle panels of the pass), diagonal Y
     2·d_out; per batch and layer the float64 running sums move 24 bytes per summed entry (the
     float32 product written and read, the float64 sum read and written). Solves per projection:
     Cholesky and inverse of Z d³ (once per input group), ΔW's two triangular solves 2·d_in²·d_out,
     σ = the top eigenvalue of the smaller Gram k²·n + (4/3)k³, Ω's syrk d_in²·d_out; dense eigh
     **9·d³** (Golub & Van Loan: (4/3)d³ for the tridiagonal reduction and eigenvalues, ≈ 9d³ with
     every eigenvector, which is what ``torch.linalg.eigh`` computes on CUDA; the CPU's syevr for
     r + 1 vectors is ≈ (4/3)d³); LOBPCG max(matvecs·2d² / FP64, reads·8d² / HBM) with the
     products counted in part 3 (10 iterations: about 312 matvecs, 22 reads of Ω; the Rayleigh–Ritz
     work O(d·r²) is left out); the certified solver likewise from its own matvec count (reads =
     matvecs ÷ block size), plus eigh's when it fell back.

Full run on a quiet machine (``python benchmarks/llama7b_layer.py``): about 25–35 minutes on the
2-core development CPU, from the d³ scaling of measured solves (statistics ≈ 8 min at 3 repeats;
Fisher ≈ 3 min, down_proj's d = 11008 factorisations most of it; eigen ≈ 13–16 min: dense eigh at
d = 11008 ≈ 190 s on the layer's Ω and again on the SmolLM2-like Ω, a third time if the certified
solver falls back there, the Haar basis at d = 11008 ≈ 4 min, everything at d = 4096 ≈ 1 min),
and ≈ 14 GB of memory (two layers' statistics ≈ 9.2 GB in float64 during part 1, the models
2.4 GB).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from lora_da_ref.data import tiny_llama
from lora_da_ref.torch import collect_statistics
from lora_da_ref.torch import solvers as solvers_module
from lora_da_ref.torch.config import LoraDAConfig, StatisticsConfig
from lora_da_ref.torch.diagnostics import principal_angles
from lora_da_ref.torch.factors import SOLVE_DTYPE, kfac_fisher
from lora_da_ref.torch.guidance import fisher_gradient, guidance_from_delta, layer_guidance
from lora_da_ref.torch.memory import resolve_layers_per_pass, statistics_bytes
from lora_da_ref.torch.solvers import layer_seed, smallest_eigenpairs
from lora_da_ref.torch.statistics import KFACStatistics, gram_panels
from lora_da_ref.torch.targets import find_target_modules

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling benchmarks: init_overhead, eigensolver_study
    sys.path.insert(0, str(HERE))

from init_overhead import _measure_once as measure_once  # noqa: E402
from init_overhead import make_batches, plain_pass  # noqa: E402

FULL = dict(hidden=4096, intermediate=11008, heads=32, vocab=512, sequences=2, length=512)
QUICK = dict(hidden=64, intermediate=176, heads=4, vocab=128, sequences=2, length=16)
PARTS = ("statistics", "fisher", "eigen", "extrapolate")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK_OF = {p: "self_attn" if p in PROJECTIONS[:4] else "mlp" for p in PROJECTIONS}
LAYER = "model.layers.0"  # the layer whose statistics parts 2 and 3 solve (1-layer model)
RANK = 8
SOLVER_NAMES = ("eigh", "official_lobpcg", "certified")
MODEL_LAYERS = 32  # LLaMA-2-7B
OFFICIAL_LAYERS_PER_PASS = 8  # the official code's Fisher passes (docs/equations.md)
CALIBRATION = dict(sequences=256, length=512)  # the extrapolation's default calibration set
SPECTRA_FILE = HERE / "results" / "smollm2_omega_spectra.json"
SPECTRUM_SEED = 0
# One H100 SXM, published dense peaks (FLOP/s) and HBM3 bandwidth (bytes/s).
H100_SXM = {
    "fp64": 34e12,
    "fp64_tensor": 67e12,
    "fp32": 67e12,
    "tf32_tensor": 495e12,
    "bf16_tensor": 989e12,
    "hbm_bytes_per_s": 3.35e12,
}
EIGH_FLOPS_PER_D3 = 9.0  # eigenvalues and all eigenvectors (Golub & Van Loan)
RUNNING_SUM_BYTES = 24  # per summed entry and batch: float32 product write+read, float64 sum r+w
MB = 2**20
SIGNIFICANT = 5  # digits kept in the JSON


# ----------------------------------------------------------------------------- shapes and flops


def projection_name(p: str) -> str:
    return f"{LAYER}.{BLOCK_OF[p]}.{p}"


def projection_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each projection (no grouped-query attention)."""
    h, m = hidden, intermediate
    return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}  # fmt: skip


def input_group(p: str) -> str:
    return {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(p, p)


def eigen_sources(hidden: int, intermediate: int) -> dict[int, str]:
    """The first projection (in model order) of each distinct d_in: whose Ω part 3 solves."""
    out: dict[int, str] = {}
    for p, (d_in, _) in projection_shapes(hidden, intermediate).items():
        out.setdefault(d_in, p)
    return out


def gram_entries(d: int) -> int:
    """Entries of a (d, d) Gram sum the pass computes and adds (its lower-triangle panels)."""
    return sum((b - a) * b for a, b in gram_panels(d))


def layer_flop_model(hidden: int, intermediate: int, context: int) -> dict[str, float]:
    """Per token and decoder layer: the plain pass's and the statistics pass's flops, and the
    running sums' entries per batch (module docstring)."""
    shapes = projection_shapes(hidden, intermediate)
    P = sum(a * b for a, b in shapes.values())  # 4h² + 3hm
    attention = 6 * context * hidden
    z = sum(gram_entries(shapes[p][0]) for p in shapes if input_group(p) == p)
    y = sum(d_out for _, d_out in shapes.values())
    return {
        "projection_weights": P,
        "plain_flops_bf16": 6 * P + attention,
        "statistics_flops_bf16": 4 * P + attention,
        "statistics_product_flops_fp32": 2 * P + 2 * z + 2 * y,
        "running_sum_entries_per_batch": z + P + y,  # Z panels, one G half, diagonal Y
    }


def fisher_flops(p: str, hidden: int, intermediate: int) -> float:
    """Flops of one projection's Fisher, ΔW and Ω (module docstring)."""
    d_in, d_out = projection_shapes(hidden, intermediate)[p]
    k, n = min(d_in, d_out), max(d_in, d_out)
    shared = d_in**3 if input_group(p) == p else 0  # potrf d³/3 + potri 2d³/3, once per group
    return shared + 2 * d_in**2 * d_out + k * k * n + 4 / 3 * k**3 + d_in**2 * d_out


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """One invocation: settings, results so far, and what parts 2 and 3 share in memory."""

    args: argparse.Namespace
    sizes: dict[str, int]
    device: torch.device
    dtype: torch.dtype
    results: dict[str, Any]
    stats: KFACStatistics | None = None
    omegas: dict[str, Tensor] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    part: str = ""  # the part running now

    def model(self, layers: int) -> torch.nn.Module:
        s = self.sizes
        model = tiny_llama(0, hidden=s["hidden"], layers=layers, intermediate=s["intermediate"],
                           heads=s["heads"], kv_heads=s["heads"], vocab=s["vocab"])  # fmt: skip
        return model.to(device=self.device, dtype=self.dtype)

    def batches(self) -> list[dict]:
        return make_batches(self.sizes, self.args.batch_size, self.device)

    def statistics(self) -> KFACStatistics:
        """The 1-layer model's statistics of part 1, recomputed (untimed) if not in memory."""
        if self.stats is None:
            model = self.model(1)
            targets = find_target_modules(model, list(PROJECTIONS))
            self.stats = collect_statistics(
                model, self.batches(), targets, STATISTICS_CONFIG, progress=False
            )
            self.notes[self.part] = (
                "part 1's statistics recomputed here (untimed): same model, same data"
            )
        return self.stats

    def omega(self, p: str) -> Tensor:
        """Ω of projection ``p`` (from part 2 when it ran in this process)."""
        if p not in self.omegas:
            stats, name = self.statistics(), projection_name(p)
            J = kfac_fisher(stats, name, SOLVE_CONFIG)
            self.omegas[p] = layer_guidance(J, stats.G[name].to(SOLVE_DTYPE), SOLVE_CONFIG).omega
        return self.omegas[p]


# The default statistics, forced to one pass (the memory plan would re-run a model otherwise).
STATISTICS_CONFIG = StatisticsConfig(max_statistics_bytes=None)
SOLVE_CONFIG = LoraDAConfig(rank=RANK).solve_config()  # the default preset's solve


def _fastest(runs: dict[str, list[tuple[float, float | None]]]) -> dict[str, dict]:
    out = {}
    for key, rs in runs.items():
        peaks = [m for _, m in rs if m is not None]
        out[key] = {"seconds": min(s for s, _ in rs), "peak_mb": max(peaks) if peaks else None}
    return out


def part_statistics(run: Run) -> dict[str, Any]:
    device, repeats = run.device, run.args.repeats
    batches = run.batches()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    models = {2: run.model(2), 1: run.model(1)}
    targets = {n: find_target_modules(m, list(PROJECTIONS)) for n, m in models.items()}
    planned = {
        n: sum(b.total for b in statistics_bytes(t, STATISTICS_CONFIG).values())
        for n, t in targets.items()
    }
    default_plan = resolve_layers_per_pass(targets[2], StatisticsConfig(), device)
    collect = {
        n: partial(collect_statistics, m, batches, targets[n], STATISTICS_CONFIG, progress=False)
        for n, m in models.items()
    }
    for n, m in models.items():  # warm-up: first-call allocations and kernel selection
        plain_pass(m, batches[:1])
        collect_statistics(m, batches[:1], targets[n], STATISTICS_CONFIG, progress=False)
    fns: dict[str, Callable[[], Any]] = {
        "plain_two_layers": partial(plain_pass, models[2], batches),
        "statistics_two_layers": collect[2],
        "plain_one_layer": partial(plain_pass, models[1], batches),
        "statistics_one_layer": collect[1],
    }
    runs: dict[str, list] = {k: [] for k in fns}
    run.stats = None
    for rep in range(repeats):  # alternately: ratios compare the same stretch of machine load
        for key, fn in fns.items():
            if key == "statistics_one_layer":
                run.stats = None  # free the kept statistics before measuring again
            seconds, peak, out = measure_once(fn, device)
            runs[key].append((seconds, peak))
            if key == "statistics_one_layer" and rep == repeats - 1:
                run.stats = out  # parts 2 and 3 solve these
            del out
    counted = run.stats.tokens
    del models, collect, fns
    best = _fastest(runs)
    sec = {k: v["seconds"] for k, v in best.items()}
    peak = {k: v["peak_mb"] for k, v in best.items()}
    plain_ptl = (sec["plain_two_layers"] - sec["plain_one_layer"]) / tokens
    stats_ptl = (sec["statistics_two_layers"] - sec["statistics_one_layer"]) / tokens
    marginal_peak = _difference(peak["statistics_two_layers"], peak["statistics_one_layer"])
    marginal_plan = (planned[2] - planned[1]) / MB
    return {
        "sequences": run.sizes["sequences"],
        "length": run.sizes["length"],
        "batch_size": run.args.batch_size,
        "tokens": tokens,
        "tokens_counted_by_the_pass": counted,
        "repeats": repeats,
        "seconds": sec,
        "plain_per_token_per_layer_s": plain_ptl,
        "statistics_per_token_per_layer_s": stats_ptl,
        "statistics_over_plain": stats_ptl / plain_ptl if plain_ptl else None,
        "statistics_config": "StatisticsConfig(max_statistics_bytes=None): the default, one pass",
        "default_plan_layers_per_pass": default_plan,  # None: one pass
        "memory": {
            "kind": "cuda_allocator_peak" if device.type == "cuda" else "rss_peak_increase",
            "statistics_mb": {
                "two_layers": peak["statistics_two_layers"],
                "one_layer": peak["statistics_one_layer"],
                "marginal": marginal_peak,
            },
            "plain_mb": {
                "two_layers": peak["plain_two_layers"],
                "one_layer": peak["plain_one_layer"],
            },
            "planned_mb": {
                "two_layers": planned[2] / MB,
                "one_layer": planned[1] / MB,
                "marginal": marginal_plan,
            },
            "marginal_measured_over_planned": (
                marginal_peak / marginal_plan if marginal_peak is not None else None
            ),
        },
    }


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def part_fisher(run: Run) -> dict[str, Any]:
    stats, device = run.statistics(), run.device
    shapes = projection_shapes(run.sizes["hidden"], run.sizes["intermediate"])
    keep = set(eigen_sources(run.sizes["hidden"], run.sizes["intermediate"]).values())
    best: dict[str, dict[str, Any]] = {}
    for _ in range(run.args.solve_repeats):
        z_factors: dict = {}  # the pipeline's cache, fresh each repeat
        for p in PROJECTIONS:
            name = projection_name(p)
            cached = stats.group_of[name] in z_factors
            t_j, _, J = measure_once(partial(kfac_fisher, stats, name, SOLVE_CONFIG, z_factors),
                                     device)  # fmt: skip
            G = stats.G[name].to(SOLVE_DTYPE)
            t_d, _, delta = measure_once(partial(fisher_gradient, J, G), device)
            t_o, _, guide = measure_once(
                partial(guidance_from_delta, J, delta, SOLVE_CONFIG, name), device
            )
            if p in keep:
                run.omegas[p] = guide.omega
            row = {"fisher_s": t_j, "delta_w_s": t_d, "omega_s": t_o}
            old = best.get(p)
            best[p] = {k: min(v, old[k]) if old else v for k, v in row.items()}
            best[p] |= {"d_in": shapes[p][0], "d_out": shapes[p][1], "z_factor_cached": cached}
            del J, G, delta, guide
    for row in best.values():
        row["total_s"] = row["fisher_s"] + row["delta_w_s"] + row["omega_s"]
    return {
        "dtype": "float64",
        "preset": "default (relative damping); the official preset's absolute damping costs the same",
        "repeats": run.args.solve_repeats,
        "projections": best,
        "per_layer_s": sum(r["total_s"] for r in best.values()),
    }


class OmegaProducts(TorchDispatchMode):
    """Counts the products with a (d, d) operand (Ω) while active: vectors and reads of Ω."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d, self.matvecs, self.reads = d, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            a, b = args[0], args[1]
            if tuple(a.shape) == (self.d, self.d):
                self.matvecs, self.reads = self.matvecs + b.shape[1], self.reads + 1
            elif tuple(b.shape) == (self.d, self.d):
                self.matvecs, self.reads = self.matvecs + a.shape[0], self.reads + 1
        return func(*args, **(kwargs or {}))


def solver_calls(seed: int) -> dict[str, Callable[[Tensor], Any]]:
    """The solvers of part 3 on an Ω: eigh, the official LOBPCG, the certified one if present."""
    calls = {
        "eigh": partial(smallest_eigenpairs, r=RANK, solver="eigh"),
        "official_lobpcg": partial(
            smallest_eigenpairs,
            r=RANK,
            solver="lobpcg",
            seed=seed,
            **LoraDAConfig.official().solver_options,
        ),
    }
    if "certified" in solvers_module.SOLVERS:
        calls["certified"] = partial(smallest_eigenpairs, r=RANK, solver="certified", seed=seed)
    return calls


DIAGNOSTIC_KEYS = ("solver", "iterations", "residual", "gap", "fallback", "certified",
                   "certificate_rad", "matvecs", "max_matvecs", "guard")  # fmt: skip


def solve_all(omega: Tensor, seed: int, run: Run, count: bool) -> dict[str, Any]:
    """Each solver's fastest time over ``--solve-repeats`` and largest principal angle to eigh."""
    out: dict[str, Any] = {"d": omega.shape[0]}
    results = {}
    for name, call in solver_calls(seed).items():
        times = []
        for _ in range(run.args.solve_repeats):
            try:
                seconds, _, res = measure_once(partial(call, omega), run.device)
            except Exception as err:  # the certified solver is being written: record, go on
                if name != "certified":
                    raise
                out[name] = {"error": f"{type(err).__name__}: {err}"}
                break
            times.append(seconds)
        if times:
            results[name] = res
            diag = res.diagnostics
            attempt = diag.get("certified_attempt", {})
            kept = {k: diag.get(k, attempt.get(k)) for k in DIAGNOSTIC_KEYS}
            out[name] = {"seconds": min(times), **{k: v for k, v in kept.items() if v is not None}}
    eigh = results["eigh"].vectors
    for name, res in results.items():
        out[name]["angle_to_eigh"] = float(principal_angles(res.vectors, eigh).max())
    if "certified" not in solvers_module.SOLVERS:
        out["certified"] = {"skipped": "lora_da_ref.torch.solvers.SOLVERS has no 'certified'"}
    if count:  # the official LOBPCG's products with Ω, untimed (for the on-paper model)
        with OmegaProducts(omega.shape[0]) as counter:
            solver_calls(seed)["official_lobpcg"](omega)
        out["official_lobpcg"]["omega_products"] = {
            "matvecs": counter.matvecs,
            "reads": counter.reads,
        }
    return out


def spectrum_tools() -> tuple[Callable, Callable, str]:
    """(rescale, omega_with_spectrum, source): eigensolver_study's helpers, else the same here."""
    try:
        from eigensolver_study import omega_with_spectrum, rescale_spectrum

        return rescale_spectrum, omega_with_spectrum, "benchmarks/eigensolver_study.py helpers"
    except Exception:  # that file is another engineer's work in progress: do without it
        return _rescale_spectrum, _omega_with_spectrum, "this script's own (np.interp, Haar QR)"


def _rescale_spectrum(lam: Any, d: int) -> Any:
    import numpy as np

    lam = np.sort(np.asarray(lam, dtype=np.float64))
    return np.interp(np.linspace(0.0, 1.0, d), np.linspace(0.0, 1.0, lam.size), lam)


def _omega_with_spectrum(lam: Any, seed: int = SPECTRUM_SEED) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    d = len(lam)
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))  # Haar
    omega = (Q * torch.as_tensor(lam, dtype=torch.float64)) @ Q.mT
    return 0.5 * (omega + omega.mT)


def part_eigen(run: Run) -> dict[str, Any]:
    sources = eigen_sources(run.sizes["hidden"], run.sizes["intermediate"])
    omegas = {d: run.omega(p) for d, p in sources.items()}
    run.stats = None  # only Ω is needed from here: free the statistics
    out: dict[str, Any] = {"rank": RANK, "repeats": run.args.solve_repeats, "real": {}}
    warm = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for call in solver_calls(0).values():  # warm-up: first-call library loads, thread pools
        call((warm + warm.mT).to(run.device))
    for d, p in sources.items():
        name = projection_name(p)
        omega = omegas.pop(d).to(run.device)
        out["real"][str(d)] = {"projection": p, **solve_all(omega, layer_seed(0, name), run, True)}
        run.omegas.pop(p, None)
        del omega
    if not SPECTRA_FILE.exists():
        out["smollm2_spectra"] = {"skipped": f"no {SPECTRA_FILE.relative_to(HERE.parent)}"}
        return out
    with open(SPECTRA_FILE) as fh:
        spectra = json.load(fh)["spectra"]
    rescale, build, source = spectrum_tools()
    rows: dict[str, Any] = {"rescaling": "quantile function, linear interpolation",
                            "basis": "Haar random", "helpers": source}  # fmt: skip
    for d, p in sources.items():
        spectrum = next((k for k in spectra if k.endswith(f".{p}")), next(iter(spectra)))
        start = time.perf_counter()
        omega = torch.as_tensor(build(rescale(spectra[spectrum], d), SPECTRUM_SEED))
        omega = omega.to(device=run.device, dtype=torch.float64)
        built = time.perf_counter() - start
        row = solve_all(omega, SPECTRUM_SEED, run, False)
        rows[str(d)] = {"spectrum": spectrum, "points": len(spectra[spectrum]),
                        "build_s": built, **row}  # fmt: skip
        del omega
    out["smollm2_spectra"] = rows
    return out


# ----------------------------------------------------------------------------- extrapolation


def part_extrapolate(run: Run) -> dict[str, Any]:
    missing = [p for p in PARTS[:3] if p not in run.results["parts"]]
    if missing:
        raise SystemExit(f"extrapolate needs the parts {missing} in {run.args.out}: run them")
    parts = run.results["parts"]
    if run.sizes["length"] != run.args.calib_length:
        run.notes["extrapolate"] = (
            f"part 1 measured sequences of {run.sizes['length']} tokens, the extrapolation has "
            f"{run.args.calib_length}: per-batch costs and attention do not scale per token"
        )
    return extrapolate(
        parts,
        run.sizes["hidden"],
        run.sizes["intermediate"],
        run.args.calib_sequences,
        run.args.calib_length,
        MODEL_LAYERS,
    )


def extrapolate(
    parts: dict[str, Any],
    hidden: int,
    intermediate: int,
    sequences: int,
    length: int,
    layers: int = MODEL_LAYERS,
) -> dict[str, Any]:
    """Whole-model init times from the parts' numbers (measured) and from flop counts (H100)."""
    tokens = sequences * length
    stats, fisher, eigen = parts["statistics"], parts["fisher"], parts["eigen"]
    shapes = projection_shapes(hidden, intermediate)
    passes = math.ceil(layers / OFFICIAL_LAYERS_PER_PASS) + 1
    stats_ptl = stats["statistics_per_token_per_layer_s"]
    plain_ptl = stats["plain_per_token_per_layer_s"]
    fisher_layer = sum(fisher["projections"][p]["total_s"] for p in PROJECTIONS)

    def eigen_layer(solver: str) -> float | None:
        rows = [eigen["real"][str(shapes[p][0])].get(solver, {}) for p in PROJECTIONS]
        if any("seconds" not in r for r in rows):
            return None
        return sum(r["seconds"] for r in rows)

    official_stats = tokens * layers * (stats_ptl + (passes - 1) * plain_ptl)
    official_solves = layers * (fisher_layer + eigen_layer("official_lobpcg"))
    official = {
        "passes": passes,
        "statistics_s": official_stats,
        "solves_s": official_solves,
        "total_s": official_stats + official_solves,
    }
    ours_stats = stats_ptl * tokens * layers
    ours: dict[str, Any] = {}
    for solver in SOLVER_NAMES:
        per_layer = eigen_layer(solver)
        if per_layer is None:
            ours[solver] = {"skipped": f"no {solver} timing in part eigen"}
            continue
        solves = layers * (fisher_layer + per_layer)
        ours[solver] = {
            "statistics_s": ours_stats,
            "solves_s": solves,
            "total_s": ours_stats + solves,
            "over_official": (ours_stats + solves) / official["total_s"],
        }
    return {
        "calibration_sequences": sequences,
        "calibration_length": length,
        "tokens": tokens,
        "model_layers": layers,
        "solves": layers * len(PROJECTIONS),
        "official_passes_counted": (
            f"{passes}: one gradient pass + one Fisher pass per {OFFICIAL_LAYERS_PER_PASS} of "
            f"{layers} layers (docs/equations.md); per layer one pass collects (costed as our "
            f"statistics pass) and {passes - 1} run it forward and backward (a plain pass each)"
        ),
        "measured": {"ours": ours, "official": official},
        "h100_on_paper": h100_on_paper(parts, hidden, intermediate, sequences, length, layers),
    }


def h100_on_paper(
    parts: dict[str, Any], hidden: int, intermediate: int, sequences: int, length: int,
    layers: int,
) -> dict[str, Any]:  # fmt: skip
    """The whole init on one H100 SXM from flop and byte counts at published peaks."""
    rate = H100_SXM
    tokens, batches = sequences * length, sequences  # batch size 1, as the official code
    model = layer_flop_model(hidden, intermediate, length)
    sums_s = batches * RUNNING_SUM_BYTES * model["running_sum_entries_per_batch"]
    sums_s /= rate["hbm_bytes_per_s"]
    pass_s = tokens * model["statistics_flops_bf16"] / rate["bf16_tensor"]
    products = tokens * model["statistics_product_flops_fp32"]
    stats_layer = pass_s + products / rate["fp32"] + sums_s
    stats_layer_tf32 = pass_s + products / rate["tf32_tensor"] + sums_s
    plain_layer = tokens * model["plain_flops_bf16"] / rate["bf16_tensor"]
    passes = math.ceil(layers / OFFICIAL_LAYERS_PER_PASS) + 1
    shapes = projection_shapes(hidden, intermediate)
    eigen = parts["eigen"]["real"]
    fisher_layer = sum(fisher_flops(p, hidden, intermediate) for p in PROJECTIONS)
    fisher_layer_s = fisher_layer / rate["fp64_tensor"]

    def eigh_s(d: int) -> float:
        return EIGH_FLOPS_PER_D3 * d**3 / rate["fp64_tensor"]

    def products_s(d: int, matvecs: int, reads: int) -> float:
        return max(matvecs * 2 * d * d / rate["fp64_tensor"], reads * 8 * d * d
                   / rate["hbm_bytes_per_s"])  # fmt: skip

    def solver_s(solver: str, d: int) -> float | None:
        row = eigen[str(d)].get(solver, {})
        if solver == "eigh":
            return eigh_s(d)
        if solver == "official_lobpcg":
            counted = row.get("omega_products")
            return None if counted is None else products_s(d, counted["matvecs"], counted["reads"])
        if "seconds" not in row:
            return None
        matvecs = row.get("matvecs") or 0
        block = RANK + (row.get("guard") or RANK)
        seconds = products_s(d, matvecs, math.ceil(matvecs / block))
        return seconds + (eigh_s(d) if not row.get("certified") else 0.0)

    def solves(solver: str) -> float | None:
        per = [solver_s(solver, shapes[p][0]) for p in PROJECTIONS]
        return None if any(s is None for s in per) else layers * (fisher_layer_s + sum(per))

    ours_stats = layers * stats_layer
    official_stats = layers * (stats_layer + (passes - 1) * plain_layer)
    official_solves = solves("official_lobpcg")
    official_total = official_stats + (official_solves or 0.0)
    ours = {}
    for solver in SOLVER_NAMES:
        s = solves(solver)
        ours[solver] = (
            {"skipped": f"no {solver} record in part eigen"}
            if s is None
            else {
                "statistics_s": ours_stats,
                "solves_s": s,
                "total_s": ours_stats + s,
                "over_official": (ours_stats + s) / official_total,
            }
        )
    return {
        "rates": {
            "model_forward_backward": "BF16 dense 989 TFLOPS",
            "statistics_products": "FP32 67 TFLOPS (float32 products, TF32 off: torch's default)",
            "solves": "FP64 tensor cores 67 TFLOPS (34 without)",
            "memory": "HBM3 3.35 TB/s (running sums, reading Ω)",
            "peaks": H100_SXM,
            "note": "published peaks: every time below is a lower bound",
        },
        "flop_model_per_token_per_layer": model,
        "eigh_flops": f"{EIGH_FLOPS_PER_D3:g}·d³ (eigenvalues and all eigenvectors)",
        "statistics_per_layer_s": stats_layer,
        "statistics_per_layer_if_products_tf32_s": stats_layer_tf32,
        "plain_pass_per_layer_s": plain_layer,
        "running_sums_per_layer_s": sums_s,
        "fisher_per_layer_flops": fisher_layer,
        "eigen_per_solve_s": {
            solver: {str(d): solver_s(solver, d) for d in sorted({s[0] for s in shapes.values()})}
            for solver in SOLVER_NAMES
        },
        "ours": ours,
        "official": {
            "passes": passes,
            "statistics_s": official_stats,
            "solves_s": official_solves,
            "total_s": official_total,
        },
    }


# ----------------------------------------------------------------------------- results file


PART_FUNCTIONS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "statistics": part_statistics,
    "fisher": part_fisher,
    "eigen": part_eigen,
    "extrapolate": part_extrapolate,
}


def settings_of(args: argparse.Namespace, sizes: dict[str, int]) -> dict[str, Any]:
    """What the measured parts depend on: a file measured with other settings is not resumed."""
    return {**sizes, "batch_size": args.batch_size, "rank": RANK, "device": args.device,
            "model_dtype": args.model_dtype, "quick": args.quick}  # fmt: skip


def load_results(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    if not path.exists():
        return {"benchmark": "llama7b_layer", "settings": settings, "parts": {}}
    with open(path) as fh:
        data = json.load(fh)
    if data.get("settings") != settings:
        raise SystemExit(
            f"{path} holds parts measured with other settings ({data.get('settings')}, now "
            f"{settings}): use another --out, or delete the file"
        )
    return data


def save_results(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def rounded(value: Any) -> Any:
    """``SIGNIFICANT`` significant digits for floats, recursively (JSON-ready)."""
    if isinstance(value, dict):
        return {str(k): rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
        return rounded(value)
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT}g}") if math.isfinite(value) else str(value)
    return value


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (parts 1-3)")
    parser.add_argument("--model-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=None, help="results JSON (kept between runs)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--redo", nargs="+", default=[], choices=[*PARTS, "all"],
                        help="measure these again even if the file has them")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="statistics: fastest of k")
    parser.add_argument("--solve-repeats", type=int, default=1, help="fisher, eigen: fastest of k")
    parser.add_argument("--sequences", type=int, default=None, help="part 1's sequences")
    parser.add_argument("--length", type=int, default=None, help="part 1's tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--calib-sequences", type=int, default=CALIBRATION["sequences"])
    parser.add_argument("--calib-length", type=int, default=CALIBRATION["length"])
    args = parser.parse_args(argv)
    if args.out is None:
        name = "llama7b_layer_quick.json" if args.quick else "llama7b_layer.json"
        args.out = str(HERE / "results" / name)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device present")
    sizes = dict(QUICK if args.quick else FULL)
    for key in ("sequences", "length"):
        if getattr(args, key):
            sizes[key] = getattr(args, key)
    path = Path(args.out)
    results = load_results(path, settings_of(args, sizes))
    dtype = getattr(torch, args.model_dtype)
    run = Run(args, sizes, device, dtype, results)
    redo = set(PARTS) if "all" in args.redo else set(args.redo)
    torch.manual_seed(0)
    for part in PARTS:
        if part not in args.parts:
            continue
        if part in results["parts"] and part not in redo and part != "extrapolate":
            print(json.dumps({"part": part, "skipped": f"already in {path}"}), flush=True)
            continue
        start, run.part = time.perf_counter(), part
        record = {
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "environment": environment(device),
            **PART_FUNCTIONS[part](run),
        }
        record["wall_s"] = time.perf_counter() - start
        if part in run.notes:
            record["note"] = run.notes[part]
        results["parts"][part] = rounded(record)
        save_results(path, results)
        print(json.dumps({"part": part, **results["parts"][part]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
