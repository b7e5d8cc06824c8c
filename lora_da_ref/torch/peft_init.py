"""PEFT-native LoRA-DA with PEFT's EVA conventions: one ``LoraConfig``, one call.

The adapter's PEFT ``LoraConfig`` is the single source of truth for the rank ``r`` (and
``rank_pattern``), the target modules (a list of suffixes, a regex string, ``"all-linear"``,
``layers_to_transform``, ``exclude_modules``), ``lora_alpha`` (and ``alpha_pattern``) and rsLoRA.
:class:`~lora_da_ref.torch.config.LoraDAConfig` (or a preset name) carries only LoRA-DA's own
knobs (β, N, damping, solver, ...); its ``rank`` and ``target_modules`` are replaced by PEFT's.

Three lines, as EVA's ``initialize_lora_eva_weights``::

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, use_rslora=True, ...))
    state = initialize_lora_da_weights(peft_model, dataloader)   # the default preset
    peft_model.save_pretrained(out); save_lora_da_state(out, state)

or, as EVA's ``get_eva_state_dict``, before wrapping (no adapter memory during the pass; under
``torchrun`` every rank passes its shard and gets the same factors)::

    state = get_lora_da_state_dict(model, dataloader, lora_config)   # reusable, saveable
    peft_model = get_peft_model(model, lora_config)
    initialize_lora_da_weights(peft_model, lora_da_state=state)

Which modules: on a PEFT model, exactly the modules PEFT wrapped for the adapter; before wrapping,
PEFT's own matcher (``check_target_module_exists`` after its ``"all-linear"`` expansion), which a
test checks against the wrapped set. Statistics are always those of the **base** weights ``W0``:
during the pass each LoRA layer is temporarily replaced by its base layer (whatever ``lora_B``
holds), and put back in ``finally``.

Provenance (:func:`lora_da_provenance`, one function for the CLI and Python): preset, offset, the
resolved LoraDAConfig, PEFT scaling, data description, package versions, the model's class, name
and dtype, and per-layer diagnostics, each with a fingerprint of the base weight it was computed
for (:func:`weight_fingerprint`; :func:`~lora_da_ref.torch.adapter.apply_lora_da` refuses factors
whose fingerprint does not match the model's weight).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_da_ref.presets import DEFAULT_PRESET, PRESETS, get_preset
from lora_da_ref.torch.adapter import (
    FINGERPRINT_KEY,
    Offset,
    apply_lora_da,
    base_model_of,
    lora_modules,
    weight_fingerprint,
)
from lora_da_ref.torch.config import LoraDAConfig, LoraFactors, preset_of
from lora_da_ref.torch.init import init_lora_da
from lora_da_ref.torch.statistics import LossFn, materialise_batches
from lora_da_ref.torch.warn import warn_user

__all__ = [
    "PROVENANCE_FILE",
    "STATE_FILE",
    "LoraDAState",
    "PresetScalingWarning",
    "get_lora_da_state_dict",
    "initialize_lora_da_weights",
    "load_lora_da_state",
    "lora_da_provenance",
    "resolve_config",
    "save_lora_da_state",
    "write_provenance",
]

PROVENANCE_FILE = "lora_da.json"
STATE_FILE = "lora_da_factors.safetensors"


class PresetScalingWarning(UserWarning):
    """The LoraConfig's scaling s differs from the one the LoRA-DA preset is meant to start at."""


@dataclass
class LoraDAState:
    """LoRA-DA factors and their provenance: what :func:`save_lora_da_state` writes.

    Attributes:
        factors: ``{module name in the base model: LoraFactors}`` in model order.
        provenance: the JSON-ready record of :func:`lora_da_provenance` (``layers`` holds the
            per-layer diagnostics, each with the base weight's fingerprint).
    """

    factors: dict[str, LoraFactors]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        """Per-layer report: ``{module name: diagnostics}`` (damping, solver, residual, ...)."""
        return self.provenance.get("layers", {})


# ----------------------------------------------------------------------------- the two calls


