"""init_lora_da end to end on tiny models: invariants, determinism, bad input, model safety."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lora_da_ref import KroneckerFisher as NpKroneckerFisher
from lora_da_ref import lora_da_init, principal_angles
from lora_da_ref.torch import LoraDAConfig, collect_statistics, find_target_modules, init_lora_da
from tests.report import allclose_report
from tests.torch_cases import (
    LLAMA_TARGETS,
    TokenMLP,
    assert_state_equal,
    llama_batches,
    mlp_batches,
    mlp_loss,
    model_state,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_llama,
)

# AᵀA = I/γ for float32 eigenvectors of a d ≤ 88 matrix: ~ d · eps32 ≈ 1e-5.
ORTHO_ATOL = 1e-5
# float64 pipeline vs the NumPy reference on the same statistics: round-off amplified by the
# condition of Z, Y (damping 1e-6 against O(1) entries): subspace angle tolerance.
F64_ANGLE_TOL = 1e-6
# Factors are returned in float32: products of them agree to ~ a few float32 eps.
F32_OUT_RTOL = 1e-6

PRESETS = {
    "paper_literal": LoraDAConfig.paper_literal(rank=4, n_train=1000),
    "official": LoraDAConfig.official(rank=4),
    # niter 60 bounds the test time; non-converged layers fall back to eigh (recorded).
    "lobpcg": LoraDAConfig(rank=4, n_train=1000, solver="lobpcg", solver_options={"niter": 60}),
}


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_factor_shapes_and_invariants(llama, preset):
    cfg = PRESETS[preset]
    factors = init_lora_da(llama, llama_batches(), cfg, progress=False)
    assert list(factors) == list(find_target_modules(llama, LLAMA_TARGETS))
    gamma = cfg.scale_gamma or 1.0
    for name, f in factors.items():
        lin = llama.get_submodule(name)
        assert f.A.shape == (lin.in_features, 4) and f.B.shape == (4, lin.out_features)
        assert f.A.dtype == f.B.dtype == torch.float32 and f.A.device.type == "cpu"
        gram = (f.A.T @ f.A).double().numpy() * gamma
        allclose_report(gram, np.eye(4), rtol=0, atol=ORTHO_ATOL, name=f"{name} AᵀA·γ")
        assert torch.all(f.eigenvalues[1:] >= f.eigenvalues[:-1]), "eigenvalues not ascending"
        assert f.diagnostics["tokens"] > 0 and f.diagnostics["damping"]["Z"] > 0
        assert f.diagnostics["cond"]["Z"] >= 1 and f.diagnostics["cond"]["Y"] >= 1


def test_two_runs_are_bitwise_identical(llama):
    for cfg in PRESETS.values():
        a = init_lora_da(llama, llama_batches(), cfg, progress=False)
        b = init_lora_da(llama, llama_batches(), cfg, progress=False)
        for name in a:
            assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B), name


@pytest.mark.slow  # ~1 s alone, but 20+ s when the 2 cores are shared (OpenMP spin-waits)
def test_two_runs_are_bitwise_identical_with_two_threads(llama):
    """Determinism does not rely on the single-thread test fixture (official preset, 2 threads).
    Quick variant: test_two_runs_are_bitwise_identical (1 thread, all presets)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = init_lora_da(llama, llama_batches(), PRESETS["official"], progress=False)
        b = init_lora_da(llama, llama_batches(), PRESETS["official"], progress=False)
    finally:
        torch.set_num_threads(before)
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B), name


def test_layers_per_pass_gives_identical_factors(llama):
    cfg = PRESETS["official"]
    a = init_lora_da(llama, llama_batches(), cfg, progress=False)
    b = init_lora_da(llama, llama_batches(), cfg.replace(layers_per_pass=1), progress=False)
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B), name


