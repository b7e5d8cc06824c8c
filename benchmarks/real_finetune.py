"""LoRA fine-tuning of the real SmolLM2-135M-Instruct on HumanEval, one initialisation per method.

Usage: python benchmarks/real_finetune.py [--quick] [--device cpu|cuda] [--methods ...]
       [--seeds 2] [--out benchmarks/results] [--threads 1]

Prints one JSON object to stdout and writes ``real_finetune{,_quick}.json/.csv/_curves.csv/.png``
into ``--out``. Everything is fixed before any result is looked at:

* **model**: SmolLM2-135M-Instruct (``lora_da_ref.real.load_smollm2``, float32), PEFT LoRA r = 8 on
  all seven projections (q, k, v, o, gate, up, down) of all 30 layers (210 layers), dropout 0.
* **data**: the fixed HumanEval split of ``lora_da_ref.real`` (train: 123 tasks, held-out: 41).
  The train split is cut once more, by task id, into a *validation* part (``HumanEval/k`` with
  ``k % 5 == 0``: 24 tasks) and a *fit* part (the other 99). Sequences are
  ``lora_da_ref.real.tokenize_humaneval`` (prompt ++ canonical solution, ``labels = -100`` on the
  prompt), then windowed to the last ``prompt_tokens`` prompt tokens and the first
  ``completion_tokens`` completion tokens (CPU budget). The loss is the mean token cross-entropy
  over completion tokens only; the LM head is applied to those positions only (the same number).
* **training**: AdamW (no weight decay), cosine decay to 0, gradient clipping 1.0, ``batch``
  sequences per step (gradient of the batch's token-mean loss), ``steps`` steps over a seeded
  permutation of the fit part. The seed also draws LoRA's Kaiming A; the other initialisations
  are computed once (the official preset's LOBPCG with seed 0) and shared by the seeds.
* **learning rate, per method**: every method trains with seed 0 at every rate of ``lr_grid`` and
  the rate with the lowest *validation* loss after ``steps`` steps is selected (the held-out split
  plays no part). Then ``seeds`` seeds at that rate (seed 0 is the selection run itself, a
  deterministic repeat) are evaluated on the held-out split every ``eval_every`` steps, from
  snapshots of the adapter taken during training. When the winner is an end of the grid, the
  grid is extended by one point beyond it (×/÷ ``GRID_STEP`` = 4) and the selection repeated, up
  to ``max_extend`` (3) times; ``at_grid_edge`` flags a selection still at an end after that.
* **methods** (initialisation only; training is identical):
  ``lora``: PEFT's default (Kaiming-uniform A, B = 0), alpha 16 (s = 2);
  ``pissa``: PEFT ``init_lora_weights="pissa"`` (top-r SVD of W0, base offset), alpha 16;
  ``lora_one``: A = top-r left singular vectors of −G (Eq. 22; ``lora_da_ref.initializers``'
  ``lora_one``), B = 0, alpha 16; G = the gradient of the token-mean completion loss over the
  calibration set;
  ``lora_da_official``: ``init_lora_da`` with ``LoraDAConfig.official()`` + ``apply_lora_da``
  (offset "none"), trained with its intended rsLoRA alpha 16 (s = 16/√8);
  ``lora_da_paper``: ``LoraDAConfig.paper_literal()``, alpha = r (s = 1), as ``lora-da init``'s presets.
  Calibration set = the first ``n_calib`` fit sequences, batch 1; N = the fit-part size. With
  fewer calibration tokens than a layer's input width (down_proj: 1536) Z is singular and both
  presets' absolute damping (1e-6) fails the Cholesky (seen with 16 sequences), hence 64.
  Scale-swap controls (``--methods`` only, not in the default list):
  ``lora_one@da_scale``: LoRA-One's A divided by √γ (γ = 1024) with the official preset's PEFT
  scaling, B = 0; ``lora_da@one_scale``: the official preset's A0 times √γ (orthonormal) with
  LoRA-One's scaling (alpha 16), B = 0. Each pair then differs only in A's column space.
* **init time**: wall time of the initialisation (statistics/gradient pass, solves, PEFT wrap and
  write) for seed 0, on a shared machine: an indication, not a benchmark.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 8
ALPHA = 16.0
GAMMA = 1024.0  # LoRA-DA official preset's scale_gamma (√γ = 32)
IGNORE = -100
VALIDATION_MODULUS = 5  # train task HumanEval/k is in the validation part iff k % 5 == 0
METHODS = ("lora", "pissa", "lora_one", "lora_da_official", "lora_da_paper")
CONTROLS = ("lora_one@da_scale", "lora_da@one_scale")
SEEDED = ("lora",)  # init redrawn per seed; the others are computed once (seed 0)
EVAL_BATCH = 8
GRID_STEP = 4.0  # ratio of neighbouring learning rates in the grid


@dataclass(frozen=True)
class Sizes:
    prompt_tokens: int  # keep the last this many prompt tokens
    completion_tokens: int  # keep the first this many completion tokens
    steps: int
    batch: int
    eval_every: int
    n_calib: int
    lr_grid: tuple[float, ...]
    seeds: int
    limit_fit: int | None = None  # quick mode: use only the first tasks of each part
    limit_val: int | None = None
    limit_heldout: int | None = None
    max_extend: int = 0  # grid points added beyond an edge winner (GRID_STEP apart)


FULL = Sizes(
    prompt_tokens=32,
    completion_tokens=48,
    steps=20,
    batch=2,
    eval_every=5,
    n_calib=64,
    lr_grid=(1.25e-4, 5e-4, 2e-3, 8e-3),
    seeds=3,
    max_extend=3,
)
QUICK = Sizes(
    prompt_tokens=12,
    completion_tokens=12,
    steps=2,
    batch=2,
    eval_every=1,
    n_calib=2,
    lr_grid=(1e-3, 1e-2),
    seeds=2,
    limit_fit=4,
    limit_val=2,
    limit_heldout=2,
)


# ----------------------------------------------------------------------------- data


def task_number(task_id: str) -> int:
    return int(task_id.rsplit("/", 1)[1])


def split_validation(train: Sequence[dict[str, Any]]) -> tuple[list, list]:
    """(fit, validation) parts of the train split: validation iff ``k % 5 == 0`` for HumanEval/k."""
    val = [r for r in train if task_number(r["task_id"]) % VALIDATION_MODULUS == 0]
    fit = [r for r in train if task_number(r["task_id"]) % VALIDATION_MODULUS != 0]
    return fit, val


def window(example: dict[str, torch.Tensor], prompt_tokens: int, completion_tokens: int) -> dict:
    """The last ``prompt_tokens`` prompt tokens and the first ``completion_tokens`` completion
    tokens of a tokenised example (prompt = the leading ``labels == -100`` positions)."""
    labels = example["labels"]
    loss = (labels != IGNORE).nonzero()
    if loss.numel() == 0:
        raise ValueError("example has no completion token")
    start = int(loss[0])  # prompt length
    lo, hi = max(0, start - prompt_tokens), start + completion_tokens
    return {k: v[lo:hi].clone() for k, v in example.items()}


def load_data(tokenizer: Any, sizes: Sizes) -> dict[str, list[dict[str, torch.Tensor]]]:
    from lora_da_ref.real import humaneval, tokenize_humaneval

    fit, val = split_validation(humaneval("train"))
    parts = {"fit": fit, "val": val, "heldout": humaneval("heldout")}
    limits = {"fit": sizes.limit_fit, "val": sizes.limit_val, "heldout": sizes.limit_heldout}
    out = {}
    for name, records in parts.items():
        records = records[: limits[name]]
        examples = tokenize_humaneval(records, tokenizer)
        out[name] = [window(e, sizes.prompt_tokens, sizes.completion_tokens) for e in examples]
    return out


def as_batch(example: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v[None].to(device) for k, v in example.items()}


def pad_batch(examples: Sequence[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch (pad: id 0, attention 0, label -100): the causal model's outputs at
    the real positions are those of the unpadded sequences."""
    T = max(int(e["input_ids"].numel()) for e in examples)
    batch = {
        "input_ids": torch.zeros((len(examples), T), dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), T), dtype=torch.long),
        "labels": torch.full((len(examples), T), IGNORE, dtype=torch.long),
    }
    for b, e in enumerate(examples):
        n = int(e["input_ids"].numel())
        for k in batch:
            batch[k][b, :n] = e[k]
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- loss


