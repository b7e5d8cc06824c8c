"""The tiny-LLaMA setting shared by fig2 and init_time: source/target Markov languages, pre-training,
and LoRA fine-tuning with each initialisation. Nothing is downloaded.

One shared setting, fixed before any result was looked at:

* **languages**: 61 tokens (ids 3..63 of a 64-token vocabulary), sequences of 32 tokens. The
  *source* language is a first-order Markov chain in which every token has 4 successors with
  probabilities (0.55, 0.25, 0.12, 0.08); the *target* language changes the successor sets of a
  random half of the tokens (new rules), the other half keeps the source rules;
* **model**: ``LlamaForCausalLM`` from a ``LlamaConfig`` (``lora_da_ref.data.tiny_llama``),
  4 layers, hidden 128 (quick: 2 layers, hidden 64), "pre-trained" from random weights on the
  source language with AdamW;
* **fine-tuning** (the paper's recipe scaled down): PEFT LoRA on all linear layers except
  ``lm_head``, r = 8, alpha = 16 (scaling alpha/r for every method), dropout 0; AdamW (lr 1e-3,
  no weight decay), batch 16, one epoch over N = 16·steps target sequences, cosine schedule
  with 3 % warm-up; held-out target loss and next-token accuracy on separate target sequences;
* **initialisations**: LoRA = PEFT's default (Kaiming-uniform A, B = 0); ``lora_one_subspace`` =
  LoRA-One's subspace with B = 0, not the official LoRA-One (whose B0 ≠ 0): A set to the top-r
  left singular vectors of −G (G = mean gradient of the loss on the calibration set, one
  backward pass); LoRA-DA = ``init_lora_da`` with ``LoraDAConfig.official()`` (β = 0.03,
  diagonal Y, ΔW/σ, γ = 1024, LOBPCG) or ``LoraDAConfig.paper_literal()`` (β = α = 1, full K-FAC Y, eigh),
  N = the fine-tuning set size, written with ``apply_lora_da(offset="none")`` so the model starts
  at ``W0 + s·A0B0`` as in the paper and the official code. Calibration set = the first 256
  training sequences (quick: 32) at batch size 1, as the official code.

The official code trains with rsLoRA scaling (alpha/√r); here every method shares PEFT's default
alpha/r so that only the initialisation differs.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lora_da_ref.data import tiny_llama

VOCAB = 64  # model vocabulary
# The languages use token ids 3..63: ids 0/1/2 are the config's pad/bos/eos, and the pad id's
# embedding is fixed at zero, so a sequence starting with it feeds RMSNorm a zero vector.
FIRST_ID = 3
N_STATES = VOCAB - FIRST_ID
SEQ_LEN = 32
BRANCH_PROBS = (0.55, 0.25, 0.12, 0.08)
SHIFTED_FRACTION = 0.5
LANGUAGE_SEED = 1234
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 8
ALPHA = 16
BATCH = 16
FT_LR = 1e-3
WARMUP = 0.03
PRETRAIN_LR = 3e-3
EVAL_SIZE = 256
EVAL_EVERY = 10


@dataclass(frozen=True)
class Scale:
    """Sizes of one run (full or quick)."""

    hidden: int
    layers: int
    pretrain_steps: int
    ft_steps: int
    n_calib: int
    eval_size: int


FULL = Scale(
    hidden=128, layers=4, pretrain_steps=300, ft_steps=150, n_calib=256, eval_size=EVAL_SIZE
)
QUICK = Scale(hidden=64, layers=2, pretrain_steps=80, ft_steps=40, n_calib=32, eval_size=64)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread (restored after): on a shared 2-core machine, 2 threads were ~5×
    slower than 1 for these tiny matrices, and single-thread timings are reproducible."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def scale_of(quick: bool) -> Scale:
    return QUICK if quick else FULL


# ---- the languages ------------------------------------------------------------------------------
def markov_chain(rng: np.random.Generator) -> np.ndarray:
    """A (S, S) transition matrix over the S = N_STATES language tokens: each has
    ``len(BRANCH_PROBS)`` random successors."""
    T = np.zeros((N_STATES, N_STATES))
    for tok in range(N_STATES):
        T[tok, rng.choice(N_STATES, size=len(BRANCH_PROBS), replace=False)] = BRANCH_PROBS
    return T


@functools.cache
def languages() -> tuple[np.ndarray, np.ndarray]:
    """(source, target) transition matrices; the target re-draws half of the rows."""
    rng = np.random.default_rng(LANGUAGE_SEED)
    source = markov_chain(rng)
    target = source.copy()
    new = markov_chain(rng)
    rows = rng.choice(N_STATES, size=int(SHIFTED_FRACTION * N_STATES), replace=False)
    target[rows] = new[rows]
    return source, target


def sample_sequences(T: np.ndarray, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` sequences (n, SEQ_LEN) of token ids of the chain ``T``, first state uniform."""
    states = np.empty((n, SEQ_LEN), dtype=np.int64)
    states[:, 0] = rng.integers(0, N_STATES, size=n)
    cdf = np.cumsum(T, axis=1)  # (S, S)
    for t in range(1, SEQ_LEN):
        u = rng.random(n)[:, None]
        states[:, t] = np.minimum(np.sum(cdf[states[:, t - 1]] < u, axis=1), N_STATES - 1)
    return torch.from_numpy(states + FIRST_ID)


