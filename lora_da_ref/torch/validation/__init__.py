"""How far is the production path from the exact theory? ``python -m lora_da_ref.cli.validate``.

Modules, one job each:

* :mod:`.cases` — the built-in small cases (model, batches, layers, per-token loss);
* :mod:`.metrics` — principal angles, regret on the exact Ω (Eq. 8), relative errors, solvers vs
  dense ``eigh``;
* :mod:`.compare` — :func:`validate`: the production path against the dense exact Fisher per layer;
* :mod:`.smollm2` — ``--case smollm2``: the real pretrained SmolLM2-135M-Instruct on HumanEval
  (solver, precision, K-FAC sub-block, conditioning and split-half stability truths, 210 layers);
* :mod:`.report` — text tables; :mod:`.cli` — the command line.
"""

from lora_da_ref.torch.validation.cases import (
    BUILTIN_CASES,
    ValidationCase,
    kfac_exact_case,
    tiny_llama_case,
    token_mlp_case,
)
from lora_da_ref.torch.validation.compare import DEFAULT_RANK, MAX_PARAMS, METHODS, validate
from lora_da_ref.torch.validation.metrics import solver_comparison, subspace_metrics
from lora_da_ref.torch.validation.report import format_report

__all__ = [
    "BUILTIN_CASES",
    "DEFAULT_RANK",
    "MAX_PARAMS",
    "METHODS",
    "ValidationCase",
    "format_report",
    "kfac_exact_case",
    "solver_comparison",
    "subspace_metrics",
    "tiny_llama_case",
    "token_mlp_case",
    "validate",
]
