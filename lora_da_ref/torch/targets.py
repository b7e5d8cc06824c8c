"""Which ``nn.Linear`` modules LoRA-DA initialises: ``target_modules`` as PEFT users write them.

The three forms of PEFT's ``LoraConfig(target_modules=...)`` (``peft.tuners.tuners_utils.
check_target_module_exists`` and ``_maybe_include_all_linear_layers``), with the same meaning:

* a **list/tuple of names** — module ``name`` is a target iff ``name == t`` or
  ``name.endswith("." + t)`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``). Unlike
  PEFT, which only fails when *nothing* matches, every entry must match at least one module
  (a typo is an error, not a silently smaller adapter);
* a **string** — a regular expression that must match the **whole** module name
  (``re.fullmatch``, as PEFT), e.g. ``r".*\\.(q_proj|v_proj)"``;
* ``"all-linear"`` (any case) — every ``nn.Linear`` except the output head: the module returned
  by ``model.get_output_embeddings()`` (PEFT's rule for a ``PreTrainedModel``); when that is
  ``None`` (a classification model), the first of the usual classifier heads ``classifier``,
  ``score``, ``v_head``, ``classification_head`` found on the model (PEFT drops these only for
  ``task_type="SEQ_CLS"``; LoRA-DA has no task type, and a head is never a LoRA target). Modules
  inside a PEFT adapter layer (``lora_A``, ``lora_B``, ``base_layer``, ...) are never targets.

Only ``nn.Linear`` is supported (the statistics hooks read ``o = Wᵀx``): a name or regex that
matches another module type raises ``ValueError`` (PEFT raises too, for types it cannot wrap);
``transformers``' ``Conv1D`` (GPT-2) is ``nn.Linear``-like but stores ``W`` transposed and is
rejected by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

__all__ = ["ALL_LINEAR", "find_target_modules"]

ALL_LINEAR = "all-linear"  # peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND
_CLASSIFIER_HEADS = (
    "classifier",
    "score",
    "v_head",
    "classification_head",
)  # PEFT SEQ_CLS_HEAD_NAMES


def find_target_modules(
    model: nn.Module, target_modules: str | Iterable[str]
) -> dict[str, nn.Linear]:
    """The target ``nn.Linear`` modules of ``model``, ``{name: module}`` in model order.

    Args:
        model: any ``nn.Module`` (a Hugging Face ``PreTrainedModel`` for the output-head rule).
        target_modules: a list of name suffixes, a regex string (full match) or ``"all-linear"``
            (see the module docstring).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``target_modules`` has the wrong type.
        ValueError: nothing matches, a suffix matches nothing, a match is not ``nn.Linear``, or
            the regex does not compile.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_modules())
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            found = _all_linear(model, named)
        else:
            found = _regex(target_modules, named)
    else:
        if isinstance(target_modules, bytes) or not isinstance(target_modules, Iterable):
            raise TypeError(
                "target_modules must be a list of module-name suffixes, a regex string or "
                f"'all-linear', got {type(target_modules).__name__}"
            )
        found = _suffixes(list(target_modules), named)
    order = {n: i for i, (n, _) in enumerate(named)}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def _suffixes(suffixes: list[object], named: list[tuple[str, nn.Module]]) -> dict[str, nn.Linear]:
    if not suffixes:
        raise ValueError("target_modules is empty")
    found: dict[str, nn.Linear] = {}
    for suffix in suffixes:
        if not isinstance(suffix, str) or not suffix:
            raise TypeError(f"target_modules entries must be non-empty strings, got {suffix!r}")
        matches = [(n, m) for n, m in named if n == suffix or n.endswith("." + suffix)]
        if not matches:
            raise ValueError(f"target module {suffix!r} matches no module of the model")
        for n, m in matches:
            found[n] = _require_linear(n, m, f"target {suffix!r}")
    return found


def _regex(pattern: str, named: list[tuple[str, nn.Module]]) -> dict[str, nn.Linear]:
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"target_modules regex {pattern!r} does not compile: {err}") from None
    found = {
        n: _require_linear(n, m, f"target_modules regex {pattern!r}")
        for n, m in named
        if n and compiled.fullmatch(n)
    }
    if not found:
        hint = ""
        if any(n.endswith("." + pattern) for n, _ in named):
            hint = f" (a string is a regex matched against the full name, as in PEFT; for a suffix pass a list: [{pattern!r}])"
        raise ValueError(
            f"target_modules regex {pattern!r} full-matches no module name of the model{hint}"
        )
    return found


def _all_linear(model: nn.Module, named: list[tuple[str, nn.Module]]) -> dict[str, nn.Linear]:
    excluded = {name for name, _ in _adapter_children(named)}
    head = _output_head(model)
    if head is not None:
        excluded |= {n for n, m in named if m is head}
    found = {n: m for n, m in named if isinstance(m, nn.Linear) and n not in excluded}
    if not found:
        conv1d = [n for n, m in named if type(m).__name__ == "Conv1D"]
        extra = f"; its Conv1D layers ({conv1d[0]}, ...) are not supported" if conv1d else ""
        raise ValueError(f"'all-linear' found no nn.Linear in the model besides its head{extra}")
    return found


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        head = next(
            (
                getattr(model, n)
                for n in _CLASSIFIER_HEADS
                if isinstance(getattr(model, n, None), nn.Module)
            ),
            None,
        )
    return head


def _adapter_children(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Modules inside a PEFT adapter layer (never targets; PEFT excludes them too)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is optional
        return []
    out = []
    for prefix, module in named:
        if isinstance(module, BaseTunerLayer):
            out += [(f"{prefix}.{s}" if prefix else s, c) for s, c in module.named_modules() if s]
    return out


def _require_linear(name: str, module: nn.Module, what: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"{what} matches {name!r} of type {type(module).__name__}; only nn.Linear is supported"
        )
    return module
