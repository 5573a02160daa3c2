"""The five double-precision BLAS/LAPACK routines the CPU eigensolver needs, on torch tensors.

They are reached through SciPy's Cython API (``scipy.linalg.cython_blas`` / ``cython_lapack``: a function pointer
per routine, in the BLAS/LAPACK SciPy was built with) and called with ``ctypes``, for two reasons:

- ``ctypes`` releases the GIL for the length of each call, so several layers can be decomposed on several threads
  at once (``scipy.linalg.lapack``'s wrappers hold it);
- only what a routine needs is allocated: SciPy's ``stemr`` wrapper allocates a ``k x k`` eigenvector matrix to
  return ``m`` vectors, its ``eigh_tridiagonal`` checks and copies its inputs on every call.

Matrices are float64 and column-major ("Fortran" order), as LAPACK wants them: a column-major ``(rows, cols)``
matrix is a torch tensor with strides ``(1, rows)``, i.e. ``storage.T`` of a row-major ``(cols, rows)`` tensor.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

_F64 = torch.float64
# Every argument of a Fortran routine is passed by reference.
_SIGNATURES = {
    "cython_blas": {"dsyrk": 10},
    "cython_lapack": {"dsytrd": 10, "dstebz": 18, "dstemr": 21, "dormtr": 13},
}


@functools.cache
def routines() -> dict[str, Callable[..., None]] | None:
    """Name -> callable for each routine, or None where SciPy (or its Cython API) is missing."""
    try:
        import scipy.linalg.cython_blas
        import scipy.linalg.cython_lapack
    except ImportError:
        return None
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    found = {}
    for module_name, signatures in _SIGNATURES.items():
        capsules = getattr(scipy.linalg, module_name).__pyx_capi__
        for name, n_args in signatures.items():
            if name not in capsules:  # pragma: no cover - every SciPy since 1.0 has them
                return None
            capsule = capsules[name]
            pointer = get_pointer(capsule, get_name(capsule))
            found[name] = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * n_args)(pointer)
    return found


def available() -> bool:
    return routines() is not None


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
        trans, source, ld = b"N", b, j
    else:  # row-major (j, p) is B^T (p, j) column-major: G = (B^T)^T B^T
        trans, source, ld = b"T", b.contiguous(), p
    _call("dsyrk", b"L", trans, _i(j), _i(p), _d(1.0), source, _i(max(ld, 1)), _d(0.0), g, _i(max(j, 1)))
    return g


def sytrd_lower(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder tridiagonalization ``G = Q T Q^T`` of the lower triangle of ``g`` (k, k), in place.

    Args:
        g (torch.Tensor): (k, k) float64, column-major; overwritten with the reflectors that define ``Q``.

    Returns:
        (d (k,), e (k - 1,), tau (k - 1,)): ``T``'s diagonal and off-diagonal, and the reflectors' scales.
    """
    k = _check_column_major(g)
    d, e, tau = (torch.empty(size, dtype=_F64) for size in (k, max(k - 1, 0), max(k - 1, 0)))
    _call_with_workspace("dsytrd", b"L", _i(k), g, _i(max(k, 1)), d, e, tau)
    return d, e, tau


