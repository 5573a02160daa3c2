"""``KaSALinear``: a KaSA adapter around an ``nn.Linear`` or transformers' ``Conv1D``.

Output (KaSA paper Eq. 5-8)::

    y = W_trunc x + scaling * B (sigma * (A dropout(x))) + bias

where ``W_trunc = W - R`` and ``R = left @ right`` is the rank-n part removed from the frozen weight (the n
smallest singular triplets; n = r with the paper's truncation). In ``in_place`` mode the base weight is
overwritten with ``W_trunc``; in ``non_destructive`` mode it keeps ``W`` bit-exact and ``R x`` is subtracted
in forward. The layer only stores and applies the removed factors: computing them is ``decomposition``'s job.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.pytorch_utils import Conv1D

from .decomposition import removed_float64, truncate
from .distributed import is_partitioned, truncate_partition, weight_shape
from .fingerprint import weight_fingerprint

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)


class KaSALinear(nn.Module):
    """KaSA adapter wrapping ``base_layer``.

    Args:
        base_layer (nn.Linear | Conv1D): the frozen layer; its weight is truncated here in ``in_place`` mode.
        removed_left (torch.Tensor): (out, n) left factor of the removed part R.
        removed_right (torch.Tensor): (n, in) right factor of R.
        r (int): adapter rank.
        lora_alpha (float): scaling numerator.
        lora_dropout (float): dropout on the adapter input.
        use_rslora (bool): scaling = lora_alpha / sqrt(r).
        base_mode (str): ``"in_place"`` or ``"non_destructive"``.
        adapter_dtype (torch.dtype | None): dtype of A, B, sigma; default fp32 (fp64 for fp64 bases).
        base_fingerprint (torch.Tensor | None): the original weight's fingerprint, if already known.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        removed_left: torch.Tensor,
        removed_right: torch.Tensor,
        *,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        base_mode: str = "in_place",
        adapter_dtype: torch.dtype | None = None,
        base_fingerprint: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_BASE_LAYERS):
            raise TypeError(f"KaSALinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        weight = self._base_weight()  # empty while ZeRO-3 holds it partitioned (see partitioned below)
        self.out_features, self.in_features = weight_shape(base_layer)
        partitioned = is_partitioned(base_layer.weight) and base_layer.weight.numel() == 0
        if removed_left.shape[0] != self.out_features or removed_right.shape[1] != self.in_features:
            raise ValueError(
                f"removed factors {tuple(removed_left.shape)} @ {tuple(removed_right.shape)} do not fit a "
                f"({self.out_features}, {self.in_features}) weight"
            )
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.base_mode = base_mode
        self.merged = False
        self.adapter_enabled = True
        # Set by ``penalty.attach_penalties`` while training with the KaSA regularizers: called inside forward,
        # where ZeRO-3 has gathered this layer's parameters, with an activation of the adapter path (the (..., r)
        # ``x A^T``, or the (N, n + r) stacked one of ``_removal_and_adapter``); returns it (an identity whose
        # backward feeds the penalty).
        self.penalty_hook: Callable[[KaSALinear, torch.Tensor], torch.Tensor] | None = None

        factor_dtype = torch.promote_types(weight.dtype, torch.float32)
        dtype = adapter_dtype or factor_dtype
        device = weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.lora_diag = nn.Parameter(torch.empty(r, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # The removed part travels with the adapter (DESIGN.md section 4); not in the model's state_dict.
        # Contiguous so a loaded adapter (always contiguous) runs the very same kernels: bit-identical outputs.
        left = removed_left.detach().to(device, factor_dtype).contiguous()
        right = removed_right.detach().to(device, factor_dtype).contiguous()
        self.register_buffer("removed_left", left, persistent=False)
        self.register_buffer("removed_right", right, persistent=False)
        if base_mode not in ("in_place", "non_destructive"):
            raise ValueError(f"base_mode={base_mode!r} is not one of ['in_place', 'non_destructive']")
        if partitioned and base_fingerprint is None:
            raise ValueError(
                "the base weight is partitioned by ZeRO-3: pass base_fingerprint (computed where the weight was "
                "gathered) or build the layer inside kasa_trl.distributed.gathered([weight])"
            )
        # Given when loading (the saved one was just checked) or by the rank that decomposed this weight.
        self.base_fingerprint = (
            base_fingerprint if base_fingerprint is not None else weight_fingerprint(weight)
        )
        self.reset_parameters()
        if base_mode == "in_place" and partitioned:
            removed = removed_float64(self.removed_left, self.removed_right)
            truncate_partition(base_layer.weight, removed.T if self.fan_in_fan_out else removed)
        elif base_mode == "in_place":
            self._write_base_weight(truncate(weight, self.removed_left, self.removed_right))

    @property
    def n_removed(self) -> int:
        """Rank of the removed part (r with the paper's truncation; can be less with the official one)."""
        return self.removed_left.shape[1]

    def reset_parameters(self) -> None:
        """Official init: A kaiming-uniform(a=sqrt(5)), B = 0, sigma ~ N(0, 1); so dW = 0."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            nn.init.normal_(self.lora_diag)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable parameters, by their checkpoint names."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_diag": self.lora_diag}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        result = self.base_layer(x)
        if self.merged or (self.base_mode == "in_place" and not self.adapter_enabled):
            return result
        # The low-rank terms are accumulated into the base output by addmm on 2-D views: one pass over the
        # (N, out) activation per term, where a product then a sum (and, for the update, a scaling) would each
        # read and write it again, in forward and in backward. The base output itself is never written to:
        # forward hooks (ZeRO-3's among them) may hold it.
        out = result.reshape(-1, self.out_features)  # (N, out)
        removal = self.base_mode == "non_destructive"
        if removal and self.adapter_enabled and self._one_pass(x, out):
            return self._removal_and_adapter(x, out).view(result.shape)
        if removal:
            left, right = self.removed_left, self.removed_right  # (out, n), (n, in)
            if x.dtype == right.dtype == out.dtype:
                x2d = x.reshape(-1, self.in_features)  # (N, in)
                out = torch.addmm(out, x2d @ right.T, left.T, alpha=-1)  # out - (x right^T) left^T
            else:  # addmm takes one dtype (e.g. a bf16 base with fp32 factors)
                removed = F.linear(F.linear(x.to(right.dtype), right), left)  # (..., out)
                out = out - removed.reshape(-1, self.out_features).to(out.dtype)
        if self.adapter_enabled:
            h = F.linear(self.lora_dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (..., r)
            if self.penalty_hook is not None:
                h = self.penalty_hook(self, h)
            # scaling folded into the (r,) vector: r multiplications instead of N * out
            h = h.reshape(-1, self.r) * (self.lora_diag * self.scaling)  # (N, r)
            one_dtype = h.dtype == self.lora_B.dtype == out.dtype
            if one_dtype and removal:
                # In place on the tensor the correction just made (not the base output), which no autograd node
                # saved (addmm and sub keep their operands only): one (N, out) copy less.
                out = out.addmm_(h, self.lora_B.T)  # out += h B^T
            elif one_dtype:
                out = torch.addmm(out, h, self.lora_B.T)  # out + h B^T
            else:  # e.g. a bf16 base with an fp32 adapter
                out = out + F.linear(h, self.lora_B).to(out.dtype)
        return out.view(result.shape)

    def _one_pass(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether the removal and the adapter can share their products (``_removal_and_adapter``): both read
        the same input (no active dropout), everything in one dtype, and no autocast to change it."""
        dropout_off = isinstance(self.lora_dropout, nn.Identity) or not self.lora_dropout.training
        dtype = self.removed_right.dtype
        return (
            dropout_off
            and x.dtype == out.dtype == dtype == self.lora_A.dtype == self.lora_B.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _removal_and_adapter(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out - (x right^T) left^T + scaling ((x A^T) * sigma) B^T`` as one stacked low-rank product::

            z = x [right; A]^T                          (N, n + r)
            out + (z * [-1, ..., -1, scaling sigma]) [left, B]^T

        Two products instead of four in forward, and in backward one product for the input's gradient
        instead of two plus their sum, with no gradient computed for the removed factors (buffers)."""
        x2d = x.reshape(-1, self.in_features)  # (N, in)
        z = _StackedDown.apply(x2d, self.removed_right, self.lora_A)  # (N, n + r)
        if self.penalty_hook is not None:
            z = self.penalty_hook(self, z)
        return _StackedUp.apply(out, z, self.removed_left, self.lora_B, self.lora_diag * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """``dW = scaling * B diag(sigma) A``, (out, in) like ``nn.Linear.weight``, in the adapter dtype."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        delta = (self.lora_B.to(dtype) * self.lora_diag.to(dtype)) @ self.lora_A.to(dtype)
        return (delta * self.scaling).to(self.lora_A.dtype)

    def removed_weight(self) -> torch.Tensor:
        """``R = left @ right``, (out, in)."""
        return self.removed_left @ self.removed_right

    def effective_weight(self) -> torch.Tensor:
        """``W_trunc + dW`` in float64: the weight this layer computes with (bias aside)."""
        weight = self._base_weight().detach().to(torch.float64)
        if self.merged:
            return weight
        if self.base_mode == "non_destructive":
            weight = weight - self.removed_weight().to(torch.float64)
        return weight + self.delta_weight().detach().to(torch.float64)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update (and, in non-destructive mode, the truncation) into the base weight."""
        if self.merged:
            raise RuntimeError("KaSA layer is already merged; call unmerge() first")
        self._write_base_weight(self.effective_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (exact up to one rounding of the base dtype)."""
        if not self.merged:
            raise RuntimeError("KaSA layer is not merged")
        weight = self._base_weight().to(torch.float64) - self.delta_weight().to(torch.float64)
        if self.base_mode == "non_destructive":
            weight = weight + self.removed_weight().to(torch.float64)
        self._write_base_weight(weight)
        self.merged = False

    @torch.no_grad()
    def original_weight(self) -> torch.Tensor:
        """The weight before KaSA, (out, in), in the base dtype (bit-exact in non-destructive mode)."""
        weight = self._base_weight()
        if self.merged:
            weight = weight.to(torch.float64) - self.delta_weight().to(torch.float64)
            if self.base_mode == "in_place":
                weight = weight + self.removed_weight().to(torch.float64)
            return weight.to(self._base_weight().dtype)
        if self.base_mode == "non_destructive":
            return weight.clone()
        return (weight.to(torch.float64) + self.removed_weight().to(torch.float64)).to(weight.dtype)

    def _base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), a view of the parameter's data."""
        weight = self.base_layer.weight.data
        return weight.T if self.fan_in_fan_out else weight

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        """Copy ``weight`` (out, in) into the base parameter, in its dtype and layout."""
        target = self.base_layer.weight.data
        target.copy_(weight.T if self.fan_in_fan_out else weight)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, n_removed={self.n_removed}, scaling={self.scaling:g}, base_mode={self.base_mode}, "
            f"merged={self.merged}"
        )


class _StackedDown(torch.autograd.Function):
    """``z = x [right; A]^T`` for ``x`` (N, in), ``right`` (n, in) constant, ``A`` (r, in): gradients for ``x``
    and ``A`` only. The stacked matrix is rebuilt in backward rather than saved: (n + r) x in per layer held
    from forward to backward would cost more memory than the copy costs time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, right: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, right, lora_A)
        return x @ torch.cat([right, lora_A]).T

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: torch.Tensor):
        x, right, lora_A = ctx.saved_tensors
        grad_x = grad_z @ torch.cat([right, lora_A]) if ctx.needs_input_grad[0] else None
        grad_a = grad_z[:, right.shape[0] :].T @ x if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_a


class _StackedUp(torch.autograd.Function):
    """``out + (z * [-1 (n), scale (r)]) [left, B]^T`` for ``z`` (N, n + r), ``left`` (out, n) constant, ``B``
    (out, r), ``scale`` (r,) = scaling * sigma; no gradient for ``left``."""

    @staticmethod
    def forward(
        ctx, out: torch.Tensor, z: torch.Tensor, left: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        coef = torch.cat([scale.new_full((left.shape[1],), -1.0), scale])  # (n + r,)
        ctx.save_for_backward(z, left, lora_B, coef)
        return torch.addmm(out, z * coef, torch.cat([left, lora_B], dim=1).T)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
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
