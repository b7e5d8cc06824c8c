"""Heavy rows: the products of a few massive activations in float64 (``statistics.HEAVY_ROW_RATIO``).

A float32 product ``xᵀx`` rounds with an error that grows with ``Σ_t ‖x_t‖²``: one massive row
(SmolLM2's first position carries 99.9 % of ``tr(Z)`` at layer 11's ``down_proj``) sets it for
every entry. Multiplying that row in float64 and the rest in float32 leaves the rounding of the
light rows only.
"""

from __future__ import annotations

import pytest
import torch

from lora_da_ref.torch import LoraDAConfig, collect_statistics
from lora_da_ref.torch import statistics as S
from tests.torch_cases import TokenMLP, mlp_batches, mlp_loss

RATIO = 100.0


def _rows(n: int = 512, d: int = 96, massive: float = 3e3, seed: int = 0) -> torch.Tensor:
    """Gaussian rows, row 0 scaled ``massive`` times (a sink token), with a shared offset so that
    the Gram matrix has large and small parts (float32 cancellation matters)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.5
    x[0] *= massive
    return x


def _gram(x: torch.Tensor, ratio: float | None, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(S, "HEAVY_ROW_RATIO", ratio)
    store: dict[str, torch.Tensor] = {}
    S._add_gram_rows(store, "z", x.float(), 1.0)
    return torch.tril(store["z"])  # the lower triangle is what the pass keeps


def test_heavy_row_in_float64_removes_most_of_the_rounding(monkeypatch):
    """Catches: the rule not applied (error stays), the heavy row dropped or counted twice (error
    of the size of ``x_0 x_0ᵀ``, 1e6 times the light rows' products)."""
    x = _rows()
    exact = torch.tril(x.float().double().mT @ x.float().double())  # the float32 inputs, exact
    plain = (_gram(x, None, monkeypatch) - exact).norm()
    split = (_gram(x, RATIO, monkeypatch) - exact).norm()
    light = torch.tril(x[1:].float().double().mT @ x[1:].float().double()).norm()
    u = torch.finfo(torch.float32).eps / 2
    assert split < plain / 100, (float(split), float(plain))
    assert split <= 4 * u * x.shape[0] ** 0.5 * light  # the light rows' rounding, nothing more


def test_heavy_rows_of_the_gradient_product(monkeypatch):
    """``G``'s product ``xᵀg`` with the same rule (rows chosen by ‖x_t‖). Catches: the heavy rows
    of x paired with the wrong rows of g (a permuted split gives an O(1) error)."""
    x = _rows()
    g = torch.randn(x.shape[0], 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = x.float().double().mT @ g.float().double()
    errors = {}
    for ratio in (None, RATIO):
        monkeypatch.setattr(S, "HEAVY_ROW_RATIO", ratio)
        store: dict[str, torch.Tensor] = {}
        S._addmm_rows(store, "g", x.float(), g.float(), 1.0)
        errors[ratio] = float((store["g"] - exact).norm() / exact.norm())
    assert errors[RATIO] < errors[None] / 100, errors
    assert errors[RATIO] < 1e-7


def test_no_heavy_rows_no_change(monkeypatch):
    """Rows within the ratio of the median, or float64 products: the plain path, bit for bit."""
    x = _rows(massive=1.0).float()
    monkeypatch.setattr(S, "HEAVY_ROW_RATIO", RATIO)
    assert S._heavy_rows(x) is None
    assert S._heavy_rows(_rows()) is None  # float64 rows: already exact
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    S._add_gram_rows(a, "z", x, 1.0)
    S._add_gram(b, "z", x, 1.0)
    assert torch.equal(a["z"], b["z"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pass_with_a_massive_token_is_closer_to_float64(monkeypatch, dtype):
    """The statistics pass of a per-token MLP whose first token is 3000× the others: with the
    rule, float32 statistics are closer to the float64 ones; float64 statistics do not change.
    Catches: the rule wired into Z's hook but not G's (or the reverse), or applied to float64."""
    model = TokenMLP(dims=(24, 32, 16, 5))
    batches = mlp_batches(n_batches=2, batch=2, seq=32, d_in=24, classes=5)
    for b in batches:
        b["inputs"][:, 0] *= 3e3
    targets = {f"{i}": model[i] for i in (0, 2, 4)}

    def stats(ratio, stat_dtype):
        monkeypatch.setattr(S, "HEAVY_ROW_RATIO", ratio)
        cfg = LoraDAConfig(rank=2, dtype=stat_dtype, label_shift=0, diagnostics="off")
        return collect_statistics(model, batches, targets, cfg, loss_fn=mlp_loss, progress=False)

    ref = stats(None, torch.float64)
    if dtype == torch.float64:
        with_rule = stats(RATIO, torch.float64)
        for k in ref.Z:
            assert torch.equal(ref.Z[k], with_rule.Z[k])
        return
    plain, split = stats(None, torch.float32), stats(RATIO, torch.float32)
    for kind in ("Z", "G"):
        for k in getattr(ref, kind):
            truth = getattr(ref, kind)[k]
            e_plain = float((getattr(plain, kind)[k] - truth).norm() / truth.norm())
            e_split = float((getattr(split, kind)[k] - truth).norm() / truth.norm())
            assert e_split <= e_plain, (kind, k, e_split, e_plain)
    first = "0"  # the massive token feeds the first layer's Z and G directly
    e = {r: float((s.Z[first] - ref.Z[first]).norm() / ref.Z[first].norm()) for r, s in
         ((None, plain), (RATIO, split))}  # fmt: skip
    assert e[RATIO] < e[None] / 10, e


def test_the_float64_rows_part_of_the_diagonal_is_kept(monkeypatch):
    """``diag`` receives ``alpha·Σ x_t²`` over the heavy rows only, exactly. Catches: the light
    rows added too, alpha ignored, the float32 rows' squares."""
    x = _rows()
    monkeypatch.setattr(S, "HEAVY_ROW_RATIO", RATIO)
    store: dict[str, torch.Tensor] = {}
    diag = torch.zeros(x.shape[1], dtype=torch.float64)
    S._add_gram_rows(store, "z", x.float(), 0.5, diag)
    assert torch.equal(diag, 0.5 * x[0].float().double().square())
    S._add_gram_rows(store, "z", _rows(massive=1.0).float(), 1.0, diag)  # no heavy row: no change
    assert torch.equal(diag, 0.5 * x[0].float().double().square())


def test_precision_bound_models_only_the_rounded_rows(monkeypatch):
    """The cheap tier's bound on a layer whose first token is massive: with the heavy row's part
    of diag Z left out of the rounding model the bound still covers the measured float32-vs-
    float64 angle, and is far below the bound that counts that row as rounded (a false alarm on
    SmolLM2's layer 11 down_proj: 0.11 rad for an angle below 1e-7). Here 4.5e-7 against
    1.0e-4, for an angle of 7.5e-8. Catches: the part not subtracted (no drop), a bound that
    drops everything (below the measured angle). (Subtracting it twice is not caught: Y's and G's
    terms alone cover this angle.)"""
    from lora_da_ref.torch.factors import principal_angles, solve_layer

    monkeypatch.setattr(S, "HEAVY_ROW_RATIO", RATIO)
    model = TokenMLP(dims=(24, 32, 16, 5))
    batches = mlp_batches(n_batches=2, batch=2, seq=32, d_in=24, classes=5)
    for b in batches:
        b["inputs"][:, 0] *= 3e3
    targets = {"0": model[0]}

    def solve(dtype):
        cfg = LoraDAConfig(rank=2, dtype=dtype, label_shift=0, diagnostics="cheap")
        stats = collect_statistics(model, batches, targets, cfg, loss_fn=mlp_loss, progress=False)
        return stats, cfg, solve_layer(stats, "0", cfg)

    stats, cfg, f32 = solve(torch.float32)
    _, _, f64 = solve(torch.float64)
    angle = float(principal_angles(f32.eig.vectors, f64.eig.vectors).max())
    bound = f32.diagnostics["precision_bound"]
    assert stats.heavy_diag["0"][0] > 0.99 * stats.Z["0"][0, 0]  # the massive token's share
    stats.heavy_diag.clear()  # as if every row had been rounded
    counted = solve_layer(stats, "0", cfg).diagnostics["precision_bound"]
    assert angle <= bound < counted / 10, (angle, bound, counted)
