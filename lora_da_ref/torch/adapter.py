"""Write LoRA-DA factors into a PEFT LoRA model (the PEFT boundary of Algorithm 1, step 4).

Conventions: factors are in the paper's orientation, ``A`` (d_in, r) and ``B`` (r, d_out), so the
update is ``W0 + A B`` with ``W`` (d_in, d_out). PEFT stores ``lora_A.weight = Aᵀ`` (r, d_in) and
``lora_B.weight = Bᵀ`` (d_out, r) and adds ``s · lora_B(lora_A(x)) = s · x A B`` to the base
layer's output, where ``s = layer.scaling[adapter]`` is ``alpha/r`` (or ``alpha/√r`` with rsLoRA).
In torch orientation the effective weight is ``W0ᵀ + s (A B)ᵀ``.

Offsets:
    ``"none"``     W0 untouched; the model starts at ``W0 + s·A B`` (paper and official code).
    ``"subtract"`` the base weight becomes ``W0 − s·A B`` so the model's output is unchanged at
                   start (as PiSSA); the modified base weights must then be saved with the adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lora_da_ref.torch.config import LoraFactors
from lora_da_ref.torch.factors import UNSCALED_B0_KEY
from lora_da_ref.torch.warn import warn_user

__all__ = [
    "FINGERPRINT_KEY",
    "LiteralPresetWarning",
    "apply_lora_da",
    "base_model_of",
    "fingerprint_distance",
    "lora_modules",
    "weight_fingerprint",
]

Offset = Literal["none", "subtract"]
_PEFT_PREFIXES = ("base_model.model.", "base_model.", "model.")
# Diagnostics key of the base-weight fingerprint stored with the factors (see weight_fingerprint).
FINGERPRINT_KEY = "weight_fingerprint"
# Relative distance above which two fingerprints belong to different weights. The same weights in
# bfloat16 vs float32 differ by ≤ 2^-8 ≈ 4e-3 relative per entry; unrelated weights by O(1).
FINGERPRINT_RTOL = 2e-2
_FINGERPRINT_SAMPLES = 16
_SUBTRACTED = "_lora_da_subtracted"  # attribute set on a LoRA layer whose base weight was offset


class LiteralPresetWarning(UserWarning):
    """Factors whose B0 is unscaled (Algorithm 1 as printed, ``paper_literal``) written without
    an offset: the model starts at ``W0 + s·A0ᵀΔŴ``, far from W0 (SmolLM2: loss 24.5 vs 1.61)."""


@dataclass
class _Write:
    """One validated layer write: PEFT layer plus A, B already in the layer's dtype/device."""

    name: str
    layer: Any  # peft.tuners.lora.LoraLayer
    lora_A: torch.Tensor  # (r, d_in) = Aᵀ
    lora_B: torch.Tensor  # (d_out, r) = Bᵀ
    scaling: float
    adapter: str


def apply_lora_da(
    peft_model: Any,
    factors: Mapping[str, LoraFactors],
    *,
    offset: Offset = "none",
    adapter_name: str = "default",
    strict: bool = True,
) -> None:
    """Set a PEFT adapter to LoRA-DA's ``(A0, B0)`` (Eq. (17) and Algorithm 1, step 4).

    Writes ``lora_A.weight = A0ᵀ`` and ``lora_B.weight = B0ᵀ`` for every module in ``factors`` so
    the adapter adds ``s · x A0 B0``. With ``offset="subtract"`` also sets the base weight to
    ``W0 − s · A0 B0`` (torch: ``weight −= s (A0 B0)ᵀ``), leaving the model's function unchanged.

    Args:
        peft_model: a ``peft.PeftModel`` or ``peft.tuners.lora.LoraModel`` with a LoRA adapter.
        factors: module name (as in the base model, e.g. ``"model.layers.0.self_attn.q_proj"``;
            a PEFT prefix such as ``"base_model.model."`` is accepted) -> ``LoraFactors``.
        offset: ``"none"`` or ``"subtract"`` (see module docstring).
        adapter_name: the PEFT adapter to write.
        strict: also require that every LoRA layer of the adapter receives factors.

    Raises:
        ValueError: unknown offset, a module without a LoRA layer, rank/shape mismatch,
            non-float or non-finite factors, DoRA, or (strict) LoRA layers left without factors.
            Everything is validated before anything is written, so on error the model is unchanged.
        TypeError: ``peft_model`` is not a PEFT model.
    """
    if offset not in _OFFSETS:
        raise ValueError(f"offset must be one of {sorted(_OFFSETS)}, got {offset!r}")
    if not factors:
        raise ValueError("factors is empty: nothing to write")
    layers = lora_modules(peft_model, adapter_name)
    writes = [_validate(name, f, layers, adapter_name, offset) for name, f in factors.items()]
    _check_coverage(writes, layers, strict)
    if offset == "subtract":
        _check_untied(writes, base_model_of(peft_model))
    else:
        _warn_unscaled(factors)
    _write_all(writes, adapter_name, _OFFSETS[offset])


