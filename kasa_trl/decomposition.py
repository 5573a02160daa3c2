"""Finding what KaSA's knowledge-based SVD truncation removes (arXiv 2412.06071; docs/design.md section 1).

For a frozen weight ``W`` (out, in) with SVD ``U S V^T`` and ``k = min(out, in)``, KaSA removes the ``n`` smallest
singular triplets: ``R = U_n S_n V_n^T`` and ``W_trunc = W - R`` (the paper's ``W_world``). Everything here is a
pure function of tensors, computed in float64 and returned in at least float32; ``factors`` does the arithmetic on
the factors found here (``truncate``, the export to LoRA).

The ``n`` smallest triplets need no full SVD. ``gram_eigh`` takes the eigenproblem of the smaller Gram matrix
``A A^T`` (``A`` = ``W`` or ``W^T``) and gets ``R`` as a projection, ``R = Q_n (Q_n^T A)``: nothing is divided by
singular values, so it stays exact when they are ~0. Only what is used is computed (``_symeig``: one
tridiagonalization, three eigenvalues by bisection, ``n`` eigenvectors; 2x cheaper than ``torch.linalg.eigh`` on
CPU). But the Gram squares the condition number: rounding (``eps * lambda_max``) turns the removed directions
by ``eps * lambda_max / (lambda_{n+1} - lambda_n)``, 1e-6..1e-4 relative error in ``R`` on a cond-1e6 long tail.

``gram_deflated`` (``auto``) computes that predicted error from ``lambda_max``, ``lambda_n`` and
``lambda_{n+1}``. When it is above ``_TARGET_ERROR`` it deflates: it keeps the eigenvectors with eigenvalue below
a bound chosen so that the dropped dominant directions cannot leak into ``R`` by more than the target, projects
``A`` onto them and solves the (far better conditioned) Gram of that projection again. Random-init and
trained-like (flat bulk, short tail) weights need one level, which is exactly ``gram_eigh``; a cond-1e4 geometric
tail needs a second level over ~10% of the directions, cond 1e6 a third. Where no level can meet the target (the
removed singular values below ~5e-8 of the largest: cond ~1e8 and beyond, a rank-deficient weight; or values tied
at the cut), it decomposes the last projection with a float64 SVD instead (Householder QR, then the SVD of the
small square factor).

The guarantee (``tests/test_decomposition_limits.py``): for any finite weight, ``auto`` and ``gram_deflated``
return ``R`` with ``||R - R_svd||_F <= 1e-8 ||R_svd||_F`` plus the float64 SVD's own uncertainty
(``eps s_1 (1 + s_{k-n} / (s_{k-n} - s_{k-n+1}))`` per removed triplet, which only matters where ``R`` is ~eps of
``W`` or the cut has almost no gap), ``R_svd`` from ``torch.linalg.svd`` of the float64 weight. Where the cut has no
gap ``R`` is not unique, and the same bounds hold for the spectra of ``R`` and ``W - R``. ``gram_eigh`` keeps its
Gram's vectors whatever their predicted error (its bound, ``_predicted_error``) and warns above 1e-3. The
checks cost one pass over the weight (its largest entry, for the scale below); the fallback ~5x the Gram path
(1024x2816, one thread: 0.77 s against 0.14 s). Entries far from 1 (1e150, 1e-160, subnormals) are scaled by a
power of two first, exactly: the Gram squares them. Speed and accuracy per method and spectrum are measured by
``examples/benchmarks/decomposition_methods.py``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.profiler import record_function

from . import _symeig
from .factors import max_abs_exponent, times_power_of_two

DECOMPOSITION_METHODS = ("auto", "svd", "gram_eigh", "gram_deflated")

_AUTO_METHOD = "gram_deflated"
# What auto (gram_deflated) promises: ||R - R_svd||_F <= _TARGET_ERROR ||R||_F as predicted from the eigenvalues at
# the cut (``_predicted_error``, which overestimates the measured error 10-40x); a float64 SVD where it cannot.
_TARGET_ERROR = 1e-8
# gram_eigh keeps its Gram's vectors whatever their predicted error; beyond this one it warns.
_GRAM_EIGH_WARNING = 1e-3
# Largest entries outside this range are scaled by a power of two first: the Gram squares them.
_SAFE_RANGE = (2.0**-300, 2.0**300)
_DEFLATION_MARGIN = 4.0
_NON_FINITE = "weight has non-finite entries (nan or inf); check the checkpoint before truncating it"
# minor_components_many's default cap on threads (a memory cap applies too).
_MAX_WORKERS = 8
# Each level divides lambda_max by >= _DEFLATION_MARGIN (or ends), and float64 squares span 1e16: a safety cap.
_MAX_LEVELS = 8


def minor_components(weight: torch.Tensor, n: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` smallest singular triplets of ``weight``: the part KaSA's truncation removes.

    Args:
        weight (torch.Tensor): (out, in), any floating dtype, finite.
        n (int): how many triplets, ``0 <= n <= min(out, in)``.
        method (str): one of ``DECOMPOSITION_METHODS``; ``"auto"`` is ``"gram_deflated"`` (see the module docstring).

    Returns:
        (left (out, n), right (n, in)) with ``left @ right == U_n S_n V_n^T``: ``left = U_n S_n`` (orthogonal
        columns, singular values descending), ``right = V_n^T`` (orthonormal rows). Computed in float64, returned in
        ``torch.promote_types(weight.dtype, torch.float32)``. Accurate to the bound in the module docstring.

    Raises:
        ValueError: a bad argument, a non-finite entry, or removed singular values beyond the returned dtype's range.

    Warns:
        RuntimeWarning: ``gram_eigh`` only, where its predicted error of R exceeds 1e-3 (the other methods are
        accurate).
    """
    _check_minor_args(weight, n, method)
    return _minor_components(weight, n, method, cpu_threads=torch.get_num_threads())


