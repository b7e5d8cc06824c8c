"""apply_lora_da: PEFT orientation and scaling, the "subtract" offset, save/load, bad inputs.

Factors here are hand-made (orthonormal A, small random B), independent of the statistics code:
these tests check only the PEFT boundary (docs/equations.md, "Conventions": lora_A.weight = Aᵀ,
lora_B.weight = Bᵀ, forward adds s · x A B).
"""

from __future__ import annotations

import math

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lora_da_ref.torch import LoraFactors, apply_lora_da  # noqa: E402
from lora_da_ref.torch import adapter as adapter_mod  # noqa: E402
from lora_da_ref.torch.adapter import lora_modules  # noqa: E402
from lora_da_ref.torch.config import DEFAULT_TARGETS  # noqa: E402
from tests.report import allclose_report  # noqa: E402
from tests.tiny_models import make_tiny_llama  # noqa: E402

# PEFT 0.21 calls a transformers-5 deprecated property on every wrap; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

RANK = 4
N_LAYERS = 2
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
# Whole-model "subtract" check: each of the ~7 linear maps per decoder layer re-rounds its
# weights (W0 − s·AB is stored in the model dtype) and accumulates over d ≤ 64 terms (≈ √d ≈ 8
# eps of relative error with random signs); ×2 for attention softmax/RMSNorm amplification, so
# 7 · 8 · 2 ≈ 100 eps per decoder layer, relative to the largest logit.
SUBTRACT_RTOL_PER_LAYER = 100


def _peft(model, *, r=RANK, alpha=16, rslora=True, targets=DEFAULT_TARGETS, **kw):
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        use_rslora=rslora,
        lora_dropout=0.0,
        **kw,
    )
    return get_peft_model(model, cfg)