def _warn_unscaled(factors: Mapping[str, LoraFactors]) -> None:
    unscaled = [n for n, f in factors.items() if f.diagnostics.get(UNSCALED_B0_KEY)]
    if unscaled:
        warn_user(
            f"{len(unscaled)} of {len(factors)} layer(s) (e.g. {unscaled[0]!r}) carry an unscaled "
            "B0 = A0ᵀΔŴ (Algorithm 1 as printed, preset 'paper_literal'): with offset='none' the "
            "model starts at W0 + s·A0B0, far from W0. Not for training: use the default preset "
            "(σ-normalised ΔW, γ scaling), or offset='subtract' to start at W0.",
            LiteralPresetWarning,
        )


def lora_modules(peft_model: Any, adapter_name: str = "default") -> dict[str, Any]:
    """LoRA layers holding ``adapter_name``, keyed by their name in the *base* model."""
    from peft.tuners.lora import LoraLayer

    base = base_model_of(peft_model)
    found = {
        name: mod
        for name, mod in base.named_modules()
        if isinstance(mod, LoraLayer) and adapter_name in getattr(mod, "lora_A", {})
    }
    if not found:
        raise ValueError(f"the model has no LoRA layers with adapter {adapter_name!r}")
    return found


def weight_fingerprint(weight: torch.Tensor) -> list[float]:
    """A cheap fingerprint of a base weight, stored with its factors (``FINGERPRINT_KEY``).

    ``[numel, mean, rms, w[i_1], ..., w[i_16]]`` in float64, the samples at 16 evenly spaced
    flat positions. It tells apart two models of the same shapes (different weights differ by
    O(1) in the samples or the rms) while the same weights in another float dtype match within
    ``FINGERPRINT_RTOL``; it is not a cryptographic hash.
    """
    w = weight.detach().reshape(-1)
    n = w.numel()
    if n == 0:
        return [0.0]
    idx = torch.linspace(0, n - 1, min(_FINGERPRINT_SAMPLES, n), device=w.device).long()
    w64 = w.to(torch.float64)
    head = [float(n), float(w64.mean()), float(w64.square().mean().sqrt())]
    return head + [float(v) for v in w64[idx].cpu()]


def fingerprint_distance(a: Any, b: Any) -> float:
    """Relative distance ``‖a − b‖ / max(‖a‖, ‖b‖)`` of two fingerprints (inf if incomparable)."""
    try:
        ta = torch.tensor([float(v) for v in a], dtype=torch.float64)
        tb = torch.tensor([float(v) for v in b], dtype=torch.float64)
    except (TypeError, ValueError):
        return float("inf")
    if ta.shape != tb.shape or ta[0] != tb[0]:
        return float("inf")  # different number of entries: different shapes
    scale = max(float(ta[1:].norm()), float(tb[1:].norm()), torch.finfo(torch.float64).tiny)
    return float((ta[1:] - tb[1:]).norm()) / scale


