"""kasa_trl.decomposition at its numerical limits: condition numbers 1e4..1e16, rank-deficient weights, ties at the
cut, and entries far from 1 (1e150, 1e-160, subnormals, fp32 near its max, bf16/fp16). Deterministic spectra.

The promise checked (module docstring): ``auto`` and ``gram_deflated`` give R within ``1e-8 ||R||_F`` of a float64
SVD's, plus that SVD's own uncertainty ``eps s_1 (1 + s_{k-n} / (s_{k-n} - s_{k-n+1}))`` (two float64 SVDs of the
same weight, of ``W`` and of ``W^T``, differ by up to 1.3x it on these spectra); ``gram_eigh`` stays within its
predicted error, and warns where that exceeds 1e-3. Where the cut has no gap, R is not unique: only its invariants
(the spectra of R and of ``W - R``) are compared. Never U or V themselves.
"""

import math
import re
import warnings

import pytest
import torch

import kasa_trl.decomposition as decomposition
from kasa_trl import _symeig
from kasa_trl.decomposition import minor_components, minor_components_many
from kasa_trl.factors import singular_values, truncate

F64 = torch.float64
EPS = torch.finfo(F64).eps
CONDS = [1e4, 1e6, 1e8, 1e10, 1e12, 1e16]
SHAPES = {"wide": (24, 40), "tall": (40, 24), "square": (32, 32)}
ACCURATE_METHODS = ("auto", "gram_deflated", "svd")
# How many of the SVD's own uncertainties (per removed triplet) a result may be off: measured up to 1.3 for n=4.
SVD_UNCERTAINTIES = 8.0


@pytest.fixture(autouse=True, params=_symeig.BACKENDS)
def symeig_backend(request, monkeypatch):
    """Every test runs on both eigensolver backends: SciPy's LAPACK pieces (the CPU default) and torch.eigh."""
    if request.param == "lapack" and _symeig.backend_for(torch.zeros(1)) != "lapack":
        pytest.skip("SciPy is not installed")
    monkeypatch.setattr(_symeig, "backend_for", lambda t: request.param)
    return request.param


def _with_spectrum(shape: tuple[int, int], s: torch.Tensor, seed: int) -> torch.Tensor:
    """W = U diag(s) V^T with Haar-random U, V (float64)."""
    gen = torch.Generator().manual_seed(seed)
    k = s.shape[0]
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=gen, dtype=F64)).Q
    return (u * s) @ v.T


def _spectrum(kind: str, k: int, n: int, cond: float) -> torch.Tensor:
    """Descending singular values from 1 down to 1 / cond.

    tail: geometric all along. gap: kept ones down to 10 / cond, removed ones from 3 / cond (R unique). tie: the
    values straddling the cut are equal (R not unique).
    """
    low = -math.log10(cond)
    s = torch.logspace(0, low, k, dtype=F64)
    if kind == "gap":
        s[: k - n] = torch.logspace(0, low + 1, k - n, dtype=F64)
        s[k - n :] = torch.logspace(low + 0.5, low, n, dtype=F64)
    elif kind == "tie":
        width = min(n, k - n)
        s[k - n - width : k - n + width] = s[k - n]
    return s


def _svd_removed(weight: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, all singular values) from torch.linalg.svd of the weight as given (float64)."""
    u, s, vh = torch.linalg.svd(weight.to(F64), full_matrices=False)
    k = s.shape[0]
    return (u[:, k - n :] * s[k - n :]) @ vh[k - n :], s


def _svd_uncertainty(s: torch.Tensor, n: int) -> float:
    """How far a float64 SVD's R may be from the exact one: eps s_1 (1 + s_{k-n} / gap), per removed triplet."""
    k = s.shape[0]
    if n == k:
        return EPS * float(s[0])
    gap = float(s[k - n - 1] - s[k - n])
    return math.inf if gap <= 0 else EPS * float(s[0]) * (1 + float(s[k - n - 1]) / gap)


