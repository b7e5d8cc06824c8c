"""K-FAC statistics of the torch path == slow, obviously-correct autograd loops (float64)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from lora_da_ref.torch import LoraDAConfig, collect_statistics, find_target_modules, init_lora_da
from lora_da_ref.torch.memory import layer_passes
from lora_da_ref.torch.statistics import (
    ADD_CHUNK,
    _add_gram,
    accumulate_statistics,
    add_into,
    finalize,
    gram_panels,
    mirror_lower_,
    token_masks,
)
from tests.report import allclose_report
from tests.torch_cases import (
    LLAMA_CASES,
    LLAMA_TARGETS,
    DecoderLayerModel,
    TokenMLP,
    assert_state_equal,
    decoder_batches,
    decoder_loss,
    llama_batches,
    mlp_batches,
    mlp_loss,
    model_state,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_llama,
)

# float64 sums of a few hundred terms of size O(1..1e2): round-off ≈ 1e-16 · terms · magnitude.
F64_RTOL = 1e-10
F64_ATOL = 1e-12
# bf16 (8 significant bits) rounds to relative error ≤ U_BF16 = 2⁻⁹. A bf16 model's statistics
# differ from its float32 copy's through the roundings of the activations: each of the two factors
# of a second moment carries about one rounding per op boundary it passed (embedding, 2 layers
# forward, 2 back, the head: 2L + 2 = 6), so ≈ 2 · 6 · U_BF16 = 0.023. An error-propagation
# estimate, not a bound: measured worst 0.0103 (Y), 0.0084 (Z), 0.0099 (G).
U_BF16 = 2.0**-9
BF16_MODEL_RTOL = 2 * (2 * 2 + 2) * U_BF16
# Float32 accumulation: a bf16×bf16 product is exact in float32 (8 + 8 ≤ 24 bits), so a float32
# sum of n such terms is within γ_n = n·u/(1 − n·u), u = 2⁻²⁴, of the exact sum, elementwise and
# relative to the sum of the terms' magnitudes (Higham, Accuracy and Stability, eq. 3.5); the
# finalize division and the score scale add two roundings. Accumulating in bf16 instead breaks it
# by > 10³ (measured ≥ 4.7e4 · u against a bound of 45 · u).
U_F32 = 2.0**-24


def _cfg(**kw) -> LoraDAConfig:
    return LoraDAConfig.paper_literal(rank=2, dtype=torch.float64, **kw)


# --- ground truth: per-token loops -------------------------------------------------------------


def _capture(name, xs, outs):
    def hook(module, inputs, output):
        xs[name], outs[name] = inputs[0].detach(), output

    return hook


def _mlp_reference(model, batches, output_factor: str, score_scale: str):
    """Each unmasked token on its own: ℓ_t, x_t, s_t = ∂ℓ_t/∂o_t by autograd, in float64."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    Z = {n: 0 for n in linears}
    Y = {n: 0 for n in linears}
    G = {n: 0 for n in linears}
    count = 0
    for batch in batches:
        mask = batch["labels"] != -100
        for b, t in mask.nonzero().tolist():
            T_i = int(mask[b].sum())  # loss tokens of the position's own sequence (row b)
            xs, outs = {}, {}
            hooks = [m.register_forward_hook(_capture(n, xs, outs)) for n, m in linears.items()]
            logits = model(batch["inputs"][b, t].double())
            for h in hooks:
                h.remove()
            loss_t = torch.nn.functional.cross_entropy(logits[None], batch["labels"][b, t][None])
            names = list(linears)
            scores = torch.autograd.grad(loss_t, [outs[n] for n in names], retain_graph=True)
            wgrads = torch.autograd.grad(loss_t, [linears[n].weight for n in names])
            for n, s, gw in zip(names, scores, wgrads):
                s_y = s if score_scale == "token" else s / T_i  # "batch": ∂L_i/∂o_t
                Z[n] = Z[n] + torch.outer(xs[n], xs[n])
                Y[n] = Y[n] + (torch.outer(s_y, s_y) if output_factor == "full" else s_y**2)
                G[n] = G[n] + gw.T
            count += 1
    return {k: {n: v / count for n, v in d.items()} for k, d in (("Z", Z), ("Y", Y), ("G", G))}


