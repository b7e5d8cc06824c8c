"""The registry of claims, numbered as in docs/theory.md: dispatch by id through a dict, never
string ifs."""

from __future__ import annotations

from proofs_check import (
    calibration_noise,
    courant_fischer,
    degenerate,
    fisher_gradient,
    kfac_exact,
    lemma_c1,
    lemma_c2,
    lemma_c3,
    loewner,
    matrix_case,
    pythagoras,
    relaxation_price,
    theorems,
    variational,
)
from proofs_check._record import Claim

CLAIMS: dict[str, Claim] = {
    c.id: c
    for c in [
        Claim("1", "Courant-Fischer, Eqs. (5)-(8)", courant_fischer.run),
        Claim("2", "variational identity, Eqs. (28)-(31)", variational.run),
        Claim("3", "Loewner bound, Eqs. (27), (33)-(34)", loewner.run),
        Claim("4", "constrained-MLE covariance, Aux. Lemma C.2 (26)", lemma_c2.run),
        Claim("5", "variance bound, Lemma C.1 (25)", lemma_c1.run),
        Claim("6", "inverse-Fisher Lipschitz, Lemma C.3 (35)-(41)", lemma_c3.run),
        Claim("7", "Pythagoras and bias, Eqs. (23), (43)-(46)", pythagoras.run),
        Claim("8", "matrix case, Eq. (48)", matrix_case.run),
        Claim("9", "Fisher-gradient, Eqs. (16), (21)", fisher_gradient.run),
        Claim("10", "Theorems 4.1/4.2: bound and measured error", theorems.run),
        Claim("11", "degenerate case = LoRA-One, Remark 4.3", degenerate.run),
        Claim("12", "K-FAC exactness, Algorithm 1", kfac_exact.run),
        Claim("13", "price of the Loewner relaxation (beyond the paper)", relaxation_price.run),
        Claim(
            "14",
            "calibration-noise lemma, E[Ω̂] at finite |S| (beyond the paper)",
            calibration_noise.run,
        ),
    ]
}
