"""LoRA-DA's initialisation (Eq. 17, Theorems 4.1/4.2), its baselines and the paper's ablations.

Every initialiser maps an :class:`InitProblem` and a rank ``r`` to ``(A0, B0)`` with ``A0`` (d1, r)
column-orthonormal and ``B0`` (r, d2). The adapted layer starts at ``W0 + A0 B0``: ``B0 = 0`` means
the model is unchanged at start (LoRA; PiSSA/MiLoRA after their base-weight offset;
``lora_one_subspace``), ``B0 = A0ᵀΔW`` is Eq. (17). In the analysis only ``col(A0)`` matters: the
constrained MLE over ``W0 + A0 B`` (Eq. 10) does not depend on ``B0``.

Dispatch goes through the :data:`INITIALIZERS` registry, never through string ``if`` chains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lora_da_ref.reference.checks import as_matrix, check_positive_int, check_rank
from lora_da_ref.reference.eigen import fix_signs, smallest_eigvecs
from lora_da_ref.reference.fisher import FisherMatrix, as_fisher
from lora_da_ref.reference.guidance import fisher_gradient, guidance_matrix
from lora_da_ref.reference.linalg import random_orthonormal

__all__ = [
    "INITIALIZERS",
    "InitProblem",
    "initialize",
    "lora_da_init",
]

Factors = tuple[np.ndarray, np.ndarray]  # (A0 (d1, r), B0 (r, d2))


@dataclass(frozen=True)
class InitProblem:
    """What a data-aware initialiser may look at, for one layer.

    Attributes:
        W0: pre-trained weight (d1, d2).
        G: mean gradient of the target loss at W0 (d1, d2).
        J: Fisher of vec(W) at W0, dense (d1·d2, d1·d2) or a FisherMatrix.
        n: N, the fine-tuning set size.
        delta_w: displacement ΔW to use; ``None`` = the Fisher–gradient ``−J⁻¹G`` (Eq. 21).
            Passing the true ``W_tgt − W0`` gives the "oracle" version of the theorems.
        n_calib: |S|, the number of calibration samples ``G`` and ``J`` were estimated from;
            ``None`` = exact (population) statistics. Only the calibration-noise-aware variants
            (claim 14, ``docs/regime.md``) read it.
    """

    W0: np.ndarray
    G: np.ndarray
    J: np.ndarray | FisherMatrix
    n: int
    delta_w: np.ndarray | None = None
    n_calib: int | None = None

    def __post_init__(self) -> None:
        W0 = as_matrix("W0", self.W0)
        object.__setattr__(self, "W0", W0)
        object.__setattr__(self, "G", as_matrix("G", self.G, shape=W0.shape))
        object.__setattr__(self, "J", as_fisher(self.J, *W0.shape))
        object.__setattr__(self, "n", check_positive_int("n", self.n))
        if self.delta_w is not None:
            object.__setattr__(self, "delta_w", as_matrix("delta_w", self.delta_w, W0.shape))
        if self.n_calib is not None:
            object.__setattr__(self, "n_calib", check_positive_int("n_calib", self.n_calib))

    @property
    def displacement(self) -> np.ndarray:
        """ΔW: the given one, else the Fisher–gradient estimate −J⁻¹G (Eqs. 16, 21)."""
        return self.delta_w if self.delta_w is not None else fisher_gradient(self.J, self.G)


def lora_da_init(
    J: np.ndarray | FisherMatrix,
    G: np.ndarray,
    n: int,
    r: int,
    *,
    delta_w: np.ndarray | None = None,
    variance_weight: float = 1.0,
    bias_weight: float = 1.0,
) -> Factors:
    """LoRA-DA initialisation, Theorem 4.1 (d2 = 1) / Theorem 4.2 and Eq. (17).

    ``ΔW = −J⁻¹G`` (Eq. 21) unless ``delta_w`` is given; ``Ω`` from Eq. (19); ``A0`` = the r
    smallest eigenvectors of Ω (Eqs. 5–8); ``B0 = A0ᵀ ΔW`` (Eq. 17).

    Args:
        J: Fisher of vec(W) at W0. G: mean target-loss gradient at W0, (d1, d2).
        n: N. r: LoRA rank, 1 ≤ r ≤ d1. variance_weight/bias_weight: β/α of Eq. (19).

    Returns:
        (A0 (d1, r), B0 (r, d2)).
    """
    G = as_matrix("G", G)
    r = check_rank(r, G.shape[0])
    J = as_fisher(J, *G.shape)  # checked and factorised once for ΔW and Ω (not once for each)
    delta = fisher_gradient(J, G) if delta_w is None else as_matrix("delta_w", delta_w, G.shape)
    omega = guidance_matrix(
        J, delta, n, variance_weight=variance_weight, bias_weight=bias_weight
    )  # (d1, d1)
    A0 = smallest_eigvecs(omega, r)  # (d1, r)
    return A0, A0.T @ delta  # (r, d2)


# --- the registry -------------------------------------------------------------------------------

Initializer = Callable[[InitProblem, int, np.random.Generator], Factors]


def _lora(p: InitProblem, r: int, rng: np.random.Generator) -> Factors:
    """Vanilla LoRA in the analysis' form: a random orthonormal A (Haar), B = 0."""
    return random_orthonormal(p.W0.shape[0], r, rng), np.zeros((r, p.W0.shape[1]))


def _left_singular(M: np.ndarray, r: int, *, largest: bool) -> np.ndarray:
    """Top (or bottom) r left singular vectors of M (d1, d2), as (d1, r).

    Bottom uses the full U: when d1 > d2 its last d1 − d2 columns have singular value 0, so for
    r > d1 − d2 … the minor directions include W0's weakest non-zero ones.
    """
    U, _, _ = np.linalg.svd(M, full_matrices=True)  # (d1, d1), descending singular values
    cols = U[:, :r] if largest else U[:, ::-1][:, :r]  # bottom: smallest first
    return fix_signs(cols)


