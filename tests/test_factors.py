"""kasa_trl.factors: the truncation, spectra of factored products, the exact LoRA form, the orthogonality error."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kasa_trl.decomposition import minor_components
from kasa_trl.factors import factor_singular_values, lora_export_factors, orthogonality_error, truncate

F64 = torch.float64
ASPECTS = ("wide", "square", "tall")  # out < in, out == in, out > in


def _shape(aspect: str, k: int, extra: int) -> tuple[int, int]:
    return {"wide": (k, k + extra), "square": (k, k), "tall": (k + extra, k)}[aspect]


def _orthonormal_columns(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=F64)).Q


def test_truncate_rejects_factors_of_another_weight():
    with pytest.raises(ValueError, match=r"do not fit weight \(4, 6\): expected \(4, n\) and \(n, 6\)"):
        truncate(torch.ones(4, 6), torch.ones(4, 2), torch.ones(2, 5))


@settings(deadline=None, max_examples=25)
@given(
    out_features=st.integers(1, 9),
    in_features=st.integers(1, 9),
    n=st.integers(0, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_factor_singular_values_match_the_product(out_features, in_features, n, seed):
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(out_features, n, generator=gen, dtype=F64)
    right = torch.randn(n, in_features, generator=gen, dtype=F64)
    values = factor_singular_values(left, right)
    expected = torch.linalg.svdvals(left @ right)
    assert values.shape == (min(out_features, n, in_features),)
    scale = 1 + (expected[0].item() if expected.numel() else 0)
    torch.testing.assert_close(values, expected[: values.shape[0]], rtol=0, atol=1e-12 * scale)
    assert factor_singular_values(left.float(), right.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("aspect", ASPECTS)
@settings(deadline=None, max_examples=20)
@given(r=st.integers(1, 4), n=st.integers(0, 4), scaling=st.floats(0.1, 4.0), seed=st.integers(0, 2**32 - 1))
def test_lora_export_is_exact(aspect, r, n, scaling, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(_shape(aspect, 5, 4), generator=gen, dtype=F64)
    out_features, in_features = weight.shape
    lora_A = torch.randn(r, in_features, generator=gen, dtype=F64)
    lora_B = torch.randn(out_features, r, generator=gen, dtype=F64)
    lora_diag = torch.randn(r, generator=gen, dtype=F64)
    left, right = minor_components(weight, n)
    b2, a2 = lora_export_factors(lora_A, lora_B, lora_diag, scaling, left, right)
    assert (b2.shape, a2.shape) == ((out_features, r + n), (r + n, in_features))
    delta = scaling * lora_B @ torch.diag(lora_diag) @ lora_A
    torch.testing.assert_close(weight + b2 @ a2, truncate(weight, left, right) + delta, rtol=0, atol=1e-12)


def test_lora_export_dtype_and_shape_errors():
    lora_A, lora_B, lora_diag = torch.ones(2, 5, dtype=torch.bfloat16), torch.ones(3, 2), torch.ones(2)
    b2, a2 = lora_export_factors(lora_A, lora_B, lora_diag, 0.5, torch.ones(3, 1), torch.ones(1, 5))
    assert b2.dtype == a2.dtype == torch.float32
    with pytest.raises(ValueError, match=r"must share r=2: expected \(r, in\), \(out, r\), \(r,\)"):
        lora_export_factors(lora_A, lora_B, torch.ones(3), 0.5, torch.ones(3, 1), torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"do not fit the adapter \(out=3, in=5\)"):
        lora_export_factors(lora_A, lora_B, lora_diag, 0.5, torch.ones(4, 1), torch.ones(1, 5))


def _gram_minus_identity_norm(vectors: list[list[float]]) -> float:
    """sqrt(sum_ij (<v_i, v_j> - delta_ij)^2), in plain Python."""
    total = 0.0
    for i, p in enumerate(vectors):
        for j, q in enumerate(vectors):
            total += (sum(x * y for x, y in zip(p, q, strict=True)) - (i == j)) ** 2
    return math.sqrt(total)


@settings(deadline=None, max_examples=30)
@given(r=st.integers(1, 6), extra=st.integers(0, 6), c=st.floats(0.0, 3.0), seed=st.integers(0, 2**32 - 1))
def test_orthogonality_error(r, extra, c, seed):
    gen = torch.Generator().manual_seed(seed)
    a = _orthonormal_columns(r + extra, r, gen).T  # (r, in), orthonormal rows
    b = _orthonormal_columns(r + extra + 2, r, gen)  # (out, r), orthonormal columns
    err_a, err_b = orthogonality_error(a, b)
    assert err_a.item() == pytest.approx(0, abs=1e-12) and err_b.item() == pytest.approx(0, abs=1e-12)
    # Scaled orthonormal factors: A A^T = c^2 I, so the error is |c^2 - 1| sqrt(r).
    err_a, err_b = orthogonality_error(c * a, c * b)
    assert err_a.item() == pytest.approx(abs(c**2 - 1) * math.sqrt(r), abs=1e-10)
    assert err_b.item() == pytest.approx(abs(c**2 - 1) * math.sqrt(r), abs=1e-10)
    # Any factors: the Frobenius formula written out entry by entry.
    a, b = (
        torch.randn(r, r + extra, generator=gen, dtype=F64),
        torch.randn(r + extra, r, generator=gen, dtype=F64),
    )
    by_hand_a, by_hand_b = _gram_minus_identity_norm(a.tolist()), _gram_minus_identity_norm(b.T.tolist())
    err_a, err_b = orthogonality_error(a, b)
    assert err_a.item() == pytest.approx(by_hand_a, rel=1e-10)
    assert err_b.item() == pytest.approx(by_hand_b, rel=1e-10)


def test_orthogonality_error_is_differentiable_in_float32():
    a = torch.randn(3, 7, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.bfloat16, requires_grad=True)
    err_a, err_b = orthogonality_error(a, b)
    assert err_a.dtype == err_b.dtype == torch.float32
    (err_a + err_b).backward()
    assert a.grad is not None and b.grad is not None and a.grad.dtype == torch.bfloat16


@settings(deadline=None, max_examples=20)
@given(
    r=st.integers(1, 5),
    out_features=st.integers(1, 7),
    in_features=st.integers(1, 7),
    seed=st.integers(0, 2**32 - 1),
)
def test_delta_singular_values_are_those_of_the_update(r, out_features, in_features, seed):
    from kasa_trl.factors import delta_singular_values

    gen = torch.Generator().manual_seed(seed)
    lora_A = torch.randn(r, in_features, generator=gen, dtype=F64)
    lora_B = torch.randn(out_features, r, generator=gen, dtype=F64)
    lora_diag = torch.randn(r, generator=gen, dtype=F64)
    expected = torch.linalg.svdvals(0.75 * lora_B @ torch.diag(lora_diag) @ lora_A)
    values = delta_singular_values(lora_A, lora_B, lora_diag, 0.75)
    assert values.shape == (min(out_features, r, in_features),)
    torch.testing.assert_close(
        values, expected[: values.shape[0]], rtol=0, atol=1e-12 * (1 + expected[0].item())
    )
