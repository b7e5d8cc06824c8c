"""Memory of LoRA-DA's statistics at LLaMA-2 scale; prints JSON.

Usage: python benchmarks/memory_plan.py [--no-measure] [--tokens 64]

* ``computed``: bytes of the statistics pass's running sums (:mod:`lora_da_ref.torch.memory`)
  per layer type and for the whole stack of LLaMA-2-7B (32 layers, hidden 4096, MLP 11008) and
  -13B (40 layers, 5120, 13824), all seven projections, from shapes only (no weights): the
  default/paper config (full Y), the official one (diagonal Y), each with and without the
  split-half gradient of the calibration diagnostics; ``layers_per_pass`` for a 24 GiB and an
  80 GiB budget.
* ``measured``: ONE 7B-shaped ``LlamaDecoderLayer`` (random float32 weights, ~0.8 GB) on CPU, a
  regression loss on random inputs (1 × ``--tokens`` positions), the official config (diagonal
  Y, so it fits next to other jobs in 24 GiB): the bytes the pass holds (sum of the returned
  tensors) against the plan, and the peak resident-set growth over the pass (sampled every
  2 ms from /proc/self/statm; includes activations and transient products).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

from lora_da_ref.torch.config import LoraDAConfig
from lora_da_ref.torch.memory import plan_layers_per_pass, statistics_bytes
from lora_da_ref.torch.statistics import RUNNING_SUM_DTYPE, accumulate_statistics

SHAPES = {"llama2-7b": (32, 4096, 11008), "llama2-13b": (40, 5120, 13824)}
GIB = 2**30


def llama_shapes(layers: int, hidden: int, mlp: int) -> dict[str, tuple[int, int]]:
    per_layer = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, mlp),
        "mlp.up_proj": (hidden, mlp),
        "mlp.down_proj": (mlp, hidden),
    }
    return {f"model.layers.{i}.{k}": v for i in range(layers) for k, v in per_layer.items()}


CONFIGS = {
    "paper_full_Y": LoraDAConfig.paper_literal(diagnostics="off"),
    "paper_full_Y+diagnostics": LoraDAConfig.paper_literal(),
    "official_diagonal_Y": LoraDAConfig.official(diagnostics="off"),
    "official_diagonal_Y+diagnostics": LoraDAConfig.official(),
}


def computed() -> dict[str, object]:
    out: dict[str, object] = {}
    for model, (layers, hidden, mlp) in SHAPES.items():
        shapes = llama_shapes(layers, hidden, mlp)
        rows = {}
        for cname, cfg in CONFIGS.items():
            per_module = statistics_bytes(shapes, cfg)
            layer0 = {n.split(".", 3)[3]: b for n, b in per_module.items() if ".layers.0." in n}
            rows[cname] = {
                "per_module_layer0_bytes": {
                    k: {"Z": b.Z, "Y": b.Y, "G": b.G, "total": b.total} for k, b in layer0.items()
                },
                "per_layer_GB": sum(b.total for b in layer0.values()) / 1e9,
                "stack_GB": sum(b.total for b in per_module.values()) / 1e9,
                "layers_per_pass_24GiB": _plan(shapes, cfg, 24 * GIB),
                "layers_per_pass_80GiB": _plan(shapes, cfg, 80 * GIB),
            }
        out[model] = rows
    return out


def _plan(shapes, cfg, budget) -> int | None:
    try:
        return plan_layers_per_pass(shapes, cfg.replace(layers_per_pass=None), budget)
    except ValueError:
        return None


class _Layer(torch.nn.Module):
    def __init__(self, hidden: int, mlp: int) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        super().__init__()
        cfg = LlamaConfig(
            hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=1,
            num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32,
        )  # fmt: skip
        cfg._attn_implementation = "eager"
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1])[None]
        return self.layer(x, position_embeddings=self.rotary(x, pos))


def _loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return 0.5 * ((model(batch["x"]) - batch["y"]) ** 2).sum(-1).mean()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(tokens: int) -> dict[str, object]:
    _, hidden, mlp = SHAPES["llama2-7b"]
    torch.manual_seed(0)
    model = _Layer(hidden, mlp).eval()
    gen = torch.Generator().manual_seed(0)
    batch = {
        "x": torch.randn(1, tokens, hidden, generator=gen),
        "y": torch.randn(1, tokens, hidden, generator=gen),
        "attention_mask": torch.ones(1, tokens),
    }
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    targets = {n: m for n, m in model.named_modules() if n.endswith(names)}
    cfg = LoraDAConfig.official(label_shift=0, diagnostics="off")
    plan = sum(b.total for b in statistics_bytes(targets, cfg).values())
    base, peak, stop = _rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    sums = accumulate_statistics(model, [batch], targets, cfg, loss_fn=_loss, progress=False)
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    held = sum(
        t.numel() * t.element_size() for k in ("Z", "Y", "G") for t in getattr(sums, k).values()
    )
    return {
        "shape": {"hidden": hidden, "mlp": mlp, "tokens": tokens},
        "config": "official (diagonal Y), diagnostics='off'",
        "planned_bytes": plan,
        "held_bytes": held,
        "held_equals_plan": held == plan,
        "peak_rss_growth_bytes": peak[0] - base,
        "peak_over_plan": (peak[0] - base) / plan,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-measure", action="store_true", help="shapes only")
    parser.add_argument("--tokens", type=int, default=64, help="positions in the measured pass")
    args = parser.parse_args()
    out = {
        "running_sum_dtype": str(RUNNING_SUM_DTYPE),
        "computed": computed(),
    }
    if not args.no_measure:
        out["measured_one_7b_layer"] = measured(args.tokens)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
