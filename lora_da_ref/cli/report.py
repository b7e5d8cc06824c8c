"""``lora-da report ADAPTER_DIR``: the per-layer diagnostics of a LoRA-DA init, and its flags.

Reads ``ADAPTER_DIR/lora_da.json`` (written by ``lora-da init`` and by
:func:`lora_da_ref.torch.peft_init.save_lora_da_state`) and prints one table per module type
(``q_proj``, ``down_proj``, ...), one row per layer, with whichever diagnostics the init recorded:
damping, condition numbers (any key starting with ``cond``), the eigensolver, its iterations and
relative residual ``‖ΩV − VΛ‖/‖Ω‖``, a fallback, the calibration SNR and split-half stability.
Keys absent from the file are skipped, so older and newer files both read.

A layer is **flagged** by any of these rules, each in one of three kinds (:data:`KIND_OF`),
which the closing line counts apart, each with what to do:

**Failed** (exit status 1): the factors are not what Algorithm 1 asks for.

* ``residual``: the eigen-solve's relative residual is not finite or exceeds
  :data:`RESIDUAL_LIMIT` (1e-3): A0 is then not an eigenbasis of Ω to better than 0.1 % of its
  spectrum (the official preset's 10 LOBPCG iterations run without a convergence check);
* ``warning``: the init recorded a warning for the layer (a non-empty ``warning``/``warnings``/
  ``flags`` entry, or ``trustworthy`` false), e.g. the statistics dtype cannot resolve cond(Z);
* ``cond``: a recorded condition number is infinite or NaN (numerically singular factor);
* ``precision`` measured: the precision probe at the rounding the pass measured
  (``precision_probe`` with ``precision_rounding = "measured"``, the full diagnostics tier: A0
  re-solved from statistics perturbed at their measured rounding) moved A0 by more than 1e-3 rad
  (:func:`lora_da_ref.precision.layer_precision` decides, here and in the init's warning).

**Numerically unverified** (exit status 0): ``precision``: the precision check could not clear
the layer. The bound on how far rounding the statistics to their dtype may rotate A0
(``precision_bound``, conservative: tens of times the measured angle, docs/numerics.md) clears
a layer at 1e-3 rad; a layer above it is re-solved from perturbed statistics
(``precision_probe``), whose one draw clears it only well below 1e-3 rad (half of it at the
rounding model's size, a tenth at the measured rounding: the draw has read as little as 0.78×
and 0.20× the measured angle). A layer neither clears is not known to be wrong, only not
verified: an init at ``--diagnostics full`` measures the rounding (``lora-da report --full``
re-solves saved statistics, which carry the measurement only when they were collected at that
tier). (Files without the probe: the bound alone.)

**Not determined by this data** (exit status 0): ``snr``, the layer's SNR (:func:`layer_snr`:
the split-half estimate where the init kept the halves, else the plug-in), is below
:data:`SNR_LIMIT` (1): the calibration noise in ΔŴ is larger than its signal; ``stability``: the
split-half stability is below :data:`STABILITY_LIMIT` (0.5). The SNR is an estimate of signal
over noise, not a forecast: within one calibration size it ranks layers by split-half stability
only loosely (docs/real_regime.md). More calibration data lowers the noise as 1/|S|.

A solver fallback (LOBPCG did not converge and dense ``eigh`` was used) is shown but does not flag
the layer: the fallback's answer is exact. Flagged layers are listed worst first (failed ones
first, then by :func:`flag_severity`: decades past the limit), then medians and counts per rule.
Exit status 2 is a bad input (no ``lora_da.json``).
No torch import; the PNG needs matplotlib (skipped with a note when it is not installed).
"""

from __future__ import annotations

import json
import math
import re
import statistics as pystats
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_da_ref.precision import layer_precision
from lora_da_ref.snr import SNR_LIMIT, layer_snr

__all__ = [
    "KIND_OF",
    "RESIDUAL_LIMIT",
    "STABILITY_LIMIT",
    "LayerRow",
    "figure_panels",
    "flag_reasons",
    "flag_severity",
    "format_report",
    "load_rows",
    "write_figure",
]

