"""Data-parallel LoRA-DA on ``torch.distributed``: Algorithm 1 with the calibration set sharded.

Every statistic of Algorithm 1, step 1 is a sum over tokens divided by a count
(:mod:`lora_da_ref.torch.statistics`; paper orientation, ``W`` (d_in, d_out))::

    Z = Σ_{t∈P} x xᵀ / |P|,   Y = Σ_{t∈P} s sᵀ / |P|,   G = Σ_b w_b ∇_W L_b / Σ_b w_b.

With the calibration set ``S = S_0 ∪ … ∪ S_{R-1}`` split over ``R`` ranks,
``Σ_{t∈S} = Σ_r Σ_{t∈S_r}``: all-reducing (SUM) each rank's unnormalised :class:`KFACSums` —
``Z``, ``Y`` (full or diagonal), ``G``, the token / sample counts and ``Σ_b w_b``, in the
statistics dtype — *before* :func:`finalize` gives the single-process statistics of the union,
up to the order of floating-point additions.

Design (one call of :func:`init_lora_da_distributed` on every rank of the group; it is
:func:`lora_da_ref.torch.pipeline.run_pipeline` with the :class:`DataParallel` strategy):

1. **Pass.** Each rank runs the ordinary statistics pass on its own shard (``layers_per_pass``
   unchanged: one pass per group of layers). A plain replicated model runs no collectives in the
   pass. A model whose forward runs collectives (FSDP ``fully_shard``) runs in **lockstep**:
   every rank makes the same number of forward/backward steps per pass; a rank with fewer
   usable batches pads with extra steps whose statistics are discarded (its own first usable
   batch, or one broadcast from a rank that has one). The hooks see the full activations and
   output gradients (FSDP all-gathers the weights for each forward/backward), so ``G`` comes
   from the hooks, never from the sharded ``weight.grad``.
2. **All-reduce** of the sums and counts (:func:`all_reduce_sums`, :mod:`.collectives`), bucketed in flat buffers.
3. **Layer-parallel solve + broadcast.** The input groups (modules sharing ``Z``: q/k/v,
   gate/up) are split over the ranks by a deterministic greedy balance of their solve cost
   (≈ ``d_in³``); each rank solves its share (:func:`lora_da_ref.torch.factors.solve_layer`) and
   broadcasts ``A``, ``B`` and the eigenvalues. Chosen over "every rank solves every layer"
   because (a) the solves of a deep model run ``R`` times faster, and (b) the factors are
   **bitwise identical on every rank by construction** — a replicated solve is identical only
   if every rank's all-reduce result, BLAS/LAPACK build, thread count and GPU kernels agree.
4. **Errors.** After each stage (input check, pass, finalize, solves) every rank all-reduces a
   failure flag. When any rank failed, every rank raises: the failing rank its own exception,
   the others :class:`RankFailedError` naming the failed rank(s) and their messages. In a
   lockstep (FSDP) pass a failed rank re-raises at once without the flag exchange — its peers
   may be inside an FSDP collective, and a mismatched gloo collective aborts the process — and
   its peers fail when that collective errors or the group's timeout
   (``init_process_group(timeout=...)``) expires, with a :class:`RankFailedError` saying so.
   Each rank's model is restored in ``finally`` (requires_grad, train/eval modes, hooks;
   FSDP2 modules resharded).

Modules, one job each: :mod:`.bootstrap` (torchrun, group resolution), :mod:`.lockstep` (FSDP),
:mod:`.collectives` (all-reduce, broadcast), :mod:`.failures` (failure propagation),
:mod:`.strategy` (the pipeline strategy and the entry points).
"""

from lora_da_ref.torch.distributed.bootstrap import join_torchrun_group, resolve_process_group
from lora_da_ref.torch.distributed.collectives import (
    BUCKET_NUMEL,
    all_reduce_sums,
    broadcast_factors,
)
from lora_da_ref.torch.distributed.failures import RankFailedError, all_ranks_or_none
from lora_da_ref.torch.distributed.strategy import (
    DataParallel,
    assign_layers,
    collect_statistics_distributed,
    init_lora_da_distributed,
)

__all__ = [
    "BUCKET_NUMEL",
    "DataParallel",
    "RankFailedError",
    "all_ranks_or_none",
    "all_reduce_sums",
    "assign_layers",
    "broadcast_factors",
    "collect_statistics_distributed",
    "init_lora_da_distributed",
    "join_torchrun_group",
    "resolve_process_group",
]
