"""LoRA fine-tuning of SmolLM2-135M-Instruct on GSM8K: eight initialisations, one training recipe.

Usage::

    python benchmarks/gsm8k_finetune.py [--methods ...] [--device cpu|cuda] [--threads 1] [--seeds 3]
        [--out benchmarks/results/gsm8k_finetune] [--quick]      # run what is missing, resumable
    python benchmarks/gsm8k_finetune.py --probe                  # time one step and one eval
    python benchmarks/gsm8k_finetune.py --merge DIR [DIR ...]    # copy other machines' rows in
    python benchmarks/gsm8k_finetune.py --summarize              # tables and figures from rows

Every choice below is fixed before any result is looked at (docs/gsm8k_finetune.md).

* **model**: SmolLM2-135M-Instruct in float32 (``lora_da_ref.real.load_smollm2``); PEFT LoRA
  r = 8 on q, k, v, o, gate, up and down of all 30 layers (210 adapters), dropout 0, and
  **rsLoRA with alpha 16 for every method** (s = 16/√8): the official LoRA-DA and LoRA-One
  scaling, so the learning rate means the same thing for all of them.
* **data**: the fixed GSM8K split of ``lora_da_ref.real`` (fit 0–999, validation 1000–1099,
  held-out 1100–1318); ``tokenize_gsm8k`` (``Question: …\\nAnswer: `` + worked answer + EOS,
  labels −100 on the prompt), cut to the last ``prompt_tokens`` prompt tokens and the first
  ``completion_tokens`` completion tokens. The cut is the CPU budget: a training step costs
  ~10 ms per token on one core (``--probe``: 5.9 s per step of 8 × 72 tokens), so the full
  sequences (median 63 + 114 tokens) and a full epoch would not fit the grid in about 8 hours;
  the sequences and the steps are cut, the seeds are not (docs/gsm8k_finetune.md, "Cost").
* **training** (identical for every method): AdamW, weight decay 0, batch ``batch`` (8)
  sequences, the gradient of the batch's token-mean completion loss, gradient clipping at norm
  1.0, a linear warm-up over 3 % of the steps (at least one) then cosine decay to 0
  (``transformers.get_cosine_schedule_with_warmup``, as the official code's HF Trainer);
  ``steps`` steps over a seed-permuted pass of the fit split (``steps × batch`` ≤ 1000 problems:
  part of one epoch when the budget allows no more; the docs state which).
* **methods** (initialisation only):
  ``lora``: PEFT's default (Kaiming-uniform A, B = 0), A redrawn per seed;
  ``pissa``: ``lora_da_ref.torch.baselines.pissa`` with the rsLoRA s (PEFT's convention; the
  residual ``W0 − s·A B`` is the base weight, the model is unchanged at start);
  ``lora_one``: ``baselines.lora_one`` (the official code: per-sequence mean gradient at batch 1,
  ``A B = [−∇L]_r/(S_0 γ)``) with ``stable_gamma`` = 128, LoRA-One's current README and
  ``gradient.yaml`` value (``lora_one_g64``: γ = 64, its README's earlier command for math
  reasoning; the LoRA-DA code states no LoRA-One γ), W0 not offset;
  ``lora_da_official``: ``LoraDAConfig.official()`` (absolute damping 1e-6, LOBPCG 10 its);
  ``lora_da_default``: ``LoraDAConfig()`` (relative damping, eigh);
  ``lora_da_debiased``: the default with ``estimator="debiased"`` (β(1 + N/|S|));
  every LoRA-DA variant with ``n_train`` = ``fisher_units`` of the fit split as trained on
  (its tokenised, cut sequences), W0 not offset, γ = 1024.
  Two controls separate the subspace from the scale; each differs from its partner in the
  column space of A only:
  ``random_A@da_scale``: ``lora_da_default`` with A0 replaced by a random orthonormal Q (drawn
  per seed and layer): A = Q/√γ, B = QᵀΔŴ/(σ√γ) (Eq. 17 in the random subspace);
  ``da_subspace@one_scale``: ``lora_one`` with its subspace P_r replaced by LoRA-DA default's
  A0: A = A0 D/√γ₁, B = D⁻¹A0ᵀ(−∇L)/(S_0√γ₁), D = diag(√(S_r/S_0)), so A B = A0A0ᵀ(−∇L)/(S_0γ₁)
  (LoRA-One's is P_rP_rᵀ(−∇L)/(S_0γ₁)); ∇L is the statistics pass's G, which with
  ``gradient_weight="sequence"`` is LoRA-One's per-sequence mean gradient (a test checks it).
  The data-aware inits are computed once (the training seed only changes the data order) on the
  first ``n_calib`` (256) fit problems at batch size 1 (the official ``sample_selection: head``).
* **learning rate, per method**: a grid spaced ×2 (``lr_grid``); every rate runs with seeds
  0 … ``select_seeds``−1 and the rate with the lowest mean **validation** loss wins (ties: the
  smaller; a diverged run is +inf); a winner at an end of the grid adds the next ×2 point beyond
  it, up to ``max_extend`` times. Then seeds up to ``seeds`` run at that rate. The held-out split
  plays no part in the choice: it is scored only for the chosen rate's runs, from the adapters
  each run saves.
* **reported** (``--summarize``): held-out completion loss (token-weighted) mean ± s.d. over
  seeds; each method's difference to ``lora``: the mean of the per-seed paired differences
  with a Student-t 95 % interval (n − 1 degrees of freedom), a hierarchical bootstrap (seeds,
  then problems within a seed) beside it; the validation loss at the neighbouring rates;
  loss curves (train loss per step, validation loss at ``curve_points`` steps); greedy
  exact-match accuracy (``gsm8k_answer``) on the first ``gen`` held-out problems with at most
  ``gen_tokens`` new tokens (KV cache) of the first ``gen_seeds`` seeds' runs, with its standard
  error over problems, and each contrast's exact-match difference over the seeds both methods
  generated for (per-seed paired t, the bootstrap beside it): a secondary metric.
* **resumable**: each finished run is one JSON row ``rows/<method>__lr<lr>__s<seed>.json``
  (written atomically; sizes recorded and checked), its trained adapter under ``adapters/``
  (not committed; needed only to score the held-out split), its held-out scores one row under
  ``heldout/``. A killed run resumes from the rows; ``--merge`` copies another machine's rows in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 8
ALPHA = 16.0
SCALING = ALPHA / math.sqrt(RANK)  # rsLoRA, every method
GAMMA_DA = 1024.0  # LoRA-DA's stable_gamma (conf/lora_da.yaml)
# LoRA-One's stable_gamma: 128 in its README and conf/init/gradient.yaml since May 2025; the
# short study's first LoRA-One rows used 64, the README's earlier math-reasoning command
# (``++init.stable_gamma=64``); they are kept under their own names (``*_g64``)
GAMMA_ONE = {"lora_one": 128.0, "lora_one_g64": 64.0}
# LoRA-DA's subspace at LoRA-One's scale, and the LoRA-One run it is compared with
SUBSPACE_AT_ONE = {"da_subspace@one_scale": "lora_one", "da_subspace@one_g64_scale": "lora_one_g64"}
CLIP = 1.0
WARMUP = 0.03
GRID_STEP = 2.0
IGNORE = -100
METHODS = (
    "lora",
    "pissa",
    "lora_one",
    "lora_one_g64",
    "lora_da_official",
    "lora_da_default",
    "lora_da_debiased",
    "random_A@da_scale",
    "da_subspace@one_scale",
    "da_subspace@one_g64_scale",
)
EPOCH_METHODS = ("lora", "lora_one", "lora_da_default", "pissa")
# (a, b, what a − b isolates): the paper's pair, the controls' partners, and every data-aware
# init against its data-free counterpart at the same scale
CONTRASTS = (
    (
        "lora_da_default",
        "lora_one",
        "the paper's comparison: LoRA-DA vs LoRA-One, each as published",
    ),
    (
        "lora_da_default",
        "random_A@da_scale",
        "LoRA-DA's subspace vs a random one, at LoRA-DA's scale",
    ),
    ("da_subspace@one_scale", "lora_one", "LoRA-DA's subspace vs LoRA-One's, at LoRA-One's scale"),
    (
        "da_subspace@one_g64_scale",
        "lora_one_g64",
        "LoRA-DA's subspace vs LoRA-One's, at LoRA-One's scale with γ = 64",
    ),
    (
        "da_subspace@one_scale",
        "lora_da_default",
        "LoRA-One's scale vs LoRA-DA's, in LoRA-DA's subspace",
    ),
    ("lora_da_official", "lora_da_default", "absolute damping + LOBPCG vs relative damping + eigh"),
    ("lora_da_debiased", "lora_da_default", "the debiased estimator vs the plug-in"),
)
SEEDED = ("lora", "random_A@da_scale")  # the init itself is redrawn per seed
BASELINE = "lora"
EVAL_BATCH = 16
BOOTSTRAP = 2000
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gsm8k_finetune"


def code_version() -> str:
    """The commit this process runs (``+dirty`` with uncommitted changes to tracked files), so a
    row says which code trained it; ``unknown`` outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
            check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "lora_da_ref", "benchmarks/gsm8k_finetune.py"],
            cwd=root,
        ).returncode  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@dataclass(frozen=True)
