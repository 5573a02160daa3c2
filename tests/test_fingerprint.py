"""The base-identity rule (kasa_trl/fingerprint.py): copies of the same weights in another float dtype pass,
another checkpoint, a perturbed copy and an already truncated copy do not."""

import math

import pytest
import torch

from kasa_trl.decomposition import minor_components
from kasa_trl.fingerprint import N_PROBES, TOLERANCE, base_deviation, weight_fingerprint

SHAPES = [(64, 64), (128, 64), (64, 128), (256, 256)]


def rms(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.double())) / math.sqrt(weight.numel())


def weight_with_triplets(out_features: int, in_features: int, n: int, seed: int):
    """A float32 weight (out, in) of entries ~N(0, 0.02^2) with n known singular triplets, and its removed factors
    ``(U_n S_n, V_n^T)`` as a KaSA adapter stores them; s_i from 0.05 to 0.4 rms(W), the range measured for the
    smallest singular values of random square weights from 256 to 4096 (without a decomposition, which takes 17 s
    at 4096 on 2 cores: the check does not need the triplets to be the smallest)."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    g = torch.randn(out_features, in_features, generator=gen, dtype=f64) * 0.02
    u, _ = torch.linalg.qr(torch.randn(out_features, n, generator=gen, dtype=f64))
    v, _ = torch.linalg.qr(torch.randn(in_features, n, generator=gen, dtype=f64))
    g -= u @ (u.T @ g)
    g -= (g @ v) @ v.T
    s = torch.linspace(0.4, 0.05, n, dtype=f64) * 0.02
    weight = g + (u * s) @ v.T
    return weight.float(), (u * s).float(), v.T.contiguous().float()


def deviation(weight, original, left, right):
    return base_deviation(weight, weight_fingerprint(original), left, right)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_other_dtype_copies_pass_other_weights_fail(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=gen) * 0.02
    left, right = minor_components(weight, 4)
    for dtype, bound in (
        (torch.float64, 1e-6),
        (torch.float32, 1e-6),
        (torch.float16, 2e-3),
        (torch.bfloat16, 0.01),
    ):
        d = deviation(weight.to(dtype), weight, left, right)
        # Measured worst over 64x64..4096x4096: bf16 0.0054 (projections) / 0.0039 (removed), fp16 0.0005.
        assert d.matches and max(d.projections, d.removed) < bound, (dtype, d)
        assert d.norm < 1e-4 and abs(d.removed_kept - 1) < 0.05
    other = torch.randn(*shape, generator=gen) * 0.02  # same distribution, same norm to ~1%
    d = deviation(other, weight, left, right)
    assert not d.matches and d.projections > 0.1 and d.removed > 0.1 and not d.already_truncated
    truncated = weight - left @ right
    d = deviation(truncated, weight, left, right)
    assert not d.matches and d.already_truncated and abs(d.removed_kept) < 1e-4
    assert d.removed == pytest.approx(
        float(torch.linalg.vector_norm(left, dim=0).max()) / rms(weight), rel=1e-3
    )


@pytest.mark.parametrize("relative_change", [0.05, 0.2, 1.0])
def test_a_perturbation_well_above_the_tolerance_is_refused(relative_change):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(256, 256, generator=gen) * 0.02
    left, right = minor_components(weight, 16)
    perturbed = weight + relative_change * rms(weight) * torch.randn(256, 256, generator=gen)
    d = deviation(perturbed, weight, left, right)
    assert not d.matches
    assert max(d.projections, d.removed) > 2 * TOLERANCE


def test_a_perturbation_below_dtype_rounding_passes():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(256, 256, generator=gen) * 0.02
    left, right = minor_components(weight, 16)
    d = deviation(weight + 1e-3 * rms(weight) * torch.randn(256, 256, generator=gen), weight, left, right)
    assert d.matches and d.projections < 0.005 and d.removed < 0.005


def test_projections_compare_at_their_own_scale_at_4096():
    # The old rule compared projections (scale rms(W)) with 2e-3 ||W||_F = 8 rms(W) at 4096x4096: any weight of
    # the same norm passed. Now another random weight of the same norm fails on the projections alone.
    weight, left, right = weight_with_triplets(4096, 4096, 16, seed=0)
    other = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(1)) * 0.02
    d = base_deviation(other, weight_fingerprint(weight), left[:, :0], right[:0])
    assert d.norm < 0.01 and d.projections > 0.1 and not d.matches
    assert base_deviation(weight.bfloat16(), weight_fingerprint(weight), left, right).matches


def test_no_removed_components_and_zero_singular_values():
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(32, 16, generator=gen)
    fingerprint = weight_fingerprint(weight)
    d = base_deviation(weight, fingerprint, torch.zeros(32, 0), torch.zeros(0, 16))
    assert d.matches and d.removed == 0 and d.removed_kept == 1
    # A zero singular value removes nothing and has no direction to test.
    low_rank = weight.clone()
    low_rank[:, -1] = 0
    right = torch.zeros(1, 16)
    right[0, -1] = 1
    d = base_deviation(low_rank, weight_fingerprint(low_rank), torch.zeros(32, 1), right)
    assert d.matches


def test_all_zero_and_non_finite_weights():
    zero = torch.zeros(8, 8)
    left, right = torch.zeros(8, 0), torch.zeros(0, 8)
    assert base_deviation(zero, weight_fingerprint(zero), left, right).matches
    assert not base_deviation(torch.ones(8, 8), weight_fingerprint(zero), left, right).matches
    broken = torch.randn(8, 8)
    fingerprint = weight_fingerprint(broken)
    broken[0, 0] = float("nan")
    assert not base_deviation(broken, fingerprint, left, right).matches


def test_fingerprint_shape_and_stability():
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(6))
    fingerprint = weight_fingerprint(weight)
    assert fingerprint.dtype == torch.float64 and fingerprint.shape == (N_PROBES + 1,)
    assert torch.equal(fingerprint, weight_fingerprint(weight.clone()))
    assert float(fingerprint[-1]) == pytest.approx(float(torch.linalg.matrix_norm(weight.double())))


def test_reduced_precision_float32_products_do_not_eat_the_tolerance():
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(256, 256, generator=gen) * 0.02
    left, right = minor_components(weight, 16)
    fingerprint = weight_fingerprint(weight)
    exact = base_deviation(weight.bfloat16(), fingerprint, left, right)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # may run float32 products in bf16
    try:
        reduced = base_deviation(weight.bfloat16(), fingerprint, left, right)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert reduced.projections == pytest.approx(exact.projections, abs=1e-5)
    assert reduced.removed == pytest.approx(exact.removed, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (TF32 products)")
def test_cuda_with_tf32_agrees_with_cpu():
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(2048, 2048, generator=gen) * 0.02
    left, right = minor_components(weight, 16)
    fingerprint = weight_fingerprint(weight)
    cpu = base_deviation(weight.bfloat16(), fingerprint, left, right)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        cuda = base_deviation(weight.bfloat16().cuda(), fingerprint, left, right)
        assert torch.allclose(
            weight_fingerprint(weight.cuda()), fingerprint, rtol=0, atol=1e-6 * float(fingerprint[-1])
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert cuda.projections == pytest.approx(cpu.projections, abs=1e-5)
    assert cuda.removed == pytest.approx(cpu.removed, abs=1e-5)
