"""Warnings that point at the user's line, however deep in the package they are raised."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

__all__ = ["warn_user"]

_PACKAGE = str(Path(__file__).resolve().parents[1])  # .../lora_da_ref


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` with the ``stacklevel`` of the first caller outside ``lora_da_ref``: the
    warning's file, line and the source line Python prints are the user's call (``init_lora_da``,
    ``initialize_lora_da_weights``, ``apply_lora_da``), not a line of the package, whichever entry
    point led there."""
    frame, level = sys._getframe(1), 1  # the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)  # + 1: this function's own frame
