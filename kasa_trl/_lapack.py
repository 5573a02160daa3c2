"""Typed, checked bindings to the five double-precision BLAS/LAPACK routines the CPU eigensolver needs.

The routines are SciPy's (``scipy.linalg.cython_blas`` / ``cython_lapack`` export a C function pointer per routine,
in the BLAS/LAPACK SciPy was built with), called with ``ctypes`` for two reasons:

- ``ctypes`` releases the GIL for the length of each call, so several layers can be decomposed on several threads
  at once (``scipy.linalg.lapack``'s wrappers and ``scipy.linalg.eigh`` hold it for the whole call);
- only what a routine needs is allocated: SciPy's ``stemr`` wrapper allocates a ``k x k`` eigenvector matrix to
  return ``m`` vectors, its ``eigh_tridiagonal`` checks and copies its inputs on every call.

A wrong argument to a Fortran routine corrupts memory instead of raising. Two layers stand in its way:

- each routine is bound with its C prototype, checked against the one SciPy exports (``char *``, ``int *``,
  ``double *``; Fortran takes every argument by reference): ctypes refuses an argument of another C type, a missing
  or an extra one, with a ``TypeError``;
- each routine has a wrapper of the same name (``dsyrk``, ``dsytrd``, ``dstebz``, ``dstemr``, ``dormtr``) taking
  LAPACK's arguments by keyword, under LAPACK's names, and checking each one against the routine's documentation
  before the call: option letters, dimensions, and for each array its dtype and device (float64 or int32, CPU), its
  layout (contiguous vectors; column-major matrices whose column stride is the leading dimension passed) and its
  size (what the routine reads or writes). A wrong kind of argument raises ``TypeError``, a wrong value, size or
  layout ``ValueError``, naming the routine and the argument; a failure the routine reports (``info > 0``, such as
  a non-finite input) raises ``RuntimeError``.

The eigensolver (``_symeig``) allocates the arrays and calls these wrappers. A column-major ``(rows, cols)``
matrix is a torch tensor with strides ``(1, ld)``, ``ld >= rows``: ``storage.T`` of a row-major ``(cols, rows)``
tensor has ``ld = rows``.
"""

from __future__ import annotations

import ctypes
import functools
import operator
import re
import warnings
from typing import Any, SupportsIndex

import torch
from torch import Tensor

_F64, _I32 = torch.float64, torch.int32

# Each routine's prototype as SciPy's Cython API declares it (the .pxd of scipy.linalg.cython_blas / cython_lapack),
# with SciPy's ``d`` written ``double`` and its ``bint`` (a C int) written ``int``; the names are LAPACK's.
_PROTOTYPES = {
    "dsyrk": (
        "cython_blas",
        "char *uplo, char *trans, int *n, int *k, double *alpha, double *a, int *lda, double *beta, double *c, "
        "int *ldc",
    ),
    "dsytrd": (
        "cython_lapack",
        "char *uplo, int *n, double *a, int *lda, double *d, double *e, double *tau, double *work, int *lwork, "
        "int *info",
    ),
    "dstebz": (
        "cython_lapack",
        "char *range, char *order, int *n, double *vl, double *vu, int *il, int *iu, double *abstol, double *d, "
        "double *e, int *m, int *nsplit, double *w, int *iblock, int *isplit, double *work, int *iwork, int *info",
    ),
    "dstemr": (
        "cython_lapack",
        "char *jobz, char *range, int *n, double *d, double *e, double *vl, double *vu, int *il, int *iu, int *m, "
        "double *w, double *z, int *ldz, int *nzc, int *isuppz, int *tryrac, double *work, int *lwork, "
        "int *iwork, int *liwork, int *info",
    ),
    "dormtr": (
        "cython_lapack",
        "char *side, char *uplo, char *trans, int *m, int *n, double *a, int *lda, double *tau, double *c, "
        "int *ldc, double *work, int *lwork, int *info",
    ),
}
_C_TYPES: dict[str, type[ctypes.c_char_p] | type[ctypes._Pointer[Any]]] = {
    "char": ctypes.c_char_p,
    "int": ctypes.POINTER(ctypes.c_int),
    "double": ctypes.POINTER(ctypes.c_double),
}


