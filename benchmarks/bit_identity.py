"""Bit-identity of the LoRA-DA factors across a refactor: save a reference, check against it.

Usage::

    python benchmarks/bit_identity.py --save benchmarks/results/bit_identity.json   # before a move
    python benchmarks/bit_identity.py --check benchmarks/results/bit_identity.json  # after it

For every preset (``official``, ``default``, ``paper_literal``, and the default with the
``debiased`` estimator and with the ``full`` diagnostics tier), the factors A and B of every
target layer are hashed (SHA-256 of their float32 bytes) on two models:

* ``tiny``: the random tiny LLaMA of the package's examples (hidden 64, 2 layers, 16 random
  sequences of 32 tokens at batch 4), all seven projections;
* ``smollm2``: SmolLM2-135M-Instruct on the first 8 GSM8K fit problems (the short study's cut:
  24 prompt + 48 answer tokens, batch 1), every projection of decoder layers 0 and 11 (layer 11's
  ``down_proj`` is the ill-conditioned one). Skipped with ``--tiny-only``.

Every entry point that should give the same factors is hashed against the same reference:
``init_lora_da`` and the two public stages (``collect_statistics`` once, then
``lora_da_factors`` per preset). Bit-identity holds on one machine and BLAS; a reference saved
on another machine may differ by round-off (the JSON records the host and library versions).
``--check`` exits 1 and names the layers that differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    "official": {"preset": "official"},
    "default": {"preset": "default"},
    "paper_literal": {"preset": "paper_literal"},
    "default+debiased": {"preset": "default", "estimator": "debiased"},
    "default+full": {"preset": "default", "diagnostics": "full"},
}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def tiny_case() -> tuple[torch.nn.Module, list[dict], Any]:
    from lora_da_ref.data import tiny_llama

    model = tiny_llama(0, hidden=64, layers=2, heads=4).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (16, 32), generator=gen)
    batches = [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
        for x in ids.split(4)
    ]
    return model, batches, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj")  # fmt: skip


def smollm2_case() -> tuple[torch.nn.Module, list[dict], Any]:
    from lora_da_ref.real import gsm8k, load_smollm2, tokenize_gsm8k

    model, tok = load_smollm2(torch.float32)
    model.eval()
    batches = []
    for r in gsm8k("fit")[:8]:
        e = tokenize_gsm8k(tok, r, max_prompt_tokens=24, max_completion_tokens=48)
        batches.append({k: v[None] for k, v in e.items()})
    return model, batches, r"model\.layers\.(0|11)\..*_proj"


def config_of(spec: dict[str, Any], targets: Any) -> Any:
    from lora_da_ref.torch import LoraDAConfig

    spec = dict(spec)
    return LoraDAConfig.preset(spec.pop("preset"), target_modules=targets, rank=4, **spec)


def hashes(model: torch.nn.Module, batches: list[dict], targets: Any) -> dict[str, Any]:
    """``{entry point: {preset: {layer: [hash A, hash B]}}}``."""
    from lora_da_ref.torch import init_lora_da

    out: dict[str, Any] = {"init_lora_da": {}}
    for name, spec in PRESETS.items():
        factors = init_lora_da(model, batches, config_of(spec, targets), progress=False)
        out["init_lora_da"][name] = {n: [digest(f.A), digest(f.B)] for n, f in factors.items()}
    stages = stage_hashes(model, batches, targets)
    if stages is not None:
        out["stages"] = stages
    return out


def stage_hashes(model: torch.nn.Module, batches: list[dict], targets: Any) -> dict | None:
    """The two public stages, when the package has them: one statistics pass per statistics
    configuration, then one solve per preset."""
    import lora_da_ref.torch as lt

    if not hasattr(lt, "lora_da_factors"):
        return None
    out: dict[str, Any] = {}
    cache: dict[Any, Any] = {}
    for name, spec in PRESETS.items():
        config = config_of(spec, targets)
        key = config.statistics_config()
        if key not in cache:
            cache[key] = lt.collect_statistics(
                model, batches, target_modules=targets, config=key, progress=False
            )
        factors = lt.lora_da_factors(cache[key], rank=config.rank, config=config.solve_config())
        out[name] = {n: [digest(f.A), digest(f.B)] for n, f in factors.items()}
    return out


def run(tiny_only: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    cases = {"tiny": tiny_case}
    if not tiny_only:
        cases["smollm2"] = smollm2_case
    result: dict[str, Any] = {
        "host": platform.node(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "cases": {},
    }
    for case, make in cases.items():
        result["cases"][case] = hashes(*make())
    return result


def compare(reference: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Every (case, entry point, preset, layer) whose factors differ from the reference's
    ``init_lora_da`` factors (each entry point is held to that one reference)."""
    bad = []
    for case, entries in now["cases"].items():
        ref = reference["cases"].get(case, {}).get("init_lora_da")
        if ref is None:
            continue
        for entry, presets in entries.items():
            for preset, layers in presets.items():
                for layer, h in layers.items():
                    if ref.get(preset, {}).get(layer) != h:
                        bad.append(f"{case}/{entry}/{preset}/{layer}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", type=Path)
    g.add_argument("--check", type=Path)
    p.add_argument("--tiny-only", action="store_true", help="skip SmolLM2")
    args = p.parse_args(argv)
    now = run(args.tiny_only)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(now, indent=1) + "\n")
        print(f"saved {args.save}")
        return 0
    reference = json.loads(args.check.read_text())
    bad = compare(reference, now)
    checked = sum(len(lay) for e in now["cases"].values() for p in e.values() for lay in p.values())
    print(json.dumps({"checked_layers": checked, "differ": bad[:50], "n_differ": len(bad)}))
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