class Sizes:
    prompt_tokens: int | None = 24  # keep the last this many prompt tokens (None: all)
    completion_tokens: int | None = 48  # keep the first this many completion tokens (None: all)
    fit: int = 1000  # fit problems in the training pool
    steps: int = 32  # 256 of the 1000 fit problems, a quarter epoch (the CPU budget)
    batch: int = 8
    n_calib: int = 256
    val: int = 64  # the first 64 validation problems
    heldout: int = 219
    gen: int = 32  # the first 32 held-out problems, scored by greedy exact match
    gen_seeds: int = 1  # ... for the first this many seeds (≈ 80 s a run here, ≈ 11 min in EPOCH)
    gen_tokens: int = 128  # the median worked answer is 114 tokens
    lr_grid: tuple[float, ...] = (4e-4, 8e-4, 1.6e-3)  # extended past an edge winner
    select_seeds: int = 2
    seeds: int = 3
    max_extend: int = 2
    curve_points: int = 1  # validation loss at this many evenly spaced steps (the last included)
    # fields added after the first rows (they enter the tag only when set, so earlier rows keep
    # theirs):
    max_tokens: int | None = None  # cut prompt + completion to this many tokens (the answer's end)
    per_sequence: bool = False  # a step's gradient summed sequence by sequence (no padding)
    val_at: tuple[int, ...] = ()  # validation at these steps (instead of curve_points)
    anchor: bool = False  # the grid is (r, r/2), r = the method's choice in the short study
    label: str = ""  # names this study's summary files (summary_<label>.json, …)

    def tag(self) -> str:
        """A short hash of everything a run's result depends on (rows of other sizes never mix)."""
        # A row is one (method, rate, seed): the grid it was chosen from, the seed counts, the
        # extension budget, the generation size and the validation points along the way (the
        # evaluation draws no random numbers and leaves the weights alone) change no training run.
        skip = ("seeds", "max_extend", "gen", "gen_tokens", "gen_seeds", "lr_grid",
                "select_seeds", "curve_points", "val_at", "anchor", "label")  # fmt: skip
        keep = {k: v for k, v in asdict(self).items() if k not in skip}
        for k in ("max_tokens", "per_sequence"):
            if keep[k] == getattr(Sizes, k):
                del keep[k]
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:10]


FULL = Sizes()
QUICK = Sizes(
    prompt_tokens=8,
    completion_tokens=8,
    fit=8,
    steps=2,
    batch=2,
    n_calib=2,
    val=2,
    heldout=3,
    gen=2,
    gen_tokens=4,
    lr_grid=(1e-3, 2e-3),
    select_seeds=1,
    seeds=2,
    max_extend=1,
    curve_points=1,
)
# One epoch on whole problems, the paper's protocol at this model's scale: whole questions, the
# answer cut only where prompt + answer pass 256 tokens (170 of the 1000 fit problems), the fit
# split once (125 steps of 8), validation on the whole split at steps 16, 32, 64 and 125 (early
# versus late), one selection seed over two rates anchored at the short study's choice, five
# seeds at the chosen rate, greedy exact match on all 219 held-out problems for every seed.
EPOCH = Sizes(
    prompt_tokens=None,
    completion_tokens=None,
    max_tokens=256,
    steps=125,
    val=100,
    gen=219,
    gen_tokens=256,
    gen_seeds=5,
    lr_grid=(),
    select_seeds=1,
    seeds=5,
    max_extend=1,
    per_sequence=True,
    val_at=(16, 32, 64, 125),
    anchor=True,
    label="epoch",
)


# ----------------------------------------------------------------------------- data


def load_data(tokenizer: Any, sizes: Sizes) -> dict[str, list[dict[str, Any]]]:
    """Tokenised, cut examples of each part; each keeps ``index`` and the final ``answer``."""
    from lora_da_ref.real import gsm8k, gsm8k_answer, tokenize_gsm8k

    limits = {"fit": sizes.fit, "validation": sizes.val, "heldout": sizes.heldout}
    out = {}
    for part, limit in limits.items():
        out[part] = []
        for r in gsm8k(part)[:limit]:
            e = tokenize_gsm8k(
                tokenizer,
                r,
                max_prompt_tokens=sizes.prompt_tokens,
                max_completion_tokens=sizes.completion_tokens,
            )
            e.update(index=r["index"], answer=gsm8k_answer(r["answer"]), question=r["question"])
            out[part].append(cut_total(e, sizes.max_tokens))
    return out


def cut_total(example: dict, max_tokens: int | None) -> dict:
    """``example`` cut to its first ``max_tokens`` tokens: the answer loses its end, the question
    is never cut (a prompt of ``max_tokens`` or more is refused). ``cut`` records whether it was."""
    n = int(example["input_ids"].numel())
    if max_tokens is None or n <= max_tokens:
        return {**example, "cut": False}
    prompt = int((example["labels"] == IGNORE).sum())
    if prompt >= max_tokens:
        raise ValueError(f"problem {example['index']}: its prompt alone has {prompt} tokens")
    return {**example, **{k: example[k][:max_tokens] for k in TENSORS}, "cut": True}


def counts(examples: Sequence[dict]) -> dict[str, int]:
    """Sequences, loss tokens and attention tokens of a set (``fisher_units``' arguments)."""
    return {
        "sequences": len(examples),
        "loss_tokens": sum(int((e["labels"] != IGNORE).sum()) for e in examples),
        "attention_tokens": sum(int(e["attention_mask"].sum()) for e in examples),
    }


def cut_counts(data: dict[str, list[dict]]) -> dict[str, int]:
    """How many problems of each part lost the end of their answer to ``max_tokens``."""
    return {part: sum(bool(e.get("cut")) for e in examples) for part, examples in data.items()}


TENSORS = ("input_ids", "attention_mask", "labels")