class Binding:
    """One routine, called with its arguments in the prototype's order, each of its C type: ``bytes`` for
    ``char *``, a ``ctypes.c_int`` / ``c_double`` or a pointer of that type for ``int *`` / ``double *``."""

    def __init__(self, name: str, prototype: str, address: int) -> None:
        self.name = name
        self.parameters = parameters(prototype)
        c_types = (_C_TYPES[kind] for kind, _ in self.parameters)
        self._function = ctypes.CFUNCTYPE(None, *c_types)(address)

    def __call__(self, *args: object) -> None:
        if len(args) != len(self.parameters):  # ctypes would pass extra arguments on as C varargs
            raise TypeError(
                f"LAPACK {self.name} takes {len(self.parameters)} arguments "
                f"({', '.join(name for _, name in self.parameters)}), got {len(args)}"
            )
        try:
            self._function(*args)
        except ctypes.ArgumentError as error:
            # ctypes says which, by number: "argument 3: TypeError: expected LP_c_int instance instead of int".
            match = re.match(r"argument (\d+): (?:\w+: )?(.*)", str(error))
            if match is None:  # pragma: no cover - ctypes always numbers the argument
                raise TypeError(f"LAPACK {self.name}: {error}") from None
            kind, name = self.parameters[int(match[1]) - 1]
            raise TypeError(f"LAPACK {self.name} argument {match[1]} ({kind} *{name}): {match[2]}") from None


def parameters(prototype: str) -> tuple[tuple[str, str], ...]:
    """``"char *uplo, int *n"`` -> ``(("char", "uplo"), ("int", "n"))``."""
    pairs = (arg.replace("*", " ").split() for arg in prototype.split(","))
    return tuple((kind, name) for kind, name in pairs)


def exported_kinds(signature: str) -> tuple[str, ...]:
    """The argument types a Cython capsule's signature names, as ``_PROTOTYPES`` writes them:
    ``"void (char *, int *, __pyx_t_5scipy_6linalg_13cython_lapack_d *)"`` -> ``("char", "int", "double")``."""
    if not signature.startswith("void ("):
        return ()
    args = signature[len("void (") : signature.rindex(")")].split(",")
    return tuple("double" if arg.strip().endswith("_d *") else arg.strip().removesuffix(" *") for arg in args)