RESIDUAL_LIMIT = 1e-3
STABILITY_LIMIT = 0.5
PROVENANCE_FILE = "lora_da.json"
# Shown in this order when present; any other numeric key starting with "cond" is added.
_COLUMNS = (
    "damping", "cond", "solver", "iterations", "residual", "precision_bound", "precision_probe",
    "snr", "split_angle_max", "stability",
)  # fmt: skip
# The one SNR of the report (layer_snr), shown as itself: its scale is explained in the legend.
SNR = "snr"
SNR_LEGEND = (
    "snr = (‖ΔŴ‖² − noise)/noise, the calibration noise's share of ΔŴ (split-half estimate where "
    "recorded, else plug-in): 0 = as much noise as signal, negative = noise only; below 1 the "
    "data do not determine the layer's subspace (more data: the noise falls as 1/|S|)"
)
# The three kinds of flag (module docstring): what a user does about each differs.
KIND_OF = {
    "residual": "failed", "warning": "failed", "cond": "failed", "precision_measured": "failed",
    "precision": "unverified", "snr": "undetermined", "stability": "undetermined",
}  # fmt: skip
_ADVICE = {
    "failed": "failed (exit 1)",
    "unverified": "numerically unverified: the precision check (bound, then one re-solve, which "
    "clears a layer only with a margin below 1e-3 rad) could not clear it; an init at "
    "--diagnostics full measures the rounding, and --dtype float64 or a larger --damping "
    "removes the doubt where it was measured already",
    "undetermined": "not determined by this data: the calibration noise is above the signal; "
    "more calibration data lowers it as 1/|S|",
}
_WARNING_KEYS = ("warning", "warnings", "flags")


