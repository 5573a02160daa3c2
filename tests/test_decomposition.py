"""kasa_trl.decomposition: only facts that hold for every valid SVD (never U or V themselves)."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kasa_trl import _symeig
from kasa_trl.decomposition import DECOMPOSITION_METHODS, minor_components, minor_components_many
from kasa_trl.factors import factor_singular_values, singular_values, truncate

F64 = torch.float64
EPS = torch.finfo(F64).eps
ASPECTS = ("wide", "square", "tall")  # out < in, out == in, out > in
# Documented accuracy of R against float64 SVD: gram_eigh squares the condition number (module docstring).
ACCURATE = 1e-7


@pytest.fixture(autouse=True, params=_symeig.BACKENDS)
def symeig_backend(request, monkeypatch):
    """Every test runs on both eigensolver backends: SciPy's LAPACK pieces (the CPU default) and torch.eigh."""
    if request.param == "lapack" and _symeig.backend_for(torch.zeros(1)) != "lapack":
        pytest.skip("SciPy is not installed")
    monkeypatch.setattr(_symeig, "backend_for", lambda t: request.param)
    return request.param


def _tolerance(method: str, cond: float) -> float:
    return ACCURATE + (10 * EPS * cond**2 if method == "gram_eigh" else 0.0)


def _shape(aspect: str, k: int, extra: int) -> tuple[int, int]:
    return {"wide": (k, k + extra), "square": (k, k), "tall": (k + extra, k)}[aspect]


def _orthonormal_columns(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=F64)).Q


def _with_spectrum(shape: tuple[int, int], s: torch.Tensor, seed: int) -> torch.Tensor:
    """W = U diag(s) V^T with Haar-random U, V."""
    gen = torch.Generator().manual_seed(seed)
    k = s.shape[0]
    return (_orthonormal_columns(shape[0], k, gen) * s) @ _orthonormal_columns(shape[1], k, gen).T


