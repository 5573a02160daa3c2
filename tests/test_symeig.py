"""kasa_trl._symeig: the partial symmetric eigensolver agrees with torch.linalg.eigh on every backend."""

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