def reference_positions(batch, cfg) -> tuple[torch.Tensor, int]:
    """Statistics positions P and loss-token count T_b, by a loop (independent of token_masks):
    position t is a loss token iff labels[t + label_shift] != -100 (no labels: attention mask);
    P = the loss tokens, or every attention-mask position (token_mask="attention")."""
    attention = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        loss_tokens = attention.bool().clone()
    else:
        loss_tokens = torch.zeros(labels.shape, dtype=torch.bool)
        for b in range(labels.shape[0]):
            for t in range(labels.shape[1] - cfg.label_shift):
                loss_tokens[b, t] = bool(labels[b, t + cfg.label_shift] != -100)
    if cfg.token_mask == "attention":
        positions = torch.ones_like(loss_tokens) if attention is None else attention.bool()
    else:
        positions = loss_tokens
    return positions, int(loss_tokens.sum())


def _llama_reference(model, batches, targets, loss_fn=None, cfg=None):
    """Whole sequences: s_t = T_b ∂L_b/∂o_t by autograd.grad; per-position loops for Z, Y."""
    loss_fn = (lambda m, b: m(**b).loss) if loss_fn is None else loss_fn
    cfg = _cfg() if cfg is None else cfg
    Z, Y, G, count, loss_count = {}, {}, {}, 0, 0
    for batch in batches:
        xs, outs = {}, {}
        hooks = [m.register_forward_hook(_capture(n, xs, outs)) for n, m in targets.items()]
        loss = loss_fn(model, batch)
        for h in hooks:
            h.remove()
        positions, T_b = reference_positions(batch, cfg)
        names = list(targets)
        # Differentiate L_b, then multiply by T_b: HF's eager attention runs softmax in float32
        # even in a float64 model, and float32 rounding is not scale-equivariant.
        scores = torch.autograd.grad(loss, [outs[n] for n in names], retain_graph=True)
        wgrads = torch.autograd.grad(loss, [targets[n].weight for n in names])
        for n, s, gw in zip(names, scores, wgrads):
            s = T_b * s
            G[n] = G.get(n, 0) + T_b * gw.T
            for b, t in positions.nonzero().tolist():
                Z[n] = Z.get(n, 0) + torch.outer(xs[n][b, t], xs[n][b, t])
                Y[n] = Y.get(n, 0) + torch.outer(s[b, t], s[b, t])
        count += int(positions.sum())
        loss_count += T_b
    return {
        "Z": {n: v / count for n, v in Z.items()},
        "Y": {n: v / count for n, v in Y.items()},
        "G": {n: v / loss_count for n, v in G.items()},
    }


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_factor", ["full", "diagonal"])
@pytest.mark.parametrize("score_scale", ["token", "batch"])
def test_mlp_statistics_equal_per_token_loop(output_factor, score_scale):
    model = TokenMLP().double()
    batches = mlp_batches()
    cfg = _cfg(
        target_modules=("0", "2", "4"),
        label_shift=0,
        output_factor=output_factor,
        score_scale=score_scale,
    )
    targets = find_target_modules(model, cfg.target_modules)
    stats = collect_statistics(model, batches, targets, cfg, loss_fn=mlp_loss, progress=False)
    ref = _mlp_reference(model, batches, output_factor, score_scale)
    for n in targets:
        allclose_report(
            stats.Z[stats.group_of[n]], ref["Z"][n], rtol=F64_RTOL, atol=F64_ATOL, name=f"Z {n}"
        )
        allclose_report(stats.Y[n], ref["Y"][n], rtol=F64_RTOL, atol=F64_ATOL, name=f"Y {n}")
        allclose_report(stats.G[n], ref["G"][n], rtol=F64_RTOL, atol=F64_ATOL, name=f"G {n}")
    assert (
        stats.tokens == stats.loss_tokens == sum(int((b["labels"] != -100).sum()) for b in batches)
    )


