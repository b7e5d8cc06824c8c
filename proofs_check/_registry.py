"""The registry of claims (issue 3 numbering): dispatch by id through a dict, never string ifs."""

from __future__ import annotations

from proofs_check import (
    courant_fischer,
    degenerate,
    loewner,
    matrix_case,
    pythagoras,
    variational,
)
from proofs_check._record import Claim

CLAIMS: dict[str, Claim] = {
    c.id: c
    for c in [
        Claim("1", "Courant-Fischer, Eqs. (5)-(8)", courant_fischer.run),
        Claim("2", "variational identity, Eqs. (28)-(31)", variational.run),
        Claim("3", "Loewner bound, Eqs. (27), (33)-(34)", loewner.run),
        Claim("7", "Pythagoras and bias, Eqs. (23), (43)-(46)", pythagoras.run),
        Claim("8", "matrix case, Eq. (48)", matrix_case.run),
        Claim("11", "degenerate case = LoRA-One, Remark 4.3", degenerate.run),
    ]
}