def base_model_of(peft_model: Any) -> torch.nn.Module:
    """The model PEFT wrapped (with its LoRA layers injected); TypeError if not a PEFT model."""
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    if isinstance(peft_model, PeftModel):
        return peft_model.get_base_model()
    if isinstance(peft_model, LoraModel):
        return peft_model.model
    raise TypeError(
        f"expected a peft.PeftModel or LoraModel, got {type(peft_model).__name__}; "
        "wrap the model with peft.get_peft_model(model, LoraConfig(...)) first"
    )


def _resolve(name: str, layers: Mapping[str, Any]) -> str:
    candidates = [name] + [name[len(p) :] for p in _PEFT_PREFIXES if name.startswith(p)]
    for cand in candidates:
        if cand in layers:
            return cand
    sample = ", ".join(sorted(layers)[:3])
    raise ValueError(
        f"module {name!r} has no LoRA layer in the PEFT model (is it in target_modules?); "
        f"LoRA layers are e.g. {sample}"
    )


def _validate(
    name: str, f: LoraFactors, layers: Mapping[str, Any], adapter: str, offset: str
) -> _Write:
    key = _resolve(name, layers)
    layer = layers[key]
    _check_layer(key, layer, adapter, offset)
    _check_fingerprint(key, layer, f)
    A, B = f.A, f.B
    for sym, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ValueError(f"{key}: factor {sym} must be a 2-D tensor")
        if not t.is_floating_point():
            raise ValueError(f"{key}: factor {sym} must be floating point, got dtype {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{key}: factor {sym} has non-finite entries")
    r = layer.r[adapter]
    d_in, d_out = layer.in_features, layer.out_features
    if A.shape[1] != r or B.shape[0] != r:
        raise ValueError(
            f"{key}: rank mismatch: factors have rank {A.shape[1]} (A) / {B.shape[0]} (B), "
            f"PEFT adapter {adapter!r} has r={r}"
        )
    if A.shape[0] != d_in or B.shape[1] != d_out:
        raise ValueError(
            f"{key}: shape mismatch: expected A ({d_in}, {r}) and B ({r}, {d_out}), "
            f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
        )
    weight = layer.lora_A[adapter].weight
    lora_A = A.T.to(device=weight.device, dtype=weight.dtype).contiguous()  # (r, d_in)
    lora_B = B.T.to(device=weight.device, dtype=weight.dtype).contiguous()  # (d_out, r)
    return _Write(key, layer, lora_A, lora_B, float(layer.scaling[adapter]), adapter)


def _check_layer(key: str, layer: Any, adapter: str, offset: str) -> None:
    if not isinstance(layer.lora_A[adapter], torch.nn.Linear):
        raise ValueError(f"{key}: only LoRA on linear layers is supported")
    if adapter in getattr(layer, "lora_magnitude_vector", {}):
        raise ValueError(f"{key}: DoRA adapters are not supported (use_dora=False)")
    weight = layer.get_base_layer().weight
    if offset == "subtract" and not weight.is_floating_point():
        raise ValueError(
            f"{key}: offset='subtract' needs a floating-point base weight, "
            f"got {weight.dtype} (quantised?)"
        )
    if weight.is_floating_point() and not torch.isfinite(weight).all():
        raise ValueError(f"{key}.weight (the base weight) has non-finite entries (NaN or inf)")
    if offset == "subtract" and getattr(layer, _SUBTRACTED, None):
        raise ValueError(
            f"{key}: offset='subtract' was already applied to this layer (adapter "
            f"{sorted(getattr(layer, _SUBTRACTED))[0]!r}): its base weight is already W0 − s·A0B0, "
            "a second subtraction would move the model; wrap a fresh copy of the original model"
        )