@pytest.mark.parametrize("case", LLAMA_CASES, ids=lambda c: c.id)
def test_llama_statistics_equal_autograd_loop(case):
    model = tiny_llama(case, torch.float64)
    batches = llama_batches(vocab=case.vocab)
    cfg = _cfg(target_modules=LLAMA_TARGETS)
    targets = find_target_modules(model, cfg.target_modules)
    stats = collect_statistics(model, batches, targets, cfg, progress=False)
    ref = _llama_reference(model, batches, targets)
    for n in targets:
        allclose_report(
            stats.Z[stats.group_of[n]], ref["Z"][n], rtol=F64_RTOL, atol=F64_ATOL, name=f"Z {n}"
        )
        allclose_report(stats.Y[n], ref["Y"][n], rtol=F64_RTOL, atol=F64_ATOL, name=f"Y {n}")
        allclose_report(stats.G[n], ref["G"][n], rtol=F64_RTOL, atol=F64_ATOL, name=f"G {n}")


def _token_weighted_grads(model, batches, targets, cfg, *, per_batch: bool, weights=None):
    """weight.grad.T of L = Σ_b w_b L_b / Σ_b w_b (w_b = T_b by default): one backward, or one
    per batch (L_b), summed."""
    twin = copy.deepcopy(model)
    T = [reference_positions(b, cfg)[1] for b in batches] if weights is None else weights
    if per_batch:
        grads = {n: 0 for n in targets}
        for t, b in zip(T, batches):
            twin.zero_grad()
            twin(**b).loss.backward()
            for n in targets:
                grads[n] = grads[n] + t / sum(T) * twin.get_submodule(n).weight.grad.T
        return grads
    loss = sum(t * twin(**b).loss for t, b in zip(T, batches)) / sum(T)
    loss.backward()
    return {n: twin.get_submodule(n).weight.grad.T for n in targets}


def test_decoder_layer_statistics_equal_autograd_loop():
    """A LlamaDecoderLayer alone, bidirectional attention, custom regression loss_fn."""
    model = DecoderLayerModel().double()
    batches = decoder_batches()
    cfg = _cfg(target_modules=LLAMA_TARGETS)
    targets = find_target_modules(model, cfg.target_modules)
    stats = collect_statistics(model, batches, targets, cfg, loss_fn=decoder_loss, progress=False)
    ref = _llama_reference(model, batches, targets, decoder_loss, cfg)
    assert len(stats.Z) == 4  # qkv, o, gate/up, down
    for n in targets:
        allclose_report(
            stats.Z[stats.group_of[n]], ref["Z"][n], rtol=F64_RTOL, atol=F64_ATOL, name=f"Z {n}"
        )
        allclose_report(stats.Y[n], ref["Y"][n], rtol=F64_RTOL, atol=F64_ATOL, name=f"Y {n}")
        allclose_report(stats.G[n], ref["G"][n], rtol=F64_RTOL, atol=F64_ATOL, name=f"G {n}")


def test_G_is_weight_grad_of_token_weighted_mean_loss_mlp():
    model = TokenMLP().double()
    batches = mlp_batches()
    cfg = _cfg(target_modules=("0", "2", "4"), label_shift=0)
    targets = find_target_modules(model, cfg.target_modules)
    stats = collect_statistics(model, batches, targets, cfg, loss_fn=mlp_loss, progress=False)
    T = [reference_positions(b, cfg)[1] for b in batches]
    twin = copy.deepcopy(model)
    (sum(t * mlp_loss(twin, b) for t, b in zip(T, batches)) / sum(T)).backward()
    for n in targets:
        grad = twin.get_submodule(n).weight.grad.T  # (d_in, d_out)
        allclose_report(stats.G[n], grad, rtol=F64_RTOL, atol=F64_ATOL, name=f"G {n}")


