"""Algorithm 1 as one pipeline: collect → reduce → solve → gather, once per group of layers.

Paper orientation, ``W`` (d_in, d_out). For each group of ``layers_per_pass`` transformer layers
(all target layers when ``None``), :func:`run_pipeline`

1. **collects** the unnormalised K-FAC sums ``Σ x xᵀ``, ``Σ s sᵀ``, ``Σ_b w_b ∇_W L_b`` and their
   counts over this process's batches (:func:`lora_da_ref.torch.statistics.accumulate_statistics`);
2. **reduces** them to the normalised statistics ``Z``, ``Y``, ``G`` of the whole calibration set
   (:func:`~lora_da_ref.torch.statistics.finalize`; across processes: all-reduce first);
3. **solves** the layers this process owns (:func:`lora_da_ref.torch.factors.solve_layer`,
   Algorithm 1 steps 2–5, the same pure function everywhere);
4. **gathers** every layer's factors on every process;

and drops the group's statistics before the next one, so peak memory holds one group's.

The single-process run and the ``torch.distributed`` run differ only in the :class:`Strategy`
they supply (how batches are checked, how sums are collected and reduced, who solves which layer,
how results are gathered, how a failure is propagated): :class:`SingleProcess` here,
:class:`lora_da_ref.torch.distributed.DataParallel` for a process group. This module imports no
distributed code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch
from torch import nn

from lora_da_ref.precision import TRUST_RAD
from lora_da_ref.torch.config import (
    LoraDAConfig,
    LoraFactors,
    SolveConfig,
    StatisticsConfig,
    rank_of,
)
from lora_da_ref.torch.diagnostics import report_calibration
from lora_da_ref.torch.factors import solve_layer, untrusted_layers
from lora_da_ref.torch.fisher import CholeskyFactor
from lora_da_ref.torch.memory import (
    _layer_key,
    _shapes,
    input_groups,
    layer_passes,
    resolve_layers_per_pass,
)
from lora_da_ref.torch.progress import RunProgress
from lora_da_ref.torch.statistics import (
    Batch,
    KFACStatistics,
    KFACSums,
    LossFn,
    accumulate_statistics,
    finalize,
    materialise_batches,
    token_masks,
)
from lora_da_ref.torch.store import StatisticsStore
from lora_da_ref.torch.threads import one_blas_thread, one_scipy_blas_thread
from lora_da_ref.torch.warn import warn_user

__all__ = [
    "SingleProcess",
    "Strategy",
    "layer_ranks",
    "layer_tasks",
    "pass_plan",
    "run_pipeline",
    "solve_layers",
    "solve_workers",
    "warn_untrusted",
]

Targets = dict[str, nn.Linear]


class Strategy(Protocol):
    """Where the data lives and who solves what: the only difference between the runs."""

    rank: int
    world: int  # the processes that share the solves

    def prepare(self, batches: Iterable[Batch]) -> list[Batch]:
        """This process's batches, checked and materialised once
        (:func:`~lora_da_ref.torch.statistics.materialise_batches`; re-used by every layer
        group's pass)."""

    def collect(
        self, model: nn.Module, batches: list[Batch], targets: Targets, config: StatisticsConfig,
        loss_fn: LossFn | None, progress: bool,
    ) -> KFACSums:  # fmt: skip
        """Step 1: this process's unnormalised sums for ``targets``."""

    def reduce(self, sums: KFACSums, targets: Targets, config: StatisticsConfig) -> KFACStatistics:
        """The normalised statistics of the whole calibration set."""

    def plan(
        self, targets: Targets, group_of: dict[str, str], config: StatisticsConfig
    ) -> dict[str, int]:
        """The rank that solves each target."""

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Runs a local stage; a failure on any process fails every process."""

    def gather(
        self, mine: dict[str, LoraFactors], owners: dict[str, int], targets: Targets,
        ranks: Mapping[str, int],
    ) -> dict[str, LoraFactors]:  # fmt: skip
        """Every target's factors, in model order, on every process (``ranks``: r per target)."""


class SingleProcess:
    """One process holds all the data and solves every layer."""

    rank = 0
    world = 1

    def prepare(self, batches: Iterable[Batch]) -> list[Batch]:
        return materialise_batches(batches)  # all the data: not empty

    def collect(
        self, model: nn.Module, batches: list[Batch], targets: Targets, config: StatisticsConfig,
        loss_fn: LossFn | None, progress: bool,
    ) -> KFACSums:  # fmt: skip
        return accumulate_statistics(
            model, batches, targets, config, loss_fn=loss_fn, progress=progress
        )

    def reduce(self, sums: KFACSums, targets: Targets, config: StatisticsConfig) -> KFACStatistics:
        return finalize(sums)

    def plan(
        self, targets: Targets, group_of: dict[str, str], config: StatisticsConfig
    ) -> dict[str, int]:
        return dict.fromkeys(targets, 0)

    def stage(self, name: str) -> AbstractContextManager[None]:
        return nullcontext()

    def gather(
        self, mine: dict[str, LoraFactors], owners: dict[str, int], targets: Targets,
        ranks: Mapping[str, int],
    ) -> dict[str, LoraFactors]:  # fmt: skip
        return {n: mine[n] for n in targets}


def run_pipeline(
    model: nn.Module,
    batches: Iterable[Batch],
    targets: Targets,
    config: LoraDAConfig,
    strategy: Strategy,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    ranks: Mapping[str, int] | None = None,
    store: StatisticsStore | None = None,
) -> dict[str, LoraFactors]:
    """collect → reduce → solve → gather for each layer group (module docstring); with a
    ``store`` (:mod:`lora_da_ref.torch.store`, one process only) each pass's statistics are
    read from it when saved, else saved to it as the pass completes.

    ``ranks``: the LoRA rank r of each target (a PEFT ``rank_pattern``), ``config.rank`` for
    every target when ``None``. The statistics do not depend on r, so any mix of ranks costs
    the passes of one.

    Returns ``{name: LoraFactors}`` in model order, ``A`` (d_in, r), ``B`` (r, d_out).
    """
    ranks = layer_ranks(targets, config, ranks)
    batches = strategy.prepare(batches)
    pass_config, solve_config = config.statistics_config(), config.solve_config()
    plan = pass_plan(model, targets, pass_config)
    show = progress and strategy.rank == 0
    predicted = _predicted_solves(model, targets, config, ranks, strategy.world) if show else {}
    positions = statistics_positions(batches, pass_config) if show else []
    bar = RunProgress.for_init(positions, len(plan), predicted, show)
    factors: dict[str, LoraFactors] = {}
    try:
        for i, names in enumerate(plan):
            chunk = {name: targets[name] for name in names}
            layers = len({_layer_key(n) for n in names})
            bar.stage(f"statistics, pass {i + 1}/{len(plan)} ({layers} layers)")
            stats = None if store is None else store.load(i, names)
            if stats is None:
                bar.mark()  # the work before this pass (the last one's gather) is no batch's
                sums = strategy.collect(model, batches, chunk, pass_config, loss_fn, bar)
                stats = strategy.reduce(sums, chunk, pass_config)
                del sums
                if store is not None:
                    store.save(i, names, stats)
            else:
                bar.skip_pass(len(batches))  # a pass saved by an earlier run
            owners = strategy.plan(chunk, stats.group_of, pass_config)
            mine = [n for n in chunk if owners[n] == strategy.rank]
            bar.stage(f"solves, pass {i + 1}/{len(plan)}" if len(plan) > 1 else "solves")
            bar.solved([n for n in chunk if owners[n] != strategy.rank], here=False)
            bar.mark()  # the reduce, a store's save and the plan are no solve's
            with strategy.stage("layer solve"):
                solved = solve_layers(stats, mine, solve_config, bar.solved, ranks=ranks)
            del stats
            factors |= strategy.gather(solved, owners, chunk, ranks)
    finally:
        bar.close()
    warn_untrusted(factors)
    if show:
        report_calibration(factors)  # "k of n layers have SNR < 1: ..." (diagnostics.py)
    return factors


def layer_ranks(
    targets: Iterable[str],
    config: LoraDAConfig | SolveConfig,
    ranks: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """The rank r of every target: ``ranks[name]``, else a :class:`LoraDAConfig`'s ``rank``."""
    ranks = {} if ranks is None else ranks
    return {name: int(rank_of(config, ranks.get(name))) for name in targets}


def pass_plan(
    model: nn.Module, targets: Targets, config: StatisticsConfig | LoraDAConfig
) -> list[list[str]]:
    """The target names of each statistics pass, planned once before any pass from the layer
    shapes and the memory budget of the model's device (:mod:`lora_da_ref.torch.memory`)."""
    device = next((p.device for p in model.parameters()), None)
    return layer_passes(list(targets), resolve_layers_per_pass(targets, config, device))


def warn_untrusted(factors: dict[str, LoraFactors]) -> None:
    """One ``RuntimeWarning`` naming the layers the precision check does not clear: the
    statistics dtype may have rotated their A0 by more than
    :data:`~lora_da_ref.precision.TRUST_RAD` (their ``precision_probe``, else their
    ``precision_bound``: :func:`~lora_da_ref.torch.factors.untrusted_layers`)."""
    raised = [n for n, f in factors.items() if f.diagnostics.get("damping_raised")]
    if raised:
        warn_user(
            f"LoRA-DA: the requested damping is below the rounding of the statistics on "
            f"{len(raised)} layer(s) ({', '.join(raised[:10])}{' ...' if len(raised) > 10 else ''}); "
            "it was raised to u·tr(M) (diagnostics['damping'], ['damping_raised']).",
            RuntimeWarning,
        )
    bad = untrusted_layers(factors)
    if not bad:
        return
    dtypes = sorted({factors[n].diagnostics.get("statistics_dtype", "?") for n in bad})
    worst = sorted(bad, key=lambda n: -bad[n] if bad[n] == bad[n] else -math.inf)  # NaN first
    listed = ", ".join(f"{n} ({bad[n]:.2g} rad)" for n in worst[:10])
    more = f" and {len(worst) - 10} more" if len(worst) > 10 else ""
    warn_user(
        f"LoRA-DA: the precision check could not clear {len(bad)} layer(s): rounding the "
        f"{'/'.join(dtypes)} statistics may rotate their A0 by more than {TRUST_RAD:g} rad "
        f"(diagnostics['precision_probe']): {listed}{more}. The angle is one re-solve's, which "
        "clears a layer only with a margin below the limit, else the first-order bound's. "
        "Use LoraDAConfig(dtype=torch.float64) or a larger damping.",
        RuntimeWarning,
    )


MAX_AUTO_SOLVE_WORKERS = 8
MAX_AUTO_PARALLEL_WIDTH = 4096  # a wider input solves on all threads, one group at a time


def solve_layers(
    stats: KFACStatistics,
    names: Iterable[str],
    config: SolveConfig | LoraDAConfig,
    done: Callable[[list[str]], None] | None = None,
    *,
    ranks: Mapping[str, int] | None = None,
) -> dict[str, LoraFactors]:
    """Steps 2–5 of Algorithm 1 for ``names``, in ``names``' order; ``done(layers)`` is called
    on the calling thread as each task's layers are finished (the progress bar). ``ranks``: r
    per layer (:func:`layer_ranks`; ``config.rank`` when ``None``).

    The layers reading one input (q/k/v, gate/up) form one task and share Z's Cholesky factor.
    With :func:`solve_workers` > 1 the tasks run in that many threads, widest input first, each
    on one BLAS thread (:func:`~lora_da_ref.torch.threads.one_blas_thread`): every task is the
    same single-threaded computation whichever thread runs it, so the factors do not depend on
    the number of workers."""
    names = list(names)
    ranks = layer_ranks(names, config, ranks)
    tasks = layer_tasks(stats, names)
    workers = min(solve_workers(stats, tasks, config), len(tasks))
    if workers <= 1:  # one group at a time on torch's threads; SciPy's on one below the width
        widest = max((_width(stats, t[0]) for t in tasks.values()), default=0)
        limit = one_scipy_blas_thread() if widest <= MAX_AUTO_PARALLEL_WIDTH else nullcontext()
        solved = {}
        with limit:
            z_factors: dict[str, CholeskyFactor] = {}  # shared by the layers of one input
            for name in names:
                solved |= _solve_task(stats, [name], config, ranks, z_factors)
                if done is not None:
                    done([name])
        return {n: solved[n] for n in names}
    order = sorted(tasks.values(), key=lambda t: -_width(stats, t[0]))  # balanced finish
    solved: dict[str, LoraFactors] = {}
    with one_blas_thread(), ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_solve_task, stats, task, config, ranks) for task in order]
        try:
            for future in futures:
                result = future.result()
                solved |= result
                if done is not None:
                    done(list(result))
        except BaseException:
            for future in futures:
                future.cancel()  # the first failure is raised; queued tasks do not start
            raise
    return {n: solved[n] for n in names}


