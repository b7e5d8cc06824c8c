"""Small torch models and calibration batches for the torch-path tests (cases are data).

* ``tiny_llama``: a random ``LlamaForCausalLM`` (2 layers, hidden 48, GQA 4/2 heads, vocab 50);
* ``llama_batches``: padded, label-masked batches for it;
* ``TokenMLP`` + ``mlp_batches`` + ``mlp_loss``: a per-token ``nn.Sequential`` of Linear layers, where
  the per-token score is exactly ``∂ℓ_t/∂o_t`` and a per-token autograd loop is the ground truth.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaCase:
    id: str
    hidden: int = 48
    intermediate: int = 88
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 50
    seed: int = 0


LLAMA_CASES = [LlamaCase("gqa"), LlamaCase("mha", hidden=32, kv_heads=4, seed=1)]


def tiny_llama(case: LlamaCase = LLAMA_CASES[0], dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=case.hidden,
        intermediate_size=case.intermediate,
        num_hidden_layers=case.layers,
        num_attention_heads=case.heads,
        num_key_value_heads=case.kv_heads,
        vocab_size=case.vocab,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(case.seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def llama_batches(
    n_batches: int = 3, batch: int = 2, seq: int = 10, vocab: int = 50, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches; the first 2 tokens of each sequence are a "prompt" (label -100)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        attention = torch.ones_like(ids)
        attention[-1, seq - 1 - b :] = 0  # a different padding length per batch
        labels = ids.masked_fill(attention == 0, -100)
        labels[:, :2] = -100
        out.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return out


class TokenMLP(nn.Sequential):
    """Linear–Tanh–Linear–Tanh–Linear acting on each token independently."""

    def __init__(self, dims: tuple[int, ...] = (6, 8, 7, 5), seed: int = 0) -> None:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.Tanh())
        super().__init__(*layers)


def mlp_batches(
    n_batches: int = 3, batch: int = 2, seq: int = 5, d_in: int = 6, classes: int = 5, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        inputs = torch.randn(batch, seq, d_in, generator=gen)
        labels = torch.randint(0, classes, (batch, seq), generator=gen)
        labels[0, : b + 1] = -100  # masked tokens, a different number per batch
        out.append({"inputs": inputs, "labels": labels})
    return out


def mlp_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's unmasked tokens (per-position labels: label_shift=0)."""
    logits = model(batch["inputs"].to(next(model.parameters()).dtype))  # (B, T, C)
    return nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
    )


def model_state(model: nn.Module) -> dict[str, object]:
    """Everything init must leave untouched: weights, grads, flags, modes and hooks."""
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: tuple(len(getattr(m, h)) for h in _HOOK_DICTS) for n, m in model.named_modules()
        },
    }


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_state_dict_hooks",
)


def assert_state_equal(before: dict[str, object], after: dict[str, object]) -> None:
    for key in ("requires_grad", "training", "hooks"):
        assert before[key] == after[key], f"{key} changed"
    for name, w in before["weights"].items():
        same = torch.allclose(w, after["weights"][name], rtol=0, atol=0, equal_nan=True)
        assert same, f"weight {name} changed"  # exact equality; NaN == NaN
    for name, g in before["grads"].items():
        other = after["grads"][name]
        assert (g is None) == (other is None), f"grad of {name} appeared/disappeared"
        assert g is None or torch.equal(g, other), f"grad of {name} changed"


class DecoderLayerModel(torch.nn.Module):
    """One ``LlamaDecoderLayer`` (bidirectional eager attention, rotary positions) on given vectors."""

    def __init__(self, hidden: int = 32, seed: int = 0) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        super().__init__()
        cfg = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=88,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=50,
        )
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(cfg)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(inputs.shape[1], device=inputs.device)[None].expand(
            inputs.shape[0], -1
        )
        return self.layer(inputs, position_embeddings=self.rotary(inputs, positions))


def decoder_batches(
    n_batches: int = 2, batch: int = 2, seq: int = 6, hidden: int = 32, seed: int = 0
):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, : b + 1] = 0  # tokens without loss (they still feed the others through attention)
        out.append(
            {
                "inputs": torch.randn(batch, seq, hidden, generator=gen),
                "targets": torch.randn(batch, seq, hidden, generator=gen),
                "attention_mask": mask,
            }
        )
    return out


def decoder_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the attention-mask tokens of ½‖out_t − target_t‖²."""
    dtype = next(model.parameters()).dtype
    out = model(batch["inputs"].to(dtype))
    per_token = 0.5 * ((out - batch["targets"].to(dtype)) ** 2).sum(-1)  # (B, T)
    mask = batch["attention_mask"].bool()
    return per_token[mask].mean()


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    spin-waiting made these tests ~10× slower (measured: init 0.8 s → 0.07 s). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