def test_layers_per_pass_holds_one_group_of_statistics_at_a_time(llama, monkeypatch):
    """Memory bound: with layers_per_pass=1 each statistics object covers one decoder layer,
    and the factors of a group are solved before the next group's pass starts."""
    import lora_da_ref.torch.pipeline as pipeline

    events = []
    real_collect, real_solve = pipeline.accumulate_statistics, pipeline.solve_layer

    def collect(model, batches, targets, config, **kw):
        sums = real_collect(model, batches, targets, config, **kw)
        events.append(("pass", {n.split(".self_attn")[0].split(".mlp")[0] for n in sums.G}))
        return sums

    def solve(stats, name, config, z_factors=None, **kw):
        events.append(("solve", name))
        return real_solve(stats, name, config, z_factors, **kw)

    monkeypatch.setattr(pipeline, "accumulate_statistics", collect)
    monkeypatch.setattr(pipeline, "solve_layer", solve)
    cfg = PRESETS["paper_literal"].replace(layers_per_pass=1)
    factors = init_lora_da(llama, llama_batches(), cfg, progress=False)
    passes = [layers for kind, layers in events if kind == "pass"]
    assert len(passes) == llama.config.num_hidden_layers
    assert all(len(layers) == 1 for layers in passes), passes
    # pass 1, its 7 solves, pass 2, its 7 solves: never two passes' statistics alive at once
    kinds = [kind for kind, _ in events]
    per_layer = len(factors) // len(passes)
    assert kinds == (["pass"] + ["solve"] * per_layer) * len(passes), kinds


def test_generator_batches_accepted(llama):
    cfg = PRESETS["paper_literal"]
    a = init_lora_da(llama, llama_batches(), cfg, progress=False)
    b = init_lora_da(
        llama, (b for b in llama_batches()), cfg.replace(layers_per_pass=1), progress=False
    )
    for name in a:
        assert torch.equal(a[name].A, b[name].A), name


def test_float64_pipeline_matches_numpy_reference():
    """Per layer: the NumPy lora_da_init on the same (Y, Z, G) gives the same subspace and B."""
    model = tiny_llama(dtype=torch.float64)
    batches = llama_batches()
    cfg = LoraDAConfig.paper_literal(
        rank=3, n_train=500, dtype=torch.float64, damping=1e-3, damping_scale="absolute"
    )
    factors = init_lora_da(model, batches, cfg, progress=False)
    stats = collect_statistics(
        model, batches, find_target_modules(model, LLAMA_TARGETS), cfg, progress=False
    )
    for name, f in factors.items():
        eye = lambda d: 1e-3 * np.eye(d)  # noqa: E731  (the same damping on both factors)
        Y = stats.Y[name].numpy()
        Z = stats.Z[stats.group_of[name]].numpy()
        J = NpKroneckerFisher(Y + eye(Y.shape[0]), Z + eye(Z.shape[0]))
        A_ref, B_ref = lora_da_init(J, stats.G[name].numpy(), 500, 3)
        angle = principal_angles(f.A.double().numpy(), A_ref).max()
        assert angle < F64_ANGLE_TOL, f"{name}: principal angle {angle:.3g}"
        # B depends on A's basis: compare the rank-r update A B (basis-free).
        allclose_report(
            f.A.double().numpy() @ f.B.double().numpy(), A_ref @ B_ref,
            rtol=F32_OUT_RTOL, atol=F32_OUT_RTOL * np.abs(A_ref @ B_ref).max(), name=f"{name} A B",
        )  # fmt: skip


def test_normalize_delta_keeps_A_and_scales_B():
    """Ω/σ² has the eigenvectors of Ω, so A is unchanged and B = A0ᵀΔW/σ (float64 pipeline)."""
    model = tiny_llama(dtype=torch.float64)
    base = LoraDAConfig(
        rank=3, n_train=1000, variance_weight=0.5, dtype=torch.float64, normalize_delta=False
    )
    raw = init_lora_da(model, llama_batches(), base, progress=False)
    norm = init_lora_da(model, llama_batches(), base.replace(normalize_delta=True), progress=False)
    for name in raw:
        sigma = norm[name].diagnostics["delta_sigma"]
        angle = principal_angles(raw[name].A.double().numpy(), norm[name].A.double().numpy()).max()
        assert angle < F64_ANGLE_TOL, f"{name}: normalising ΔW moved the subspace by {angle:.3g}"
        ab_raw = (raw[name].A @ raw[name].B).double()
        ab_norm = (norm[name].A @ norm[name].B).double()
        err = float((ab_norm * sigma - ab_raw).norm() / ab_raw.norm())
        assert err < F32_OUT_RTOL, f"{name}: A B·σ differs from the unnormalised A B by {err:.3g}"