def _removed(weight: torch.Tensor, n: int, method: str) -> torch.Tensor:
    left, right = minor_components(weight, n, method)
    return left.to(F64) @ right.to(F64)


def _assert_within_bound(removed: torch.Tensor, weight: torch.Tensor, n: int) -> None:
    reference, s = _svd_removed(weight, n)
    allowed = 1e-8 * float(reference.norm()) + SVD_UNCERTAINTIES * math.sqrt(n) * _svd_uncertainty(s, n)
    assert float((removed - reference).norm()) <= allowed


def _assert_invariants(removed: torch.Tensor, weight: torch.Tensor, n: int) -> None:
    """R holds the n smallest singular values and W - R the others (n zeros in their place), to 1e-8 of the
    cut's scale and the float64 rounding of the weight."""
    s = singular_values(weight)
    k = s.shape[0]
    atol = 1e-8 * float(s[k - n]) + SVD_UNCERTAINTIES * math.sqrt(k) * EPS * float(s[0])
    torch.testing.assert_close(singular_values(removed)[:n], s[k - n :], rtol=0, atol=atol)
    expected = torch.cat([s[: k - n], s.new_zeros(n)])
    torch.testing.assert_close(singular_values(weight - removed), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("cond", CONDS)
@pytest.mark.parametrize("kind", ["tail", "gap"])
@pytest.mark.parametrize("aspect", SHAPES)
@pytest.mark.parametrize("n", [1, 4])
def test_accurate_methods_meet_the_bound_at_any_condition_number(n, aspect, kind, cond):
    shape = SHAPES[aspect]
    weight = _with_spectrum(shape, _spectrum(kind, min(shape), n, cond), seed=n)
    for method in ACCURATE_METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the accurate methods never warn
            removed = _removed(weight, n, method)
        _assert_within_bound(removed, weight, n)
        _assert_invariants(removed, weight, n)


@pytest.mark.parametrize("cond", CONDS)
@pytest.mark.parametrize("aspect", SHAPES)
def test_ties_at_the_cut_keep_the_invariants(aspect, cond):
    shape, n = SHAPES[aspect], 4
    weight = _with_spectrum(shape, _spectrum("tie", min(shape), n, cond), seed=1)
    for method in ACCURATE_METHODS:
        _assert_invariants(_removed(weight, n, method), weight, n)


@pytest.mark.parametrize("zeros", [0, 1, 3])  # exact zeros on top of those of the tie
def test_a_constant_spectrum_is_a_tie_everywhere(zeros):
    """An orthogonal weight (all singular values 1): any n directions are a valid R."""
    s = torch.ones(16, dtype=F64)
    s[16 - zeros :] = 0
    weight = _with_spectrum((16, 20), s, seed=2)
    for method in ACCURATE_METHODS:
        _assert_invariants(_removed(weight, 5, method), weight, 5)


@pytest.mark.parametrize("aspect", SHAPES)
@pytest.mark.parametrize("n", [2, 3, 5], ids=["n<rank deficit", "n=rank deficit", "n>rank deficit"])
def test_exactly_rank_deficient_weights(n, aspect):
    """Three singular values exactly 0 (in exact arithmetic; ~eps s_1 as stored): R is ~0 where n <= 3."""
    shape = SHAPES[aspect]
    k = min(shape)
    s = torch.logspace(0, -3, k, dtype=F64)
    s[k - 3 :] = 0
    weight = _with_spectrum(shape, s, seed=3)
    for method in ACCURATE_METHODS:
        removed = _removed(weight, n, method)
        _assert_invariants(removed, weight, n)
        if n != 2:  # with n=2 the cut lies inside the zeros: R is not unique
            _assert_within_bound(removed, weight, n)


@pytest.mark.parametrize("aspect", SHAPES)
def test_everything_removed_at_any_condition_number(aspect):
    shape = SHAPES[aspect]
    k = min(shape)
    weight = _with_spectrum(shape, torch.logspace(0, -16, k, dtype=F64), seed=4)
    for method in (*ACCURATE_METHODS, "gram_eigh"):
        torch.testing.assert_close(_removed(weight, k, method), weight, rtol=0, atol=1e-14)


def _predicted_gram_error(s: torch.Tensor, n: int) -> float:
    """gram_eigh's documented bound from the exact spectrum: eps lambda_max sqrt(lambda_{n+1} / lambda_n) /
    (lambda_{n+1} - lambda_n) in Gram eigenvalues lambda = s^2 counted from the smallest."""
    k = s.shape[0]
    lam_n, lam_next = float(s[k - n]) ** 2, float(s[k - n - 1]) ** 2
    return EPS * float(s[0]) ** 2 * math.sqrt(lam_next / lam_n) / (lam_next - lam_n)


@pytest.mark.parametrize("cond", CONDS)
@pytest.mark.parametrize("kind", ["tail", "gap"])
@pytest.mark.parametrize("aspect", SHAPES)
def test_gram_eigh_stays_within_its_predicted_error_and_warns_beyond_1e_3(aspect, kind, cond):
    shape, n = SHAPES[aspect], 4
    s = _spectrum(kind, min(shape), n, cond)
    weight = _with_spectrum(shape, s, seed=5)
    predicted = _predicted_gram_error(s, n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        removed = _removed(weight, n, "gram_eigh")
    reference, _ = _svd_removed(weight, n)
    error = float((removed - reference).norm() / reference.norm())
    if predicted < 1e-5:  # far from the warning threshold on either side: the computed prediction agrees
        assert not caught
        assert error <= predicted + 1e-8
    if predicted > 1e-1:
        (warning,) = caught
        assert issubclass(warning.category, RuntimeWarning)
        assert re.fullmatch(
            r"decomposition_method='gram_eigh': the 4 smallest singular values are below what the Gram matrix of "
            rf"this {shape[0]}x{shape[1]} weight resolves in float64: the removed part R may be off by "
            r"(up to \S+ of its norm|more than its own norm) \(harmless only where they are ~0, an exactly "
            r"rank-deficient weight\)\. Use decomposition_method='auto' \(accurate: it falls back to an SVD where "
            r"the Gram cannot resolve them\) or 'svd'",
            str(warning.message),
        )


def test_auto_falls_back_to_svd_only_where_its_prediction_exceeds_the_target(monkeypatch):
    calls = []
    svd = decomposition._minor_svd
    monkeypatch.setattr(
        decomposition, "_minor_svd", lambda a, n: (calls.append(tuple(a.shape)), svd(a, n))[1]
    )
    for cond, fallback in [(1e2, False), (1e4, False), (1e6, False), (1e10, True), (1e16, True)]:
        weight = _with_spectrum((40, 64), _spectrum("gap", 40, 4, cond), seed=6)
        calls.clear()
        auto = minor_components(weight, 4, "auto")
        assert bool(calls) == fallback, cond
        deflated = minor_components(weight, 4, "gram_deflated")
        assert torch.equal(auto[0], deflated[0]) and torch.equal(auto[1], deflated[1])
    # A Gaussian weight (as initialized) never needs it.
    calls.clear()
    minor_components(torch.randn(48, 80, generator=torch.Generator().manual_seed(0), dtype=F64), 8)
    assert not calls


def test_auto_falls_back_after_deflating_on_the_deflated_problem(monkeypatch):
    """A cond-1e6 weight with a tie at the cut: deflation narrows it down, then an SVD of the few directions left
    settles the tie (not an SVD of the whole weight)."""
    calls = []
    svd = decomposition._minor_svd
    monkeypatch.setattr(
        decomposition, "_minor_svd", lambda a, n: (calls.append(tuple(a.shape)), svd(a, n))[1]
    )
    weight = _with_spectrum((40, 64), _spectrum("tie", 40, 4, 1e6), seed=7)
    _assert_invariants(_removed(weight, 4, "auto"), weight, 4)
    ((rows, cols),) = calls
    assert cols == 64 and 4 <= rows < 40


# --- entries far from 1 -----------------------------------------------------------------------------------------


def _gaussian(shape=(24, 40), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("method", ["auto", "gram_deflated", "gram_eigh", "svd"])
@pytest.mark.parametrize("exponent", [-1000, -530, -200, 200, 500, 1000])
def test_scaling_by_a_power_of_two_scales_the_factors(method, exponent):
    """W 2^e gives R(W) 2^e: the Gram is formed from W scaled to max |entry| in [0.5, 1), by a power of two,
    exactly (1e150 used to overflow it into a false 'non-finite' error, 1e-160 to underflow it)."""
    weight = _gaussian()
    scale = math.ldexp(1.0, exponent)
    left, right = minor_components(weight * scale, 4, method)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    expected = _removed(weight, 4, method)
    torch.testing.assert_close((left / scale) @ right, expected, rtol=0, atol=1e-12 * float(expected.norm()))


@pytest.mark.parametrize(
    ("case", "weight"),
    [
        ("1e150", _gaussian() * 1e150),
        ("1e-160", _gaussian() * 1e-160),
        ("1e-310 (subnormal)", _gaussian() * 1e-310),
        (
            "one entry 1e200",
            _gaussian().index_put_((torch.tensor(3), torch.tensor(4)), torch.tensor(1e200, dtype=F64)),
        ),
        ("fp32 near its max", (_gaussian() / _gaussian().abs().max() * 3e38).float()),
        (
            "fp32 one entry 3e38",
            _gaussian().float().index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(3e38)),
        ),
        ("bf16 near 1e38", (_gaussian() * 1e37).bfloat16()),
        ("fp16 near its max", (_gaussian() / _gaussian().abs().max() * 6e4).half()),
        ("fp16 subnormal", (_gaussian() * 1e-7).half()),
    ],
)
def test_extreme_entries_are_decomposed_like_a_float64_svd(case, weight):
    """Compared at unit scale, ``W 2^-e`` with ``2^e`` the weight's largest entry (exact, even for subnormals; R
    itself may be subnormal there, and its norm underflow)."""
    n = 4
    e = math.frexp(float(weight.abs().max()))[1]
    unit = _ldexp(weight.to(F64), -e)
    reference, s = _svd_removed(unit, n)
    allowed = 1e-8 * float(reference.norm()) + SVD_UNCERTAINTIES * math.sqrt(n) * _svd_uncertainty(s, n)
    factor_dtype = F64 if weight.dtype == F64 else torch.float32
    if factor_dtype != F64:  # the factors' own rounding
        allowed += 4 * math.sqrt(n) * torch.finfo(factor_dtype).eps * float(reference.norm())
    for method in ACCURATE_METHODS:
        left, right = minor_components(weight, n, method)
        assert left.dtype == right.dtype == factor_dtype
        assert torch.isfinite(left).all() and torch.isfinite(right).all()
        removed = _ldexp(left.to(F64), -e) @ right.to(F64)
        assert float((removed - reference).norm()) <= allowed, (case, method)


def _ldexp(t: torch.Tensor, exponent: int) -> torch.Tensor:
    """t 2^exponent, exactly, for exponents beyond float64's (2^1074 is not a float64)."""
    half = exponent // 2
    return t * math.ldexp(1.0, half) * math.ldexp(1.0, exponent - half)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["auto", "gram_deflated", "gram_eigh", "svd"])
def test_an_all_zero_weight_removes_zeros(method, dtype):
    left, right = minor_components(torch.zeros(6, 10, dtype=dtype), 3, method)
    assert torch.equal(left, torch.zeros(6, 3, dtype=left.dtype))
    torch.testing.assert_close(right @ right.T, torch.eye(3, dtype=right.dtype), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["auto", "gram_deflated", "gram_eigh", "svd"])
@pytest.mark.parametrize("scale", [1.0, 1e150, 1e-160])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_real_non_finite_entries_are_still_refused(bad, scale, method):
    weight = _gaussian() * scale
    weight[5, 7] = bad
    before = weight.clone()
    with pytest.raises(
        ValueError, match=r"^weight has non-finite entries \(nan or inf\); check the checkpoint"
    ):
        minor_components(weight, 4, method)
    with pytest.raises(ValueError, match=r"^weight has non-finite entries"):
        list(minor_components_many([_gaussian(), weight], [2, 4], method, workers=2))
    assert torch.equal(weight.isnan(), before.isnan()) and torch.equal(
        weight.nan_to_num(), before.nan_to_num()
    )


@pytest.mark.parametrize("method", ["auto", "svd"])
def test_removed_values_beyond_the_factor_dtype_are_refused(method):
    """fp32 rows of 3e38 whose singular values (8.5e38) do not fit the fp32 factors: a clear error, not inf."""
    row = torch.tensor([1.0, 1.0] * 4)
    weight = 3e38 * torch.stack([row, row * torch.tensor([1.0, -1.0] * 4)])  # (2, 8) fp32, orthogonal rows
    assert torch.isfinite(weight).all()
    with pytest.raises(
        ValueError,
        match=r"^the removed singular values of this 2x8 weight reach 8\.49e\+38, beyond the range of torch\.float32 "
        r"\(3\.4e\+38\); scale the weight down \(or keep it in float64\) before truncating it$",
    ):
        minor_components(weight, 1, method)
    left, right = minor_components(weight.double(), 1, method)  # float64 factors hold them
    torch.testing.assert_close(
        truncate(weight.double(), left, right).norm(), torch.tensor(8.485e38, dtype=F64), rtol=1e-3, atol=0
    )


# --- through apply_kasa ------------------------------------------------------------------------------------------


def _hadamard(k: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def test_apply_kasa_truncates_a_float64_layer_near_1e150():
    """Used to fail with a false 'non-finite' error: the layer's Gram overflowed."""
    from kasa_trl import KaSAConfig, apply_kasa, kasa_layers
    from kasa_trl.tiny import build_tiny_llama

    model = build_tiny_llama(64).double()
    name = "model.layers.0.self_attn.q_proj"
    target = model.get_submodule(name)
    with torch.no_grad():
        target.weight.mul_(math.ldexp(1.0, 500))  # entries ~1e150
    original = target.weight.detach().clone()
    apply_kasa(model, KaSAConfig(r=2))
    layer = kasa_layers(model)[name]
    w_trunc, removed = layer.base_layer.weight.detach(), layer.removed_left @ layer.removed_right
    torch.testing.assert_close(w_trunc + removed, original, rtol=0, atol=1e-14 * float(original.abs().max()))
    reference, _ = _svd_removed(original, 2)
    torch.testing.assert_close(removed, reference, rtol=0, atol=1e-8 * float(reference.abs().max()))


def test_apply_kasa_names_the_layer_whose_removed_values_do_not_fit_fp32():
    from kasa_trl import KaSAConfig, apply_kasa, kasa_layers
    from kasa_trl.tiny import build_tiny_llama

    model = build_tiny_llama(64)
    with torch.no_grad():  # entries 3e38 (finite fp32), every singular value 8 x 3e38
        model.get_submodule("model.layers.1.mlp.up_proj").weight.copy_(3e38 * _hadamard(128)[:, :64])
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"^model\.layers\.1\.mlp\.up_proj: the removed singular values of this 128x64 weight reach 3\.39e\+39, "
        r"beyond the range of torch\.float32",
    ):
        apply_kasa(model, KaSAConfig(r=2))
    assert not kasa_layers(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)