# HF's eager attention computes softmax in float32 even in a float64 model, and float32 rounding
# is not scale-equivariant: backpropagating T_b/ΣT·L_b instead of L_b then ×T_b/ΣT changes the
# result at float32 round-off (measured 1.1e-7 relative); 1e-6 = ~8 × float32 eps.
F32_SOFTMAX_RTOL = 1e-6


@pytest.mark.parametrize("per_batch", [True, False], ids=["per-batch", "one-backward"])
def test_G_is_weight_grad_of_token_weighted_mean_loss_llama(per_batch):
    model = tiny_llama(LLAMA_CASES[0], torch.float64)
    batches = llama_batches()
    cfg = _cfg(target_modules=LLAMA_TARGETS)
    targets = find_target_modules(model, cfg.target_modules)
    stats = collect_statistics(model, batches, targets, cfg, progress=False)
    grads = _token_weighted_grads(model, batches, targets, cfg, per_batch=per_batch)
    for n in targets:
        if per_batch:
            allclose_report(stats.G[n], grads[n], rtol=F64_RTOL, atol=F64_ATOL, name=f"G {n}")
        else:
            err = float((stats.G[n] - grads[n]).norm() / grads[n].norm())
            assert err < F32_SOFTMAX_RTOL, f"G {n}: relative error {err:.3g} >= {F32_SOFTMAX_RTOL}"


def test_G_sequence_weighting_is_the_official_estimate():
    """gradient_weight="sequence": G = the mean over sequences of each sequence's mean-loss
    gradient (the official estimate_gradient at batch size 1), whatever the batching: the
    reference runs every sequence on its own."""
    model = tiny_llama(LLAMA_CASES[0], torch.float64)
    batches = llama_batches(n_batches=3)
    batches[1] = {k: v[:1] for k, v in batches[1].items()}  # batch sizes 2, 1, 2
    cfg = _cfg(target_modules=LLAMA_TARGETS, gradient_weight="sequence")
    targets = find_target_modules(model, cfg.target_modules)
    stats = collect_statistics(model, batches, targets, cfg, progress=False)
    singles = [
        {k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))
    ]
    twin = copy.deepcopy(model)
    grads = {n: 0 for n in targets}
    for single in singles:  # batch size 1: HF's loss is the sequence's own mean loss L_i
        twin.zero_grad()
        twin(**single).loss.backward()
        for n in targets:
            grads[n] = grads[n] + twin.get_submodule(n).weight.grad.T / len(singles)
    token = collect_statistics(
        model, batches, targets, _cfg(target_modules=LLAMA_TARGETS), progress=False
    )
    for n in targets:
        # batch of 1 vs batched rows: HF's float32 softmax rounds differently (F32_SOFTMAX_RTOL)
        err = float((stats.G[n] - grads[n]).norm() / grads[n].norm())
        assert err < F32_SOFTMAX_RTOL, f"G {n}: relative error {err:.3g}"
        assert not torch.allclose(stats.G[n], token.G[n]), "weightings must differ on this data"


def test_shared_inputs_share_one_Z():
    model = tiny_llama()
    cfg = LoraDAConfig.paper_literal(rank=2, target_modules=LLAMA_TARGETS)
    stats = collect_statistics(
        model, llama_batches(), find_target_modules(model, LLAMA_TARGETS), cfg, progress=False
    )
    for layer in ("model.layers.0", "model.layers.1"):
        qkv = {stats.group_of[f"{layer}.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")}
        gate_up = {stats.group_of[f"{layer}.mlp.{p}"] for p in ("gate_proj", "up_proj")}
        assert qkv == {f"{layer}.self_attn.q_proj"} and gate_up == {f"{layer}.mlp.gate_proj"}
        assert stats.group_of[f"{layer}.self_attn.o_proj"] == f"{layer}.self_attn.o_proj"
    assert len(stats.Z) == 2 * 4  # one Z per (qkv, o, gate/up, down) per layer


