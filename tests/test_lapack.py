"""kasa_trl._lapack: each routine agrees with its definition (torch.linalg as the reference), in the layouts the
eigensolver passes, and the calls release the GIL."""

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kasa_trl import _lapack

pytestmark = pytest.mark.skipif(
    not _lapack.available(), reason="SciPy's Cython BLAS/LAPACK API is not available"
)

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _symmetric(k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(k, k + 3, generator=gen, dtype=F64)
    return b @ b.T


def _tridiagonalized(g: torch.Tensor):
    """(reflectors, d, e, tau) of the symmetric ``g`` via sytrd_lower on a column-major copy."""
    k = g.shape[0]
    work = _lapack.column_major(k, k).copy_(g)
    d, e, tau = _lapack.sytrd_lower(work)
    return work, d, e, tau


def _tridiagonal(d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return torch.diag(d) + torch.diag(e, 1) + torch.diag(e, -1)


@pytest.mark.parametrize("layout", ["row-major", "transposed view", "strided"])
@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (4, 9), (9, 4)])
def test_syrk_lower_is_the_lower_triangle_of_b_b_transpose(layout, shape):
    gen = torch.Generator().manual_seed(0)
    j, p = shape
    if layout == "row-major":
        b = torch.randn(j, p, generator=gen, dtype=F64)
    elif layout == "transposed view":
        b = torch.randn(p, j, generator=gen, dtype=F64).T
    else:  # neither layout: copied
        b = torch.randn(j, 2 * p, generator=gen, dtype=F64)[:, ::2]
    g = _lapack.syrk_lower(b)
    assert g.shape == (j, j) and (j == 1 or g.stride() == (1, j))
    torch.testing.assert_close(torch.tril(g), torch.tril(b @ b.T), rtol=1e-13, atol=1e-13)


@settings(deadline=None, max_examples=30)
@given(k=st.integers(2, 20), seed=st.integers(0, 2**16))
def test_sytrd_and_ormtr_reconstruct_the_matrix(k, seed):
    """G = Q T Q^T with Q orthogonal: Q from ormtr applied to the identity."""
    g = _symmetric(k, seed)
    reflectors, d, e, tau = _tridiagonalized(g)
    q = _lapack.ormtr_lower(reflectors, tau, _lapack.column_major(k, k).copy_(torch.eye(k, dtype=F64)))
    scale = float(g.norm())
    torch.testing.assert_close(q.T @ q, torch.eye(k, dtype=F64), rtol=0, atol=100 * k * EPS)
    torch.testing.assert_close(q @ _tridiagonal(d, e) @ q.T, g, rtol=0, atol=100 * k * EPS * scale)


@settings(deadline=None, max_examples=30)
@given(k=st.integers(2, 20), seed=st.integers(0, 2**16), first=st.integers(0, 19), count=st.integers(1, 20))
def test_stebz_and_stemr_select_by_index(k, seed, first, count):
    g = _symmetric(k, seed)
    _, d, e, _ = _tridiagonalized(g)
    reference = torch.linalg.eigvalsh(g)
    first = min(first, k - 1)
    last = min(first + count, k) - 1
    atol = 100 * k * EPS * float(reference.abs().max())
    torch.testing.assert_close(
        _lapack.stebz(d, e, first, last), reference[first : last + 1], rtol=0, atol=atol
    )
    w, z = _lapack.stemr(d, e, index=(first, last))
    torch.testing.assert_close(w, reference[first : last + 1], rtol=0, atol=atol)
    t = _tridiagonal(d, e)
    assert z.shape == (k, last - first + 1)
    torch.testing.assert_close(z.T @ z, torch.eye(z.shape[1], dtype=F64), rtol=0, atol=100 * k * EPS)
    assert float((t @ z - z * w).norm()) <= atol


def test_stemr_selects_by_value_and_leaves_its_inputs_alone():
    g = _symmetric(12, 1)
    _, d, e, _ = _tridiagonalized(g)
    d0, e0 = d.clone(), e.clone()
    reference = torch.linalg.eigvalsh(g)
    high = float(reference[4] + reference[5]) / 2  # (low, high] holds exactly the 5 smallest
    w, z = _lapack.stemr(d, e, value=(float(reference[0]) - 1.0, high))
    torch.testing.assert_close(w, reference[:5], rtol=0, atol=1e-10 * float(reference[-1]))
    assert z.shape == (12, 5)
    assert torch.equal(d, d0) and torch.equal(e, e0)
    w, z = _lapack.stemr(d, e, value=(float(reference[-1]) + 1, float(reference[-1]) + 2))  # none there
    assert w.shape == (0,) and z.shape == (12, 0)


def test_bad_layouts_and_arguments_are_refused():
    with pytest.raises(ValueError, match="column-major"):
        _lapack.sytrd_lower(
            torch.eye(3, dtype=F64) + torch.ones(3, 3, dtype=F64).triu(1)
        )  # row-major, not symmetric
    with pytest.raises(ValueError, match="float64"):
        _lapack.sytrd_lower(torch.eye(3))
    g = _symmetric(4, 0)
    reflectors, d, e, tau = _tridiagonalized(g)
    with pytest.raises(ValueError, match="column-major"):
        _lapack.ormtr_lower(reflectors, tau, torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="exactly one"):
        _lapack.stemr(d, e)


def test_lapack_errors_raise():
    """LAPACK reports a bad argument through info (here: a NaN makes dstebz fail); it is not ignored."""
    d = torch.tensor([1.0, float("nan"), 2.0], dtype=F64)
    e = torch.tensor([0.5, 0.5], dtype=F64)
    with pytest.raises(RuntimeError, match="LAPACK dstebz failed"):
        _lapack.stebz(d, e, 0, 0)


def test_calls_release_the_gil():
    """While one thread is inside a long LAPACK call, another keeps running Python (a held GIL would stall it for
    the whole call)."""
    g = _symmetric(900, 0)
    calls, ticks = [], []
    done = threading.Event()

    def tridiagonalize():
        for _ in range(3):
            start = time.perf_counter()
            _tridiagonalized(g)
            calls.append(time.perf_counter() - start)
        done.set()

    worker = threading.Thread(target=tridiagonalize)
    worker.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    worker.join()
    longest_gap = max(b - a for a, b in zip(ticks, ticks[1:], strict=False))
    assert longest_gap < 0.5 * min(calls), (longest_gap, calls)