def batch_of(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# ---- pre-training -------------------------------------------------------------------------------
def cosine_with_warmup(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, math.ceil(WARMUP * steps))

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (t - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@functools.cache
def pretrained(quick: bool) -> dict[str, torch.Tensor]:
    """State dict of the tiny LLaMA pre-trained on the source language (cached per process)."""
    sc = scale_of(quick)
    model = _fresh(sc)
    model.train()
    rng = np.random.default_rng([LANGUAGE_SEED, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    sched = cosine_with_warmup(opt, sc.pretrain_steps)
    source = languages()[0]
    for _ in range(sc.pretrain_steps):
        loss = model(**batch_of(sample_sequences(source, BATCH, rng))).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fresh(sc: Scale) -> nn.Module:
    return tiny_llama(
        0, hidden=sc.hidden, layers=sc.layers, vocab=VOCAB, intermediate=2 * sc.hidden
    )


def base_model(quick: bool) -> nn.Module:
    model = _fresh(scale_of(quick))
    model.load_state_dict(pretrained(quick))
    return model.eval()


# ---- fine-tuning data and evaluation --------------------------------------------------------------
@dataclass(frozen=True)
class TargetData:
    train: torch.Tensor  # (N, SEQ_LEN), in training order
    held_out: torch.Tensor  # (eval_size, SEQ_LEN)

    @property
    def validation(self) -> torch.Tensor:
        """(eval_size, SEQ_LEN) target sequences disjoint in stream from train and held-out: the
        split on which ``fig2_lr`` selects each method's learning rate."""
        n = self.held_out.shape[0]
        return sample_sequences(languages()[1], n, np.random.default_rng([LANGUAGE_SEED, 4]))

    def calibration(self, n: int) -> list[dict[str, torch.Tensor]]:
        """The first ``n`` training sequences at batch size 1 (official code)."""
        return [batch_of(self.train[i : i + 1]) for i in range(n)]


def target_data(seed: int, quick: bool) -> TargetData:
    sc = scale_of(quick)
    target = languages()[1]
    rng = np.random.default_rng([LANGUAGE_SEED, 2, seed])
    held_out = sample_sequences(target, sc.eval_size, np.random.default_rng([LANGUAGE_SEED, 3]))
    return TargetData(sample_sequences(target, BATCH * sc.ft_steps, rng), held_out)


@torch.no_grad()
def evaluate(model: nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """Held-out (mean token loss, next-token accuracy) on ``ids``."""
    was_training = model.training
    model.eval()
    try:
        out = model(**batch_of(ids))
        pred = out.logits[:, :-1].argmax(-1)  # (n, T−1)
        acc = (pred == ids[:, 1:]).double().mean()
        return float(out.loss), float(acc)
    finally:
        model.train(was_training)


# ---- initialisations ----------------------------------------------------------------------------
def lora_model(base: nn.Module, seed: int, rank: int = RANK):
    """PEFT LoRA on all target linears (default init: Kaiming A, B = 0), seeded."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), bias="none"
    )
    return get_peft_model(base, cfg)


def lora_one_subspace_prepare(base: nn.Module, calib, rank: int = RANK) -> dict[str, torch.Tensor]:
    """LoRA-One's subspace (Remark 4.3): top-r left singular vectors (d_in, r) of −G per layer,
    G = mean calibration gradient of the loss w.r.t. the pre-trained weight (one backward/batch)."""
    from lora_da_ref.torch import find_target_modules
    from lora_da_ref.torch.baselines import lora_one_subspace

    targets = find_target_modules(base, TARGETS)
    grads = mean_gradients(base, calib, targets)  # torch orientation (d_out, d_in) = Gᵀ
    return {n: lora_one_subspace(-g.T, rank) for n, g in grads.items()}


def subspace_write(peft_model, subspaces: dict[str, torch.Tensor]) -> None:
    """lora_A = Uᵀ (r, d_in), lora_B = 0: the model is unchanged at start."""
    from lora_da_ref.torch.adapter import lora_modules

    layers = lora_modules(peft_model)
    with torch.no_grad():
        for name, U in subspaces.items():
            layers[name].lora_A["default"].weight.copy_(U.T)
            layers[name].lora_B["default"].weight.zero_()


def mean_gradients(
    model: nn.Module, calib, targets: dict[str, nn.Linear]
) -> dict[str, torch.Tensor]:
    """Mean over calibration batches of ∂loss/∂weight, (d_out, d_in) per target (model restored)."""
    weights = {n: m.weight for n, m in targets.items()}
    flags = {n: w.requires_grad for n, w in weights.items()}
    sums = {n: torch.zeros_like(w) for n, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for b in calib:
            grads = torch.autograd.grad(model(**b).loss, list(weights.values()))
            for n, g in zip(weights, grads):
                sums[n] += g
    finally:
        for n, w in weights.items():
            w.requires_grad_(flags[n])
    return {n: s / len(calib) for n, s in sums.items()}


def lora_da_config(preset: str, n_train: int, rank: int = RANK):
    from lora_da_ref.torch import LoraDAConfig

    make = LoraDAConfig.official if preset == "official" else LoraDAConfig.paper_literal
    return make(rank=rank, n_train=n_train, target_modules=TARGETS)


def lora_da_prepare(base: nn.Module, calib, preset: str, n_train: int, rank: int = RANK):
    """LoRA-DA factors (Algorithm 1) on the un-adapted pre-trained model."""
    from lora_da_ref.torch import init_lora_da

    return init_lora_da(base, calib, lora_da_config(preset, n_train, rank), progress=False)


def lora_da_write(peft_model, factors) -> None:
    """Write (A0, B0) with no base offset: the model starts at W0 + s·A0B0 (paper, official)."""
    from lora_da_ref.torch.adapter import apply_lora_da

    apply_lora_da(peft_model, factors, offset="none")


Prepare = Callable[[nn.Module, list, int, int], Any]  # (base, calib, n_train, rank) -> state
Write = Callable[[Any, Any], None]  # (peft_model, state) -> None
# method -> (work on the un-adapted model, timed as initialisation; write into the PEFT adapter)
INITS: dict[str, tuple[Prepare, Write]] = {
    "lora": (lambda base, calib, n, r: None, lambda peft_model, state: None),
    "lora_one_subspace": (
        lambda base, calib, n, r: lora_one_subspace_prepare(base, calib, r),
        subspace_write,
    ),
    "lora_da_official": (
        lambda base, calib, n, r: lora_da_prepare(base, calib, "official", n, r),
        lora_da_write,
    ),
    "lora_da_paper": (
        lambda base, calib, n, r: lora_da_prepare(base, calib, "paper", n, r),
        lora_da_write,
    ),
}
METHODS = tuple(INITS)


# ---- scale-swap controls (fig2_lr): subspace and scale of the factors separated ----------------
def controls_prepare(base: nn.Module, calib, n: int, r: int):
    """Both LoRA-One's subspaces and LoRA-DA's official-preset factors of every layer."""
    return lora_one_subspace_prepare(base, calib, r), lora_da_prepare(base, calib, "official", n, r)


def one_subspace_at_da_scale_write(peft_model, state) -> None:
    """LoRA-One's subspace U (orthonormal, d_in × r) at LoRA-DA's scale: A = c·U with
    c = ‖A_DA‖_F/√r per layer (the official preset's 1/√γ-type scale), B = 0."""
    one, da = state
    scaled = {n: U * (da[n].A.norm() / U.shape[1] ** 0.5) for n, U in one.items()}
    subspace_write(peft_model, scaled)


def da_at_one_scale_write(peft_model, state) -> None:
    """LoRA-DA's subspace at the scale of ``lora_one_subspace`` (orthonormal): A = an orthonormal
    basis of col(A_DA), B = 0."""
    _, da = state
    subspace_write(peft_model, {n: torch.linalg.qr(f.A)[0] for n, f in da.items()})


CONTROLS: dict[str, tuple[Prepare, Write]] = {
    "lora_one_subspace_at_da_scale": (controls_prepare, one_subspace_at_da_scale_write),
    "lora_da_at_one_scale": (controls_prepare, da_at_one_scale_write),
}


# ---- one fine-tuning run --------------------------------------------------------------------------
@dataclass
class Run:
    train_loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    init_seconds: float = 0.0
    train_seconds: float = 0.0
    val_loss: float = float("nan")
    val_accuracy: float = float("nan")


def prepare_state(method: str, seed: int, quick: bool, rank: int = RANK) -> Any:
    """The initialiser's state of ``method`` (e.g. LoRA-DA's factors) for ``seed``'s calibration
    set, to reuse across learning rates (``finetune(..., state=...)``)."""
    sc, data = scale_of(quick), target_data(seed, quick)
    prepare, _ = {**INITS, **CONTROLS}[method]
    return prepare(base_model(quick), data.calibration(sc.n_calib), len(data.train), rank)


def finetune(
    method: str,
    seed: int,
    quick: bool,
    rank: int = RANK,
    *,
    lr: float = FT_LR,
    state: Any = None,
) -> Run:
    """Initialise with ``method`` and LoRA-fine-tune on the target language (module docstring).

    ``method`` is one of :data:`INITS` or :data:`CONTROLS`; ``state`` = a precomputed
    :func:`prepare_state` (then ``init_seconds`` is 0). ``run.val_loss``/``val_accuracy`` are the
    final metrics on the validation split (learning-rate selection).
    """
    sc, data = scale_of(quick), target_data(seed, quick)
    base = base_model(quick)
    calib = data.calibration(sc.n_calib)
    prepare, write = {**INITS, **CONTROLS}[method]
    run = Run()
    t0 = time.perf_counter()
    if state is None:
        state = prepare(base, calib, len(data.train), rank)
    run.init_seconds = time.perf_counter() - t0  # statistics + solve; the write is O(r·d) copies
    peft_model = lora_model(base, seed, rank)
    write(peft_model, state)
    t0 = time.perf_counter()
    _train(peft_model, data, sc, seed, run, lr)
    run.train_seconds = time.perf_counter() - t0
    run.val_loss, run.val_accuracy = evaluate(peft_model, data.validation)
    return run


def _train(model, data: TargetData, sc: Scale, seed: int, run: Run, lr: float = FT_LR) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = cosine_with_warmup(opt, sc.ft_steps)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    model.train()
    for step in range(sc.ft_steps):
        if step % EVAL_EVERY == 0:
            _log_eval(model, data, step, run)
        ids = data.train[order[step * BATCH : (step + 1) * BATCH]]
        loss = model(**batch_of(ids)).loss
        opt.zero_grad()
        loss.backward()
        run.grad_norm.append(
            float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        )
        run.train_loss.append(float(loss.detach()))
        opt.step()
        sched.step()
    _log_eval(model, data, sc.ft_steps, run)


def _log_eval(model, data: TargetData, step: int, run: Run) -> None:
    loss, acc = evaluate(model, data.held_out)
    run.eval_steps.append(step)
    run.eval_loss.append(loss)
    run.eval_accuracy.append(acc)