@functools.cache
def routines() -> dict[str, Binding] | None:
    """Name -> binding for each routine, or None where SciPy (or its Cython API) is missing, or exports a routine
    with another prototype than ``_PROTOTYPES``'s (then with a warning: the eigensolver falls back to torch)."""
    try:
        import scipy.linalg.cython_blas
        import scipy.linalg.cython_lapack
    except ImportError:
        return None
    # Own prototypes rather than setting argtypes on ctypes.pythonapi's functions, which other code shares.
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi)
    )
    found = {}
    for name, (module_name, prototype) in _PROTOTYPES.items():
        capsule = getattr(scipy.linalg, module_name).__pyx_capi__.get(name)
        if capsule is None:  # pragma: no cover - every SciPy since 1.0 has them
            return None
        signature = get_name(capsule)
        declared = tuple(kind for kind, _ in parameters(prototype))
        if exported_kinds(signature.decode()) != declared:
            warnings.warn(
                f"SciPy's {module_name}.{name} has the signature {signature.decode()!r}, not ({prototype}) as "
                "kasa_trl expects: the CPU decomposition uses torch.linalg.eigh instead (slower). Please report "
                "it with your SciPy version.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        found[name] = Binding(name, prototype, get_pointer(capsule, signature))
    return found


def available() -> bool:
    return routines() is not None


class _Call:
    """The arguments of one call to ``routine``, each checked as it is set; ``run()`` makes the call."""

    def __init__(self, routine: str) -> None:
        self.routine = routine
        self.args: dict[str, object] = {}
        self._tensors: list[torch.Tensor] = []  # alive until the call returns

    def _where(self, name: str) -> str:
        return f"LAPACK {self.routine} argument {name}"

    def option(self, name: str, value: object, allowed: bytes) -> bytes:
        if not isinstance(value, bytes) or len(value) != 1 or value not in allowed:
            letters = " or ".join(repr(bytes([letter])) for letter in allowed)
            raise (ValueError if isinstance(value, bytes) else TypeError)(
                f"{self._where(name)}: must be {letters}, got {value!r}"
            )
        self.args[name] = value
        return value

    def integer(self, name: str, value: object, low: int = -(2**31), high: int = 2**31 - 1) -> ctypes.c_int:
        """``value`` as a C int (a Python int; ``low <= value <= high``); read ``.value`` after the call for an
        output."""
        wrong_kind = TypeError(f"{self._where(name)}: must be an int, got {type(value).__name__}")
        if isinstance(value, bool) or not isinstance(value, SupportsIndex):
            raise wrong_kind
        try:
            number = operator.index(value)
        except TypeError:  # a float tensor has __index__, and refuses
            raise wrong_kind from None
        if not low <= number <= high:
            raise ValueError(f"{self._where(name)}: must be in [{low}, {high}], got {number}")
        self.args[name] = c_int = ctypes.c_int(number)
        return c_int

    def count(self, name: str, value: object) -> int:
        return self.integer(name, value, low=0).value

    def output(self, name: str) -> ctypes.c_int:
        return self.integer(name, 0)

    def real(self, name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{self._where(name)}: must be a float, got {type(value).__name__}")
        self.args[name] = ctypes.c_double(value)

    def vector(
        self, name: str, t: object, size: int, dtype: torch.dtype = _F64, *, at_least: bool = False
    ) -> None:
        """``t``: a contiguous (size,) tensor of ``dtype`` on CPU; ``at_least``: or longer (workspaces)."""
        t = self._tensor(name, t, dtype)
        if t.dim() != 1 or (t.numel() > 1 and t.stride(0) != 1):
            raise ValueError(
                f"{self._where(name)}: must be a contiguous vector, got shape {tuple(t.shape)} strides {t.stride()}"
            )
        if t.numel() < size or (not at_least and t.numel() != size):
            raise ValueError(
                f"{self._where(name)}: must have {'at least ' if at_least else ''}{size} entries, got {t.numel()}"
            )

    def matrix(self, name: str, t: object, rows: int, cols: int, ld: int) -> None:
        """``t``: a float64 CPU (rows, cols) matrix, column-major with leading dimension ``ld`` (strides (1, ld)), so
        that every element the routine addresses (``i + j * ld``, i < rows, j < cols) is one of ``t``'s."""
        t = self._tensor(name, t, _F64)
        if t.dim() != 2 or tuple(t.shape) != (rows, cols):
            raise ValueError(
                f"{self._where(name)}: must be a ({rows}, {cols}) matrix, got shape {tuple(t.shape)}"
            )
        if (rows > 1 and t.stride(0) != 1) or (cols > 1 and t.stride(1) != ld):
            raise ValueError(
                f"{self._where(name)}: must be column-major with leading dimension {ld} (strides (1, {ld})), got "
                f"strides {t.stride()}"
            )

    def workspace(
        self, name: str, t: object, size_name: str, size: object, minimum: int, dtype: torch.dtype = _F64
    ) -> None:
        """Workspace ``t`` of ``size`` entries (``size_name``), ``size >= minimum``; or ``size = -1``, a query:
        the routine only writes the optimal size in ``t[0]``."""
        size = self.integer(size_name, size).value
        if size != -1 and size < minimum:
            raise ValueError(f"{self._where(size_name)}: must be -1 (a query) or >= {minimum}, got {size}")
        self.vector(name, t, max(size, 1), dtype, at_least=True)

    def _tensor(self, name: str, t: object, dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self._where(name)}: must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{self._where(name)}: must be {dtype}, got {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"{self._where(name)}: must be on the CPU, got {t.device}")
        self._tensors.append(t)
        pointer = ctypes.POINTER(ctypes.c_double if dtype == _F64 else ctypes.c_int)
        self.args[name] = ctypes.cast(t.data_ptr(), pointer)
        return t

    def run(self) -> None:
        """Call the routine; raise if it reports an illegal argument (``info < 0``) or a failure (``info > 0``)."""
        bindings = routines()
        if bindings is None:
            raise RuntimeError(f"LAPACK {self.routine} needs SciPy's Cython LAPACK API: pip install scipy")
        binding = bindings[self.routine]
        info = self.output("info") if any(name == "info" for _, name in binding.parameters) else None
        missing = [name for _, name in binding.parameters if name not in self.args]
        if missing or len(self.args) != len(binding.parameters):  # a wrapper that forgot or misnamed one
            raise TypeError(
                f"LAPACK {self.routine}: arguments {missing} missing, or unknown ones in {list(self.args)}"
            )
        binding(*(self.args[name] for _, name in binding.parameters))
        if info is not None and info.value < 0:
            raise ValueError(
                f"LAPACK {self.routine} refused its argument {-info.value} "
                f"({binding.parameters[-info.value - 1][1]}); this is a bug in kasa_trl, please report it"
            )
        if info is not None and info.value > 0:
            raise RuntimeError(
                f"LAPACK {self.routine} failed (info={info.value}); the matrix may be non-finite"
            )


def dsyrk(
    *,
    uplo: bytes,
    trans: bytes,
    n: int,
    k: int,
    alpha: float,
    a: Tensor,
    lda: int,
    beta: float,
    c: Tensor,
    ldc: int,
) -> None:
    """BLAS: the ``uplo`` triangle of ``c`` (n, n) becomes that of ``alpha a a^T + beta c`` (``trans=b"N"``, ``a``
    (n, k)) or of ``alpha a^T a + beta c`` (``trans=b"T"``, ``a`` (k, n)); matrices column-major."""
    call = _Call("dsyrk")
    call.option("uplo", uplo, b"UL")
    transposed = call.option("trans", trans, b"NT") == b"T"
    n, k = call.count("n", n), call.count("k", k)
    rows, cols = (k, n) if transposed else (n, k)
    call.matrix("a", a, rows, cols, call.integer("lda", lda, low=max(1, rows)).value)
    call.matrix("c", c, n, n, call.integer("ldc", ldc, low=max(1, n)).value)
    call.real("alpha", alpha)
    call.real("beta", beta)
    call.run()


def dsytrd(
    *, uplo: bytes, n: int, a: Tensor, lda: int, d: Tensor, e: Tensor, tau: Tensor, work: Tensor, lwork: int
) -> None:
    """LAPACK: ``a = Q T Q^T`` for the symmetric ``a`` (n, n) column-major, whose ``uplo`` triangle is read and
    overwritten with ``Q``'s reflectors; ``T``'s diagonal ``d`` (n,) and off-diagonal ``e`` (n - 1,), the
    reflectors' scales ``tau`` (n - 1,). ``lwork = -1``: only writes the optimal ``lwork`` in ``work[0]``."""
    call = _Call("dsytrd")
    call.option("uplo", uplo, b"UL")
    n = call.count("n", n)
    call.matrix("a", a, n, n, call.integer("lda", lda, low=max(1, n)).value)
    call.vector("d", d, n)
    call.vector("e", e, max(n - 1, 0))
    call.vector("tau", tau, max(n - 1, 0))
    call.workspace("work", work, "lwork", lwork, minimum=1)
    call.run()


def dstebz(
    *, range: bytes, order: bytes, n: int, vl: float, vu: float, il: int, iu: int, abstol: float,
    d: Tensor, e: Tensor, w: Tensor, iblock: Tensor, isplit: Tensor, work: Tensor, iwork: Tensor,
) -> tuple[int, int]:  # fmt: skip
    """LAPACK, bisection: eigenvalues of the symmetric tridiagonal ``T`` with diagonal ``d`` (n,) and off-diagonal
    ``e`` (n - 1,): all (``range=b"A"``), those in ``(vl, vu]`` (``b"V"``) or the ``il``-th to ``iu``-th, 1-based
    (``b"I"``); in ``w[:m]`` (n,), by block (``order=b"B"``) or ascending (``b"E"``); ``iblock``, ``isplit`` (n,)
    int32 and workspaces ``work`` (4 n,), ``iwork`` (3 n,) int32. Returns ``(m, nsplit)``."""
    call = _Call("dstebz")
    by_index = call.option("range", range, b"AVI") == b"I"
    call.option("order", order, b"BE")
    n = call.count("n", n)
    _select(call, n, vl, vu, il, iu, by_index)
    call.real("abstol", abstol)
    call.vector("d", d, n)
    call.vector("e", e, max(n - 1, 0))
    m, nsplit = call.output("m"), call.output("nsplit")
    call.vector("w", w, n)
    call.vector("iblock", iblock, n, _I32)
    call.vector("isplit", isplit, n, _I32)
    call.vector("work", work, 4 * n, at_least=True)
    call.vector("iwork", iwork, 3 * n, _I32, at_least=True)
    call.run()
    return m.value, nsplit.value


def dstemr(
    *, jobz: bytes, range: bytes, n: int, d: Tensor, e: Tensor, vl: float, vu: float, il: int, iu: int,
    w: Tensor, z: Tensor, ldz: int, nzc: int, isuppz: Tensor, tryrac: int, work: Tensor, lwork: int,
    iwork: Tensor, liwork: int,
) -> tuple[int, int]:  # fmt: skip
    """LAPACK, MRRR: eigenvalues ``w[:m]`` (n,) ascending and eigenvectors ``z[:, :m]`` (n, nzc) column-major of the
    symmetric tridiagonal ``T`` with diagonal ``d`` (n,) and off-diagonal ``e[:n - 1]`` (``e`` (n,): the last entry
    is workspace; both are overwritten), selected as ``dstebz``'s (``range``); ``jobz=b"V"`` (vectors) only.
    ``nzc = -1``: only counts the eigenvalues selected, in ``z[0]`` (``z`` a vector); ``lwork = -1`` or
    ``liwork = -1``: only writes the optimal sizes in ``work[0]``, ``iwork[0]``. ``isuppz`` (2 n,) int32.
    Returns ``(m, tryrac)``."""
    call = _Call("dstemr")
    call.option("jobz", jobz, b"V")
    by_index = call.option("range", range, b"AVI") == b"I"
    n = call.count("n", n)
    call.vector("d", d, n)
    call.vector("e", e, n)
    _select(call, n, vl, vu, il, iu, by_index)
    m = call.output("m")
    call.vector("w", w, n)
    ldz = call.integer("ldz", ldz, low=max(1, n)).value
    nzc = call.integer("nzc", nzc, low=-1).value
    if nzc == -1:
        call.vector("z", z, 1, at_least=True)
    else:
        call.matrix("z", z, n, max(nzc, 1), ldz)
    call.vector("isuppz", isuppz, 2 * max(n, 1), _I32, at_least=True)
    tryrac_in_out = call.integer("tryrac", tryrac, low=0, high=1)
    call.workspace("work", work, "lwork", lwork, minimum=max(1, 18 * n))
    call.workspace("iwork", iwork, "liwork", liwork, minimum=max(1, 10 * n), dtype=_I32)
    call.run()
    return m.value, tryrac_in_out.value


def dormtr(
    *, side: bytes, uplo: bytes, trans: bytes, m: int, n: int, a: Tensor, lda: int, tau: Tensor, c: Tensor,
    ldc: int, work: Tensor, lwork: int,
) -> None:  # fmt: skip
    """LAPACK: ``c`` (m, n) column-major becomes ``Q c`` or ``Q^T c`` (``side=b"L"``, ``trans=b"N"`` or ``b"T"``),
    or ``c Q`` or ``c Q^T`` (``side=b"R"``), for ``Q`` (nq, nq) as ``dsytrd`` (``uplo``) left it: reflectors in ``a``
    (nq, nq) column-major, scales ``tau`` (nq - 1,); ``nq`` is ``m`` on the left, ``n`` on the right.
    ``lwork = -1``: only writes the optimal ``lwork`` in ``work[0]``."""
    call = _Call("dormtr")
    left = call.option("side", side, b"LR") == b"L"
    call.option("uplo", uplo, b"UL")
    call.option("trans", trans, b"NT")
    m, n = call.count("m", m), call.count("n", n)
    nq = m if left else n
    call.matrix("a", a, nq, nq, call.integer("lda", lda, low=max(1, nq)).value)
    call.vector("tau", tau, max(nq - 1, 0))
    call.matrix("c", c, m, n, call.integer("ldc", ldc, low=max(1, m)).value)
    call.workspace("work", work, "lwork", lwork, minimum=max(1, n if left else m))
    call.run()


def _select(call: _Call, n: int, vl: object, vu: object, il: object, iu: object, by_index: bool) -> None:
    """dstebz's and dstemr's selection: ``vl``, ``vu`` (used by value); ``1 <= il <= iu <= n`` by index."""
    call.real("vl", vl)
    call.real("vu", vu)
    if by_index:
        il = call.integer("il", il, low=1, high=max(n, 1)).value
        call.integer("iu", iu, low=min(il, n), high=n)
    else:
        call.integer("il", il)
        call.integer("iu", iu)
