"""Arithmetic on the low-rank factors KaSA keeps: the truncation ``W_trunc = W - left @ right``, spectra and
orthogonality of factored products, and the exact plain-LoRA form of a KaSA layer (docs/design.md section 1).

Pure functions of tensors: computed in float64 (the orthogonality error in at least float32, differentiable) and
returned in the inputs' dtype or at least float32, as each function says. ``decomposition`` finds the removed
factors ``left (out, n) = U_n S_n`` and ``right (n, in) = V_n^T``.
"""

from __future__ import annotations

import math

import torch


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
    return subtract_removed(weight, removed_float64(left, right))


def removed_float64(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``R = left @ right`` (out, in) in float64: the product ``truncate`` subtracts. Anything that truncates a
    piece of a weight (a ZeRO-3 partition) passes the matching slice of this to ``subtract_removed``, so it matches
    ``truncate`` bit for bit."""
    return left.to(torch.float64) @ right.to(torch.float64)


def subtract_removed(weight: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``weight - removed`` computed in float64 (``removed`` from ``removed_float64``, or a slice of it of the same
    shape as ``weight``), rounded once to ``weight.dtype``."""
    w = weight.to(torch.float64, copy=True)
    return w.sub_(removed).to(weight.dtype)  # in place: one float64 buffer of the weight's size less


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


def delta_singular_values(
    lora_A: torch.Tensor, lora_B: torch.Tensor, lora_diag: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Singular values of the update ``dW = scaling * B diag(sigma) A`` without forming it (``factor_singular_values``).

    Args:
        lora_A (torch.Tensor): (r, in).
        lora_B (torch.Tensor): (out, r).
        lora_diag (torch.Tensor): (r,), sigma.
        scaling (float): the layer's ``lora_alpha / r`` (or ``/ sqrt(r)``).

    Returns:
        (min(out, r, in),) descending, in the factors' dtype promoted to at least float32.
    """
    return factor_singular_values(scaling * lora_B * lora_diag, lora_A)


def lora_export_factors(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_diag: torch.Tensor,
    scaling: float,
    left: torch.Tensor,
    right: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain LoRA factors, on the ORIGINAL weight, equivalent to a KaSA layer (docs/design.md section 1).

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


def max_abs_exponent(w: torch.Tensor) -> tuple[float, int]:
    """``(largest, e)``: ``w``'s largest absolute entry (NaN/inf propagate; 0 for an empty ``w``) and ``e`` with
    ``largest`` in [2**(e-1), 2**e), so ``w * 2**-e`` has its largest entry in [0.5, 1) (``e = 0`` for a zero or
    non-finite ``largest``). One pass over ``w``."""
    largest = float(torch.linalg.vector_norm(w, float("inf"))) if w.numel() else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return largest, 0
    return largest, math.frexp(largest)[1]


def times_power_of_two(t: torch.Tensor, exponent: int) -> torch.Tensor:
    """``t * 2**exponent``, exact, in two steps (``2**-1074`` or ``2**1024`` alone is not a normal float64)."""
    if exponent == 0:
        return t
    half = exponent // 2
    return t * math.ldexp(1.0, half) * math.ldexp(1.0, exponent - half)
