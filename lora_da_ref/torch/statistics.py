"""K-FAC statistics of Algorithm 1 (step 1) in ONE forward/backward pass over the calibration set.

For every target ``nn.Linear`` (paper orientation: ``W`` (d_in, d_out), the layer computes
``o = Wᵀx``) the pass collects, with forward hooks on the modules and ``Tensor.register_hook`` on
their outputs:

* ``Z = (1/|P|) Σ_{t∈P} x_t x_tᵀ``            (d_in, d_in)  — input factor, **shared** by modules
  that read the same input tensor (q/k/v; gate/up), detected by tensor identity;
* ``Y = (1/|P|) Σ_{t∈P} s_t s_tᵀ``            (d_out, d_out) — output factor (``"full"``), or its
  diagonal ``(1/|P|) Σ_t s_t²`` (d_out,) (``"diagonal"``, the official code);
* ``G = Σ_b w_b ∇_W L_b / Σ_b w_b``           (d_in, d_out) — the gradient of the weighted mean of
  the batch losses: ``w_b = T_b`` (``gradient_weight="token"``, default) makes it the gradient of
  the **token-mean** loss over the whole calibration set, ``(1/Σ_b T_b) Σ_b Σ_{t loss token} ℓ_t``;
  ``w_b`` = the batch's number of sequences (``"sequence"``, the official ``estimate_gradient``)
  makes it the mean over sequences of batch-mean losses.

Definitions and normalisation:

* ``L_b = loss_fn(model, batch_b)`` is the batch's **mean** loss over its ``T_b`` loss tokens (HF's
  token-mean cross-entropy; loss tokens: ``labels[t + label_shift] != -100``, else the attention
  mask). The per-token score is ``s_t = T_b · ∂L_b/∂o_t`` = the gradient of the batch's summed
  token loss w.r.t. the layer output at position ``t`` (for sequence models, the usual K-FAC
  "expand" convention; for per-token models it is exactly ``∂ℓ_t/∂o_t``). With
  ``score_scale="batch"`` (official code) ``s_t = ∂L_b/∂o_t`` instead.
* ``P`` is the set of statistics positions (``config.token_mask``): the loss tokens, or every
  attention-mask position. ``G`` sums over **all** positions (``Σ_t x_t (∂L_b/∂o_t)ᵀ`` over every
  position is exactly ``∇_W L_b``, prompt tokens included), so ``G`` equals ``weight.grad.T`` of
  ``Σ_b w_b L_b / Σ_b w_b`` (tested).
* Each batch's products (``x xᵀ``, ``s sᵀ``, ``x gᵀ``) are computed in ``config.dtype`` (float32
  or float64) whatever the model dtype, and added into float64 running sums
  (:data:`RUNNING_SUM_DTYPE`): the statistics are float64.

The pass first accumulates **sums and counts** (:class:`KFACSums`), then :func:`finalize` divides.
A distributed run all-reduces (sums) every tensor and count of :class:`KFACSums` between the two.

Safety: only the target outputs require grad (every parameter is frozen during the pass); hooks,
``requires_grad`` and each module's train/eval flag are restored in ``finally``. The model runs in
eval mode (dropout off) while statistics are collected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lora_da_ref.torch.config import LoraDAConfig

__all__ = [
    "IGNORE_INDEX",
    "KFACStatistics",
    "KFACSums",
    "accumulate_statistics",
    "collect_statistics",
    "default_loss_fn",
    "finalize",
    "layer_passes",
    "model_guard",
    "token_masks",
]

IGNORE_INDEX = -100  # HF's label value for "no loss at this position"
# Sums across batches (and ranks) are float64 whatever the statistics dtype: no cross-batch
# rounding, and a sharded run adds the same per-batch products as a single process.
RUNNING_SUM_DTYPE = torch.float64
Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], Tensor]


def default_loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    """``model(**batch).loss`` — HF's token-mean cross-entropy."""
    loss = model(**batch).loss
    if loss is None:
        raise ValueError(
            "model(**batch).loss is None: the batches need 'labels' (or pass a loss_fn)"
        )
    return loss


