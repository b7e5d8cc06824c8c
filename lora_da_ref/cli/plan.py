"""``lora-da plan``: what an init will cost and whether the data can determine its subspace,
measured on a small probe before the full pass.

**Memory and passes.** From the target shapes alone (:mod:`lora_da_ref.torch.memory`): the bytes
of every layer's statistics, the layers per pass the budget allows, and the peak (the largest
pass's statistics).

**Time.** Measured once, before the probe: the set-up the init repeats (imports, reading and
tokenising the data, loading the model; ``setup_seconds``, timed by the caller) and the first
batch's own cost (allocations and lazy initialisation: a warm-up pass over one sequence, less
that sequence's share at the probe's rate). Then **every pass** is probed: one statistics pass
over the first ``probe`` sequences on that pass's targets. Each pass re-runs the model forward
and backward over the whole data, so pass ``i`` costs ``t_probe,i · tokens(S)/tokens(probe)``.
The probe solves every target of the first pass and the targets of the first layer of each later
pass; a solve does not depend on the data size, so pass ``i``'s solves cost its probed solves'
time times ``targets_i / probed_i``. The estimate is the sum of the four; writing the adapter is
not in it (seconds at most for a LoRA adapter).

**Calibration SNR at the full size.** The probe's factors carry the calibration diagnostics
(:mod:`lora_da_ref.torch.diagnostics`): ``delta_sq = ‖ΔŴ‖²``, a noise estimate (split-half, from
the probe's two halves, or the plug-in ``tr(Σ_i Ĵ⁻¹_[i])/|S|``) and the SNR
``(delta_sq − noise)/noise`` (:func:`lora_da_ref.snr.layer_snr`: the split-half one where
recorded). With ``ΔŴ = ΔW + E``, ``E‖E‖² = noise``, the
expected ``‖ΔŴ‖²`` is ``‖ΔW‖² + noise``: the probe's signal is ``delta_sq − noise_probe``, and it
does not depend on |S|, while the noise falls as ``1/|S|``: ``noise(S) = noise_probe · |S_probe|/|S|``.
Hence

    SNR(S) = (delta_sq − noise_probe) / (noise_probe · |S_probe|/|S|) = SNR_probe · |S|/|S_probe|,

linear in |S|, and ``SNR(S) ≥ 1`` (signal ≥ noise, i.e. ``E‖ΔŴ‖² ≥ 2·noise``) needs

    |S| ≥ |S_probe| / SNR_probe          (only when SNR_probe > 0: else no signal was seen).

|S| is in the Fisher's units (``W²/|P|``, :func:`~lora_da_ref.torch.diagnostics.fisher_units`),
computed for the data from its token counts; it is converted to sequences at the data's mean
length. Reported per module type as the median over the probed layers (the map is monotone, so
the median of the extrapolation is the extrapolation of the median). The probe's own noise
estimate is noisy too: read the needed size as an order of magnitude.
"""

from __future__ import annotations

import math
import statistics as pystats
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lora_da_ref.snr import layer_snr

__all__ = ["ModuleSNR", "Plan", "format_plan", "make_plan", "size_for_snr", "snr_at_size"]

SNR_NEEDED = 1.0  # signal = noise; the report flags below it as well


def snr_at_size(snr: float, size: float, target_size: float) -> float:
    """The plug-in SNR at ``|S| = target_size`` from one measured at ``|S| = size`` (module
    docstring: the signal is fixed, the noise ∝ 1/|S|, so the SNR is linear in |S|); ``nan``
    when the probe measured no signal (``snr <= 0``: a negative signal estimate scaled up would
    read as a precise, ever more negative SNR)."""
    return snr * target_size / size if snr > 0 else math.nan


def size_for_snr(snr: float, size: float, want: float = SNR_NEEDED) -> float:
    """The |S| at which the SNR measured at ``size`` reaches ``want``; ``inf`` when no signal
    was measured (``snr <= 0``: more data at this rate would not show one)."""
    return size * want / snr if snr > 0 else math.inf


@dataclass
class ModuleSNR:
    """One module type's median plug-in SNR: on the probe, extrapolated to the data, and the
    sequences the data would need for SNR 1."""

    kind: str
    layers: int
    probe_snr: float
    snr: float
    sequences_needed: float


@dataclass
class Plan:
    """Everything ``lora-da plan`` reports (sizes in bytes, times in seconds)."""

    targets: int
    layers: int
    passes: list[int]  # layers per pass
    statistics_bytes: int
    peak_bytes: int
    budget_bytes: int | None
    sequences: int
    tokens: int
    sample_size: float  # |S| of the data, Fisher units
    probe_sequences: int
    probe_sample_size: float
    probe_targets: int  # targets solved by the probe (every pass has statistics probed)
    setup_seconds: float  # imports, data, model loading: measured, paid once by the init too
    first_batch_seconds: float  # the first batch's one-time cost beyond its tokens' share
    pass_seconds: list[float]  # the statistics time of each pass at the data's size
    solve_seconds: float
    device: str
    snr: list[ModuleSNR] = field(default_factory=list)

    @property
    def statistics_seconds(self) -> float:
        return sum(self.pass_seconds)

    @property
    def one_time_seconds(self) -> float:
        return self.setup_seconds + self.first_batch_seconds

    @property
    def seconds(self) -> float:
        return self.one_time_seconds + self.statistics_seconds + self.solve_seconds

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "statistics_seconds": self.statistics_seconds,
            "one_time_seconds": self.one_time_seconds,
            "seconds": self.seconds,
            "verdict": verdict(self),
        }


