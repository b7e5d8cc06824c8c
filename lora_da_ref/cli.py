"""The ``lora-da`` command line (also ``python -m lora_da_ref``).

Subcommands live in :data:`SUBCOMMANDS`, a dict of name -> :class:`Subcommand`; adding one is
one entry there. ``main(argv)`` returns the exit status (0 ok, 2 bad input).

``lora-da init`` runs Algorithm 1 on a local Hugging Face causal LM and writes a PEFT adapter:

    lora-da init --model DIR --data calib.jsonl --rank 8 --out ADAPTER_DIR

The JSONL file holds one JSON object per line with the text under ``"text"`` (``--text-field``).
Output in ``ADAPTER_DIR``: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` (load
with ``PeftModel.from_pretrained(base, ADAPTER_DIR)``) and ``lora_da.json`` (settings and per-layer
diagnostics). With ``--offset subtract`` the base weights become ``W0 − s·A0B0``, so the adapter
must be loaded on *those* weights, which are saved to ``ADAPTER_DIR/base_model`` (model and
tokenizer); ``adapter_config.json``'s ``base_model_name_or_path`` points there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "SUBCOMMANDS", "Preset", "Subcommand", "main"]

BAD_INPUT = 2  # exit status for user errors, as argparse uses


@dataclass(frozen=True)
class Subcommand:
    """A CLI subcommand: its help line, how it declares its arguments, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Preset:
    """A LoraDAConfig constructor and the PEFT scaling it is meant to be trained with.

    ``lora_alpha=None`` means ``alpha = r`` (scaling ``s = 1``: the model starts at exactly
    ``W0 + A0 B0``, Eq. 17).
    """

    config: str  # name of the LoraDAConfig classmethod
    lora_alpha: float | None
    use_rslora: bool


PRESETS = {
    # Official code: rsLoRA, alpha 16 with r 8 (MATH.md, "Official code").
    "official": Preset("official", lora_alpha=16.0, use_rslora=True),
    # Paper's Algorithm 1 as written; s = 1 so W0 + s·A0B0 is the projected target of Eq. (17).
    "paper": Preset("paper", lora_alpha=None, use_rslora=False),
}
DTYPES = ("float32", "float64")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- init


def _add_init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local directory of a HF causal LM + tokenizer")
    p.add_argument("--data", required=True, help='JSONL file, one {"text": ...} object per line')
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--config", choices=sorted(PRESETS), default="official", help="preset")
    p.add_argument("--target-modules", nargs="+", default=None, help="default: all 7 projections")
    p.add_argument("--samples", type=int, default=256, help="use the first N texts (default 256)")
    p.add_argument(
        "--max-length", type=int, default=1024, help="truncate texts to this many tokens"
    )
    p.add_argument("--batch-size", type=int, default=1, help="sequences per batch (default 1)")
    p.add_argument("--text-field", default="text", help='JSONL field of the text (default "text")')
    p.add_argument("--offset", choices=("none", "subtract"), default="none")
    p.add_argument("--n-train", type=int, default=None, help="N, fine-tuning set size")
    p.add_argument("--lora-alpha", type=float, default=None, help="default: from the preset")
    p.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the statistics")
    p.add_argument("--model-dtype", choices=MODEL_DTYPES, default="auto")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if any)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_init(args: argparse.Namespace) -> int:
    """Algorithm 1 on a local model, then a PEFT adapter holding (A0, B0) (Eq. 17)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_da_ref.data import read_jsonl_texts, tokenize_batches
    from lora_da_ref.torch.adapter import apply_lora_da
    from lora_da_ref.torch.distributed import join_torchrun_group
    from lora_da_ref.torch.init import init_lora_da

    config, preset = _lora_da_config(args)
    rank, world = join_torchrun_group()  # (0, 1) unless launched by torchrun
    texts = read_jsonl_texts(args.data, field=args.text_field, limit=args.samples)
    tokenizer = _load_tokenizer(args.model)
    batches = tokenize_batches(
        tokenizer, texts, max_length=args.max_length, batch_size=args.batch_size
    )
    model = _load_model(args)
    # Under torchrun each rank takes every world-th batch; all ranks get the same factors.
    factors = init_lora_da(model, batches[rank::world], config, progress=not args.no_progress)
    if rank != 0:
        return 0  # rank 0 writes the adapter
    torch.manual_seed(args.seed)  # PEFT's default init is overwritten, but keep it reproducible
    peft_model = get_peft_model(model, _peft_config(args, config, preset, LoraConfig))
    apply_lora_da(peft_model, factors, offset=args.offset)
    out = _save(args, peft_model, tokenizer, config, factors, texts, batches)
    print(
        f"lora-da: wrote a rank-{config.rank} LoRA-DA adapter for {len(factors)} modules to {out}"
    )
    return 0


def _lora_da_config(args: argparse.Namespace) -> tuple[Any, Preset]:
    import torch

    from lora_da_ref.torch.config import LoraDAConfig

    preset = PRESETS[args.config]
    overrides: dict[str, Any] = {"rank": args.rank, "seed": args.seed}
    overrides["dtype"] = getattr(torch, args.dtype)
    if args.target_modules:
        overrides["target_modules"] = tuple(args.target_modules)
    if args.n_train is not None:
        overrides["n_train"] = args.n_train
    return getattr(LoraDAConfig, preset.config)(**overrides), preset


def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--model {path}: not a local Hugging Face model directory (no config.json)"
        )
    return AutoTokenizer.from_pretrained(path)


def _load_model(args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.model_dtype if args.model_dtype == "auto" else getattr(torch, args.model_dtype)
    with _hf_progress(not args.no_progress):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    return model.to(device).eval()


@contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """Hugging Face's own progress bars (loading/saving shards) off unless ``enabled``; restored."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _peft_config(args: argparse.Namespace, config: Any, preset: Preset, lora_config: type) -> Any:
    alpha = args.lora_alpha if args.lora_alpha is not None else preset.lora_alpha
    alpha = float(config.rank) if alpha is None else alpha
    rslora = preset.use_rslora if args.rslora is None else args.rslora
    return lora_config(
        r=config.rank,
        lora_alpha=alpha,
        target_modules=list(config.target_modules),
        use_rslora=rslora,
        lora_dropout=0.0,
    )