@dataclass
class KFACSums:
    """Unnormalised sums of one statistics pass (see the module docstring).

    ``Z[g] = Σ_{t∈P} x xᵀ`` per input group ``g``; ``Y[m] = Σ_{t∈P} s sᵀ`` (or ``Σ s²``) and
    ``G[m] = Σ_b w_b ∇_W L_b`` per module ``m``; ``group_of[m]`` is m's input group; ``tokens`` =
    |P|, ``loss_tokens`` = Σ_b T_b, ``gradient_weight`` = Σ_b w_b. All are additive across shards.
    """

    Z: dict[str, Tensor] = field(default_factory=dict)
    Y: dict[str, Tensor] = field(default_factory=dict)
    G: dict[str, Tensor] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)
    tokens: int = 0
    loss_tokens: int = 0
    gradient_weight: float = 0.0
    sequences: int = 0
    batches: int = 0
    skipped_batches: int = 0


@dataclass
class KFACStatistics:
    """Normalised statistics: ``Z`` (d_in, d_in) per group, ``Y`` (d_out, d_out) or (d_out,) and
    ``G`` (d_in, d_out) per module, plus the counts they were normalised by."""

    Z: dict[str, Tensor]
    Y: dict[str, Tensor]
    G: dict[str, Tensor]
    group_of: dict[str, str]
    tokens: int
    loss_tokens: int
    sequences: int
    batches: int


def finalize(sums: KFACSums) -> KFACStatistics:
    """Divide the sums by their counts: Z, Y by |P|; G by Σ_b w_b. Checks counts and finiteness."""
    if sums.tokens == 0 or sums.loss_tokens == 0:
        raise ValueError("the calibration batches contain no unmasked tokens")
    Z = {k: v / sums.tokens for k, v in sums.Z.items()}
    Y = {k: v / sums.tokens for k, v in sums.Y.items()}
    G = {k: v / sums.gradient_weight for k, v in sums.G.items()}
    for kind, stats in (("Z", Z), ("Y", Y), ("G", G)):
        for name, value in stats.items():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"non-finite statistic {kind} for {name!r} (nan or inf)")
    counts = (sums.tokens, sums.loss_tokens, sums.sequences, sums.batches)
    return KFACStatistics(Z, Y, G, dict(sums.group_of), *counts)