def causal_lm(model: Any) -> Any:
    """The ``*ForCausalLM`` module inside a PEFT model (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of the completion tokens' cross-entropy, their count) for a batch.

    Equal to ``model(**batch).loss`` times the count (HF's shift by one: position t predicts
    token t+1), but the LM head only sees the positions whose next token is a loss token.
    """
    lm = causal_lm(model)
    hidden = lm.model(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
    ).last_hidden_state[:, :-1]  # (B, T−1, d)
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    logits = lm.lm_head(hidden[keep])  # (n, vocab)
    return F.cross_entropy(logits.float(), target[keep], reduction="sum"), int(keep.sum())


def mean_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's mean loss over its completion tokens (``init_lora_da``'s ``loss_fn``)."""
    total, n = loss_sum(model, batch)
    return total / n


@torch.no_grad()
def evaluate(model: Any, examples: Sequence[dict], device: torch.device) -> float:
    """Token-weighted mean completion loss over ``examples`` (one sequence at a time, no pad)."""
    was = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        order = sorted(range(len(examples)), key=lambda i: int(examples[i]["input_ids"].numel()))
        for i in range(0, len(order), EVAL_BATCH):  # similar lengths together: little padding
            chunk = [examples[j] for j in order[i : i + EVAL_BATCH]]
            s, n = loss_sum(model, pad_batch(chunk, device))
            total, count = total + float(s), count + n
        return total / count
    finally:
        model.train(was)


# ----------------------------------------------------------------------------- initialisations


@dataclass
class Init:
    """A method's prepared initialisation: what the PEFT adapter gets and how it is scaled."""

    lora_alpha: float
    use_rslora: bool = False
    pissa: bool = False
    lora_A: dict[str, torch.Tensor] | None = None  # PEFT layout (r, d_in)
    lora_B: dict[str, torch.Tensor] | None = None  # (d_out, r); None = zeros
    factors: Any = None  # LoRA-DA factors for apply_lora_da
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def mean_gradient(model: Any, calib: Sequence[dict], device: torch.device) -> dict[str, Any]:
    """G per target, torch orientation (d_out, d_in): gradient of the token-mean completion loss
    over the calibration set w.r.t. the pre-trained weights (the model is restored)."""
    from lora_da_ref.torch import find_target_modules

    weights = {n: m.weight for n, m in find_target_modules(model, TARGETS).items()}
    flags = {n: w.requires_grad for n, w in weights.items()}
    sums = {n: torch.zeros_like(w) for n, w in weights.items()}
    tokens = 0
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for e in calib:
            s, n = loss_sum(model, as_batch(e, device))
            for name, g in zip(weights, torch.autograd.grad(s, list(weights.values()))):
                sums[name] += g
            tokens += n
    finally:
        for name, w in weights.items():
            w.requires_grad_(flags[name])
    return {n: s / tokens for n, s in sums.items()}


