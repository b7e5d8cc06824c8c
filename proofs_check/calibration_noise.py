"""Claim 14 — the calibration-noise lemma (beyond the paper; docs/regime.md).

LoRA-DA's displacement ``ΔŴ = −Ĵ⁻¹Ĝ`` (21) is computed from a calibration set ``S`` of ``|S|``
pairs drawn from ``p(·; W_tgt)``; its noise enters the plug-in guidance matrix (19).

Derivation. ``Ĝ`` is a mean of ``|S|`` i.i.d. scores at ``W0`` (negated), so ``E vec Ĝ = vec G``
and ``Cov(vec Ĝ) = C/|S|`` with ``C = Cov_tgt(s(W0))`` (for these canonical-link GLMs
``C = E_x[(Λ(x; W_tgt) + δδᵀ) ⊗ xxᵀ] − vec G vec Gᵀ``, ``δ = E_tgt[e | x] − E_0[e | x]``).

* Exact Fisher (``Ĵ = J``): ``ΔŴ`` is linear in ``Ĝ``, hence **exactly**, for every ``|S|`` and
  ``ΔW``, ``E[ΔŴΔŴᵀ] = ΔW_J ΔW_Jᵀ + (1/|S|) Σ_i (J⁻¹CJ⁻¹)_[i]`` with ``ΔW_J = −J⁻¹G``
  (``E[M Mᵀ] = E[M] E[M]ᵀ + Σ_i Cov(vec M)_[i]`` for column-stacked ``vec``).
  ``C = J + O(‖ΔW‖)`` (logistic; ``O(‖ΔW‖²)`` linear-Gaussian) and ``ΔW_J = ΔW + O(‖ΔW‖²)``
  (claim 9), so to leading order ``E[ΔŴΔŴᵀ] ≈ ΔWΔWᵀ + Σ_i J⁻¹_[i]/|S|`` and, with β = α = 1,
  ``E[Ω̂] ≈ (1/N − 1/|S|) Σ_i J⁻¹_[i] − ΔWΔWᵀ``: for ``|S| < N`` the variance term changes sign.
* Estimated Fisher (``Ĵ`` = the empirical Fisher on the same ``S``, as in practice): its mean is
  ``J̄ = E[Ĵ] = C + vec G vec Gᵀ`` exactly (= ``J + O(‖ΔW‖)`` for the logistic model, a first-order
  bias of the empirical Fisher), and ``Ĵ⁻¹ = J̄⁻¹ − J̄⁻¹δJ J̄⁻¹ + …`` adds terms of relative size
  ``c/|S|`` (``δJ·δG`` products). So the lemma holds with ``J̄`` in place of ``J``:
  ``E[Ω̂] = (1/N) Σ_i J̄⁻¹_[i] − m mᵀ − (1/|S|) Σ_i (J̄⁻¹CJ̄⁻¹)_[i] + O(c/|S|²)``, ``m = −J̄⁻¹G``.
  Ĵ's noise does **not** change the ``1/|S|`` order, but inflates the noise by ``1 + c/|S|`` and
  ``c`` is large (≈ 50–90 here, ~10·d1: Laplace inputs are heavy-tailed): +20–30 % at |S| = 256.
  (``(1/N) Σ Ĵ⁻¹_[i]`` has a bias of relative order ``1/|S|``, i.e. ``O(1/(N|S|))``: negligible.)

Checks (models of ``proofs_check.models``: linear-Gaussian, J exact and constant; logistic, d2 = 1), Monte-Carlo
over ``R`` calibration draws, z-scores ``(mean − prediction)/s.e.`` over the d1(d1+1)/2 entries:
  14a/14b exact identity above (exact J), linear-Gaussian / logistic: max |z|;
  14c/14d ``E[Ω̂]`` with Ĵ estimated, at |S| = 4096, N = 4|S|, SNR ≈ 0.3, against the lemma at J̄:
      max |z| (the leading form with J and ΔW is reported: its error is O(‖ΔW‖) relative);
  14e/14f Ĵ's noise is second order: the relative excess ``ρ(|S|) = tr(E[ΔŴΔŴᵀ] − ΔWΔWᵀ) /
      tr(Σ_i J⁻¹_[i]/|S|) − 1`` at ΔW ≈ 0 obeys ``|S|·ρ(|S|)`` = const between |S| = 256 and 1024
      (|z| of the difference); ``c`` is reported.
Known gap (``--full``, 10 000 draws): 14d fails (max |z| 8.5; the leading form 10.7). At that
resolution (s.e. ≈ 1 % of an entry) the logistic model's next-order terms are visible: Ĵ's noise
inflation c/|S| ≈ 1.5 % at |S| = 4096, and the cross terms of the O(‖ΔW‖) empirical-Fisher bias.
The quick mode (1000 draws, s.e. ≈ 4.5 %) resolves the lemma at J̄, not these terms.
Broken inputs: ``"sign"`` — the noise term with the wrong sign (``+1/|S|`` in E[Ω̂], ``−`` in
E[ΔŴΔŴᵀ]); ``"fisher"`` — ``J`` in place of ``J⁻¹`` in the noise term. ``broken=True`` = "sign".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lora_da_ref.reference.guidance import inverse_fisher_block_sum
from lora_da_ref.reference.linalg import kron_average, unvec, vec
from lora_da_ref.reference.synthetic import SyntheticModel
from proofs_check._record import ClaimResult, Mode, check_mode
from proofs_check.models import MEAN_MAP, direction, make_model, population_gradient

REF = "Eq. (19), (21) + |S|"
SETTINGS = {"quick": {"draws": 1000}, "full": {"draws": 10000}}
# Max |z| over 36 correlated entries: two-sided Bonferroni at family-wise level 2.5e-4 (z = 4.5);
# the draws are seeded, so a pass is reproducible, and the broken inputs sit at |z| > 20.
Z_TOL = 4.5
S_SMALL, S_MID, S_LARGE = 256, 1024, 4096
T_TINY = 0.01  # ‖ΔW‖_F for the ΔW ≈ 0 rows (SNR < 1e-3)
SNR_MID = 0.3  # ‖ΔW‖²·|S|/tr(Σ J⁻¹_[i]) of rows 14a–14d: both terms of the lemma matter
N_FT = 4 * S_LARGE  # N of Ω̂ in rows 14c/14d (|S| < N: the variance term's sign flips)
BROKEN = ("sign", "fisher")


@dataclass(frozen=True)
class Draws:
    """Per-draw ``ΔŴΔŴᵀ`` (exact J and estimated Ĵ) and ``Σ_i Ĵ⁻¹_[i]`` (R, d1, d1)."""

    exact: np.ndarray
    estimated: np.ndarray
    block_sum_hat: np.ndarray


@dataclass(frozen=True)
class Setup:
    model: SyntheticModel
    W0: np.ndarray
    delta: np.ndarray  # ΔW = W_tgt − W0
    J: np.ndarray  # J(W0), exact
    block_sum: np.ndarray  # Σ_i J⁻¹_[i] (d1, d1)
    fisher_block_sum: np.ndarray  # Σ_i J_[i] (d1, d1): the "J in place of J⁻¹" broken input

    @property
    def W_tgt(self) -> np.ndarray:
        return self.W0 + self.delta

    def snr(self, n_calib: int) -> float:
        return float(np.sum(self.delta**2) * n_calib / np.trace(self.block_sum))


def _setup(name: str, t: float | None, seed: int) -> Setup:
    """Model ``name``, W0 (logits s.d. ≈ 1), ΔW = t·D (t=None: SNR_MID at |S| = S_LARGE)."""
    model = make_model(name)
    rng = np.random.default_rng([seed, len(name)])
    W0, D = model.random_weight(rng), direction(model, rng)
    J = model.population_fisher(W0)
    d1, d2 = model.shape
    bs = inverse_fisher_block_sum(J, d1, d2)
    if t is None:
        t = float(np.sqrt(SNR_MID * np.trace(bs) / S_LARGE))
    return Setup(model, W0, t * D, J, bs, _block_sum(J, d1, d2))


def _block_sum(M: np.ndarray, d1: int, d2: int) -> np.ndarray:
    """``Σ_i M_[i]``, the sum of the d2 diagonal (d1, d1) blocks of M (d1·d2, d1·d2)."""
    return sum(M[i * d1 : (i + 1) * d1, i * d1 : (i + 1) * d1] for i in range(d2))


def _score_covariance(s: Setup) -> np.ndarray:
    """``C = Cov_tgt(score at W0)`` (p, p), exact over the design pool."""
    m, X = s.model, s.model.pool
    F0, Ft = X @ s.W0, X @ s.W_tgt
    delta = MEAN_MAP[type(m)](m, Ft) - MEAN_MAP[type(m)](m, F0)  # E_tgt[e|x] (M, d2)
    second = m._output_fisher(Ft) + delta[:, :, None] * delta[:, None, :]  # E_tgt[e eᵀ | x]
    g = vec(population_gradient(m, s.W0, s.W_tgt))  # −E[score]
    return kron_average(second, X) - np.outer(g, g)


def _draw(s: Setup, n_calib: int, reps: int, rng: np.random.Generator) -> Draws:
    m, (d1, d2) = s.model, s.model.shape
    Jinv = np.linalg.inv(s.J)
    exact, est, bsh = (np.empty((reps, d1, d1)) for _ in range(3))
    for k in range(reps):
        X, Y = m.sample(s.W_tgt, n_calib, rng)
        g = vec(m.gradient(s.W0, X, Y))
        Jh = m.empirical_fisher(s.W0, X, Y)  # true labels, as the official code
        dw = unvec(-Jinv @ g, d1, d2)
        exact[k] = dw @ dw.T
        dwh = unvec(-np.linalg.solve(Jh, g), d1, d2)
        est[k] = dwh @ dwh.T
        bsh[k] = inverse_fisher_block_sum(Jh, d1, d2)
    return Draws(exact, est, bsh)


def _max_z(samples: np.ndarray, prediction: np.ndarray) -> float:
    """Max |z| over the upper-triangle entries of ``mean(samples) − prediction``."""
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    iu = np.triu_indices(prediction.shape[0])
    return float(np.max(np.abs((mean - prediction)[iu] / se[iu])))


def _noise(s: Setup, broken: str | None) -> np.ndarray:
    """The noise term ``Σ_i J⁻¹_[i]`` per unit ``1/|S|`` — or a broken input's version of it."""
    if broken == "fisher":
        return s.fisher_block_sum
    return -s.block_sum if broken == "sign" else s.block_sum


