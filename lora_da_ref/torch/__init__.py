"""Torch production path of LoRA-DA (Algorithm 1): K-FAC statistics, per-layer eigen-solve.

Same names as the NumPy reference (:mod:`lora_da_ref`) for the same objects, so one test can
compare both: ``fisher_gradient``, ``inverse_fisher_block_sum``, ``guidance_matrix``,
``smallest_eigvecs``, ``KroneckerFisher``, ``DenseFisher``.
"""

# Configuration and results
# PEFT glue
from lora_da_ref.torch.adapter import apply_lora_da
from lora_da_ref.torch.config import LoraDAConfig, LoraFactors

# Data-parallel statistics over torch.distributed
from lora_da_ref.torch.distributed import (
    RankFailedError,
    all_reduce_sums,
    collect_statistics_distributed,
    init_lora_da_distributed,
    join_torchrun_group,
)

# Statistics → factors of one layer (Algorithm 1, steps 2–5), the torch twin of lora_da_init
from lora_da_ref.torch.factors import (
    Guidance,
    LayerSolution,
    layer_guidance,
    lora_da_init,
    solve_layer,
)

# Fisher representations
from lora_da_ref.torch.fisher import DenseFisher, FisherMatrix, KroneckerFisher, damped_cholesky

# The guidance matrix and the Fisher–gradient (Eqs. 16, 19, 21)
from lora_da_ref.torch.guidance import fisher_gradient, guidance_matrix, inverse_fisher_block_sum

# The initialisation (Algorithm 1)
from lora_da_ref.torch.init import find_target_modules, init_lora_da, layer_factors

# PEFT-native init (EVA conventions): one LoraConfig, one call, a reusable saved state
from lora_da_ref.torch.peft_init import (
    LoraDAState,
    get_lora_da_state_dict,
    initialize_lora_da_weights,
    load_lora_da_state,
    save_lora_da_state,
)

# Eigensolvers (Eqs. 5-8)
from lora_da_ref.torch.solvers import SOLVERS, EigenResult, smallest_eigenpairs, smallest_eigvecs

# K-FAC statistics (Algorithm 1, step 1)
from lora_da_ref.torch.statistics import (
    KFACStatistics,
    KFACSums,
    accumulate_statistics,
    collect_statistics,
    finalize,
)

__all__ = [
    "SOLVERS",
    "DenseFisher",
    "EigenResult",
    "FisherMatrix",
    "Guidance",
    "KFACStatistics",
    "KFACSums",
    "KroneckerFisher",
    "LayerSolution",
    "LoraDAConfig",
    "LoraDAState",
    "LoraFactors",
    "RankFailedError",
    "accumulate_statistics",
    "all_reduce_sums",
    "apply_lora_da",
    "collect_statistics",
    "collect_statistics_distributed",
    "damped_cholesky",
    "finalize",
    "find_target_modules",
    "fisher_gradient",
    "get_lora_da_state_dict",
    "guidance_matrix",
    "init_lora_da",
    "init_lora_da_distributed",
    "initialize_lora_da_weights",
    "inverse_fisher_block_sum",
    "join_torchrun_group",
    "layer_factors",
    "layer_guidance",
    "load_lora_da_state",
    "lora_da_init",
    "save_lora_da_state",
    "smallest_eigenpairs",
    "smallest_eigvecs",
    "solve_layer",
]