def test_unshared_Z_is_the_same_as_shared():
    """Targeting k_proj alone gives k_proj its own Z, equal to the group's shared one."""
    model = tiny_llama()
    batches = llama_batches()
    cfg = LoraDAConfig.paper_literal(rank=2, target_modules=LLAMA_TARGETS)
    shared = collect_statistics(
        model, batches, find_target_modules(model, LLAMA_TARGETS), cfg, progress=False
    )
    alone = collect_statistics(
        model, batches, find_target_modules(model, ["k_proj"]), cfg, progress=False
    )
    name = "model.layers.1.self_attn.k_proj"
    assert alone.group_of[name] == name
    assert torch.equal(alone.Z[name], shared.Z[shared.group_of[name]])


def test_layers_per_pass_gives_identical_statistics():
    model = tiny_llama()
    batches = llama_batches()
    targets = find_target_modules(model, LLAMA_TARGETS)
    cfg = LoraDAConfig.paper_literal(rank=2)
    one = collect_statistics(model, batches, targets, cfg, progress=False)
    passes = layer_passes(list(targets), 1)
    assert len(passes) == 2
    parts = [
        collect_statistics(model, batches, {n: targets[n] for n in names}, cfg, progress=False)
        for names in passes
    ]
    for kind in ("Z", "Y", "G"):
        a = getattr(one, kind)
        b = {k: v for part in parts for k, v in getattr(part, kind).items()}
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{kind} {k} differs between 1 and 2 passes"


def test_layer_passes_grouping():
    names = ["model.layers.0.a", "model.layers.0.b", "model.layers.1.a", "model.layers.2.a", "head"]
    assert layer_passes(names, 2) == [names[:3], [names[3], names[4]]]
    assert layer_passes(names, None) == [names]
    assert layer_passes(["0", "2", "4"], 2) == [["0", "2"], ["4"]]


def test_bf16_model_gives_float32_statistics():
    """A bf16 model's statistics (float32) against its float32 copy's: the model's precision."""
    model = tiny_llama(dtype=torch.bfloat16)
    ref_model = tiny_llama(dtype=torch.float32)
    batches = llama_batches()
    cfg = LoraDAConfig.paper_literal(rank=2)
    targets = find_target_modules(model, LLAMA_TARGETS)
    stats = collect_statistics(model, batches, targets, cfg, progress=False)
    ref = collect_statistics(
        ref_model, batches, find_target_modules(ref_model, LLAMA_TARGETS), cfg, progress=False
    )
    for kind in ("Z", "Y", "G"):
        for k, v in getattr(stats, kind).items():
            # float32 per-batch products, float64 running sums (statistics.RUNNING_SUM_DTYPE)
            assert v.dtype == torch.float64 and bool(torch.isfinite(v).all()), f"{kind} {k}"
            err = float((v - getattr(ref, kind)[k]).norm() / getattr(ref, kind)[k].norm())
            assert err < BF16_MODEL_RTOL, f"{kind} {k}: bf16 vs float32 relative error {err:.3g}"


def model_activations(model, batch, targets):
    """The inputs x and output gradients g = ∂L_b/∂o of every target, in the model's dtype, by
    hooks of its own (``model(**batch).loss``); the model's parameters are restored."""
    xs, outs = {}, {}

    def capture(name):
        def hook(module, inputs, output):
            xs[name] = inputs[0].detach()
            if not output.requires_grad:  # frozen weights: make the output a leaf to differentiate
                output.requires_grad_(True)
            outs[name] = output

        return hook

    params = [p for p in model.parameters() if p.requires_grad]
    hooks = [m.register_forward_hook(capture(n)) for n, m in targets.items()]
    try:
        for p in params:
            p.requires_grad_(False)
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, [outs[n] for n in targets])
    finally:
        for h in hooks:
            h.remove()
        for p in params:
            p.requires_grad_(True)
    return xs, dict(zip(targets, grads))


