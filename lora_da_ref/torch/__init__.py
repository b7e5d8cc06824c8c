"""Torch production path of LoRA-DA (Algorithm 1): K-FAC statistics, per-layer eigen-solve.

Same names as the NumPy reference (:mod:`lora_da_ref`) for the same objects, so one test can
compare both: ``fisher_gradient``, ``inverse_fisher_block_sum``, ``guidance_matrix``,
``smallest_eigvecs``, ``lora_da_init``, ``KroneckerFisher``, ``DenseFisher``.

What a user calls, grouped by job in ``__all__``: the PEFT call
(:func:`initialize_lora_da_weights`) or :func:`init_lora_da` for a whole model (data-parallel:
:func:`init_lora_da_distributed`), the two stages (:func:`collect_statistics`, then
:func:`lora_da_factors` per solve configuration), the PEFT glue and saved state, and
:func:`lora_da_init` for one layer given its Fisher and gradient. Everything
else (the pipeline's stages, the statistics' sums, the solvers' registry, the per-layer solve
with its intermediates) stays importable from its module: :mod:`.statistics`, :mod:`.factors`,
:mod:`.guidance`, :mod:`.solvers`, :mod:`.fisher`, :mod:`.pipeline`, :mod:`.distributed`.
"""

# PEFT glue: factors written into an adapter
from lora_da_ref.torch.adapter import apply_lora_da

# Configuration and results
from lora_da_ref.torch.config import LoraDAConfig, LoraFactors, SolveConfig, StatisticsConfig

# Data-parallel LoRA-DA over torch.distributed
from lora_da_ref.torch.distributed import (
    RankFailedError,
    init_lora_da_distributed,
    join_torchrun_group,
)

# One layer: Algorithm 1's map (J, G, n, r) → (A0, B0), the torch twin of the NumPy lora_da_init
from lora_da_ref.torch.factors import lora_da_init

# Fisher representations
from lora_da_ref.torch.fisher import DenseFisher, KroneckerFisher

# The guidance matrix and the Fisher–gradient (Eqs. 16, 19, 21)
from lora_da_ref.torch.guidance import fisher_gradient, guidance_matrix, inverse_fisher_block_sum

# The whole model (Algorithm 1)
from lora_da_ref.torch.init import find_target_modules, init_lora_da

# PEFT: one LoraConfig, one call, a reusable saved state
from lora_da_ref.torch.peft_init import (
    LoraDAState,
    get_lora_da_state_dict,
    initialize_lora_da_weights,
    load_lora_da_state,
    save_lora_da_state,
)

# Eigensolvers (Eqs. 5-8)
from lora_da_ref.torch.solvers import smallest_eigvecs

# The method in two stages (statistics once, solves many) and the diagnosis
from lora_da_ref.torch.stages import collect_statistics, diagnose, lora_da_factors

# K-FAC statistics (Algorithm 1, step 1)
from lora_da_ref.torch.statistics import KFACStatistics

__all__ = [  # noqa: RUF022  grouped by job (as curvlinops groups its __all__), not sorted
    # The whole model: one PEFT call, or the factors of a plain model, or data-parallel
    "initialize_lora_da_weights",
    "init_lora_da",
    "init_lora_da_distributed",
    "join_torchrun_group",
    "RankFailedError",
    # The method in two stages (statistics once, solves many) and the diagnosis
    "collect_statistics",
    "lora_da_factors",
    "diagnose",
    "KFACStatistics",
    # Configuration and results
    "LoraDAConfig",
    "StatisticsConfig",
    "SolveConfig",
    "LoraFactors",
    "find_target_modules",
    # PEFT glue: factors written into an adapter, a reusable saved state
    "apply_lora_da",
    "LoraDAState",
    "get_lora_da_state_dict",
    "save_lora_da_state",
    "load_lora_da_state",
    # One layer, the NumPy reference's twins: Algorithm 1's map, Eqs. (16), (19), (21), (5)-(8)
    "lora_da_init",
    "fisher_gradient",
    "guidance_matrix",
    "inverse_fisher_block_sum",
    "smallest_eigvecs",
    "DenseFisher",
    "KroneckerFisher",
]