def _factors(peft_model, r=RANK, seed=1, scale=0.05) -> dict[str, LoraFactors]:
    """Orthonormal A (d_in, r) and B (r, d_out) with entries of the size of the base weights."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in lora_modules(peft_model).items():
        A, _ = torch.linalg.qr(torch.randn(layer.in_features, r, generator=gen))  # (d_in, r)
        B = scale * torch.randn(r, layer.out_features, generator=gen)  # (r, d_out)
        out[name] = LoraFactors(A=A, B=B, eigenvalues=torch.zeros(r))
    return out


def _inputs(seed=0, batch=2, length=11):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 280, (batch, length), generator=gen)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _flags(model) -> tuple:
    grads = tuple((n, p.requires_grad) for n, p in model.named_parameters())
    modes = tuple(m.training for m in model.modules())
    return grads, modes


def _assert_same_state(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"tensors changed: {changed[:5]}"


# ----------------------------------------------------------------------------- orientation, scaling


@pytest.mark.parametrize("rslora", [True, False])
def test_none_offset_layer_output_is_base_plus_s_xAB(rslora):
    """Per layer: peft_layer(x) − W0 x = s · x A B, with s = alpha/√r (rsLoRA) or alpha/r."""
    pm = _peft(make_tiny_llama(0), rslora=rslora)
    factors = _factors(pm)
    apply_lora_da(pm, factors)
    s_expected = 16 / math.sqrt(RANK) if rslora else 16 / RANK
    gen = torch.Generator().manual_seed(3)
    for name, layer in lora_modules(pm).items():
        A, B = factors[name].A, factors[name].B
        assert layer.scaling["default"] == pytest.approx(s_expected)
        x = torch.randn(5, layer.in_features, generator=gen)  # (n, d_in)
        with torch.no_grad():
            y0 = layer.get_base_layer()(x)  # (n, d_out) = x W0
            diff = layer(x) - y0
        delta = s_expected * (x.double() @ A.double() @ B.double())  # exact s·x A B
        # Higham: |fl(xAB) − xAB| ≤ γ_{d_in+r} |x||A||B|, plus 2 roundings of y0 + δ − y0.
        bound = s_expected * (x.abs() @ A.abs() @ B.abs()).double()
        tol = (layer.in_features + RANK) * EPS32 * bound + 2 * EPS32 * (y0.abs() + delta.abs())
        err = (diff.double() - delta).abs()
        assert (err <= tol).all(), (
            f"{name}: worst err {err.max():.3e}, tol there {tol.flatten()[err.argmax()]:.3e}"
        )
        # A check that can fail: forgetting the scaling (s ≠ 1 here) breaks it.
        assert not ((diff.double() - delta / s_expected).abs() <= tol).all()


def test_none_offset_model_equals_manually_merged_weights():
    """The PEFT model after apply('none') computes the plain model with W0ᵀ + s (A B)ᵀ."""
    x = _inputs()
    merged = make_tiny_llama(0, torch.float64)
    pm = _peft(make_tiny_llama(0, torch.float64))
    factors = _factors(pm)
    apply_lora_da(pm, factors)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, layer in lora_modules(pm).items():
            s = layer.scaling["default"]
            AB = factors[name].A.double() @ factors[name].B.double()  # (d_in, d_out)
            modules[name].weight += s * AB.T
        got, want = pm(x).logits, merged(x).logits
    scale = want.abs().max()
    tol = SUBTRACT_RTOL_PER_LAYER * N_LAYERS * EPS64 * scale
    allclose_report(got, want, rtol=0.0, atol=float(tol), name="logits vs merged model")
    base = make_tiny_llama(0, torch.float64)(x).logits
    assert (got - base).abs().max() > 1e3 * tol  # the adapter really moved the model


@pytest.mark.parametrize(
    ("dtype", "eps"), [(torch.float64, EPS64), (torch.float32, EPS32)], ids=["f64", "f32"]
)
def test_subtract_offset_leaves_logits_unchanged(dtype, eps):
    x = _inputs()
    model = make_tiny_llama(0, dtype)
    with torch.no_grad():
        ref = model(x).logits
    pm = _peft(model)
    apply_lora_da(pm, _factors(pm), offset="subtract")
    with torch.no_grad():
        got = pm(x).logits
    tol = SUBTRACT_RTOL_PER_LAYER * N_LAYERS * eps * ref.abs().max()
    allclose_report(got, ref, rtol=0.0, atol=float(tol), name="logits after subtract")


def test_subtract_offset_detects_wrong_sign():
    """A check that can fail: with the offset added instead of subtracted, logits move by ≫ tol."""
    x = _inputs()
    model = make_tiny_llama(0)
    with torch.no_grad():
        ref = model(x).logits
    pm = _peft(model)
    factors = _factors(pm)
    flipped = {n: LoraFactors(-f.A, f.B, f.eigenvalues) for n, f in factors.items()}
    apply_lora_da(pm, factors, offset="subtract")
    apply_lora_da(pm, flipped, offset="none")  # now base is W0 − sAB and the adapter adds −sAB
    with torch.no_grad():
        got = pm(x).logits
    tol = SUBTRACT_RTOL_PER_LAYER * N_LAYERS * EPS32 * ref.abs().max()
    assert (got - ref).abs().max() > 100 * tol


def test_writes_transposed_factors_and_keeps_flags():
    pm = _peft(make_tiny_llama(0))
    pm.train()
    flags = _flags(pm)
    factors = _factors(pm)
    apply_lora_da(pm, factors)
    assert _flags(pm) == flags
    for name, layer in lora_modules(pm).items():
        assert torch.equal(layer.lora_A["default"].weight, factors[name].A.T)
        assert torch.equal(layer.lora_B["default"].weight, factors[name].B.T)


def test_accepts_peft_prefixed_names_and_lora_model():
    pm = _peft(make_tiny_llama(0))
    factors = _factors(pm)
    prefixed = {f"base_model.model.{n}": f for n, f in factors.items()}
    apply_lora_da(pm.base_model, prefixed)  # a LoraModel, prefixed names
    for name, layer in lora_modules(pm).items():
        assert torch.equal(layer.lora_B["default"].weight, factors[name].B.T)


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_model_gets_factors_cast_to_layer_dtype(autocast):
    """PEFT keeps bf16 models' adapters in float32 unless autocast_adapter_dtype=False."""
    model = make_tiny_llama(0, torch.bfloat16)
    cfg = LoraConfig(r=RANK, lora_alpha=16, target_modules=list(DEFAULT_TARGETS), use_rslora=True)
    pm = get_peft_model(model, cfg, autocast_adapter_dtype=autocast)
    factors = _factors(pm)
    apply_lora_da(pm, factors, offset="subtract")
    want_dtype = torch.float32 if autocast else torch.bfloat16
    for name, layer in lora_modules(pm).items():
        w = layer.lora_A["default"].weight
        assert w.dtype == want_dtype
        assert torch.equal(w, factors[name].A.T.to(want_dtype))
        assert layer.get_base_layer().weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("offset", ["none", "subtract"])