def _excess(d: np.ndarray, s: Setup, n_calib: int) -> tuple[float, float]:
    """``|S|·ρ`` and its s.e., ρ = tr(E[ΔŴΔŴᵀ] − ΔWΔWᵀ)/tr(Σ J⁻¹_[i]/|S|) − 1."""
    noise = np.trace(s.block_sum) / n_calib
    traces = (np.trace(d, axis1=1, axis2=2) - np.sum(s.delta**2)) / noise - 1.0
    return n_calib * float(traces.mean()), n_calib * float(traces.std(ddof=1) / np.sqrt(d.shape[0]))


def run(mode: Mode = "quick", *, broken: bool | str = False, seed: int = 14) -> list[ClaimResult]:
    """Claim 14: rows 14a–14f (see the module docstring)."""
    reps = SETTINGS[check_mode(mode)]["draws"]
    kind = "sign" if broken is True else (broken or None)
    if kind is not None and kind not in BROKEN:
        raise ValueError(f"broken must be False, True or one of {BROKEN}, got {broken!r}")
    rows: list[ClaimResult] = []
    for ids, name in (
        (("14a", "14c", "14e"), "linear_gaussian"),
        (("14b", "14d", "14f"), "logistic"),
    ):
        rows += _model_rows(ids, name, reps, kind, seed)
    return sorted(rows, key=lambda r: r.id)


