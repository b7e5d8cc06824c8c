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
  (:data:`RUNNING_SUM_DTYPE`): the statistics are float64. The rows of a massive activation
  (``‖x_t‖²`` above :data:`HEAVY_ROW_RATIO` times the batch's median) enter ``x xᵀ`` and ``x gᵀ``
  in float64: they would otherwise set the rounding of every entry. Their part of diag Z is kept
  apart (``heavy_diag``), so that the precision bound models the rounding of the rows that were
  rounded, not of the ones that were not.
* **The rounding of those products is measured** (``config.records_rounding``: a dtype below
  float64, the ``"full"`` diagnostics tier): beside each product the pass sums its float64 value
  sketched by a fixed ``Ω`` (d, k) of random signs (:func:`rounding_probe`), ``Σ_b x_bᵀ(x_b Ω)`` in
  float64, and :func:`finalize` compares it with the finished statistic: ``‖(Ẑ − Z)Ω‖_F/√k``
  estimates ``‖Ẑ − Z‖_F`` (unbiased in square, ``E‖MΩ‖²_F = k‖M‖²_F``), the rounding the
  statistic carries (``KFACStatistics.rounding``; a diagonal Y is compared entry by entry). Cost
  per batch: ``O(T·d·k)`` flops in float64 against the products' ``O(T·d²)``.

The pass first accumulates **sums and counts** (:class:`KFACSums`), then :func:`finalize` divides.
A distributed run all-reduces (sums) every tensor and count of :class:`KFACSums` between the two.

Safety: only the target outputs require grad (every parameter is frozen during the pass); hooks,
``requires_grad`` and each module's train/eval flag are restored in ``finally``. The model runs in
eval mode (dropout off) while statistics are collected.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lora_da_ref.torch.blas import mirror_lower_
from lora_da_ref.torch.config import LoraDAConfig, StatisticsConfig, statistics_config_of
from lora_da_ref.torch.progress import RunProgress

__all__ = [
    "IGNORE_INDEX",
    "CalibrationBatches",
    "KFACStatistics",
    "KFACSums",
    "accumulate_statistics",
    "default_loss_fn",
    "finalize",
    "materialise_batches",
    "model_guard",
    "prepare_batch",
    "token_masks",
]

IGNORE_INDEX = -100  # HF's label value for "no loss at this position"
# Sums across batches (and ranks) are float64 whatever the statistics dtype: no cross-batch
# rounding, and a sharded run adds the same per-batch products as a single process.
RUNNING_SUM_DTYPE = torch.float64
Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], Tensor]
# Positions whose input ‖x_t‖² exceeds this many times the batch's median are multiplied in
# float64 (Z's and G's products; ``None``: every product in the statistics dtype). A float32
# product's rounding grows with Σ_t ‖x_t‖², so a few massive activations carry most of it: on
# SmolLM2 the first position's input to layer 11's down_proj has 2.8e5× the median ‖x_t‖² and
# 99.9 % of tr(Z). Their products cost O(k·d²) in float64 for k such rows (one per sequence
# there) and finding them O(n·d), against the batch's O(n·d²). Measured (docs/numerics.md,
# "Heavy rows"): that layer's float32-vs-float64 angle of A0 goes from 8.1e-4 to 9.5e-8 rad, the
# other six projections of the layer are unchanged bit for bit.
HEAVY_ROW_RATIO: float | None = 100.0


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
    ``G[m] + G_odd[m] = Σ_b w_b ∇_W L_b`` per module ``m``; ``group_of[m]`` is m's input group;
    ``tokens`` = |P|, ``loss_tokens`` = Σ_b T_b, ``gradient_weight`` = Σ_b w_b. With
    ``config.split_halves`` (any diagnostics tier but "off") the gradient sums of the even- and of
    the odd-numbered sequences of the stream (0, 1, 2, ... in the order seen; no extra flops, the
    two halves partition the rows) are kept apart, ``G[m]`` (d_in, d_out) the even ones and
    ``G_odd[m]`` (d_in, d_out) the odd ones, and ``split_weight`` is the odd half's share of
    ``gradient_weight``; :func:`finalize` adds the halves. Without split sums ``G_odd`` is empty
    and ``G`` holds every sequence. ``rounding[f"{kind}/{key}"]`` (``kind`` Z, Y or G), when the
    pass measures its rounding: the float64 product summed beside ``kind``'s, sketched by
    :func:`rounding_probe` (``(d, k)``; a diagonal Y's own float64 sum, ``(d_out,)``). ``Z`` and
    a full ``Y`` are summed on and below the diagonal only (above it: the diagonal panels' values,
    else zeros): :func:`finalize` mirrors the lower triangle up (:func:`mirror_lower_`).
    ``heavy_diag[g]`` (d_in,), for products below float64 (:func:`records_heavy_rows`): the part
    of diag ``Z[g]`` from the rows multiplied in float64 (:data:`HEAVY_ROW_RATIO`). All are
    additive across shards.
    """

    Z: dict[str, Tensor] = field(default_factory=dict)
    Y: dict[str, Tensor] = field(default_factory=dict)
    G: dict[str, Tensor] = field(default_factory=dict)
    G_odd: dict[str, Tensor] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)
    tokens: int = 0
    loss_tokens: int = 0
    gradient_weight: float = 0.0
    split_weight: float = 0.0
    sequences: int = 0
    batches: int = 0
    skipped_batches: int = 0
    rounding: dict[str, Tensor] = field(default_factory=dict)
    dtype: str = "float32"  # of the per-batch products (the running sums are float64)
    heavy_diag: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class KFACStatistics:
    """Normalised statistics: ``Z`` (d_in, d_in) per group, ``Y`` (d_out, d_out) or (d_out,) and
    ``G`` (d_in, d_out) per module, plus the counts they were normalised by.

    ``G_split[m]`` is the mean gradient of the odd-numbered sequences alone (same weighting as
    ``G``), ``split_weights`` the gradient weights (even, odd) of the two halves; empty when the
    diagnostics are off or one half has no loss token. :meth:`halves` gives both half means.
    ``rounding[f"{kind}/{key}"]``: the Frobenius norm of the rounding that statistic carries
    (``kind`` Z, Y or G, estimated by the pass's sketch; see the module docstring); empty when
    the pass did not measure it. ``heavy_diag[g]``: the part of ``diag Z[g]`` that was summed in
    float64 (the heavy rows, :data:`HEAVY_ROW_RATIO`), normalised as Z; empty for float64
    statistics and for statistics saved before the pass kept it.
    """

    Z: dict[str, Tensor]
    Y: dict[str, Tensor]
    G: dict[str, Tensor]
    group_of: dict[str, str]
    tokens: int
    loss_tokens: int
    sequences: int
    batches: int
    G_split: dict[str, Tensor] = field(default_factory=dict)
    split_weights: tuple[float, float] = (0.0, 0.0)
    gradient_weight: float = 0.0
    rounding: dict[str, float] = field(default_factory=dict)
    dtype: str = "float32"  # of the per-batch products: the rounding the statistics carry
    heavy_diag: dict[str, Tensor] = field(default_factory=dict)

    def halves(self, name: str) -> tuple[Tensor, Tensor] | None:
        """(G of the even sequences, G of the odd sequences) of module ``name``, or ``None``."""
        if name not in self.G_split:
            return None
        w_even, w_odd = self.split_weights
        odd = self.G_split[name]
        even = (self.G[name] * (w_even + w_odd) - odd * w_odd) / w_even
        return even, odd


def finalize(sums: KFACSums) -> KFACStatistics:
    """Divide the sums by their counts: Z, Y by |P|; G by Σ_b w_b. Checks counts and finiteness.

    **Consumes** ``sums``: the division is in place (the statistics reuse the sums' memory, so a
    pass never holds two copies; :mod:`lora_da_ref.torch.memory`); finalizing twice raises.
    """
    if getattr(sums, "_finalized", False):
        raise RuntimeError("these KFACSums were already finalized (finalize divides in place)")
    if sums.batches + sums.skipped_batches == 0:  # every shard of a distributed run was empty
        raise ValueError(EMPTY_BATCHES)
    if sums.tokens == 0 or sums.loss_tokens == 0:
        raise ValueError("the calibration batches contain no unmasked tokens")
    sums._finalized = True  # type: ignore[attr-defined]
    # Z and a full Y are summed on and below the diagonal only (_add_gram): mirrored here
    Z = {k: mirror_lower_(v).div_(sums.tokens) for k, v in sums.Z.items()}
    Y = {k: (mirror_lower_(v) if v.ndim == 2 else v).div_(sums.tokens) for k, v in sums.Y.items()}
    w_odd = sums.split_weight
    G = {}
    for k, v in sums.G.items():  # G = (even + odd)/W, written into the even half's sum
        odd = sums.G_odd.get(k)
        G[k] = (v if odd is None else v.add_(odd)).div_(sums.gradient_weight)
    for kind, stats in (("Z", Z), ("Y", Y), ("G", G)):
        for name, value in stats.items():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"non-finite statistic {kind} for {name!r} (nan or inf)")
    counts = (sums.tokens, sums.loss_tokens, sums.sequences, sums.batches)
    w_even = sums.gradient_weight - w_odd
    split: dict[str, Tensor] = {}
    if w_odd > 0 and w_even > 0:  # both halves carry a gradient
        split = {k: v.div_(w_odd) for k, v in sums.G_odd.items()}  # in place
    weights = (w_even, w_odd) if split else (0.0, 0.0)
    rounding = _measured_rounding(sums, {"Z": Z, "Y": Y, "G": G})
    heavy = {k: v.div_(sums.tokens) for k, v in sums.heavy_diag.items()}
    return KFACStatistics(
        Z, Y, G, dict(sums.group_of), *counts, split, weights, sums.gradient_weight, rounding,
        sums.dtype, heavy,
    )  # fmt: skip


ROUNDING_PROBES = 8  # k, the columns of the sketch that measures the rounding of the products


@functools.lru_cache(maxsize=64)
def rounding_probe(d: int, device: torch.device) -> Tensor:
    """``Ω`` (d, k) float64 of random signs (±1), the same for every pass and rank (seeded by
    ``d``): the sketch by which the pass measures the rounding of its products. Read only.

    Signs rather than Gaussians: the rounding of a Gram concentrates on the rows of a few large
    channels (stable rank 1–3 on SmolLM2), and for ``M ≈ σvvᵀ`` with ``v`` on few coordinates
    ``‖Mω‖²`` varies little over signs (variance ``2σ⁴(1 − Σv_i⁴)``) but as ``σ⁴χ²₁`` over a
    Gaussian ω. Measured on SmolLM2's float32 statistics (5 draws of Ω): the estimate of
    ``‖δZ‖_F`` is 0.77–1.29 of the real one with k = 8 signs, 0.43–1.62 with 8 Gaussians."""
    gen = torch.Generator(device="cpu").manual_seed(0x524F554E + d)
    signs = torch.randint(0, 2, (d, ROUNDING_PROBES), generator=gen).to(RUNNING_SUM_DTYPE)
    return (2 * signs - 1).to(device)


def _measured_rounding(sums: KFACSums, stats: dict[str, dict[str, Tensor]]) -> dict[str, float]:
    """``{f"{kind}/{key}": ‖M̂ − M‖_F}`` of each finished (normalised) statistic ``M̂`` against the
    float64 product the pass summed beside it: exact for a diagonal Y, else from the sketch,
    ``‖M̂Ω − MΩ‖_F/√k``."""
    out = {}
    for key, reference in sums.rounding.items():
        kind, name = key.split("/", 1)
        value = stats[kind][name]  # normalised, in place, by finalize
        count = sums.gradient_weight if kind == "G" else sums.tokens
        if value.ndim == 1:  # a diagonal Y: the float64 sum itself
            out[key] = float(torch.linalg.vector_norm(value - reference / count))
        else:
            error = value @ rounding_probe(value.shape[1], value.device) - reference / count
            out[key] = float(torch.linalg.vector_norm(error)) / math.sqrt(ROUNDING_PROBES)
    return out


def accumulate_statistics(
    model: nn.Module,
    batches: Iterable[Batch],
    targets: dict[str, nn.Linear],
    config: StatisticsConfig | LoraDAConfig,
    *,
    loss_fn: LossFn | None = None,
    progress: bool | RunProgress = True,
) -> KFACSums:
    """Sums and counts for ``targets`` (name → module) in one pass over ``batches``; the model is
    restored on exit. Which targets share a pass is the pipeline's plan
    (:func:`lora_da_ref.torch.memory.resolve_layers_per_pass`), not this function's.
    ``batches`` may be empty (a shard of a distributed run); they are checked once
    (:func:`materialise_batches`), not again when the pipeline hands on checked ones."""
    config = statistics_config_of(config)
    batches = materialise_batches(batches, allow_empty=True)
    loss_fn = default_loss_fn if loss_fn is None else loss_fn
    bar = RunProgress.of(progress, len(batches))
    try:
        with model_guard(model):
            return _Collector(targets, config).run(model, batches, loss_fn, bar)
    finally:
        if bar is not progress:
            bar.close()


def merge_passes(parts: list[KFACSums]) -> KFACSums:
    """Join the sums of several layer-group passes over the same batches into one."""
    out = parts[0]
    for part in parts[1:]:
        if (part.tokens, part.loss_tokens) != (out.tokens, out.loss_tokens):
            raise RuntimeError("token counts differ between passes: the batches changed")
        out.Z |= part.Z
        out.Y |= part.Y
        out.G |= part.G
        out.G_odd |= part.G_odd
        out.rounding |= part.rounding
        out.heavy_diag |= part.heavy_diag
        out.group_of |= part.group_of
    return out


@contextmanager
def model_guard(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter and switch to eval mode; restore both exactly in ``finally``.

    Gradient checkpointing is honoured: a module with ``gradient_checkpointing=True`` (Hugging
    Face's checkpointed layers, which checkpoint only ``if self.gradient_checkpointing and
    self.training``) keeps its own ``training`` flag on, while every other module (dropout,
    attention dropout) is in eval mode.
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    try:
        for p in flags:
            p.requires_grad_(False)
        model.eval()
        for m in modes:
            if getattr(m, "gradient_checkpointing", False) is True:
                m.training = True  # this module's flag only: its children stay in eval mode
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode


def token_masks(batch: Batch, config: StatisticsConfig) -> tuple[Tensor, int]:
    """The statistics positions ``P`` (bool, (batch, seq)) and the loss-token count ``T_b``.

    Loss tokens: ``labels[t + label_shift] != -100`` **and** ``attention_mask[t]`` when both are
    present (a padded position never counts: with left padding the pad before BOS would
    otherwise "predict" BOS), else whichever of the two is present. ``P`` is the loss tokens
    (``token_mask="labels"``) or the attention positions (``"attention"``). The batch given to
    ``loss_fn`` has the same labels masked (:func:`prepare_batch`), so the loss and the mask agree.
    """
    positions, loss_mask = _masks(batch, config)
    return positions, int(loss_mask.sum())


def _masks(batch: Batch, config: StatisticsConfig) -> tuple[Tensor, Tensor]:
    """(statistics positions P, loss tokens), both bool (batch, seq); see :func:`token_masks`."""
    labels, attention = batch.get("labels"), batch.get("attention_mask")  # one is there (checked)
    attention = None if attention is None else attention.bool()
    loss_mask = attention if labels is None else _shifted_label_mask(labels, config.label_shift)
    if labels is not None and attention is not None:
        loss_mask = loss_mask & attention  # a pad position never counts (left padding: pad → BOS)
    positions = loss_mask
    if config.token_mask == "attention":
        positions = attention if attention is not None else torch.ones_like(loss_mask)
    return positions, loss_mask


def prepare_batch(
    batch: Mapping[str, Any],
    device: torch.device,
    config: StatisticsConfig,
    model: nn.Module | None = None,
) -> Batch:
    """One calibration batch as the pass uses it: a plain ``dict`` (from any ``Mapping``, e.g.
    ``transformers.BatchEncoding``), its tensors on ``device``, and ``labels[t + label_shift]``
    set to -100 where ``attention_mask[t] == 0`` (the loss then skips exactly the positions
    :func:`token_masks` skips: left padding gives the same loss as right padding).

    A left-padded batch without ``position_ids``, for a ``model`` whose ``forward`` takes
    ``position_ids`` (Hugging Face causal LMs), gets ``position_ids = cumsum(attention_mask) − 1``
    (0 on the pads), as ``generate`` does: every token keeps the position it has without padding.
    Otherwise the model numbers the pads too, and RoPE sees every position shifted: the same
    function in exact arithmetic (RoPE is relative), but float32 rounding then differs with the
    padding side (measured on SmolLM2: 1.5e-6 relative in Y, 1.7e-6 in G).

    ``batch`` is one of the batches :func:`materialise_batches` checked: nothing is checked here,
    per batch and per pass."""
    out = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in dict(batch).items()}
    labels, attention = out.get("labels"), out.get("attention_mask")
    if labels is not None and attention is not None and labels.shape == attention.shape:
        shift, length = config.label_shift, labels.shape[-1]
        if shift < length:
            unattended = torch.zeros_like(labels, dtype=torch.bool)
            unattended[..., shift:] = attention[..., : length - shift] == 0
            out["labels"] = labels.masked_fill(unattended, IGNORE_INDEX)  # a new tensor
    if (
        model is not None
        and "position_ids" not in out
        and attention is not None
        and attention.ndim == 2
        and bool((attention[:, 0] == 0).any())  # some row starts with a pad: left padding
        and _takes_position_ids(model)
    ):
        out["position_ids"] = (attention.long().cumsum(-1) - 1).clamp(min=0)
    return out


def _takes_position_ids(model: nn.Module) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class CalibrationBatches(list):
    """The calibration batches after :func:`materialise_batches`: a list, read once and checked,
    so that an entry point handing them on (the pipeline to the statistics pass) is not checked
    again."""


EMPTY_BATCHES = "batches is empty: the initialisation needs calibration data"
# The batch keys whose values must be tensors: the pass reads them itself.
TENSOR_KEYS = ("input_ids", "attention_mask", "labels")


def materialise_batches(
    batches: Iterable[Batch], *, allow_empty: bool = False
) -> CalibrationBatches:
    """``batches`` read once into a list and checked: THE check of the calibration data, called
    once by every public entry point (the per-batch code only moves tensors to the device), so
    each kind of bad input gets one message wherever it is passed.

    ``batches``: any iterable (a list, a generator, a ``DataLoader``; a shuffling DataLoader
    would give other batches on the next pass) of ``Mapping`` batches (a dict, a transformers
    ``BatchEncoding``) whose ``input_ids``, ``attention_mask`` and ``labels``, where present,
    are tensors, with ``labels`` or ``attention_mask`` (they select the tokens).
    ``allow_empty``: a shard of a distributed run may be empty (the union may not: ``finalize``
    counts it). Already checked batches (:class:`CalibrationBatches`) are returned as they are.
    """
    if not isinstance(batches, CalibrationBatches):
        if isinstance(batches, Mapping | Tensor | str):
            raise TypeError(
                f"batches must be an iterable of batches (a list, a DataLoader), not a single "
                f"{type(batches).__name__}: wrap one batch in a list"
            )
        if not isinstance(batches, Iterable):
            raise TypeError(
                f"batches must be an iterable of batches (a list, a DataLoader), "
                f"got {type(batches).__name__}"
            )
        batches = CalibrationBatches(batches)
        for index, batch in enumerate(batches):
            _check_batch(batch, index)
    if not batches and not allow_empty:
        raise ValueError(EMPTY_BATCHES)
    return batches


def _check_batch(batch: object, index: int) -> None:
    if not isinstance(batch, Mapping):
        hint = (
            " (a single batch passed as `batches`? wrap it in a list)"
            if isinstance(batch, str)
            else ""
        )
        raise TypeError(
            f"batch {index} is a {type(batch).__name__}: each batch must be a Mapping of tensors "
            f"(a dict or a transformers BatchEncoding){hint}"
        )
    for key in TENSOR_KEYS:
        value = batch.get(key)
        if value is not None and not (isinstance(value, Tensor) and value.ndim >= 1):
            kind = "0-d tensor" if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(
                f"batch {index}: {key!r} is a {kind}, not a tensor with a batch or sequence "
                "dimension (tokenize with return_tensors='pt', or collate with a DataCollator)"
            )
    if batch.get("labels") is None and batch.get("attention_mask") is None:
        raise ValueError(
            f"batch {index} has neither 'labels' nor 'attention_mask': each batch needs one to "
            "select its tokens"
        )


def _shifted_label_mask(labels: Tensor, shift: int) -> Tensor:
    mask = torch.zeros_like(labels, dtype=torch.bool)  # (batch, seq)
    length = labels.shape[-1]
    if shift < length:
        mask[..., : length - shift] = labels[..., shift:] != IGNORE_INDEX
    return mask


@dataclass(eq=False)
class _BatchState:
    """What the hooks of one batch share: its positions and scales, set before the forward, and
    what the forward leaves for the backward (inputs, input groups, which targets ran)."""

    positions: Tensor  # P, bool (batch, seq)
    every_position: bool  # P holds every position: no gather
    rows: int
    y_scale: float | Tensor  # the scores s = y_scale · ∂L_b/∂o
    g_scale: float | Tensor  # G's gradients, w_b-weighted
    exact_scales: tuple[float | Tensor, float | Tensor] | None  # (y, g) in float64, to measure
    halves: list[tuple[int, slice | None]] | None  # (half, rows) with split sums, else None
    inputs: dict[str, tuple[Tensor, int]] = field(default_factory=dict)  # group → (x, version)
    readers: list[tuple[Tensor, str]] = field(default_factory=list)  # (input tensor, 1st reader)
    group: dict[str, str] = field(default_factory=dict)  # target → its input group
    called: set[str] = field(default_factory=set)  # targets the forward ran
    graded: set[str] = field(default_factory=set)  # targets whose gradient arrived
    backward: bool = False  # forwards from now on are checkpoint recomputes
    active: bool = True

    def close(self) -> None:
        """Drop the activations: the output-tensor hooks still reference this state, and the
        activations it holds would otherwise keep a hook → activation → graph → output cycle
        alive, which Python's GC cannot collect (it runs through C++ autograd nodes)."""
        self.active = False
        self.inputs.clear()
        self.readers.clear()


class _Collector:
    """Hooks of one pass: forward hooks on the targets, tensor hooks on their outputs."""

    def __init__(self, targets: dict[str, nn.Linear], config: StatisticsConfig) -> None:
        self.targets, self.config = targets, config
        self.sums = KFACSums(dtype=str(config.dtype).removeprefix("torch."))
        self._batch: _BatchState | None = None

    def run(
        self, model: nn.Module, batches: list[Batch], loss_fn: LossFn, progress: RunProgress
    ) -> KFACSums:
        handles = [
            m.register_forward_hook(partial(self._forward_hook, n)) for n, m in self.targets.items()
        ]
        device = _model_device(model)
        try:
            for i, batch in enumerate(batches):
                self._step(model, prepare_batch(batch, device, self.config, model), loss_fn, i)
                progress.step()
        finally:
            for handle in handles:
                handle.remove()
            if self._batch is not None:
                self._batch.close()
                self._batch = None
        return self.sums

    def _step(self, model: nn.Module, batch: Batch, loss_fn: LossFn, index: int) -> None:
        cfg = self.config
        positions, loss_mask = _masks(batch, cfg)
        rows = positions.shape[0] if positions.ndim > 1 else 1
        row_tokens = loss_mask.reshape(rows, -1).sum(1)  # (rows,) T_i, loss tokens per sequence
        loss_tokens = int(row_tokens.sum())  # T_b
        if loss_tokens == 0:
            self.sums.skipped_batches += 1  # its mean loss is 0/0; it carries no information
            return

        # "batch"/"sequence" (official): per-sequence mean-loss gradients ∂L_i/∂o = T_b/T_i ∂L_b/∂o,
        # so the statistics do not depend on how sequences are grouped into batches.
        def scales(dtype: torch.dtype) -> tuple[float | Tensor, float | Tensor]:  # (y, g)
            per_sequence = _per_sequence_scale(row_tokens, loss_tokens, dtype)
            return (
                float(loss_tokens) if cfg.score_scale == "token" else per_sequence,
                float(loss_tokens) if cfg.gradient_weight == "token" else per_sequence,
            )

        y_scale, g_scale = scales(cfg.dtype)
        valid = row_tokens > 0
        row_weight = row_tokens if cfg.gradient_weight == "token" else valid  # (rows,)
        start = self.sums.sequences  # stream index of this batch's first row
        odd = (torch.arange(rows, device=row_tokens.device) + start) % 2 == 1
        self._batch = b = _BatchState(
            positions=positions,
            every_position=bool(positions.all()),
            rows=rows,
            y_scale=y_scale,
            g_scale=g_scale,
            exact_scales=scales(RUNNING_SUM_DTYPE) if cfg.records_rounding else None,
            halves=_halves(rows, start) if cfg.split_halves else None,
        )
        with torch.enable_grad():
            loss = loss_fn(model, batch)
            _check_loss(loss, index)
            b.backward = True
            loss.backward()
        weight = float(row_weight.sum())
        self._end_batch(b, loss_tokens, weight, float(row_weight[odd].sum()))

    def _end_batch(
        self, b: _BatchState, loss_tokens: int, weight: float, odd_weight: float
    ) -> None:
        missing = set(self.targets) - b.called
        if missing:
            raise ValueError(f"target modules not called by the forward pass: {sorted(missing)}")
        self.sums.tokens += int(b.positions.sum())
        self.sums.loss_tokens += loss_tokens
        self.sums.gradient_weight += weight
        if self.config.split_halves:
            self.sums.split_weight += odd_weight
        self.sums.sequences += b.rows
        self.sums.batches += 1
        b.close()  # a leak per batch otherwise (_BatchState.close)
        self._batch = None

    def _forward_hook(
        self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Tensor
    ) -> None:
        b = self._batch
        if b is None:
            return  # a forward outside our steps (e.g. generation inside loss_fn is not ours)
        if b.backward:
            # Gradient checkpointing recomputes the layer during backward. Non-reentrant: the
            # gradient reaches the first forward's output (hook already set); reentrant: it flows
            # through this recomputed output. Either way it is counted once (``graded``).
            if name in b.called and output.requires_grad:
                output.register_hook(partial(self._grad_hook, name, b.group[name], b))
            return
        if name in b.called:
            raise ValueError(
                f"target module {name!r} is called more than once per forward; unsupported"
            )
        b.called.add(name)
        x = inputs[0]  # (..., d_in)
        if tuple(x.shape[:-1]) != tuple(b.positions.shape):
            raise ValueError(
                f"{name}: input positions {tuple(x.shape[:-1])} do not match the token mask {tuple(b.positions.shape)}"
            )
        group = self._group(b, name, x)
        b.group[name] = group
        if group == name:
            rows = x.detach()
            rows = rows.reshape(-1, rows.shape[-1]) if b.every_position else rows[b.positions]
            xP = rows.to(self.config.dtype)  # (|P_b|, d_in)
            diag = None
            if records_heavy_rows(self.config):
                diag = self.sums.heavy_diag.get(name)
                if diag is None:
                    diag = self.sums.heavy_diag[name] = xP.new_zeros(
                        xP.shape[-1], dtype=RUNNING_SUM_DTYPE
                    )
            _add_gram_rows(self.sums.Z, name, xP, 1.0, diag)  # += Σ x xᵀ (lower triangle)
            if self.config.records_rounding:
                _add_reference(self.sums.rounding, f"Z/{name}", rows, rows, 1.0)
            b.inputs[group] = (x, x._version)
        if not output.requires_grad:
            output.requires_grad_(True)  # a leaf: gradients flow to it, not into frozen weights
        output.register_hook(partial(self._grad_hook, name, group, b))

    def _group(self, b: _BatchState, name: str, x: Tensor) -> str:
        """The first module of this forward that read the very same input tensor."""
        group = next((g for t, g in b.readers if t is x), name)
        if group == name:
            b.readers.append((x, name))
        known = self.sums.group_of.setdefault(name, group)
        if known != group:
            raise RuntimeError(
                f"{name}: input sharing changed between batches ({known} vs {group})"
            )
        return group

    def _grad_hook(self, name: str, group: str, b: _BatchState, g: Tensor) -> None:
        if not b.active or name in b.graded:
            return  # (a recomputed output under non-reentrant checkpointing gets no gradient)
        b.graded.add(name)
        dtype = self.config.dtype
        x, version = b.inputs[group]
        if x._version != version:
            raise RuntimeError(f"the input of {name!r} was modified in place before backward")
        if b.exact_scales is not None:
            self._add_references(name, b, b.exact_scales, x.detach(), g.detach())
        g = g.detach().to(dtype)  # (..., d_out) = ∂L_b/∂o
        x = x.detach().to(dtype)  # (..., d_in)
        scaled: dict[int, tuple[Tensor, float]] = {}
        g_G, a_G = _scaled(g, b.g_scale, scaled)  # G's per-position gradients, × a_G
        if b.halves is None:
            _addmm_rows(self.sums.G, name, _flat(x), _flat(g_G), a_G)  # += w_b ∇_W L_b
        else:  # the even-numbered sequences' sum into G, the odd-numbered ones' into G_odd
            for half, rows in b.halves:
                xs, gs = (x, g_G) if rows is None else (x[rows], g_G[rows])
                store = self.sums.G_odd if half else self.sums.G
                _addmm_rows(store, name, _flat(xs), _flat(gs), a_G)  # (d_in, d_out)
        g_Y, a_Y = _scaled(g, b.y_scale, scaled)  # scores s = a_Y · g_Y
        gP = _flat(g_Y) if b.every_position else g_Y[b.positions]  # (|P_b|, d_out)
        _OUTPUT_FACTORS[self.config.output_factor](self.sums.Y, name, gP, a_Y**2)

    def _add_references(
        self, name: str, b: _BatchState, scales: tuple[float | Tensor, float | Tensor],
        x: Tensor, g: Tensor,
    ) -> None:  # fmt: skip
        """The float64 products beside G's and Y's (module docstring), from the model's own
        ``x`` and ``g`` scaled in float64: every rounding of the statistics dtype is measured,
        that of the per-sequence scales too."""
        y_scale, g_scale = scales
        x, g, scaled = x.to(RUNNING_SUM_DTYPE), g.to(RUNNING_SUM_DTYPE), {}
        rounding = self.sums.rounding
        g_G, a_G = _scaled(g, g_scale, scaled)
        _add_reference(rounding, f"G/{name}", _flat(x), _flat(g_G), a_G)
        g_Y, a_Y = _scaled(g, y_scale, scaled)
        gP = _flat(g_Y) if b.every_position else g_Y[b.positions]  # (|P_b|, d_out)
        if self.config.output_factor == "full":
            _add_reference(rounding, f"Y/{name}", gP, gP, a_Y**2)
        else:
            _add(rounding, f"Y/{name}", (gP * gP).sum(0), a_Y**2)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _per_sequence_scale(row_tokens: Tensor, loss_tokens: int, dtype: torch.dtype) -> float | Tensor:
    """``T_b / T_i`` per sequence (0 where ``T_i`` = 0): a float when it is the same for all."""
    if row_tokens.numel() == 1 or bool((row_tokens == row_tokens[0]).all()):
        return float(loss_tokens) / float(row_tokens[0])
    t = row_tokens.to(dtype)
    return torch.where(t > 0, loss_tokens / t.clamp(min=1), torch.zeros_like(t))


def _scaled(
    g: Tensor, scale: float | Tensor, cache: dict[int, tuple[Tensor, float]]
) -> tuple[Tensor, float]:
    """``(g', a)`` with ``a · g'`` = g scaled by a float or per row (batch dim first)."""
    if isinstance(scale, float):
        return g, scale
    if id(scale) not in cache:
        cache[id(scale)] = (g * scale.view(-1, *([1] * (g.ndim - 1))), 1.0)
    return cache[id(scale)]


def _halves(rows: int, start: int) -> list[tuple[int, slice | None]]:
    """(half, rows) pairs: rows with an even stream index go to half 0, odd to half 1."""
    if rows == 1:
        return [(start % 2, None)]
    first_even = start % 2  # local row i has stream index start + i
    return [(0, slice(first_even, None, 2)), (1, slice(1 - first_even, None, 2))]


def _full_output_factor(store: dict[str, Tensor], key: str, g: Tensor, alpha: float) -> None:
    _add_gram(store, key, g, alpha)  # += Σ s sᵀ, (d_out, d_out) (lower triangle)


def _diagonal_output_factor(store: dict[str, Tensor], key: str, g: Tensor, alpha: float) -> None:
    _add(store, key, (g * g).sum(0), alpha)  # += Σ s², (d_out,)


_OUTPUT_FACTORS = {"full": _full_output_factor, "diagonal": _diagonal_output_factor}


def _addmm(store: dict[str, Tensor], key: str, a: Tensor, b: Tensor, alpha: float) -> None:
    """``store[key] += alpha · a @ b``: the batch's product in the statistics dtype (one BLAS
    call), added into a :data:`RUNNING_SUM_DTYPE` running sum (allocated on first use)."""
    _add(store, key, a @ b, alpha)


def records_heavy_rows(config: StatisticsConfig | LoraDAConfig) -> bool:
    """Whether a pass may take rows in float64 and so keeps ``KFACSums.heavy_diag``: products
    below float64 with the rule on (:data:`HEAVY_ROW_RATIO`)."""
    return HEAVY_ROW_RATIO is not None and config.dtype != RUNNING_SUM_DTYPE


def _heavy_rows(x: Tensor) -> Tensor | None:
    """The rows of ``x`` (n, d) whose squared norm exceeds :data:`HEAVY_ROW_RATIO` × the median
    (a bool mask), ``None`` when there are none, the products are float64, or the rule is off."""
    if HEAVY_ROW_RATIO is None or x.dtype == RUNNING_SUM_DTYPE or x.shape[0] < 2:
        return None
    sq = torch.linalg.vector_norm(x, dim=-1).square()  # no (n, d) temporary, unlike x.pow(2)
    heavy = sq > HEAVY_ROW_RATIO * sq.median()
    return heavy if bool(heavy.any()) else None


def _add_gram_rows(
    store: dict[str, Tensor], key: str, x: Tensor, alpha: float, diag: Tensor | None = None
) -> None:
    """:func:`_add_gram` with the heavy rows' products in float64 (:func:`_heavy_rows`); their
    part of the diagonal is also added to ``diag`` (d,) when given."""
    heavy = _heavy_rows(x)
    if heavy is None:
        _add_gram(store, key, x, alpha)
        return
    _add_gram(store, key, x[~heavy], alpha)
    rows = x[heavy].to(RUNNING_SUM_DTYPE)
    _add_gram(store, key, rows, alpha)
    if diag is not None:
        diag.add_(rows.square().sum(0), alpha=alpha)


def _addmm_rows(store: dict[str, Tensor], key: str, x: Tensor, g: Tensor, alpha: float) -> None:
    """``store[key] += alpha · xᵀg`` (x (n, d_in), g (n, d_out)), the heavy rows of x in
    float64."""
    heavy = _heavy_rows(x)
    if heavy is None:
        _addmm(store, key, x.mT, g, alpha)
        return
    light = ~heavy
    _addmm(store, key, x[light].mT, g[light], alpha)
    _addmm(store, key, x[heavy].mT.to(RUNNING_SUM_DTYPE), g[heavy].to(RUNNING_SUM_DTYPE), alpha)


def _add_reference(store: dict[str, Tensor], key: str, a: Tensor, b: Tensor, alpha: float) -> None:
    """``store[key] += alpha · aᵀ(bΩ)`` in float64 (``Ω = rounding_probe(b.shape[-1])``): the
    product ``aᵀb`` without rounding, sketched."""
    a64, b64 = a.to(RUNNING_SUM_DTYPE), b.to(RUNNING_SUM_DTYPE)
    _add(store, key, a64.mT @ (b64 @ rounding_probe(b.shape[-1], b.device)), alpha)


GRAM_PANEL = 384  # columns per row panel of a Gram sum (measured: docs/numerics.md, "Cost")


def gram_panels(d: int) -> list[tuple[int, int]]:
    """Row panels ``[(start, stop)]`` of a (d, d) Gram sum: ⌈d / GRAM_PANEL⌉ (at most 8) equal
    ones; one panel (the whole matrix) up to ``GRAM_PANEL``."""
    count = min(8, max(1, -(-d // GRAM_PANEL)))
    edges = [round(i * d / count) for i in range(count + 1)]
    return list(itertools.pairwise(edges))


def _add_gram(store: dict[str, Tensor], key: str, x: Tensor, alpha: float) -> None:
    """``store[key] += alpha · xᵀx`` (x (n, d)) on and below the diagonal only, the part
    :func:`finalize` keeps (it mirrors the lower triangle up): row panel ``[a, b)`` gets
    ``x[:, a:b]ᵀ x[:, :b]``, so about half of the product and of the running-sum add is skipped
    (a (1376, 1376) sum over 128 tokens: 3.75 → 2.33 ms per batch on 2 threads). Each panel is
    the same BLAS product as those rows of ``xᵀx``: bit-identical sums where the BLAS computes
    every entry the same way whatever the output's shape (checked on this machine's torch)."""
    d = x.shape[-1]
    if key not in store:
        store[key] = torch.zeros((d, d), dtype=RUNNING_SUM_DTYPE, device=x.device)
    total = store[key]
    for a, b in gram_panels(d):
        product = x[:, a:b].mT @ x[:, :b]  # (b − a, b)
        if b < d:
            total[a:b, :b].add_(product, alpha=alpha)
        else:  # the last panel's rows are contiguous: the chunked add
            add_into(total[a:b], product, alpha)


def _add(store: dict[str, Tensor], key: str, value: Tensor, alpha: float = 1.0) -> None:
    if key not in store:
        store[key] = torch.zeros(value.shape, dtype=RUNNING_SUM_DTYPE, device=value.device)
    add_into(store[key], value, alpha)


ADD_CHUNK = 1 << 16  # elements: a 512 KiB float64 piece and its cast stay in the cache


def add_into(total: Tensor, value: Tensor, alpha: float = 1.0) -> None:
    """``total += alpha · value`` for a running sum of a wider dtype (float64 += float32).

    The same elementwise add as ``total.add_(value, alpha=alpha)``, bit for bit, but on the CPU
    in cache-sized pieces: torch casts the whole float32 operand to a float64 temporary first,
    and for a (1376, 1376) factor that round trip through memory costs as much again as the
    add (measured: 1.7–2.2 ms → 1.2–1.4 ms per add; docs/numerics.md, "Cost")."""
    if (
        total.device.type != "cpu"
        or total.dtype == value.dtype
        or total.shape != value.shape  # (broadcasting: one add_)
        or total.numel() <= ADD_CHUNK
        or not (total.is_contiguous() and value.is_contiguous())
    ):
        total.add_(value, alpha=alpha)
        return
    flat_total, flat_value = total.view(-1), value.view(-1)
    for start in range(0, flat_total.numel(), ADD_CHUNK):
        stop = start + ADD_CHUNK
        flat_total[start:stop].add_(flat_value[start:stop], alpha=alpha)


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