def test_scale_gamma_divides_both_factors(llama):
    a = init_lora_da(llama, llama_batches(), LoraDAConfig(rank=2, scale_gamma=None), progress=False)
    b = init_lora_da(llama, llama_batches(), LoraDAConfig(rank=2, scale_gamma=16.0), progress=False)
    for name in a:
        allclose_report(b[name].A * 4, a[name].A, rtol=1e-6, name=f"{name} A")
        allclose_report(
            b[name].B * 4,
            a[name].B,
            rtol=1e-6,
            atol=1e-6 * float(a[name].B.abs().max()),
            name=f"{name} B",
        )


def test_sequential_model_with_custom_loss():
    model = TokenMLP()
    cfg = LoraDAConfig(rank=2, target_modules=("0", "2"), label_shift=0, n_train=100)
    factors = init_lora_da(model, mlp_batches(), cfg, loss_fn=mlp_loss, progress=False)
    assert set(factors) == {"0", "2"}
    assert factors["0"].A.shape == (6, 2) and factors["2"].B.shape == (2, 7)


def _bad_inputs(model):
    batches = llama_batches()
    return {
        "rank 0": (lambda: LoraDAConfig(rank=0), None, ValueError, "rank"),
        "rank too big": (lambda: LoraDAConfig(rank=25), batches, ValueError, "exceeds min"),
        "unknown target": (
            lambda: LoraDAConfig(target_modules=("nope",)),
            batches,
            ValueError,
            "'nope' matches no",
        ),
        "non-linear target": (
            lambda: LoraDAConfig(target_modules=("mlp",)),
            batches,
            ValueError,
            "only nn.Linear",
        ),
        "empty batches": (lambda: LoraDAConfig(rank=2), [], ValueError, "batches is empty"),
        "n_train 0": (lambda: LoraDAConfig(n_train=0), None, ValueError, "n_train"),
        "masked": (
            lambda: LoraDAConfig(rank=2),
            [dict(b, labels=torch.full_like(b["labels"], -100)) for b in batches],
            ValueError,
            "no unmasked tokens",
        ),
        "nan weights": (lambda: LoraDAConfig(rank=2), batches, ValueError, "non-finite"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs(None)))
def test_bad_input_raises_and_leaves_model_untouched(case):
    model = tiny_llama()
    model.train()
    make_cfg, batches, exc, match = _bad_inputs(model)[case]
    if case == "nan weights":
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = model_state(model)
    with pytest.raises(exc, match=match):
        init_lora_da(model, batches, make_cfg(), progress=False)
    assert_state_equal(before, model_state(model))


def test_loss_fn_exception_leaves_model_untouched():
    model = tiny_llama()
    before = model_state(model)

    def loss_fn(m, b):
        loss = m(**b).loss
        if b["input_ids"][0, 0] == llama_batches()[1]["input_ids"][0, 0]:
            raise KeyError("boom on batch 2")
        return loss

    with pytest.raises(KeyError, match="boom"):
        init_lora_da(model, llama_batches(), LoraDAConfig(rank=2), loss_fn=loss_fn, progress=False)
    assert_state_equal(before, model_state(model))


U_F32 = 2.0**-24  # float32 unit round-off


def _exact_official_omegas(model, batches, config, damping):
    """Ω (official preset) of every target, from float64 sums of the model's own activations
    (x, ∂L_b/∂o captured by hooks of the test) and the NumPy reference, with the damping
    ``damping[name] = {"Z": λ_Z, "Y": λ_Y}`` the production applied; and cond(Z + λ_Z I)."""
    from lora_da_ref import KroneckerFisher, fisher_gradient, guidance_matrix
    from tests.test_torch_statistics import model_activations, reference_positions

    targets = find_target_modules(model, config.target_modules)
    Z, y, G, count, weights = {}, {}, {}, 0, 0
    for batch in batches:
        xs, gs = model_activations(model, batch, targets)  # g = ∂L_b/∂o, L_b the batch mean
        P, _ = reference_positions(batch, config)  # token_mask="attention": every position
        loss_tokens, T_b = reference_positions(batch, config.replace(token_mask="labels"))
        # score_scale="batch": s_t = ∂L_i/∂o_t with L_i the mean loss of t's own sequence i,
        # = (T_b / T_i) g_t since L_b = Σ_i T_i L_i / T_b
        per_seq = (T_b / loss_tokens.sum(1).double())[:, None, None]  # (B, 1, 1)
        for n in targets:
            x, s = xs[n].double(), per_seq * gs[n].double()
            Z[n] = Z.get(n, 0) + x[P].T @ x[P]
            y[n] = y.get(n, 0) + (s[P] ** 2).sum(0)  # output_factor="diagonal"
            # gradient_weight="sequence": G = mean over sequences of ∇L_i = Σ_t x_t s_tᵀ
            G[n] = G.get(n, 0) + x.flatten(0, 1).T @ s.flatten(0, 1)
        count, weights = count + int(P.sum()), weights + batch["input_ids"].shape[0]
    out = {}
    for n in targets:
        lam = damping[n]
        Zd = Z[n].numpy() / count + lam["Z"] * np.eye(Z[n].shape[0])
        J = KroneckerFisher(y[n].numpy() / count + lam["Y"], Zd)
        delta = fisher_gradient(J, G[n].numpy() / weights)
        sigma = np.linalg.norm(delta, 2)  # normalize_delta: Ω / σ², same eigenvectors
        beta = config.variance_weight / sigma**2
        omega = guidance_matrix(J, delta / sigma, config.n_train, variance_weight=beta)
        out[n] = (omega, float(np.linalg.cond(Zd)))
    return out