def make_plan(
    model: Any,
    batches: list[dict],
    targets: Mapping[str, Any],
    config: Any,
    probe: int,
    *,
    setup_seconds: float = 0.0,
) -> Plan:
    """Plan an init of ``model`` on ``batches`` (module docstring), probing the first ``probe``
    sequences on every pass. ``config`` is the init's
    :class:`~lora_da_ref.torch.config.LoraDAConfig`; ``setup_seconds`` the caller's measured
    set-up (imports, data, model), which the init pays as well."""
    from lora_da_ref.torch.memory import (
        _layer_key,
        layer_passes,
        resolve_layers_per_pass,
        statistics_budget,
        statistics_bytes,
    )

    device = next(model.parameters()).device
    names = list(targets)
    per_module = statistics_bytes(targets, config)
    passes = layer_passes(names, resolve_layers_per_pass(targets, config, device))
    peak = max(sum(per_module[n].total for n in chunk) for chunk in passes)
    probe_batches = _first_sequences(batches, probe)
    warm_batches = _first_usable_sequence(batches, config)
    probe_config = config.replace(diagnostics="cheap") if config.diagnostics == "off" else config
    seqs, tokens, size = _units(batches, config)
    probe_seqs, probe_tokens, _ = _units(probe_batches, config)
    _, warm_tokens, _ = _units(warm_batches, config)
    first = {n: targets[n] for n in passes[0]}
    t_warm = _time_statistics(model, warm_batches, first, probe_config)[1]
    pass_seconds, solve_seconds, factors = [], 0.0, {}
    for i, chunk_names in enumerate(passes):
        chunk = {n: targets[n] for n in chunk_names}
        stats, t_stats = _time_statistics(model, probe_batches, chunk, probe_config)
        if i == 0:
            first_rate = t_stats / probe_tokens
            solve = list(chunk_names)
        else:  # the first layer of a later pass: its shapes and its own SNR, at a layer's cost
            layer = _layer_key(chunk_names[0])
            solve = [n for n in chunk_names if _layer_key(n) == layer]
        t0 = time.perf_counter()
        factors |= _solve(stats, solve, probe_config)
        solve_seconds += (time.perf_counter() - t0) * len(chunk_names) / len(solve)
        pass_seconds.append(t_stats * tokens / probe_tokens)
        del stats
    sample = [f.diagnostics["sample_size"] for f in factors.values()]
    plan = Plan(
        targets=len(names),
        layers=len({_layer_key(n) for n in names}),
        passes=[len({_layer_key(n) for n in c}) for c in passes],
        statistics_bytes=sum(b.total for b in per_module.values()),
        peak_bytes=peak,
        budget_bytes=statistics_budget(config, device),
        sequences=seqs,
        tokens=tokens,
        sample_size=size,
        probe_sequences=probe_seqs,
        probe_sample_size=sample[0] if sample else math.nan,
        probe_targets=len(factors),
        setup_seconds=setup_seconds,
        first_batch_seconds=max(0.0, t_warm - first_rate * warm_tokens),
        pass_seconds=pass_seconds,
        solve_seconds=solve_seconds,
        device=str(device),
    )
    plan.snr = _module_snr(factors, plan)
    return plan


def _time_statistics(
    model: Any, batches: list[dict], chunk: dict, config: Any
) -> tuple[Any, float]:
    from lora_da_ref.torch.stages import collect_statistics

    t0 = time.perf_counter()
    stats = collect_statistics(model, batches, chunk, config, progress=False)
    return stats, time.perf_counter() - t0


def _solve(stats: Any, layers: list[str], config: Any) -> dict:
    from lora_da_ref.torch.stages import lora_da_factors

    return lora_da_factors(stats, rank=config.rank, config=config, layers=layers)


def _first_sequences(batches: list[dict], count: int) -> list[dict]:
    """The first ``count`` sequences, as batches (the last one cut)."""
    out, left = [], count
    for batch in batches:
        if left <= 0:
            break
        rows = int(batch["input_ids"].shape[0])
        out.append(batch if rows <= left else {k: v[:left] for k, v in batch.items()})
        left -= rows
    return out


def _first_usable_sequence(batches: list[dict], config: Any) -> list[dict]:
    """The first sequence with a loss token, as one batch (the warm-up pass needs one)."""
    for batch in batches:
        for row in range(int(batch["input_ids"].shape[0])):
            one = {k: v[row : row + 1] for k, v in batch.items()}
            if _units([one], config)[0] > 0:
                return [one]
    return _first_sequences(batches, 1)  # none: the pass raises its usual error


