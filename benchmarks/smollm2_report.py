"""LoRA-DA on SmolLM2-135M-Instruct through the PEFT-native call, then ``lora-da report``.

    python benchmarks/smollm2_report.py --out /tmp/smollm2-lora-da [--texts 16] [--rank 8]

Loads the shipped SmolLM2 GGUF (``lora_da_ref.real.load_smollm2``), takes the first ``--texts``
HumanEval train problems (prompt + canonical solution, loss on the solution only), wraps the model
with ``LoraConfig(r, lora_alpha=16, use_rslora=True, target_modules="all-linear")`` and runs
``initialize_lora_da_weights`` (official preset), saves the adapter and the state, then prints
``lora-da report OUT`` (its exit status is this script's) and a JSON line with the timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--texts", type=int, default=16, help="HumanEval train problems")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--max-length", type=int, default=512, help="truncate sequences (tokens)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--preset", choices=("official", "paper"), default="official", help="preset")
    p.add_argument(
        "--target-modules", nargs="+", default=["all-linear"], help="LoraConfig target_modules"
    )
    args = p.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    from lora_da_ref.cli.main import PRESETS
    from lora_da_ref.cli.main import main as lora_da
    from lora_da_ref.data import right_pad
    from lora_da_ref.real import humaneval, load_smollm2, tokenize_humaneval
    from lora_da_ref.torch import initialize_lora_da_weights, save_lora_da_state

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(torch.float32)
    model.to(args.device)
    records = humaneval("train")[: args.texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = tokenize_humaneval(records, tokenizer, max_length=args.max_length)
    batches = [right_pad([e], pad) for e in examples]
    targets = (
        args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    )
    preset = PRESETS[args.preset]  # the LoraConfig scaling the preset is meant to start at
    alpha = float(args.rank) if preset.lora_alpha is None else preset.lora_alpha
    lora = LoraConfig(
        r=args.rank, lora_alpha=alpha, use_rslora=preset.use_rslora, target_modules=targets,
        lora_dropout=0.0, task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = get_peft_model(model, lora)
    t1 = time.perf_counter()
    state = initialize_lora_da_weights(
        peft_model, batches, args.preset, progress=False,
        data_description=f"HumanEval train, first {len(records)} problems, max_length "
        f"{args.max_length}, loss on the canonical solution",
    )  # fmt: skip
    t2 = time.perf_counter()
    peft_model.save_pretrained(args.out)
    save_lora_da_state(args.out, state)
    status = lora_da(["report", args.out])
    timing = {
        "load_s": round(t1 - t0, 1),
        "init_s": round(t2 - t1, 1),
        "layers": len(state.factors),
        "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
        "report_exit_status": status,
    }
    print(json.dumps(timing))
    return status


if __name__ == "__main__":
    sys.exit(main())
