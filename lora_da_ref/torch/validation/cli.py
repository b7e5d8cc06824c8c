"""What ``python -m lora_da_ref.cli.validate`` / ``lora-da validate`` runs (:func:`run`); their
arguments are declared once, torch-free, in :mod:`lora_da_ref.cli.validate_args`."""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from lora_da_ref.cli.validate_args import REAL_CASE
from lora_da_ref.data import read_jsonl_texts, tokenize_batches
from lora_da_ref.torch.targets import find_target_modules
from lora_da_ref.torch.validation.cases import BUILTIN_CASES, ValidationCase
from lora_da_ref.torch.validation.compare import DEFAULT_RANK, validate
from lora_da_ref.torch.validation.report import format_report
from lora_da_ref.torch.validation.smollm2 import SmolLM2Options, format_smollm2, run_smollm2

__all__ = ["run"]


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
