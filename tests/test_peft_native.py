"""PEFT-native LoRA-DA (EVA conventions): one LoraConfig, one call, a reusable saved state.

Checks that can fail: the one-call path gives bitwise the factors of the three-call path (so a
pass that saw the adapter instead of W0, a different seed, or another target set fails), PEFT's
own wrapping is the reference for which modules are targeted, and the saved state reloads
bitwise. Tiny offline LLaMA, a few seconds in all.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model

from lora_da_ref.data import TINY_TEXTS, tokenize_batches
from lora_da_ref.presets import PRESETS
from lora_da_ref.torch import (
    LoraDAConfig,
    LoraDAState,
    apply_lora_da,
    get_lora_da_state_dict,
    init_lora_da,
    initialize_lora_da_weights,
    load_lora_da_state,
    save_lora_da_state,
)
from lora_da_ref.torch.adapter import LiteralPresetWarning, lora_modules
from lora_da_ref.torch.config import preset_of
from lora_da_ref.torch.peft_init import (
    PROVENANCE_FILE,
    PresetScalingWarning,
    _peft_targets,
)
from tests.tiny_models import make_tiny_llama, make_tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

RANK = 4
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def batches():
    return tokenize_batches(make_tiny_tokenizer(), list(TINY_TEXTS), max_length=24)


def _lora(targets=None, *, alpha=16, rslora=True, **kw):
    return LoraConfig(
        r=RANK,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=SEVEN if targets is None else targets,
        lora_dropout=0.0,
        **kw,
    )


def _weights(pm, adapter="default"):
    return {
        name: (layer.lora_A[adapter].weight.detach().clone(), layer.lora_B[adapter].weight.clone())
        for name, layer in lora_modules(pm, adapter).items()
    }


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- same as 3 calls


@pytest.mark.parametrize("preset", ["official", "paper_literal"])
def test_one_call_equals_init_lora_da_plus_apply_bitwise(batches, preset):
    """PEFT's LoraConfig drives the one call; B starts random (init_lora_weights=False), so a
    statistics pass that ran through the adapter instead of the base weights W0 would differ."""
    alpha, rslora = (16, True) if preset == "official" else (RANK, False)
    want = make_tiny_llama(0)
    factors = init_lora_da(want, batches, LoraDAConfig.preset(preset, rank=RANK), progress=False)
    ref = get_peft_model(want, _lora(alpha=alpha, rslora=rslora))
    apply_lora_da(ref, factors)

    pm = get_peft_model(
        make_tiny_llama(0), _lora(alpha=alpha, rslora=rslora, init_lora_weights=False)
    )
    assert any(
        bool(l.lora_B["default"].weight.detach().abs().max() > 0) for l in lora_modules(pm).values()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", PresetScalingWarning)  # matching scaling: no warning
        state = initialize_lora_da_weights(pm, batches, preset, progress=False)
    got, expected = _weights(pm), _weights(ref)
    assert list(got) == list(expected) == list(state.layers)
    for name, (a, b) in expected.items():
        assert torch.equal(got[name][0], a), name
        assert torch.equal(got[name][1], b), name
    assert state.provenance["preset"] == preset
    # The PEFT model keeps its LoRA layers (the pass swapped them out and back).
    assert all(
        type(l).__name__ == "Linear" and hasattr(l, "lora_A") for l in lora_modules(pm).values()
    )


def test_state_dict_before_wrapping_equals_one_call_and_leaves_model_unchanged(batches):
    model = make_tiny_llama(0)
    before = _state(model)
    state = get_lora_da_state_dict(model, batches, _lora(), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    pm = get_peft_model(make_tiny_llama(0), _lora())
    direct = initialize_lora_da_weights(pm, batches, progress=False)
    for name, f in direct.factors.items():
        assert torch.equal(state.factors[name].A, f.A) and torch.equal(state.factors[name].B, f.B)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": "all-linear"},
        {"target_modules": r".*\.(q|v)_proj"},
        {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
        {"target_modules": "all-linear", "exclude_modules": ["o_proj"]},
    ],
    ids=["all-linear", "regex", "layers-to-transform", "exclude"],
)
def test_targets_before_wrapping_are_what_peft_wraps(kwargs):
    model = make_tiny_llama(0)
    cfg = LoraConfig(r=RANK, **kwargs)
    resolved = list(_peft_targets(model, cfg))
    wrapped = list(lora_modules(get_peft_model(make_tiny_llama(0), LoraConfig(r=RANK, **kwargs))))
    assert resolved == wrapped
    assert "lm_head" not in resolved


def test_rank_pattern_is_honoured(batches):
    cfg = _lora(rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 4})
    pm = get_peft_model(make_tiny_llama(0), cfg)
    state = initialize_lora_da_weights(pm, batches, progress=False)
    want = init_lora_da(
        make_tiny_llama(0), batches, LoraDAConfig(rank=2, target_modules=("q_proj",)),
        progress=False,
    )  # fmt: skip
    for name, layer in lora_modules(pm).items():
        r = 2 if name.endswith("q_proj") else RANK
        assert state.factors[name].A.shape[1] == r and state.layers[name]["rank"] == r
        assert state.layers[name]["scaling"] == layer.scaling["default"]
        if r == 2:
            assert torch.equal(layer.lora_A["default"].weight, want[name].A.T)
    assert state.layers["model.layers.0.mlp.down_proj"]["scaling"] == pytest.approx(4 / 2)


def test_rank_pattern_costs_one_statistics_pass(batches):
    """Three distinct ranks, one pass over the batches (counted by a forward hook on the
    embeddings): the statistics do not depend on r. The factors are those of one init per rank,
    bit for bit."""
    pattern = {"q_proj": 2, "down_proj": 3}
    model = make_tiny_llama(0)
    forwards = []
    hook = model.model.embed_tokens.register_forward_hook(lambda *_: forwards.append(1))
    try:
        state = get_lora_da_state_dict(model, batches, _lora(rank_pattern=pattern), progress=False)
    finally:
        hook.remove()
    assert len(forwards) == len(batches), f"{len(forwards)} forwards for {len(batches)} batches"
    names = {r: [n for n in state.factors if state.layers[n]["rank"] == r] for r in (2, 3, RANK)}
    assert all(names.values()), names
    for r, group in names.items():
        config = LoraDAConfig(rank=r, target_modules=tuple(group))
        want = init_lora_da(make_tiny_llama(0), batches, config, progress=False)
        for name in group:
            got = state.factors[name]
            assert got.A.shape[1] == r
            assert torch.equal(got.A, want[name].A) and torch.equal(got.B, want[name].B), name


# ----------------------------------------------------------------------------- presets


def test_preset_scaling_mismatch_warns_with_the_effective_scale(batches):
    pm = get_peft_model(make_tiny_llama(0), _lora(alpha=16, rslora=False))
    with pytest.warns(PresetScalingWarning, match=r"s = 8 at r = 4.*gives s = 4 on 14 of 14"):
        initialize_lora_da_weights(pm, batches, "official", progress=False)
    pm = get_peft_model(make_tiny_llama(0), _lora(alpha=16, rslora=True))
    with pytest.warns(PresetScalingWarning, match=r"lora_alpha = r \(s = 1\).*gives s = 8"):
        initialize_lora_da_weights(pm, batches, "paper_literal", progress=False)


def test_preset_detection_and_intended_scaling():
    assert preset_of(LoraDAConfig.official(rank=16, n_train=5000, seed=3)) == "official"
    assert preset_of(LoraDAConfig.official(layers_per_pass=8, diagnostics="full")) == "official"
    assert preset_of(LoraDAConfig.paper_literal()) == "paper_literal"
    assert preset_of(LoraDAConfig(rank=4)) == "default"
    assert preset_of(LoraDAConfig.official(variance_weight=0.5)) is None  # custom: no warning
    assert PRESETS["official"].scaling(4) == 8.0 and PRESETS["default"].scaling(4) == 8.0
    assert PRESETS["paper_literal"].scaling(4) == 1.0


def test_official_preset_is_the_official_yaml():
    """The official preset spells out conf/lora_da.yaml (docs/equations.md, "Official code"),
    whatever the defaults become: catches a default changed under the official preset's feet."""
    c = LoraDAConfig.official()
    yaml = dict(
        variance_weight=0.03, bias_weight=1.0, output_factor="diagonal", damping=1e-6,
        damping_scale="absolute", normalize_delta=True, scale_gamma=1024.0, solver="lobpcg",
        solver_options={"niter": 10, "official": True}, token_mask="attention",
        score_scale="batch", gradient_weight="sequence", n_train=100_000, estimator="plugin",
    )  # fmt: skip
    assert {k: getattr(c, k) for k in yaml} == yaml