def lora_one_A(grads: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """lora_A = Uᵀ (r, d_in), U = top-r left singular vectors of −G (paper orientation G = gradᵀ)."""
    out = {}
    for name, g in grads.items():
        U = torch.linalg.svd(-g.T.float(), full_matrices=False)[0][:, :rank]  # (d_in, r)
        out[name] = U.T.contiguous()
    return out


def lora_da_factors(
    model: Any, calib: Sequence[dict], preset: str, n_train: int, seed: int, device: torch.device
) -> Any:
    from lora_da_ref.torch import LoraDAConfig, init_lora_da

    make = LoraDAConfig.official if preset == "official" else LoraDAConfig.paper_literal
    config = make(rank=RANK, n_train=n_train, target_modules=TARGETS, seed=seed)
    batches = [as_batch(e, device) for e in calib]
    return init_lora_da(model, batches, config, loss_fn=mean_loss, progress=False)


def prepare(
    method: str,
    base: Any,
    calib: Sequence[dict],
    n_train: int,
    seed: int,
    device: torch.device,
    cache: dict,
) -> Init:
    """The initialisation of ``method`` on the un-adapted ``base`` (left unchanged)."""
    t0 = time.perf_counter()
    if method == "lora":
        init = Init(lora_alpha=ALPHA)
    elif method == "pissa":
        init = Init(lora_alpha=ALPHA, pissa=True)  # the SVDs run inside get_peft_model
    elif method in ("lora_one", "lora_one@da_scale"):
        A = cache.get("lora_one_A")
        if A is None:
            A = cache["lora_one_A"] = lora_one_A(mean_gradient(base, calib, device), RANK)
        if method == "lora_one":
            init = Init(lora_alpha=ALPHA, lora_A=A)
        else:
            scale = 1.0 / math.sqrt(GAMMA)
            init = Init(
                lora_alpha=ALPHA, use_rslora=True, lora_A={n: a * scale for n, a in A.items()}
            )
    elif method in ("lora_da_official", "lora_da@one_scale"):
        key = ("official", seed)
        if key not in cache:
            cache[key] = lora_da_factors(base, calib, "official", n_train, seed, device)
        factors = cache[key]
        if method == "lora_da_official":
            init = Init(lora_alpha=ALPHA, use_rslora=True, factors=factors)
        else:
            scale = math.sqrt(GAMMA)
            A = {n: (f.A.T * scale).contiguous() for n, f in factors.items()}
            init = Init(lora_alpha=ALPHA, lora_A=A)
        init.info = _lora_da_info(factors)
    elif method == "lora_da_paper":
        key = ("paper", 0)  # eigh: deterministic, the seed plays no part
        if key not in cache:
            cache[key] = lora_da_factors(base, calib, "paper", n_train, 0, device)
        init = Init(lora_alpha=float(RANK), factors=cache[key], info=_lora_da_info(cache[key]))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS + CONTROLS}")
    init.seconds = time.perf_counter() - t0
    return init