def _pissa(p: InitProblem, r: int, rng: np.random.Generator) -> Factors:
    """PiSSA: top-r left singular vectors of W0. B0 = 0 after PiSSA's base offset W0 − A Σ Vᵀ."""
    return _left_singular(p.W0, r, largest=True), np.zeros((r, p.W0.shape[1]))


def _milora(p: InitProblem, r: int, rng: np.random.Generator) -> Factors:
    """MiLoRA: bottom-r left singular vectors of W0 (minor components). B0 = 0 after its offset."""
    return _left_singular(p.W0, r, largest=False), np.zeros((r, p.W0.shape[1]))


def _lora_one_subspace(p: InitProblem, r: int, rng: np.random.Generator) -> Factors:
    """LoRA-One's (and LoRA-GA's) subspace: top-r left singular vectors of −G (Eq. 22), B0 = 0.

    Not the official LoRA-One init (``lora_da_ref.torch.baselines.lora_one``), whose B0 ≠ 0 makes
    ``A0 B0`` a scaled gradient step: only ``col(A0)`` enters the analysis (Eq. 10), and the
    official A spans this same subspace.
    """
    return _left_singular(-p.G, r, largest=True), np.zeros((r, p.W0.shape[1]))


def _lora_da(beta: float, alpha: float, *, fisher: bool = True) -> Initializer:
    def init(p: InitProblem, r: int, rng: np.random.Generator) -> Factors:
        delta = p.displacement if fisher else -p.G  # "w/o Fisher": plain gradient, Remark 4.3
        return lora_da_init(
            p.J, p.G, p.n, r, delta_w=delta, variance_weight=beta, bias_weight=alpha
        )

    return init


def _noise_weights(p: InitProblem, delta: np.ndarray) -> tuple[float, float]:
    """``(1/|S|, SNR̂)``: the calibration-noise scale and ``|S|·‖ΔŴ‖² / tr(Σ_i Ĵ⁻¹_[i])``.

    Claim 14 (``proofs_check.calibration_noise``): ``E[ΔŴΔŴᵀ] ≈ ΔWΔWᵀ + Σ_i J⁻¹_[i]/|S|``, so
    ``SNR̂`` estimates ``SNR + 1``. Exact statistics (``n_calib=None``) have no noise: ``(0, inf)``.
    """
    if p.n_calib is None:
        return 0.0, np.inf
    trace = float(np.trace(p.J.inverse_block_sum()))
    return 1.0 / p.n_calib, p.n_calib * float(np.sum(delta**2)) / trace


def _lora_da_debiased(p: InitProblem, r: int, rng: np.random.Generator) -> Factors:
    """LoRA-DA with the calibration-noise bias of ``ΔŴΔŴᵀ`` removed (claim 14, ``docs/regime.md``).

    ``Ω = (1/N + 1/|S|) Σ_i Ĵ⁻¹_[i] − ΔŴΔŴᵀ``: unbiased for Eq. (19)'s Ω to leading order,
    i.e. variance weight ``β = 1 + N/|S|``. Equals ``lora_da`` for exact statistics.
    """
    delta = p.displacement
    inv_s, _ = _noise_weights(p, delta)
    return lora_da_init(p.J, p.G, p.n, r, delta_w=delta, variance_weight=1.0 + p.n * inv_s)


def _lora_da_damped(p: InitProblem, r: int, rng: np.random.Generator) -> Factors:
    """LoRA-DA with the bias term damped by its estimated signal fraction (``docs/regime.md``).

    ``Ω = (1/N) Σ_i Ĵ⁻¹_[i] − α̂ ΔŴΔŴᵀ`` with the positive-part (James–Stein / Wiener) factor
    ``α̂ = max(0, 1 − 1/SNR̂)``, ``SNR̂ = |S|‖ΔŴ‖²/tr(Σ_i Ĵ⁻¹_[i])`` (≈ SNR/(SNR + 1)): plain
    LoRA-DA when the calibration set determines ΔW, the "w/o bias" ablation when it does not.
    Equals ``lora_da`` for exact statistics. ``B0 = A0ᵀΔŴ`` as Eq. (17).
    """
    delta = p.displacement
    _, snr = _noise_weights(p, delta)
    alpha = max(0.0, 1.0 - 1.0 / snr)
    return lora_da_init(p.J, p.G, p.n, r, delta_w=delta, bias_weight=alpha)


INITIALIZERS: dict[str, Initializer] = {
    "lora": _lora,
    "pissa": _pissa,
    "milora": _milora,
    "lora_one_subspace": _lora_one_subspace,
    "lora_da": _lora_da(1.0, 1.0),
    # Table 7 ablations.
    "lora_da_no_bias": _lora_da(1.0, 0.0),
    "lora_da_no_variance": _lora_da(0.0, 1.0),
    "lora_da_no_variance_no_fisher": _lora_da(0.0, 1.0, fisher=False),
    # Calibration-noise-aware estimators (not in the paper; claim 14, docs/regime.md).
    "lora_da_debiased": _lora_da_debiased,
    "lora_da_damped": _lora_da_damped,
}


def initialize(
    name: str, problem: InitProblem, r: int, rng: np.random.Generator | None = None
) -> Factors:
    """Run the initialiser registered as ``name`` (see :data:`INITIALIZERS`)."""
    try:
        init = INITIALIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown initialiser {name!r}; choose one of {sorted(INITIALIZERS)}"
        ) from None
    r = check_rank(r, problem.W0.shape[0])
    return init(problem, r, np.random.default_rng(0) if rng is None else rng)
