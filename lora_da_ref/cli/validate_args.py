"""The arguments of ``python -m lora_da_ref.cli.validate`` / ``lora-da validate``, without torch.

``--help`` and a bad flag should answer at once, so the parser is declared here, before torch is
imported; :func:`lora_da_ref.torch.validation.cli.run` runs the parsed arguments. The choices and
defaults below repeat the torch modules' constants (``BUILTIN_CASES``, ``DEFAULT_RANK``,
``METHODS``, ``PARTS``, ``SmolLM2Options``); ``tests/test_validate.py`` checks that they agree.
"""

from __future__ import annotations

import argparse

from lora_da_ref.cli.checks import DefaultsHelpFormatter

__all__ = ["add_arguments", "build_parser"]

REAL_CASE = "smollm2"
BUILTIN_CASES = ("kfac-exact", "tiny-llama", "token-mlp")
DEFAULT_RANK = 4
METHODS = ("kfac-full", "kfac-diag", "official")
PARTS = ("solver", "precision", "conditioning", "stability", "kfac")
# SmolLM2Options' defaults
SMOLLM2 = {"texts": 64, "rank": 8, "kfac_layers": 2, "kfac_block": (32, 12), "kfac_texts": 16,
           "kfac_length": 64, "layers_per_pass": 15}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m lora_da_ref.cli.validate`` / ``lora-da validate``."""
    p.add_argument("--case", choices=sorted([*BUILTIN_CASES, REAL_CASE]), nargs="+", default=None,
                   help="built-in cases (default: all but smollm2; ignored with --model); "
                        "smollm2 = the real SmolLM2-135M-Instruct on HumanEval (docs/real_model.md)")  # fmt: skip
    p.add_argument("--model", default=None, help="local HF causal LM directory (with tokenizer)")
    p.add_argument("--data", default=None, help='JSONL calibration texts ({"text": ...})')
    p.add_argument("--layers", nargs="+", default=None,
                   help="module names or suffixes (default: the linear layers of block 0)")  # fmt: skip
    p.add_argument("--samples", type=int, default=64, help="first N texts of --data")
    p.add_argument("--max-length", type=int, default=128, help="truncate texts (tokens)")
    p.add_argument("--rank", type=int, default=None,
                   help=f"LoRA rank r (default: {DEFAULT_RANK}; smollm2: {SMOLLM2['rank']})")  # fmt: skip
    p.add_argument("--n-train", type=int, default=None, help="N (default: LoraDAConfig's)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS),
                   help="production estimators to compare with the exact theory")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the solvers' random starts")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    g = p.add_argument_group("smollm2 case")
    g.add_argument("--texts", type=int, default=SMOLLM2["texts"],
                   help="calibration texts (first N HumanEval train tasks)")  # fmt: skip
    g.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="which truths to run")  # fmt: skip
    g.add_argument("--kfac-layers", type=int, default=SMOLLM2["kfac_layers"],
                   help="K-FAC truth: layers per module type (seeded)")  # fmt: skip
    g.add_argument("--kfac-block", type=int, nargs=2, default=list(SMOLLM2["kfac_block"]),
                   metavar=("IN", "OUT"), help="K-FAC truth: sub-block size |I| |J|")  # fmt: skip
    g.add_argument("--kfac-texts", type=int, default=SMOLLM2["kfac_texts"],
                   help="K-FAC truth: texts (all their tokens carry a loss)")  # fmt: skip
    g.add_argument("--kfac-length", type=int, default=SMOLLM2["kfac_length"],
                   help="K-FAC truth: tokens per text")  # fmt: skip
    g.add_argument("--layers-per-pass", type=int, default=SMOLLM2["layers_per_pass"],
                   help="decoder layers per statistics pass (memory; 0 = all in one pass)")  # fmt: skip
    g.add_argument("--workers", type=int, default=0,
                   help="processes for the per-layer solves (0 = one per CPU core, at most 8)")  # fmt: skip
    g.add_argument("--progress", action="store_true", help="print one line per finished layer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_da_ref.cli.validate",
        description="Compare the LoRA-DA production path with the exact theory, layer by layer.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_arguments(parser)
    return parser