def _check_fingerprint(key: str, layer: Any, f: LoraFactors) -> None:
    """Factors carrying a base-weight fingerprint must match this layer's base weight."""
    stored = (f.diagnostics or {}).get(FINGERPRINT_KEY)
    if stored is None:
        return
    current = weight_fingerprint(layer.get_base_layer().weight)
    dist = fingerprint_distance(stored, current)
    if not dist <= FINGERPRINT_RTOL:
        raise ValueError(
            f"{key}: these factors were computed for a different model: the base weight's "
            f"fingerprint differs (relative distance {dist:.3g} > {FINGERPRINT_RTOL:g}); "
            "recompute them on this model"
        )


def _check_untied(writes: list[_Write], base: torch.nn.Module) -> None:
    """offset='subtract' must not change a weight shared with another parameter (tied weights)."""

    def key(p: torch.Tensor) -> tuple[Any, ...]:  # same Parameter, or a view starting there
        return (p.device, p.data_ptr()) if p.device.type != "meta" else (id(p),)

    owners: dict[tuple[Any, ...], list[str]] = {}
    for pname, p in base.named_parameters(remove_duplicate=False):
        owners.setdefault(key(p), []).append(pname)
    for w in writes:
        names = owners.get(key(w.layer.get_base_layer().weight), [])
        if len(names) > 1:
            raise ValueError(
                f"{w.name}: offset='subtract' on a tied weight: its storage is shared by "
                f"{names}; subtracting s·A0B0 would also change the others. Untie the weights "
                "(e.g. config.tie_word_embeddings=False) or use offset='none'"
            )


def _check_coverage(writes: list[_Write], layers: Mapping[str, Any], strict: bool) -> None:
    names = [w.name for w in writes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"several factor names map to the same LoRA layer: {dupes}")
    missing = sorted(set(layers) - set(names))
    if strict and missing:
        raise ValueError(
            f"{len(missing)} LoRA layer(s) have no factors, e.g. {missing[:3]}; "
            "pass strict=False to leave them at PEFT's default init"
        )


def _write_all(writes: list[_Write], adapter: str, offset_fn: Any) -> None:
    """Write phase; if it fails (e.g. out of memory), undo the layers already written and re-raise.

    LoRA weights are restored exactly from copies (they are small); a subtracted offset is added
    back, which restores the base weight up to one rounding in its dtype (copying every base
    weight would cost a second copy of the targeted weights).
    """
    done: list[tuple[_Write, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        try:
            for w in writes:
                old_a = w.layer.lora_A[adapter].weight.detach().clone()
                old_b = w.layer.lora_B[adapter].weight.detach().clone()
                offset_fn(w, 1.0)
                done.append((w, old_a, old_b))
                w.layer.lora_A[adapter].weight.copy_(w.lora_A)
                w.layer.lora_B[adapter].weight.copy_(w.lora_B)
        except BaseException:
            for w, old_a, old_b in reversed(done):
                w.layer.lora_A[adapter].weight.copy_(old_a)
                w.layer.lora_B[adapter].weight.copy_(old_b)
                offset_fn(w, -1.0)
            raise


def _offset_none(w: _Write, sign: float) -> None:
    return None


def _offset_subtract(w: _Write, sign: float) -> None:
    """Base weight −= sign · s (A B)ᵀ, in the base weight's layout, in float32 or wider."""
    base = w.layer.get_base_layer().weight
    work = torch.promote_types(base.dtype, torch.float32)  # bf16 -> f32, f64 stays f64
    lora_B, lora_A = w.lora_B.to(work), w.lora_A.to(work)
    delta = w.scaling * (lora_B @ lora_A)  # (d_out, d_in) = s (A B)ᵀ
    if getattr(w.layer, "fan_in_fan_out", False):
        delta = delta.T  # Conv1D stores (d_in, d_out)
    base.copy_((base.to(work) - sign * delta.to(base.device)).to(base.dtype))
    marks = w.layer.__dict__.setdefault(_SUBTRACTED, set())
    if sign > 0:
        marks.add(w.adapter)
    else:
        marks.discard(w.adapter)


_OFFSETS = {"none": _offset_none, "subtract": _offset_subtract}
