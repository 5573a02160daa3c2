"""Gram matrices and their smallest eigenpairs, without the eigenvectors KaSA does not need.

KaSA needs the eigenvectors of the ``m`` smallest eigenvalues of a ``k x k`` Gram matrix (``m`` is ``n`` or, when
deflating, a few times ``n``), and three eigenvalues to decide ``m``. ``torch.linalg.eigh`` (LAPACK ``syevd``)
always computes all ``k`` eigenvectors, about three times the work. On CPU, with SciPy installed, this module
splits the problem the way LAPACK's ``syevr`` does, but keeps the O(k^3) part to a single pass:

1. ``G = Q T Q^T``, Householder tridiagonalization (``dsytrd``; ``4/3 k^3`` flops, the only cubic step);
2. on demand, the few eigenvalues that decide ``m`` (the smallest and the largest; bisection, ``dstebz``,
   O(k) each);
3. on demand, the eigenvectors of the ``m`` smallest, or of those below a bound (``dstemr``, O(k m)), carried
   back to ``G``'s basis by applying the stored reflectors (``torch.ormqr``, ``2 k^2 m`` flops).

The Gram itself is formed with ``dsyrk`` (half the flops of a matmul). Everything is float64 and backward stable
like ``eigh``. Elsewhere (CUDA, where ``eigh`` is fast, or without SciPy) it falls back to ``torch.linalg.eigh``.
SciPy's OpenBLAS sizes its thread pool from ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS``, not from
``torch.set_num_threads``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("lapack", "torch")


@functools.cache
def scipy_linalg() -> ModuleType | None:
    """``scipy.linalg``, imported on first use (it costs ~0.3 s), or None without SciPy.

    A dependency in pyproject.toml; without it, decomposition still works through torch.linalg.eigh.
    """
    try:
        import scipy.linalg
        import scipy.linalg.blas
        import scipy.linalg.lapack
    except ImportError:  # pragma: no cover - the fallback is tested by forcing the torch backend
        return None
    return scipy.linalg


def backend_for(t: torch.Tensor) -> str:
    """The backend used for ``t``: ``"lapack"`` (SciPy, CPU) or ``"torch"``."""
    return "lapack" if t.device.type == "cpu" and scipy_linalg() is not None else "torch"


@contextlib.contextmanager
def torch_threads_yielding(backend: str) -> Iterator[None]:
    """Within the block torch runs single-threaded when ``backend`` is ``"lapack"``.

    The heavy steps then run in OpenBLAS's own thread pool. torch's OpenMP threads spin for a while after each op
    (by default), and spinning between OpenBLAS calls they take the cores OpenBLAS needs: measured on 2 cores, the
    decomposition of three 1024x2816/1024x1024 weights took 0.67 s with both pools at 2 threads, 0.58 s with
    everything on 1 thread. The torch steps in between (projections, back-transformations) are small.
    """
    previous = torch.get_num_threads()
    if backend != "lapack" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def gram(b: torch.Tensor, backend: str) -> torch.Tensor:
    """``b @ b.T`` for ``b`` (j, p) float64. With ``"lapack"`` only the lower triangle is filled."""
    if backend == "torch":
        return b @ b.T
    if b.T.is_contiguous():  # b is a transposed view: (p, j) row-major is b (j, p) column-major
        return torch.from_numpy(scipy_linalg().blas.dsyrk(1.0, b.T.numpy().T, trans=0, lower=1))
    # (j, p) row-major is b.T (p, j) column-major: dsyrk(trans=1) forms b b^T from it without a copy.
    return torch.from_numpy(scipy_linalg().blas.dsyrk(1.0, b.contiguous().numpy().T, trans=1, lower=1))


class LowestEigh:
    """The smallest eigenpairs of a symmetric ``g`` (k, k) float64, computed as far as they are asked for.

    Args:
        g (torch.Tensor): (k, k), as returned by ``gram`` for the same ``backend`` (lower triangle used); the
            ``"lapack"`` backend overwrites it with the Householder reflectors (no copy of a k x k matrix).
        backend (str): one of ``BACKENDS``.
    """

    def __init__(self, g: torch.Tensor, backend: str) -> None:
        self.k = g.shape[0]
        self.backend = "torch" if self.k < 2 else backend  # dsytrd needs a subdiagonal
        if self.backend == "torch":
            self._eigvals, self._eigvecs = torch.linalg.eigh(g, UPLO="L")
            return
        a = g.numpy()
        if not a.flags.f_contiguous:
            a = a.copy(order="F")
        linalg = scipy_linalg()
        lwork, info = linalg.lapack.dsytrd_lwork(self.k, lower=1)
        _check(info, "dsytrd_lwork")
        # c holds the reflectors below the subdiagonal; (d, e) is T.
        c, d, e, tau, info = linalg.lapack.dsytrd(a, lower=1, lwork=int(lwork), overwrite_a=1)
        _check(info, "dsytrd")
        self._reflectors, self._tau, self._d, self._e = torch.from_numpy(c), torch.from_numpy(tau), d, e

    def smallest(self, m: int) -> torch.Tensor:
        """(m,) the m smallest eigenvalues, ascending (bisection on T: O(k m), not all k of them)."""
        if self.backend == "torch":
            return self._eigvals[:m]
        return torch.from_numpy(self._tridiagonal_eigvals(0, m - 1))

    def largest(self) -> float:
        if self.backend == "torch":
            return float(self._eigvals[-1])
        return float(self._tridiagonal_eigvals(self.k - 1, self.k - 1)[0])

    def vectors(self, m: int) -> torch.Tensor:
        """(k, m) orthonormal eigenvectors of the ``m`` smallest eigenvalues, ascending."""
        if self.backend == "torch":
            return self._eigvecs[:, :m]
        return self._back_transform(self._tridiagonal_eigvecs(select="i", select_range=(0, m - 1)))

    def vectors_at_most(self, bound: float) -> torch.Tensor:
        """(k, j) orthonormal eigenvectors of every eigenvalue <= ``bound``, ascending."""
        if self.backend == "torch":
            return self._eigvecs[:, : int((self._eigvals <= bound).sum())]
        # Gershgorin: every eigenvalue of T is >= min_i d_i - |e_{i-1}| - |e_i|, so (below, bound] holds them all.
        radius = torch.zeros(self.k, dtype=torch.float64)
        radius[:-1] += torch.from_numpy(abs(self._e))
        radius[1:] += torch.from_numpy(abs(self._e))
        below = float((torch.from_numpy(self._d) - radius).min()) - 1.0
        return self._back_transform(self._tridiagonal_eigvecs(select="v", select_range=(below, bound)))

    def _tridiagonal_eigvals(self, first: int, last: int):
        return scipy_linalg().eigh_tridiagonal(
            self._d, self._e, eigvals_only=True, select="i", select_range=(first, last), lapack_driver="stebz"
        )

    def _tridiagonal_eigvecs(self, **select) -> torch.Tensor:
        _, z = scipy_linalg().eigh_tridiagonal(self._d, self._e, lapack_driver="stemr", **select)
        return torch.from_numpy(z)  # (k, m) in T's basis

    def _back_transform(self, z: torch.Tensor) -> torch.Tensor:
        """Eigenvectors of T (k, m) -> of g: apply Q = H(1) ... H(k-1) from dsytrd."""
        if z.shape[1] == 0:
            return z
        # dsytrd(lower) stores H(i) = I - tau_i v_i v_i^T with v_i[: i + 1] = (0, ..., 0, 1) in c[i + 2 :, i]:
        # Q = diag(1, Q') where Q' is the QR-style product of the reflectors of c[1:, : k - 1].
        rest = torch.ormqr(self._reflectors[1:, : self.k - 1], self._tau, z[1:].contiguous())
        return torch.cat([z[:1], rest])


def _check(info: int, routine: str) -> None:
    if info != 0:
        raise RuntimeError(f"LAPACK {routine} failed (info={info}); the Gram matrix may be non-finite")