def statistics_positions(batches: list[Batch], config: StatisticsConfig) -> list[int]:
    """The statistics positions |P| of each batch, as the pass counts them (the progress bar's
    weight of a batch)."""
    return [int(token_masks(batch, config)[0].sum()) for batch in batches]


def _predicted_solves(
    model: nn.Module, targets: Targets, config: LoraDAConfig, ranks: Mapping[str, int], world: int
) -> dict[str, float]:
    """:func:`predict_solve_seconds` on the model's device, each solve's share of ``world``
    processes; ``{}`` (every solve weighs nothing until measured) when it fails: a progress
    bar must not stop an init."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        seconds = predict_solve_seconds(targets, config, ranks, device)
    except Exception:  # any failure: the init goes on without the estimate
        return {}
    return {name: t / max(world, 1) for name, t in seconds.items()}


def predict_solve_seconds(
    targets: Targets,
    config: LoraDAConfig,
    ranks: Mapping[str, int],
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Predicted wall seconds of each target's solve, for the progress bar: the solves of the
    first transformer layer's targets on synthetic statistics of their shapes (random, well
    conditioned; a direct solve costs the same on any values), timed task by task as
    :func:`solve_layers` runs them (one BLAS thread per worker when it uses workers, the time
    divided by their number); a target of another layer takes the time of the first layer's
    target with its name's last part and shape, else the mean time per ``d_in³``. Costs one
    layer's solves, about ``1/layers`` of the solve stage."""
    import time
    import warnings

    names = list(targets)
    if not names:
        return {}
    first = _layer_key(names[0])
    sample = [n for n in names if _layer_key(n) == first]
    shapes = _shapes(targets)
    stats = _synthetic_statistics({n: shapes[n] for n in sample}, config, torch.device(device))
    solve = config.solve_config()
    tasks = layer_tasks(stats, sample)
    workers = max(1, min(solve_workers(stats, tasks, solve), len(tasks)))
    threads = one_blas_thread() if workers > 1 else nullcontext()
    seconds: dict[tuple[str, int, int], float] = {}
    with threads, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic statistics' own diagnostics
        for task in tasks.values():
            t0 = time.perf_counter()
            _solve_task(stats, task, solve, {n: ranks[n] for n in task})
            per = (time.perf_counter() - t0) / len(task) / workers
            for n in task:
                seconds[_signature(n, shapes[n])] = per
    per_cube = sum(seconds.values()) / sum(k[1] ** 3 for k in seconds)
    return {n: seconds.get(_signature(n, shapes[n]), per_cube * shapes[n][0] ** 3) for n in names}