def _model_rows(ids, name, reps, kind, seed) -> list[ClaimResult]:
    rng = np.random.default_rng([seed, 99, len(name)])
    s = _setup(name, None, seed)
    d = _draw(s, S_LARGE, reps, rng)
    noise = _noise(s, kind)
    dW_J = unvec(
        -np.linalg.solve(s.J, vec(population_gradient(s.model, s.W0, s.W_tgt))), *s.model.shape
    )
    C = _score_covariance(s)
    Jinv = np.linalg.inv(s.J)
    sandwich = _block_sum(Jinv @ C @ Jinv, *s.model.shape)  # Σ_i (J⁻¹CJ⁻¹)_[i]
    exact_noise = {None: sandwich, "sign": -sandwich, "fisher": s.fisher_block_sum}[kind]
    pred_exact = dW_J @ dW_J.T + exact_noise / S_LARGE
    # Ĵ enters through its mean J̄ = E[Ĵ] = C + vec G vec Gᵀ (= J + O(‖ΔW‖)) up to O(1/|S|²):
    g = vec(population_gradient(s.model, s.W0, s.W_tgt))
    Jbar = C + np.outer(g, g)
    Jbar_inv = np.linalg.inv(Jbar)
    m_bar = unvec(-Jbar_inv @ g, *s.model.shape)
    noise_bar = {
        None: _block_sum(Jbar_inv @ C @ Jbar_inv, *s.model.shape),
        "sign": -_block_sum(Jbar_inv @ C @ Jbar_inv, *s.model.shape),
        "fisher": s.fisher_block_sum,
    }[kind]
    omega_hat = d.block_sum_hat / N_FT - d.estimated  # per-draw Ω̂ (β = α = 1)
    pred_omega = _block_sum(Jbar_inv, *s.model.shape) / N_FT - m_bar @ m_bar.T - noise_bar / S_LARGE
    lead_omega = (1.0 / N_FT) * s.block_sum - noise / S_LARGE - s.delta @ s.delta.T
    tiny = _setup(name, T_TINY, seed)
    small = _draw(tiny, S_SMALL, reps, rng).estimated
    mid = _draw(tiny, S_MID, reps, rng).estimated
    (c_small, se_small), (c_mid, se_mid) = _excess(small, tiny, S_SMALL), _excess(mid, tiny, S_MID)
    z_c = abs(c_small - c_mid) / np.hypot(se_small, se_mid)
    # The alternative "Ĵ's noise is first order" (ρ, not |S|·ρ, constant) on the same draws:
    z_first = abs(c_small / S_SMALL - c_mid / S_MID) / np.hypot(se_small / S_SMALL, se_mid / S_MID)
    rel_C = float(np.linalg.norm(C - s.J) / np.linalg.norm(s.J))
    lin = float(np.linalg.norm(dW_J - s.delta) / np.linalg.norm(s.delta))
    why = f"{reps} draws; Bonferroni over d1(d1+1)/2 entries (z = {Z_TOL})"
    snr = s.snr(S_LARGE)
    return [
        ClaimResult(
            ids[0],
            REF,
            f"{name}, J exact, |S|={S_LARGE}: max|z| E[ΔŴΔŴᵀ] vs ΔW_JΔW_Jᵀ+ΣJ⁻¹CJ⁻¹_[i]/|S|",
            _max_z(d.exact, pred_exact),
            Z_TOL,
            "<=",
            why,
            details={
                "SNR ‖ΔW‖²|S|/tr(ΣJ⁻¹_[i])": snr,
                "‖C − J‖/‖J‖ (score covariance vs Fisher)": rel_C,
                "‖ΔW_J − ΔW‖/‖ΔW‖ (linearisation)": lin,
                "max|z| of the leading form ΔWΔWᵀ + ΣJ⁻¹_[i]/|S|": _max_z(
                    d.exact, s.delta @ s.delta.T + noise / S_LARGE
                ),
            },
        ),
        ClaimResult(
            ids[1],
            REF,
            f"{name}, Ĵ empirical, |S|={S_LARGE}, N={N_FT}: max|z| E[Ω̂] vs the lemma at J̄=E[Ĵ]",
            _max_z(omega_hat, pred_omega),
            Z_TOL,
            "<=",
            why,
            details={
                "SNR": snr,
                "‖J̄ − J‖/‖J‖ (J̄ = E[Ĵ] = C + ggᵀ)": float(
                    np.linalg.norm(Jbar - s.J) / np.linalg.norm(s.J)
                ),
                "max|z| of the leading form (1/N−1/|S|)ΣJ⁻¹_[i] − ΔWΔWᵀ": _max_z(
                    omega_hat, lead_omega
                ),
                "λ_min(E[Ω̂])·N/λ_min(ΣJ⁻¹_[i]) (sign flip: < 0)": float(
                    np.linalg.eigvalsh(omega_hat.mean(0))[0]
                    * N_FT
                    / np.linalg.eigvalsh(s.block_sum)[0]
                ),
            },
        ),
        ClaimResult(
            ids[2],
            REF,
            f"{name}, Ĵ empirical, ΔW≈0: |z| of |S|ρ(|S|) at {S_SMALL} vs {S_MID} (2nd order)",
            float(z_c),
            Z_TOL,
            "<=",
            "|z| of a difference of two independent MC means; 4.5 ≈ 7e-6 two-sided",
            se=float(np.hypot(se_small, se_mid)),
            details={
                f"c = |S|·ρ at |S|={S_SMALL}": c_small,
                f"c = |S|·ρ at |S|={S_MID}": c_mid,
                f"noise inflation by Ĵ at |S|={S_SMALL} (ρ)": c_small / S_SMALL,
                "|z| of ρ(256) vs ρ(1024) (first-order alternative; must be large)": float(z_first),
            },
        ),
    ]
