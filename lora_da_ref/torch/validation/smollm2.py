"""``--case smollm2``: the real pretrained SmolLM2-135M-Instruct on HumanEval, all 210 projections.

Calibration set: the first ``texts`` (default 64) HumanEval *train* tasks (:mod:`lora_da_ref.real`),
prompt + canonical solution at batch size 1, loss on the completion tokens. One forward/backward
per text feeds every statistic below (:func:`calibration_statistics`): the K-FAC statistics of
both presets — ``official`` (Z and diag Y over every position, batch-scaled scores, G averaged per
sequence) and ``paper`` = the production default :class:`LoraDAConfig` (Z and full Y over the loss
positions, per-token scores, token-weighted G) — accumulated in float64 per half of the texts
and in float32 (the default statistics dtype) over all of them, with the normalisation of
:mod:`lora_da_ref.torch.statistics` (checked against ``collect_statistics`` in the tests). Ω and
ΔW come from the one production map :mod:`lora_da_ref.torch.factors` (``kfac_fisher``,
``layer_guidance``). Subspaces are compared by principal angles and by the regret

    rel_regret(A; Ω) = (tr(AᵀΩA) − (λ1+…+λr)) / |λ1+…+λr|      (λ: the r smallest of Ω, Eq. 8)

with the reference eigenpairs from dense float64 ``eigh`` (LAPACK ``evr``, r smallest only).

Parts (``parts``), per layer:

* ``solver`` — on the official preset's Ω (float64 statistics): the production default solver
  (``LoraDAConfig().solver``), the official 10-iteration LOBPCG and LOBPCG to tolerance vs eigh.
* ``precision`` — both presets: A0 from float32 statistics (the default dtype, through the
  production map, solved by eigh) vs from float64 statistics; angle, regret under the float64 Ω.
* ``conditioning`` — cond(Z) (both presets' masks), cond(diag Y) (official), cond(Y) (paper), and
  the damping ``kfac_fisher`` applied.
* ``stability`` — the texts split in two halves: LoRA-DA (both presets) and LoRA-One (top-r left
  singular vectors of −G) on each half; all r principal angles between the halves' subspaces and
  the regret of half 1's A0 under half 2's Ω.
* ``kfac`` — ground truth of K-FAC on real weights (:func:`kfac_truth`): the exact per-token
  empirical Fisher of a seeded coordinate sub-block ``W[I, J]`` of a few layers of every module
  type (it is exactly the principal sub-matrix of the layer's Fisher) against the K-FAC block
  ``Y[J,J] ⊗ Z[I,I]``; LoRA-DA computed with the NumPy reference on that sub-block from each.

Cost (docs/real_model.md): the statistics of ``layers_per_pass`` decoder layers are held at once
(≈ 390 MB per SmolLM2 decoder layer: both presets' float64 halves and float32 sums); the
per-layer solves of a pass run in ``workers`` forked processes, one BLAS thread each, so the
results do not depend on the number of workers.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

from lora_da_ref import real
from lora_da_ref.data import right_pad
from lora_da_ref.reference import guidance as np_guidance
from lora_da_ref.reference.linalg import principal_angles
from lora_da_ref.torch.config import DEFAULT_TARGETS, LoraDAConfig
from lora_da_ref.torch.factors import kfac_fisher
from lora_da_ref.torch.guidance import layer_guidance
from lora_da_ref.torch.memory import layer_passes
from lora_da_ref.torch.solvers import layer_seed, smallest_eigenpairs
from lora_da_ref.torch.statistics import IGNORE_INDEX, KFACStatistics, model_guard
from lora_da_ref.torch.targets import find_target_modules
from lora_da_ref.torch.threads import one_blas_thread

__all__ = [
    "MODULE_TYPES",
    "PARTS",
    "PRESETS",
    "CalibrationStatistics",
    "SmolLM2Options",
    "calibration_statistics",
    "format_smollm2",
    "kfac_truth",
    "rel_regret",
    "run_smollm2",
    "summarize",
    "top_left_singular",
]

PARTS = ("solver", "precision", "conditioning", "stability", "kfac")
MODULE_TYPES = DEFAULT_TARGETS  # q k v o gate up down
ANGLE_FLAG = 1e-3  # radians: "above 1e-3" counts in the summary
Batch = dict[str, Any]


def _presets(rank: int, seed: int) -> dict[str, LoraDAConfig]:
    return {
        "official": LoraDAConfig.official(rank=rank, seed=seed, dtype=torch.float64),
        "paper": LoraDAConfig.paper_literal(rank=rank, seed=seed, dtype=torch.float64),
    }


PRESETS = ("official", "paper")


@dataclass(frozen=True)
class SmolLM2Options:
    """Settings of the smollm2 case (CLI: ``--texts --parts --layers --rank --seed --kfac-*``)."""

    texts: int = 64
    rank: int = 8
    layers: Sequence[str] | str | None = None  # PEFT target forms; default: all seven types
    parts: Sequence[str] = PARTS
    seed: int = 0
    kfac_layers: int = 2  # per module type
    kfac_block: tuple[int, int] = (32, 12)  # |I| input × |J| output coordinates
    kfac_texts: int = 16
    kfac_length: int = 64
    layers_per_pass: int | None = 15  # decoder layers per statistics pass (memory); None = all
    workers: int | None = None  # processes for the per-layer solves; None = one per core (≤ 8)

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"unknown parts {unknown}; choose from {list(PARTS)}")
        if self.layers_per_pass is not None and (
            isinstance(self.layers_per_pass, bool)
            or not isinstance(self.layers_per_pass, int)
            or self.layers_per_pass < 1
        ):
            raise ValueError(
                f"layers_per_pass must be a positive integer or None, got {self.layers_per_pass!r}"
            )
        if self.workers is not None and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1
        ):
            raise ValueError(f"workers must be a positive integer or None, got {self.workers!r}")
        for name in ("texts", "rank", "kfac_layers", "kfac_texts", "kfac_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if "stability" in self.parts and self.texts < 2:
            raise ValueError("stability needs at least 2 texts (two halves)")


# ----------------------------------------------------------------------------- statistics


@dataclass
class _Sums:
    Z: dict[str, Tensor] = field(default_factory=dict)
    Y: dict[str, Tensor] = field(default_factory=dict)
    G: dict[str, Tensor] = field(default_factory=dict)
    tokens: int = 0
    loss_tokens: int = 0
    weight: float = 0.0
    sequences: int = 0

    def finalize(self, group_of: dict[str, str], *others: _Sums) -> KFACStatistics:
        """As :func:`lora_da_ref.torch.statistics.finalize` (Z, Y / |P|; G / Σ w_b) of these sums
        merged with ``others``, lazily: each matrix is summed and divided when it is read
        (:class:`_Finalized`), so no second copy of every layer's statistics is held."""
        parts = [p for p in (self, *others) if p.sequences] or [self]  # an empty half adds nothing
        tokens, weight = sum(p.tokens for p in parts), sum(p.weight for p in parts)
        return KFACStatistics(
            Z=_Finalized([p.Z for p in parts], tokens),
            Y=_Finalized([p.Y for p in parts], tokens),
            G=_Finalized([p.G for p in parts], weight),
            group_of=dict(group_of),
            tokens=tokens,
            loss_tokens=sum(p.loss_tokens for p in parts),
            sequences=sum(p.sequences for p in parts),
            batches=sum(p.sequences for p in parts),
        )


