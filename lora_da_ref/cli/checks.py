"""Cheap checks of the command line's arguments and paths, made before torch is imported, and
the help formatter of the package's command lines.

A wrong flag should cost the user a second, not the minute it takes to import torch and load a
model. Every check raises ``ValueError`` (or ``FileNotFoundError``) with one line that names the
flag or the file; :func:`lora_da_ref.cli.main` prints it and exits with status 2. No torch here.
"""

from __future__ import annotations

import math
import os
import re
from argparse import SUPPRESS, Action, HelpFormatter, Namespace
from pathlib import Path

from lora_da_ref.cli.jsonl import check_data_file

__all__ = [
    "DefaultsHelpFormatter",
    "check_common",
    "check_device_name",
    "check_model_dir",
    "check_out_dir",
    "parse_size",
]

# Binary units, as memory is sized: 8G = 8 GiB.
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
# torch.device's types a user would name; anything else is a typo (checked again by torch later).
_DEVICE = re.compile(r"^(auto|cpu|cuda|mps|xpu|hpu|npu|meta)(:\d+)?$")


def parse_size(text: str) -> int | str | None:
    """``--max-statistics-bytes``: ``"auto"``, ``"none"`` (no budget), or a byte count such as
    ``123456``, ``500M`` or ``8G`` (binary units: K = 1024, G = 2³⁰; a trailing B/iB is allowed)."""
    word = text.strip().lower()
    if word in ("auto", "none"):
        return None if word == "none" else "auto"
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(
            f"--max-statistics-bytes {text!r}: give auto, none or a size such as 500M or 8G"
        )
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(f"--max-statistics-bytes {text!r}: the budget must be positive")
    return size


def check_device_name(device: str) -> None:
    """Reject a device name torch would not know (``gpu``), before torch is imported."""
    if not _DEVICE.match(device):
        raise ValueError(
            f"--device {device!r} is not a torch device (use auto, cpu, cuda, cuda:1, mps)"
        )


def check_model_dir(model: str) -> Path:
    """A local Hugging Face model directory: it exists and holds a ``config.json``."""
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such directory")
    if not path.is_dir():
        raise ValueError(f"--model {path}: is a file; give the model's directory")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--model {path}: not a local Hugging Face model directory (no config.json)"
        )
    return path


def check_out_dir(out: str) -> Path:
    """An output directory that can be written: not a file, and its nearest existing ancestor is
    a writable directory (so the minutes of an init are not lost at the save)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path}: is a file, not a directory")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: {existing} is not writable")
    return path


_AT_LEAST = {  # flag -> (attribute, smallest value, why)
    "--rank": ("rank", 1, ""),
    "--samples": ("samples", 1, ""),
    "--max-length": ("max_length", 2, " (a causal LM needs 2 tokens to predict one)"),
    "--batch-size": ("batch_size", 1, ""),
    "--layers-per-pass": ("layers_per_pass", 1, ""),
    "--probe-sequences": ("probe_sequences", 1, ""),
}


def check_common(args: Namespace) -> None:
    """The arguments ``init`` and ``plan`` share: ranges, flags that go together, the paths."""
    for flag, (attr, least, why) in _AT_LEAST.items():
        value = getattr(args, attr, None)
        if value is not None and value < least:
            raise ValueError(f"{flag} must be >= {least}{why}, got {value}")
    if args.n_train is not None and not (math.isfinite(args.n_train) and args.n_train > 0):
        raise ValueError(f"--n-train must be positive, got {args.n_train}")
    if args.damping is not None and not (math.isfinite(args.damping) and args.damping >= 0):
        raise ValueError(f"--damping must be a finite number >= 0, got {args.damping}")
    if args.damping_scale is not None and args.damping is None:
        raise ValueError(
            "--damping-scale needs --damping: the preset's damping is meant in its own scale"
        )
    if (args.prompt_field is None) != (args.completion_field is None):
        raise ValueError("give both --prompt-field and --completion-field, or neither")
    parse_size(args.max_statistics_bytes)
    check_device_name(args.device)
    check_model_dir(args.model)
    check_data_file(args.data)
    if getattr(args, "out", None) is not None:
        check_out_dir(args.out)


class DefaultsHelpFormatter(HelpFormatter):
    """Every option's help ends with its default (unless None, i.e. required or 'not set', or
    the help already states it), so ``--help`` answers "what happens if I leave it out"."""

    def _get_help_string(self, action: Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default" in text or action.default in (None, SUPPRESS):
            return text
        if not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"