def test_bf16_model_statistics_are_float32_sums_of_its_activations():
    """The accumulation alone: the bf16 model's own x and g, summed exactly (float64) here, vs the
    statistics; elementwise |error| ≤ γ_{n+2} · (the same sums of |terms|), n = number of summed
    terms (Z, Y: the statistics positions; G: every position), see U_F32."""
    model = tiny_llama(dtype=torch.bfloat16)
    batches = llama_batches()
    cfg = LoraDAConfig.paper_literal(rank=2)
    targets = find_target_modules(model, LLAMA_TARGETS)
    stats = collect_statistics(model, batches, targets, cfg, progress=False)
    sums = {kind: {n: 0.0 for n in targets} for kind in ("Z", "Za", "Y", "Ya", "G", "Ga")}
    count, terms_g = 0, 0
    for batch in batches:
        xs, gs = model_activations(model, batch, targets)
        P, T_b = reference_positions(batch, cfg)
        for n in targets:
            x, g = xs[n].double(), gs[n].double()  # exact copies of the bf16 values
            xP, sP = x[P], T_b * g[P]  # (|P_b|, d_in), scores (|P_b|, d_out)
            xa, ga = x.flatten(0, 1), g.flatten(0, 1)  # every position for G
            for kind, a, b in (("Z", xP, xP), ("Y", sP, sP), ("G", T_b * xa, ga)):
                sums[kind][n] = sums[kind][n] + a.T @ b
                sums[kind + "a"][n] = sums[kind + "a"][n] + a.abs().T @ b.abs()
        count += T_b
        terms_g += P.numel()
    assert stats.tokens == stats.loss_tokens == count

    def gamma(k: int) -> float:
        return (k + 2) * U_F32 / (1 - (k + 2) * U_F32)

    for n in targets:
        got = {"Z": stats.Z[stats.group_of[n]], "Y": stats.Y[n], "G": stats.G[n]}
        for kind, terms in (("Z", count), ("Y", count), ("G", terms_g)):
            err = (got[kind].double() - sums[kind][n] / count).abs()
            bound = gamma(terms) * sums[kind + "a"][n] / count
            worst = float((err / bound.clamp_min(1e-300)).max())
            assert worst <= 1.0, f"{kind} {n}: |error| = {worst:.3g} × the float32 bound"


def test_token_masks_shift_and_attention():
    batch = {
        "labels": torch.tensor([[-100, 5, 6, -100]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0]]),
    }
    positions, T = token_masks(batch, LoraDAConfig.paper_literal())
    assert positions.tolist() == [[True, True, False, False]] and T == 2  # position t predicts t+1
    positions, T = token_masks(batch, LoraDAConfig.paper_literal(label_shift=0))
    assert positions.tolist() == [[False, True, True, False]] and T == 2
    positions, T = token_masks(batch, LoraDAConfig.paper_literal(token_mask="attention"))
    assert positions.tolist() == [[True, True, True, False]] and T == 2
    positions, T = token_masks(
        {"attention_mask": batch["attention_mask"]}, LoraDAConfig.paper_literal()
    )
    assert positions.tolist() == [[True, True, True, False]] and T == 3
    # a batch with neither is refused once, by the batch check, before any pass (test_inputs.py)


def test_sums_then_finalize_is_the_seam():
    """finalize(sum of two shards' sums) == statistics of all the data (what an all-reduce does)."""
    model = tiny_llama(LLAMA_CASES[0], torch.float64)
    batches = llama_batches(n_batches=4)
    cfg = _cfg(target_modules=LLAMA_TARGETS)
    targets = find_target_modules(model, LLAMA_TARGETS)
    a = accumulate_statistics(model, batches[:2], targets, cfg, progress=False)
    b = accumulate_statistics(model, batches[2:], targets, cfg, progress=False)
    for kind in ("Z", "Y", "G", "G_odd"):
        for k, v in getattr(a, kind).items():
            v += getattr(b, kind)[k]
    a.tokens += b.tokens
    a.loss_tokens += b.loss_tokens
    a.gradient_weight += b.gradient_weight
    whole = collect_statistics(model, batches, targets, cfg, progress=False)
    merged = finalize(a)
    for kind in ("Z", "Y", "G"):
        for k, v in getattr(whole, kind).items():
            allclose_report(
                getattr(merged, kind)[k], v, rtol=F64_RTOL, atol=F64_ATOL, name=f"{kind} {k}"
            )