def pad_batch(examples: Sequence[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """The examples right-padded by :func:`lora_da_ref.data.right_pad` (attention 0, label −100)
    on ``device``: causal outputs at real positions are those of the unpadded sequences, so the
    pad id enters nothing; it is 0, the id of every committed run."""
    from lora_da_ref.data import right_pad

    return {k: v.to(device) for k, v in right_pad(examples, 0).items()}


def as_batch(example: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: example[k][None].to(device) for k in TENSORS}


# ----------------------------------------------------------------------------- loss


def causal_lm(model: Any) -> Any:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (sum of completion-token cross-entropy, count), each (B,).

    HF's causal-LM loss (position t predicts token t+1), with the LM head applied only to the
    positions whose next token is a loss token: the same numbers at a fifth of the head's cost.
    """
    lm = causal_lm(model)
    hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = hidden.last_hidden_state[:, :-1]  # (B, T−1, d)
    target = batch["labels"][:, 1:]
    keep = target != IGNORE  # (B, T−1)
    ce = F.cross_entropy(lm.lm_head(hidden[keep]).float(), target[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(keep.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
    return sums, keep.sum(1)


def mean_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's token-mean completion loss (the loss_fn of the initialisers)."""
    sums, n = token_losses(model, batch)
    return sums.sum() / n.sum()


@torch.no_grad()
def per_problem(model: Any, examples: Sequence[dict], device: torch.device) -> dict[str, list]:
    """Per-problem completion-loss sums and token counts, in ``examples``' order (eval mode)."""
    was = model.training
    model.eval()
    try:
        sums, ns = [0.0] * len(examples), [0] * len(examples)
        order = sorted(range(len(examples)), key=lambda i: int(examples[i]["input_ids"].numel()))
        for i in range(0, len(order), EVAL_BATCH):  # similar lengths together: little padding
            idx = order[i : i + EVAL_BATCH]
            s, n = token_losses(model, pad_batch([examples[j] for j in idx], device))
            for j, sj, nj in zip(idx, s.tolist(), n.tolist()):
                sums[j], ns[j] = sj if math.isfinite(sj) else math.inf, int(nj)
        return {"sum": sums, "count": ns}
    finally:
        model.train(was)


def pooled(scores: dict[str, list]) -> float:
    """Token-weighted mean loss of :func:`per_problem`'s scores."""
    return float(sum(scores["sum"]) / sum(scores["count"]))


# ----------------------------------------------------------------------------- initialisations


def new_peft(base: Any) -> Any:
    """A PEFT copy of ``base``: r = 8, rsLoRA alpha 16, dropout 0, PEFT's default init."""
    import copy

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        use_rslora=True,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        bias="none",
        init_lora_weights=True,
    )
    return get_peft_model(copy.deepcopy(base), config)


def _factor(A: torch.Tensor, B: torch.Tensor, weight: torch.Tensor, **info: Any) -> Any:
    from lora_da_ref.torch import LoraFactors
    from lora_da_ref.torch.adapter import FINGERPRINT_KEY, weight_fingerprint

    eig = torch.zeros(A.shape[1])
    info[FINGERPRINT_KEY] = weight_fingerprint(weight)
    return LoraFactors(A.float().contiguous(), B.float().contiguous(), eig, info)


def data_aware(
    base: Any, calib: Sequence[dict], n_train_counts: dict, sizes: Sizes, device: torch.device
) -> dict[str, Any]:
    """Factors of every LoRA-DA variant and both controls from ONE statistics pass.

    The three presets read the same statistics (they differ in damping, solver and estimator
    only), so ``collect_statistics`` runs once and ``solve_layer`` per preset and layer; a test
    checks the result equals ``init_lora_da``'s. Returns ``{method: factors}`` (the random
    control: ``{"random_A@da_scale": {seed: factors}}``) and ``"info"``.
    """
    from lora_da_ref.torch import LoraDAConfig, collect_statistics, find_target_modules
    from lora_da_ref.torch.diagnostics import fisher_units
    from lora_da_ref.torch.factors import solve_layer

    default = LoraDAConfig(rank=RANK, target_modules=TARGETS, seed=0)
    n_train = fisher_units(default, **n_train_counts)
    configs = {
        "lora_da_official": LoraDAConfig.official(
            rank=RANK, target_modules=TARGETS, seed=0, n_train=n_train
        ),
        "lora_da_default": default.replace(n_train=n_train),
        "lora_da_debiased": default.replace(n_train=n_train, estimator="debiased"),
    }
    targets = find_target_modules(base, TARGETS)
    batches = [as_batch(e, device) for e in calib]
    stats = collect_statistics(base, batches, targets, default, loss_fn=mean_loss, progress=False)
    out: dict[str, Any] = {m: {} for m in (*configs, *SUBSPACE_AT_ONE)}
    out["random_A@da_scale"] = {s: {} for s in range(sizes.seeds)}
    snr = []
    for li, (name, module) in enumerate(targets.items()):
        for method, config in configs.items():
            sol = solve_layer(stats, name, config, probe=False)
            out[method][name] = sol.factors()
            if method == "lora_da_default":
                snr.append(sol.diagnostics.get("calibration_snr", math.nan))
                A0, delta = sol.eig.vectors.double(), sol.delta_w.double()  # ΔŴ/σ
        w = module.weight
        root_da = math.sqrt(GAMMA_DA)
        for seed in range(sizes.seeds):
            Q = random_orthonormal(A0.shape[0], RANK, seed, li)
            out["random_A@da_scale"][seed][name] = _factor(Q / root_da, Q.mT @ delta / root_da, w)
        neg = -stats.G[name].double()  # (d_in, d_out) = LoRA-One's −∇L (sequence weighting)
        S = torch.linalg.svdvals(neg)
        D = (S[:RANK] / S[0]).sqrt()  # √(S_r/S_0)
        for control, partner in SUBSPACE_AT_ONE.items():
            root_one = math.sqrt(GAMMA_ONE[partner])
            A = A0 * D / root_one
            B = (A0.mT @ neg) / D[:, None] / (float(S[0]) * root_one)
            out[control][name] = _factor(A, B, w)
    out["info"] = {
        "n_train_fisher_units": n_train,
        "calib_sample_size": stats.gradient_weight**2 / stats.tokens,
        "median_calibration_snr": float(np.nanmedian(snr)),
    }
    return out


def random_orthonormal(d: int, r: int, seed: int, layer: int) -> torch.Tensor:
    """(d, r) Q of a QR of a Gaussian matrix drawn from (seed, layer): a uniform random subspace."""
    gen = torch.Generator().manual_seed(1_000_003 * seed + layer)
    return torch.linalg.qr(torch.randn(d, r, dtype=torch.float64, generator=gen))[0]


class Inits:
    """Each method's initialisation, computed once per process and cached on disk (``inits/``)."""

    def __init__(self, base: Any, data: dict, sizes: Sizes, device: torch.device, out: Path):
        self.base, self.data, self.sizes, self.device = base, data, sizes, device
        self.dir = out / "inits" / sizes.tag()
        self.memory: dict[str, Any] = {}

    def factors(self, method: str, seed: int) -> tuple[Any, str]:
        """(factors or None for PEFT's own init, offset)."""
        if method == "lora":
            return None, "none"
        key = f"{method}_s{seed}" if method in SEEDED else method
        if key not in self.memory:
            path = self.dir / f"{key.replace('@', '_at_')}.pt"
            if path.is_file():
                self.memory[key] = torch.load(path, weights_only=False)
            else:  # one statistics pass makes every data-aware init: save them all
                before = set(self.memory)
                self._compute(method)
                self.dir.mkdir(parents=True, exist_ok=True)
                for k in sorted(set(self.memory) - before):
                    if not k.endswith("_seconds"):
                        atomic_save(self.memory[k], self.dir / f"{k.replace('@', '_at_')}.pt")
        return self.memory[key], "subtract" if method == "pissa" else "none"

    def _compute(self, method: str) -> None:
        from lora_da_ref.torch.baselines import lora_one, pissa

        calib = self.data["fit"][: self.sizes.n_calib]
        t0 = time.perf_counter()
        if method == "pissa":
            self.memory[method] = pissa(
                self.base, rank=RANK, target_modules=TARGETS, scaling=SCALING
            )
        elif method in GAMMA_ONE:
            batches = [as_batch(e, self.device) for e in calib]
            self.memory[method] = lora_one(
                self.base,
                batches,
                rank=RANK,
                target_modules=TARGETS,
                stable_gamma=GAMMA_ONE[method],
                loss_fn=mean_loss,
            )
        else:
            got = data_aware(self.base, calib, counts(self.data["fit"]), self.sizes, self.device)
            for seed, f in got.pop("random_A@da_scale").items():
                self.memory[f"random_A@da_scale_s{seed}"] = f
            self.memory.update(got)
        self.memory[f"{method}_seconds"] = time.perf_counter() - t0


def build(base: Any, factors: Any, offset: str, seed: int) -> Any:
    """A fresh PEFT model with ``factors`` written in (``None``: PEFT's Kaiming A drawn from
    ``seed``, B = 0)."""
    from lora_da_ref.torch import apply_lora_da

    torch.manual_seed(seed)
    model = new_peft(base)
    if factors is not None:
        apply_lora_da(model, factors, offset=offset)
    return model


# ----------------------------------------------------------------------------- training


def schedule(opt: torch.optim.Optimizer, steps: int) -> Any:
    """3 % linear warm-up (≥ 1 step) then cosine decay to 0 (HF's schedule)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, max(1, round(WARMUP * steps)), steps)


def curve_steps(sizes: Sizes) -> list[int]:
    """The steps at which the validation loss is recorded (the last one always)."""
    if sizes.val_at:
        return sorted({*sizes.val_at, sizes.steps})
    k = max(1, sizes.curve_points)
    return sorted({round(sizes.steps * (i + 1) / k) for i in range(k)})


def train(
    model: Any,
    data: dict,
    sizes: Sizes,
    lr: float,
    seed: int,
    device: torch.device,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``sizes.steps`` AdamW steps; returns the curves and the final validation scores. ``log``
    hears the training loss and the elapsed time at each validation step (long runs)."""
    fit = data["fit"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = schedule(opt, sizes.steps)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    marks = set(curve_steps(sizes))
    curve = {"train_loss": [], "val_steps": [], "val_loss": []}
    val: dict[str, list] = {}
    t0 = time.perf_counter()
    model.train()
    for step in range(1, sizes.steps + 1):
        while len(order) < sizes.batch:  # seeded permutations of the fit pool
            order += torch.randperm(len(fit), generator=gen).tolist()
        idx, order = order[: sizes.batch], order[sizes.batch :]
        opt.zero_grad(set_to_none=True)
        if sizes.per_sequence:  # the same gradient, without the padding's wasted tokens
            total = sum(int((fit[i]["labels"][1:] != IGNORE).sum()) for i in idx)
            loss = torch.zeros(())
            for i in idx:
                part = token_losses(model, as_batch(fit[i], device))[0].sum() / total
                part.backward()
                loss += part.detach().cpu()
        else:
            sums, n = token_losses(model, pad_batch([fit[i] for i in idx], device))
            loss = sums.sum() / n.sum()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        sched.step()
        value = float(loss.detach())
        curve["train_loss"].append(value if math.isfinite(value) else math.inf)
        if step in marks:
            val = per_problem(model, data["validation"], device)
            curve["val_steps"].append(step)
            curve["val_loss"].append(pooled(val))
            if log is not None:
                log(
                    f"  step {step}/{sizes.steps}: train {value:.4f}, val {curve['val_loss'][-1]:.4f}"
                    f" ({time.perf_counter() - t0:.0f} s)"
                )
    return {"curve": curve, "validation": val, "train_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- rows


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method.replace('@', '_at_')}__lr{lr:g}__s{seed}"


def file_name(method: str, lr: float, seed: int, sizes: Sizes) -> str:
    """A run's file stem: the run and the sizes' tag (runs of other sizes never collide)."""
    return f"{run_name(method, lr, seed)}__{sizes.tag()}"


def atomic_write(text: str, path: Path) -> None:
    """Write via a temporary file in the same folder and rename: a killed run leaves no half row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="tmp-", suffix=".part")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_adapter(model: Any, path: Path) -> None:
    """The trainable (LoRA) tensors of ``model``, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, path)


def read_rows(folder: Path, sizes: Sizes) -> dict[str, dict]:
    """``{run name: row}`` of the rows in ``folder`` made with ``sizes`` (others are ignored)."""
    rows = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        row = json.loads(path.read_text())
        if row.get("sizes_tag") == sizes.tag():
            rows[path.stem] = row
    return rows


def merge_rows(sources: Sequence[Path], out: Path) -> dict[str, int]:
    """Copy every row file of ``sources`` (``rows/``, ``heldout/``) into ``out``. A row already
    present must be identical up to timings, else the merge refuses (two different results for
    one run)."""
    copied = {"rows": 0, "heldout": 0}
    timing = ("train_seconds", "init_seconds", "eval_seconds", "host", "code", "finished")
    for src in sources:
        for kind in copied:
            for path in sorted((Path(src) / kind).glob("*.json")):
                dest = out / kind / path.name
                row = json.loads(path.read_text())
                if dest.is_file():
                    old = json.loads(dest.read_text())
                    strip = lambda r: {k: v for k, v in r.items() if k not in timing}  # noqa: E731
                    if strip(old) != strip(row):
                        raise ValueError(f"{path} differs from {dest}: two results for one run")
                    continue
                atomic_write(path.read_text(), dest)
                copied[kind] += 1
    return copied


# ----------------------------------------------------------------------------- selection


def selection_rows(rows: dict[str, dict], method: str, sizes: Sizes) -> dict[float, list[dict]]:
    """``{rate: the row of each selection seed}`` over the rates ``rows`` hold for every
    selection seed of ``method`` (the rates a choice is made from)."""
    by_lr: dict[float, dict[int, dict]] = {}
    for r in rows.values():
        if r["method"] == method:
            by_lr.setdefault(lr_key(r["lr"]), {})[r["seed"]] = r
    seeds = range(sizes.select_seeds)
    return {lr: [v[s] for s in seeds] for lr, v in by_lr.items() if all(s in v for s in seeds)}


def selection_losses(rows: dict[str, dict], method: str, sizes: Sizes) -> dict[float, list[float]]:
    """``{rate: validation loss of each selection seed}`` (see :func:`selection_rows`)."""
    return {lr: [r["val_loss"] for r in v] for lr, v in selection_rows(rows, method, sizes).items()}


def select_lr(val_by_lr: dict[float, list[float]]) -> tuple[float, bool]:
    """(rate with the lowest mean validation loss over seeds, whether it is an end of the grid).

    A non-finite loss makes its rate's mean +inf (never wins); ties go to the smaller rate.
    """
    if not val_by_lr:
        raise ValueError("no learning rates to select from")
    means = {lr: _mean_or_inf(v) for lr, v in val_by_lr.items()}
    finite = [lr for lr in sorted(means) if math.isfinite(means[lr])]
    if not finite:
        raise ValueError(f"every learning rate diverged: {val_by_lr}")
    best = min(finite, key=lambda lr: (means[lr], lr))
    grid = sorted(means)
    return best, len(grid) > 1 and best in (grid[0], grid[-1])


def _mean_or_inf(values: Sequence[float]) -> float:
    if not values or not all(math.isfinite(v) for v in values):
        return math.inf
    return float(np.mean(values))


def next_rate(grid: Sequence[float], best: float) -> float:
    """The ×2 point beyond an edge winner."""
    return best / GRID_STEP if best == min(grid) else best * GRID_STEP


def lr_key(lr: float) -> float:
    """Rates as stored (``%g``), so that 2e-4·2 and 4e-4 are one grid point."""
    return float(f"{lr:g}")


# ----------------------------------------------------------------------------- statistics


def run_losses(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Token-weighted held-out loss of each run, from its (seeds, problems) sums and counts."""
    return sums.sum(1) / counts.sum(1)


def paired_t(
    sums_a: np.ndarray, counts_a: np.ndarray, sums_b: np.ndarray, counts_b: np.ndarray
) -> dict[str, Any]:
    """``loss(a) − loss(b)`` from the per-seed paired differences: their mean and its Student-t
    95 % interval with n − 1 degrees of freedom (n seeds; none from one seed).

    Each argument is (seeds, problems); seed k of both methods saw the same data order, so
    ``d_k = loss_a(k) − loss_b(k)`` are the n independent units. Every d_k is over the same
    problems, so the interval is conditional on them (would other seeds give the same
    difference on these problems?); :func:`hierarchical_bootstrap` resamples the problems too.
    """
    return t_interval(run_losses(sums_a, counts_a) - run_losses(sums_b, counts_b))


def t_interval(d: np.ndarray) -> dict[str, Any]:
    """The mean of n independent per-seed differences ``d`` and its Student-t 95 % interval
    with n − 1 degrees of freedom (none from one seed)."""
    d = np.asarray(d, dtype=np.float64)
    n, mean = d.size, float(d.mean())
    if n < 2:
        return {"diff": mean, "ci95": [math.nan, math.nan], "per_seed": d.tolist(), "df": 0}
    from scipy import stats

    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return {"diff": mean, "ci95": [mean - half, mean + half], "per_seed": d.tolist(), "df": n - 1}


def step_contrast(a_runs: dict[int, dict], b_runs: dict[int, dict]) -> dict[str, Any]:
    """``val_loss(a) − val_loss(b)`` at each validation step both methods' runs recorded, over
    their common seeds (seed k of both saw the same data order): the paired t of
    :func:`t_interval` at every step. The early-against-late question (does a method start
    behind and gain later?) is read from the signs of these intervals along the steps; only
    the aggregate validation loss is kept at the inner steps, so there is no bootstrap over
    problems here."""
    seeds = sorted(set(a_runs) & set(b_runs))
    if not seeds:
        return {"seeds": [], "steps": {}}
    steps = _common_val_steps([a_runs[s] for s in seeds] + [b_runs[s] for s in seeds])
    return {
        "seeds": seeds,
        "steps": {
            str(t): t_interval(
                np.array([_val_at(a_runs[s], t) - _val_at(b_runs[s], t) for s in seeds])
            )
            for t in steps
        },
    }


def hierarchical_bootstrap(
    sums_a: np.ndarray,
    counts_a: np.ndarray,
    sums_b: np.ndarray,
    counts_b: np.ndarray,
    reps: int = BOOTSTRAP,
    seed: int = 0,
) -> list[float]:
    """Percentile 95 % interval of ``loss(a) − loss(b)`` by a two-level bootstrap: seeds with
    replacement, then problems with replacement within each drawn seed (the same draws for both
    methods: paired). Shown beside :func:`paired_t`; with a handful of seeds the seed level
    has few distinct draws, so the t interval is the one to read. One seed gives NaN: the
    problems alone would leave out the seed-to-seed spread that dominates here."""
    rng = np.random.default_rng(seed)
    k, n = sums_a.shape
    if k < 2:
        return [math.nan, math.nan]
    draws = np.empty(reps)
    for i in range(reps):
        si = rng.integers(0, k, k)
        pj = rng.integers(0, n, (k, n))  # each drawn seed its own problems
        rows = si[:, None]
        la = sums_a[rows, pj].sum(1) / counts_a[rows, pj].sum(1)
        lb = sums_b[rows, pj].sum(1) / counts_b[rows, pj].sum(1)
        draws[i] = float(np.mean(la - lb))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return [float(lo), float(hi)]


def contrast(a_runs: dict[int, dict], b_runs: dict[int, dict], seeds: list[int]) -> dict:
    """The difference of two methods' held-out losses over their common seeds, with both
    intervals (``ci95``: the paired t; ``ci95_hier_bootstrap`` beside it)."""
    a = [_stack(a_runs, seeds, k) for k in ("sum", "count")]
    b = [_stack(b_runs, seeds, k) for k in ("sum", "count")]
    out = paired_t(*a, *b)
    out["ci95_hier_bootstrap"] = hierarchical_bootstrap(*a, *b)
    out["seeds"] = seeds
    em = exact_match_contrast(a_runs, b_runs, seeds)
    if em is not None:
        out["exact_match"] = em
    return out


def exact_match_contrast(
    a_runs: dict[int, dict], b_runs: dict[int, dict], seeds: list[int]
) -> dict[str, Any] | None:
    """``accuracy(a) − accuracy(b)`` by greedy exact match, over the common seeds where both
    runs generated (a row scored with ``--gen-seeds 0`` has no answers: it is left out, not
    counted as wrong). The per-seed paired t of :func:`t_interval`, the hierarchical bootstrap
    beside it, and ``se_problems``: the s.e. over problems of the per-problem difference averaged
    over those seeds, which holds the seeds fixed (with one seed, the only spread there is).
    None when no seed has answers from both."""
    gen = [s for s in seeds if a_runs[s].get("correct") and b_runs[s].get("correct")]
    if not gen:
        return None
    a = np.array([a_runs[s]["correct"] for s in gen], dtype=np.float64)  # (seeds, problems)
    b = np.array([b_runs[s]["correct"] for s in gen], dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"exact match over different problems: {a.shape} vs {b.shape}")
    out = t_interval(a.mean(1) - b.mean(1))
    ones = np.ones_like(a)
    out["ci95_hier_bootstrap"] = hierarchical_bootstrap(a, ones, b, ones)
    per_problem = (a - b).mean(0)
    out["se_problems"] = float(per_problem.std(ddof=1) / math.sqrt(per_problem.size))
    out["problems"] = int(per_problem.size)
    out["seeds"] = gen
    return out


def accuracy_se(correct: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """(accuracy, standard error) over seeds × problems: the s.e. of the per-problem mean over
    seeds (problems are the independent units)."""
    c = np.asarray(correct, dtype=np.float64)  # (seeds, problems)
    per_problem_mean = c.mean(0)
    n = per_problem_mean.size
    se = float(per_problem_mean.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(c.mean()), se


def extract_answer(text: str) -> str | None:
    """The number after the first ``####`` of a generation (commas removed), else None."""
    import re

    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    return m.group(1).replace(",", "") if m else None


# ----------------------------------------------------------------------------- held-out


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, examples: Sequence[dict], sizes: Sizes, device: torch.device
) -> list[bool]:
    """Greedy decoding (KV cache, left padding) from each cut prompt; exact match of the final
    answer. The adapter is merged into a copy of the weights first: the same function, without
    210 small LoRA products per generated token."""
    import copy

    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    correct = []
    for i in range(0, len(examples), EVAL_BATCH):
        chunk = examples[i : i + EVAL_BATCH]
        prompts = [e["input_ids"][e["labels"] == IGNORE] for e in chunk]
        T = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, T - len(p) :], mask[b, T - len(p) :] = p, 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=sizes.gen_tokens,
            do_sample=False,
            pad_token_id=pad,
            use_cache=True,
        )
        texts = tokenizer.batch_decode(out[:, T:], skip_special_tokens=True)
        correct += [extract_answer(t) == e["answer"] for t, e in zip(texts, chunk)]
    return correct