def test_bf16_model_factors_match_float32_within_derived_tolerances():
    """bf16 model, official preset (eigh, so that precision is measured, not 10-iteration LOBPCG):

    1. its A0 is the exact r smallest eigenspace of the Ω of its own (bf16) activations, up to
       float32 statistics: a relative error u32 amplified by cond(Z) in Z⁻¹ (first order),
       ‖ΔΩ‖ ≲ u32·κ(Z)·‖Ω‖₂, so θ ≲ u32·κ(Z)·‖Ω‖₂/δ (Davis–Kahan, δ = λ_{r+1} − λ_r); measured
       ≤ 0.053 of it. A bf16 accumulation of the statistics breaks it;
    2. against the float32 model's A0: by the triangle inequality for the largest principal angle,
       θ ≤ (1. for bf16) + (1. for float32) + ‖E‖₂/(δ₃₂ − ‖E‖₂), E = Ω_bf16 − Ω_f32 of the exact
       sums (Davis–Kahan), on every layer where ‖E‖₂ < δ₃₂."""
    config = LoraDAConfig.official(rank=2, solver="eigh", solver_options={})
    batches = llama_batches()
    models = {"bf16": tiny_llama(dtype=torch.bfloat16), "f32": tiny_llama(dtype=torch.float32)}
    factors = {k: init_lora_da(m, batches, config, progress=False) for k, m in models.items()}
    exact = {
        k: _exact_official_omegas(
            m, batches, config, {n: f.diagnostics["damping"] for n, f in factors[k].items()}
        )
        for k, m in models.items()
    }
    r, tight, compared = config.rank, 0, 0
    for name, f in factors["bf16"].items():
        assert f.A.dtype == torch.float32 and bool(torch.isfinite(f.A).all()), name
        assert bool(torch.isfinite(f.B).all()) and math.isfinite(f.diagnostics["residual"]), name
        tol = {}
        for k in ("bf16", "f32"):
            omega, cond_z = exact[k][name]
            values, vectors = np.linalg.eigh(omega)
            tol[k] = U_F32 * cond_z * np.abs(values).max() / (values[r] - values[r - 1])
            A = factors[k][name].A.double().numpy()
            angle = principal_angles(A, vectors[:, :r]).max()
            assert angle <= tol[k], f"{name} ({k}): {angle:.3g} rad > {tol[k]:.3g}"
        tight += tol["bf16"] < 0.1
        omega16, omega32 = exact["bf16"][name][0], exact["f32"][name][0]
        values32 = np.linalg.eigvalsh(omega32)
        gap, E = values32[r] - values32[r - 1], np.linalg.norm(omega16 - omega32, 2)
        if E < gap:
            compared += 1
            bound = tol["bf16"] + tol["f32"] + E / (gap - E)
            A16, A32 = (factors[k][name].A.double().numpy() for k in ("bf16", "f32"))
            angle = principal_angles(A16, A32).max()
            assert angle <= bound, f"{name}: bf16 vs float32 {angle:.3g} rad > {bound:.3g}"
    assert tight >= len(factors["bf16"]) // 2 and compared >= len(factors["bf16"]) // 2


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("rank", -1, "rank must be positive"),
        ("rank", 2.5, "rank must be an integer"),
        ("n_train", 0, "n_train must be positive"),
        ("output_factor", "kfac", "output_factor must be one of"),
        ("solver", "arpack", "solver must be one of"),
        ("token_mask", "all", "token_mask must be one of"),
        ("score_scale", "sum", "score_scale must be one of"),
        ("gradient_weight", "batch", "gradient_weight must be one of"),
        ("damping", -1e-3, "damping must be >= 0"),
        ("scale_gamma", 0.0, "scale_gamma must be > 0"),
        ("variance_weight", float("nan"), "variance_weight must be finite"),
        ("dtype", torch.float16, "dtype must be"),
        ("layers_per_pass", 0, "layers_per_pass must be positive"),
        ("label_shift", -1, "label_shift must be"),
        ("target_modules", (), "target_modules must be non-empty"),
        ("diagnostics", "yes", "diagnostics must be one of"),
        ("normalize_delta", 1, "normalize_delta must be True or False"),
    ],
)
def test_config_rejects_bad_fields(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LoraDAConfig(**{field: value})


def test_presets():
    off, paper = LoraDAConfig.official(), LoraDAConfig.paper_literal()
    assert (off.variance_weight, off.output_factor, off.scale_gamma, off.solver) == (
        0.03,
        "diagonal",
        1024.0,
        "lobpcg",
    )
    assert off.solver_options == {"niter": 10, "official": True} and off.normalize_delta
    assert (off.token_mask, off.score_scale, off.gradient_weight) == (
        "attention",
        "batch",
        "sequence",
    )
    assert (paper.variance_weight, paper.bias_weight, paper.output_factor, paper.solver) == (
        1.0,
        1.0,
        "full",
        "eigh",
    )
    assert paper.scale_gamma is None and not paper.normalize_delta
    assert LoraDAConfig(target_modules=["q_proj"]).target_modules == ("q_proj",)
    assert LoraDAConfig(target_modules="q_proj").target_modules == "q_proj"  # a regex, as PEFT


@pytest.mark.cuda
def test_cuda_model_matches_cpu():
    """Statistics run where the model is; factors come back float32 on CPU and match the CPU run."""
    cpu_model = tiny_llama(dtype=torch.float64)
    cuda_model = tiny_llama(dtype=torch.float64).cuda()
    cfg = LoraDAConfig.paper_literal(rank=3, n_train=500, dtype=torch.float64, damping=1e-3)
    a = init_lora_da(cpu_model, llama_batches(), cfg, progress=False)
    b = init_lora_da(cuda_model, llama_batches(), cfg, progress=False)
    assert all(p.is_cuda for p in cuda_model.parameters())
    for name in a:
        assert b[name].A.device.type == "cpu"
        angle = principal_angles(a[name].A.double().numpy(), b[name].A.double().numpy()).max()
        assert angle < F64_ANGLE_TOL, f"{name}: CPU vs CUDA angle {angle:.3g}"


@pytest.mark.cuda
def test_cuda_bf16_official_preset_is_finite_and_deterministic():
    model = tiny_llama(dtype=torch.bfloat16).cuda()
    before = model_state(model)
    a = init_lora_da(model, llama_batches(), LoraDAConfig.official(rank=2), progress=False)
    b = init_lora_da(model, llama_batches(), LoraDAConfig.official(rank=2), progress=False)
    assert_state_equal(before, model_state(model))
    for name in a:
        assert bool(torch.isfinite(a[name].A).all() and torch.isfinite(a[name].B).all()), name
        angle = principal_angles(a[name].A.double().numpy(), b[name].A.double().numpy()).max()
        # Only CPU runs are promised bitwise-equal; CUDA reductions may reorder (float32 noise
        # ≈ 1e-7 amplified by 1/gap ≲ 1e3 on these tiny layers) — untested here without a GPU.
        assert angle < 1e-3, f"{name}: two CUDA runs differ by {angle:.3g} rad"


@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (5, 5)])
def test_top_singular_value_matches_svd(shape):
    """σ_max from the Gram matrix (used by normalize_delta) equals the SVD's, float64 and float32."""
    from lora_da_ref.torch.guidance import top_singular_value as _top_singular_value

    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        M = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        expected = float(torch.linalg.svdvals(M.double())[0])
        assert abs(_top_singular_value(M, "m") - expected) <= rtol * expected
    with pytest.raises(ValueError, match="top singular value is 0"):
        _top_singular_value(torch.zeros(*shape), "m")