class _Boom(RuntimeError):
    pass


def _failing_loss(at: int, where: str):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == at and where == "before":
            raise _Boom("injected before forward")
        loss = model(**batch).loss
        if calls["n"] == at and where == "after":
            raise _Boom("injected after forward (hooks on live tensors)")
        return loss

    return loss_fn


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("layers_per_pass", [None, 1])
def test_exception_inside_the_pass_leaves_model_untouched(where, layers_per_pass):
    model = tiny_llama()
    # A non-trivial starting state: mixed requires_grad, mixed train/eval, an existing grad and hook.
    model.model.embed_tokens.weight.requires_grad_(False)
    model.train()
    model.model.layers[1].eval()
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    handle = model.model.layers[0].register_forward_hook(lambda *a: None)
    before = model_state(model)
    cfg = LoraDAConfig.paper_literal(rank=2, layers_per_pass=layers_per_pass)
    targets = find_target_modules(model, LLAMA_TARGETS)
    with pytest.raises(_Boom):
        if layers_per_pass is None:  # one pass
            collect_statistics(
                model, llama_batches(), targets, cfg, loss_fn=_failing_loss(2, where),
                progress=False,
            )  # fmt: skip
        else:  # the pipeline's passes, one per layer
            init_lora_da(
                model, llama_batches(), cfg, loss_fn=_failing_loss(2, where), progress=False
            )
    assert_state_equal(before, model_state(model))
    handle.remove()


def test_successful_pass_leaves_model_untouched():
    model = tiny_llama()
    model.train()
    before = model_state(model)
    collect_statistics(
        model,
        llama_batches(),
        find_target_modules(model, LLAMA_TARGETS),
        LoraDAConfig.paper_literal(),
        progress=False,
    )
    assert_state_equal(before, model_state(model))


def test_bad_losses_raise():
    model = tiny_llama()
    targets = find_target_modules(model, LLAMA_TARGETS)
    cfg = LoraDAConfig.paper_literal(rank=2)
    cases = {
        "non-finite loss": lambda m, b: m(**b).loss * float("nan"),
        "does not depend": lambda m, b: m(**b).loss.detach(),
        "scalar tensor": lambda m, b: m(**b).logits,
    }
    for message, loss_fn in cases.items():
        with pytest.raises(ValueError, match=message):
            collect_statistics(
                model, llama_batches(), targets, cfg, loss_fn=loss_fn, progress=False
            )
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in llama_batches()]
    with pytest.raises(ValueError, match="need 'labels'"):
        collect_statistics(model, no_labels, targets, cfg, progress=False)
    masked = [dict(b, labels=torch.full_like(b["labels"], -100)) for b in llama_batches()]
    with pytest.raises(ValueError, match="no unmasked tokens"):
        collect_statistics(model, masked, targets, cfg, progress=False)


def _live_tensors() -> int:
    import gc

    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.mark.parametrize("fail", [False, True], ids=["complete", "raises-mid-pass"])
def test_statistics_pass_does_not_leak_activations(fail):
    """Output-tensor hooks must not keep a hook → activation → autograd graph cycle alive.

    Such a cycle runs through C++ autograd nodes, so ``gc`` cannot free it: before the fix every
    call left ~26 tensors per batch alive (activations and the graph's saved tensors)."""
    model = tiny_llama()
    targets = find_target_modules(model, LLAMA_TARGETS)
    batches = llama_batches()
    cfg = LoraDAConfig.paper_literal(rank=2)

    def loss_fn(m, batch):
        loss = m(**batch).loss
        if fail and batch is batches[-1]:
            loss.backward()  # the graph ran, hooks fired; then the user's code raises
            raise RuntimeError("boom")
        return loss

    def one_call():
        try:
            collect_statistics(model, batches, targets, cfg, loss_fn=loss_fn, progress=False)
        except RuntimeError:
            assert fail

    one_call()  # warm-up: lazily created caches (rotary embeddings, ...) are not leaks
    baseline = _live_tensors()
    for _ in range(3):
        one_call()
    assert _live_tensors() == baseline