def test_save_then_from_pretrained_gives_identical_lora_weights(tmp_path, offset):
    pm = _peft(make_tiny_llama(0))
    factors = _factors(pm)
    apply_lora_da(pm, factors, offset=offset)
    pm.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / "adapter")
    got = lora_modules(loaded)
    for name, layer in lora_modules(pm).items():
        for part in ("lora_A", "lora_B"):
            want = getattr(layer, part)["default"].weight
            assert torch.equal(getattr(got[name], part)["default"].weight, want), (name, part)
        assert got[name].scaling["default"] == layer.scaling["default"]


# ----------------------------------------------------------------------------- bad inputs


def _corrupt_last(factors, **change):
    """Break only the last factor, so a non-atomic implementation would already have written."""
    names = list(factors)
    last = factors[names[-1]]
    fields = {"A": last.A, "B": last.B, "eigenvalues": last.eigenvalues, **change}
    return {**factors, names[-1]: LoraFactors(**fields)}


def _bad_cases(factors):
    last = list(factors)[-1]
    f = factors[last]
    r = f.A.shape[1]
    nan_B = f.B.clone()
    nan_B[0, 0] = float("nan")
    return {
        "rank": (_corrupt_last(factors, A=f.A[:, : r - 1], B=f.B[: r - 1]), "rank mismatch"),
        "shape": (_corrupt_last(factors, A=torch.zeros(f.A.shape[0] + 1, r)), "shape mismatch"),
        "int_dtype": (_corrupt_last(factors, B=f.B.to(torch.int64)), "floating point"),
        "nonfinite": (_corrupt_last(factors, B=nan_B), "non-finite"),
        "missing_module": ({**factors, "model.layers.9.mlp.up_proj": f}, "has no LoRA layer"),
        "uncovered": ({k: v for k, v in factors.items() if k != last}, "have no factors"),
    }


@pytest.mark.parametrize(
    "case", ["rank", "shape", "int_dtype", "nonfinite", "missing_module", "uncovered"]
)
@pytest.mark.parametrize("offset", ["none", "subtract"])
def test_bad_factors_raise_and_leave_model_unchanged(case, offset):
    pm = _peft(make_tiny_llama(0))
    factors, message = _bad_cases(_factors(pm))[case]
    before, flags = _state(pm), _flags(pm)
    with pytest.raises(ValueError, match=message):
        apply_lora_da(pm, factors, offset=offset)
    _assert_same_state(before, pm)
    assert _flags(pm) == flags


def test_bad_offset_adapter_and_model_type():
    pm = _peft(make_tiny_llama(0))
    factors = _factors(pm)
    with pytest.raises(ValueError, match="offset must be one of"):
        apply_lora_da(pm, factors, offset="add")
    with pytest.raises(ValueError, match="no LoRA layers with adapter 'other'"):
        apply_lora_da(pm, factors, adapter_name="other")
    with pytest.raises(ValueError, match="factors is empty"):
        apply_lora_da(pm, {}, strict=False)
    with pytest.raises(TypeError, match="get_peft_model"):
        apply_lora_da(make_tiny_llama(0), factors)


def test_rank_mismatch_with_peft_config_names_both_ranks():
    pm = _peft(make_tiny_llama(0), r=RANK)
    factors = _factors(pm, r=RANK + 2)
    with pytest.raises(ValueError, match=rf"rank {RANK + 2} .* r={RANK}"):
        apply_lora_da(pm, factors)


def test_strict_false_leaves_other_layers_at_peft_default():
    pm = _peft(make_tiny_llama(0))
    factors = _factors(pm)
    keep = next(iter(factors))
    before = _state(pm)
    apply_lora_da(pm, {keep: factors[keep]}, strict=False)
    after = pm.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert len(changed) == 2 and all(keep in k for k in changed)