def stebz(d: torch.Tensor, e: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Eigenvalues ``first..last`` (0-based, inclusive, ascending order) of the tridiagonal ``T = (d, e)``, by
    bisection: O(k) each."""
    k = d.numel()
    w = torch.empty(k, dtype=_F64)
    m, nsplit = ctypes.c_int(0), ctypes.c_int(0)
    iblock, isplit, iwork = (torch.empty(size, dtype=torch.int32) for size in (k, k, 3 * k))
    work = torch.empty(4 * k, dtype=_F64)
    info = ctypes.c_int(0)
    _call(
        "dstebz", b"I", b"E", _i(k), _d(0.0), _d(0.0), _i(first + 1), _i(last + 1), _d(0.0),
        d, e, m, nsplit, w, iblock, isplit, work, iwork, info,
    )  # fmt: skip
    _check(info, "dstebz")
    return w[: m.value].clone()


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
    selector = b"I" if index is not None else b"V"
    m = ctypes.c_int(0)
    # dstemr overwrites d and e, and wants e with k entries (the last is workspace).
    d_work, e_work = d.clone(), torch.zeros(k, dtype=_F64)
    e_work[: k - 1] = e

    def call(z, nzc, isuppz, work, lwork, iwork, liwork, info):
        _call(
            "dstemr", b"V", selector, _i(k), d_work, e_work, _d(low), _d(high), _i(first + 1), _i(last + 1),
            m, w, z, _i(max(k, 1)), _i(nzc), isuppz, _i(1), work, _i(lwork), iwork, _i(liwork), info,
        )  # fmt: skip
        _check(info, "dstemr")

    w = torch.empty(k, dtype=_F64)
    isuppz = torch.empty(2 * max(k, 1), dtype=torch.int32)
    info = ctypes.c_int(0)
    # One query returns how many vectors the selection holds (in z[0]) and both workspace sizes; d, e untouched.
    count, work, iwork = (
        torch.zeros(1, dtype=_F64),
        torch.zeros(1, dtype=_F64),
        torch.zeros(1, dtype=torch.int32),
    )
    call(count, -1, isuppz, work, -1, iwork, -1, info)
    # Room for two more than counted: an eigenvalue on the boundary of (low, high] may be counted either way.
    nzc = min(k, int(count[0]) + (2 if value is not None else 0))
    lwork, liwork = int(work[0]), int(iwork[0])
    z = column_major(k, max(nzc, 1))
    work, iwork = torch.empty(lwork, dtype=_F64), torch.empty(liwork, dtype=torch.int32)
    call(z, nzc, isuppz, work, lwork, iwork, liwork, info)
    return w[: m.value].clone(), z[:, : m.value]


def ormtr_lower(reflectors: torch.Tensor, tau: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``Q @ z`` in place, ``Q`` from ``sytrd_lower`` (its overwritten matrix and ``tau``); ``z`` (k, m)
    column-major. Returns ``z``."""
    k = _check_column_major(reflectors)
    m = z.shape[1]
    if m == 0 or k < 2:
        return z
    if z.stride() != (1, k):
        raise ValueError(
            f"z must be column-major (k, m) with k={k}, got shape {tuple(z.shape)} strides {z.stride()}"
        )
    _call_with_workspace("dormtr", b"L", b"L", b"N", _i(k), _i(m), reflectors, _i(k), tau, z, _i(k))
    return z


def _call(name: str, *args) -> None:
    """Call routine ``name``. Tensors are passed as pointers to their data, ctypes scalars by reference (Fortran
    takes every argument by reference), characters as one-byte strings; the caller keeps them alive."""
    routine = routines()[name]
    routine(*(_pointer(a) for a in args))


def _call_with_workspace(name: str, *args) -> None:
    """Call a routine whose last three arguments are ``work, lwork, info``: first as a workspace query
    (``lwork = -1``: the optimal size comes back in ``work[0]``), then for real."""
    query, info = torch.empty(1, dtype=_F64), ctypes.c_int(0)
    _call(name, *args, query, _i(-1), info)
    _check(info, name)
    work = torch.empty(max(int(query[0]), 1), dtype=_F64)
    _call(name, *args, work, _i(work.numel()), info)
    _check(info, name)


def _pointer(arg):
    if isinstance(arg, torch.Tensor):
        return ctypes.c_void_p(arg.data_ptr())
    if isinstance(arg, (ctypes.c_int, ctypes.c_double)):
        return ctypes.byref(arg)
    return arg


_i, _d = ctypes.c_int, ctypes.c_double


def _check_column_major(g: torch.Tensor) -> int:
    k = g.shape[0]
    if g.dtype != _F64 or g.device.type != "cpu" or g.shape != (k, k) or (k > 1 and g.stride() != (1, k)):
        raise ValueError(
            f"expected a square float64 CPU matrix in column-major order, got {g.dtype} {tuple(g.shape)} on "
            f"{g.device} with strides {g.stride()}"
        )
    return k


def _check(info: ctypes.c_int, routine: str) -> None:
    if info.value != 0:
        raise RuntimeError(f"LAPACK {routine} failed (info={info.value}); the matrix may be non-finite")
