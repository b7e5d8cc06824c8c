"""How far is the production path from the exact theory? ``python -m lora_da_ref.validate``.

The thin entry point of :mod:`lora_da_ref.torch.validation` (cases, metrics, comparison, report,
command line); ``lora-da validate`` runs the same command. Built-in cases (``--case``):
``tiny-llama``, ``token-mlp``, ``kfac-exact`` (dense exact Fisher per layer) and ``smollm2`` (the
real pretrained SmolLM2-135M-Instruct on HumanEval, all 210 projections; see docs/real_model.md).
``--model DIR --data FILE.jsonl`` runs on a local Hugging Face causal LM instead; ``--json``
prints JSON.
"""

from __future__ import annotations

import sys

from lora_da_ref.torch.validation.cases import (
    BUILTIN_CASES,
    ValidationCase,
    kfac_exact_case,
    tiny_llama_case,
    token_mlp_case,
)
from lora_da_ref.torch.validation.cli import add_arguments, build_parser, main, run
from lora_da_ref.torch.validation.compare import DEFAULT_RANK, MAX_PARAMS, METHODS, validate
from lora_da_ref.torch.validation.metrics import solver_comparison, subspace_metrics
from lora_da_ref.torch.validation.report import format_report

__all__ = [
    "BUILTIN_CASES",
    "DEFAULT_RANK",
    "MAX_PARAMS",
    "METHODS",
    "ValidationCase",
    "add_arguments",
    "build_parser",
    "format_report",
    "kfac_exact_case",
    "main",
    "run",
    "solver_comparison",
    "subspace_metrics",
    "tiny_llama_case",
    "token_mlp_case",
    "validate",
]

if __name__ == "__main__":
    sys.exit(main())