def test_default_is_the_official_objective_with_robust_numerics():
    """LoraDAConfig() is the official objective and scaling with relative damping and the "auto"
    solver (eigh below the crossover, the certified solver from there)."""
    default, official = LoraDAConfig(), LoraDAConfig.official()
    numerics = {"damping", "damping_scale", "solver", "solver_options"}
    for f in dataclasses.fields(LoraDAConfig):
        if f.name not in numerics:
            assert getattr(default, f.name) == getattr(official, f.name), f.name
    assert (default.damping_scale, default.solver) == ("relative", "auto")
    with pytest.raises(ValueError, match="'paper' is now 'paper_literal'"):
        LoraDAConfig.preset("paper")


# ----------------------------------------------------------------------------- save / load


def test_saved_state_reproduces_the_adapter_bitwise(batches, tmp_path):
    state = get_lora_da_state_dict(
        make_tiny_llama(0), batches, _lora(), "official", progress=False,
        data_description="5 tiny texts",
    )  # fmt: skip
    save_lora_da_state(tmp_path / "state", state)
    loaded = load_lora_da_state(tmp_path / "state")
    assert list(loaded.factors) == list(state.factors)
    assert loaded.provenance["data"]["description"] == "5 tiny texts"
    assert set(loaded.provenance["versions"]) >= {"torch", "peft", "transformers", "lora_da_ref"}
    first = get_peft_model(make_tiny_llama(0), _lora())
    initialize_lora_da_weights(first, lora_da_state=state)
    second = get_peft_model(make_tiny_llama(0), _lora())
    initialize_lora_da_weights(second, lora_da_state=loaded)
    for name, (a, b) in _weights(first).items():
        assert torch.equal(_weights(second)[name][0], a) and torch.equal(
            _weights(second)[name][1], b
        )