@dataclass
class LayerRow:
    """One layer: its name, module type, layer index and flattened diagnostics."""

    name: str
    kind: str
    index: int | None
    values: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def load_rows(path: str | Path) -> tuple[dict[str, Any], list[LayerRow]]:
    """(provenance, rows) from an adapter directory or a ``lora_da.json`` file."""
    path = Path(path)
    file = path / PROVENANCE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {PROVENANCE_FILE} in {path} (is it a LoRA-DA adapter?)")
    try:
        provenance = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: invalid JSON ({err.msg})") from err
    layers = provenance.get("layers") if isinstance(provenance, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{file}: no per-layer diagnostics ('layers' is missing or empty)")
    rows = []
    for name, diag in layers.items():
        flat = _with_snr(_flatten(diag if isinstance(diag, Mapping) else {}))
        index = re.search(r"\.(\d+)\.", f".{name}.")
        row = LayerRow(name, name.rsplit(".", 1)[-1], int(index.group(1)) if index else None, flat)
        row.reasons = flag_reasons(flat)
        rows.append(row)
    return provenance, rows


def flag_reasons(diag: Mapping[str, Any]) -> list[str]:
    """Why a layer is flagged (empty: not flagged); see the module docstring for the rules."""
    return [text for _, text, _ in _flags(diag)]


def flag_severity(diag: Mapping[str, Any]) -> float:
    """How far the worst flag of a layer is past its limit, in decades (``log10`` of the ratio;
    ``inf`` for a warning, a singular factor or a non-finite value; 0 when not flagged), so the
    worst layers are listed first."""
    return max((severity for _, _, severity in _flags(diag)), default=0.0)


def _flags(diag: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(kind, reason, severity) of each rule the layer breaks."""
    out = []
    residual = _number(diag.get("residual"))
    if "residual" in diag and diag["residual"] is not None:
        if residual is None or not math.isfinite(residual) or residual > RESIDUAL_LIMIT:
            text = f"residual {_cell(diag['residual'])} > {RESIDUAL_LIMIT:g}"
            out.append(("residual", text, _decades(residual, RESIDUAL_LIMIT)))
    for key in _WARNING_KEYS:
        if diag.get(key):
            out.append(("warning", f"warning: {diag[key]}", math.inf))
    if diag.get("trustworthy") is False:
        out.append(("warning", "not trustworthy in the statistics dtype", math.inf))
    for key, value in diag.items():
        number = _number(value)
        if key.startswith("cond") and number is not None and not math.isfinite(number):
            out.append(("cond", f"{key} = {value}", math.inf))
    p = layer_precision(diag)
    if p.verdict == "failed":  # a re-solve at the measured rounding moved A0
        text = f"{p.key} {p.angle:.3g} rad > {p.limit:g} (statistics dtype too coarse)"
        out.append(("precision_measured", text, _decades(p.angle, p.limit)))
    elif p.verdict == "unverified":
        text = f"{p.key} {p.angle:.3g} rad > {p.limit:g} (unverified)"
        out.append(("precision", text, _decades(p.angle, p.limit)))
    snr = layer_snr(diag)
    if snr is not None and not snr >= SNR_LIMIT:
        text = f"SNR {snr:.3g} < {SNR_LIMIT:g} (noise above signal)"
        out.append(("snr", text, _decades(SNR_LIMIT + 1, max(snr + 1, 0.0))))
    stability = _number(diag.get("stability"))
    if stability is not None and not stability >= STABILITY_LIMIT:
        text = f"stability {stability:.3g} < {STABILITY_LIMIT:g}"
        out.append(("stability", text, _decades(STABILITY_LIMIT, stability)))
    return out


def _decades(big: float | None, small: float | None) -> float:
    """``log10(big/small)``: how many decades a value is past its limit (inf when undefined)."""
    if big is None or small is None or not (big > 0 and small > 0):
        return math.inf
    value = math.log10(big / small)
    return value if math.isfinite(value) else math.inf


def format_report(provenance: Mapping[str, Any], rows: list[LayerRow], top: int = 10) -> str:
    """The text report: a header, one table per module type, the ``top`` worst flagged layers,
    a summary (medians, flags by kind) and a verdict."""
    cols = _columns(rows)
    lines = [_header(provenance, rows)]
    if any(SNR in r.values for r in rows):
        lines.append(SNR_LEGEND)
    lines.append("")
    for kind in dict.fromkeys(r.kind for r in rows):
        group = [r for r in rows if r.kind == kind]
        table = [["layer", *cols, "flag"]]
        for r in group:
            cells = [_cell(r.values.get(c)) for c in cols]
            table.append([str(r.index if r.index is not None else r.name), *cells, _mark(r)])
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines.append(f"{kind} ({len(group)} layers)")
        lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
        lines.append("")
    flagged = sorted(
        (r for r in rows if r.reasons),
        key=lambda r: ("failed" not in layer_kinds(r.values), -flag_severity(r.values)),
    )
    if flagged:
        lines.append(f"flagged layers, worst first ({min(top, len(flagged))} of {len(flagged)}):")
    for r in flagged[:top]:
        lines.append(f"FLAGGED {r.name}: {'; '.join(r.reasons)}")
    if len(flagged) > top:
        lines.append(f"... and {len(flagged) - top} more (all of them: --top 0 or --json)")
    fallbacks = sum(1 for r in rows if r.values.get("fallback"))
    if fallbacks:
        lines.append(f"note: {fallbacks} layer(s) used the eigh fallback (exact; not flagged)")
    lines += _summary(rows, cols)
    lines.append(closing_line(rows))
    return "\n".join(lines)


def layer_kinds(diag: Mapping[str, Any]) -> set[str]:
    """The kinds of flag (``failed``, ``unverified``, ``undetermined``) a layer carries."""
    return {KIND_OF[kind] for kind, _, _ in _flags(diag)}


def failed(rows: list[LayerRow]) -> bool:
    """Whether any layer failed (the report's exit status 1)."""
    return any("failed" in layer_kinds(r.values) for r in rows)


def closing_line(rows: list[LayerRow]) -> str:
    """PASS/FAIL on the failed layers alone, then the count of each other kind with what to do."""
    counts = {k: sum(k in layer_kinds(r.values) for r in rows) for k in _ADVICE}
    verdict = "FAIL" if counts["failed"] else "PASS"
    parts = [f"{verdict}: {counts['failed']} of {len(rows)} layers failed"]
    parts += [f"{counts[k]} {_ADVICE[k]}" for k in ("unverified", "undetermined") if counts[k]]
    return "; ".join(parts)


def _summary(rows: list[LayerRow], cols: list[str]) -> list[str]:
    """Medians of the numeric columns over all layers, and the flagged layers per rule."""
    medians = []
    for col in cols:
        values = [v for r in rows if (v := _number(r.values.get(col))) is not None]
        if values and not isinstance(rows[0].values.get(col), bool):
            medians.append(f"{col} {_cell(pystats.median(values))}")
    lines = [f"medians over {len(rows)} layers: {', '.join(medians)}"] if medians else []
    kinds: dict[str, int] = {}
    for r in rows:
        for kind in dict.fromkeys(k for k, _, _ in _flags(r.values)):
            kinds[kind] = kinds.get(kind, 0) + 1
    if kinds:
        lines.append("flags by rule: " + ", ".join(f"{k} {n}" for k, n in kinds.items()))
    return lines


def write_figure(rows: list[LayerRow], out: str | Path) -> Path | None:
    """A PNG of every numeric diagnostic against the layer index, one line per module type.

    Returns the path, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metrics = figure_panels(rows) or ["iterations"]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 2.2 * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        for kind in dict.fromkeys(r.kind for r in rows):
            pts = [
                (r.index if r.index is not None else i, _number(r.values.get(metric)))
                for i, r in enumerate(rows)
                if r.kind == kind
            ]
            pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=kind)
        positive = [y for r in rows if (y := _number(r.values.get(metric))) is not None and y > 0]
        if positive and (metric == "residual" or max(positive) / min(positive) > 100):
            ax.set_yscale("log")
        limit = {"residual": RESIDUAL_LIMIT, SNR: SNR_LIMIT}.get(metric)
        if limit is not None:
            ax.axhline(limit, color="red", lw=0.8, ls="--", label="flag limit")
        ax.set_ylabel(metric)
    axes[-1, 0].set_xlabel("layer index")
    axes[0, 0].legend(fontsize=7, ncol=4)
    flagged = sum(1 for r in rows if r.reasons)
    axes[0, 0].set_title(f"LoRA-DA diagnostics: {len(rows)} layers, {flagged} flagged")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def figure_panels(rows: list[LayerRow]) -> list[str]:
    """The diagnostics the PNG plots: the table's numeric columns that vary across layers (a
    constant panel, e.g. the absolute damping or a fixed iteration count, says nothing)."""
    return [c for c in _columns(rows) if _varies(rows, c)]


def _varies(rows: list[LayerRow], col: str) -> bool:
    """Whether a column's finite numbers differ across layers (a constant panel is dropped)."""
    values = {v for r in rows if (v := _number(r.values.get(col))) is not None and math.isfinite(v)}
    return len(values) > 1


def _with_snr(flat: dict[str, Any]) -> dict[str, Any]:
    """Add :data:`SNR` (:func:`layer_snr`) when the init recorded one."""
    snr = layer_snr(flat)
    if snr is not None:
        flat[SNR] = snr
    return flat


def _flatten(diag: Mapping[str, Any]) -> dict[str, Any]:
    """One level of nesting: ``{"damping": {"Z": a, "Y": b}}`` → ``damping.Z``, ``damping.Y``."""
    flat: dict[str, Any] = {}
    for key, value in diag.items():
        if isinstance(value, Mapping):
            for sub, v in value.items():
                if not isinstance(v, Mapping | list):
                    flat[f"{key}.{sub}"] = v
        elif not isinstance(value, list) or key in _WARNING_KEYS:
            flat[key] = value  # other lists (e.g. the weight fingerprint) are not diagnostics
    return flat


def _columns(rows: list[LayerRow]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r.values))
    cols = []
    for want in _COLUMNS:
        cols += [k for k in keys if (k == want or k.startswith(want + ".")) and k not in cols]
    cols += [k for k in keys if k.startswith("cond") and k not in cols]
    return cols


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.lower() in ("inf", "-inf", "nan", "infinity"):
        return float(value)
    return None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    number = _number(value)
    if number is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{number:.3g}"  # 3 significant digits: the diagnostics are not known better


def _mark(row: LayerRow) -> str:
    return "FLAG" if row.reasons else ("fallback" if row.values.get("fallback") else "ok")


def _header(provenance: Mapping[str, Any], rows: list[LayerRow]) -> str:
    config = provenance.get("config") or {}
    data = provenance.get("data") or {}
    parts = [
        f"LoRA-DA report: {len(rows)} layers",
        f"preset {provenance.get('preset', '?')}",
        f"r = {config.get('rank', '?')}",
        f"N = {config.get('n_train', '?')}",
        f"statistics {config.get('dtype', '?')}",
    ]
    if data:
        parts.append("data " + ", ".join(f"{k} {v}" for k, v in data.items()))
    return ", ".join(parts)