def _svd_removed(weight: torch.Tensor, n: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    k = s.shape[0]
    return (u[:, k - n :] * s[k - n :]) @ vh[k - n :]


def _assert_invariants(weight: torch.Tensor, n: int, method: str, rtol: float) -> tuple[torch.Tensor, ...]:
    """Facts every removal of the n smallest triplets satisfies; errors relative to the largest removed value."""
    s = singular_values(weight)
    k = s.shape[0]
    scale = s[k - n] if n else s[0]
    atol = rtol * scale + 1e3 * EPS * s[0]
    left, right = minor_components(weight, n, method)
    removed = left @ right
    w_trunc = truncate(weight, left, right)
    torch.testing.assert_close(w_trunc + removed, weight, rtol=0, atol=1e2 * EPS * s[0])
    # The kept spectrum is intact, nothing of the removed one is left, and R holds exactly the n smallest.
    expected = torch.cat([s[: k - n], s.new_zeros(n)])
    torch.testing.assert_close(singular_values(w_trunc), expected, rtol=0, atol=atol)
    torch.testing.assert_close(factor_singular_values(left, right), s[k - n :], rtol=0, atol=atol)
    energy = (s[k - n :] ** 2).sum()
    assert abs(removed.norm() ** 2 - energy) <= 2 * rtol * energy + 1e3 * EPS * s[0] ** 2
    # Canonical factors: left = U_n S_n (orthogonal columns), right = V_n^T (orthonormal rows).
    torch.testing.assert_close(right @ right.T, torch.eye(n, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(left.T @ left, torch.diag(left.norm(dim=0) ** 2), rtol=0, atol=atol * s[0])
    return s, removed, w_trunc


@st.composite
def gaussian_weights(draw, aspect: str):
    k, extra = draw(st.integers(1, 10)), draw(st.integers(1, 8))
    shape = _shape(aspect, k, extra)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return scale * torch.randn(shape, generator=gen, dtype=F64), draw(st.integers(0, k))


@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("method", DECOMPOSITION_METHODS)
@settings(deadline=None, max_examples=15)
@given(data=st.data())
def test_random_weights(method, aspect, data):
    weight, n = data.draw(gaussian_weights(aspect))
    s, removed, w_trunc = _assert_invariants(weight, n, method, rtol=1e-9)
    k = s.shape[0]
    if 0 < n < k and s[k - n - 1] - s[k - n] > 1e-3 * s[0]:  # a clear gap: R is unique, compare it directly
        torch.testing.assert_close(removed, _svd_removed(weight, n), rtol=0, atol=1e-9 * s[0])
    # Idempotent on the kept part: truncating W_trunc again removes (numerically) nothing. Its n smallest singular
    # values are ~0, below what a Gram resolves: gram_eigh may warn (harmlessly, as its warning says).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "decomposition_method='gram_eigh'", RuntimeWarning)
        again = minor_components(w_trunc, n, method)
    assert torch.matmul(*again).norm() <= 1e-9 * s[0]
    torch.testing.assert_close(truncate(w_trunc, *again), w_trunc, rtol=0, atol=1e-9 * s[0].item())


@pytest.mark.parametrize("cond", [1e4, 1e6])
@pytest.mark.parametrize("gap_at_cut", [True, False], ids=["gap", "no-gap"])
@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("method", DECOMPOSITION_METHODS)
@settings(deadline=None, max_examples=4)
@given(k=st.integers(12, 28), extra=st.integers(1, 12), n=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_badly_conditioned_weights(method, aspect, gap_at_cut, cond, k, extra, n, seed):
    s = torch.logspace(0, -math.log10(cond), k, dtype=F64)  # long tail from 1 to 1 / cond
    if gap_at_cut:  # kept values down to 10 / cond, removed ones from 3 / cond: R is unique
        s[: k - n] = torch.logspace(0, 1 - math.log10(cond), k - n, dtype=F64)
        s[k - n :] = torch.logspace(0.5 - math.log10(cond), -math.log10(cond), n, dtype=F64)
    else:
        # Values straddling the cut agree to ~1e-11: the removed subspace is not unique, its invariants are.
        width = min(n, k - n)
        s[k - n - width : k - n + width] = s[k - n] * (1 + 1e-12 * torch.arange(2 * width, 0, -1, dtype=F64))
    weight = _with_spectrum(_shape(aspect, k, extra), s, seed)
    tol = _tolerance(method, cond)
    _, removed, _ = _assert_invariants(weight, n, method, rtol=tol)
    if gap_at_cut:
        reference = _svd_removed(weight, n)
        assert (removed - reference).norm() <= tol * reference.norm()


def test_gram_eigh_loses_accuracy_that_deflation_restores():
    """Why ``auto`` is not plain ``gram_eigh``: a cond-1e6 long tail costs it digits that deflation recovers."""
    weight = _with_spectrum((40, 96), torch.logspace(0, -6, 40, dtype=F64), seed=0)
    reference = _svd_removed(weight, 4)
    errors = {
        m: ((torch.matmul(*minor_components(weight, 4, m)) - reference).norm() / reference.norm()).item()
        for m in ("gram_eigh", "gram_deflated", "auto")
    }
    assert errors["gram_deflated"] < ACCURATE and errors["auto"] == errors["gram_deflated"]
    assert errors["gram_eigh"] > 1e-6 and errors["gram_eigh"] > 100 * errors["gram_deflated"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("method", DECOMPOSITION_METHODS)
def test_dtypes(method, dtype):
    weight = torch.randn(6, 9, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    left, right = minor_components(weight, 3, method)
    factor_dtype = F64 if dtype == F64 else torch.float32
    assert (left.shape, right.shape) == ((6, 3), (3, 9))
    assert left.dtype == right.dtype == factor_dtype
    assert not left.requires_grad and not right.requires_grad
    # The factors are those of the weight as stored (upcast exactly), not of a rounded copy.
    torch.testing.assert_close(left @ right, _svd_removed(weight.detach().double(), 3).to(factor_dtype))
    assert truncate(weight.detach(), left, right).dtype == dtype


@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("method", DECOMPOSITION_METHODS)
def test_remove_nothing_or_everything(method, aspect):
    weight = torch.randn(_shape(aspect, 5, 3), generator=torch.Generator().manual_seed(1), dtype=F64)
    out_features, in_features = weight.shape
    left, right = minor_components(weight, 0, method)
    assert (left.shape, right.shape) == ((out_features, 0), (0, in_features))
    assert torch.equal(truncate(weight, left, right), weight)
    left, right = minor_components(weight, 5, method)
    torch.testing.assert_close(left @ right, weight, rtol=0, atol=1e-13)
    torch.testing.assert_close(truncate(weight, left, right), torch.zeros_like(weight), rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    ("weight", "n", "method", "match"),
    [
        (torch.ones(4, 6), -1, "svd", r"n=-1 must be in \[0, min\(out, in\)=4\]"),
        (torch.ones(4, 6), 5, "auto", r"n=5 must be in \[0, min\(out, in\)=4\]"),
        (torch.ones(2, 4, 6), 1, "auto", r"weight must be 2-D \(out, in\), got shape \(2, 4, 6\)"),
        (torch.ones(6), 1, "auto", r"weight must be 2-D \(out, in\), got shape \(6,\)"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, "gram_eigh", "non-finite entries"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1, "svd", "non-finite entries"),
        (torch.ones(4, 6, dtype=torch.int64), 1, "auto", "floating-point tensor, got torch.int64"),
        (torch.ones(4, 6), 1, "lanczos", r"method='lanczos' is not one of \['auto', 'svd', 'gram_eigh'"),
    ],
)
def test_minor_components_errors(weight, n, method, match):
    with pytest.raises(ValueError, match=match):
        minor_components(weight, n, method)


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _mixed_weights() -> tuple[list[torch.Tensor], list[int]]:
    gen = torch.Generator().manual_seed(3)
    shapes = [(12, 20), (20, 12), (16, 16), (9, 30), (30, 9)]
    weights = [
        torch.randn(*shape, generator=gen, dtype=dtype)
        for shape, dtype in zip(shapes, [F64, torch.float32] * 3, strict=False)
    ]
    return weights, [3, 0, 5, 2, 9]


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("method", DECOMPOSITION_METHODS)
def test_many_at_once_is_one_at_a_time(method, workers, two_threads):
    """Each weight's factors do not depend on how many are decomposed at once: bit for bit those of
    minor_components with each worker's thread budget (1 thread here with 2 or 3 workers)."""
    weights, ns = _mixed_weights()
    together = list(minor_components_many(weights, ns, method, workers=workers))
    assert torch.get_num_threads() == 2  # the caller's setting is back
    torch.set_num_threads(2 if workers == 1 else 1)
    for (left, right), weight, n in zip(together, weights, ns, strict=True):
        expected_left, expected_right = minor_components(weight, n, method)
        assert torch.equal(left, expected_left) and torch.equal(right, expected_right)


def test_many_checks_everything_first_and_raises_what_a_worker_raised(two_threads):
    weights, ns = _mixed_weights()
    with pytest.raises(ValueError, match="2 values of n"):
        minor_components_many(weights, ns[:2]).__next__()
    with pytest.raises(ValueError, match="workers=0"):
        minor_components_many(weights, ns, workers=0).__next__()
    with pytest.raises(ValueError, match=r"n=10 must be in \[0, min\(out, in\)=9\]"):
        minor_components_many(weights, [*ns[:4], 10]).__next__()  # the last one is refused before any runs
    poisoned = [*weights[:3], torch.full((9, 30), float("nan")), weights[4]]
    results = minor_components_many(poisoned, ns, "auto", workers=2)
    with pytest.raises(ValueError, match="non-finite"):
        list(results)
    assert torch.get_num_threads() == 2
    early = minor_components_many(weights, ns, workers=2)
    next(early)
    early.close()  # a caller that stops early gets its threads back
    assert torch.get_num_threads() == 2


def test_default_workers_fit_threads_layers_and_memory(monkeypatch, symeig_backend):
    import kasa_trl.decomposition as decomposition

    def workers(weights, budget, available):
        monkeypatch.setattr(decomposition, "_available_memory", lambda: available)
        return decomposition._default_workers(weights, budget)

    weights = [torch.zeros(64, 128)] * 5  # each needs 8 * (64 * 128 + 64**2) * 1.25 = 120 KiB at its peak
    if symeig_backend == "torch":  # CUDA or no SciPy: one at a time
        assert workers(weights, 4, None) == 1
        return
    assert workers(weights, 4, 10**12) == 4  # the thread budget
    assert workers(weights[:2], 4, 10**12) == 2  # the layers
    assert workers(weights * 4, 64, 10**12) == decomposition._MAX_WORKERS
    assert workers(weights, 4, 2 * 3 * 120 * 1024) == 3  # half the available memory holds three
    assert workers(weights, 4, 1000) == 1  # not even one: still one
    assert workers(weights, 4, None) == 4  # unknown memory: threads and layers decide
