"""Bad input to the NumPy reference raises ValueError/TypeError naming the problem."""

from __future__ import annotations

import numpy as np
import pytest

import lora_da_ref as ld
from tests.cases import random_spd

RNG = np.random.default_rng(0)
J = random_spd(6, RNG)  # d1 = 3, d2 = 2
G = RNG.standard_normal((3, 2))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ld.fisher_gradient(J[:, :5], G), "J must be square"),
        (lambda: ld.fisher_gradient(J + np.triu(np.ones((6, 6)), 1), G), "J must be symmetric"),
        (lambda: ld.fisher_gradient(-J, G), "J must be positive definite"),
        (lambda: ld.fisher_gradient(J, G[:, :1]), "J must be 3×3"),
        (lambda: ld.fisher_gradient(J, np.ones(3)), "G must be 2-D"),
        (
            lambda: ld.fisher_gradient(np.where(np.eye(6) > 0, np.nan, J), G),
            "J contains non-finite",
        ),
        (lambda: ld.fisher_gradient(J, np.full((3, 2), np.inf)), "G contains non-finite"),
        (lambda: ld.inverse_fisher_block_sum(J, 3, 3), "J must be 9×9"),
        (lambda: ld.inverse_fisher_block_sum(J, 0, 2), "d1 must be positive"),
        (lambda: ld.guidance_matrix(J, G, 0), "n must be positive"),
        (
            lambda: ld.guidance_matrix(J, G, 10, variance_weight=np.nan),
            "variance_weight must be finite",
        ),
        (lambda: ld.smallest_eigvecs(np.ones((3, 4)), 1), "omega must be square"),
        (lambda: ld.smallest_eigvecs(np.eye(3), 0), "r must be positive"),
        (lambda: ld.smallest_eigvecs(np.eye(3), 4), r"1 <= r <= d1 = 3"),
        (lambda: ld.lora_da_init(J, G, 10, 5), r"1 <= r <= d1 = 3"),
        (lambda: ld.KroneckerFisher(np.array([1.0, -1.0]), np.eye(3)), "diagonal Y must be"),
        (lambda: ld.KroneckerFisher(np.eye(2), -np.eye(3)), "Z must be positive definite"),
        (
            lambda: ld.expected_error_bound(np.ones((3, 1)), J, G, 10),
            "A must be column-orthonormal",
        ),
        (
            lambda: ld.guidance_matrix(ld.KroneckerFisher(np.eye(3), np.eye(3)), G, 10),
            r"J is for W of shape \(3, 3\)",
        ),
    ],
)
def test_value_errors_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ld.fisher_gradient("J", G), "J must be an array"),
        (lambda: ld.guidance_matrix(J, G, 2.5), "n must be an integer"),
        (lambda: ld.smallest_eigvecs(np.eye(3), 1.0), "r must be an integer"),
    ],
)
def test_type_errors_name_the_problem(call, match):
    with pytest.raises(TypeError, match=match):
        call()
