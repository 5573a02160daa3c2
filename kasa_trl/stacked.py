"""The non-destructive layer's removal and adapter as one stacked low-rank product (``KaSALinear.forward``)::

    z = x [right; A]^T                                   (N, n + r)
    out + (z * [-1, ..., -1, scaling sigma]) [left, B]^T  (N, out)

Two products instead of four in forward, and in backward one product for the input's gradient instead of two plus
their sum, with no gradient computed for the removed factors (constants). Pure functions of tensors with their own
backward; the layer decides when they apply (one dtype, no active dropout, no autocast).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable


def stacked_down(x: torch.Tensor, right: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """``z = x [right; A]^T``.

    Args:
        x (torch.Tensor): (N, in).
        right (torch.Tensor): (n, in), constant (no gradient).
        lora_A (torch.Tensor): (r, in).

    Returns:
        (N, n + r).
    """
    return _StackedDown.apply(x, right, lora_A)


def stacked_up(
    out: torch.Tensor, z: torch.Tensor, left: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``out + (z * [-1 (n), scale (r)]) [left, B]^T``.

    Args:
        out (torch.Tensor): (N, out), the base output (not modified).
        z (torch.Tensor): (N, n + r), from ``stacked_down``.
        left (torch.Tensor): (out, n), constant (no gradient).
        lora_B (torch.Tensor): (out, r).
        scale (torch.Tensor): (r,), ``scaling * sigma``.

    Returns:
        (N, out).
    """
    return _StackedUp.apply(out, z, left, lora_B, scale)


class _StackedDown(torch.autograd.Function):
    """``z = x [right; A]^T`` for ``x`` (N, in), ``right`` (n, in) constant, ``A`` (r, in): gradients for ``x``
    and ``A`` only. The stacked matrix is rebuilt in backward rather than saved: (n + r) x in per layer held
    from forward to backward would cost more memory than the copy costs time."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, right: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, right, lora_A)
        return x @ torch.cat([right, lora_A]).T

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_z: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, right, lora_A = ctx.saved_tensors
        grad_x = grad_z @ torch.cat([right, lora_A]) if ctx.needs_input_grad[0] else None
        grad_a = grad_z[:, right.shape[0] :].T @ x if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_a


class _StackedUp(torch.autograd.Function):
    """``out + (z * [-1 (n), scale (r)]) [left, B]^T`` for ``z`` (N, n + r), ``left`` (out, n) constant, ``B``
    (out, r), ``scale`` (r,) = scaling * sigma; no gradient for ``left``."""

    @staticmethod
    def forward(
        ctx: Any,
        out: torch.Tensor,
        z: torch.Tensor,
        left: torch.Tensor,
        lora_B: torch.Tensor,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        coef = torch.cat([scale.new_full((left.shape[1],), -1.0), scale])  # (n + r,)
        ctx.save_for_backward(z, left, lora_B, coef)
        return torch.addmm(out, z * coef, torch.cat([left, lora_B], dim=1).T)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, left, lora_B, coef = ctx.saved_tensors
        n = left.shape[1]
        grad_z = grad_scale = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[4]:
            grad_zc = grad_out @ torch.cat([left, lora_B], dim=1)  # (N, n + r): d loss / d (z * coef)
            if ctx.needs_input_grad[1]:
                grad_z = grad_zc * coef
            if ctx.needs_input_grad[4]:
                grad_scale = (grad_zc[:, n:] * z[:, n:]).sum(0)
        if ctx.needs_input_grad[3]:
            grad_b = grad_out.T @ (z[:, n:] * coef[n:])
        return grad_out, grad_z, None, grad_b, grad_scale
