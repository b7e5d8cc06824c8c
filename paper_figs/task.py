"""The synthetic task of the figure scripts, its NumPy Adam loop and its metrics (no plotting).

The synthetic task (one shared setting for every synthetic item, fixed before any result was
looked at):

* a softmax regression with ``d1 = 16`` inputs and ``K = 5`` classes (``W`` is ``(16, 4)``, the
  identifiable K−1 parametrisation of :class:`lora_da_ref.reference.synthetic.SoftmaxRegression`), and a
  logistic regression with ``d1 = 16`` (``W`` is ``(16, 1)``), inputs uniform on the package's
  anisotropic, non-Gaussian design pool (pool seed 0, spectrum ``k^-1``);
* per seed, a "pre-trained" ``W0`` (logit scale 2) and a target ``W_tgt = W0 + ΔW`` whose shift
  ``ΔW = U diag(s) Vᵀ`` has random singular vectors, singular values ``s_k ∝ 0.5^k`` and a logit
  scale of 1 on the pool;
* ``N = 2000`` training pairs drawn from ``p(y | x; W_tgt)`` (Eq. 9); the calibration set ``S`` is
  their first 256 (as the official code), on which LoRA-DA's statistics are computed: the mean
  gradient ``G`` at ``W0`` and the **empirical** Fisher (true labels, as the official code) with a
  small relative damping so that it is invertible for small ``S``;
* held-out metrics are exact population quantities over the design pool: the excess target loss
  ``E_x KL(p(·|x; W_tgt) ‖ p(·|x; W))`` and the expected accuracy against labels drawn from the
  target, ``E_x p(argmax_k p(k|x; W) | x; W_tgt)``;
* every method trains from ``W0`` with the same optimiser (full-batch Adam, lr 0.02, betas
  (0.9, 0.999), no weight decay) for the same number of steps.

Conventions as in :mod:`lora_da_ref`: ``W`` is ``(d1, d2)``, the adapted weight is ``W0 + A B``
with ``A`` (d1, r) and ``B`` (r, d2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import expit

from lora_da_ref.reference.initializers import InitProblem, initialize
from lora_da_ref.reference.linalg import random_orthonormal
from lora_da_ref.reference.synthetic import LogisticRegression, SoftmaxRegression

# ---- the shared synthetic setting ---------------------------------------------------------------
D1 = 16
N_CLASSES = 5
POOL_SEED = 0
W0_SCALE = 2.0  # logit standard deviation of W0 on the pool
SHIFT_SCALE = 1.0  # logit standard deviation of ΔW = W_tgt − W0 on the pool
SHIFT_DECAY = 0.5  # singular values of ΔW: s_k ∝ SHIFT_DECAY^k
N_TRAIN = 2000
N_CALIB = 256
# Relative damping of the empirical Fisher: J_S + λ I with λ = FISHER_DAMPING · tr(J_S)/p. Needed
# for |S| < p = 64 (J_S is then singular); 1e-3 changes the well-sampled J by ~0.1 % of its mean
# eigenvalue.
FISHER_DAMPING = 1e-3
RANK = {"softmax": 2, "logistic": 1}
LR = 0.02
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
STEPS = 300
QUICK_STEPS = 100
SEEDS = 5
QUICK_SEEDS = 2

TaskKind = Literal["softmax", "logistic"]


def n_steps(quick: bool) -> int:
    return QUICK_STEPS if quick else STEPS


def n_seeds(quick: bool, seeds: int | None) -> int:
    if seeds is not None:
        return seeds
    return QUICK_SEEDS if quick else SEEDS


# ---- the task -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One draw of the synthetic fine-tuning problem (see the module docstring)."""

    kind: TaskKind
    model: SoftmaxRegression | LogisticRegression
    W0: np.ndarray  # (d1, d2)
    W_tgt: np.ndarray  # (d1, d2)
    X: np.ndarray  # (N, d1) training inputs
    Y: np.ndarray  # (N,) training labels drawn from p(y | x; W_tgt)

    @property
    def n(self) -> int:
        return self.X.shape[0]

    def class_probs(self, W: np.ndarray, X: np.ndarray | None = None) -> np.ndarray:
        """All K class probabilities ``p(k | x; W)`` on ``X`` (default: the pool), (n, K)."""
        X = self.model.pool if X is None else X
        F = X @ W  # (n, d2)
        if self.kind == "logistic":
            p1 = expit(F[:, 0])
            return np.stack([1.0 - p1, p1], axis=1)  # (n, 2)
        return self.model.probabilities(F)  # (n, K)

    def excess_loss(self, W: np.ndarray) -> float:
        """Held-out excess target loss ``E_x KL(p(·|x; W_tgt) ‖ p(·|x; W))`` (exact, pool)."""
        p_t = self.class_probs(self.W_tgt)
        log_ratio = np.log(np.clip(p_t, 1e-300, None)) - np.log(
            np.clip(self.class_probs(W), 1e-300, None)
        )
        return float(np.mean(np.sum(p_t * log_ratio, axis=1)))

    def accuracy(self, W: np.ndarray) -> float:
        """Held-out expected accuracy ``E_x p(argmax_k p(k|x; W) | x; W_tgt)`` (exact, pool)."""
        pred = np.argmax(self.class_probs(W), axis=1)  # (M,)
        p_t = self.class_probs(self.W_tgt)
        return float(np.mean(p_t[np.arange(p_t.shape[0]), pred]))

    def distance(self, W: np.ndarray) -> float:
        """``‖W − W_tgt‖_F``, the quantity of Eq. (11)."""
        return float(np.linalg.norm(W - self.W_tgt))

    def init_problem(
        self, n_calib: int = N_CALIB, *, X: np.ndarray | None = None, Y: np.ndarray | None = None
    ) -> InitProblem:
        """LoRA-DA's statistics at ``W0`` on the calibration set (first ``n_calib`` pairs, or the
        given ``X`` (n, d1), ``Y`` (n,)).

        ``G`` = mean NLL gradient (Eq. 14); ``J`` = damped empirical Fisher (true labels);
        ``n`` = N, the training-set size (Eq. 19).
        """
        X = self.X[:n_calib] if X is None else X
        Y = self.Y[:n_calib] if Y is None else Y
        G = self.model.gradient(self.W0, X, Y)  # (d1, d2)
        J = self.model.empirical_fisher(self.W0, X, Y)  # (p, p)
        J = J + FISHER_DAMPING * np.trace(J) / J.shape[0] * np.eye(J.shape[0])
        return InitProblem(self.W0, G, J, self.n)


