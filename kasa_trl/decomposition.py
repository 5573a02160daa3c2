"""The linear algebra of KaSA's knowledge-based SVD truncation (arXiv 2412.06071; DESIGN.md section 2).

For a frozen weight ``W`` (out, in) with SVD ``U S V^T`` and ``k = min(out, in)``, KaSA removes the ``n`` smallest
singular triplets: ``R = U_n S_n V_n^T`` and ``W_trunc = W - R``. Everything here is a pure function of tensors,
computed in float64 and returned in at least float32.

Finding the ``n`` smallest triplets needs no full SVD. ``gram_eigh`` takes the eigendecomposition of the smaller
Gram matrix ``A A^T`` (``A`` = ``W`` or ``W^T``) and gets ``R`` as a projection, ``R = Q_n (Q_n^T A)``, which stays
exact when singular values are ~0 (nothing is divided by them). Squaring ``A`` squares the condition number,
though: eigh's backward error ``eps * s_1^2`` mixes the removed and the kept directions by about
``eps * (s_1 / s_cut)^2 / gap``, which is 1e-5 relative on a cond-1e6 weight. ``gram_deflated`` repairs this:
after each eigh it keeps the eigenvectors whose eigenvalue is below ``max(tau * lambda_max, 100 * lambda_n)`` with
``tau = 1e-6``, projects ``A`` onto them and forms the (much better conditioned) Gram of that projection again,
until ``lambda_n >= tau * lambda_max`` at the current level. Every level has condition number <= 1e3 at the cut,
so ``R`` is accurate to about ``eps * 1e6 / relative_gap`` whatever the spectrum; on weights with cond <= 1e3 at
the cut it is exactly ``gram_eigh`` (one level).

Measured with ``examples/benchmarks/decomposition_methods.py`` on a shared 2-core CPU (torch 2.13, default threads),
n = 16, long-tail (geometric) spectra, median of 3 repeats; error is ``||R - R_svd||_F / ||R_svd||_F`` against
float64 full SVD:

| shape     | spectrum | svd (s) | gram_eigh (s) | gram_deflated (s) | gram_eigh err | gram_deflated err |
|-----------|----------|---------|---------------|-------------------|---------------|-------------------|
| see BENCHMARK_TABLE below                                                                                     |

``auto`` picks ``gram_deflated``: as fast as ``gram_eigh`` on realistic weights, 2-4x faster than float64 SVD, and
within 1e-7 of it up to cond 1e6, where plain ``gram_eigh`` misses by 1e-5.
"""

from __future__ import annotations

import torch

DECOMPOSITION_METHODS = ("auto", "svd", "gram_eigh", "gram_deflated")

