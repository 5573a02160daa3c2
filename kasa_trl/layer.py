"""``KaSALinear``: a KaSA adapter around an ``nn.Linear`` or transformers' ``Conv1D``.

Output (KaSA paper Eq. 5-8)::

    y = W_trunc x + scaling * B (sigma * (A dropout(x))) + bias

where ``W_trunc = W - R`` and ``R = left @ right`` is the rank-n part removed from the frozen weight (the n
smallest singular triplets; n = r with the paper's truncation). In ``in_place`` mode the base weight is
overwritten with ``W_trunc``; in ``non_destructive`` mode it keeps ``W`` bit-exact and ``R x`` is subtracted
in forward. The layer only stores and applies the removed factors: computing them is ``decomposition``'s job.
A bitsandbytes quantized base (``quantized``) runs ``non_destructive`` only and is never written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .config import RESOLVED_BASE_MODES, lora_scaling
from .distributed import is_partitioned, truncate_partition
from .factors import removed_float64, truncate
from .fingerprint import check_fingerprint, weight_fingerprint
from .quantized import in_place_refusal, is_quantized_layer, write_refusal
from .stacked import stacked_down, stacked_up
from .weights import (
    SUPPORTED_BASE_LAYERS,
    SUPPORTED_WEIGHT_DTYPES,
    base_weight,
    check_base_weight,
    stores_transposed,
    to_storage_layout,
    weight_shape,
    write_base_weight,
)


def check_layer_arguments(
    *, r: object, lora_alpha: object, lora_dropout: object, use_rslora: object, base_mode: object
) -> None:
    """Raise if a ``KaSALinear`` argument is out of range (for direct users of the layer; ``KaSAConfig`` checks
    the same for ``apply_kasa``)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, (int, float))
        or not math.isfinite(lora_alpha)
        or lora_alpha <= 0
    ):
        raise ValueError(f"lora_alpha must be a finite number > 0, got {lora_alpha!r}")
    if (
        isinstance(lora_dropout, bool)
        or not isinstance(lora_dropout, (int, float))
        or not 0.0 <= lora_dropout < 1.0
    ):
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if not isinstance(use_rslora, bool):
        raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")
    if base_mode not in RESOLVED_BASE_MODES:
        hint = (
            "; 'auto' is resolved by kasa_trl.apply_kasa, pass the mode it stands for"
            if base_mode == "auto"
            else ""
        )
        raise ValueError(f"base_mode={base_mode!r} is not one of {list(RESOLVED_BASE_MODES)}{hint}")