def get_lora_da_state_dict(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    peft_config: Any = None,
    config: LoraDAConfig | str | None = None,
    *,
    adapter_name: str = "default",
    loss_fn: LossFn | None = None,
    progress: bool = True,
    data_description: str | Mapping[str, Any] | None = None,
    statistics_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> LoraDAState:
    """LoRA-DA factors for the modules ``peft_config`` targets (Algorithm 1), before wrapping.

    Args:
        model: a Hugging Face causal LM (or any ``nn.Module`` whose ``loss_fn`` works), or a PEFT
            model (then ``peft_config`` defaults to its adapter's config).
        dataloader: an iterable of batches (``Mapping`` of ``input_ids``, ``attention_mask``,
            ``labels``; a ``DataLoader`` or a list); iterated once and materialised.
        peft_config: the ``peft.LoraConfig`` the adapter will be created with.
        config: LoRA-DA's knobs: a :class:`LoraDAConfig`, a preset name
            (:data:`lora_da_ref.presets.PRESETS`), or ``None`` for ``"default"``
            (``LoraDAConfig()``). Its ``rank`` and ``target_modules`` are
            replaced by ``peft_config``'s.
        loss_fn, progress, statistics_dir, resume: as :func:`~lora_da_ref.torch.init.init_lora_da`
            (each pass's statistics saved to ``statistics_dir``; ``resume`` continues there).
        data_description: free text or a dict recorded in the provenance.

    Returns:
        :class:`LoraDAState`. The model is left as it was.

    Raises:
        ValueError: the LoraConfig targets a non-linear module or uses an unsupported feature
            (DoRA, ``target_parameters``), a targeted weight is non-finite, or what
            :func:`init_lora_da` raises. TypeError: ``peft_config`` is not a ``LoraConfig``.
    """
    store = {"statistics_dir": statistics_dir, "resume": resume}
    if _is_peft(model):
        return _state_for_peft_model(
            model, dataloader, config, adapter_name, loss_fn, progress, data_description,
            peft_config=peft_config, store=store,
        )  # fmt: skip
    peft_config = _check_lora_config(peft_config)
    targets = _peft_targets(model, peft_config)
    ranks = {
        name: _pattern_value(peft_config.rank_pattern, name, peft_config.r) for name in targets
    }
    scalings = {name: _scaling(peft_config, name, ranks[name]) for name in targets}
    return _compute_state(
        model, targets, ranks, scalings, dataloader, config, peft_config,
        loss_fn, progress, data_description, store,
    )  # fmt: skip


def initialize_lora_da_weights(
    peft_model: Any,
    dataloader: Iterable[Mapping[str, Any]] | None = None,
    config: LoraDAConfig | str | None = None,
    *,
    lora_da_state: LoraDAState | None = None,
    adapter_name: str = "default",
    offset: Offset = "none",
    loss_fn: LossFn | None = None,
    progress: bool = True,
    data_description: str | Mapping[str, Any] | None = None,
) -> LoraDAState:
    """Initialise the PEFT adapter ``adapter_name`` in place with LoRA-DA's ``(A0, B0)`` (Eq. 17).

    Either ``dataloader`` (the statistics pass runs on the base weights ``W0``) or
    ``lora_da_state`` (from :func:`get_lora_da_state_dict` / :func:`load_lora_da_state`) is given.
    Every LoRA layer of the adapter receives factors (``strict``), written by
    :func:`~lora_da_ref.torch.adapter.apply_lora_da` (which checks ranks, shapes, finiteness and
    the base-weight fingerprints before writing anything).

    Returns:
        the :class:`LoraDAState` written (its ``layers`` is the per-layer report); save it next
        to the adapter with :func:`save_lora_da_state`.
    """
    if (dataloader is None) == (lora_da_state is None):
        raise ValueError("give exactly one of dataloader and lora_da_state")
    layers = lora_modules(peft_model, adapter_name)
    if lora_da_state is None:
        state = _state_for_peft_model(
            peft_model, dataloader, config, adapter_name, loss_fn, progress, data_description
        )
    else:
        if not isinstance(lora_da_state, LoraDAState):
            raise TypeError(
                f"lora_da_state must be a LoraDAState, got {type(lora_da_state).__name__}"
            )
        if config is not None:
            raise ValueError("config is fixed by lora_da_state; do not pass both")
        state = lora_da_state
        _warn_on_preset_scaling(
            state.provenance.get("preset"),
            {n: float(layer.scaling[adapter_name]) for n, layer in layers.items()},
            {n: int(layer.r[adapter_name]) for n, layer in layers.items()},
        )
    apply_lora_da(peft_model, state.factors, offset=offset, adapter_name=adapter_name)
    state.provenance["offset"] = offset
    return state


# ----------------------------------------------------------------------------- save / load


def save_lora_da_state(path: str | Path, state: LoraDAState) -> Path:
    """Write ``lora_da.json`` (provenance) and ``lora_da_factors.safetensors`` (A, B, λ) to ``path``.

    ``path`` may be the adapter directory written by ``save_pretrained`` (the files sit next to
    PEFT's). Tensors are stored exactly (float32), so :func:`load_lora_da_state` reproduces the
    adapter bitwise.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, f in state.factors.items():
        tensors |= {f"{name}.A": f.A, f"{name}.B": f.B, f"{name}.eigenvalues": f.eigenvalues}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path / STATE_FILE)
    write_provenance(path, state.provenance)
    return path


def load_lora_da_state(path: str | Path) -> LoraDAState:
    """Read what :func:`save_lora_da_state` wrote (diagnostics come back from the JSON)."""
    from safetensors.torch import load_file

    path = Path(path)
    files = [path / STATE_FILE, path / PROVENANCE_FILE]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"not a saved LoRA-DA state, missing: {', '.join(missing)}")
    tensors = load_file(path / STATE_FILE)
    provenance = json.loads((path / PROVENANCE_FILE).read_text())
    layers = provenance.get("layers", {})
    names = [k.removesuffix(".A") for k in tensors if k.endswith(".A")]
    order = {n: i for i, n in enumerate(layers)}
    names.sort(key=lambda n: order.get(n, len(order)))
    factors = {
        n: LoraFactors(
            A=tensors[f"{n}.A"],
            B=tensors[f"{n}.B"],
            eigenvalues=tensors[f"{n}.eigenvalues"],
            diagnostics=dict(layers.get(n, {})),
        )
        for n in names
    }
    return LoraDAState(factors, provenance)


def write_provenance(directory: str | Path, provenance: Mapping[str, Any]) -> Path:
    """Write ``provenance`` as ``directory/lora_da.json`` (the one writer, CLI and Python)."""
    out = Path(directory) / PROVENANCE_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(dict(provenance)), indent=2) + "\n")
    return out


def lora_da_provenance(
    config: LoraDAConfig,
    factors: Mapping[str, LoraFactors],
    *,
    preset: str | None,
    offset: str = "none",
    model: nn.Module | None = None,
    base_model: str | None = None,
    data: Mapping[str, Any] | None = None,
    peft: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The provenance record written as ``lora_da.json`` by the CLI and by the Python path."""
    settings = {k: v for k, v in asdict(config).items() if k != "dtype"}
    settings["dtype"] = str(config.dtype).removeprefix("torch.")
    name_or_path = (getattr(model, "name_or_path", None) or None) if model is not None else None
    info = None
    if model is not None:
        param = next(model.parameters(), None)
        info = {
            "class": type(model).__name__,
            "name_or_path": str(name_or_path) if name_or_path else None,
            "dtype": None if param is None else str(param.dtype).removeprefix("torch."),
        }
    return _jsonable(
        {
            "method": "LoRA-DA (Algorithm 1)",
            "preset": preset or "custom",
            "offset": offset,
            "base_model": base_model if base_model is not None else name_or_path,
            "model": info,
            "data": dict(data or {}),
            "config": settings,
            "peft": dict(peft or {}),
            "versions": _versions(),
            "layers": {name: f.diagnostics for name, f in factors.items()},
        }
    )


# ----------------------------------------------------------------------------- presets


def resolve_config(config: LoraDAConfig | str | None) -> tuple[LoraDAConfig, str | None]:
    """``(LoraDAConfig, preset name or None)`` from a config, a preset name, or None (the
    ``default`` preset, ``LoraDAConfig()``)."""
    if config is None:
        config = DEFAULT_PRESET
    if isinstance(config, str):
        return LoraDAConfig.preset(config), get_preset(config).name
    if not isinstance(config, LoraDAConfig):
        raise TypeError(
            f"config must be a LoraDAConfig, a preset name or None, got {type(config).__name__}"
        )
    return config, preset_of(config)


def _warn_on_preset_scaling(
    preset: str | None, scalings: Mapping[str, float], ranks: Mapping[str, int]
) -> None:
    if preset not in PRESETS:
        return
    p = PRESETS[preset]
    off = {
        n: (s, p.scaling(ranks[n]))
        for n, s in scalings.items()
        if not math.isclose(s, p.scaling(ranks[n]), rel_tol=1e-9)
    }
    if not off:
        return
    name, (got, want) = next(iter(off.items()))
    meant = (
        "lora_alpha = r (s = 1)"
        if p.lora_alpha is None
        else f"lora_alpha={p.lora_alpha:g}" + (", use_rslora=True" if p.use_rslora else "")
    )
    warn_user(
        f"LoRA-DA preset {preset!r} is meant to start at {meant}: s = {want:.4g} at r = "
        f"{ranks[name]}; this LoraConfig gives s = {got:.4g} on {len(off)} of {len(scalings)} "
        f"layer(s) (e.g. {name}), so the model starts at W0 + {got:.4g}·A0B0 instead of "
        f"W0 + {want:.4g}·A0B0. Set lora_alpha/use_rslora as the preset does, or ignore this "
        "if intended.",
        PresetScalingWarning,
    )


# ----------------------------------------------------------------------------- internals


def _is_peft(model: Any) -> bool:
    try:
        base_model_of(model)
    except TypeError:
        return False
    return True


def _state_for_peft_model(
    peft_model: Any,
    dataloader: Any,
    config: Any,
    adapter_name: str,
    loss_fn: LossFn | None,
    progress: bool,
    data_description: Any,
    *,
    peft_config: Any = None,
    store: Mapping[str, Any] | None = None,
) -> LoraDAState:
    layers = lora_modules(peft_model, adapter_name)
    peft_config = peft_config or peft_model.peft_config[adapter_name]
    _check_lora_config(peft_config)
    ranks = {n: int(layer.r[adapter_name]) for n, layer in layers.items()}
    scalings = {n: float(layer.scaling[adapter_name]) for n, layer in layers.items()}
    base = base_model_of(peft_model)
    bases = {n: layer.get_base_layer() for n, layer in layers.items()}
    for n, m in bases.items():
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{n}: LoRA-DA supports nn.Linear layers only, got {type(m).__name__}")
    with _base_layers_in_place(base, layers):
        return _compute_state(
            base, bases, ranks, scalings, dataloader, config, peft_config,
            loss_fn, progress, data_description, store,
        )  # fmt: skip


@contextmanager
def _base_layers_in_place(base: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """Replace each LoRA layer by its base layer (so the pass sees exactly W0); undo in finally."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, layer in layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name)
            setattr(parent, child, layer.get_base_layer())
            swapped.append((parent, child, layer))
        yield
    finally:
        for parent, child, layer in reversed(swapped):
            setattr(parent, child, layer)


def _compute_state(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    ranks: Mapping[str, int],
    scalings: Mapping[str, float],
    dataloader: Any,
    config: Any,
    peft_config: Any,
    loss_fn: LossFn | None,
    progress: bool,
    data_description: Any,
    store: Mapping[str, Any] | None = None,
) -> LoraDAState:
    config, preset = resolve_config(config)
    _warn_ignored_fields(config, peft_config)
    _check_finite_weights(targets)
    _warn_on_preset_scaling(preset, scalings, ranks)
    # checked here once (the provenance counts them); whether they may be empty (a shard of a
    # distributed run) is init_lora_da's decision, made by its strategy
    batches = materialise_batches(dataloader, allow_empty=True)
    resolved = config.replace(target_modules=tuple(targets), rank=max(ranks.values()))
    # one statistics pass for every rank of a rank_pattern: the statistics do not depend on r
    factors = init_lora_da(
        model, batches, resolved, loss_fn=loss_fn, progress=progress, ranks=ranks,
        **dict(store or {}),
    )  # fmt: skip
    for name, f in factors.items():
        f.diagnostics[FINGERPRINT_KEY] = weight_fingerprint(targets[name].weight)
        f.diagnostics["scaling"] = scalings[name]
        f.diagnostics["rank"] = ranks[name]
    data = _describe(batches, data_description)
    provenance = lora_da_provenance(
        resolved, factors, preset=preset, model=model, data=data, peft=_peft_info(peft_config)
    )
    return LoraDAState(factors, provenance)


def _check_lora_config(peft_config: Any) -> Any:
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}")
    if getattr(peft_config, "use_dora", False):
        raise ValueError("LoRA-DA does not support DoRA adapters (use_dora=False)")
    if getattr(peft_config, "target_parameters", None):
        raise ValueError("LoRA-DA does not support LoraConfig.target_parameters")
    if peft_config.target_modules is None:
        raise ValueError(
            "LoraConfig.target_modules is None: name the modules (a list of suffixes, a regex "
            "string or 'all-linear'); PEFT's per-architecture default is not resolved here"
        )
    return peft_config


def _peft_targets(model: nn.Module, peft_config: Any) -> dict[str, nn.Linear]:
    """Modules ``get_peft_model(model, peft_config)`` would wrap, by PEFT's own matcher."""
    from peft.tuners.tuners_utils import (
        _maybe_include_all_linear_layers,
        check_target_module_exists,
    )

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    resolved = _maybe_include_all_linear_layers(copy.deepcopy(peft_config), model)
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(resolved, name):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"LoraConfig.target_modules matches {name!r} of type {type(module).__name__}; "
                "LoRA-DA supports nn.Linear layers only"
            )
        found[name] = module
    if not found:
        raise ValueError(
            f"LoraConfig.target_modules={peft_config.target_modules!r} matches no module"
        )
    return found


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    from peft.utils.other import get_pattern_key

    if not pattern:
        return default
    return pattern.get(get_pattern_key(list(pattern), name), default)


def _scaling(peft_config: Any, name: str, rank: int) -> float:
    alpha = _pattern_value(peft_config.alpha_pattern, name, peft_config.lora_alpha)
    return alpha / math.sqrt(rank) if peft_config.use_rslora else alpha / rank


def _peft_info(peft_config: Any) -> dict[str, Any]:
    targets = peft_config.target_modules
    return {
        "r": peft_config.r,
        "lora_alpha": peft_config.lora_alpha,
        "use_rslora": peft_config.use_rslora,
        "target_modules": sorted(targets) if isinstance(targets, set) else targets,
        "rank_pattern": dict(peft_config.rank_pattern or {}),
        "alpha_pattern": dict(peft_config.alpha_pattern or {}),
    }


def _warn_ignored_fields(config: LoraDAConfig, peft_config: Any) -> None:
    default = LoraDAConfig()
    ignored = [
        f"{k}={getattr(config, k)!r}"
        for k in ("rank", "target_modules")
        if getattr(config, k) != getattr(default, k)
    ]
    if ignored and config.rank != peft_config.r:
        warn_user(
            f"LoraDAConfig {', '.join(ignored)} ignored: rank and target modules come from the "
            f"LoraConfig (r={peft_config.r}, target_modules={peft_config.target_modules!r})",
            UserWarning,
        )


def _check_finite_weights(targets: Mapping[str, nn.Linear]) -> None:
    for name, module in targets.items():
        if not torch.isfinite(module.weight).all():
            raise ValueError(f"{name}.weight has non-finite entries (NaN or inf)")


def _describe(batches: list[Any], description: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"batches": len(batches)}
    ids = [b["input_ids"] for b in batches if b.get("input_ids") is not None]
    if ids:
        data["sequences"] = sum(int(t.shape[0]) if t.ndim > 1 else 1 for t in ids)
    if isinstance(description, Mapping):
        data |= dict(description)
    elif description is not None:
        data["description"] = str(description)
    return data


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("lora_da_ref", "torch", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