def _units(batches: list[dict], config: Any) -> tuple[int, int, float]:
    """(sequences with a loss token, statistics positions |P|, |S| = W²/|P| in the Fisher's
    units), counted as the statistics pass counts them."""
    from lora_da_ref.torch.diagnostics import fisher_units
    from lora_da_ref.torch.statistics import token_masks

    sequences = loss = positions = attention = 0
    for batch in batches:
        for row in range(int(batch["input_ids"].shape[0])):
            one = {k: v[row : row + 1] for k, v in batch.items()}
            mask, n_loss = token_masks(one, config.replace(token_mask="attention"))
            sequences += n_loss > 0
            loss += n_loss
            attention += int(mask.sum())
    positions = loss if config.token_mask == "labels" else attention
    size = fisher_units(config, sequences=sequences, loss_tokens=loss, attention_tokens=attention)
    return sequences, positions, size


def _module_snr(factors: Mapping[str, Any], plan: Plan) -> list[ModuleSNR]:
    kinds: dict[str, list[float]] = {}
    for name, f in factors.items():
        snr = layer_snr(f.diagnostics)
        if snr is not None:
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append(float(snr))
    out = []
    for kind, values in kinds.items():
        probe = pystats.median(values)
        need = size_for_snr(probe, plan.probe_sample_size)
        out.append(
            ModuleSNR(
                kind,
                len(values),
                probe,
                snr_at_size(probe, plan.probe_sample_size, plan.sample_size),
                need * plan.sequences / plan.sample_size,
            )
        )
    return out


def verdict(plan: Plan) -> str:
    """One plain sentence: can this data determine LoRA-DA's subspace?"""
    if not plan.snr:
        return "no calibration SNR was measured"
    low = [m for m in plan.snr if not m.snr >= SNR_NEEDED]
    blind = [m.kind for m in low if not math.isfinite(m.sequences_needed)]
    need = max((m.sequences_needed for m in low), default=0.0)
    more = f"it would need about {_count(need)} sequences" if math.isfinite(need) else ""
    if blind:
        more = (
            f"the probe's {plan.probe_sequences} sequences showed no signal above the noise in "
            f"{', '.join(blind)}, so the plan cannot say how many sequences they need; a larger "
            "--probe-sequences may show one"
        )
    if len(low) == len(plan.snr):
        return (
            f"at {plan.sequences} sequences the median SNR of every module type is below 1: "
            f"LoRA-DA's subspace is not determined by this data; {more}"
        )
    if low:
        kinds = ", ".join(m.kind for m in low)
        return (
            f"at {plan.sequences} sequences the median SNR of {kinds} is below 1: their "
            f"subspace is not determined by this data; {more}"
        )
    return f"at {plan.sequences} sequences every module type has median SNR >= 1"


def format_plan(plan: Plan) -> str:
    """The text ``lora-da plan`` prints (plain words; the JSON keeps every number, |S| included)."""
    budget = "no budget" if plan.budget_bytes is None else f"budget {_bytes(plan.budget_bytes)}"
    passes = len(plan.passes)
    per_pass = ", ".join(map(str, plan.passes))
    lines = [
        f"lora-da plan: {plan.targets} target modules in {plan.layers} layers; "
        f"{plan.sequences} calibration sequences ({plan.tokens} tokens enter the statistics)",
        f"memory: the statistics take {_bytes(plan.statistics_bytes)} in all ({budget}): "
        f"{passes} pass{'es' if passes > 1 else ''} over the data ({per_pass} layers), peak "
        f"{_bytes(plan.peak_bytes)}",
        f"time: about {_seconds(plan.seconds)} (once: loading {_seconds(plan.setup_seconds)}, "
        f"first batch {_seconds(plan.first_batch_seconds)}; statistics "
        f"{_seconds(plan.statistics_seconds)}; solves {_seconds(plan.solve_seconds)}), timed on "
        f"the first {plan.probe_sequences} sequences of each pass and {plan.probe_targets} solves "
        f"on {plan.device}; writing the adapter is not included",
        "calibration SNR, median over layers: signal/noise, signal = ‖ΔŴ‖² − noise (0: no "
        "signal seen; 1: as much signal as noise; the noise falls as 1/sequences). Below 1 the "
        "data do not determine a layer's subspace:",
    ]
    table = [["module", "probe SNR", f"SNR at {plan.sequences} seq", "seq for SNR 1"]]
    for m in plan.snr:
        need = _count(m.sequences_needed) if math.isfinite(m.sequences_needed) else "no signal"
        at_size = f"{m.snr:.3g}" if math.isfinite(m.snr) else "no signal"
        table.append([m.kind, f"{m.probe_snr:.3g}", at_size, need])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    lines.append(verdict(plan))
    return "\n".join(lines)


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 60:
        return f"{value / 60:.1f} min"
    return f"{value:.2g} s" if value < 10 else f"{value:.0f} s"


def _count(value: float) -> str:
    return f"{math.ceil(value):,}"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