class _Finalized(Mapping):
    """Read-only ``key → (Σ_parts part[key]) / scale``, computed on access (a new tensor)."""

    def __init__(self, parts: list[dict[str, Tensor]], scale: float) -> None:
        self._parts, self._scale = parts, scale

    def __getitem__(self, key: str) -> Tensor:
        total = self._parts[0][key]
        for part in self._parts[1:]:
            total = total + part[key]
        return total / self._scale

    def __iter__(self):
        return iter(self._parts[0])

    def shape(self, key: str) -> torch.Size:
        return self._parts[0][key].shape

    def __len__(self) -> int:
        return len(self._parts[0])


def _acc(store: dict[str, Tensor], key: str, value: Tensor) -> None:
    if key in store:
        store[key] += value
    else:
        store[key] = value.clone()


@dataclass
class CalibrationStatistics:
    """Per preset: ``halves[p]`` (two float64 KFACStatistics), ``full64[p]`` (their merge) and
    ``full32[p]`` (float32 accumulation over all texts), plus the input groups."""

    halves: dict[str, list[KFACStatistics]]
    full64: dict[str, KFACStatistics]
    full32: dict[str, KFACStatistics]
    group_of: dict[str, str]
    seconds: float


def calibration_statistics(
    model: nn.Module,
    batches: Sequence[Batch],
    targets: dict[str, nn.Linear],
    *,
    float32: bool = True,
) -> CalibrationStatistics:
    """K-FAC statistics of both presets from ONE forward/backward per batch (batch size 1).

    Per batch ``b`` with ``T_b`` loss tokens (``labels[t+1] ≠ −100``), ``g = ∂L_b/∂o`` (HF's mean
    loss), ``x`` the layer input:

    * official: ``Z += Σ_all x xᵀ``, ``Y += Σ_all g²`` (diagonal, score ``g``), ``G += ∇L_b``
      (``w_b = 1``), normalised by the number of positions and of sequences;
    * paper (default config): ``Z += Σ_P x xᵀ``, ``Y += Σ_P (T_b g)(T_b g)ᵀ``, ``G += T_b ∇L_b``
      over the loss positions ``P``, normalised by ``|P|`` and ``Σ T_b``;

    float64 sums per half (first ⌈n/2⌉ batches, the rest) and float32 sums over all, each product
    formed in its accumulation dtype as ``collect_statistics`` does.
    """
    start = time.perf_counter()
    names = list(targets)
    half_of = [0 if i < (len(batches) + 1) // 2 else 1 for i in range(len(batches))]
    sums = {(p, h): _Sums() for p in PRESETS for h in (0, 1)}
    sums32 = {p: _Sums() for p in PRESETS}
    group_of: dict[str, str] = {}
    captured: dict[str, Any] = {}

    def forward_hook(name: str, module: nn.Module, inputs: tuple[Any, ...], out: Tensor) -> None:
        x = inputs[0]
        group = next((g for g, t in captured["x"].items() if t is x), name)
        group_of.setdefault(name, group)
        captured["x"].setdefault(group, x)
        if not out.requires_grad:
            out.requires_grad_(True)
        captured["out"][name] = out

    handles = [m.register_forward_hook(_partial(forward_hook, n)) for n, m in targets.items()]
    try:
        with model_guard(model):
            for i, batch in enumerate(batches):
                captured.update(x={}, out={})
                labels = batch["labels"][0]  # (T,)
                mask = torch.zeros_like(labels, dtype=torch.bool)
                mask[:-1] = labels[1:] != IGNORE_INDEX  # position t predicts labels[t+1]
                T_b = int(mask.sum())
                with torch.enable_grad():
                    loss = model(**batch).loss
                    outs = [captured["out"][n] for n in names]
                    grads = torch.autograd.grad(loss, outs)
                xs = {g: x.detach()[0] for g, x in captured["x"].items()}  # (T, d_in)
                gs = {n: g.detach()[0] for n, g in zip(names, grads)}  # (T, d_out)
                h = half_of[i]
                _accumulate(sums, sums32 if float32 else None, h, xs, gs, group_of, mask, T_b)
                captured.update(x={}, out={})
    finally:
        for handle in handles:
            handle.remove()
    halves = {p: [sums[p, h].finalize(group_of) for h in (0, 1)] for p in PRESETS}
    full64 = {p: sums[p, 0].finalize(group_of, sums[p, 1]) for p in PRESETS}
    full32 = {p: sums32[p].finalize(group_of) for p in PRESETS} if float32 else {}
    return CalibrationStatistics(halves, full64, full32, group_of, time.perf_counter() - start)


def _partial(fn, name):
    return lambda *args: fn(name, *args)


def _accumulate(sums, sums32, h, xs, gs, group_of, mask, T_b) -> None:
    """Both presets' sums from one text. Shared products: ``xᵀg`` feeds both G (the paper weight
    ``T_b`` multiplies it afterwards, as ``w * (x.mT @ g)`` always did); in float64 the official Z
    is the loss-position product plus the rest (a float64 sum of two exact-order products), in
    float32 it stays one product over all positions, the rounding ``collect_statistics`` has."""
    T = mask.shape[0]
    sets = [(sums["official", h], sums["paper", h], torch.float64)]
    if sums32 is not None:
        sets.append((sums32["official"], sums32["paper"], torch.float32))
    for off, pap, dtype in sets:
        off.tokens, pap.tokens = off.tokens + T, pap.tokens + T_b
        off.loss_tokens, pap.loss_tokens = off.loss_tokens + T_b, pap.loss_tokens + T_b
        off.weight, pap.weight = off.weight + 1.0, pap.weight + float(T_b)
        off.sequences, pap.sequences = off.sequences + 1, pap.sequences + 1
        x_cast = {g: x.to(dtype) for g, x in xs.items()}
        for group, x in x_cast.items():
            xP = x[mask]  # (|P|, d_in)
            zP = xP.mT @ xP
            _acc(pap.Z, group, zP)
            if dtype == torch.float64:
                xR = x[~mask]  # the other positions
                _acc(off.Z, group, zP + xR.mT @ xR)
            else:
                _acc(off.Z, group, x.mT @ x)
        for name, g in gs.items():
            g = g.to(dtype)  # (T, d_out)
            grad = x_cast[group_of[name]].mT @ g  # ∇_W L_b, (d_in, d_out)
            _acc(off.G, name, grad)  # w_b = 1
            _acc(pap.G, name, float(T_b) * grad)  # w_b = T_b
            _acc(off.Y, name, (g * g).sum(0))  # (d_out,)
            gP = g[mask] * T_b  # per-token scores (|P|, d_out)
            _acc(pap.Y, name, gP.mT @ gP)  # (d_out, d_out)


# ----------------------------------------------------------------------------- metrics


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _smallest(omega: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense float64 reference: the r smallest eigenpairs (LAPACK evr)."""
    omega = 0.5 * (omega + omega.T)
    return scipy.linalg.eigh(omega, subset_by_index=[0, r - 1], driver="evr")


def rel_regret(A: np.ndarray, omega: np.ndarray, lam: np.ndarray) -> float:
    """``(tr(QᵀΩQ) − Σλ) / |Σλ|`` with Q an orthonormal basis of col(A) and λ Ω's r smallest."""
    Q = np.linalg.qr(A)[0]
    opt = float(lam.sum())
    return (float(np.trace(Q.T @ omega @ Q)) - opt) / (abs(opt) or 1.0)


def top_left_singular(M: np.ndarray, r: int) -> np.ndarray:
    """A basis (not orthonormal) of the top-r left singular subspace of ``M`` (d1, d2), from the
    r largest eigenpairs of the smaller Gram matrix (LAPACK evr): ``M Mᵀ``'s eigenvectors, or
    ``M V`` with ``V`` those of ``MᵀM``. A tenth of a full SVD's time at 1536 × 576; squaring
    the spectrum costs accuracy only relative to the gap σ_r² − σ_{r+1}², far below the angles
    this stability check reports."""
    d1, d2 = M.shape
    if d1 <= d2:
        return scipy.linalg.eigh(M @ M.T, subset_by_index=[d1 - r, d1 - 1], driver="evr")[1]
    V = scipy.linalg.eigh(M.T @ M, subset_by_index=[d2 - r, d2 - 1], driver="evr")[1]  # (d2, r)
    return M @ V


def _angles(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    return np.sort(principal_angles(A, B))  # ascending


def _omega(
    stats: KFACStatistics, name: str, config: LoraDAConfig, cache: dict | None = None
) -> tuple[np.ndarray, Any]:
    """Ω (NumPy) and J of ``name``; ``cache`` keeps the Cholesky factors of shared Z (q/k/v and
    gate/up read one input) across the layers of a pass, as the pipeline does."""
    J = kfac_fisher(stats, name, config, cache)
    guide = layer_guidance(J, stats.G[name].to(torch.float64), config, name)  # as solve_layer
    return _np(guide.omega), J


# ----------------------------------------------------------------------------- per layer


def _layer_report(
    name: str,
    cal: CalibrationStatistics,
    presets: dict[str, LoraDAConfig],
    parts: Sequence[str],
    r: int,
    seed: int,
    caches: dict | None = None,
) -> dict[str, Any]:
    """Every part for one layer; ``caches`` (one dict per pass) keeps per-group work: the
    Cholesky factors of shared Z per statistics set and preset, and cond(Z)."""
    caches = {} if caches is None else caches
    cache = lambda *key: caches.setdefault(key, {})  # noqa: E731
    out: dict[str, Any] = {"type": name.rsplit(".", 1)[-1]}
    omegas: dict[str, np.ndarray] = {}
    refs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    Js: dict[str, Any] = {}
    for p, config in presets.items():
        omegas[p], Js[p] = _omega(cal.full64[p], name, config, cache("full64", p))
        refs[p] = _smallest(omegas[p], r)
    out["shape"] = list(cal.full64["paper"].G[name].shape)
    if "solver" in parts:
        out["solver"] = _solver_truth(name, omegas["official"], refs["official"], r, seed)
    if "precision" in parts:
        out["precision"] = {}
        for p, config in presets.items():
            config32 = config.replace(dtype=torch.float32)
            omega32, _ = _omega(cal.full32[p], name, config32, cache("full32", p))
            lam, U = refs[p]
            A32 = _smallest(omega32, r)[1]
            out["precision"][p] = {
                "angle": float(_angles(A32, U)[-1]),
                "rel_regret": rel_regret(A32, omegas[p], lam),
                "omega_err": float(np.linalg.norm(omega32 - omegas[p]) / np.linalg.norm(omegas[p])),
            }
    if "conditioning" in parts:
        out["conditioning"] = _conditioning(name, cal, Js, cache("cond"))
    if "stability" in parts:
        out["stability"] = _stability(name, cal, presets, r, caches)
    return out


def _solver_truth(
    name: str, omega: np.ndarray, ref: tuple[np.ndarray, np.ndarray], r: int, seed: int
) -> dict[str, Any]:
    lam, U = ref
    default = LoraDAConfig()
    s = layer_seed(seed, name)
    omega_t = torch.from_numpy(omega)
    runs = {
        "default": dict(solver=default.solver, seed=s, **default.solver_options),
        "lobpcg-10": dict(solver="lobpcg", official=True, seed=s),
        "lobpcg-tol": dict(solver="lobpcg", seed=s),
    }
    out = {}
    for key, options in runs.items():
        res = smallest_eigenpairs(omega_t, r, **options)
        A = _np(res.vectors)
        out[key] = {
            "angle": float(_angles(A, U)[-1]),
            "rel_regret": rel_regret(A, omega, lam),
            "fallback": bool(res.diagnostics.get("fallback")),
            "iterations": res.diagnostics.get("iterations"),
        }
    return out


def _cond(M: Tensor) -> float:
    """λ_max/λ_min of the undamped factor (inf when it is singular: fewer tokens than d)."""
    ev = np.linalg.eigvalsh(_np(M))
    return float(ev[-1] / ev[0]) if ev[0] > 0 else math.inf


def _conditioning(
    name: str, cal: CalibrationStatistics, Js: dict[str, Any], cache: dict | None = None
) -> dict[str, Any]:
    group = cal.group_of[name]
    cache = {} if cache is None else cache
    for p in PRESETS:  # Z is shared by the layers of a group: once per group
        if (p, group) not in cache:
            cache[p, group] = _cond(cal.full64[p].Z[group])
    y = _np(cal.full64["official"].Y[name])
    return {
        "cond_Z_official": cache["official", group],
        "cond_Z_paper": cache["paper", group],
        "cond_Ydiag_official": float(y.max() / y.min()) if y.min() > 0 else math.inf,
        "cond_Y_paper": _cond(cal.full64["paper"].Y[name]),
        "damping_official": _plain(Js["official"].damping),
        "damping_paper": _plain(Js["paper"].damping),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return float(value) if isinstance(value, int | float) else value


def _stability(
    name: str,
    cal: CalibrationStatistics,
    presets: dict[str, LoraDAConfig],
    r: int,
    caches: dict | None = None,
) -> dict[str, Any]:
    caches = {} if caches is None else caches
    out: dict[str, Any] = {}
    for p, config in presets.items():
        (o1, _), (o2, _) = (
            _omega(cal.halves[p][h], name, config, caches.setdefault(("half", p, h), {}))
            for h in (0, 1)
        )
        A1 = _smallest(o1, r)[1]
        lam2, A2 = _smallest(o2, r)
        ang = _angles(A1, A2)
        out[p] = {"angles": ang.tolist(), "rel_regret": rel_regret(A1, o2, lam2)}
    lora_one = []
    for h in (0, 1):
        G = _np(cal.halves["paper"][h].G[name])  # (d_in, d_out)
        lora_one.append(top_left_singular(-G, r))
    out["lora_one_subspace"] = {"angles": _angles(*lora_one).tolist()}
    return out


# ----------------------------------------------------------------------------- workers

_SHARED: dict[str, Any] = {}  # what the forked workers read: the pass's statistics and settings


MAX_AUTO_WORKERS = 8  # each worker holds a few d×d float64 temporaries (≈ 0.2 GB at d = 1536)


def _workers(options: SmolLM2Options) -> int:
    """Worker processes for the per-layer solves: ``options.workers``, or one per CPU core (at
    most :data:`MAX_AUTO_WORKERS`) where ``fork`` is available (Linux) and CUDA is not
    initialised (a forked child cannot use it)."""
    if options.workers is not None:
        return options.workers
    if sys.platform != "linux" or torch.cuda.is_initialized():
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS))


def _single_threaded() -> None:
    """Worker initialiser (the process ends with its pool: nothing to restore). It must run
    before any torch op: GNU OpenMP is not fork-safe, and a forked worker left at the parent's
    two threads hung in its first parallel region (seen with this initialiser removed)."""
    _SHARED["one thread"] = one_blas_thread()
    _SHARED["one thread"].__enter__()


def _group_reports(names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    cal, presets, parts, r, seed = _SHARED["args"]
    caches: dict = {}  # the group's Cholesky factors and cond(Z), shared by its layers
    return [(n, _layer_report(n, cal, presets, parts, r, seed, caches)) for n in names]


def _layer_reports(
    names: list[str],
    cal: CalibrationStatistics,
    presets: dict[str, LoraDAConfig],
    parts: Sequence[str],
    options: SmolLM2Options,
):
    """Yield ``(name, report)`` for every layer of a pass (as they finish). The layers reading
    one input (q/k/v, gate/up) form one task (they share Z's factors); with more than one worker
    the tasks run in forked processes, largest input first, each single-threaded. The results do
    not depend on the number of workers (each task is the same computation)."""
    tasks: dict[str, list[str]] = {}
    for n in names:
        tasks.setdefault(cal.group_of[n], []).append(n)
    args = (cal, presets, parts, options.rank, options.seed)
    workers = min(_workers(options), len(tasks))
    if workers <= 1:
        _SHARED["args"] = args
        try:
            with one_blas_thread():
                for group in tasks.values():
                    yield from _group_reports(group)
        finally:
            _SHARED.pop("args", None)
        return
    d_in = {g: cal.full64["paper"].Z.shape(g)[0] for g in tasks}
    order = sorted(tasks, key=lambda g: -d_in[g])  # longest first: balanced finish
    _SHARED["args"] = args  # inherited by the forked workers (copy-on-write, no transfer)
    try:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers, initializer=_single_threaded) as pool:
            for result in pool.imap_unordered(_group_reports, [tasks[g] for g in order]):
                yield from result
    finally:
        _SHARED.pop("args", None)


# ----------------------------------------------------------------------------- K-FAC truth


def kfac_truth(
    model: nn.Module,
    batches: Sequence[Batch],
    layers: Sequence[str],
    *,
    block: tuple[int, int] = (32, 12),
    rank: int = 4,
    n_train: int = LoraDAConfig.n_train,
    seed: int = 0,
    keep_blocks: bool = False,
) -> dict[str, Any]:
    """Exact per-token empirical Fisher of a sub-block ``W[I, J]`` of each layer vs K-FAC.

    For every loss token t, ``∇_{W[I,J]} ℓ_t = Σ_u x_u[I] δ_{t,u}[J]ᵀ`` with
    ``δ_{t,u} = ∂ℓ_t/∂o_u`` taken by one batched backward through the whole model (attention
    mixes positions). Then, with column-stacking vec (index ``j·|I| + i``) and n loss tokens:

        J_exact = (1/n) Σ_t vec(∇ℓ_t) vec(∇ℓ_t)ᵀ,   G = (1/n) Σ_t ∇ℓ_t,
        J_kfac  = Y[J,J] ⊗ Z[I,I],  Z = (1/n) Σ_{u∈P} x_u xᵤᵀ,  Y = (1/n) Σ_{u∈P} s_u s_uᵀ,

    ``s_u = ∂(Σ_t ℓ_t)/∂o_u = Σ_t δ_{t,u}`` (the paper preset's per-token scores, P = loss
    positions). LoRA-DA (Eqs. 19, 21, 5–8; β = α = 1, N = ``n_train``) is computed with the NumPy
    reference on the sub-block from each ``J``, both damped by ``λ = 1e-8·tr(J)/dim`` (relative).

    Args:
        model: a causal LM (left as it was); batches: batch size 1 with ``labels``.
        layers: module names (``nn.Linear``); block: (|I|, |J|); seed: chooses I and J.
        keep_blocks: also return the NumPy arrays ``J_exact, Z, Y, G`` under ``"blocks"``.

    Returns:
        ``{"tokens", "layers": {name: {"I", "J", "fisher_err", "angle", "rel_regret",
        "fisher_err_diag", ..., "G_err_vs_kfac"}}}``.
    """
    modules = dict(model.named_modules())
    rng = np.random.default_rng(seed)
    picks = {}
    for name in layers:
        m = modules[name]
        ni, nj = min(block[0], m.in_features), min(block[1], m.out_features)
        picks[name] = (np.sort(rng.choice(m.in_features, ni, replace=False)),
                       np.sort(rng.choice(m.out_features, nj, replace=False)))  # fmt: skip
    acc = {n: {"gg": 0.0, "g": 0.0, "Z": 0.0, "Y": 0.0} for n in layers}
    tokens = 0
    for batch in batches:
        rows = _per_token_block_gradients(model, batch, {n: modules[n] for n in layers}, picks)
        for name, (g, xP, sP) in rows.items():
            v = g.transpose(1, 2).reshape(g.shape[0], -1)  # (n_b, |I|·|J|), column-stacking
            a = acc[name]
            a["gg"] = a["gg"] + v.mT @ v
            a["g"] = a["g"] + g.sum(0)
            a["Z"] = a["Z"] + xP.mT @ xP
            a["Y"] = a["Y"] + sP.mT @ sP
        tokens += next(iter(rows.values()))[0].shape[0]
    out: dict[str, Any] = {"tokens": tokens, "block": list(block), "rank": rank, "layers": {}}
    for name in layers:
        a = {k: _np(v) / tokens for k, v in acc[name].items()}
        J_ex = 0.5 * (a["gg"] + a["gg"].T)
        J_kf = np.kron(a["Y"], a["Z"])
        J_dg = np.kron(np.diag(np.diag(a["Y"])), a["Z"])
        G = a["g"]  # (|I|, |J|)
        r = min(rank, G.shape[0])

        omega_ex = _sub_block_omega(J_ex, G, n_train)
        lam, U = _smallest(omega_ex, r)
        entry: dict[str, Any] = {"I": picks[name][0].tolist(), "J": picks[name][1].tolist()}
        for key, Jk in (("kfac", J_kf), ("kfac_diag", J_dg)):
            omega_k = _sub_block_omega(Jk, G, n_train)
            A = _smallest(omega_k, r)[1]
            entry[key] = {
                "fisher_err": float(np.linalg.norm(Jk - J_ex) / np.linalg.norm(J_ex)),
                "omega_err": float(np.linalg.norm(omega_k - omega_ex) / np.linalg.norm(omega_ex)),
                "angle": float(_angles(A, U)[-1]),
                "rel_regret": rel_regret(A, omega_ex, lam),
            }
        if keep_blocks:
            entry["blocks"] = {"J_exact": J_ex, "Z": a["Z"], "Y": a["Y"], "G": G}
        out["layers"][name] = entry
    return out


def _sub_block_omega(J: np.ndarray, G: np.ndarray, n_train: int) -> np.ndarray:
    """Ω (Eq. 19, β = α = 1) of the NumPy reference from a dense sub-block Fisher, damped by
    ``1e-8·tr(J)/dim`` (relative to its scale); ΔW = −J⁻¹G (Eq. 21)."""
    J = J + 1e-8 * np.trace(J) / J.shape[0] * np.eye(J.shape[0])
    dw = np_guidance.fisher_gradient(J, G)  # (|I|, |J|)
    return np_guidance.guidance_matrix(J, dw, n_train)  # (|I|, |I|)


def _per_token_block_gradients(
    model: nn.Module, batch: Batch, targets: dict[str, nn.Linear], picks: dict[str, Any]
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Per loss token ``∇_{W[I,J]} ℓ_t`` (n_b, |I|, |J|), and ``x_u[I]``, ``s_u[J]`` over the loss
    positions, float64. The logits' gradient is formed analytically at each token's own position
    (``∂ℓ_t/∂h_t = Eᵀ(softmax − e_y)``) so the batched backward starts at the final hidden state."""
    captured: dict[str, Tensor] = {}

    def hook(name: str, module: nn.Module, inputs: tuple[Any, ...], out: Tensor) -> None:
        captured[name + ".x"] = inputs[0]
        if not out.requires_grad:
            out.requires_grad_(True)
        captured[name] = out

    handles = [m.register_forward_hook(_partial(hook, n)) for n, m in targets.items()]
    labels = batch["labels"][0]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:-1] = labels[1:] != IGNORE_INDEX
    pos = mask.nonzero().flatten()  # (n_b,)
    try:
        with model_guard(model), torch.enable_grad():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            hidden = model.model(**inputs).last_hidden_state  # (1, T, d)
            with torch.no_grad():
                E = model.lm_head.weight  # (V, d)
                p = (hidden[0, pos] @ E.T).softmax(-1)  # (n_b, V)
                p[torch.arange(len(pos)), labels[pos + 1]] -= 1.0
                dh = p @ E  # (n_b, d) = ∂ℓ_t/∂h_t
                go = torch.zeros(len(pos), *hidden.shape, dtype=hidden.dtype)
                go[torch.arange(len(pos)), 0, pos] = dh
            outs = [captured[n] for n in targets]
            try:
                deltas = torch.autograd.grad(hidden, outs, grad_outputs=go, is_grads_batched=True)
            except RuntimeError:  # no batching rule: one backward per token
                per = [torch.autograd.grad(hidden, outs, grad_outputs=g, retain_graph=True)
                       for g in go]  # fmt: skip
                deltas = tuple(torch.stack(d) for d in zip(*per))
    finally:
        for h in handles:
            h.remove()
    rows = {}
    for (name, (I, J)), delta in zip(picks.items(), deltas):
        x = captured[name + ".x"].detach()[0].to(torch.float64)[:, I]  # (T, |I|)
        d = delta[:, 0][:, :, J].to(torch.float64)  # (n_b, T, |J|) δ_{t,u}[J]
        g = torch.einsum("ui,tuj->tij", x, d)  # (n_b, |I|, |J|)
        s = d.sum(0)  # (T, |J|) scores of Σ_t ℓ_t
        rows[name] = (g, x[pos], s[pos])
    return rows


# ----------------------------------------------------------------------------- the case


def _texts(model_tokenizer: tuple[Any, Any], options: SmolLM2Options) -> tuple[list, list]:
    _, tok = model_tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    records = real.humaneval("train")
    if options.texts > len(records):
        raise ValueError(f"--texts {options.texts} > {len(records)} HumanEval train tasks")
    calib = [right_pad([e], pad) for e in real.tokenize_humaneval(records[: options.texts], tok)]
    kfac = []
    for r in records[: options.kfac_texts]:
        ids = tok(r["prompt"] + r["canonical_solution"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor(ids[: options.kfac_length]).unsqueeze(0)  # (1, T)
        kfac.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return calib, kfac


def _kfac_layers(names: list[str], per_type: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed + 1)
    chosen = []
    for t in MODULE_TYPES:
        of_type = [n for n in names if n.rsplit(".", 1)[-1] == t]
        k = min(per_type, len(of_type))
        chosen += [of_type[i] for i in sorted(rng.choice(len(of_type), k, replace=False))]
    return chosen


def run_smollm2(
    options: SmolLM2Options = SmolLM2Options(),
    *,
    model_tokenizer: tuple[Any, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The whole ``smollm2`` case; returns a JSON-able report (per layer + per module type)."""
    t0 = time.perf_counter()
    model, tok = model_tokenizer if model_tokenizer is not None else real.load_smollm2()
    layers = options.layers if options.layers is not None else MODULE_TYPES
    names = list(find_target_modules(model, layers))
    if not names:
        raise ValueError(f"no target layers match {layers!r}")
    calib, kfac_batches = _texts((model, tok), options)
    presets = _presets(options.rank, options.seed)
    report: dict[str, Any] = {
        "case": "smollm2",
        "options": asdict(options) | {"layers": None if options.layers is None else list(layers)},
        "texts": len(calib),
        "seconds": {"load": time.perf_counter() - t0},
    }
    targets = dict(model.named_modules())
    main_parts = [p for p in options.parts if p != "kfac"]
    if main_parts:
        per_layer: dict[str, Any] = {}
        report["seconds"] |= {"statistics": 0.0, "layers": 0.0}
        groups = layer_passes(names, options.layers_per_pass)  # memory: one group's statistics
        for chunk in groups:
            cal = calibration_statistics(model, calib, {n: targets[n] for n in chunk},
                                         float32="precision" in main_parts)  # fmt: skip
            report["seconds"]["statistics"] += cal.seconds
            report["tokens"] = {p: cal.full64[p].tokens for p in PRESETS}
            report["loss_tokens"] = cal.full64["paper"].loss_tokens
            t1 = time.perf_counter()
            for name, entry in _layer_reports(chunk, cal, presets, main_parts, options):
                per_layer[name] = entry
                if progress:
                    print(f"  [{len(per_layer)}/{len(names)}] {name}", flush=True)
            report["seconds"]["layers"] += time.perf_counter() - t1
            del cal
        report["passes"] = len(groups)
        report["workers"] = _workers(options)
        report["layers"] = {n: per_layer[n] for n in names}
    if "kfac" in options.parts:
        t2 = time.perf_counter()
        chosen = _kfac_layers(names, options.kfac_layers, options.seed)
        report["kfac"] = kfac_truth(model, kfac_batches, chosen, block=options.kfac_block,
                                    rank=min(options.rank, options.kfac_block[0]),
                                    seed=options.seed)  # fmt: skip
        report["seconds"]["kfac"] = time.perf_counter() - t2
    report["summary"] = summarize(report)
    report["seconds"]["total"] = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------- summary


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {}
    return {"median": float(np.median(v)), "p90": float(np.quantile(v, 0.9, method="nearest")),
            "max": float(v.max()), "n": int(v.size)}  # fmt: skip


def _paths(entry: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of one layer, flattened to ``part.preset.metric`` keys."""
    flat: dict[str, float] = {}
    for k, v in (entry.get("solver") or {}).items():
        flat[f"solver.{k}.angle"] = v["angle"]
        flat[f"solver.{k}.rel_regret"] = v["rel_regret"]
    for k, v in (entry.get("precision") or {}).items():
        flat[f"precision.{k}.angle"] = v["angle"]
        flat[f"precision.{k}.rel_regret"] = v["rel_regret"]
    for k, v in (entry.get("conditioning") or {}).items():
        if k.startswith("cond"):
            flat[f"conditioning.{k}"] = v
    for k, v in (entry.get("stability") or {}).items():
        flat[f"stability.{k}.largest"] = v["angles"][-1]
        flat[f"stability.{k}.smallest"] = v["angles"][0]
        if "rel_regret" in v:
            flat[f"stability.{k}.rel_regret"] = v["rel_regret"]
    return flat


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Per module type (and ``all``): median / p90 / max of every per-layer metric, the number of
    layers whose angle exceeds 1e-3 rad, and the K-FAC truth per type."""
    by_type: dict[str, dict[str, list[float]]] = {}
    for entry in (report.get("layers") or {}).values():
        for key, value in _paths(entry).items():
            for t in (entry["type"], "all"):
                by_type.setdefault(t, {}).setdefault(key, []).append(value)
    out: dict[str, Any] = {}
    for t, metrics in by_type.items():
        out[t] = {k: _stats(v) for k, v in metrics.items()}
        for k, v in metrics.items():
            if k.endswith(".angle"):
                out[t][k]["above_1e-3"] = int(sum(x > ANGLE_FLAG for x in v))
    for name, entry in ((report.get("kfac") or {}).get("layers") or {}).items():
        t = name.rsplit(".", 1)[-1]
        for kind in ("kfac", "kfac_diag"):
            for metric in ("fisher_err", "angle", "rel_regret"):
                for tt in (t, "all"):
                    out.setdefault(tt, {}).setdefault(f"kfac_truth.{kind}.{metric}", []).append(
                        entry[kind][metric]
                    )
    for t in out:
        for k in list(out[t]):
            if k.startswith("kfac_truth.") and isinstance(out[t][k], list):
                out[t][k] = _stats(out[t][k])
    return out


# ----------------------------------------------------------------------------- text


_COLUMNS = [  # (header, summary key, statistic, format)
    ("10-it angle", "solver.lobpcg-10.angle", "median", ".1e"),
    ("p90", "solver.lobpcg-10.angle", "p90", ".1e"),
    ("max", "solver.lobpcg-10.angle", "max", ".2f"),
    ("tol angle", "solver.lobpcg-tol.angle", "max", ".1e"),
    ("f32 off", "precision.official.angle", "median", ".1e"),
    (">1e-3", "precision.official.angle", "above_1e-3", "d"),
    ("f32 max", "precision.official.angle", "max", ".2f"),
    ("f32 pap", "precision.paper.angle", "median", ".1e"),
    ("cond Z", "conditioning.cond_Z_official", "median", ".1e"),
    ("cond dY", "conditioning.cond_Ydiag_official", "median", ".1e"),
    ("stab off", "stability.official.largest", "median", ".2f"),
    ("stab pap", "stability.paper.largest", "median", ".2f"),
    ("reg pap", "stability.paper.rel_regret", "median", ".1e"),
    ("1 lg", "stability.lora_one_subspace.largest", "median", ".2f"),
    ("1 sm", "stability.lora_one_subspace.smallest", "median", ".2f"),
    ("KF Jerr", "kfac_truth.kfac.fisher_err", "median", ".2f"),
    ("KF ang", "kfac_truth.kfac.angle", "median", ".2f"),
    ("KF reg", "kfac_truth.kfac.rel_regret", "median", ".1e"),
]


def format_smollm2(report: dict[str, Any], *, per_layer: bool = True) -> str:
    """The per-module-type summary table (medians unless marked), then one line per layer."""
    o = report["options"]
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
    lines = [
        f"LoRA-DA validation: case smollm2 (SmolLM2-135M-Instruct, {report['texts']} HumanEval "
        f"train texts, r = {o['rank']}, parts {','.join(o['parts'])}; {secs})",
        "angles in radians; 10-it/tol = official 10-iteration LOBPCG / LOBPCG to tolerance vs "
        "eigh (official preset Ω); f32 = float32 vs float64 statistics; stab = largest angle "
        "between the halves' A0; 1 lg/sm = LoRA-One largest/smallest; KF = K-FAC truth on "
        "sub-blocks (Fisher rel. error, angle, regret vs exact)",
        "",
    ]
    summary = report["summary"]
    cols = [c for c in _COLUMNS if any(c[1] in s for s in summary.values())]
    lines.append(f"{'type':<10}" + "".join(f"{h:>10}" for h, *_ in cols))
    for t in [*MODULE_TYPES, "all"]:
        if t not in summary:
            continue
        cells = []
        for _, key, stat, fmt in cols:
            value = summary[t].get(key, {}).get(stat)
            cells.append(f"{'-':>10}" if value is None else f"{format(value, fmt):>10}")
        lines.append(f"{t:<10}" + "".join(cells))
    if per_layer and report.get("layers"):
        lines += [
            "",
            "per layer: " + ", ".join(k for k in _paths(next(iter(report["layers"].values())))),
        ]
        for name, entry in report["layers"].items():
            vals = " ".join(f"{v:.2e}" for v in _paths(entry).values())
            lines.append(f"{name}: {vals}")
    if report.get("kfac"):
        k = report["kfac"]
        lines += ["", f"K-FAC truth: {k['tokens']} tokens, block {k['block'][0]}x{k['block'][1]}, "
                  f"r = {k['rank']}  (fisher_err / angle / rel_regret; full Y | diagonal Y)"]  # fmt: skip
        for name, e in k["layers"].items():
            a, b = e["kfac"], e["kfac_diag"]
            lines.append(
                f"  {name:<34}{a['fisher_err']:>9.3f}{a['angle']:>8.3f}{a['rel_regret']:>10.2e}"
                f"  |{b['fisher_err']:>9.3f}{b['angle']:>8.3f}{b['rel_regret']:>10.2e}"
            )
    return "\n".join(lines)