# ----------------------------------------------------------------------------- experiment


class Experiment:
    """Runs what the rows lack, method by method (see the module docstring)."""

    def __init__(
        self,
        base: Any,
        tokenizer: Any,
        data: dict,
        sizes: Sizes,
        device: torch.device,
        out: Path,
        log: Callable[[str], None],
    ) -> None:
        self.base, self.tok, self.data, self.sizes = base, tokenizer, data, sizes
        self.device, self.out, self.log = device, out, log
        self.inits = Inits(base, data, sizes, device, out)
        self.code = code_version()  # read once: the code this process loaded

    def row(self, method: str, lr: float, seed: int) -> dict:
        name = file_name(method, lr, seed, self.sizes)
        path = self.out / "rows" / f"{name}.json"
        if path.is_file():
            row = json.loads(path.read_text())
            if row.get("sizes_tag") == self.sizes.tag():
                return row
        t0 = time.perf_counter()
        factors, offset = self.inits.factors(method, seed)
        init_seconds = self.inits.memory.get(f"{method}_seconds", 0.0)
        model = build(self.base, factors, offset, seed)
        self.log(f"{name}: training ({self.code})")
        result = train(model, self.data, self.sizes, lr, seed, self.device, self.log)
        save_adapter(model, self.out / "adapters" / f"{name}.pt")
        row = {
            "method": method,
            "lr": lr,
            "seed": seed,
            "sizes_tag": self.sizes.tag(),
            "sizes": asdict(self.sizes),
            "val_loss": pooled(result["validation"]),
            "validation": result["validation"],
            "curve": result["curve"],
            "train_seconds": result["train_seconds"],
            "init_seconds": init_seconds,
            "wall_seconds": time.perf_counter() - t0,
            "host": os.uname().nodename,
            "code": self.code,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        text = json.dumps(row) + "\n"
        atomic_write(text, path)
        self.log(f"{name}: val {row['val_loss']:.4f} ({row['wall_seconds']:.0f} s)")
        return json.loads(text)  # as a resumed run reads it

    def select(self, method: str) -> tuple[float, bool]:
        """Run the grid (seeds 0 … select_seeds−1), extend past an edge winner, return the rate."""
        seeds = range(self.sizes.select_seeds)
        # the grid, and every rate the rows already hold for all selection seeds (as the summary
        # reads them: the selection and the report choose from the same rates)
        held = selection_rows(read_rows(self.out / "rows", self.sizes), method, self.sizes)
        base = {lr_key(x) for x in self.grid(method)}
        vals = {
            lr: [self.row(method, lr, s)["val_loss"] for s in seeds]
            for lr in sorted(base | set(held))
        }
        best, edge = select_lr(vals)
        # a held rate off the grid is an extension already made: a resumed run spends the budget
        # once, not once per restart
        for _ in range(max(0, self.sizes.max_extend - len(set(held) - base))):
            if not edge:
                break
            lr = lr_key(next_rate(list(vals), best))
            vals[lr] = [self.row(method, lr, s)["val_loss"] for s in seeds]
            best, edge = select_lr(vals)
        return best, edge

    def grid(self, method: str) -> tuple[float, ...]:
        """The rates to try: ``lr_grid``, or with ``anchor`` the method's choice r in the short
        study's rows (same folder) and r/2."""
        if not self.sizes.anchor:
            return self.sizes.lr_grid
        losses = selection_losses(read_rows(self.out / "rows", FULL), method, FULL)
        if not losses:
            raise ValueError(f"{method}: no short-study rows in {self.out / 'rows'} to anchor on")
        r = select_lr(losses)[0]
        return (lr_key(r / GRID_STEP), r)

    def adapter(self, method: str, lr: float, seed: int) -> Path:
        """The trained adapter of a run; retrained when this machine lacks it (a run began on
        another machine or session), and refused unless it reproduces the row's validation loss."""
        name = file_name(method, lr, seed, self.sizes)
        path = self.out / "adapters" / f"{name}.pt"
        if path.is_file():
            return path
        row = self.row(method, lr, seed)
        self.log(f"{name}: no adapter on this machine, retraining it")
        factors, offset = self.inits.factors(method, seed)
        model = build(self.base, factors, offset, seed)
        result = train(model, self.data, self.sizes, lr, seed, self.device)
        if not math.isclose(pooled(result["validation"]), row["val_loss"], rel_tol=1e-6):
            raise RuntimeError(
                f"{name}: retrained validation loss {pooled(result['validation'])} is not the "
                f"row's {row['val_loss']}"
            )
        save_adapter(model, path)
        return path

    def heldout(self, method: str, lr: float, seed: int) -> dict:
        """Score a run on the held-out split (cached). A row scored without generation
        (``--gen-seeds 0``) gets its exact match added when a later call asks for one; its
        losses are kept, not recomputed."""
        name = file_name(method, lr, seed, self.sizes)
        path = self.out / "heldout" / f"{name}.json"
        n_gen = self.sizes.gen if seed < self.sizes.gen_seeds else 0
        cached = json.loads(path.read_text()) if path.is_file() else None
        if cached is not None and (cached["correct"] or not n_gen):
            return cached
        adapter = self.adapter(method, lr, seed)
        t0 = time.perf_counter()
        factors, offset = self.inits.factors(method, seed)  # PiSSA's residual base weight
        model = build(self.base, factors, offset, seed)
        state = torch.load(adapter, weights_only=True)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)
        if cached is None:
            scores = per_problem(model, self.data["heldout"], self.device)
        else:
            scores, t0 = cached["heldout"], t0 - cached["eval_seconds"]
        gen = self.data["heldout"][:n_gen]
        correct = generate_answers(model, self.tok, gen, self.sizes, self.device)
        row = {
            "method": method,
            "lr": lr,
            "seed": seed,
            "sizes_tag": self.sizes.tag(),
            "heldout": scores,
            "heldout_loss": pooled(scores),
            "correct": correct,
            "eval_seconds": time.perf_counter() - t0,
        }
        atomic_write(json.dumps(row) + "\n", path)
        self.log(f"{name}: held-out {row['heldout_loss']:.4f}, exact {sum(correct)}/{len(correct)}")
        return row

    def score_base(self) -> dict:
        """The base model (no adapter) scored as a run is: the reference the fine-tuning moves
        from (``heldout/base__<tag>.json``; cached)."""
        path = self.out / "heldout" / f"base__{self.sizes.tag()}.json"
        if path.is_file():
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        scores = per_problem(self.base, self.data["heldout"], self.device)
        val = per_problem(self.base, self.data["validation"], self.device)
        gen = self.data["heldout"][: self.sizes.gen]
        correct = generate_answers(self.base, self.tok, gen, self.sizes, self.device)
        row = {
            "method": "base",
            "sizes_tag": self.sizes.tag(),
            "heldout": scores,
            "heldout_loss": pooled(scores),
            "val_loss": pooled(val),
            "correct": correct,
            "eval_seconds": time.perf_counter() - t0,
        }
        atomic_write(json.dumps(row) + "\n", path)
        self.log(
            f"base model: held-out {row['heldout_loss']:.4f}, exact {sum(correct)}/{len(correct)}"
        )
        return row

    def method(self, method: str) -> None:
        lr, edge = self.select(method)
        self.log(f"{method}: selected lr {lr:g}{' (grid edge)' if edge else ''}")
        for seed in range(self.sizes.seeds):
            self.row(method, lr, seed)
            self.heldout(method, lr, seed)