def _signature(name: str, shape: tuple[int, int]) -> tuple[str, int, int]:
    return name.rsplit(".", 1)[-1], *shape


def _synthetic_statistics(
    shapes: Mapping[str, tuple[int, int]], config: LoraDAConfig, device: torch.device
) -> KFACStatistics:
    """Random statistics of these layers' shapes, in the config's dtype and output factor, with
    split halves when the diagnostics keep them (their solves then cost what real ones do)."""
    gen = torch.Generator().manual_seed(0)
    group_of = input_groups(dict(shapes))
    dtype = config.dtype

    def spd(d: int) -> torch.Tensor:
        R = torch.randn(d, 8, generator=gen, dtype=torch.float64)
        return (torch.eye(d, dtype=torch.float64) + R @ R.mT / d).to(dtype)

    Z = {g: spd(shapes[g][0]) for g in set(group_of.values())}
    full = config.output_factor == "full"
    Y = {n: spd(d) if full else torch.ones(d, dtype=dtype) for n, (_, d) in shapes.items()}
    G = {n: torch.randn(*s, generator=gen).to(dtype) for n, s in shapes.items()}
    split = config.diagnostics != "off"
    G_split = (
        {n: torch.randn(*s, generator=gen).to(dtype) for n, s in shapes.items()} if split else {}
    )
    Z, Y, G, G_split = ({k: v.to(device) for k, v in d.items()} for d in (Z, Y, G, G_split))
    return KFACStatistics(
        Z, Y, G, group_of, tokens=1024, loss_tokens=1024, sequences=64, batches=64,
        G_split=G_split, split_weights=(1.0, 1.0) if split else (0.0, 0.0), gradient_weight=64.0,
        dtype=str(dtype).removeprefix("torch."),
    )  # fmt: skip


