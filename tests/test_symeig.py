"""kasa_trl._symeig: each LAPACK step agrees with its definition (torch.linalg as the reference) in the layouts the
eigensolver passes, and the partial symmetric eigensolver agrees with torch.linalg.eigh on every backend."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kasa_trl import _lapack, _symeig

F64 = torch.float64
EPS = torch.finfo(F64).eps
BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(not _lapack.available(), reason="SciPy is not installed"))
    if b == "lapack"
    else b
    for b in _symeig.BACKENDS
]


requires_lapack = pytest.mark.skipif(not _lapack.available(), reason="SciPy is not installed")


def _symmetric(k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(k, k + 3, generator=gen, dtype=F64)
    return b @ b.T


def _tridiagonalized(g: torch.Tensor):
    """(reflectors, d, e, tau) of the symmetric ``g`` via sytrd_lower on a column-major copy."""
    k = g.shape[0]
    work = _symeig.column_major(k, k).copy_(g)
    d, e, tau = _symeig.sytrd_lower(work)
    return work, d, e, tau


def _tridiagonal(d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return torch.diag(d) + torch.diag(e, 1) + torch.diag(e, -1)


@requires_lapack
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
    g = _symeig.syrk_lower(b)
    assert g.shape == (j, j) and (j == 1 or g.stride() == (1, j))
    torch.testing.assert_close(torch.tril(g), torch.tril(b @ b.T), rtol=1e-13, atol=1e-13)


@requires_lapack
@settings(deadline=None, max_examples=30)
@given(k=st.integers(2, 20), seed=st.integers(0, 2**16))
def test_sytrd_and_ormtr_reconstruct_the_matrix(k, seed):
    """G = Q T Q^T with Q orthogonal: Q from ormtr applied to the identity."""
    g = _symmetric(k, seed)
    reflectors, d, e, tau = _tridiagonalized(g)
    q = _symeig.ormtr_lower(reflectors, tau, _symeig.column_major(k, k).copy_(torch.eye(k, dtype=F64)))
    scale = float(g.norm())
    torch.testing.assert_close(q.T @ q, torch.eye(k, dtype=F64), rtol=0, atol=100 * k * EPS)
    torch.testing.assert_close(q @ _tridiagonal(d, e) @ q.T, g, rtol=0, atol=100 * k * EPS * scale)


@requires_lapack
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
        _symeig.stebz(d, e, first, last), reference[first : last + 1], rtol=0, atol=atol
    )
    w, z = _symeig.stemr(d, e, index=(first, last))
    torch.testing.assert_close(w, reference[first : last + 1], rtol=0, atol=atol)
    t = _tridiagonal(d, e)
    assert z.shape == (k, last - first + 1)
    torch.testing.assert_close(z.T @ z, torch.eye(z.shape[1], dtype=F64), rtol=0, atol=100 * k * EPS)
    assert float((t @ z - z * w).norm()) <= atol


@requires_lapack
def test_stemr_selects_by_value_and_leaves_its_inputs_alone():
    g = _symmetric(12, 1)
    _, d, e, _ = _tridiagonalized(g)
    d0, e0 = d.clone(), e.clone()
    reference = torch.linalg.eigvalsh(g)
    high = float(reference[4] + reference[5]) / 2  # (low, high] holds exactly the 5 smallest
    w, z = _symeig.stemr(d, e, value=(float(reference[0]) - 1.0, high))
    torch.testing.assert_close(w, reference[:5], rtol=0, atol=1e-10 * float(reference[-1]))
    assert z.shape == (12, 5)
    assert torch.equal(d, d0) and torch.equal(e, e0)
    w, z = _symeig.stemr(d, e, value=(float(reference[-1]) + 1, float(reference[-1]) + 2))  # none there
    assert w.shape == (0,) and z.shape == (12, 0)


@requires_lapack
def test_bad_layouts_and_arguments_are_refused():
    """The steps pass what they are given to the checked wrappers: a wrong layout or dtype raises, nothing is
    written."""
    row_major = torch.eye(3, dtype=F64) + torch.ones(3, 3, dtype=F64).triu(1)  # not symmetric either
    before = row_major.clone()
    with pytest.raises(ValueError, match="LAPACK dsytrd argument a: must be column-major"):
        _symeig.sytrd_lower(row_major)
    assert torch.equal(row_major, before)
    with pytest.raises(TypeError, match="LAPACK dsytrd argument a: must be torch.float64, got torch.float32"):
        _symeig.sytrd_lower(torch.eye(3))
    g = _symmetric(4, 0)
    reflectors, d, e, tau = _tridiagonalized(g)
    z = torch.ones(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="LAPACK dormtr argument c: must be column-major"):
        _symeig.ormtr_lower(reflectors, tau, z)
    assert torch.equal(z, torch.ones(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="exactly one"):
        _symeig.stemr(d, e)
    with pytest.raises(ValueError, match="stemr: e must have 3 entries for d's 4, got 4"):
        _symeig.stemr(d, d, index=(0, 0))  # d passed twice
    with pytest.raises(ValueError, match="LAPACK dstebz argument e: must have 2 entries, got 4"):
        _symeig.stebz(e, d, 0, 0)  # d and e swapped
    with pytest.raises(ValueError, match=r"LAPACK dstebz argument iu: must be in \[1, 4\], got 5"):
        _symeig.stebz(d, e, 0, 4)  # past the last eigenvalue


@requires_lapack
def test_lapack_errors_raise():
    """A NaN makes dstebz fail: the failure raises."""
    d = torch.tensor([1.0, float("nan"), 2.0], dtype=F64)
    e = torch.tensor([0.5, 0.5], dtype=F64)
    with pytest.raises(RuntimeError, match="LAPACK dstebz failed"):
        _symeig.stebz(d, e, 0, 0)


def _full(g: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle ``g`` holds."""
    return torch.tril(g) + torch.tril(g, -1).T


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transposed", [False, True])
def test_gram_is_b_b_transpose(backend, transposed):
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(7, 13, generator=gen, dtype=F64)
    if transposed:
        # A non-contiguous view, as minor_components passes for tall weights.
        b = torch.randn(13, 7, generator=gen, dtype=F64).T
    torch.testing.assert_close(_full(_symeig.gram(b, backend)), b @ b.T, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(deadline=None, max_examples=40)
@given(
    k=st.integers(1, 24),
    extra=st.integers(0, 8),
    rank_deficit=st.integers(0, 4),
    m=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
def test_lowest_eigenpairs_match_eigh(backend, k, extra, rank_deficit, m, seed):
    gen = torch.Generator().manual_seed(seed)
    m = min(m, k)
    rank = max(1, k - rank_deficit)
    left = torch.randn(k, rank, generator=gen, dtype=F64)
    b = left @ torch.randn(rank, k + extra, generator=gen, dtype=F64)
    g = _symeig.gram(b, backend)
    dense = _full(g)  # before LowestEigh, which overwrites g
    eig = _symeig.LowestEigh(g, backend)
    reference = torch.linalg.eigvalsh(dense)
    scale = reference[-1].abs() + 1
    atol = 100 * k * EPS * scale
    torch.testing.assert_close(eig.smallest(m), reference[:m], rtol=0, atol=atol)
    assert abs(eig.largest() - reference[-1]) <= atol
    q = eig.vectors(m)
    assert q.shape == (k, m)
    torch.testing.assert_close(q.T @ q, torch.eye(m, dtype=F64), rtol=0, atol=100 * k * EPS)
    assert (dense @ q - q * reference[:m]).norm() <= atol
    # By value: every eigenvalue <= a bound halfway between the m-th and the next one (if any).
    bound = float(reference[m - 1] + (reference[m] if m < k else reference[m - 1] + 1)) / 2
    expected = int((reference <= bound).sum())
    below = eig.vectors_at_most(bound)
    # Unless an eigenvalue is so close to the bound that either side is right:
    if bool(abs(reference - bound).min() > atol):
        assert below.shape == (k, expected)
    assert (dense @ below - below @ (below.T @ dense @ below)).norm() <= atol  # an invariant subspace


def test_lapack_is_the_cpu_default_when_scipy_is_installed():
    expected = "torch" if not _lapack.available() else "lapack"
    assert _symeig.backend_for(torch.zeros(2, 2)) == expected
    assert _symeig.backend_for(torch.zeros(2, 2, device="meta")) == "torch"


def test_torch_threads_are_restored_after_the_lapack_path(monkeypatch):
    """The decomposition runs torch single-threaded around OpenBLAS, and gives the caller's setting back, also
    when it fails."""
    from kasa_trl.decomposition import minor_components

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(_symeig, "backend_for", lambda t: "lapack")
        seen = []
        original = _symeig.LowestEigh.__init__

        def spy(self, g, backend):
            seen.append(torch.get_num_threads())
            original(self, g, backend)

        monkeypatch.setattr(_symeig.LowestEigh, "__init__", spy)
        if _lapack.available():
            minor_components(torch.randn(6, 9, dtype=F64), 2, "gram_eigh")
            assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="non-finite"):  # refused before the threads are touched
            minor_components(torch.full((6, 9), float("nan")), 2, "gram_eigh")
        assert torch.get_num_threads() == 2

        def fail(self, g, backend):
            seen.append(torch.get_num_threads())
            raise RuntimeError("LAPACK dsytrd failed")

        monkeypatch.setattr(_symeig.LowestEigh, "__init__", fail)
        seen.clear()
        with pytest.raises(
            RuntimeError, match="dsytrd failed"
        ):  # fails inside: the threads come back all the same
            minor_components(torch.randn(6, 9, dtype=F64), 2, "gram_eigh")
        assert seen == ([1] if _lapack.available() else [2]) and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zeros", [0, 1, 3])
def test_eigenvalues_repeated_across_blocks(backend, zeros):
    """The Gram of an orthogonal weight with a few zero singular values: T splits into blocks sharing the eigenvalue
    1, where LAPACK's bisection by index gives up (dstebz info=2 for the largest with 3 zeros); MRRR takes over."""
    gen = torch.Generator().manual_seed(2)
    s = torch.ones(16, dtype=F64)
    s[16 - zeros :] = 0
    u = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(20, 16, generator=gen, dtype=F64)).Q
    b = (u * s) @ v.T
    g = _symeig.gram(b, backend)
    reference = torch.linalg.eigvalsh(_full(g))
    eig = _symeig.LowestEigh(g, backend)
    atol = 100 * 16 * EPS
    for m in (1, zeros + 1, 16):
        torch.testing.assert_close(eig.smallest(m), reference[:m], rtol=0, atol=atol)
    assert abs(eig.largest() - 1.0) <= atol
