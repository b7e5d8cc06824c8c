"""What the heavy-rows rule costs: SmolLM2's statistics pass with and without it.

Usage: python benchmarks/heavy_rows_cost.py [--texts 16] [--repeats 2] [--out F.json]

SmolLM2-135M-Instruct (de-quantised, float32), the first ``--texts`` HumanEval problems (prompt
and solution, at most 512 tokens, batches of 4), every one of the 210 target projections in one
pass, the default preset's float32 statistics. The pass runs with
``statistics.HEAVY_ROW_RATIO = None`` (every product in float32) and with the library's ratio,
alternately, ``--repeats`` times each; the minimum of each is reported, with the number of rows the
rule found heavy (summed over the products that test for them: Z once per input group, G once per
module). Timings: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import precision as P  # the model and data loaders of the precision benchmark

from lora_da_ref.torch import LoraDAConfig, collect_statistics
from lora_da_ref.torch import statistics as S
from lora_da_ref.torch.init import find_target_modules


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model, tok = P.load_model()
    batches = P.make_batches(tok, P.humaneval_texts(args.texts), 4, 512)
    config = LoraDAConfig()
    targets = find_target_modules(model, config.target_modules)
    ratio = S.HEAVY_ROW_RATIO
    heavy_rows = 0
    find = S._heavy_rows

    def counting(x: torch.Tensor) -> torch.Tensor | None:
        nonlocal heavy_rows
        mask = find(x)
        heavy_rows += 0 if mask is None else int(mask.sum())
        return mask

    seconds: dict[str, list[float]] = {"off": [], "on": []}
    collect_statistics(model, batches[:1], targets, config, progress=False)  # warm-up
    for _ in range(args.repeats):
        for key, value in (("off", None), ("on", ratio)):
            S.HEAVY_ROW_RATIO = value
            S._heavy_rows = counting if value is not None else find
            heavy_rows = 0
            t0 = time.perf_counter()
            collect_statistics(model, batches, targets, config, progress=False)
            seconds[key].append(time.perf_counter() - t0)
            counted = heavy_rows
    S.HEAVY_ROW_RATIO, S._heavy_rows = ratio, find
    off, on = min(seconds["off"]), min(seconds["on"])
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    out = {
        "benchmark": "heavy_rows_cost",
        "texts": args.texts, "tokens": tokens, "batches": len(batches), "targets": len(targets),
        "ratio": ratio, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "pass_seconds_off": off, "pass_seconds_on": on, "on_over_off": on / off,
        "all_seconds": seconds,
        "heavy_rows_taken_in_float64": counted,
    }  # fmt: skip
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