def collect_statistics(
    model: nn.Module,
    batches: Sequence[Batch],
    targets: dict[str, nn.Linear],
    config: LoraDAConfig,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> KFACStatistics:
    """Algorithm 1, step 1: ``finalize(accumulate_statistics(...))``."""
    return finalize(
        accumulate_statistics(model, batches, targets, config, loss_fn=loss_fn, progress=progress)
    )


def accumulate_statistics(
    model: nn.Module,
    batches: Sequence[Batch],
    targets: dict[str, nn.Linear],
    config: LoraDAConfig,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> KFACSums:
    """Sums and counts for ``targets`` (name → module), one pass per group of ``layers_per_pass``
    transformer layers (one pass in total by default). The model is restored on exit."""
    passes = layer_passes(list(targets), config.layers_per_pass)
    loss_fn = default_loss_fn if loss_fn is None else loss_fn
    parts = []
    with model_guard(model):
        for i, names in enumerate(passes):
            collector = _Collector({n: targets[n] for n in names}, config)
            desc = "LoRA-DA statistics" + (
                f" (pass {i + 1}/{len(passes)})" if len(passes) > 1 else ""
            )
            parts.append(collector.run(model, batches, loss_fn, progress, desc))
    return merge_passes(parts)


def layer_passes(names: list[str], layers_per_pass: int | None) -> list[list[str]]:
    """Split module names into passes of ``layers_per_pass`` layers (``None``: one pass).

    A module's layer is its name up to the first all-digit component (``model.layers.3``);
    names without one are a layer of their own. Layers keep model order.
    """
    if layers_per_pass is None:
        return [list(names)]
    layers: dict[str, list[str]] = {}
    for name in names:
        layers.setdefault(_layer_key(name), []).append(name)
    keys = list(layers)
    chunks = [keys[i : i + layers_per_pass] for i in range(0, len(keys), layers_per_pass)]
    return [[n for key in chunk for n in layers[key]] for chunk in chunks]


def _layer_key(name: str) -> str:
    match = re.match(r"^(.*?(?:^|\.)\d+)(?:\.|$)", name)
    return match.group(1) if match else name


def merge_passes(parts: list[KFACSums]) -> KFACSums:
    """Join the sums of several layer-group passes over the same batches into one."""
    out = parts[0]
    for part in parts[1:]:
        if (part.tokens, part.loss_tokens) != (out.tokens, out.loss_tokens):
            raise RuntimeError("token counts differ between passes: the batches changed")
        out.Z |= part.Z
        out.Y |= part.Y
        out.G |= part.G
        out.group_of |= part.group_of
    return out


@contextmanager
def model_guard(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter and switch to eval mode; restore both exactly in ``finally``."""
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    try:
        for p in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode


def token_masks(batch: Batch, config: LoraDAConfig) -> tuple[Tensor, int]:
    """The statistics positions ``P`` (bool, (batch, seq)) and the loss-token count ``T_b``.

    Loss tokens: ``labels[t + label_shift] != -100`` when ``labels`` is present, else
    ``attention_mask``. ``P`` is the loss tokens (``token_mask="labels"``) or the attention
    positions (``"attention"``).
    """
    labels, attention = batch.get("labels"), batch.get("attention_mask")
    if labels is None and attention is None:
        raise ValueError("each batch needs 'labels' or 'attention_mask' to select tokens")
    attention = None if attention is None else attention.bool()
    loss_mask = attention if labels is None else _shifted_label_mask(labels, config.label_shift)
    positions = loss_mask
    if config.token_mask == "attention":
        positions = attention if attention is not None else torch.ones_like(loss_mask)
    return positions, int(loss_mask.sum())


def _shifted_label_mask(labels: Tensor, shift: int) -> Tensor:
    mask = torch.zeros_like(labels, dtype=torch.bool)  # (batch, seq)
    length = labels.shape[-1]
    if shift < length:
        mask[..., : length - shift] = labels[..., shift:] != IGNORE_INDEX
    return mask


class _Collector:
    """Hooks of one pass: forward hooks on the targets, tensor hooks on their outputs."""

    def __init__(self, targets: dict[str, nn.Linear], config: LoraDAConfig) -> None:
        self.targets, self.config = targets, config
        self.sums = KFACSums()
        self._batch: dict[str, Any] = {}

    def run(
        self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, progress: bool, desc: str
    ) -> KFACSums:
        handles = [
            m.register_forward_hook(partial(self._forward_hook, n)) for n, m in self.targets.items()
        ]
        device = _model_device(model)
        try:
            for i, batch in enumerate(tqdm(batches, desc=desc, disable=not progress)):
                self._step(model, _to_device(batch, device), loss_fn, i)
        finally:
            for handle in handles:
                handle.remove()
            self._batch.clear()
        return self.sums

    def _step(self, model: nn.Module, batch: Batch, loss_fn: LossFn, index: int) -> None:
        positions, loss_tokens = token_masks(batch, self.config)
        if loss_tokens == 0:
            self.sums.skipped_batches += 1  # its mean loss is 0/0; it carries no information
            return
        scale = float(loss_tokens) if self.config.score_scale == "token" else 1.0
        rows = positions.shape[0] if positions.ndim > 1 else 1
        weight = float(loss_tokens) if self.config.gradient_weight == "token" else float(rows)
        self._batch = {
            "P": positions,
            "w": weight,
            "all": bool(positions.all()),  # every position counts: skip the gather
            "scale": scale,
            "x": {},
            "inputs": [],
            "called": set(),
        }
        with torch.enable_grad():
            loss = loss_fn(model, batch)
            _check_loss(loss, index)
            loss.backward()
        self._end_batch(positions, loss_tokens, weight)

    def _end_batch(self, positions: Tensor, loss_tokens: int, weight: float) -> None:
        missing = set(self.targets) - self._batch["called"]
        if missing:
            raise ValueError(f"target modules not called by the forward pass: {sorted(missing)}")
        self.sums.tokens += int(positions.sum())
        self.sums.loss_tokens += loss_tokens
        self.sums.gradient_weight += weight
        self.sums.sequences += positions.shape[0] if positions.ndim > 1 else 1
        self.sums.batches += 1
        # Empty the dict in place: the output-tensor hooks still reference it, and the activations
        # it holds would otherwise keep a hook → activation → graph → output cycle alive, which
        # Python's GC cannot collect (it runs through C++ autograd nodes): a leak per batch.
        self._batch.clear()

    def _forward_hook(
        self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Tensor
    ) -> None:
        b = self._batch
        if not b:
            return  # a forward outside our steps (e.g. generation inside loss_fn is not ours)
        if name in b["called"]:
            raise ValueError(
                f"target module {name!r} is called more than once per forward; unsupported"
            )
        b["called"].add(name)
        x = inputs[0]  # (..., d_in)
        if tuple(x.shape[:-1]) != tuple(b["P"].shape):
            raise ValueError(
                f"{name}: input positions {tuple(x.shape[:-1])} do not match the token mask {tuple(b['P'].shape)}"
            )
        group = self._group(name, x)
        if group == name:
            xP = x.detach().to(self.config.dtype)  # (..., d_in)
            xP = xP.reshape(-1, xP.shape[-1]) if b["all"] else xP[b["P"]]  # (|P_b|, d_in)
            _addmm(self.sums.Z, name, xP.mT, xP, 1.0)  # += Σ x xᵀ
            b["x"][group] = (x, x._version)
        if not output.requires_grad:
            output.requires_grad_(True)  # a leaf: gradients flow to it, not into frozen weights
        output.register_hook(partial(self._grad_hook, name, group, b))

    def _group(self, name: str, x: Tensor) -> str:
        """The first module of this forward that read the very same input tensor."""
        group = next((g for t, g in self._batch["inputs"] if t is x), name)
        if group == name:
            self._batch["inputs"].append((x, name))
        known = self.sums.group_of.setdefault(name, group)
        if known != group:
            raise RuntimeError(
                f"{name}: input sharing changed between batches ({known} vs {group})"
            )
        return group

    def _grad_hook(self, name: str, group: str, b: dict[str, Any], g: Tensor) -> None:
        dtype = self.config.dtype
        x, version = b["x"][group]
        if x._version != version:
            raise RuntimeError(f"the input of {name!r} was modified in place before backward")
        g = g.detach().to(dtype)  # (..., d_out) = ∂L_b/∂o
        x = x.detach().to(dtype)  # (..., d_in)
        g_all, x_all = (
            g.reshape(-1, g.shape[-1]),
            x.reshape(-1, x.shape[-1]),
        )  # (n, d_out), (n, d_in)
        _addmm(self.sums.G, name, x_all.mT, g_all, b["w"])  # += w_b ∇_W L_b, (d_in, d_out)
        gP = g_all if b["all"] else g[b["P"]]  # (|P_b|, d_out); scores s = scale · g
        _OUTPUT_FACTORS[self.config.output_factor](self.sums.Y, name, gP, b["scale"] ** 2)


def _full_output_factor(store: dict[str, Tensor], key: str, g: Tensor, alpha: float) -> None:
    _addmm(store, key, g.mT, g, alpha)  # += Σ s sᵀ, (d_out, d_out)


def _diagonal_output_factor(store: dict[str, Tensor], key: str, g: Tensor, alpha: float) -> None:
    _add(store, key, (g * g).sum(0), alpha)  # += Σ s², (d_out,)


_OUTPUT_FACTORS = {"full": _full_output_factor, "diagonal": _diagonal_output_factor}


def _addmm(store: dict[str, Tensor], key: str, a: Tensor, b: Tensor, alpha: float) -> None:
    """``store[key] += alpha · a @ b``: the batch's product in the statistics dtype (one BLAS
    call), added into a :data:`RUNNING_SUM_DTYPE` running sum (allocated on first use)."""
    _add(store, key, a @ b, alpha)


def _add(store: dict[str, Tensor], key: str, value: Tensor, alpha: float = 1.0) -> None:
    if key not in store:
        store[key] = torch.zeros(value.shape, dtype=RUNNING_SUM_DTYPE, device=value.device)
    store[key].add_(value, alpha=alpha)


def _check_loss(loss: object, index: int) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__} on batch {index}"
        )
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(f"non-finite loss ({float(loss.detach()):.4g}) on batch {index}")
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not depend on any target module's output (loss.requires_grad is False)"
        )


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("the model has no parameters")
    return param.device


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if not isinstance(batch, dict):
        raise TypeError(f"each batch must be a dict of tensors, got {type(batch).__name__}")
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
