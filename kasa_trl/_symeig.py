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
called through ``_lapack`` (GIL released, nothing copied). Everything is float64 and backward stable like
``eigh``. Elsewhere (CUDA, where ``eigh`` is fast, or without SciPy) it falls back to ``torch.linalg.eigh``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from . import _lapack

BACKENDS = ("lapack", "torch")


def backend_for(t: torch.Tensor) -> str:
    """The backend used for ``t``: ``"lapack"`` (SciPy's BLAS/LAPACK, CPU) or ``"torch"``."""
    return "lapack" if t.device.type == "cpu" and _lapack.available() else "torch"


@contextlib.contextmanager
def cpu_threads(backend: str, blas_threads: int) -> Iterator[None]:
    """Within the block, for the ``"lapack"`` backend: torch runs single-threaded and the BLAS on ``blas_threads``.

    The heavy steps run in the BLAS's own thread pool, sized to the caller's budget (SciPy's OpenBLAS otherwise
    takes every core, whatever ``torch.set_num_threads`` says). torch's OpenMP threads spin for a while after each
    op (by default), and spinning between BLAS calls they take the cores the BLAS needs: measured on 2 cores, three
    1024x2816/1024x1024 weights took 0.67 s with both pools at 2 threads, 0.49 s with torch at 1. The torch steps
    in between (projections, the small SVD) are small. Both settings are restored on exit, also on error.
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
def _blas_threadpools():
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
    return _lapack.syrk_lower(b)


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
            g = _lapack.column_major(self.k, self.k).copy_(g)
        # g now holds the reflectors below the subdiagonal; (d, e) is T.
        self._d, self._e, self._tau = _lapack.sytrd_lower(g)
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
            return _lapack.stebz(self._d, self._e, first, last)
        except RuntimeError:
            return _lapack.stemr(self._d, self._e, index=(first, last))[0]

    def vectors(self, m: int) -> torch.Tensor:
        """(k, m) orthonormal eigenvectors of the ``m`` smallest eigenvalues, ascending."""
        if self.backend == "torch":
            return self._eigvecs[:, :m]
        _, z = _lapack.stemr(self._d, self._e, index=(0, m - 1))
        return _lapack.ormtr_lower(self._reflectors, self._tau, z)

    def vectors_at_most(self, bound: float) -> torch.Tensor:
        """(k, j) orthonormal eigenvectors of every eigenvalue <= ``bound``, ascending."""
        if self.backend == "torch":
            return self._eigvecs[:, : int((self._eigvals <= bound).sum())]
        # Gershgorin: every eigenvalue of T is >= min_i d_i - |e_{i-1}| - |e_i|, so (below, bound] holds them all.
        radius = torch.zeros(self.k, dtype=torch.float64)
        radius[:-1] += self._e.abs()
        radius[1:] += self._e.abs()
        below = float((self._d - radius).min()) - 1.0
        _, z = _lapack.stemr(self._d, self._e, value=(below, bound))
        return _lapack.ormtr_lower(self._reflectors, self._tau, z)