def check_removed_factors(
    left: object, right: object, out_features: int, in_features: int, where: str
) -> None:
    """Raise unless ``left`` (out, n) and ``right`` (n, in) are finite floating-point factors of a removed part
    of rank ``n <= min(out, in)`` for an (out, in) weight."""
    for key, factor in (("removed_left", left), ("removed_right", right)):
        if not isinstance(factor, torch.Tensor) or factor.ndim != 2:
            shape = tuple(factor.shape) if isinstance(factor, torch.Tensor) else type(factor).__name__
            raise ValueError(f"{where}: {key} must be a 2-D tensor, got {shape}")
        if not factor.is_floating_point():
            raise TypeError(
                f"{where}: {key} has dtype {factor.dtype}; the removed factors must be floating point"
            )
    left, right = cast(torch.Tensor, left), cast(torch.Tensor, right)  # checked just above
    n = left.shape[1]
    if left.shape[0] != out_features or right.shape != (n, in_features) or n > min(out_features, in_features):
        raise ValueError(
            f"{where}: removed factors {tuple(left.shape)} @ {tuple(right.shape)} do not fit a "
            f"({out_features}, {in_features}) weight (expected (out, n) @ (n, in) with n <= min(out, in))"
        )
    for key, factor in (("removed_left", left), ("removed_right", right)):
        if factor.device.type != "meta" and not torch.isfinite(factor).all():
            raise ValueError(
                f"{where}: {key} holds non-finite values (NaN/Inf); they would reach the base weight. "
                "Recompute the factors (kasa_trl.decomposition.minor_components) or re-save the adapter"
            )


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

    # Buffers (register_buffer in __init__), which a type checker cannot see as attributes.
    removed_left: torch.Tensor
    removed_right: torch.Tensor

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
        # Everything is checked before the base weight is touched (it is truncated at the end in in_place mode).
        if not isinstance(base_layer, SUPPORTED_BASE_LAYERS):
            raise TypeError(f"KaSALinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        check_layer_arguments(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, base_mode=base_mode
        )
        check_base_weight(base_layer.weight, f"KaSALinear's base layer ({type(base_layer).__name__})")
        if adapter_dtype is not None and adapter_dtype not in SUPPORTED_WEIGHT_DTYPES:
            raise TypeError(f"adapter_dtype must be a floating-point dtype, got {adapter_dtype}")
        if base_mode == "in_place" and is_quantized_layer(base_layer):
            raise ValueError(in_place_refusal("KaSALinear's base layer", base_layer))
        self.base_layer = base_layer
        self.fan_in_fan_out = stores_transposed(base_layer)  # PEFT's name for Conv1D's (in, out) layout
        weight = base_weight(base_layer)  # empty while ZeRO-3 holds it partitioned (see partitioned below)
        self.out_features, self.in_features = weight_shape(base_layer)
        partitioned = is_partitioned(base_layer.weight) and base_layer.weight.numel() == 0
        check_removed_factors(removed_left, removed_right, self.out_features, self.in_features, "KaSALinear")
        if partitioned and base_fingerprint is None:
            raise ValueError(
                "the base weight is partitioned by ZeRO-3: pass base_fingerprint (computed where the weight was "
                "gathered) or build the layer inside kasa_trl.distributed.gathered([weight])"
            )
        if base_fingerprint is not None and (
            not isinstance(base_fingerprint, torch.Tensor)
            or base_fingerprint.ndim != 1
            or not base_fingerprint.is_floating_point()
        ):
            raise ValueError(
                "base_fingerprint must be a 1-D float tensor from kasa_trl.fingerprint.weight_fingerprint, got "
                f"{base_fingerprint!r:.80}"
            )
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(lora_alpha, r, use_rslora)
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
        # The removed part travels with the adapter (docs/design.md section 4); not in the model's state_dict.
        # Contiguous so a loaded adapter (always contiguous) runs the very same kernels: bit-identical outputs.
        left = removed_left.detach().to(device, factor_dtype).contiguous()
        right = removed_right.detach().to(device, factor_dtype).contiguous()
        if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
            raise ValueError(
                f"KaSALinear: the removed factors overflow {factor_dtype} (the base's compute dtype); pass factors "
                "that fit it"
            )
        self.register_buffer("removed_left", left, persistent=False)
        self.register_buffer("removed_right", right, persistent=False)
        # Given when loading (the saved one was just checked) or by the rank that decomposed this weight.
        self.base_fingerprint = (
            base_fingerprint if base_fingerprint is not None else weight_fingerprint(weight)
        )
        check_fingerprint(self.base_fingerprint, (self.out_features, self.in_features), "KaSALinear")
        self.reset_parameters()
        if base_mode == "in_place":
            # A profiler scope per truncation (what a benchmark times without patching the library).
            with record_function("kasa_trl.truncate"):
                if partitioned:  # each rank its own partition, with the arithmetic of truncate
                    removed = removed_float64(self.removed_left, self.removed_right)
                    truncate_partition(base_layer.weight, to_storage_layout(base_layer, removed))
                else:
                    write_base_weight(base_layer, truncate(weight, self.removed_left, self.removed_right))

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
        """``out - (x right^T) left^T + scaling ((x A^T) * sigma) B^T`` as one stacked low-rank product
        (``stacked``): two products instead of four in forward, fewer in backward."""
        x2d = x.reshape(-1, self.in_features)  # (N, in)
        z = stacked_down(x2d, self.removed_right, self.lora_A)  # (N, n + r)
        if self.penalty_hook is not None:
            z = self.penalty_hook(self, z)
        return stacked_up(out, z, self.removed_left, self.lora_B, self.lora_diag * self.scaling)

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
        weight = base_weight(self.base_layer).detach().to(torch.float64)
        if self.merged:
            return weight
        if self.base_mode == "non_destructive":
            weight = weight - self._removed_float64()
        return weight + self.delta_weight().detach().to(torch.float64)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update (and, in non-destructive mode, the truncation) into the base weight."""
        if self.merged:
            raise RuntimeError("KaSA layer is already merged; call unmerge() first")
        self.check_base_write("merge")
        write_base_weight(self.base_layer, self.effective_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (exact up to one rounding of the base dtype)."""
        if not self.merged:
            raise RuntimeError("KaSA layer is not merged")
        self.check_base_write("unmerge")
        weight = base_weight(self.base_layer).to(torch.float64) - self.delta_weight().to(torch.float64)
        if self.base_mode == "non_destructive":
            weight = weight + self._removed_float64()
        write_base_weight(self.base_layer, weight)
        self.merged = False

    @torch.no_grad()
    def original_weight(self) -> torch.Tensor:
        """The weight before KaSA, (out, in), in the base dtype: bit-exact in non-destructive mode (unmerged),
        else within one rounding of the base dtype (``W_trunc + R``, or ``W_merged - dW + R`` when merged)."""
        weight = base_weight(self.base_layer)
        if self.base_mode == "non_destructive" and not self.merged:
            return weight.clone()
        original = weight.to(torch.float64) + self._removed_float64()  # W_trunc + R
        if self.merged:  # the base holds W_trunc + dW in either mode
            original -= self.delta_weight().to(torch.float64)
        return original.to(weight.dtype)

    @torch.no_grad()
    def restore_base(self) -> None:
        """Write the original weight ``W`` back into the base layer (``original_weight``); the layer is then
        unmerged in non-destructive mode, computing what it computed before. ``kasa_trl.unload`` calls it before
        dropping the layer. A no-op for an unmerged non-destructive layer."""
        if self.base_mode == "non_destructive" and not self.merged:
            return
        self.check_base_write("restore_base")
        write_base_weight(self.base_layer, self.original_weight())
        self.base_mode = "non_destructive"
        self.merged = False

    @torch.no_grad()
    def truncate_base(self) -> None:
        """Inverse of ``restore_base``: an unmerged non-destructive layer writes ``W_trunc = W - R`` into its base
        weight and runs in place from then on (same output, within one rounding of the base dtype)."""
        if self.base_mode != "non_destructive" or self.merged:
            raise RuntimeError("truncate_base needs an unmerged non-destructive KaSA layer")
        self.check_base_write("truncate_base")
        write_base_weight(
            self.base_layer, truncate(base_weight(self.base_layer), self.removed_left, self.removed_right)
        )
        self.base_mode = "in_place"

    def check_base_write(self, operation: str, where: str = "KaSA layer") -> None:
        """Raise, changing nothing, unless ``operation`` (``merge``, ``unmerge``, ``restore_base``,
        ``truncate_base``) can write this layer's base weight: the whole weight is here (not partitioned by
        ZeRO-3, not on ``meta``), the terms it adds are finite, and the result fits the base dtype."""
        param = self.base_layer.weight
        check_base_weight(param, where)
        if is_quantized_layer(self.base_layer):
            raise ValueError(write_refusal(where, self.base_layer, operation))
        if is_partitioned(param) and param.numel() == 0:
            raise ValueError(
                f"{where}: the base weight is partitioned by DeepSpeed ZeRO-3, so {operation} cannot write it. Save "
                "the adapter (KaSATrainer.save_model) and merge or unload it in a single process: "
                "kasa_trl.load_kasa_adapter(base, adapter_dir), or `kasa-trl merge ADAPTER OUT --base BASE`"
            )
        nd = self.base_mode == "non_destructive"
        uses_removed = {"merge": nd, "unmerge": nd, "restore_base": True, "truncate_base": True}[operation]
        uses_delta = operation in ("merge", "unmerge") or (operation == "restore_base" and self.merged)
        terms = (
            {"removed_left": self.removed_left, "removed_right": self.removed_right} if uses_removed else {}
        )
        if uses_delta:
            terms.update(self.adapter_params())
        bad = [key for key, t in terms.items() if not torch.isfinite(t).all()]
        if bad:
            raise ValueError(
                f"{where}: {', '.join(bad)} hold non-finite values (NaN/Inf); {operation} would write them into "
                "the base weight. Nothing was changed: reload the adapter from its last good save"
            )
        # |R_ij| <= ||left_i|| ||right_:j|| and |dW_ij| <= scaling ||(B sigma)_i|| ||A_:j|| (Cauchy-Schwarz): a
        # cheap bound on the result; only when it exceeds the dtype's range is the result itself computed.
        weight = base_weight(self.base_layer)
        bound = float(weight.abs().max()) if weight.numel() else 0.0
        if uses_removed:
            bound += _max_row_norm(self.removed_left) * _max_row_norm(self.removed_right.T)
        if uses_delta:
            scaled_b = self.lora_B.detach().double() * self.lora_diag.detach().double()
            bound += abs(self.scaling) * _max_row_norm(scaled_b) * _max_row_norm(self.lora_A.detach().T)
        if bound <= torch.finfo(weight.dtype).max / 2:
            return
        result = base_weight(self.base_layer).to(torch.float64)
        if uses_removed:
            sign = 1.0 if operation in ("unmerge", "restore_base") else -1.0
            result = result + sign * self._removed_float64()
        if uses_delta:
            sign = 1.0 if operation == "merge" else -1.0
            result = result + sign * self.delta_weight().to(torch.float64)
        if not torch.isfinite(result.to(weight.dtype)).all():
            raise ValueError(
                f"{where}: {operation} would overflow the base dtype {weight.dtype} (the result exceeds "
                f"{torch.finfo(weight.dtype).max:g}); nothing was changed. Load the base in float32 (or bfloat16) "
                "to merge this adapter"
            )

    def _removed_float64(self) -> torch.Tensor:
        """``R`` in float64, the very product ``truncate`` subtracted."""
        return removed_float64(self.removed_left, self.removed_right)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, n_removed={self.n_removed}, scaling={self.scaling:g}, base_mode={self.base_mode}, "
            f"merged={self.merged}"
        )


def _max_row_norm(matrix: torch.Tensor) -> float:
    """The largest Euclidean norm of a row of ``matrix`` (0 for an empty one)."""
    if matrix.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(matrix.detach().double(), dim=1).max())