def _lora_da_info(factors: dict) -> dict[str, float]:
    """Size of the start offset: median ‖A0 B0‖_F over layers (before PEFT's scaling s)."""
    norms = torch.tensor([float(torch.linalg.matrix_norm(f.A @ f.B)) for f in factors.values()])
    return {"median_A0B0_fro": float(norms.median()), "max_A0B0_fro": float(norms.max())}


def build(base: Any, init: Init, seed: int) -> Any:
    """A fresh PEFT model on a copy of ``base`` holding ``init`` (``base`` is not modified)."""
    from peft import LoraConfig, get_peft_model

    from lora_da_ref.torch import apply_lora_da
    from lora_da_ref.torch.adapter import lora_modules

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=RANK,
        lora_alpha=init.lora_alpha,
        use_rslora=init.use_rslora,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        bias="none",
        init_lora_weights="pissa" if init.pissa else True,
    )
    peft_model = get_peft_model(model, config)
    if init.factors is not None:
        apply_lora_da(peft_model, init.factors, offset="none")
    if init.lora_A is not None:
        layers = lora_modules(peft_model)
        with torch.no_grad():
            for name, A in init.lora_A.items():
                layers[name].lora_A["default"].weight.copy_(A)
                layers[name].lora_B["default"].weight.zero_()
    return peft_model


# ----------------------------------------------------------------------------- training


@dataclass
class Run:
    method: str
    lr: float
    seed: int
    steps: list[int] = field(default_factory=list)  # snapshot steps
    snapshots: list[dict[str, torch.Tensor]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: float = float("nan")  # after the last step
    heldout: list[float] = field(default_factory=list)  # at ``steps``
    seconds: float = 0.0


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))
    )