# ----------------------------------------------------------------------------- summary


def summarize(out: Path, sizes: Sizes) -> dict[str, Any]:
    """Tables, bootstrap intervals, curves CSV/PNG and ``summary.json`` from the rows in ``out``."""
    rows = read_rows(out / "rows", sizes)
    held = read_rows(out / "heldout", sizes)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows.values())]
    result: dict[str, Any] = {"sizes": asdict(sizes), "sizes_tag": sizes.tag(), "methods": {}}
    finals: dict[str, dict[int, dict]] = {}
    chosen: dict[str, dict[int, dict]] = {}  # the training rows at the chosen rate, by seed
    for m in methods:
        by_lr: dict[float, dict[int, dict]] = {}
        for r in rows.values():
            if r["method"] == m:
                by_lr.setdefault(lr_key(r["lr"]), {})[r["seed"]] = r
        sel = selection_losses(rows, m, sizes)
        if not sel:
            continue
        lr, edge = select_lr(sel)
        grid = sorted(sel)
        i = grid.index(lr)
        neighbours = {f"{g:g}": _mean_or_inf(sel[g]) for g in grid[max(0, i - 1) : i + 2]}
        mine = {h["seed"]: h for h in held.values() if h["method"] == m and lr_key(h["lr"]) == lr}
        finals[m] = mine
        chosen[m] = by_lr[lr]
        losses = [mine[s]["heldout_loss"] for s in sorted(mine)]
        entry = {
            "selected_lr": lr,
            "at_grid_edge": edge,
            "val_by_lr": {f"{g:g}": _mean_or_inf(sel[g]) for g in grid},
            "val_at_neighbours": neighbours,
            "seeds": sorted(mine),
            "heldout_mean": float(np.mean(losses)) if losses else math.nan,
            "heldout_sd": float(np.std(losses, ddof=1)) if len(losses) > 1 else math.nan,
            "init_seconds": by_lr[lr][0]["init_seconds"] if 0 in by_lr[lr] else math.nan,
            "train_seconds_mean": float(
                np.mean([r["train_seconds"] for d in by_lr.values() for r in d.values()])
            ),
        }
        generated = [mine[s]["correct"] for s in sorted(mine) if mine[s]["correct"]]
        if generated:
            entry["exact_match"], entry["exact_match_se"] = accuracy_se(generated)
            entry["exact_match_seeds"] = len(generated)
            entry["exact_match_per_seed"] = [float(np.mean(c)) for c in generated]
        entry["curve"] = _mean_curve([by_lr[lr][s] for s in sorted(by_lr[lr])])
        result["methods"][m] = entry
    base = finals.get(BASELINE, {})
    for m, mine in finals.items():
        seeds = sorted(set(mine) & set(base))
        if m == BASELINE or len(seeds) < 1:
            continue
        result["methods"][m]["diff_to_lora"] = contrast(mine, base, seeds)
    result["contrasts"] = []
    for a_m, b_m, what in CONTRASTS:
        if a_m not in finals or b_m not in finals:
            continue
        seeds = sorted(set(finals[a_m]) & set(finals[b_m]))
        if not seeds:
            continue
        result["contrasts"].append(
            {"a": a_m, "b": b_m, "isolates": what, **contrast(finals[a_m], finals[b_m], seeds)}
        )
    result["by_step"] = [
        {"a": a_m, "b": b_m, "isolates": what, **step_contrast(chosen[a_m], chosen[b_m])}
        for a_m, b_m, what in [(m, BASELINE, "the init vs PEFT's default") for m in chosen
                               if m != BASELINE] + list(CONTRASTS)
        if a_m in chosen and b_m in chosen
    ]  # fmt: skip
    base_row = next((h for h in held.values() if h["method"] == "base"), None)
    if base_row is not None:
        result["base_model"] = {
            "heldout_loss": base_row["heldout_loss"],
            "val_loss": base_row["val_loss"],
            "exact_match": accuracy_se([base_row["correct"]])[0] if base_row["correct"] else None,
            "exact_match_se": accuracy_se([base_row["correct"]])[1]
            if base_row["correct"]
            else None,
        }
    _write_summary(result, out, f"_{sizes.label}" if sizes.label else "")
    return result