def layer_tasks(stats: KFACStatistics, names: Iterable[str]) -> dict[str, list[str]]:
    """``{input group: its layers}``: the layers reading one input share Z's factor."""
    tasks: dict[str, list[str]] = {}
    for name in names:
        tasks.setdefault(stats.group_of[name], []).append(name)
    return tasks


def solve_workers(
    stats: KFACStatistics, tasks: dict[str, list[str]], config: SolveConfig | LoraDAConfig
) -> int:
    """``config.solve_workers``, or automatically: torch's thread count (at most
    :data:`MAX_AUTO_SOLVE_WORKERS`) for CPU statistics whose inputs are at most
    :data:`MAX_AUTO_PARALLEL_WIDTH` wide, else 1."""
    if config.solve_workers is not None:
        return config.solve_workers
    if not tasks:
        return 1
    first = next(iter(tasks.values()))[0]
    if stats.Z[stats.group_of[first]].device.type != "cpu":
        return 1
    if max(_width(stats, t[0]) for t in tasks.values()) > MAX_AUTO_PARALLEL_WIDTH:
        return 1
    return max(1, min(torch.get_num_threads(), MAX_AUTO_SOLVE_WORKERS))


def _width(stats: KFACStatistics, name: str) -> int:
    return int(stats.Z[stats.group_of[name]].shape[0])


def _solve_task(
    stats: KFACStatistics,
    names: list[str],
    config: SolveConfig | LoraDAConfig,
    ranks: Mapping[str, int],
    z_factors: dict[str, CholeskyFactor] | None = None,
) -> dict[str, LoraFactors]:
    z_factors = {} if z_factors is None else z_factors  # this task's (shared) factors of Z
    return {
        name: solve_layer(stats, name, config, z_factors, rank=ranks[name]).factors()
        for name in names
    }