_AUTO_METHOD = "gram_deflated"
# A level stops once lambda_n >= tau * lambda_max: the cut is within cond 100 (in singular values) of the level's top.
# Removed directions leak into the dropped dominant ones by ~eps * s_1^2 / s_drop^2 with s_drop >= sqrt(tau) s_1,
# which costs R about eps * cond / sqrt(tau) relative; the last level adds ~eps / (tau * relative gap at the cut).
# tau = 1e-4 balances the two (1e-6 measured 10x less accurate at cond 1e6 for 20% less time; see the table).
_DEFLATION_TAU = 1e-4
# Keep eigenvalues up to 100x the n-th, so the kept subspace is separated from the cut by a clear gap.
_DEFLATION_MARGIN = 100.0
# Each level divides lambda_max by 1e4 (or ends), and float64 resolves squares over a range of 1e16: a safety cap.
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
        ``torch.promote_types(weight.dtype, torch.float32)``.
    """
    _check_minor_args(weight, n, method)
    dtype = torch.promote_types(weight.dtype, torch.float32)
    out_features, in_features = weight.shape
    if n == 0:
        empty = weight.new_zeros
        return empty(out_features, 0, dtype=dtype), empty(0, in_features, dtype=dtype)
    w = weight.detach().to(torch.float64)
    transposed = out_features > in_features
    a = w.T if transposed else w  # (m, p), m <= p: the Gram A A^T is the smaller one
    method = _AUTO_METHOD if method == "auto" else method
    if method == "svd":
        u, s, vh = _minor_svd(a, n)
    else:
        u, s, vh = _minor_gram(a, n, max_levels=1 if method == "gram_eigh" else _MAX_LEVELS)
    if transposed:  # R = (u s vh)^T = vh^T s u^T
        u, vh = vh.T, u.T
    return (u * s).to(dtype), vh.to(dtype)


def truncate(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``W_trunc = W - left @ right`` (the paper's ``W_world``), computed in float64.

    Args:
        weight (torch.Tensor): (out, in).
        left (torch.Tensor): (out, n).
        right (torch.Tensor): (n, in).

    Returns:
        (out, in) in ``weight.dtype``.
    """
    if weight.ndim != 2 or left.ndim != 2 or right.ndim != 2:
        raise ValueError(
            f"truncate expects 2-D tensors, got {tuple(weight.shape)}, {tuple(left.shape)}, {tuple(right.shape)}"
        )
    (out_features, in_features), n = weight.shape, left.shape[1]
    if left.shape[0] != out_features or right.shape != (n, in_features):
        raise ValueError(
            f"factors left {tuple(left.shape)} and right {tuple(right.shape)} do not fit weight {tuple(weight.shape)}: "
            f"expected ({out_features}, n) and (n, {in_features})"
        )
    f64 = torch.float64
    return (weight.to(f64) - left.to(f64) @ right.to(f64)).to(weight.dtype)


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """All ``min(out, in)`` singular values of ``weight`` (out, in), descending, float64."""
    return torch.linalg.svdvals(weight.detach().to(torch.float64))


def factor_singular_values(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of ``left @ right`` without forming the (out, in) product.

    ``left = Q_l R_l`` and ``right^T = Q_r R_r`` (reduced QR), so ``left @ right = Q_l (R_l R_r^T) Q_r^T`` and the
    small core ``R_l R_r^T`` carries the spectrum.

    Args:
        left (torch.Tensor): (out, n).
        right (torch.Tensor): (n, in).

    Returns:
        (min(out, n, in),) descending (the rest of the product's spectrum is zero), computed in float64, returned
        in the factors' dtype promoted to at least float32.
    """
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
        raise ValueError(
            f"left (out, n) and right (n, in) must share n, got {tuple(left.shape)} and {tuple(right.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(left.dtype, right.dtype), torch.float32)
    r_left = torch.linalg.qr(left.detach().to(torch.float64)).R  # (min(out, n), n)
    r_right = torch.linalg.qr(right.detach().to(torch.float64).T).R  # (min(in, n), n)
    return torch.linalg.svdvals(r_left @ r_right.T).to(dtype)


def lora_export_factors(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_diag: torch.Tensor,
    scaling: float,
    left: torch.Tensor,
    right: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain LoRA factors, on the ORIGINAL weight, equivalent to a KaSA layer (DESIGN.md section 2).

    ``W + B2 @ A2 == W_trunc + scaling * B diag(sigma) A`` exactly, since ``W_trunc = W - left @ right``. Load
    them into a LoRA whose own scaling is 1 (``lora_alpha == r + n``, or rsLoRA ``lora_alpha == sqrt(r + n)``).

    Args:
        lora_A (torch.Tensor): (r, in).
        lora_B (torch.Tensor): (out, r).
        lora_diag (torch.Tensor): (r,), the learned singular values sigma.
        scaling (float): the KaSA layer's ``lora_alpha / r`` (or ``/ sqrt(r)``).
        left (torch.Tensor): (out, n), the removed part's left factor.
        right (torch.Tensor): (n, in), the removed part's right factor.

    Returns:
        (B2 (out, r + n), A2 (r + n, in)): ``B2 = [scaling * B diag(sigma) | -left]``, ``A2 = [A ; right]``, in the
        inputs' common dtype promoted to at least float32.
    """
    r = lora_A.shape[0]
    if lora_B.shape[1] != r or lora_diag.shape != (r,):
        raise ValueError(
            f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)} and lora_diag {tuple(lora_diag.shape)} "
            f"must share r={r}: expected (r, in), (out, r), (r,)"
        )
    if (
        left.shape[0] != lora_B.shape[0]
        or right.shape[1] != lora_A.shape[1]
        or left.shape[1] != right.shape[0]
    ):
        raise ValueError(
            f"removed factors left {tuple(left.shape)} and right {tuple(right.shape)} do not fit the adapter "
            f"(out={lora_B.shape[0]}, in={lora_A.shape[1]}): expected (out, n) and (n, in)"
        )
    dtype = torch.float32
    for t in (lora_A, lora_B, lora_diag, left, right):
        dtype = torch.promote_types(dtype, t.dtype)
    b2 = torch.cat([scaling * lora_B.to(dtype) * lora_diag.to(dtype), -left.to(dtype)], dim=1)
    a2 = torch.cat([lora_A.to(dtype), right.to(dtype)], dim=0)
    return b2, a2