def _save(
    args: argparse.Namespace,
    peft_model: Any,
    tokenizer: Any,
    config: Any,
    factors: dict[str, Any],
    texts: list[str],
    batches: list[dict[str, Any]],
) -> Path:
    """Adapter + ``lora_da.json``; with ``--offset subtract`` also the offset base model."""
    out = Path(args.out)
    if args.offset == "subtract":
        base_dir = (out / "base_model").resolve()
        peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(out, save_embedding_layers=False)  # LoRA-DA never touches them
    (out / "lora_da.json").write_text(
        json.dumps(_provenance(args, config, factors, texts, batches), indent=2) + "\n"
    )
    if args.offset == "subtract":
        # The adapter only reproduces the original model on top of W0 − s·A0B0: save those weights.
        base = peft_model.unload()  # drops LoRA layers, keeps the offset base weights
        with _hf_progress(not args.no_progress):
            base.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    return out


def _provenance(
    args: argparse.Namespace,
    config: Any,
    factors: dict[str, Any],
    texts: list[str],
    batches: list[dict[str, Any]],
) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(config).items() if k != "dtype"}
    settings["dtype"] = str(config.dtype).removeprefix("torch.")
    return {
        "method": "LoRA-DA (Algorithm 1)",
        "preset": args.config,
        "offset": args.offset,
        "base_model": "base_model" if args.offset == "subtract" else str(args.model),
        "data": {"file": str(args.data), "texts": len(texts), "batches": len(batches)},
        "config": _jsonable(settings),
        "layers": {name: _jsonable(f.diagnostics) for name, f in factors.items()},
    }


def _jsonable(value: Any) -> Any:
    import torch

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# ----------------------------------------------------------------------------- make-tiny-model


def _add_tiny_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="directory to write the model and tokenizer to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)


def _run_tiny(args: argparse.Namespace) -> int:
    """A random-weight LLaMA + byte-level BPE tokenizer, built offline (for trying the CLI)."""
    from lora_da_ref.data import save_tiny_model

    out = save_tiny_model(args.out, seed=args.seed, layers=args.layers, hidden=args.hidden)
    print(
        f"lora-da: wrote a tiny random LLaMA ({args.layers} layers, hidden {args.hidden}) to {out}"
    )
    return 0


# ----------------------------------------------------------------------------- entry point

SUBCOMMANDS: dict[str, Subcommand] = {
    "init": Subcommand(
        "LoRA-DA init of a local HF causal LM -> PEFT adapter", _add_init_arguments, _run_init
    ),
    "make-tiny-model": Subcommand(
        "write a tiny random LLaMA + tokenizer (demo)", _add_tiny_arguments, _run_tiny
    ),
    "validate": Subcommand(  # lazy import: lora_da_ref.validate imports torch
        "production path vs exact Fisher/Ω/A0, per layer (see lora_da_ref.validate)",
        lambda p: __import__("lora_da_ref.validate", fromlist=["x"]).add_arguments(p),
        lambda a: __import__("lora_da_ref.validate", fromlist=["x"]).run(a),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-da", description="LoRA-DA: data-aware LoRA initialisation."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lora-da``; bad input (ValueError, OSError such as a missing file) prints one line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except (ValueError, OSError) as err:  # user input: bad values, missing or unreadable files
        print(f"lora-da {args.command}: error: {err}", file=sys.stderr)
        return BAD_INPUT