def test_state_of_another_model_with_the_same_shapes_is_refused(batches):
    state = get_lora_da_state_dict(make_tiny_llama(0), batches, _lora(), progress=False)
    pm = get_peft_model(make_tiny_llama(1), _lora())  # same shapes, other weights
    before = _state(pm)
    with pytest.raises(ValueError, match="computed for a different model"):
        initialize_lora_da_weights(pm, lora_da_state=state)
    assert all(torch.equal(before[k], v) for k, v in pm.state_dict().items())
    # The same weights in bfloat16 are the same model (fingerprint within rounding).
    pm16 = get_peft_model(make_tiny_llama(0, torch.bfloat16), _lora())
    initialize_lora_da_weights(pm16, lora_da_state=state)


# ----------------------------------------------------------------------------- training


def test_trainer_save_load_and_merge(batches, tmp_path):
    from transformers import Trainer, TrainingArguments

    pm = get_peft_model(make_tiny_llama(0), _lora(task_type="CAUSAL_LM"))
    state = initialize_lora_da_weights(pm, batches, progress=False)
    start = _weights(pm)
    rows = [{k: v[0] for k, v in b.items()} for b in batches]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=1,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
        disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=pm, args=args, train_dataset=rows).train()
    moved = _weights(pm)
    assert any(not torch.equal(moved[n][1], start[n][1]) for n in start), "training moved nothing"
    pm.save_pretrained(tmp_path / "adapter")
    save_lora_da_state(tmp_path / "adapter", state)
    assert json.loads((tmp_path / "adapter" / PROVENANCE_FILE).read_text())["preset"] == "default"
    x = batches[0]["input_ids"]
    pm.eval()
    loaded = PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / "adapter").eval()
    with torch.no_grad():
        want = pm(input_ids=x).logits
        assert torch.equal(loaded(input_ids=x).logits, want)
        merged = loaded.merge_and_unload()
        got = merged(input_ids=x).logits
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    # Merging re-rounds each W0 + s·BA once in float32: ≈ 1e-6 relative to the logits' scale.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_named_and_leave_the_model_unchanged(batches):
    pm = get_peft_model(make_tiny_llama(0), _lora())
    before = _state(pm)
    with pytest.raises(ValueError, match="exactly one of dataloader and lora_da_state"):
        initialize_lora_da_weights(pm)
    with pytest.raises(ValueError, match="unknown LoRA-DA preset"):
        initialize_lora_da_weights(pm, batches, "fancy")
    with pytest.raises(TypeError, match="not a single dict"):
        initialize_lora_da_weights(pm, batches[0], progress=False)
    with pytest.raises(TypeError, match="LoraDAState"):
        initialize_lora_da_weights(pm, lora_da_state={"a": 1})
    with pytest.raises(RuntimeError, match="boom"):  # an error inside the pass ...

        def loss_fn(model, batch):
            raise RuntimeError("boom")

        initialize_lora_da_weights(pm, batches, loss_fn=loss_fn, progress=False)
    assert len(lora_modules(pm)) == 14  # ... leaves the LoRA layers in place
    assert all(torch.equal(before[k], v) for k, v in pm.state_dict().items())
    model = make_tiny_llama(0)
    with pytest.raises(TypeError, match=r"peft\.LoraConfig"):
        get_lora_da_state_dict(model, batches, {"r": 4})
    with pytest.raises(ValueError, match="DoRA"):
        get_lora_da_state_dict(model, batches, _lora(use_dora=True))
    with pytest.raises(ValueError, match=r"embed_tokens.*nn\.Linear"):
        get_lora_da_state_dict(model, batches, LoraConfig(r=RANK, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="matches no module"):
        get_lora_da_state_dict(model, batches, LoraConfig(r=RANK, target_modules=["nope"]))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has non-finite"):
        get_lora_da_state_dict(model, batches, _lora())


def test_state_is_exported_and_typed(batches):
    state = get_lora_da_state_dict(make_tiny_llama(0), batches, _lora(["q_proj"]), progress=False)
    assert isinstance(state, LoraDAState)
    assert list(state.layers) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert state.provenance["config"]["target_modules"] == list(state.layers)


@pytest.mark.parametrize("targets", [SEVEN, "all-linear"])
def test_init_lora_da_refuses_a_peft_model_and_leaves_it_unchanged(batches, targets):
    """Before this guard, suffix targets raised 'not nn.Linear' and "all-linear" silently skipped
    the wrapped layers (their statistics would also have seen the adapter)."""
    pm = get_peft_model(make_tiny_llama(), _lora())
    before = _state(pm)
    with pytest.raises(TypeError, match="initialize_lora_da_weights"):
        init_lora_da(pm, batches, LoraDAConfig(rank=RANK, target_modules=targets), progress=False)
    after = _state(pm)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- the one default


def _mean_loss(model, batches) -> float:
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in batches) / len(batches)