def train(
    model: Any, data: dict, sizes: Sizes, lr: float, seed: int, device: torch.device, run: Run
) -> None:
    """``sizes.steps`` AdamW steps on the fit part; snapshots every ``eval_every`` steps."""
    fit = data["fit"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = cosine(opt, sizes.steps)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(sizes.steps + 1):
        if step % sizes.eval_every == 0 or step == sizes.steps:
            run.steps.append(step)
            run.snapshots.append(trainable_state(model))
        if step == sizes.steps:
            break
        while len(order) < sizes.batch:  # epochs of seeded permutations
            order += torch.randperm(len(fit), generator=gen).tolist()
        idx, order = order[: sizes.batch], order[sizes.batch :]
        total, tokens = loss_sum(model, pad_batch([fit[i] for i in idx], device))
        loss = total / tokens  # the batch's token-mean loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        run.train_loss.append(loss_value if math.isfinite(loss_value) else float("inf"))
    run.seconds = time.perf_counter() - t0
    value = evaluate(model, data["val"], device)
    run.val_loss = value if math.isfinite(value) else float("inf")


def heldout_curve(model: Any, run: Run, data: dict, device: torch.device) -> None:
    """Held-out loss at each snapshot of ``run`` (``model`` = the run's model or a rebuild)."""
    run.heldout = []
    for state in run.snapshots:
        load_trainable(model, state)
        value = evaluate(model, data["heldout"], device)
        run.heldout.append(value if math.isfinite(value) else float("inf"))


# ----------------------------------------------------------------------------- selection


def select_lr(val_loss: dict[float, float]) -> tuple[float, bool]:
    """(rate with the lowest validation loss, whether it lies at an end of the grid).

    Non-finite losses (divergence) never win; ties go to the smaller rate.
    """
    if not val_loss:
        raise ValueError("no learning rates to select from")
    grid = sorted(val_loss)
    finite = [lr for lr in grid if math.isfinite(val_loss[lr])]
    if not finite:
        raise ValueError(f"every learning rate diverged: {val_loss}")
    best = min(finite, key=lambda lr: (val_loss[lr], lr))
    return best, len(grid) > 1 and best in (grid[0], grid[-1])


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    sd = float(t.std(unbiased=True)) if t.numel() > 1 else float("nan")
    return float(t.mean()), sd


# ----------------------------------------------------------------------------- experiment


def run_method(
    method: str,
    base: Any,
    data: dict,
    sizes: Sizes,
    device: torch.device,
    log: Callable[[str], None],
) -> dict[str, Any]:
    cache: dict = {}
    calib = data["fit"][: sizes.n_calib]
    n_train = len(data["fit"])
    inits: dict[int, Init] = {}
    templates: dict[int, Any] = {}  # seed -> the initialised PEFT model, copied for each run

    def fresh(seed: int) -> Any:
        if method not in SEEDED and 0 in templates:
            seed = 0  # a deterministic init: the seed only changes the data order
        if seed not in templates:
            t0 = time.perf_counter()
            inits[seed] = prepare(method, base, calib, n_train, seed, device, cache)
            templates[seed] = build(base, inits[seed], seed)
            inits[seed].seconds = time.perf_counter() - t0  # prepare + PEFT wrap + write
        return copy.deepcopy(templates[seed])

    # 1. learning rate on the validation part (seed 0); a winner at an end of the grid extends
    #    the grid by one factor-GRID_STEP point beyond it, up to sizes.max_extend times
    selection: dict[float, Run] = {}

    def try_lr(lr: float) -> None:
        run = Run(method, lr, 0)
        model = fresh(0)
        train(model, data, sizes, lr, 0, device, run)
        selection[lr] = run
        log(f"{method} lr={lr:g} seed=0 val={run.val_loss:.4f} ({run.seconds:.0f}s)")

    for lr in sizes.lr_grid:
        try_lr(lr)
    lr, edge = select_lr({k: r.val_loss for k, r in selection.items()})
    for _ in range(sizes.max_extend):
        if not edge:
            break
        grid = sorted(selection)
        try_lr(lr / GRID_STEP if lr == grid[0] else lr * GRID_STEP)
        lr, edge = select_lr({k: r.val_loss for k, r in selection.items()})
    # 2. held-out curves at that rate: the selection run's own snapshots (seed 0), other seeds
    runs = [selection[lr]]
    model = fresh(0)
    heldout_curve(model, runs[0], data, device)
    del model
    for seed in range(1, sizes.seeds):
        run = Run(method, lr, seed)
        model = fresh(seed)
        train(model, data, sizes, lr, seed, device, run)
        heldout_curve(model, run, data, device)
        runs.append(run)
        del model
    for r in runs:
        log(f"{method} lr={lr:g} seed={r.seed} heldout={[round(v, 4) for v in r.heldout]}")
    finals = [r.heldout[-1] for r in runs]
    mean, sd = mean_sd(finals)
    curves = torch.tensor([r.heldout for r in runs], dtype=torch.float64)
    return {
        "method": method,
        "selected_lr": lr,
        "at_grid_edge": edge,
        "val_loss_by_lr": {f"{k:g}": r.val_loss for k, r in selection.items()},
        "heldout_final_mean": mean,
        "heldout_final_sd": sd,
        "heldout_final_by_seed": finals,
        "heldout_step0_mean": float(curves[:, 0].mean()),
        "steps": runs[0].steps,
        "heldout_curve_mean": curves.mean(0).tolist(),
        "heldout_curve_sd": curves.std(0, unbiased=True).tolist() if len(runs) > 1 else None,
        "heldout_curves": [r.heldout for r in runs],
        "train_loss_curves": [r.train_loss for r in runs],
        "init_seconds": inits[0].seconds,
        "train_seconds_per_run": sum(r.seconds for r in runs) / len(runs),
        "lora_alpha": inits[0].lora_alpha,
        "use_rslora": inits[0].use_rslora,
        "init_info": inits[0].info,
    }


def write_outputs(result: dict, out: Path, stem: str) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        k: out / f"{stem}{suffix}"
        for k, suffix in (
            ("json", ".json"),
            ("csv", ".csv"),
            ("curves", "_curves.csv"),
            ("png", ".png"),
        )
    }
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "method",
                "selected_lr",
                "at_grid_edge",
                "val_loss_at_selected",
                "heldout_final_mean",
                "heldout_final_sd",
                "n_seeds",
                "heldout_step0",
                "init_seconds",
                "lora_alpha",
                "use_rslora",
            ]
        )
        for m in result["methods"]:
            w.writerow(
                [
                    m["method"],
                    m["selected_lr"],
                    m["at_grid_edge"],
                    f"{m['val_loss_by_lr'][format(m['selected_lr'], 'g')]:.6f}",
                    f"{m['heldout_final_mean']:.6f}",
                    f"{m['heldout_final_sd']:.6f}",
                    len(m["heldout_final_by_seed"]),
                    f"{m['heldout_step0_mean']:.6f}",
                    f"{m['init_seconds']:.2f}",
                    m["lora_alpha"],
                    m["use_rslora"],
                ]
            )
    with paths["curves"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "step", "heldout_loss"])
        for m in result["methods"]:
            for seed, curve in enumerate(m["heldout_curves"]):
                for step, v in zip(m["steps"], curve):
                    w.writerow([m["method"], seed, step, f"{v:.6f}"])
    _plot(result, paths["png"])
    return {k: str(p) for k, p in paths.items()}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in result["methods"]:
        steps = m["steps"]
        mean = torch.tensor(m["heldout_curve_mean"])
        label = f"{m['method']} (lr {m['selected_lr']:g})"
        (line,) = ax.plot(steps, mean, marker="o", ms=3, label=label)
        if m["heldout_curve_sd"] is not None:
            sd = torch.tensor(m["heldout_curve_sd"])
            ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
        lrs = sorted(float(k) for k in m["val_loss_by_lr"])
        vals = [m["val_loss_by_lr"][format(k, "g")] for k in lrs]
        bx.plot(lrs, vals, marker="o", color=line.get_color(), label=m["method"])
    ax.axhline(result["base_heldout_loss"], color="gray", ls=":", lw=1, label="base model")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out completion loss (mean ± s.d. over seeds)")
    ax.set_title("SmolLM2-135M, HumanEval held-out split")
    ax.legend(fontsize=7)
    ax.set_yscale("log")  # a start far from W0 (paper preset) would flatten the others
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("learning rate")
    bx.set_ylabel("validation loss after training (seed 0)")
    bx.set_title("per-method learning-rate selection")
    tag = "QUICK (CI-sized, not a result)" if result["quick"] else ""
    fig.suptitle(tag, color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(paths: Sequence[str], out: Path, stem: str) -> dict[str, Any]:
    """One result from several runs' JSON files (e.g. methods run in separate processes).

    The runs must share every size except ``n_calib`` — which only LoRA-One and LoRA-DA read, so
    a method that ignores it may come from a run with another value; each method keeps the
    command that produced it.
    """
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    methods: list[dict[str, Any]] = []
    for path, run in zip(paths, runs):
        for key in ("quick", "rank", "targets", "base_heldout_loss", "data"):
            if run[key] != first[key]:
                raise ValueError(f"{path}: {key} differs from {paths[0]}")
        for m in run["methods"]:
            skip = {"n_calib"} if m["method"] in ("lora", "pissa") else set()  # no calibration
            mine = {k: v for k, v in run["sizes"].items() if k not in skip}
            if mine != {k: v for k, v in first["sizes"].items() if k not in skip}:
                raise ValueError(f"{path}: {m['method']} ran with other sizes than {paths[0]}")
            if any(m["method"] == k["method"] for k in methods):
                raise ValueError(f"{m['method']} appears in more than one run")
            methods.append({**m, "command": run["command"], "n_calib": run["sizes"]["n_calib"]})
    result = {
        **{k: v for k, v in first.items() if k not in ("methods", "files", "command")},
        "complete": set(METHODS) <= {m["method"] for m in methods},
        "merged_from": [{"command": r["command"], "complete": r["complete"],
                         "methods": [m["method"] for m in r["methods"]]} for r in runs],
        "methods": methods,
    }  # fmt: skip
    result["files"] = write_outputs(result, out, stem)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run (not a result)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when present)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + CONTROLS)
    p.add_argument("--seeds", type=int, default=None, help="seeds at the selected rate (>= 1)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p.add_argument("--lr-grid", type=float, nargs="+", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--stem", default=None, help="output file stem (default real_finetune[_quick])")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--cache-dir", default=None, help="SmolLM2 cache (default: load_smollm2's)")
    p.add_argument("--merge", nargs="+", default=None, help="combine these runs' JSON files")
    args = p.parse_args(argv)
    if args.merge:
        stem = args.stem or "real_finetune"
        merged = merge(args.merge, Path(args.out), stem)
        print(json.dumps({k: v for k, v in merged.items() if k != "methods"}, indent=1))
        return merged
    sizes = QUICK if args.quick else FULL
    changes = {
        k: v
        for k, v in (
            ("seeds", args.seeds),
            ("steps", args.steps),
            ("lr_grid", tuple(args.lr_grid) if args.lr_grid else None),
        )
        if v is not None
    }
    if changes:
        sizes = Sizes(**{**asdict(sizes), **changes})
    if sizes.seeds < 1 or sizes.steps < 1:
        raise ValueError("--seeds and --steps must be >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    from lora_da_ref.real import load_smollm2

    t_start = time.perf_counter()
    base, tokenizer = load_smollm2(torch.float32, args.cache_dir)
    base.to(device).eval()
    for prm in base.parameters():
        prm.requires_grad_(False)
    data = load_data(tokenizer, sizes)
    base_loss = evaluate(base, data["heldout"], device)
    log(
        "data: "
        + ", ".join(
            f"{k} {len(v)} seqs / {sum(int((e['labels'] != IGNORE).sum()) for e in v)} loss tokens"
            for k, v in data.items()
        )
        + f"; base held-out loss {base_loss:.4f}"
    )
    stem = args.stem or ("real_finetune_quick" if args.quick else "real_finetune")
    command = "python benchmarks/real_finetune.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    result: dict[str, Any] = {}
    methods: list[dict[str, Any]] = []
    for i, method in enumerate(args.methods):
        methods.append(run_method(method, base, data, sizes, device, log))
        log(
            f"{method}: held-out {methods[-1]['heldout_final_mean']:.4f} "
            f"± {methods[-1]['heldout_final_sd']:.4f} at lr {methods[-1]['selected_lr']:g}"
        )
        result = {
            "benchmark": "real_finetune",
            "quick": args.quick,
            "complete": i == len(args.methods) - 1,  # False: written after each method
            "command": command,
            "device": str(device),
            "threads": args.threads,
            "torch": torch.__version__,
            "sizes": asdict(sizes),
            "rank": RANK,
            "targets": list(TARGETS),
            "data": {
                k: {
                    "sequences": len(v),
                    "loss_tokens": sum(int((e["labels"] != IGNORE).sum()) for e in v),
                    "tokens": sum(int(e["input_ids"].numel()) for e in v),
                }
                for k, v in data.items()
            },
            "base_heldout_loss": base_loss,
            "methods": methods,
            "wall_seconds": time.perf_counter() - t_start,
        }
        result["files"] = write_outputs(result, Path(args.out), stem)
    summary = {
        m["method"]: {
            k: m[k]
            for k in (
                "selected_lr",
                "at_grid_edge",
                "heldout_final_mean",
                "heldout_final_sd",
                "init_seconds",
            )
        }
        for m in methods
    }
    print(
        json.dumps(
            {**{k: v for k, v in result.items() if k != "methods"}, "summary": summary}, indent=1
        )
    )
    return result


if __name__ == "__main__":
    main()