def make_model(kind: TaskKind) -> SoftmaxRegression | LogisticRegression:
    if kind == "softmax":
        return SoftmaxRegression(D1, N_CLASSES, seed=POOL_SEED)
    return LogisticRegression(D1, seed=POOL_SEED)


def make_task(kind: TaskKind, seed: int, *, n_train: int = N_TRAIN) -> Task:
    """Draw ``W0``, ``W_tgt`` and the training set for ``seed`` (module docstring)."""
    model = make_model(kind)
    rng = np.random.default_rng([seed, 1 if kind == "softmax" else 2])
    W0 = model.random_weight(rng, scale=W0_SCALE)  # (d1, d2)
    d1, d2 = model.shape
    U = random_orthonormal(d1, d2, rng)  # (d1, d2)
    V = random_orthonormal(d2, d2, rng)  # (d2, d2)
    shift = U @ np.diag(SHIFT_DECAY ** np.arange(d2)) @ V.T  # (d1, d2)
    shift *= SHIFT_SCALE / np.sqrt(np.mean((model.pool @ shift) ** 2))
    W_tgt = W0 + shift
    X, Y = model.sample(W_tgt, n_train, rng)
    return Task(kind, model, W0, W_tgt, X, Y)


def init_factors(
    task: Task, method: str, r: int, seed: int, problem: InitProblem | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(A0 (d1, r), B0 (r, d2))`` of a registered initialiser on the task's calibration set."""
    problem = task.init_problem() if problem is None else problem
    return initialize(method, problem, r, np.random.default_rng([seed, 7]))


# ---- training -----------------------------------------------------------------------------------
@dataclass
class History:
    """Per-step records of one training run; index 0 is the initial point."""

    W: np.ndarray  # (T+1, d1, d2)
    train_loss: np.ndarray  # (T+1,)
    grad_norm: np.ndarray  # (T+1,) norm of the gradient w.r.t. the trainable parameters
    excess_loss: np.ndarray  # (T+1,)
    accuracy: np.ndarray  # (T+1,)
    distance: np.ndarray  # (T+1,)


def train(
    task: Task,
    factors: tuple[np.ndarray, np.ndarray] | None,
    *,
    train_a: bool,
    steps: int,
    record: bool = True,
) -> History:
    """Full-batch Adam on the training NLL, from ``W0``.

    ``factors=None`` is full fine-tuning of ``W``. Otherwise ``W = W0 + A B`` starting at the given
    ``(A0, B0)``; ``train_a=False`` keeps ``A`` frozen (LoRA-FA, the analysis' setting).
    With ``record=False`` only the final point's metrics are filled (index −1).
    """
    full = factors is None
    params = [task.W0.copy()] if full else [factors[0].copy(), factors[1].copy()]
    trainable = [True] if full else [train_a, True]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    weight = (lambda: params[0]) if full else (lambda: task.W0 + params[0] @ params[1])
    rec = _Recorder(task, steps)
    for t in range(steps + 1):
        W = weight()
        G = task.model.gradient(W, task.X, task.Y)  # (d1, d2)
        grads = [G] if full else [G @ params[1].T, params[0].T @ G]  # dL/dA (d1,r), dL/dB (r,d2)
        if record or t == steps:
            gnorm = np.sqrt(sum(np.sum(g**2) for g, k in zip(grads, trainable) if k))
            rec.log(t, W, gnorm)
        if t == steps:
            break
        for i, (g, k) in enumerate(zip(grads, trainable)):
            if k:
                m[i] = BETAS[0] * m[i] + (1 - BETAS[0]) * g
                v[i] = BETAS[1] * v[i] + (1 - BETAS[1]) * g**2
                m_hat = m[i] / (1 - BETAS[0] ** (t + 1))
                v_hat = v[i] / (1 - BETAS[1] ** (t + 1))
                params[i] = params[i] - LR * m_hat / (np.sqrt(v_hat) + ADAM_EPS)
    return rec.history


class _Recorder:
    def __init__(self, task: Task, steps: int) -> None:
        self.task = task
        nan = np.full(steps + 1, np.nan)
        self.history = History(
            W=np.full((steps + 1, *task.W0.shape), np.nan),
            train_loss=nan.copy(),
            grad_norm=nan.copy(),
            excess_loss=nan.copy(),
            accuracy=nan.copy(),
            distance=nan.copy(),
        )

    def log(self, t: int, W: np.ndarray, gnorm: float) -> None:
        h, task = self.history, self.task
        h.W[t] = W
        h.train_loss[t] = task.model.nll(W, task.X, task.Y)
        h.grad_norm[t] = gnorm
        h.excess_loss[t] = task.excess_loss(W)
        h.accuracy[t] = task.accuracy(W)
        h.distance[t] = task.distance(W)


# The three metrics of the ranking items (table7, fig4, fisher_samples), fixed before any run:
METRICS = {
    "converged_distance": "‖Ŵ − W_tgt‖_F, A frozen, B̂ = constrained MLE (Eq. 11)",
    "frozen_excess": "excess target loss, A frozen, Adam",
    "trained_excess": "excess target loss, A trained, Adam",
}


def evaluate(task: Task, factors: tuple[np.ndarray, np.ndarray], steps: int) -> dict[str, float]:
    """The :data:`METRICS` of one initialisation ``(A0, B0)`` on ``task``."""
    frozen = train(task, factors, train_a=False, steps=steps, record=False)
    trained = train(task, factors, train_a=True, steps=steps, record=False)
    return {
        "converged_distance": converged_distance(task, factors[0]),
        "frozen_excess": float(frozen.excess_loss[-1]),
        "trained_excess": float(trained.excess_loss[-1]),
    }


def converged_distance(task: Task, A: np.ndarray) -> float:
    """``‖W0 + A B̂ − W_tgt‖_F`` at the constrained MLE ``B̂`` for frozen ``A`` (Eqs. 10–11)."""
    B_hat = task.model.constrained_mle(task.W0, A, task.X, task.Y)  # (r, d2)
    return task.distance(task.W0 + A @ B_hat)


# ---- statistics -----------------------------------------------------------------------------------
def mean_sd(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single seed)."""
    values = np.asarray(values, dtype=np.float64)
    sd = (
        values.std(axis=axis, ddof=1)
        if values.shape[axis] > 1
        else np.zeros_like(values.mean(axis))
    )
    return values.mean(axis=axis), sd
