"""``lora_da_ref.torch.blas``: BLAS ``syrk`` through SciPy's Cython API, on the tensors' memory.

The reference is a plain ``torch`` product in float64, independent of the BLAS call. Each layout
case catches a wrong ``trans``/``lda`` (the product of the wrong matrix or of misread memory);
the triangle checks catch the wrong ``uplo`` (BLAS is column-major)."""

from __future__ import annotations

import pytest
import torch

from lora_da_ref.torch import guidance_matrix
from lora_da_ref.torch.blas import _blas_ok, gram_lower, syevr_smallest, symmetric_update


def _layouts(n: int, k: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n * 1000 + k)
    M = torch.randn(n, k, generator=gen, dtype=torch.float64)
    wide = torch.randn(n, k + 5, generator=gen, dtype=torch.float64)
    return {
        "rows contiguous": M,
        "columns contiguous": torch.randn(k, n, generator=gen, dtype=torch.float64).mT,
        "row slice (lda > k)": wide[:, 2 : 2 + k],
        "column slice (lda > n)": torch.randn(k, n + 3, generator=gen, dtype=torch.float64)[
            :, 1 : 1 + n
        ].mT,
        "strided (copied)": torch.randn(n, 2 * k, generator=gen, dtype=torch.float64)[:, ::2],
    }


def _symmetric(n: int, seed: int) -> torch.Tensor:
    S = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return S + S.mT


@pytest.mark.parametrize("shape", [(7, 3), (5, 11), (40, 40)])
def test_symmetric_update_is_alpha_mmt_plus_beta_c_exactly_symmetric(shape):
    n, k = shape
    C = _symmetric(n, 1)
    C_before = C.clone()
    for layout, M in _layouts(n, k).items():
        assert _blas_ok(M, C), layout  # the BLAS path is the one under test
        want = -0.7 * (M @ M.mT) + 0.3 * C
        got = symmetric_update(M, -0.7, C, 0.3)
        assert torch.equal(got, got.mT), layout
        assert float((got - want).abs().max() / want.abs().max()) < 1e-14, layout
        assert torch.equal(C, C_before), layout  # C is not modified
        got0 = symmetric_update(M, 2.0)
        assert float((got0 - 2.0 * M @ M.mT).abs().max() / got0.abs().max()) < 1e-14, layout


def test_gram_lower_fills_the_lower_triangle():
    for layout, M in _layouts(9, 4).items():
        G = gram_lower(M)
        want = M @ M.mT
        assert float((G.tril() - want.tril()).abs().max() / want.abs().max()) < 1e-14, layout
        assert torch.equal(G.triu(1), torch.zeros_like(G)), layout


def test_float32_and_the_torch_fallback():
    M = torch.randn(12, 5, generator=torch.Generator().manual_seed(2))
    C = _symmetric(12, 3).float()
    got = symmetric_update(M, 1.5, C, -1.0)
    want = 1.5 * (M.double() @ M.double().mT) - C.double()
    assert got.dtype == torch.float32 and torch.equal(got, got.mT)
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-6
    half = M.to(torch.bfloat16)  # no BLAS syrk for it: torch.addmm, same result and symmetry
    assert not _blas_ok(half, None)
    out = symmetric_update(half, 1.0)
    assert torch.equal(out, out.mT) and out.dtype == torch.bfloat16


def test_guidance_matrix_through_syrk_equals_the_formula():
    """Ω = β/N·Σ J⁻¹_[i] − αΔWΔWᵀ (Eq. 19) with a dense J: the syrk path against the formula."""
    d1, d2 = 6, 4
    gen = torch.Generator().manual_seed(4)
    R = torch.randn(d1 * d2, d1 * d2, generator=gen, dtype=torch.float64)
    J = R @ R.mT + torch.eye(d1 * d2, dtype=torch.float64)
    delta = torch.randn(d1, d2, generator=gen, dtype=torch.float64)
    Jinv = torch.linalg.inv(J)
    block_sum = sum(Jinv[i * d1 : (i + 1) * d1, i * d1 : (i + 1) * d1] for i in range(d2))
    want = 0.5 / 10 * block_sum - 2.0 * delta @ delta.mT
    want = 0.5 * (want + want.mT)
    got = guidance_matrix(J, delta, 10, variance_weight=0.5, bias_weight=2.0)
    assert torch.equal(got, got.mT)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,k", [(1, 1), (9, 3), (70, 9), (70, 70)])
def test_syevr_smallest_is_scipy_eigh_to_the_bit(dtype, n, k):
    """The ctypes ``syevr`` call against ``scipy.linalg.eigh(lower=True, subset_by_index, evr)``
    on a non-symmetric input (so only the lower triangle may be read): bit-identical values and
    vectors, and the input untouched. Catches the wrong triangle, an off-by-one subset and a
    misread column-major output."""
    import scipy.linalg

    S = torch.randn(n, n, generator=torch.Generator().manual_seed(n + k), dtype=torch.float64)
    S = S.to(dtype)  # not symmetric: the upper triangle must be ignored
    before = S.clone()
    values, vectors = syevr_smallest(S, k)
    want_values, want_vectors = scipy.linalg.eigh(
        S.numpy(), subset_by_index=[0, k - 1], driver="evr", check_finite=False, lower=True
    )
    assert torch.equal(values, torch.from_numpy(want_values))
    assert torch.equal(vectors, torch.from_numpy(want_vectors))
    assert torch.equal(S, before)
    L = S.double().tril()
    sym = L + L.tril(-1).mT
    residual = sym @ vectors.double() - vectors.double() * values.double()
    assert float(residual.abs().max()) < (1e-12 if dtype == torch.float64 else 1e-4) * n


def test_syevr_smallest_declines_what_it_cannot_do():
    assert syevr_smallest(torch.eye(3, dtype=torch.bfloat16), 1) is None
    assert syevr_smallest(torch.eye(3, dtype=torch.float64), 4) is None