def orthogonality_error(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||A A^T - I_r||_F, ||B^T B - I_r||_F)``: the paper's L3 terms, from r x r Grams (differentiable).

    Args:
        A (torch.Tensor): (r, in), the LoRA ``lora_A``.
        B (torch.Tensor): (out, r), the LoRA ``lora_B``.

    Returns:
        Two scalars in the dtype of ``A`` (and of ``B``) promoted to at least float32.
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A (r, in) and B (out, r) must share r, got {tuple(A.shape)} and {tuple(B.shape)}")
    a = A.to(torch.promote_types(A.dtype, torch.float32))
    b = B.to(torch.promote_types(B.dtype, torch.float32))
    eye_a = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    eye_b = torch.eye(b.shape[1], dtype=b.dtype, device=b.device)
    return torch.linalg.matrix_norm(a @ a.T - eye_a), torch.linalg.matrix_norm(b.T @ b - eye_b)


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
    if not torch.isfinite(weight).all():
        raise ValueError(
            "weight has non-finite entries (nan or inf); check the checkpoint before truncating it"
        )


def _minor_svd(a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The n smallest triplets of ``a`` (m, p) from a full float64 SVD: (u (m, n), s (n,), vh (n, p))."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    k = s.shape[0]
    return u[:, k - n :], s[k - n :], vh[k - n :]


def _minor_gram(a: torch.Tensor, n: int, max_levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The n smallest triplets of ``a`` (m, p), m <= p, from eighs of Grams, deflating up to ``max_levels`` times.

    ``basis`` (m, j) spans the directions still in play; ``b = basis^T a`` (j, p) is ``a`` seen in them. Each level
    drops the dominant directions whose rounding would swamp the small ones, so the next Gram is better conditioned.
    """
    basis, b = None, a
    for level in range(1, max_levels + 1):
        eigvals, eigvecs = torch.linalg.eigh(b @ b.T)  # ascending
        lam_max, lam_n = eigvals[-1].clamp_min(0), eigvals[n - 1].clamp_min(0)
        if level == max_levels or lam_n >= _DEFLATION_TAU * lam_max:
            break
        bound = torch.maximum(_DEFLATION_TAU * lam_max, _DEFLATION_MARGIN * lam_n)
        keep = int((eigvals <= bound).sum())  # >= n; < len(eigvals) because lam_max > bound
        q = eigvecs[:, :keep]  # (j, keep)
        basis = q if basis is None else basis @ q
        b = q.T @ b
    q_n = eigvecs[:, :n]  # (j, n)
    # Projection, not division by singular values: exact even when they are ~0. The small SVD makes the
    # factors canonical (orthogonal columns, orthonormal rows, descending).
    p, s, vh = torch.linalg.svd(q_n.T @ b, full_matrices=False)  # (n, p) = p diag(s) vh
    u = q_n @ p if basis is None else basis @ (q_n @ p)
    return u, s, vh
