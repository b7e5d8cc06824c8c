"""lora_da_ref — a math-first reference implementation of LoRA-DA (ICML 2026).

Two layers share one vocabulary:

* the exact NumPy/SciPy reference (this namespace): dense Fisher, Eqs. (13), (16)–(21), (5)–(8);
* the torch production path (:mod:`lora_da_ref.torch`): K-FAC statistics with hooks, per-layer
  eigen-solves and PEFT adapters — the same function names for the same objects.

Conventions: ``W`` is (d1, d2) = (d_in, d_out), ``vec`` stacks columns, ``J ≈ Y ⊗ Z``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Eigen-solution, Eqs. (5)–(8).
from lora_da_ref.reference.eigen import smallest_eigenpairs, smallest_eigvecs

# Fisher representations (which matrix vs how it is stored).
from lora_da_ref.reference.fisher import DenseFisher, FisherMatrix, KroneckerFisher, as_fisher

# Guidance matrix and Fisher–gradient, Eqs. (13), (16), (19)–(21).
from lora_da_ref.reference.guidance import (
    fisher_gradient,
    guidance_matrix,
    inverse_fisher_block_sum,
)

# Initialisers: LoRA-DA (Eq. 17), baselines and ablations.
from lora_da_ref.reference.initializers import INITIALIZERS, InitProblem, initialize, lora_da_init

# Conventions and helpers.
from lora_da_ref.reference.linalg import principal_angles, random_orthonormal, unvec, vec

# Synthetic models with an exact Fisher, and the Monte-Carlo estimate of the objective (11).
from lora_da_ref.reference.monte_carlo import (
    MonteCarloResult,
    monte_carlo_error,
    subspace_projection,
)

# The objective (11) and its parts, Eqs. (23)–(27), (43)–(48).
from lora_da_ref.reference.objective import (
    ErrorBound,
    bias_term,
    expected_error_bound,
    projected_fisher,
    unrelaxed_variance,
    variance_term,
)
from lora_da_ref.reference.synthetic import (
    ConvergenceError,
    LinearGaussian,
    LogisticRegression,
    SoftmaxRegression,
    SyntheticModel,
    design_pool,
)

__version__ = "0.1.0"

# The torch path is imported lazily so that the NumPy reference (and ``python -m proofs_check``)
# does not pay for ``import torch``.
_LAZY = {
    "LoraDAConfig": "lora_da_ref.torch",
    "LoraFactors": "lora_da_ref.torch",
    "init_lora_da": "lora_da_ref.torch",
    "apply_lora_da": "lora_da_ref.torch",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lora_da_ref' has no attribute {name!r}")


__all__ = [
    "INITIALIZERS",
    "ConvergenceError",
    "DenseFisher",
    "ErrorBound",
    "FisherMatrix",
    "InitProblem",
    "KroneckerFisher",
    "LinearGaussian",
    "LogisticRegression",
    "LoraDAConfig",
    "LoraFactors",
    "MonteCarloResult",
    "SoftmaxRegression",
    "SyntheticModel",
    "__version__",
    "apply_lora_da",
    "as_fisher",
    "bias_term",
    "design_pool",
    "expected_error_bound",
    "fisher_gradient",
    "guidance_matrix",
    "init_lora_da",
    "initialize",
    "inverse_fisher_block_sum",
    "lora_da_init",
    "monte_carlo_error",
    "principal_angles",
    "projected_fisher",
    "random_orthonormal",
    "smallest_eigenpairs",
    "smallest_eigvecs",
    "subspace_projection",
    "unrelaxed_variance",
    "unvec",
    "variance_term",
    "vec",
]
