"""kasa_trl._lapack: the bindings are SciPy's own prototypes, every wrapper refuses a wrong argument (kind, dtype,
size, leading dimension, layout, order) with a TypeError or ValueError before LAPACK sees it and leaves its arrays
untouched, LAPACK's failures raise, and the calls release the GIL. What the routines compute is tested through
``_symeig``, which calls them."""

import ctypes
import os
import threading
import time

import pytest
import torch

from kasa_trl import _lapack

pytestmark = pytest.mark.skipif(
    not _lapack.available(), reason="SciPy's Cython BLAS/LAPACK API is not available"
)

F64, I32 = torch.float64, torch.int32
K = 5


def _column_major(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(cols, rows, generator=torch.Generator().manual_seed(seed), dtype=F64).T


def _symmetric(k: int, seed: int = 0) -> torch.Tensor:
    b = torch.randn(k, k + 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return torch.empty(k, k, dtype=F64).T.copy_(b @ b.T)  # column-major


def _valid_calls() -> dict[str, dict]:
    """A valid call of each wrapper, for K = 5."""
    return {
        "dsyrk": dict(
            uplo=b"L", trans=b"N", n=K, k=3, alpha=1.0, a=_column_major(K, 3), lda=K, beta=0.0,
            c=_column_major(K, K, 1), ldc=K,
        ),
        "dsytrd": dict(
            uplo=b"L", n=K, a=_symmetric(K), lda=K, d=torch.zeros(K, dtype=F64), e=torch.zeros(K - 1, dtype=F64),
            tau=torch.zeros(K - 1, dtype=F64), work=torch.zeros(64, dtype=F64), lwork=64,
        ),
        "dstebz": dict(
            range=b"I", order=b"E", n=K, vl=0.0, vu=0.0, il=1, iu=2, abstol=0.0, d=torch.arange(1.0, K + 1, dtype=F64),
            e=torch.ones(K - 1, dtype=F64), w=torch.zeros(K, dtype=F64), iblock=torch.zeros(K, dtype=I32),
            isplit=torch.zeros(K, dtype=I32), work=torch.zeros(4 * K, dtype=F64), iwork=torch.zeros(3 * K, dtype=I32),
        ),
        "dstemr": dict(
            jobz=b"V", range=b"I", n=K, d=torch.arange(1.0, K + 1, dtype=F64), e=torch.ones(K, dtype=F64), vl=0.0,
            vu=0.0, il=1, iu=2, w=torch.zeros(K, dtype=F64), z=_column_major(K, 2), ldz=K, nzc=2,
            isuppz=torch.zeros(2 * K, dtype=I32), tryrac=1, work=torch.zeros(18 * K, dtype=F64), lwork=18 * K,
            iwork=torch.zeros(10 * K, dtype=I32), liwork=10 * K,
        ),
        "dormtr": dict(
            side=b"L", uplo=b"L", trans=b"N", m=K, n=2, a=_symmetric(K), lda=K, tau=torch.zeros(K - 1, dtype=F64),
            c=_column_major(K, 2), ldc=K, work=torch.zeros(64, dtype=F64), lwork=64,
        ),
    }  # fmt: skip


@pytest.mark.parametrize("routine", sorted(_lapack._PROTOTYPES))
def test_the_valid_calls_run(routine):
    getattr(_lapack, routine)(**_valid_calls()[routine])


def _swap(call: dict, x: str, y: str) -> dict:
    return {x: call[y], y: call[x]}


def _strided(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(2 * t.numel(), dtype=t.dtype)[::2]


# (routine, the arguments changed, exception, message)
WRONG = [
    # wrong dtype
    ("dsytrd", lambda c: {"a": c["a"].float()}, TypeError, "dsytrd argument a: must be torch.float64, got torch.float32"),
    ("dstebz", lambda c: {"iblock": c["iblock"].double()}, TypeError, "argument iblock: must be torch.int32"),
    ("dstemr", lambda c: {"iwork": c["iwork"].long()}, TypeError, "argument iwork: must be torch.int32, got torch.int64"),
    ("dsyrk", lambda c: {"c": c["c"].numpy()}, TypeError, "argument c: must be a torch.Tensor, got ndarray"),
    ("dsytrd", lambda c: {"n": 5.0}, TypeError, "argument n: must be an int, got float"),
    ("dsytrd", lambda c: {"lwork": True}, TypeError, "argument lwork: must be an int, got bool"),
    ("dsyrk", lambda c: {"alpha": "1"}, TypeError, "argument alpha: must be a float, got str"),
    ("dsytrd", lambda c: {"uplo": "L"}, TypeError, r"argument uplo: must be b'U' or b'L', got 'L'"),
    ("dsytrd", lambda c: {"uplo": b"X"}, ValueError, r"argument uplo: must be b'U' or b'L', got b'X'"),
    ("dstemr", lambda c: {"jobz": b"N"}, ValueError, r"argument jobz: must be b'V'"),
    ("dsytrd", lambda c: {"a": c["a"].to("meta")}, ValueError, "argument a: must be on the CPU, got meta"),
    # wrong shape, size or leading dimension
    ("dsytrd", lambda c: {"d": torch.zeros(K - 1, dtype=F64)}, ValueError, "argument d: must have 5 entries, got 4"),
    ("dsytrd", lambda c: {"a": _symmetric(K + 1)}, ValueError, r"argument a: must be a \(5, 5\) matrix, got shape \(6, 6\)"),
    ("dsytrd", lambda c: {"n": K + 1}, ValueError, r"argument lda: must be in \[6, "),
    ("dsytrd", lambda c: {"lda": K + 1}, ValueError, r"argument a: must be column-major with leading dimension 6 \(strides \(1, 6\)\), got strides \(1, 5\)"),
    ("dsytrd", lambda c: {"lda": 2**31}, ValueError, "argument lda: must be in"),
    ("dsytrd", lambda c: {"lwork": 65}, ValueError, "argument work: must have at least 65 entries, got 64"),
    ("dsytrd", lambda c: {"lwork": 0}, ValueError, r"argument lwork: must be -1 \(a query\) or >= 1, got 0"),
    ("dstemr", lambda c: {"lwork": 18 * K - 1}, ValueError, "argument lwork: must be -1 .* or >= 90"),
    ("dstemr", lambda c: {"z": _column_major(K, 1)}, ValueError, r"argument z: must be a \(5, 2\) matrix"),
    ("dstemr", lambda c: {"isuppz": torch.zeros(K, dtype=I32)}, ValueError, "argument isuppz: must have at least 10"),
    ("dstebz", lambda c: {"il": 0}, ValueError, r"argument il: must be in \[1, 5\], got 0"),
    ("dstebz", lambda c: {"iu": K + 1}, ValueError, r"argument iu: must be in \[1, 5\], got 6"),
    ("dstebz", lambda c: {"work": torch.zeros(4 * K - 1, dtype=F64)}, ValueError, "argument work: must have at least 20"),
    ("dormtr", lambda c: {"c": _column_major(K - 1, 2)}, ValueError, r"argument c: must be a \(5, 2\) matrix"),
    ("dormtr", lambda c: {"ldc": K - 1}, ValueError, r"argument ldc: must be in \[5, "),
    # not contiguous, not column-major
    ("dsytrd", lambda c: {"d": _strided(c["d"])}, ValueError, r"argument d: must be a contiguous vector, got shape \(5,\) strides \(2,\)"),
    ("dsytrd", lambda c: {"a": c["a"].T.contiguous()}, ValueError, "argument a: must be column-major"),
    ("dsyrk", lambda c: {"a": c["a"].contiguous()}, ValueError, "argument a: must be column-major"),
    ("dormtr", lambda c: {"c": _column_major(2 * K, 2)[::2]}, ValueError, "argument c: must be column-major"),
    ("dstebz", lambda c: {"iwork": torch.zeros(3 * K, 2, dtype=I32)}, ValueError, "argument iwork: must be a contiguous vector"),
    # arguments in the wrong order: swapped between keywords
    ("dstebz", lambda c: _swap(c, "d", "e"), ValueError, "argument d: must have 5 entries, got 4"),
    ("dormtr", lambda c: _swap(c, "a", "c"), ValueError, r"argument a: must be a \(5, 5\) matrix, got shape \(5, 2\)"),
    ("dormtr", lambda c: _swap(c, "m", "n"), ValueError, r"argument a: must be a \(2, 2\) matrix"),
    ("dsyrk", lambda c: _swap(c, "n", "k"), ValueError, r"argument a: must be a \(3, 5\) matrix"),
    ("dsytrd", lambda c: _swap(c, "work", "tau"), ValueError, "argument tau: must have 4 entries, got 64"),
    ("dstemr", lambda c: _swap(c, "work", "iwork"), TypeError, "argument work: must be torch.float64, got torch.int32"),
    ("dstemr", lambda c: _swap(c, "lwork", "liwork"), ValueError, "argument lwork: must be -1 .* or >= 90, got 50"),
]  # fmt: skip


@pytest.mark.parametrize(("routine", "change", "error", "message"), WRONG)
def test_a_wrong_argument_is_refused_before_lapack_sees_it(routine, change, error, message):
    call = _valid_calls()[routine]
    call.update(change(call))
    before = {
        name: t.clone() for name, t in call.items() if isinstance(t, torch.Tensor) and t.device.type == "cpu"
    }
    with pytest.raises(error, match=message):
        getattr(_lapack, routine)(**call)
    for name, t in before.items():  # nothing was written
        assert torch.equal(call[name], t), name


def test_wrappers_take_lapacks_arguments_by_keyword_only():
    call = _valid_calls()["dsytrd"]
    with pytest.raises(TypeError, match="positional"):
        _lapack.dsytrd(*call.values())
    del call["tau"]
    with pytest.raises(TypeError, match="tau"):
        _lapack.dsytrd(**call)


def test_the_bindings_are_scipys_prototypes():
    """Each prototype is SciPy's declaration, names and order included (the wrappers' keywords are LAPACK's)."""
    import scipy.linalg

    for name, (module, prototype) in _lapack._PROTOTYPES.items():
        pxd = os.path.join(os.path.dirname(scipy.linalg.__file__), f"{module}.pxd")
        if not os.path.exists(pxd):  # pragma: no cover - SciPy ships its .pxd files
            pytest.skip(f"{pxd} is not installed")
        with open(pxd) as declarations:
            declared = next(line for line in declarations if line.startswith(f"cdef void {name}("))
        arguments = declared[declared.index("(") + 1 : declared.index(")")]
        assert prototype == arguments.replace("d *", "double *").replace("bint *", "int *"), name


def test_a_routine_scipy_exports_with_another_prototype_is_not_bound(monkeypatch):
    """If SciPy ever exports a routine with other argument types, nothing is bound (the eigensolver falls back to
    torch) and a warning says so."""
    module, prototype = _lapack._PROTOTYPES["dsytrd"]
    monkeypatch.setitem(_lapack._PROTOTYPES, "dsytrd", (module, prototype.replace("int *n", "double *n")))
    _lapack.routines.cache_clear()
    try:
        with pytest.warns(
            RuntimeWarning,
            match=r"SciPy's cython_lapack.dsytrd has the signature .* not \(char \*uplo, double \*n",
        ):
            assert _lapack.routines() is None
    finally:
        monkeypatch.undo()
        _lapack.routines.cache_clear()
    assert _lapack.available()


def test_a_binding_refuses_arguments_of_another_c_type():
    """Below the wrappers, the ctypes binding itself refuses a Python int, a pointer of the wrong type, a missing or
    an extra argument, or arguments out of order, with a TypeError naming the argument."""
    dsytrd = _lapack.routines()["dsytrd"]
    k = ctypes.c_int(K)
    a = _symmetric(K)
    d, e, tau, work = (torch.zeros(size, dtype=F64) for size in (K, K - 1, K - 1, 64))
    before = a.clone()

    def doubles(t):
        return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_double))

    right = [
        b"L",
        k,
        doubles(a),
        k,
        doubles(d),
        doubles(e),
        doubles(tau),
        doubles(work),
        ctypes.c_int(64),
        ctypes.c_int(),
    ]
    with pytest.raises(
        TypeError,
        match=r"LAPACK dsytrd takes 10 arguments \(uplo, n, a, lda, d, e, tau, work, lwork, info\), got 9",
    ):
        dsytrd(*right[:-1])
    with pytest.raises(TypeError, match="takes 10 arguments"):
        dsytrd(*right, ctypes.c_int())
    with pytest.raises(
        TypeError, match=r"LAPACK dsytrd argument 2 \(int \*n\): expected LP_c_int instance instead of int"
    ):
        dsytrd(*right[:1], K, *right[2:])
    with pytest.raises(
        TypeError, match=r"argument 3 \(double \*a\): expected LP_c_double instance instead of c_void_p"
    ):
        dsytrd(*right[:2], ctypes.c_void_p(a.data_ptr()), *right[3:])
    with pytest.raises(TypeError, match=r"argument 3 \(double \*a\)"):  # a and lda swapped
        dsytrd(right[0], right[1], right[3], right[2], *right[4:])
    with pytest.raises(TypeError, match=r"argument 1 \(char \*uplo\)"):  # uplo and n swapped
        dsytrd(right[1], right[0], *right[2:])
    assert torch.equal(a, before)
    dsytrd(*right)  # and the right call runs
    assert right[-1].value == 0


def test_lapack_failures_raise():
    """LAPACK reports a failure through info (here: a NaN makes dstebz fail); it is not ignored."""
    call = _valid_calls()["dstebz"]
    call["d"][1] = float("nan")
    with pytest.raises(RuntimeError, match=r"LAPACK dstebz failed \(info=4\)"):
        _lapack.dstebz(**call)


def test_without_scipy_a_call_says_what_to_install(monkeypatch):
    monkeypatch.setattr(_lapack, "routines", lambda: None)
    with pytest.raises(RuntimeError, match="pip install scipy"):
        _lapack.dsytrd(**_valid_calls()["dsytrd"])


def test_calls_release_the_gil():
    """While one thread is inside a long LAPACK call, another keeps running Python.

    No timing threshold: the main thread counts consecutive ticks that start and end while the worker is inside
    the same call. With the GIL held for the call, the main thread runs no Python until the call returns; it may
    then see the worker's flag still set once (the worker can yield the GIL before clearing it), never several
    ticks in a row."""
    k = 900
    g = _symmetric(k)
    state = {"call": 0, "inside": False}
    done = threading.Event()

    def tridiagonalize():
        for _ in range(3):
            a = g.clone()  # column-major (clone keeps the strides)
            d, e, tau, work = (torch.empty(size, dtype=F64) for size in (k, k - 1, k - 1, 64 * k))
            state["call"] += 1
            state["inside"] = True
            _lapack.dsytrd(uplo=b"L", n=k, a=a, lda=k, d=d, e=e, tau=tau, work=work, lwork=64 * k)
            state["inside"] = False
        done.set()

    worker = threading.Thread(target=tridiagonalize)
    worker.start()
    run, longest_run = 0, 0
    while not done.is_set():
        before = (state["call"], state["inside"])
        time.sleep(0.001)
        run = run + 1 if before[1] and (state["call"], state["inside"]) == before else 0
        longest_run = max(longest_run, run)
    worker.join()
    assert longest_run >= 3, longest_run
