"""benchmarks/real_finetune.py: split, windowing, loss, LoRA-One subspace, LR selection, fairness.

The fast tests use a random tiny LLaMA; the real-model ``--quick`` run is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "real_finetune", ROOT / "benchmarks/real_finetune.py"
)
rf = importlib.util.module_from_spec(_spec)
sys.modules["real_finetune"] = rf
_spec.loader.exec_module(rf)


def _tiny(seed: int = 0):
    from lora_da_ref.data import tiny_llama

    model = tiny_llama(seed, hidden=32, layers=2, heads=4, vocab=64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _example(prompt: int, completion: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (prompt + completion,), generator=g)
    labels = ids.clone()
    labels[:prompt] = rf.IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# ----------------------------------------------------------------------------- data


def test_validation_split_is_a_fixed_disjoint_part_of_train():
    from lora_da_ref.real import humaneval

    train = humaneval("train")
    fit, val = rf.split_validation(train)
    ids = lambda rs: {r["task_id"] for r in rs}  # noqa: E731
    assert ids(fit).isdisjoint(ids(val))
    assert ids(fit) | ids(val) == ids(train)
    assert ids(val).isdisjoint(ids(humaneval("heldout")))
    assert len(val) == 24 and len(fit) == 99
    assert all(rf.task_number(r["task_id"]) % 5 == 0 for r in val)
    assert rf.split_validation(train) == (fit, val)  # deterministic


def test_window_keeps_prompt_tail_and_completion_head():
    e = _example(prompt=10, completion=7)
    w = rf.window(e, prompt_tokens=4, completion_tokens=5)
    assert torch.equal(w["input_ids"], e["input_ids"][6:15])
    assert torch.equal(w["labels"][:4], torch.full((4,), rf.IGNORE))
    assert torch.equal(w["labels"][4:], e["input_ids"][10:15])
    short = rf.window(e, prompt_tokens=50, completion_tokens=50)  # nothing to cut
    assert all(torch.equal(short[k], e[k]) for k in e)
    with pytest.raises(ValueError, match="no completion"):
        rf.window({**e, "labels": torch.full_like(e["labels"], rf.IGNORE)}, 4, 4)


def test_loss_sum_is_hf_completion_loss():
    model = _tiny()
    e = _example(prompt=9, completion=6)
    batch = rf.as_batch(e, torch.device("cpu"))
    total, n = rf.loss_sum(model, batch)
    assert n == 6  # completion tokens only
    ref = model(**batch).loss  # HF shifts by one and ignores -100
    torch.testing.assert_close(total / n, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- initialisations


def test_lora_one_subspace_matches_numpy_registry():
    from lora_da_ref.initializers import INITIALIZERS, InitProblem

    model = _tiny()
    calib = [_example(6, 5, s) for s in range(3)]
    grads = rf.mean_gradient(model, calib, torch.device("cpu"))
    A = rf.lora_one_A(grads, rank=3)
    name = next(iter(grads))
    G = grads[name].T.double().numpy()  # paper orientation (d_in, d_out)
    d_in = G.shape[0]
    problem = InitProblem(W0=np.zeros_like(G), G=G, J=np.eye(G.size), n=10)
    ref = INITIALIZERS["lora_one"](problem, 3, np.random.default_rng(0))
    U = A[name].T.double().numpy()  # (d_in, r)
    cos = np.linalg.svd(U.T @ np.linalg.qr(ref[0])[0], compute_uv=False)
    assert U.shape == (d_in, 3)
    np.testing.assert_allclose(cos, 1.0, atol=1e-6)  # same subspace (principal angles 0)


def test_mean_gradient_is_the_token_mean_loss_gradient():
    model = _tiny()
    calib = [_example(6, 5, 0), _example(4, 9, 1)]  # unequal token counts: weighting matters
    grads = rf.mean_gradient(model, calib, torch.device("cpu"))
    name, g = next(iter(grads.items()))
    w = dict(model.named_modules())[name].weight
    w.requires_grad_(True)
    sums = [rf.loss_sum(model, rf.as_batch(e, torch.device("cpu"))) for e in calib]
    loss = sum(s for s, _ in sums) / sum(n for _, n in sums)
    (ref,) = torch.autograd.grad(loss, [w])
    w.requires_grad_(False)
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- selection


def test_select_lr():
    assert rf.select_lr({1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.7}) == (3e-3, False)
    assert rf.select_lr({1e-3: 2.0, 3e-3: 1.9, 1e-2: 1.7}) == (1e-2, True)
    assert rf.select_lr({1e-3: 1.0, 3e-3: 1.9, 1e-2: 1.7}) == (1e-3, True)
    assert rf.select_lr({1e-3: 2.0, 3e-3: 1.5, 1e-2: math.inf}) == (3e-3, False)
    assert rf.select_lr({1e-3: 2.0, 3e-3: math.nan, 1e-2: 2.5}) == (1e-3, True)
    assert rf.select_lr({1e-3: 1.5, 3e-3: 1.5, 1e-2: 1.6}) == (1e-3, True)  # tie: smaller
    with pytest.raises(ValueError, match="diverged"):
        rf.select_lr({1e-3: math.inf, 1e-2: math.nan})


def test_run_method_selects_on_validation_and_touches_heldout_only_after(monkeypatch):
    """Fairness: the rate is argmin of validation loss; held-out is evaluated only afterwards."""
    base = _tiny()
    data = {
        "fit": [_example(5, 6, s) for s in range(6)],
        "val": [_example(5, 6, 100 + s) for s in range(2)],
        "heldout": [_example(5, 6, 200 + s) for s in range(2)],
    }
    names = {id(v): k for k, v in data.items()}
    seen: list[str] = []
    real_evaluate = rf.evaluate

    def spy(model, examples, device):
        seen.append(names[id(examples)])
        return real_evaluate(model, examples, device)

    monkeypatch.setattr(rf, "evaluate", spy)
    sizes = rf.Sizes(prompt_tokens=5, completion_tokens=6, steps=2, batch=2, eval_every=1,
                     n_calib=2, lr_grid=(1e-4, 1e-2, 1.0), seeds=2)  # fmt: skip
    for method in ("lora", "lora_one", "lora_da_paper"):
        seen.clear()
        out = rf.run_method(method, base, data, sizes, torch.device("cpu"), lambda m: None)
        n_grid = len(sizes.lr_grid)
        # every selection run is scored on validation before anything sees the held-out split
        assert seen[:n_grid] == ["val"] * n_grid and seen.index("heldout") == n_grid, seen
        val = {float(k): v for k, v in out["val_loss_by_lr"].items()}
        assert out["selected_lr"] == min(val, key=val.get)
        assert len(out["heldout_final_by_seed"]) == 2
        assert out["steps"] == [0, 1, 2]
        if method != "lora_da_paper":  # B = 0: the model starts as the base model
            base_loss = real_evaluate(base, data["heldout"], torch.device("cpu"))
            for curve in out["heldout_curves"]:
                assert curve[0] == pytest.approx(base_loss, rel=1e-6)
                assert curve[-1] != pytest.approx(base_loss, rel=1e-6)  # it trained


def test_grid_extends_beyond_an_edge_winner(monkeypatch):
    """A winner at an end of the grid adds points beyond it (÷4 or ×4) until the winner is
    interior or ``max_extend`` points were added; a broken extension (wrong direction, no stop)
    selects another rate or runs a different set of rates."""
    base = _tiny()
    data = {k: [_example(5, 6, s)] for s, k in enumerate(("fit", "val", "heldout"))}
    optimum = 1e-5  # validation loss = |log(lr / optimum)|: minimum below the grid

    def fake_train(model, data, sizes, lr, seed, device, run):
        run.val_loss, run.seconds = abs(math.log(lr / optimum)), 0.0
        run.steps, run.heldout, run.train_loss = [0], [], []

    monkeypatch.setattr(rf, "train", fake_train)
    monkeypatch.setattr(
        rf, "heldout_curve", lambda model, run, data, device: run.heldout.append(0.0)
    )
    grid = (1e-3, 4e-3)
    for extend, selected, edge in ((0, 1e-3, True), (2, 6.25e-5, True), (5, 1.5625e-5, False)):
        sizes = rf.Sizes(prompt_tokens=5, completion_tokens=6, steps=1, batch=1, eval_every=1,
                         n_calib=1, lr_grid=grid, seeds=1, max_extend=extend)  # fmt: skip
        out = rf.run_method("lora", base, data, sizes, torch.device("cpu"), lambda m: None)
        assert out["selected_lr"] == pytest.approx(selected) and out["at_grid_edge"] == edge
        n_tried = len(out["val_loss_by_lr"])
        assert n_tried == len(grid) + min(extend, 4)  # 1e-3 → 3.9e-6 is the 4th (interior win)


def test_scale_swap_controls_keep_the_subspace():
    base = _tiny()
    calib = [_example(5, 6, s) for s in range(2)]
    cpu = torch.device("cpu")
    cache: dict = {}
    one = rf.prepare("lora_one", base, calib, 10, 0, cpu, cache)
    one_da = rf.prepare("lora_one@da_scale", base, calib, 10, 0, cpu, cache)
    da = rf.prepare("lora_da_official", base, calib, 10, 0, cpu, cache)
    da_one = rf.prepare("lora_da@one_scale", base, calib, 10, 0, cpu, cache)
    for name, a in one.lora_A.items():
        torch.testing.assert_close(one_da.lora_A[name] * math.sqrt(rf.GAMMA), a)
        A0 = da.factors[name].A  # (d_in, r), column-orthonormal / √γ
        torch.testing.assert_close(da_one.lora_A[name], A0.T * math.sqrt(rf.GAMMA))
        gram = da_one.lora_A[name] @ da_one.lora_A[name].T
        torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-4, rtol=0)
    assert (one_da.lora_alpha, one_da.use_rslora) == (da.lora_alpha, da.use_rslora)
    assert (da_one.lora_alpha, da_one.use_rslora) == (one.lora_alpha, one.use_rslora)


# ----------------------------------------------------------------------------- the real run


@pytest.mark.slow
def test_quick_run_on_smollm2(tmp_path, capsys):
    result = rf.main(["--quick", "--out", str(tmp_path), "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["summary"]) == set(rf.METHODS)
    for m in result["methods"]:
        assert math.isfinite(m["heldout_final_mean"]) and m["selected_lr"] in rf.QUICK.lr_grid
        assert len(m["heldout_final_by_seed"]) == rf.QUICK.seeds
    for path in result["files"].values():
        assert Path(path).stat().st_size > 0


def _fake_run(methods, n_calib, tmp_path, name):
    sizes = {**rf.asdict(rf.FULL), "n_calib": n_calib}
    ms = [
        {
            "method": m, "selected_lr": 2e-3, "at_grid_edge": False,
            "val_loss_by_lr": {"0.0005": 1.3, "0.002": 1.2, "0.008": 1.5},
            "heldout_final_mean": 1.25, "heldout_final_sd": 0.01,
            "heldout_final_by_seed": [1.24, 1.26], "heldout_step0_mean": 1.6, "steps": [0, 5, 10],
            "heldout_curve_mean": [1.6, 1.3, 1.25], "heldout_curve_sd": [0.0, 0.01, 0.01],
            "heldout_curves": [[1.6, 1.3, 1.24], [1.6, 1.31, 1.26]], "init_seconds": 1.0,
            "lora_alpha": 16.0, "use_rslora": False,
        }
        for m in methods
    ]  # fmt: skip
    run = {"quick": False, "complete": False, "command": f"cmd {name}", "rank": 8,
           "targets": list(rf.TARGETS), "base_heldout_loss": 1.6, "data": {"fit": 99},
           "sizes": sizes, "methods": ms}  # fmt: skip
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(run))
    return str(path)


def test_merge_combines_runs_and_refuses_other_sizes(tmp_path):
    a = _fake_run(["lora_da_official", "lora_one"], 64, tmp_path, "a")
    b = _fake_run(["lora"], 16, tmp_path, "b")  # LoRA reads no calibration: n_calib may differ
    merged = rf.merge([a, b], tmp_path, "merged")
    assert [m["method"] for m in merged["methods"]] == ["lora_da_official", "lora_one", "lora"]
    assert merged["methods"][2]["command"] == "cmd b" and not merged["complete"]
    assert (tmp_path / "merged.csv").read_text().count("\n") == 4
    c = _fake_run(["lora_da_paper"], 16, tmp_path, "c")  # uses calibration: must match
    with pytest.raises(ValueError, match="other sizes"):
        rf.merge([a, c], tmp_path, "bad")
    with pytest.raises(ValueError, match="more than one run"):
        rf.merge([a, a], tmp_path, "bad")