@pytest.fixture(scope="module")
def fitted_state(batches):
    """A tiny LLaMA fitted for 8 epochs to the texts (loss 5.7 → about 3): a random model sits at
    the uniform loss log(vocab), where even B0 of norm 1e4 hardly moves the loss."""
    torch.manual_seed(0)
    model = make_tiny_llama(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(8):
        for b in batches:
            opt.zero_grad()
            model(**b).loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fitted(state):
    model = make_tiny_llama(0)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("entry", ["init_lora_da", "initialize_lora_da_weights"])
def test_default_keeps_the_step0_loss_and_the_literal_preset_does_not(batches, fitted_state, entry):
    """Both entry points default to the same config (the ``default`` preset), which starts within
    2 % of the base model's loss with offset "none" (B0 σ-normalised and γ-scaled, rsLoRA 16/√r);
    Algorithm 1 as printed (``paper_literal``, alpha = r) moves it by far more (measured: 3.1 →
    6.0) and warns; with offset "subtract" it starts at the base loss. Catches a default that
    reverts to the literal reading, an entry point with its own default, a lost warning."""
    base = _mean_loss(_fitted(fitted_state), batches)
    losses = {}
    for preset in ("default", "paper_literal"):
        p = PRESETS[preset]
        alpha = RANK if p.lora_alpha is None else p.lora_alpha
        pm = get_peft_model(_fitted(fitted_state), _lora(alpha=alpha, rslora=p.use_rslora))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if entry == "init_lora_da":
                cfg = LoraDAConfig.preset(preset, rank=RANK)
                apply_lora_da(pm, init_lora_da(_fitted(fitted_state), batches, cfg, progress=False))
            else:  # no config: the entry point's own default
                config = None if preset == "default" else preset
                initialize_lora_da_weights(pm, batches, config, progress=False)
        literal = [w for w in caught if issubclass(w.category, LiteralPresetWarning)]
        assert bool(literal) == (preset == "paper_literal"), [str(w.message) for w in caught]
        losses[preset] = _mean_loss(pm, batches)
    assert abs(losses["default"] / base - 1) < 0.02, (losses, base)
    assert abs(losses["paper_literal"] / base - 1) > 0.02, (losses, base)
    pm = get_peft_model(_fitted(fitted_state), _lora(alpha=RANK, rslora=False))
    initialize_lora_da_weights(pm, batches, "paper_literal", offset="subtract", progress=False)
    assert _mean_loss(pm, batches) == pytest.approx(base, rel=1e-5)
    if entry == "init_lora_da":  # no config: LoraDAConfig(), the same default
        plain = init_lora_da(make_tiny_llama(0), batches, progress=False)
        ref = init_lora_da(make_tiny_llama(0), batches, LoraDAConfig(), progress=False)
        assert all(torch.equal(plain[n].A, ref[n].A) for n in ref)