def minor_components_many(
    weights: Sequence[torch.Tensor], ns: Sequence[int], method: str = "auto", *, workers: int | None = None
) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """``minor_components(weight, n, method)`` of each pair, in order, decomposing up to ``workers`` at once.

    On CPU (the LAPACK backend) the weights are spread over ``workers`` threads, each with ``1 / workers`` of the
    caller's torch thread budget; the BLAS/LAPACK calls release the GIL. Independent decompositions on separate
    cores scale better than one decomposition on several: the tridiagonalization is half memory-bound, the
    tridiagonal eigenvector step sequential. A weight's factors are those ``minor_components`` gives with that
    thread budget (bit for bit with 1 thread per worker). Every argument is checked before anything runs.

    Args:
        weights (Sequence[torch.Tensor]): each (out, in), as for ``minor_components``.
        ns (Sequence[int]): how many triplets to remove from each.
        method (str): one of ``DECOMPOSITION_METHODS``.
        workers (int | None): threads; by default ``min(torch.get_num_threads(), len(weights), 8)`` on CPU, and
            no more than half the available memory holds (each needs a float64 copy of its weight and its Gram
            matrix, ``8 (out in + k^2)`` bytes, ~1.2x that at its peak); 1 elsewhere (CUDA decompositions queue on
            one device anyway).

    Yields:
        (left (out, n), right (n, in)) per weight, as ``minor_components`` returns them.
    """
    if len(weights) != len(ns):
        raise ValueError(f"got {len(weights)} weights but {len(ns)} values of n")
    for weight, n in zip(weights, ns, strict=True):
        _check_minor_args(weight, n, method)
    budget = torch.get_num_threads()
    if workers is None:
        workers = _default_workers(weights, budget)
    elif workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if workers <= 1:
        for weight, n in zip(weights, ns, strict=True):
            yield _minor_components(weight, n, method, cpu_threads=budget)
        return
    with _symeig.cpu_threads("lapack", blas_threads=max(1, budget // workers)):
        pool = ThreadPoolExecutor(workers, thread_name_prefix="kasa-decompose")
        try:
            pending: deque[Future[tuple[torch.Tensor, torch.Tensor]]] = deque()
            for weight, n in zip(weights, ns, strict=True):
                pending.append(pool.submit(_worker_minor_components, weight, n, method))
                if len(pending) > workers:  # at most `workers` in flight: each holds float64 copies
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _default_workers(weights: Sequence[torch.Tensor], budget: int) -> int:
    if not weights or not all(_symeig.backend_for(w) == "lapack" for w in weights):
        return 1
    workers = min(budget, len(weights), _MAX_WORKERS)
    available = _available_memory()
    if available is not None:
        largest = max(8 * (w.numel() + min(w.shape) ** 2) * 1.25 for w in weights)  # bytes at one's peak
        workers = min(workers, max(1, int(available / 2 // largest)))
    return workers


def _available_memory() -> int | None:
    """Bytes the kernel reports available (Linux ``MemAvailable``), or None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _worker_minor_components(weight: torch.Tensor, n: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    # A new thread starts from the libraries' default thread counts (torch keeps OpenMP's and MKL's per thread):
    # set them, or MKL would run each worker's products on every core.
    torch.set_num_threads(1)
    return _minor_components(weight, n, method, cpu_threads=None)


def _minor_components(
    weight: torch.Tensor, n: int, method: str, cpu_threads: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``minor_components`` without the argument checks. ``cpu_threads``: the thread budget of the LAPACK path, or
    None where the caller has set the threads already (``minor_components_many``'s workers)."""
    # A profiler scope per weight (what a benchmark times without patching the library).
    with record_function("kasa_trl.decompose"):
        dtype = torch.promote_types(weight.dtype, torch.float32)
        out_features, in_features = weight.shape
        if n == 0:
            empty = weight.new_zeros
            return empty(out_features, 0, dtype=dtype), empty(0, in_features, dtype=dtype)
        w = weight.detach().to(torch.float64)
        exponent = _scale_exponent(w)
        if exponent:  # a power of two: exact, and undone exactly on the singular values below
            w = times_power_of_two(w, -exponent)
        transposed = out_features > in_features
        a = w.T if transposed else w  # (m, p), m <= p: the Gram A A^T is the smaller one
        method = _AUTO_METHOD if method == "auto" else method
        if method == "svd":
            u, s, vh = _minor_svd(a, n)
        else:
            u, s, vh, error = _minor_gram(a, n, 1 if method == "gram_eigh" else _MAX_LEVELS, cpu_threads)
            if error > _GRAM_EIGH_WARNING:  # only gram_eigh returns such a result
                _warn_gram_eigh_inexact(weight.shape, n, error)
        if exponent:
            s = times_power_of_two(s, exponent)
        if transposed:  # R = (u s vh)^T = vh^T s u^T
            u, vh = vh.T, u.T
        left = (u * s).to(dtype)
        if not torch.isfinite(left).all():
            raise ValueError(
                f"the removed singular values of this {out_features}x{in_features} weight reach {float(s[0]):.3g}, "
                f"beyond the range of {dtype} ({torch.finfo(dtype).max:.3g}); scale the weight down (or keep it in "
                "float64) before truncating it"
            )
        return left, vh.to(dtype)


def _scale_exponent(w: torch.Tensor) -> int:
    """``e`` such that ``w * 2**-e`` has its largest entry in [0.5, 1), or 0 where ``w``'s range is safe as it is.

    The Gram squares the entries: beyond ~2^300 (or below 2^-300) it would overflow (underflow) on long rows.
    Raises ValueError on a non-finite entry (one pass over ``w``; the max propagates NaN).
    """
    largest, exponent = max_abs_exponent(w)
    if not math.isfinite(largest):
        raise ValueError(_NON_FINITE)
    if largest == 0.0 or _SAFE_RANGE[0] <= largest <= _SAFE_RANGE[1]:
        return 0
    return exponent


def _check_minor_args(weight: torch.Tensor, n: int, method: str) -> None:
    if method not in DECOMPOSITION_METHODS:
        raise ValueError(f"method={method!r} is not one of {list(DECOMPOSITION_METHODS)}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    k = min(weight.shape)
    if not 0 <= n <= k:
        raise ValueError(
            f"n={n} must be in [0, min(out, in)={k}] for a weight of shape {tuple(weight.shape)}"
        )
    # Otherwise the decomposition finds a non-finite entry in its pass for the scale (_scale_exponent).
    if n == 0 and not torch.isfinite(weight).all():
        raise ValueError(_NON_FINITE)


def _minor_svd(a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The n smallest triplets of ``a`` (m, p), m <= p, from a float64 SVD: (u (m, n), s (n,), vh (n, p)).

    A wide ``a`` is reduced by Householder QR first, ``a^T = Q R``, so that ``a = R^T Q^T``: the SVD of the m x m
    ``R^T = u s w^T`` gives ``a = u s (Q w)^T``, and only the n vectors needed are carried back to p dimensions
    (single-threaded CPU, 1024x2816: 0.76 s, against 1.03 s for ``torch.linalg.svd`` of ``a^T`` and 2.7 s of ``a``).
    """
    m, p = a.shape
    if 2 * p < 3 * m:  # nearly square: the QR would not shrink the problem
        v, s, uh = torch.linalg.svd(a.T, full_matrices=False)  # a^T = v s uh, (p, m), (m,), (m, m)
        return uh[m - n :].T, s[m - n :], v[:, m - n :].T
    reflectors, tau = torch.geqrf(a.T)  # (p, m): R in the upper triangle, Q as Householder reflectors below
    u, s, wh = torch.linalg.svd(reflectors[:m].triu().T)  # R^T = u s wh, each (m, m)
    w = a.new_zeros(p, n)
    w[:m] = wh[m - n :].T
    return u[:, m - n :], s[m - n :], torch.ormqr(reflectors, tau, w).T  # (Q w)^T


def _minor_gram(
    a: torch.Tensor, n: int, max_levels: int, cpu_threads: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The n smallest triplets of ``a`` (m, p), m <= p, from Gram eigenproblems, deflating up to ``max_levels`` times
    (``max_levels == 1``: ``gram_eigh``, which never falls back).

    ``basis`` (m, j) spans the directions still in play; ``b = basis^T a`` (j, p) is ``a`` seen in them. Each level
    drops the dominant directions whose rounding would swamp the small ones, so the next Gram is better conditioned.
    Where no level can meet ``_TARGET_ERROR``, the last ``b`` is decomposed by a float64 SVD instead (outside the
    LAPACK thread setting: torch's SVD uses torch's threads).

    Returns:
        (u (m, n), s (n,), vh (n, p), error): ``error`` is the predicted relative error of ``R`` where it comes
        from a Gram's eigenvectors (see ``_predicted_error``; for gram_eigh also bounded by that of the removed
        spectrum, ``_spectrum_error``), 0 where it comes from the SVD.
    """
    backend = _symeig.backend_for(a)
    threads = contextlib.nullcontext() if cpu_threads is None else _symeig.cpu_threads(backend, cpu_threads)
    with threads:
        basis, b, found, error = _minor_gram_levels(a, n, max_levels, backend)
    u, s, vh = found if found is not None else _minor_svd(b, n)
    return (u if basis is None else basis @ u), s, vh, error


def _minor_gram_levels(
    a: torch.Tensor, n: int, max_levels: int, backend: str
) -> tuple[torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, float]:
    """(basis, b, (u, s, vh) in ``b``'s coordinates, error), or (basis, b, None, 0.0) when ``b`` needs the SVD."""
    basis, b = None, a
    for level in range(1, max_levels + 1):
        eig = _symeig.LowestEigh(_symeig.gram(b, backend), backend)
        error = _predicted_error(eig, n)
        if error <= _TARGET_ERROR:
            break
        if max_levels == 1:  # gram_eigh: knowingly inexact (its caller warns where it is far off)
            error = min(error, _spectrum_error(eig, n))
            break
        bound = _deflation_bound(eig, n) if level < max_levels else None
        if bound is None:
            return basis, b, None, 0.0
        q = eig.vectors_at_most(bound)  # (j, keep), keep >= n since lambda_n <= bound
        basis = q if basis is None else basis @ q
        b = q.T @ b
    q_n = eig.vectors(n)  # (j, n)
    # Projection, not division by singular values: exact even when they are ~0. The small SVD makes the
    # factors canonical (orthogonal columns, orthonormal rows, descending).
    rot, s, vh = torch.linalg.svd(q_n.T @ b, full_matrices=False)  # (n, p) = rot diag(s) vh
    return basis, b, (q_n @ rot, s, vh), error


def _eigenvalues_at_cut(eig: _symeig.LowestEigh, n: int) -> tuple[float, float, float]:
    """(lambda_n, lambda_{n+1}, lambda_max), clipped at 0 (rounding can make a ~0 eigenvalue negative)."""
    lam_n, lam_next = (max(float(v), 0.0) for v in eig.smallest(n + 1)[-2:])
    return lam_n, lam_next, max(eig.largest(), 0.0)


def _predicted_error(eig: _symeig.LowestEigh, n: int) -> float:
    """Predicted ``||R - R_svd||_F / ||R||_F`` of this level's eigenvectors (see ``_TARGET_ERROR``).

    The Gram's rounding (``eps * lambda_max``) turns the n-th eigenvector by ``eps * lambda_max / (lambda_{n+1} -
    lambda_n)`` towards the next one, whose singular value ``sqrt(lambda_{n+1})`` then leaks into R: relative to
    R's scale ``sqrt(lambda_n)``, that angle times ``sqrt(lambda_{n+1} / lambda_n)``. Infinite when lambda_n is 0
    (R is ~0: any leak is infinitely large relative to it) or the cut has no gap.
    """
    if n == eig.k:  # everything is removed: R = A, nothing to mix the removed directions with
        return 0.0
    lam_n, lam_next, lam_max = _eigenvalues_at_cut(eig, n)
    if lam_max == 0.0:  # a zero weight: R = 0 exactly
        return 0.0
    if lam_n == 0.0 or lam_next <= lam_n:
        return math.inf
    eps = torch.finfo(torch.float64).eps
    return eps * lam_max * math.sqrt(lam_next / lam_n) / (lam_next - lam_n)


def _spectrum_error(eig: _symeig.LowestEigh, n: int) -> float:
    """Predicted relative error of the removed singular values (squared), ``eps * lambda_max / lambda_n``. It holds
    whatever the gap: where the cut has none, R is not unique and only the spectrum is at stake."""
    lam_n, _, lam_max = _eigenvalues_at_cut(eig, n)
    if lam_max == 0.0:
        return 0.0
    return math.inf if lam_n == 0.0 else torch.finfo(torch.float64).eps * lam_max / lam_n


def _warn_gram_eigh_inexact(shape: torch.Size, n: int, error: float) -> None:
    values = "value is" if n == 1 else "values are"
    off = f"up to {error:.1g} of its norm" if error < 1 else "more than its own norm"
    warnings.warn(
        f"decomposition_method='gram_eigh': the {n} smallest singular {values} below what the Gram matrix of this "
        f"{shape[0]}x{shape[1]} weight resolves in float64: the removed part R may be off by {off} (harmless "
        "only where they are ~0, an exactly rank-deficient weight). Use decomposition_method='auto' (accurate: it "
        "falls back to an SVD where the Gram cannot resolve them) or 'svd'",
        RuntimeWarning,
        stacklevel=2,
    )


def _deflation_bound(eig: _symeig.LowestEigh, n: int) -> float | None:
    """Keep the eigenvalues <= the returned bound for another level, or None when no level can sharpen this one.

    Dropping the directions above ``bound`` costs R about ``eps * lambda_max / sqrt(bound * lambda_n)`` (their share
    in the true minor vectors, weighted by their singular values); the bound is the smallest that keeps this under
    the target, and at least ``_DEFLATION_MARGIN * lambda_n``.
    """
    if n == eig.k:
        return None
    lam_n, _, lam_max = _eigenvalues_at_cut(eig, n)
    eps = torch.finfo(torch.float64).eps
    floor = max(lam_n, eps * lam_max)  # lambda_n is only known to ~eps * lambda_max
    bound = max(_DEFLATION_MARGIN * floor, (eps * lam_max / _TARGET_ERROR) ** 2 / floor)
    # A level that would not shrink lambda_max by the margin cannot sharpen the next one: stop.
    return bound if _DEFLATION_MARGIN * bound < lam_max else None