def test_dora_is_rejected():
    pm = _peft(make_tiny_llama(0), use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        apply_lora_da(pm, _factors(pm))


def test_failure_during_write_phase_rolls_back(monkeypatch):
    """Fault injection: an error after some layers were written restores them (LoRA exactly)."""
    pm = _peft(make_tiny_llama(0))
    before = _state(pm)
    calls = {"n": 0}
    real = adapter_mod._OFFSETS["subtract"]

    def flaky(w, sign):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure")
        real(w, sign)

    monkeypatch.setitem(adapter_mod._OFFSETS, "subtract", flaky)
    factors = _factors(pm)
    with pytest.raises(RuntimeError, match="injected"):
        apply_lora_da(pm, factors, offset="subtract")
    after = pm.state_dict()
    layers = lora_modules(pm)
    for k, v in before.items():
        if "lora_" in k or "base_layer" not in k:
            assert torch.equal(after[k], v), k
            continue
        name = k.removeprefix("base_model.model.").removesuffix(".base_layer.weight")
        s = layers[name].scaling["default"]
        delta = s * (factors[name].A @ factors[name].B).T  # (d_out, d_in)
        # Subtract, then add back: 2 roundings (unit roundoff eps/2) of values ≤ |W0| + |δ|.
        bound = EPS32 * (v.abs() + delta.abs()) + torch.finfo(v.dtype).tiny
        assert ((after[k] - v).abs() <= bound).all(), k
    assert calls["n"] == 4 + 3  # 3 layers written, then rolled back


# ----------------------------------------------------------------------------- guards


def test_subtract_twice_is_refused_and_none_after_it_is_allowed():
    x = _inputs()
    model = make_tiny_llama(0)
    with torch.no_grad():
        ref = model(x).logits
    pm = _peft(model)
    factors = _factors(pm)
    apply_lora_da(pm, factors, offset="subtract")
    before = _state(pm)
    with pytest.raises(ValueError, match="'subtract' was already applied"):
        apply_lora_da(pm, factors, offset="subtract")
    _assert_same_state(before, pm)
    apply_lora_da(pm, factors, offset="none")  # rewriting the adapter alone stays allowed
    with torch.no_grad():
        got = pm(x).logits
    tol = SUBTRACT_RTOL_PER_LAYER * N_LAYERS * EPS32 * ref.abs().max()
    allclose_report(got, ref, rtol=0.0, atol=float(tol), name="logits after refused 2nd subtract")


def test_rolled_back_subtract_can_be_applied_again(monkeypatch):
    pm = _peft(make_tiny_llama(0))
    factors = _factors(pm)
    real = adapter_mod._OFFSETS["subtract"]
    calls = {"n": 0}

    def flaky(w, sign):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        real(w, sign)

    monkeypatch.setitem(adapter_mod._OFFSETS, "subtract", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        apply_lora_da(pm, factors, offset="subtract")
    monkeypatch.setitem(adapter_mod._OFFSETS, "subtract", real)
    apply_lora_da(pm, factors, offset="subtract")  # the rollback cleared the marks


def _fingerprinted(peft_model, factors):
    for name, layer in lora_modules(peft_model).items():
        weight = layer.get_base_layer().weight
        factors[name].diagnostics[adapter_mod.FINGERPRINT_KEY] = adapter_mod.weight_fingerprint(
            weight
        )
    return factors


def test_factors_of_another_model_with_the_same_shapes_are_refused():
    own = _peft(make_tiny_llama(0))
    factors = _fingerprinted(own, _factors(own))
    apply_lora_da(own, factors)  # the model they were computed for: accepted
    other = _peft(make_tiny_llama(1))
    before = _state(other)
    with pytest.raises(ValueError, match="computed for a different model"):
        apply_lora_da(other, factors)
    _assert_same_state(before, other)
    # The same weights rounded to bfloat16 are the same model; scaled by 1.1 they are not.
    apply_lora_da(_peft(make_tiny_llama(0, torch.bfloat16)), factors)
    scaled = make_tiny_llama(0)
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(1.1)
    with pytest.raises(ValueError, match="different model"):
        apply_lora_da(_peft(scaled), factors)


def test_subtract_on_a_tied_weight_is_refused():
    model = make_tiny_llama(0)
    model.lm_head.weight = model.model.embed_tokens.weight  # tie (same shapes: vocab x hidden)
    pm = _peft(model, targets=("q_proj", "lm_head"))
    factors = _factors(pm)
    before = _state(pm)
    with pytest.raises(ValueError, match=r"lm_head: offset='subtract' on a tied weight.*embed"):
        apply_lora_da(pm, factors, offset="subtract")
    _assert_same_state(before, pm)
    apply_lora_da(pm, factors, offset="none")  # the base weights are untouched: allowed


@pytest.mark.parametrize("offset", ["none", "subtract"])
def test_non_finite_base_weight_names_the_parameter(offset):
    model = make_tiny_llama(0)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    pm = _peft(model)
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight .*non-finite"
    ):
        apply_lora_da(pm, _factors(pm), offset=offset)
