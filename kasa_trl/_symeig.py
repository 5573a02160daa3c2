"""Gram matrices and their smallest eigenpairs, without the eigenvectors KaSA does not need.

KaSA needs the eigenvectors of the ``m`` smallest eigenvalues of a ``k x k`` Gram matrix (``m`` is ``n`` or, when
deflating, a few times ``n``), and three eigenvalues to decide ``m``. ``torch.linalg.eigh`` (LAPACK ``syevd``)
always computes all ``k`` eigenvectors, about three times the work. On CPU, with SciPy installed, this module
splits the problem the way LAPACK's ``syevr`` does, but keeps the O(k^3) part to a single pass:

1. ``G = Q T Q^T``, Householder tridiagonalization (``dsytrd``; ``4/3 k^3`` flops, the only cubic step);
2. on demand, the few eigenvalues that decide ``m`` (the smallest and the largest; bisection, ``dstebz``,
   O(k) each);
3. on demand, the eigenvectors of the ``m`` smallest, or of those below a bound (``dstemr``, O(k m)), carried
   back to ``G``'s basis by applying the stored reflectors (``dormtr``, ``2 k^2 m`` flops).

The Gram itself is formed with ``dsyrk`` (half the flops of a matmul). The routines are SciPy's BLAS/LAPACK,
called through ``_lapack``'s typed, checked bindings (GIL released, nothing copied); ``syrk_lower``,
``sytrd_lower``, ``stebz``, ``stemr`` and ``ormtr_lower`` below allocate what each needs. Everything is float64 and backward stable like
``eigh``. Elsewhere (CUDA, where ``eigh`` is fast, or without SciPy) it falls back to ``torch.linalg.eigh``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from . import _lapack

if TYPE_CHECKING:
    from threadpoolctl import ThreadpoolController

BACKENDS = ("lapack", "torch")
_F64, _I32 = torch.float64, torch.int32


def backend_for(t: torch.Tensor) -> str:
    """The backend used for ``t``: ``"lapack"`` (SciPy's BLAS/LAPACK, CPU) or ``"torch"``."""
    return "lapack" if t.device.type == "cpu" and _lapack.available() else "torch"


@contextlib.contextmanager
def cpu_threads(backend: str, blas_threads: int) -> Iterator[None]:
    """Within the block, for the ``"lapack"`` backend: torch runs single-threaded and the BLAS on ``blas_threads``.

    The heavy steps run in the BLAS's own thread pool, sized to the caller's budget (SciPy's OpenBLAS otherwise
    takes every core, whatever ``torch.set_num_threads`` says). torch's OpenMP threads spin for a while after each
    op (by default), and spinning between BLAS calls they take the cores the BLAS needs (the measurement is in
    docs/benchmarks.md). The torch steps in between (projections, the small SVD) are small. Both settings are
    restored on exit, also on error.
    """
    if backend != "lapack":
        yield
        return
    previous = torch.get_num_threads()
    blas = _blas_threadpools()
    torch.set_num_threads(1)
    try:
        with blas.limit(limits=blas_threads) if blas is not None else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(previous)


@functools.cache
def _blas_threadpools() -> ThreadpoolController | None:
    """threadpoolctl's handle on the BLAS libraries loaded (SciPy's among them), or None without threadpoolctl."""
    if not _lapack.available():
        return None
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a dependency; without it the BLAS keeps its own thread count
        return None
    return ThreadpoolController().select(user_api="blas")


def gram(b: torch.Tensor, backend: str) -> torch.Tensor:
    """``b @ b.T`` for ``b`` (j, p) float64. With ``"lapack"`` only the lower triangle is filled (``dsyrk``)."""
    if backend == "torch":
        return b @ b.T
    return syrk_lower(b)


class LowestEigh:
    """The smallest eigenpairs of a symmetric ``g`` (k, k) float64, computed as far as they are asked for.

    Args:
        g (torch.Tensor): (k, k), as returned by ``gram`` for the same ``backend`` (lower triangle used); the
            ``"lapack"`` backend overwrites it with the Householder reflectors (no copy of a k x k matrix when it is
            column-major, as ``gram`` returns it).
        backend (str): one of ``BACKENDS``.
    """

    def __init__(self, g: torch.Tensor, backend: str) -> None:
        self.k = g.shape[0]
        self.backend = "torch" if self.k < 2 else backend  # dsytrd needs a subdiagonal
        if self.backend == "torch":
            self._eigvals, self._eigvecs = torch.linalg.eigh(g, UPLO="L")
            return
        if g.stride() != (1, self.k):  # LAPACK wants column-major; the lower triangle of g is that of g.T
            g = column_major(self.k, self.k).copy_(g)
        # g now holds the reflectors below the subdiagonal; (d, e) is T.
        self._d, self._e, self._tau = sytrd_lower(g)
        self._reflectors = g

    def smallest(self, m: int) -> torch.Tensor:
        """(m,) the m smallest eigenvalues, ascending (bisection on T: O(k m), not all k of them)."""
        if self.backend == "torch":
            return self._eigvals[:m]
        return self._eigenvalues(0, m - 1)

    def largest(self) -> float:
        if self.backend == "torch":
            return float(self._eigvals[-1])
        return float(self._eigenvalues(self.k - 1, self.k - 1)[0])

    def _eigenvalues(self, first: int, last: int) -> torch.Tensor:
        """Eigenvalues ``first..last`` of T by bisection; by MRRR where bisection gives up. dstebz selecting by index
        can fail on eigenvalues repeated across the blocks T splits into (info 2 on an orthogonal weight with a few
        zero singular values: its Sturm counts are not monotonic in floating point); dstemr computes them anyway,
        at the cost of their vectors (O(k) each)."""
        try:
            return stebz(self._d, self._e, first, last)
        except RuntimeError:
            return stemr(self._d, self._e, index=(first, last))[0]

    def vectors(self, m: int) -> torch.Tensor:
        """(k, m) orthonormal eigenvectors of the ``m`` smallest eigenvalues, ascending."""
        if self.backend == "torch":
            return self._eigvecs[:, :m]
        _, z = stemr(self._d, self._e, index=(0, m - 1))
        return ormtr_lower(self._reflectors, self._tau, z)

    def vectors_at_most(self, bound: float) -> torch.Tensor:
        """(k, j) orthonormal eigenvectors of every eigenvalue <= ``bound``, ascending."""
        if self.backend == "torch":
            return self._eigvecs[:, : int((self._eigvals <= bound).sum())]
        # Gershgorin: every eigenvalue of T is >= min_i d_i - |e_{i-1}| - |e_i|, so (below, bound] holds them all.
        radius = torch.zeros(self.k, dtype=torch.float64)
        radius[:-1] += self._e.abs()
        radius[1:] += self._e.abs()
        below = float((self._d - radius).min()) - 1.0
        _, z = stemr(self._d, self._e, value=(below, bound))
        return ormtr_lower(self._reflectors, self._tau, z)


# The LAPACK steps, on torch tensors: each allocates its outputs and workspaces and fills in the dimensions.


def column_major(rows: int, cols: int) -> torch.Tensor:
    """An uninitialised float64 ``(rows, cols)`` matrix in column-major storage."""
    return torch.empty(cols, rows, dtype=_F64).T


def syrk_lower(b: torch.Tensor) -> torch.Tensor:
    """``b @ b.T`` for ``b`` (j, p) float64 on CPU, contiguous or a transposed contiguous view.

    Returns:
        (j, j) column-major; only its lower triangle is written.
    """
    j, p = b.shape
    g = column_major(j, j)
    if b.T.is_contiguous() and not b.is_contiguous():  # column-major (j, p): G = B B^T
        trans, a, lda = b"N", b, j
    else:  # row-major (j, p) is B^T (p, j) column-major: G = (B^T)^T B^T
        trans, a, lda = b"T", b.contiguous().T, p
    _lapack.dsyrk(
        uplo=b"L", trans=trans, n=j, k=p, alpha=1.0, a=a, lda=max(lda, 1), beta=0.0, c=g, ldc=max(j, 1)
    )
    return g


def sytrd_lower(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder tridiagonalization ``G = Q T Q^T`` of the lower triangle of ``g`` (k, k), in place.

    Args:
        g (torch.Tensor): (k, k) float64, column-major; overwritten with the reflectors that define ``Q``.

    Returns:
        (d (k,), e (k - 1,), tau (k - 1,)): ``T``'s diagonal and off-diagonal, and the reflectors' scales.
    """
    k = g.shape[0]
    d, e, tau = (torch.empty(size, dtype=_F64) for size in (k, max(k - 1, 0), max(k - 1, 0)))
    _with_workspace(_lapack.dsytrd, uplo=b"L", n=k, a=g, lda=max(k, 1), d=d, e=e, tau=tau)
    return d, e, tau


def stebz(d: torch.Tensor, e: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Eigenvalues ``first..last`` (0-based, inclusive, ascending order) of the tridiagonal ``T = (d, e)``, by
    bisection: O(k) each."""
    k = d.numel()
    w = torch.empty(k, dtype=_F64)
    iblock, isplit, iwork = (torch.empty(size, dtype=_I32) for size in (k, k, 3 * k))
    m, _ = _lapack.dstebz(
        range=b"I", order=b"E", n=k, vl=0.0, vu=0.0, il=first + 1, iu=last + 1, abstol=0.0, d=d, e=e, w=w,
        iblock=iblock, isplit=isplit, work=torch.empty(4 * k, dtype=_F64), iwork=iwork,
    )  # fmt: skip
    return w[:m].clone()


def stemr(
    d: torch.Tensor,
    e: torch.Tensor,
    *,
    index: tuple[int, int] | None = None,
    value: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the tridiagonal ``T = (d, e)`` by MRRR (O(k) per vector): those with indices
    ``index = (first, last)`` (0-based, inclusive) or with eigenvalues in ``value = (low, high]``.

    Returns:
        (w (m,) ascending, z (k, m) column-major orthonormal eigenvectors of ``T``).
    """
    k = d.numel()
    if (index is None) == (value is None):
        raise ValueError("stemr takes exactly one of index=(first, last) or value=(low, high)")
    (first, last), (low, high) = index or (0, 0), value or (0.0, 0.0)
    if e.numel() != max(k - 1, 0):
        raise ValueError(f"stemr: e must have {max(k - 1, 0)} entries for d's {k}, got {e.numel()}")
    # dstemr overwrites d and e, and wants e with k entries (the last is workspace).
    d_work, e_work = d.clone(), torch.zeros(k, dtype=_F64)
    e_work[: k - 1] = e
    w = torch.empty(k, dtype=_F64)
    isuppz = torch.empty(2 * max(k, 1), dtype=_I32)

    def call(
        z: torch.Tensor, nzc: int, work: torch.Tensor, lwork: int, iwork: torch.Tensor, liwork: int
    ) -> int:
        m, _ = _lapack.dstemr(
            jobz=b"V", range=b"I" if index is not None else b"V", n=k, d=d_work, e=e_work, vl=low, vu=high,
            il=first + 1, iu=last + 1, w=w, z=z, ldz=max(k, 1), nzc=nzc, isuppz=isuppz, tryrac=1,
            work=work, lwork=lwork, iwork=iwork, liwork=liwork,
        )  # fmt: skip
        return m

    # One query returns how many vectors the selection holds (in z[0]) and both workspace sizes; d, e untouched.
    count, work, iwork = torch.zeros(1, dtype=_F64), torch.zeros(1, dtype=_F64), torch.zeros(1, dtype=_I32)
    call(count, -1, work, -1, iwork, -1)
    # Room for two more than counted: an eigenvalue on the boundary of (low, high] may be counted either way.
    nzc = min(k, int(count[0]) + (2 if value is not None else 0))
    lwork, liwork = int(work[0]), int(iwork[0])
    z = column_major(k, max(nzc, 1))
    work, iwork = torch.empty(lwork, dtype=_F64), torch.empty(liwork, dtype=_I32)
    m = call(z, nzc, work, lwork, iwork, liwork)
    return w[:m].clone(), z[:, :m]


def ormtr_lower(reflectors: torch.Tensor, tau: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``Q @ z`` in place, ``Q`` from ``sytrd_lower`` (its overwritten matrix and ``tau``); ``z`` (k, m)
    column-major. Returns ``z``."""
    k, m = reflectors.shape[0], z.shape[1]
    if m == 0 or k < 2:
        return z
    _with_workspace(
        _lapack.dormtr, side=b"L", uplo=b"L", trans=b"N", m=k, n=m, a=reflectors, lda=k, tau=tau, c=z, ldc=k
    )  # fmt: skip
    return z


def _with_workspace(routine: Callable[..., None], **args: object) -> None:
    """Call ``routine`` (``dsytrd``, ``dormtr``) first as a workspace query (``lwork = -1``: the optimal size comes
    back in ``work[0]``), then for real."""
    query = torch.empty(1, dtype=_F64)
    routine(**args, work=query, lwork=-1)
    work = torch.empty(max(int(query[0]), 1), dtype=_F64)
    routine(**args, work=work, lwork=work.numel())
