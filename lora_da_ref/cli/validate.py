"""How far is the production path from the exact theory? ``python -m lora_da_ref.cli.validate``.

The thin entry point of :mod:`lora_da_ref.torch.validation` (cases, metrics, comparison, report,
command line); ``lora-da validate`` runs the same command. Built-in cases (``--case``):
``tiny-llama``, ``token-mlp``, ``kfac-exact`` (dense exact Fisher per layer) and ``smollm2`` (the
real pretrained SmolLM2-135M-Instruct on HumanEval, all 210 projections; see docs/real_model.md).
``--model DIR --data FILE.jsonl`` runs on a local Hugging Face causal LM instead; ``--json``
prints JSON.

The arguments are parsed before torch is imported (:mod:`lora_da_ref.cli.validate_args`), so
``--help`` and a bad flag answer at once; the other names load :mod:`lora_da_ref.torch.validation`
on first use.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lora_da_ref.cli.validate_args import add_arguments, build_parser

if TYPE_CHECKING:  # the names __getattr__ loads, for readers and type checkers
    from lora_da_ref.torch.validation.cases import (
        BUILTIN_CASES,
        ValidationCase,
        kfac_exact_case,
        tiny_llama_case,
        token_mlp_case,
    )
    from lora_da_ref.torch.validation.cli import run
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

_LAZY = {  # name -> the torch module that defines it
    "BUILTIN_CASES": "cases", "ValidationCase": "cases", "kfac_exact_case": "cases",
    "tiny_llama_case": "cases", "token_mlp_case": "cases", "run": "cli",
    "DEFAULT_RANK": "compare", "MAX_PARAMS": "compare", "METHODS": "compare", "validate": "compare",
    "solver_comparison": "metrics", "subspace_metrics": "metrics", "format_report": "report",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"lora_da_ref.torch.validation.{_LAZY[name]}")
    return getattr(module, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input prints one line and returns 2."""
    args = build_parser().parse_args(argv)
    from lora_da_ref.torch.validation.cli import run

    try:
        return run(args)
    except (ValueError, OSError) as err:
        print(f"validate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
