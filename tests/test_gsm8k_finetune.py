"""benchmarks/gsm8k_finetune.py: loss, initialisations and controls, selection, bootstrap, resume.

The fast tests use a random tiny LLaMA and the tiny tokenizer on the real GSM8K split; the run
on SmolLM2 itself (``--quick``) is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "gsm8k_finetune", ROOT / "benchmarks/gsm8k_finetune.py"
)
gf = importlib.util.module_from_spec(_spec)
sys.modules["gsm8k_finetune"] = gf
_spec.loader.exec_module(gf)

CPU = torch.device("cpu")
TINY = replace(gf.QUICK, n_calib=3, fit=6, heldout=4, gen=2, seeds=2, select_seeds=2)


@pytest.fixture(scope="module")
def tiny():
    from lora_da_ref.data import build_tiny_tokenizer, tiny_llama

    model = tiny_llama(0, hidden=32, layers=2, heads=4).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = build_tiny_tokenizer()
    return model, tok, gf.load_data(tok, TINY)


# ----------------------------------------------------------------------------- loss


def test_token_losses_are_hf_losses_per_sequence(tiny):
    model, _, data = tiny
    examples = data["fit"][:3]
    batch = gf.pad_batch(examples, CPU)  # padded: unequal lengths
    sums, n = gf.token_losses(model, batch)
    for i, e in enumerate(examples):
        ref = model(**gf.as_batch(e, CPU)).loss
        torch.testing.assert_close(sums[i] / n[i], ref, rtol=1e-5, atol=1e-6)
        assert int(n[i]) == int((e["labels"] != gf.IGNORE).sum())  # every label is predicted
    scores = gf.per_problem(model, examples, CPU)
    assert scores["count"] == n.tolist()
    np.testing.assert_allclose(scores["sum"], sums.tolist(), rtol=1e-5)


# ----------------------------------------------------------------------------- initialisations


def test_data_aware_presets_equal_init_lora_da(tiny):
    """One statistics pass for three presets gives what init_lora_da gives for each."""
    from lora_da_ref.torch import LoraDAConfig, init_lora_da
    from lora_da_ref.torch.diagnostics import fisher_units

    model, _, data = tiny
    calib = data["fit"][: TINY.n_calib]
    n_counts = gf.counts(data["fit"])
    got = gf.data_aware(model, calib, n_counts, TINY, CPU)
    n_train = fisher_units(LoraDAConfig(), **n_counts)
    assert got["info"]["n_train_fisher_units"] == pytest.approx(n_train)
    configs = {
        "lora_da_official": LoraDAConfig.official(n_train=n_train),
        "lora_da_default": LoraDAConfig(n_train=n_train),
        "lora_da_debiased": LoraDAConfig(n_train=n_train, estimator="debiased"),
    }
    batches = [gf.as_batch(e, CPU) for e in calib]
    for method, config in configs.items():
        config = config.replace(rank=gf.RANK, target_modules=gf.TARGETS, seed=0)
        ref = init_lora_da(model, batches, config, loss_fn=gf.mean_loss, progress=False)
        for name, f in ref.items():
            torch.testing.assert_close(
                got[method][name].A @ got[method][name].B, f.A @ f.B, rtol=1e-4, atol=1e-7
            )
    default, debiased = got["lora_da_default"], got["lora_da_debiased"]
    assert any(
        not torch.allclose(default[n].A @ default[n].B, debiased[n].A @ debiased[n].B)
        for n in default
    )  # the debiased estimator changes something


def test_controls_differ_from_their_partners_in_the_subspace_only(tiny):
    from lora_da_ref.torch import LoraDAConfig, collect_statistics, find_target_modules
    from lora_da_ref.torch.baselines import lora_one
    from lora_da_ref.torch.factors import solve_layer

    model, _, data = tiny
    calib = data["fit"][: TINY.n_calib]
    got = gf.data_aware(model, calib, gf.counts(data["fit"]), TINY, CPU)
    batches = [gf.as_batch(e, CPU) for e in calib]
    targets = find_target_modules(model, gf.TARGETS)
    config = LoraDAConfig(
        rank=gf.RANK, target_modules=gf.TARGETS, seed=0, n_train=got["info"]["n_train_fisher_units"]
    )
    stats = collect_statistics(
        model, batches, targets, config, loss_fn=gf.mean_loss, progress=False
    )
    one = lora_one(
        model,
        batches,
        rank=gf.RANK,
        target_modules=gf.TARGETS,
        stable_gamma=gf.GAMMA_ONE["lora_one"],
        loss_fn=gf.mean_loss,
    )
    g_da, g_one = math.sqrt(gf.GAMMA_DA), math.sqrt(gf.GAMMA_ONE["lora_one"])
    for name in targets:
        sol = solve_layer(stats, name, config, probe=False)
        A0, delta = sol.eig.vectors.double(), sol.delta_w.double()
        # random_A@da_scale: Eq. (17) at LoRA-DA's scale, only the subspace is random
        for seed in range(TINY.seeds):
            f = got["random_A@da_scale"][seed][name]
            Q = f.A.double() * g_da
            torch.testing.assert_close(
                Q.mT @ Q, torch.eye(gf.RANK, dtype=torch.float64), atol=1e-5, rtol=0
            )
            torch.testing.assert_close(f.B.double(), Q.mT @ delta / g_da, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(
            got["random_A@da_scale"][0][name].A, got["random_A@da_scale"][1][name].A
        )  # redrawn
        # da_subspace@one_scale: LoRA-One's A B = P Pᵀ(−∇L)/(S0 γ) with P → A0; the statistics'
        # G is LoRA-One's gradient, so putting P back reproduces lora_one exactly
        neg = -stats.G[name].double()
        s0 = float(torch.linalg.svdvals(neg)[0])
        f = got["da_subspace@one_scale"][name]
        torch.testing.assert_close(
            (f.A @ f.B).double(), A0 @ A0.mT @ neg / (s0 * g_one**2), rtol=1e-4, atol=1e-9
        )
        P = torch.linalg.svd(neg)[0][:, : gf.RANK]
        ref = one[name]
        torch.testing.assert_close(
            (ref.A @ ref.B).double(), P @ P.mT @ neg / (s0 * g_one**2), rtol=1e-3, atol=1e-9
        )
        # column norms: the control's are LoRA-One's (√(S_r/S0)/√γ₁)
        torch.testing.assert_close(f.A.norm(dim=0), ref.A.norm(dim=0), rtol=1e-4, atol=1e-7)


def test_every_method_trains_with_rslora_alpha_16(tiny, tmp_path):
    from lora_da_ref.torch.adapter import lora_modules

    model, _, data = tiny
    inits = gf.Inits(model, data, TINY, CPU, tmp_path)
    for method in gf.METHODS:
        factors, offset = inits.factors(method, 0)
        layers = lora_modules(gf.build(model, factors, offset, 0))
        assert {layer.scaling["default"] for layer in layers.values()} == {gf.SCALING}, method
        assert offset == ("subtract" if method == "pissa" else "none")


def test_cut_total_keeps_the_question_and_cuts_the_answer(tiny):
    _, tok, _ = tiny
    from lora_da_ref.real import gsm8k, tokenize_gsm8k

    e = tokenize_gsm8k(tok, gsm8k("fit")[0])
    e["index"] = 0
    n, prompt = int(e["input_ids"].numel()), int((e["labels"] == gf.IGNORE).sum())
    assert gf.cut_total(e, None)["cut"] is False and gf.cut_total(e, n)["cut"] is False
    cut = gf.cut_total(e, prompt + 3)
    assert cut["cut"] and cut["input_ids"].numel() == prompt + 3
    assert torch.equal(cut["input_ids"], e["input_ids"][: prompt + 3])  # the prompt whole
    assert int((cut["labels"] != gf.IGNORE).sum()) == 3  # the first 3 answer tokens
    with pytest.raises(ValueError, match="prompt alone"):
        gf.cut_total(e, prompt)


def test_a_step_summed_by_sequence_is_the_padded_batchs_step(tiny):
    """``per_sequence`` changes how a step is computed, not the step: after two AdamW steps the
    adapters agree with the padded batch's to float32 rounding (a per-sequence mean instead of
    the token mean would not)."""
    model, tok, _ = tiny
    sizes = replace(TINY, steps=2, batch=3, val=2, completion_tokens=None)
    data = gf.load_data(tok, sizes)
    lengths = {int(e["input_ids"].numel()) for e in data["fit"]}
    assert len(lengths) > 1  # the padded batch really pads
    got = []
    for per_sequence in (False, True):
        m = gf.build(model, None, "none", 0)
        out = gf.train(m, data, replace(sizes, per_sequence=per_sequence), 1e-2, 0, CPU)
        got.append(
            (out, {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
        )
    (a, pa), (b, pb) = got
    np.testing.assert_allclose(a["curve"]["train_loss"], b["curve"]["train_loss"], rtol=1e-5)
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(pa[n], gf.build(model, None, "none", 0).state_dict().get(n, pa[n]))
               for n in pa)  # fmt: skip


def test_validation_steps_are_the_given_ones_and_the_last():
    assert gf.curve_steps(replace(TINY, steps=125, val_at=(16, 32, 64))) == [16, 32, 64, 125]
    assert gf.curve_steps(gf.EPOCH) == [16, 32, 64, 125]
    assert gf.curve_steps(replace(TINY, steps=8, curve_points=2)) == [4, 8]


def test_new_fields_keep_the_tag_of_earlier_rows():
    """The short study's committed rows carry this tag; a field added later must not change it
    (or every earlier row would silently stop counting)."""
    assert gf.FULL.tag() == "16306df434"
    assert gf.EPOCH.tag() != gf.FULL.tag()
    assert replace(gf.FULL, per_sequence=True).tag() != gf.FULL.tag()
    assert replace(gf.FULL, label="x", val_at=(3,)).tag() == gf.FULL.tag()


def test_the_epoch_grid_is_anchored_at_the_short_studys_choice(tmp_path):
    exp = gf.Experiment.__new__(gf.Experiment)
    exp.sizes, exp.out = gf.EPOCH, tmp_path
    with pytest.raises(ValueError, match="no short-study rows"):
        exp.grid("lora")
    for lr, loss in ((4e-4, 1.5), (8e-4, 1.4), (1.6e-3, 1.45)):
        for seed in range(gf.FULL.select_seeds):
            row = {"method": "lora", "lr": lr, "seed": seed, "val_loss": loss}
            row["sizes_tag"] = gf.FULL.tag()
            name = gf.file_name("lora", lr, seed, gf.FULL)
            gf.atomic_write(json.dumps(row), tmp_path / "rows" / f"{name}.json")
    assert exp.grid("lora") == (pytest.approx(4e-4), pytest.approx(8e-4))
    exp.sizes = gf.FULL
    assert exp.grid("lora") == gf.FULL.lr_grid


# ----------------------------------------------------------------------------- selection


def test_select_lr_uses_the_mean_over_seeds():
    assert gf.select_lr({1e-4: [2.0, 2.0], 2e-4: [1.0, 2.4], 4e-4: [1.8, 1.8]}) == (2e-4, False)
    assert gf.select_lr({1e-4: [2.0, 2.0], 2e-4: [1.0, math.inf], 4e-4: [1.8, 1.8]}) == (
        4e-4,
        True,
    )  # one diverged seed disqualifies the rate
    assert gf.select_lr({1e-4: [1.0, 1.0], 2e-4: [1.0, 1.0]}) == (1e-4, True)  # tie: smaller
    with pytest.raises(ValueError, match="diverged"):
        gf.select_lr({1e-4: [math.nan], 2e-4: [math.inf]})


def test_grid_extends_past_an_edge_winner(tmp_path):
    optimum = 3e-5  # validation loss |log(lr/optimum)|: the minimum lies below the grid
    sizes = replace(TINY, lr_grid=(1e-4, 2e-4, 4e-4), select_seeds=2, max_extend=3)
    exp = gf.Experiment.__new__(gf.Experiment)
    exp.sizes, exp.out = sizes, tmp_path
    tried = []

    def fake_row(method, lr, seed):
        tried.append((lr, seed))
        return {"val_loss": abs(math.log(lr / optimum))}

    exp.row = fake_row
    lr, edge = exp.select("lora")
    # 1e-4 wins at the edge → 5e-5 → 2.5e-5 → 1.25e-5, which loses: 2.5e-5 is now interior
    assert lr == pytest.approx(2.5e-5) and not edge
    assert sorted({x for x, _ in tried}) == pytest.approx([1.25e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4])
    tried.clear()
    exp.sizes = replace(sizes, max_extend=1)  # the extension budget is respected
    assert exp.select("lora") == (pytest.approx(5e-5), True)
    assert len({x for x, _ in tried}) == 4
    assert {s for _, s in tried} == {0, 1}
    assert gf.lr_key(2e-4 * 2) == gf.lr_key(4e-4)


def test_rows_at_a_rate_off_the_grid_join_the_choice(tmp_path):
    """A rate the rows hold for every selection seed is a grid point (the summary chooses from
    all such rates; the selection must too, or the seeds run at a rate the report does not pick)."""
    optimum = 3e-5
    sizes = replace(TINY, lr_grid=(1e-4, 2e-4, 4e-4), select_seeds=2, max_extend=1)
    exp = gf.Experiment.__new__(gf.Experiment)
    exp.sizes, exp.out = sizes, tmp_path
    exp.row = lambda method, lr, seed: {"val_loss": abs(math.log(lr / optimum))}

    def stored(lr, seed):
        row = {"method": "lora", "lr": lr, "seed": seed, "sizes_tag": sizes.tag()}
        gf.atomic_write(
            json.dumps(row), tmp_path / "rows" / f"{gf.file_name('lora', lr, seed, sizes)}.json"
        )

    stored(5e-5, 0)  # one selection seed only: not a grid point; the one extension reaches 5e-5
    assert exp.select("lora") == (pytest.approx(5e-5), True)
    stored(5e-5, 1)  # both: 5e-5 joins the choice and is the one extension, already spent
    assert exp.select("lora") == (pytest.approx(5e-5), True)
    other = replace(sizes, steps=sizes.steps + 1)  # rows of other sizes never join
    exp.sizes = other
    assert exp.select("lora") == (pytest.approx(5e-5), True)


def test_a_resumed_selection_spends_the_extension_budget_once(tmp_path):
    """A run killed after its extension row and started again asks for no further rate: the
    extension it made is in the rows, and the budget counts it."""
    optimum = 3e-5
    sizes = replace(TINY, lr_grid=(1e-4, 2e-4), select_seeds=1, max_extend=1)
    exp = gf.Experiment.__new__(gf.Experiment)
    exp.sizes, exp.out = sizes, tmp_path
    tried = []

    def row(method, lr, seed):  # trains once, then reads the row back, as Experiment.row does
        path = tmp_path / "rows" / f"{gf.file_name(method, lr, seed, sizes)}.json"
        if not path.exists():
            tried.append(lr)
            body = {"method": method, "lr": lr, "seed": seed, "sizes_tag": sizes.tag(),
                    "val_loss": abs(math.log(lr / optimum))}  # fmt: skip
            gf.atomic_write(json.dumps(body), path)
        return json.loads(path.read_text())

    exp.row = row
    assert exp.select("lora") == (pytest.approx(5e-5), True)
    assert tried == pytest.approx([1e-4, 2e-4, 5e-5])
    tried.clear()
    for _ in range(2):  # every restart
        assert exp.select("lora") == (pytest.approx(5e-5), True)
    assert tried == []


# ----------------------------------------------------------------------------- statistics


def test_paired_t_interval_by_hand():
    """Per-seed differences 0.3, −0.1, 0.4 (one token per problem, two problems): mean 0.2,
    s.d. √0.07, t(2) 97.5 % = 0.95·√(2/0.0975) = 4.3027 (two degrees of freedom have the closed
    form q = (2p − 1)·√(2 / (4p(1 − p)))): half-width 0.6572."""
    counts = np.ones((3, 2))
    b = np.array([[1.0, 2.0], [1.0, 1.0], [2.0, 2.0]])
    a = b + np.array([[0.3], [-0.1], [0.4]])  # +d on each problem: each run's loss + d
    out = gf.paired_t(a, counts, b, counts)
    assert out["per_seed"] == pytest.approx([0.3, -0.1, 0.4]) and out["df"] == 2
    assert out["diff"] == pytest.approx(0.2)
    q = 0.95 * math.sqrt(2 / 0.0975)
    half = q * math.sqrt(0.07) / math.sqrt(3)
    assert stats.t.ppf(0.975, 2) == pytest.approx(q, rel=1e-12)
    assert out["ci95"] == pytest.approx([0.2 - half, 0.2 + half], rel=1e-12)
    assert half == pytest.approx(0.6572, abs=1e-4)
    # one seed: no interval; the difference is token-weighted within a run
    one = gf.paired_t(a[:1], np.array([[1.0, 3.0]]), b[:1], np.array([[1.0, 3.0]]))
    assert one["diff"] == pytest.approx((1.3 + 2.3) / 4 - (1.0 + 2.0) / 4)  # Σ sums / Σ tokens
    assert all(math.isnan(x) for x in one["ci95"])


def test_step_contrast_pairs_by_seed_at_every_common_step():
    """Method a is behind b at step 16 on every seed and ahead at step 125. The contrast pairs
    runs by seed, not by position: a's seeds come in another order and b has a seed a lacks
    (pairing by position, or averaging each method over its own seeds, gives other numbers).
    A step recorded by only some runs is left out; the intervals are the hand-made t(2) of
    :func:`test_paired_t_interval_by_hand`."""

    def run(vals: dict[int, float]) -> dict:
        return {"curve": {"val_steps": list(vals), "val_loss": list(vals.values())}}

    b = {0: run({16: 1.0, 64: 0.9, 125: 0.8}), 1: run({16: 2.0, 64: 1.1, 125: 0.6}),
         2: run({16: 1.5, 64: 1.0, 125: 0.7}), 3: run({16: 9.0, 125: 9.0})}  # fmt: skip
    a = {2: run({16: 1.9, 125: 0.7 - 0.4}), 0: run({16: 1.3, 32: 5.0, 125: 0.8 - 0.3}),
         1: run({16: 1.9, 64: 0.0, 125: 0.6 + 0.1})}  # fmt: skip
    out = gf.step_contrast(a, b)
    assert out["seeds"] == [0, 1, 2] and list(out["steps"]) == ["16", "125"]
    early, late = out["steps"]["16"], out["steps"]["125"]
    assert early["per_seed"] == pytest.approx([0.3, -0.1, 0.4]) and early["df"] == 2
    half = stats.t.ppf(0.975, 2) * math.sqrt(0.07) / math.sqrt(3)
    assert early["ci95"] == pytest.approx([0.2 - half, 0.2 + half], rel=1e-12)
    assert late["per_seed"] == pytest.approx([-0.3, 0.1, -0.4])
    assert late["diff"] == pytest.approx(-0.2)
    table = gf.markdown_table(
        {"methods": {}, "by_step": [{"a": "x", "b": "y", "isolates": "", **out}]}
    )
    assert "| `x` − `y` (n = 3) | +0.2000 [" in table and "| -0.2000 [" in table
    assert "step 16 | step 125 |" in table


def test_table_says_when_a_method_has_no_or_one_scored_seed():
    """A method still in its selection has no held-out row, and one with a single scored seed
    has no spread: the table says so instead of printing ``nan ± nan``."""

    def entry(seeds: list[int], mean: float, sd: float) -> dict:
        return {
            "seeds": seeds,
            "heldout_mean": mean,
            "heldout_sd": sd,
            "selected_lr": 4e-4,
            "at_grid_edge": True,
            "val_at_neighbours": {"0.0002": 0.76, "0.0004": 0.75},
        }

    table = gf.markdown_table({"methods": {
        "pissa": entry([], math.nan, math.nan), "lora_one": entry([0], 0.7312, math.nan),
        "lora": entry([0, 1], 0.7265, 0.0017)}})  # fmt: skip
    assert "nan" not in table
    assert "| `pissa` | 0.0004 (edge) | — (not scored yet) |" in table
    assert "| `lora_one` | 0.0004 (edge) | 0.7312 (1) |" in table
    assert "| `lora` | 0.0004 (edge) | 0.7265 ± 0.0017 (2) |" in table
    assert "0.7600, 0.7500, —" in table


def test_hierarchical_bootstrap_resamples_seeds_as_seeds():
    """Three seeds whose differences are +1, −0.8, +0.3 on 400 problems with little noise
    within a seed: the seed level dominates, and an interval must reach the seeds' spread
    (cover 0). Resampling the 1200 (seed, problem) cells as if they were problems gives
    ≈ ±0.05 around +0.17 and excludes 0: that implementation fails here."""
    rng = np.random.default_rng(1)
    k, n = 3, 400
    counts = rng.integers(5, 20, size=(k, n)).astype(float)
    b = counts * rng.uniform(1.0, 2.0, size=(k, n))
    shift = np.array([1.0, -0.8, 0.3])[:, None]
    a = b + counts * (shift + rng.normal(0, 0.05, size=(k, n)))
    lo, hi = gf.hierarchical_bootstrap(a, counts, b, counts, reps=400)
    assert lo < 0 < hi and hi - lo > 1.0
    same = gf.hierarchical_bootstrap(b, counts, b, counts, reps=50)
    assert same == [0.0, 0.0]  # paired: identical runs have no spread at all
    lo, hi = gf.hierarchical_bootstrap(b + 0.1 * counts, counts, b, counts, reps=50)
    assert lo == pytest.approx(0.1, abs=1e-12) and hi == pytest.approx(0.1, abs=1e-12)
    # one seed: resampling its problems alone would claim a seed-free interval (≈ ±0.005)
    one = gf.hierarchical_bootstrap(a[:1], counts[:1], b[:1], counts[:1], reps=50)
    assert all(math.isnan(x) for x in one)
    assert "[— one seed] (n = 1)" in gf._ci({"diff": 1.0, "ci95": one, "seeds": [0]})


def test_exact_match_contrast_pairs_seeds_that_generated():
    """Three seeds generated on four problems for both methods; seed 3 of ``a`` was scored
    with ``--gen-seeds 0`` (no answers). Per-seed accuracies a: 3/4, 1/4, 2/4; b: 1/4, 1/4, 0/4,
    so the differences are 0.5, 0, 0.5: mean 1/3, s.d. √(1/12), t(2). Counting the seed without
    answers as all wrong, or pairing by position after dropping it, gives other numbers."""
    T, F = True, False

    def runs(correct: dict[int, list[bool]]) -> dict[int, dict]:
        return {s: {"correct": c} for s, c in correct.items()}

    a = runs({0: [T, T, T, F], 1: [F, T, F, F], 2: [T, F, T, F], 3: []})
    b = runs({3: [T, T, T, T], 0: [T, F, F, F], 1: [F, F, F, T], 2: [F, F, F, F]})
    out = gf.exact_match_contrast(a, b, [0, 1, 2, 3])
    assert out["seeds"] == [0, 1, 2] and out["df"] == 2
    assert out["per_seed"] == pytest.approx([0.5, 0.0, 0.5])
    half = stats.t.ppf(0.975, 2) * math.sqrt(1 / 12) / math.sqrt(3)
    assert out["ci95"] == pytest.approx([1 / 3 - half, 1 / 3 + half], rel=1e-12)
    # per-problem differences averaged over the three seeds: 1/3, 2/3, 2/3, −1/3
    assert out["se_problems"] == pytest.approx(np.std([1, 2, 2, -1], ddof=1) / 3 / 2)
    lo, hi = out["ci95_hier_bootstrap"]
    assert -1 <= lo < 1 / 3 < hi <= 1
    assert gf.exact_match_contrast(a, b, [3]) is None
    one = gf.exact_match_contrast(a, b, [0])
    assert one["diff"] == 0.5 and all(math.isnan(x) for x in one["ci95"])
    table = gf.markdown_table({"methods": {}, "contrasts": [
        {"a": "x", "b": "y", "isolates": "", "diff": 0.1, "ci95": [0.0, 0.2],
         "ci95_hier_bootstrap": [0.0, 0.2], "seeds": [0, 1, 2], "exact_match": out}]})  # fmt: skip
    assert "| `x` − `y` | +0.3333 [" in table and "(n = 3) |" in table
    assert f"| ± {out['se_problems']:.4f} (4 problems) |" in table


def test_answers_and_accuracy():
    acc, se = gf.accuracy_se([[True, False, False, False], [True, True, False, False]])
    assert acc == pytest.approx(3 / 8) and se == pytest.approx(np.std([1, 0.5, 0, 0], ddof=1) / 2)
    assert gf.extract_answer("so 3+4=7\n#### 1,234 apples") == "1234"
    assert gf.extract_answer("no final answer") is None


# ----------------------------------------------------------------------------- resume and merge


def test_rows_resume_and_merge(tiny, tmp_path, monkeypatch):
    model, tok, data = tiny
    sizes = replace(TINY, lr_grid=(1e-3,), seeds=1, select_seeds=1, max_extend=0)
    exp = gf.Experiment(model, tok, data, sizes, CPU, tmp_path / "a", lambda m: None)
    calls = []
    real_train = gf.train
    monkeypatch.setattr(gf, "train", lambda *a: calls.append(a[3]) or real_train(*a))
    row = exp.row("lora", 1e-3, 0)
    assert calls == [1e-3] and math.isfinite(row["val_loss"])
    files = [p.name for p in (tmp_path / "a" / "rows").iterdir()]
    assert files == [gf.file_name("lora", 1e-3, 0, sizes) + ".json"]  # no temporary file left
    again = gf.Experiment(model, tok, data, sizes, CPU, tmp_path / "a", lambda m: None)
    assert again.row("lora", 1e-3, 0) == row and calls == [1e-3]  # resumed, not retrained
    other = gf.Experiment(
        model, tok, data, replace(sizes, steps=3), CPU, tmp_path / "a", lambda m: None
    )
    other.row("lora", 1e-3, 0)  # other sizes: the old row does not count, nor is it replaced
    assert calls == [1e-3, 1e-3] and exp.row("lora", 1e-3, 0) == row
    # merge: copies new rows, accepts identical ones, refuses a different result for one run
    b = gf.Experiment(model, tok, data, sizes, CPU, tmp_path / "b", lambda m: None)
    b.row("lora", 1e-3, 0)
    b.row("pissa", 1e-3, 0)
    assert gf.merge_rows([tmp_path / "b"], tmp_path / "c") == {"rows": 2, "heldout": 0}
    assert gf.merge_rows([tmp_path / "b"], tmp_path / "c") == {"rows": 0, "heldout": 0}
    path = tmp_path / "b" / "rows" / (gf.file_name("pissa", 1e-3, 0, sizes) + ".json")
    bad = json.loads(path.read_text())
    bad["val_loss"] += 1.0
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="two results"):
        gf.merge_rows([tmp_path / "b"], tmp_path / "c")


def test_heldout_scored_without_generation_gets_it_later(tiny, tmp_path, monkeypatch):
    """``--gen-seeds 0`` scores the losses now and leaves exact match for later: a later call
    that asks for generation adds it and keeps the losses (no second scoring pass); a call
    that asks for none, or a row that has it, is served from the file."""
    model, tok, data = tiny
    sizes = replace(TINY, lr_grid=(1e-3,), seeds=1, select_seeds=1, max_extend=0)
    no_gen = gf.Experiment(
        model, tok, data, replace(sizes, gen_seeds=0), CPU, tmp_path, lambda m: None
    )
    first = no_gen.heldout("lora", 1e-3, 0)
    assert first["correct"] == [] and math.isfinite(first["heldout_loss"])
    calls = {"score": 0, "gen": 0}
    real_score, real_gen = gf.per_problem, gf.generate_answers

    def score(*a):
        calls["score"] += 1
        return real_score(*a)

    def gen(*a):
        calls["gen"] += 1
        return real_gen(*a)

    monkeypatch.setattr(gf, "per_problem", score)
    monkeypatch.setattr(gf, "generate_answers", gen)
    assert no_gen.heldout("lora", 1e-3, 0) == first and calls == {"score": 0, "gen": 0}
    exp = gf.Experiment(model, tok, data, sizes, CPU, tmp_path, lambda m: None)
    full = exp.heldout("lora", 1e-3, 0)
    assert calls == {"score": 0, "gen": 1} and len(full["correct"]) == sizes.gen
    assert full["heldout"] == first["heldout"] and full["heldout_loss"] == first["heldout_loss"]
    assert full["eval_seconds"] >= first["eval_seconds"]
    assert exp.heldout("lora", 1e-3, 0) == full and calls["gen"] == 1  # now cached


def test_experiment_end_to_end_selects_on_validation_only(tiny, tmp_path, monkeypatch):
    """Every method runs, the held-out split is read only after the rate is chosen, and
    ``summarize`` writes its files with a bootstrap interval for each method against LoRA."""
    model, tok, data = tiny
    held = id(data["heldout"])
    order: list[str] = []
    real = gf.per_problem
    monkeypatch.setattr(
        gf,
        "per_problem",
        lambda m, ex, d: order.append("heldout" if id(ex) == held else "val") or real(m, ex, d),
    )
    before = gf.pooled(real(model, data["heldout"], CPU))
    exp = gf.Experiment(model, tok, data, TINY, CPU, tmp_path, lambda m: None)
    for method in gf.METHODS:
        order.clear()
        exp.method(method)
        n_val = len(TINY.lr_grid) * TINY.select_seeds * TINY.curve_points
        assert order[:n_val] == ["val"] * n_val and "heldout" in order, (method, order)
    # scored after every method: a method that wrote into the shared base model (PiSSA's
    # residual, an offset) would move the reference
    assert exp.score_base()["heldout_loss"] == pytest.approx(before, rel=1e-6)
    result = gf.summarize(tmp_path, TINY)
    assert set(result["methods"]) == set(gf.METHODS)
    assert result["base_model"]["heldout_loss"] == pytest.approx(before, rel=1e-6)
    assert "| base model" in (tmp_path / "table.md").read_text()
    pairs = {(c["a"], c["b"]) for c in result["contrasts"]}
    assert pairs == {(a, b) for a, b, _ in gf.CONTRASTS}
    for c in result["contrasts"]:
        assert c["ci95"][0] <= c["diff"] <= c["ci95"][1]
    for m, e in result["methods"].items():
        assert len(e["seeds"]) == TINY.seeds and math.isfinite(e["heldout_mean"])
        if m != gf.BASELINE:
            lo, hi = e["diff_to_lora"]["ci95"]
            assert lo <= e["diff_to_lora"]["diff"] <= hi
    for f in ("summary.json", "table.csv", "table.md", "curves.csv", "curves.png"):
        assert (tmp_path / f).stat().st_size > 0


# ----------------------------------------------------------------------------- the real run


@pytest.mark.slow
def test_quick_run_on_smollm2(tmp_path):
    """The real model end to end for the methods without a LoRA-DA solve: 630 float64 solves
    on SmolLM2's 210 layers take ~30 min on one core whatever the sizes (the tiny-model test
    above runs every method)."""
    methods = ["lora", "pissa", "lora_one"]
    result = gf.main(["--quick", "--out", str(tmp_path), "--methods", *methods])
    assert set(result["methods"]) == set(methods)
    for m, e in result["methods"].items():
        assert math.isfinite(e["heldout_mean"]) and len(e["seeds"]) == gf.QUICK.seeds, m


def test_gamma_study_rescales_lora_one_as_its_formula_says(tiny, tmp_path):
    """The loss at γ = 64 from the rescaled γ = 128 factors equals LoRA-One made at γ = 64 by
    its own code (catches a rescale by 128/γ instead of √(128/γ) per factor), and a larger γ
    moves the model less."""
    from lora_da_ref.torch.baselines import lora_one

    model, tok, data = tiny
    exp = gf.Experiment(model, tok, data, TINY, CPU, tmp_path, lambda m: None)
    out = gf.gamma_study(exp)
    direct = lora_one(
        model,
        [gf.as_batch(e, CPU) for e in data["fit"][: TINY.n_calib]],
        rank=gf.RANK,
        target_modules=gf.TARGETS,
        stable_gamma=64.0,
        loss_fn=gf.mean_loss,
    )
    m = gf.build(model, direct, "none", 0)
    val = gf.pooled(gf.per_problem(m, data["validation"], CPU))
    assert out["lora_one"]["64"]["step0_val_loss"] == pytest.approx(val, rel=1e-5)
    base = out["base"]["step0_val_loss"]
    moved = [abs(out["lora_one"][g]["step0_val_loss"] - base) for g in ("64", "128", "256")]
    assert moved[0] > moved[2]
    assert (tmp_path / "gamma_one.json").is_file()
