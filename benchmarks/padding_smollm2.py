"""Left vs right padding on SmolLM2-135M with Hugging Face's DataCollatorForLanguageModeling; prints JSON.

Usage: python benchmarks/padding_smollm2.py [--texts 8] [--max-length 128]   (CPU; minutes)

HumanEval (train split) prompt+solution texts, batch 4, padded left and right by the standard
collator. For the default config and the official preset (float32 statistics, all 210 linear
layers): the largest relative difference (Frobenius, over the layers) of Z, Y, G between the
two paddings, and the largest principal angle between the two runs' A0 per layer (the layers
solved from each run's statistics by ``factors.solve_layer``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import DataCollatorForLanguageModeling

from lora_da_ref.real import humaneval, load_smollm2
from lora_da_ref.torch import LoraDAConfig, collect_statistics
from lora_da_ref.torch.diagnostics import principal_angles
from lora_da_ref.torch.factors import solve_layer
from lora_da_ref.torch.memory import layer_passes
from lora_da_ref.torch.targets import find_target_modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--layers-per-group", type=int, default=5, help="memory: layers at once")
    args = parser.parse_args()
    model, tok = load_smollm2(dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    records = humaneval("train")[: args.texts]
    rows = [
        tok(r["prompt"] + r["canonical_solution"], truncation=True, max_length=args.max_length)
        for r in records
    ]

    def batches(side: str, size: int = 4) -> list:
        tok.padding_side = side
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
        return [collator(rows[i : i + size]) for i in range(0, len(rows), size)]

    left, right = batches("left"), batches("right")
    out = {
        "texts": len(rows),
        "left_padded_rows": int(sum((b["attention_mask"][:, 0] == 0).sum() for b in left)),
    }
    targets = find_target_modules(model, "all-linear")
    configs = {
        "default": LoraDAConfig(diagnostics="off"),
        "official": LoraDAConfig.official(diagnostics="off", layers_per_pass=None),
    }
    groups = layer_passes(list(targets), args.layers_per_group)  # bounds memory (2 runs held)
    for name, cfg in configs.items():
        start = time.time()
        rel = dict.fromkeys(("Z", "Y", "G"), 0.0)
        angles, counts = [], None
        for names in groups:
            sub = {n: targets[n] for n in names}
            a = collect_statistics(model, left, sub, cfg, progress=False)
            b = collect_statistics(model, right, sub, cfg, progress=False)
            counts = ([a.tokens, b.tokens], [a.loss_tokens, b.loss_tokens])
            for k in rel:
                for n, ref in getattr(b, k).items():
                    diff = float((getattr(a, k)[n] - ref).norm() / ref.norm())
                    rel[k] = max(rel[k], diff)
            for n in sub:
                A_left = solve_layer(a, n, cfg, probe=False).A
                A_right = solve_layer(b, n, cfg, probe=False).A
                angles.append(float(principal_angles(A_left, A_right).max()))
            del a, b
            print(name, names[-1], max(angles), rel, file=sys.stderr, flush=True)
        angles.sort()
        out[name] = {
            "max_rel_diff_statistics": rel,
            "tokens_left_right": counts[0],
            "loss_tokens_left_right": counts[1],
            "A0_largest_angle_max": angles[-1],
            "A0_largest_angle_median": angles[len(angles) // 2],
            "layers": len(angles),
            "layers_above_1e-3_rad": sum(x > 1e-3 for x in angles),
            "seconds": time.time() - start,
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
