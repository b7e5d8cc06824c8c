"""Inputs as Hugging Face users bring them (issue 12, "Inputs"): target modules written as in
PEFT, padding side, ``BatchEncoding`` / ``DataLoader`` batches, batch grouping, gradient
checkpointing."""

from __future__ import annotations

import pytest

from lora_da_ref.torch import LoraDAConfig
from lora_da_ref.torch.targets import find_target_modules
from tests.torch_cases import LLAMA_TARGETS, single_thread, tiny_llama  # noqa: F401

# ----------------------------------------------------------------------------- target modules


def _peft_targets(model, target_modules) -> set[str]:
    """The module names PEFT itself wraps for ``LoraConfig(target_modules=...)`` (the oracle)."""
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=target_modules))
    prefix = "base_model.model."
    return {n.removeprefix(prefix) for n in wrapped.targeted_module_names}


@pytest.mark.parametrize(
    "spec",
    [
        "all-linear",
        "ALL-LINEAR",
        r".*\.(q_proj|v_proj)",
        r"model\.layers\.1\.mlp\..*_proj",
        ["q_proj", "down_proj"],
    ],
)
def test_target_modules_match_peft(spec):
    """The same names as PEFT's LoraConfig for the list, regex and 'all-linear' forms."""
    ours = set(find_target_modules(tiny_llama(), spec))
    assert ours == _peft_targets(tiny_llama(), spec)
    if spec in ("all-linear", "ALL-LINEAR"):
        assert len(ours) == 2 * len(LLAMA_TARGETS) and "lm_head" not in ours


def test_target_modules_order_and_config_roundtrip():
    model = tiny_llama()
    names = list(find_target_modules(model, "all-linear"))
    order = [n for n, _ in model.named_modules()]
    assert names == sorted(names, key=order.index)
    assert LoraDAConfig(target_modules="all-linear").target_modules == "all-linear"
    assert LoraDAConfig(target_modules=["q_proj"]).target_modules == ("q_proj",)


def test_target_modules_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"full-matches no module.*pass a list"):
        find_target_modules(model, "q_proj")  # a str is a regex on the full name (PEFT)
    with pytest.raises(ValueError, match=r"only nn\.Linear"):
        find_target_modules(model, r".*\.mlp")  # LlamaMLP, a container
    with pytest.raises(ValueError, match="does not compile"):
        find_target_modules(model, "(q_proj")
    with pytest.raises(ValueError, match="does not compile"):
        LoraDAConfig(target_modules="(q_proj")
    with pytest.raises(ValueError, match="'nope' matches no module"):
        find_target_modules(model, ["q_proj", "nope"])
    with pytest.raises(TypeError, match="target_modules must be"):
        find_target_modules(model, 3)


def test_all_linear_excludes_classifier_head():
    """A sequence-classification model has no output embeddings: its 'score' head is excluded."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=50, num_labels=3,
    )  # fmt: skip
    names = set(find_target_modules(LlamaForSequenceClassification(cfg), "all-linear"))
    assert "score" not in names and len(names) == len(LLAMA_TARGETS)