def _stack(runs: dict[int, dict], seeds: list[int], key: str) -> np.ndarray:
    return np.array([runs[s]["heldout"][key] for s in seeds], dtype=float)  # (seeds, problems)


def _mean_curve(runs: list[dict]) -> dict[str, list[float]]:
    """Mean train-loss curve, and the mean validation loss at the steps every run recorded
    (rows made with more ``curve_points`` have more of them; the last step is in all)."""
    train = np.array([r["curve"]["train_loss"] for r in runs], dtype=float)
    steps = _common_val_steps(runs)
    val = np.array([[_val_at(r, s) for s in steps] for r in runs], dtype=float)
    return {
        "train_loss": train.mean(0).tolist(),
        "val_steps": steps,
        "val_loss": val.mean(0).tolist(),
    }


def _write_summary(result: dict, out: Path, suffix: str) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(json.dumps(result, indent=1) + "\n", out / f"summary{suffix}.json")
    with (out / f"table{suffix}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "method",
                "selected_lr",
                "at_grid_edge",
                "seeds",
                "heldout_mean",
                "heldout_sd",
                "diff_to_lora",
                "ci95_t_lo",
                "ci95_t_hi",
                "ci95_hier_bootstrap_lo",
                "ci95_hier_bootstrap_hi",
                "exact_match",
                "exact_match_se",
                "val_at_neighbours",
            ]
        )
        for m, e in result["methods"].items():
            d = e.get(
                "diff_to_lora", {"diff": "", "ci95": ["", ""], "ci95_hier_bootstrap": ["", ""]}
            )
            w.writerow(
                [
                    m,
                    e["selected_lr"],
                    e["at_grid_edge"],
                    len(e["seeds"]),
                    e["heldout_mean"],
                    e["heldout_sd"],
                    d["diff"],
                    *d["ci95"],
                    *d["ci95_hier_bootstrap"],
                    e.get("exact_match", ""),
                    e.get("exact_match_se", ""),
                    json.dumps(e["val_at_neighbours"]),
                ]
            )
    atomic_write(markdown_table(result), out / f"table{suffix}.md")
    with (out / f"curves{suffix}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "kind", "step", "loss"])
        for m, e in result["methods"].items():
            for step, v in enumerate(e["curve"]["train_loss"], start=1):
                w.writerow([m, "train", step, v])
            for step, v in zip(e["curve"]["val_steps"], e["curve"]["val_loss"]):
                w.writerow([m, "validation", step, v])
    _plot(result, out / f"curves{suffix}.png")


def markdown_table(result: dict) -> str:
    """The results table of docs/gsm8k_finetune.md, from ``summary.json``'s content."""
    lines = [
        "| method | chosen lr | held-out loss, mean ± s.d. (seeds) "
        "| − LoRA [95 % t, per-seed pairs] | [hier. bootstrap] "
        "| val. loss at lr/2, lr, 2·lr | exact match ± s.e. (seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, e in result["methods"].items():
        d = e.get("diff_to_lora")
        diff, boot = ("—", "—") if d is None else (_ci(d), _interval(d["ci95_hier_bootstrap"]))
        nb = e["val_at_neighbours"]
        lr = e["selected_lr"]
        around = ", ".join(
            f"{nb[k]:.4f}" if k in nb else "—" for k in (f"{lr / 2:g}", f"{lr:g}", f"{lr * 2:g}")
        )
        em = (
            f"{e['exact_match']:.3f} ± {e['exact_match_se']:.3f} ({e['exact_match_seeds']})"
            if "exact_match" in e
            else "—"
        )
        edge = " (edge)" if e["at_grid_edge"] else ""
        n = len(e["seeds"])
        held = (
            "— (not scored yet)"
            if n == 0
            else f"{e['heldout_mean']:.4f} ({n})"
            if n == 1
            else f"{e['heldout_mean']:.4f} ± {e['heldout_sd']:.4f} ({n})"
        )
        lines.append(f"| `{m}` | {lr:g}{edge} | {held} | {diff} | {boot} | {around} | {em} |")
    b = result.get("base_model")
    if b is not None:
        em = (
            "—"
            if b["exact_match"] is None
            else f"{b['exact_match']:.3f} ± {b['exact_match_se']:.3f}"
        )
        lines.append(
            f"| base model (no fine-tuning) | — | {b['heldout_loss']:.4f} | — | — | — | {em} |"
        )
    if result.get("contrasts"):
        lines += [
            "",
            "| a − b | isolates | held-out loss difference [95 % t, per-seed pairs] "
            "| [hier. bootstrap] |",
            "|---|---|---|---|",
        ]
        for c in result["contrasts"]:
            lines.append(
                f"| `{c['a']}` − `{c['b']}` | {c['isolates']} | "
                f"{_ci(c)} | {_interval(c['ci95_hier_bootstrap'])} |"
            )
    em_rows = [
        (m, BASELINE, e["diff_to_lora"]["exact_match"])
        for m, e in result["methods"].items()
        if "exact_match" in e.get("diff_to_lora", {})
    ] + [
        (c["a"], c["b"], c["exact_match"])
        for c in result.get("contrasts", [])
        if "exact_match" in c
    ]
    if em_rows:
        lines += [
            "",
            "| a − b | exact-match difference [95 % t, per-seed pairs] | [hier. bootstrap] "
            "| ± s.e. over problems, seeds fixed |",
            "|---|---|---|---|",
        ]
        for a_m, b_m, c in em_rows:
            lines.append(
                f"| `{a_m}` − `{b_m}` | {_ci(c)} | {_interval(c['ci95_hier_bootstrap'])} "
                f"| ± {c['se_problems']:.4f} ({c['problems']} problems) |"
            )
    by_step = _multi_step(result)
    if by_step:
        steps = sorted({int(t) for c in by_step for t in c["steps"]})
        lines += [
            "",
            "| a − b: validation loss difference [95 % t, per-seed pairs] | "
            + " | ".join(f"step {t}" for t in steps)
            + " |",
            "|---|" + "---|" * len(steps),
        ]
        for c in by_step:
            cells = [
                f"{c['steps'][str(t)]['diff']:+.4f} {_interval(c['steps'][str(t)]['ci95'])}"
                if str(t) in c["steps"]
                else "—"
                for t in steps
            ]
            lines.append(
                f"| `{c['a']}` − `{c['b']}` (n = {len(c['seeds'])}) | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


def _interval(ci: Sequence[float]) -> str:
    if not all(math.isfinite(x) for x in ci):
        return "[— one seed]"
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _ci(d: dict) -> str:
    """A difference with its t interval, and the seeds it rests on."""
    return f"{d['diff']:+.4f} {_interval(d['ci95'])} (n = {len(d['seeds'])})"


def _common_val_steps(runs: list[dict]) -> list[int]:
    """The validation steps every run recorded (the last step is in all)."""
    return sorted(set.intersection(*(set(r["curve"]["val_steps"]) for r in runs)))


def _val_at(run: dict, step: int) -> float:
    return dict(zip(run["curve"]["val_steps"], run["curve"]["val_loss"]))[step]


def _multi_step(result: dict) -> list[dict]:
    """The step-by-step contrasts worth showing: those with more than the last step."""
    return [c for c in result.get("by_step", []) if len(c["steps"]) > 1]


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = _multi_step(result)
    fig, axes = plt.subplots(1, 3 if by_step else 2, figsize=(16.5 if by_step else 11, 4.2))
    ax, bx = axes[0], axes[1]
    colour = {}
    for m, e in result["methods"].items():
        tr = np.array(e["curve"]["train_loss"])
        k = max(1, len(tr) // 10)  # running mean: single batches are noisy
        smooth = np.convolve(tr, np.ones(k) / k, mode="valid")
        (line,) = ax.plot(
            np.arange(k, len(tr) + 1), smooth, lw=1, label=f"{m} (lr {e['selected_lr']:g})"
        )
        colour[m] = line.get_color()
        ax.plot(e["curve"]["val_steps"], e["curve"]["val_loss"], "o", color=line.get_color())
        lrs = sorted(float(g) for g in e["val_by_lr"])
        bx.plot(lrs, [e["val_by_lr"][f"{g:g}"] for g in lrs], "-o", color=line.get_color(), label=m)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (running mean); dots: validation")
    ax.legend(fontsize=7)
    bx.set_xscale("log")
    bx.set_xlabel("learning rate")
    bx.set_ylabel("validation loss (mean over selection seeds)")
    if by_step:  # the early-against-late question: each contrast's paired t at every step
        cx = axes[2]
        for i, c in enumerate(by_step):
            steps = sorted(int(t) for t in c["steps"])
            d = [c["steps"][str(t)] for t in steps]
            mid = np.array([x["diff"] for x in d])
            lo, hi = (np.array([x["ci95"][j] for x in d]) for j in (0, 1))
            x = np.array(steps) * (1 + 0.03 * (i - (len(by_step) - 1) / 2))  # side by side
            cx.errorbar(
                x, mid, yerr=[mid - lo, hi - mid], capsize=3, ms=4, color=colour.get(c["a"]),
                marker="osD^v"[i % 5], ls=("-", "--", ":", "-.")[i % 4],
                label=f"{c['a']} − {c['b']} (n = {len(c['seeds'])})",
            )  # fmt: skip
        cx.axhline(0.0, color="k", lw=0.6)
        cx.set_xscale("log")
        ticks = sorted({int(t) for c in by_step for t in c["steps"]})
        cx.set_xticks(ticks, [str(t) for t in ticks])
        cx.minorticks_off()
        cx.set_xlabel("step")
        cx.set_ylabel("validation loss difference, 95 % t (per-seed pairs)")
        cx.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M on GSM8K (sizes {result['sizes_tag']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- LoRA-One's γ

GAMMAS = (64.0, 128.0, 256.0)


def gamma_study(exp: Experiment, gammas: Sequence[float] = GAMMAS) -> dict[str, Any]:
    """LoRA-One's initial loss at each γ, from one calibration pass: ``A B = [−∇L]_r/(S_0 γ)``,
    so the factors at γ are those at 128 times ``√(128/γ)`` each. For the base model, LoRA-DA's
    default init (when cached) and LoRA-One at each γ: the validation loss at the init (step 0)
    and the loss of seed 0's first training batch at the init (the curves' step 1, before the
    first update)."""
    data, device = exp.data, exp.device
    factors, _ = exp.inits.factors("lora_one", 0)
    ref = GAMMA_ONE["lora_one"]
    fit = data["fit"]
    gen = torch.Generator().manual_seed(0)
    first = torch.randperm(len(fit), generator=gen).tolist()[: exp.sizes.batch]  # as train()
    batch = [fit[i] for i in first]

    @torch.no_grad()
    def losses(model: Any) -> dict[str, float]:
        model.eval()
        sums = [token_losses(model, as_batch(e, device)) for e in batch]
        step1 = float(sum(float(s.sum()) for s, _ in sums) / sum(int(n.sum()) for _, n in sums))
        return {"step0_val_loss": pooled(per_problem(model, data["validation"], device)),
                "step1_train_loss": step1}  # fmt: skip

    out: dict[str, Any] = {"sizes_tag": exp.sizes.tag(), "base": losses(exp.base), "lora_one": {}}
    for g in gammas:
        c = math.sqrt(ref / g)
        scaled = {n: replace(f, A=f.A * c, B=f.B * c) for n, f in factors.items()}
        out["lora_one"][f"{g:g}"] = losses(build(exp.base, scaled, "none", 0))
    cached = exp.inits.dir / "lora_da_default.pt"
    if cached.is_file():
        da = torch.load(cached, weights_only=False)
        out["lora_da_default"] = losses(build(exp.base, da, "none", 0))
    name = f"gamma_one{'_' + exp.sizes.label if exp.sizes.label else ''}.json"
    atomic_write(json.dumps(out, indent=1) + "\n", exp.out / name)
    return out


# ----------------------------------------------------------------------------- probe


def probe(
    base: Any, data: dict, sizes: Sizes, device: torch.device, tok: Any, log: Callable[[str], None]
) -> dict:
    """Seconds per training step, per evaluation and per generation, and the hours they imply
    for the whole grid (one grid extension per method assumed)."""
    model = build(base, None, "none", 0)
    short = replace(sizes, steps=3, curve_points=1, val=8)
    part = {**data, "validation": data["validation"][:8]}
    t0 = time.perf_counter()
    train(model, part, short, 1e-4, 0, device)
    val8 = time.perf_counter()
    per_problem(model, part["validation"], device)
    val8 = time.perf_counter() - val8
    step = (time.perf_counter() - t0 - 2 * val8) / 3
    log(f"probe: {step:.1f} s per step")
    t0 = time.perf_counter()
    per_problem(model, data["validation"][:32], device)
    per_seq = (time.perf_counter() - t0) / 32
    log(f"probe: {per_seq:.2f} s per evaluated sequence")
    t0 = time.perf_counter()
    generate_answers(model, tok, data["heldout"][:8], sizes, device)
    gen = (time.perf_counter() - t0) / 8
    log(f"probe: {gen:.1f} s per generated answer")
    val, held = per_seq * sizes.val, per_seq * sizes.heldout
    run = sizes.steps * step + sizes.curve_points * val
    grid_runs = len(METHODS) * (len(sizes.lr_grid) + 1) * sizes.select_seeds
    final_runs = len(METHODS) * (sizes.seeds - sizes.select_seeds)
    scored = len(METHODS) * sizes.seeds
    total = (grid_runs + final_runs) * run + scored * (held + gen * sizes.gen)
    return {
        "step_seconds": step,
        "eval_seconds_per_sequence": per_seq,
        "generation_seconds_per_answer": gen,
        "run_seconds": run,
        "runs": grid_runs + final_runs,
        "scored_runs": scored,
        "estimated_total_hours": total / 3600,
    }


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run (not a result)")
    p.add_argument("--epoch", action="store_true", help="one epoch on whole problems")
    p.add_argument("--methods", nargs="*", default=None, choices=METHODS)
    p.add_argument("--inits-only", action="store_true", help="compute and save the inits, no run")
    p.add_argument("--gen-seeds", type=int, default=None, help="seeds scored by exact match")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (see the docs: 1)")
    p.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT}[_quick]")
    p.add_argument("--cache-dir", default=None, help="SmolLM2 cache (default: load_smollm2's)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, help="copy these DIRs' rows")
    p.add_argument("--summarize", action="store_true", help="only build tables from the rows")
    p.add_argument("--probe", action="store_true", help="time a step and the evaluations")
    p.add_argument("--steps", type=int, default=None, help="override the sizes' steps")
    p.add_argument("--seeds", type=int, default=None, help="seeds at the chosen rate")
    p.add_argument("--gen", type=int, default=None, help="held-out problems to generate (0: none)")
    p.add_argument("--base", action="store_true", help="also score the base model (cached)")
    p.add_argument("--gamma-study", action="store_true", help="LoRA-One's initial loss per γ")
    args = p.parse_args(argv)
    if args.quick and args.epoch:
        raise ValueError("--quick and --epoch are two different sizes: choose one")
    sizes = QUICK if args.quick else EPOCH if args.epoch else FULL
    if args.methods is None:
        args.methods = list(EPOCH_METHODS if args.epoch else METHODS)
    if args.gen_seeds is not None:
        sizes = replace(sizes, gen_seeds=args.gen_seeds)
    if args.steps is not None:
        sizes = replace(sizes, steps=args.steps)
    if args.gen is not None:
        sizes = replace(sizes, gen=args.gen)
    if args.seeds is not None:
        if args.seeds < sizes.select_seeds:
            raise ValueError(f"--seeds must be >= {sizes.select_seeds} (the selection seeds)")
        sizes = replace(sizes, seeds=args.seeds)
    out = args.out or Path(f"{DEFAULT_OUT}{'_quick' if args.quick else ''}")
    if args.merge:
        print(json.dumps(merge_rows(args.merge, out)))
    if args.summarize or args.merge:
        result = summarize(out, sizes)
        print(
            json.dumps(
                {
                    m: {
                        k: e.get(k)
                        for k in ("selected_lr", "heldout_mean", "heldout_sd", "diff_to_lora")
                    }
                    for m, e in result["methods"].items()
                },
                indent=1,
            )
        )
        return result
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    from lora_da_ref.real import load_smollm2

    base, tok = load_smollm2(torch.float32, args.cache_dir)
    base.to(device).eval()
    for prm in base.parameters():
        prm.requires_grad_(False)
    data = load_data(tok, sizes)
    log("data: " + ", ".join(f"{k} {counts(v)}" for k, v in data.items()))
    log(f"answers cut to {sizes.max_tokens} tokens in all: {cut_counts(data)}")
    if args.probe:
        result = probe(base, data, sizes, device, tok, log)
        print(json.dumps(result, indent=1))
        return result
    exp = Experiment(base, tok, data, sizes, device, out, log)
    if args.gamma_study:
        result = gamma_study(exp)
        print(json.dumps(result, indent=1))
        return result
    if args.inits_only:
        for method in args.methods:
            exp.inits.factors(method, 0)
            log(f"{method}: init saved under {exp.inits.dir}")
        return {}
    if args.base:
        exp.score_base()
    for method in args.methods:
        exp.method(method)
    return summarize(out, sizes)


if __name__ == "__main__":
    main()
