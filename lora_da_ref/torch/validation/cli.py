"""Command line of ``python -m lora_da_ref.validate`` / ``lora-da validate``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch
from torch import nn

from lora_da_ref.data import read_jsonl_texts, tokenize_batches
from lora_da_ref.torch.targets import find_target_modules
from lora_da_ref.torch.validation.cases import BUILTIN_CASES, ValidationCase
from lora_da_ref.torch.validation.compare import DEFAULT_RANK, METHODS, validate
from lora_da_ref.torch.validation.report import format_report
from lora_da_ref.torch.validation.smollm2 import PARTS, SmolLM2Options, format_smollm2, run_smollm2

__all__ = ["REAL_CASE", "add_arguments", "build_parser", "main", "run"]

REAL_CASE = "smollm2"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m lora_da_ref.validate`` / ``lora-da validate``."""
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
                   help=f"LoRA rank r (default {DEFAULT_RANK}; smollm2: {SmolLM2Options.rank})")  # fmt: skip
    p.add_argument("--n-train", type=int, default=None, help="N (default: LoraDAConfig's)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    g = p.add_argument_group("smollm2 case")
    g.add_argument("--texts", type=int, default=SmolLM2Options.texts,
                   help="calibration texts (first N HumanEval train tasks)")  # fmt: skip
    g.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="which truths to run")  # fmt: skip
    g.add_argument("--kfac-layers", type=int, default=SmolLM2Options.kfac_layers,
                   help="K-FAC truth: layers per module type (seeded)")  # fmt: skip
    g.add_argument("--kfac-block", type=int, nargs=2, default=list(SmolLM2Options.kfac_block),
                   metavar=("IN", "OUT"), help="K-FAC truth: sub-block size |I| |J|")  # fmt: skip
    g.add_argument("--kfac-texts", type=int, default=SmolLM2Options.kfac_texts,
                   help="K-FAC truth: texts (all their tokens carry a loss)")  # fmt: skip
    g.add_argument("--kfac-length", type=int, default=SmolLM2Options.kfac_length,
                   help="K-FAC truth: tokens per text")  # fmt: skip
    g.add_argument("--layers-per-pass", type=int, default=SmolLM2Options.layers_per_pass,
                   help="decoder layers per statistics pass (memory; 0 = all in one pass)")  # fmt: skip
    g.add_argument("--workers", type=int, default=0,
                   help="processes for the per-layer solves (0 = one per CPU core, at most 8)")  # fmt: skip
    g.add_argument("--progress", action="store_true", help="print one line per finished layer")


def run(args: argparse.Namespace) -> int:
    """Run the validation for the parsed ``args``; print tables (or JSON); return 0."""
    real = args.model is None and REAL_CASE in (args.case or ())
    if real:
        args.case = [c for c in args.case if c != REAL_CASE]
    cases = _cases(args) if not real or args.case else []
    reports = [
        validate(
            case,
            rank=DEFAULT_RANK if args.rank is None else args.rank,
            n_train=args.n_train,
            device=args.device,
            methods=args.methods,
            seed=args.seed,
        )
        for case in cases
    ]
    texts = [format_report(r) for r in reports]
    if real:
        reports.append(run_smollm2(_smollm2_options(args), progress=args.progress))
        texts.append(format_smollm2(reports[-1]))
    if args.json:
        print(json.dumps(reports, indent=1))
    else:
        print("\n\n".join(texts))
    return 0


def _smollm2_options(args: argparse.Namespace) -> SmolLM2Options:
    return SmolLM2Options(
        texts=args.texts,
        rank=SmolLM2Options.rank if args.rank is None else args.rank,
        layers=args.layers,
        parts=tuple(args.parts),
        seed=args.seed,
        kfac_layers=args.kfac_layers,
        kfac_block=tuple(args.kfac_block),
        kfac_texts=args.kfac_texts,
        kfac_length=args.kfac_length,
        layers_per_pass=args.layers_per_pass or None,
        workers=args.workers or None,
    )


def _cases(args: argparse.Namespace) -> list[ValidationCase]:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available on this machine")
    if args.model is None:
        if args.data is not None:
            raise ValueError("--data needs --model")
        names = args.case or sorted(BUILTIN_CASES)
        cases = [BUILTIN_CASES[n]() for n in names]
        for case in cases:
            case.layers = _choose_layers(case.model, args.layers, case.layers)
        return cases
    if args.data is None:
        raise ValueError("--model needs --data (a JSONL file of calibration texts)")
    return [_hf_case(args)]


def _choose_layers(model: nn.Module, layers: list[str] | None, default: list[str]) -> list[str]:
    if not layers:
        return default
    return list(find_target_modules(model, layers))


def _hf_case(args: argparse.Namespace) -> ValidationCase:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = read_jsonl_texts(args.data, limit=args.samples)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches = tokenize_batches(tokenizer, texts, max_length=args.max_length, batch_size=1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    blocks = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers.0." in n]
    layers = _choose_layers(model, args.layers, blocks)
    return ValidationCase(str(args.model), model, batches, layers, description=str(args.data))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_da_ref.validate",
        description="Compare the LoRA-DA production path with the exact theory, layer by layer.",
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input prints one line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:
        print(f"validate: error: {err}", file=sys.stderr)
        return 2