@pytest.mark.parametrize("shape", [(ADD_CHUNK + 3,), (317, 613), (2, 300, 301), (8, 8)])
def test_chunked_running_sum_add_is_the_plain_add_bit_for_bit(shape):
    """float64 += alpha·float32 in cache-sized pieces equals one ``add_`` exactly, for sizes that
    are not a multiple of the piece (a dropped or doubled element at a piece boundary fails)."""
    gen = torch.Generator().manual_seed(0)
    total = torch.randn(shape, generator=gen, dtype=torch.float64)
    value = torch.randn(shape, generator=gen, dtype=torch.float32)
    expected = total.clone().add_(value, alpha=0.37)
    add_into(total, value, 0.37)
    assert torch.equal(total, expected)
    half = torch.zeros(2, *shape, dtype=torch.float64)  # a view into a larger sum (G's halves)
    add_into(half[1], value, 0.37)
    assert torch.equal(half[1], torch.zeros(shape, dtype=torch.float64).add_(value, alpha=0.37))
    assert not half[0].any()


@pytest.mark.parametrize("d", [1, 5, 384, 385, 1376, 4000])
def test_gram_panels_tile_the_rows(d):
    panels = gram_panels(d)
    assert panels[0][0] == 0 and panels[-1][1] == d and len(panels) <= 8
    assert all(a < b for a, b in panels) and all(
        p[1] == q[0] for p, q in itertools.pairwise(panels)
    )


@pytest.mark.parametrize("d", [7, 500, 1376])
def test_gram_sums_in_panels_then_mirrored_are_the_full_products(d):
    """Σ_b alpha·x_bᵀx_b summed by row panels on and below the diagonal, then mirrored
    (``finalize``'s step), against float64 sums of the float32 full products: exactly symmetric
    and within float32 rounding of them (on this machine's BLAS bit-identical: each panel is the
    same product as those rows). Catches a panel that misses its columns left of the diagonal,
    a mirror in the wrong direction, and an alpha dropped."""
    gen = torch.Generator().manual_seed(d)
    batches = [torch.randn(n, d, generator=gen) for n in (3, 128, 40)]
    store: dict[str, torch.Tensor] = {}
    expected = torch.zeros(d, d, dtype=torch.float64)
    for x in batches:
        _add_gram(store, "Z", x, 0.5)
        expected.add_(x.mT @ x, alpha=0.5)
    got = mirror_lower_(store["Z"])
    assert got is store["Z"] and torch.equal(got, got.mT)
    rel = float((got - expected).abs().max() / expected.abs().max())
    assert rel <= 1e-6, rel


def test_split_sums_are_the_even_and_the_odd_sequences_own_sums():
    """With split sums, ``G`` is the gradient sum of the even-numbered sequences and ``G_odd``
    that of the odd-numbered ones, each (d_in, d_out): bit for bit the sums of a pass over
    those sequences alone (batch size 1: the same products, added in the same order)."""
    from lora_da_ref.torch.statistics import accumulate_statistics

    model = tiny_llama()
    targets = find_target_modules(model, LLAMA_TARGETS)
    rows = llama_batches(n_batches=5, batch=1)
    split = LoraDAConfig.paper_literal(diagnostics="cheap")
    plain = split.replace(diagnostics="off")
    sums = accumulate_statistics(model, rows, targets, split, progress=False)
    even = accumulate_statistics(model, rows[0::2], targets, plain, progress=False)
    odd = accumulate_statistics(model, rows[1::2], targets, plain, progress=False)
    assert set(sums.G_odd) == set(sums.G) == set(targets) and not even.G_odd
    for name, m in targets.items():
        assert sums.G[name].shape == sums.G_odd[name].shape == (m.in_features, m.out_features)
        assert torch.equal(sums.G[name], even.G[name]), name
        assert torch.equal(sums.G_odd[name], odd.G[name]), name
