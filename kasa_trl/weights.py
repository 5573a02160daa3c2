"""A target's weight as KaSA sees it: ``(out, in)``, whatever layout the module stores it in.

``nn.Linear`` stores its weight as ``(out, in)``; transformers' ``Conv1D`` (the GPT-2 family) stores the transpose,
``(in, out)``. Every KaSA computation works on ``(out, in)``: these functions are the one place that knows how a
module stores its weight, for reading it, writing it, its shape (also while ZeRO-3 partitions it) and tensors laid
out like it.
A bitsandbytes 4-bit/8-bit layer (``quantized``) is read dequantized: its ``base_weight`` is a full-precision copy
of what it computes with, its shape the layer's own; it is never written.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .distributed import is_partitioned
from .quantized import dequantized_weight, is_quantized_layer, is_quantized_weight, quantized_shape

# The modules KaSA wraps: the two layouts this module knows.
SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)
# Base weight dtypes a layer computes with: anything else is a quantized or packed format (int8, float8...).
SUPPORTED_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def stores_transposed(module: nn.Module) -> bool:
    """Whether ``module`` keeps its weight as ``(in, out)`` (transformers' ``Conv1D``; PEFT's ``fan_in_fan_out``)."""
    return isinstance(module, Conv1D)


def stored_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight parameter itself, in the layout the module stores it (``nn.Module`` types its
    attributes ``Tensor | Module``)."""
    return cast(torch.Tensor, module.weight)


def base_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as ``(out, in)``: a view of the parameter's data (empty while ZeRO-3 partitions it); for
    a quantized layer, a dequantized copy (what it computes with)."""
    if is_quantized_layer(module):
        return dequantized_weight(module)
    return to_storage_layout(module, stored_weight(module).data)


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of ``module``'s weight, also while ZeRO-3 partitions it (or bitsandbytes packs it)."""
    if is_quantized_layer(module):  # the packed weight's shape is not the layer's
        return quantized_shape(module)
    weight = stored_weight(module)
    # ds_shape: the whole weight's shape, set by DeepSpeed on the parameters it partitions
    rows, cols = tuple(cast(Any, weight).ds_shape) if is_partitioned(weight) else tuple(weight.shape)
    return (cols, rows) if stores_transposed(module) else (rows, cols)


def to_storage_layout(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (out, in) laid out as ``module`` stores its weight (a transposed view for ``Conv1D``). The
    transposition is its own inverse, so it also turns a stored weight into ``(out, in)``."""
    return tensor.T if stores_transposed(module) else tensor


@torch.no_grad()
def write_base_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy ``weight`` (out, in) into ``module``'s weight, in its dtype and layout."""
    stored_weight(module).data.copy_(to_storage_layout(module, weight))


def check_base_weight(weight: torch.Tensor, where: str) -> None:
    """Raise unless ``weight`` is a plain ``nn.Parameter`` of a supported float dtype holding values (not on the
    ``meta`` device), or a bitsandbytes quantized weight (read dequantized: ``quantized``). ``where`` names the
    module in the message."""
    if is_quantized_weight(weight):
        return
    if type(weight) is not nn.Parameter or weight.dtype not in SUPPORTED_WEIGHT_DTYPES:
        raise TypeError(
            f"{where} holds a {type(weight).__name__} of dtype {weight.dtype}: quantized or packed weights are not "
            "supported; load the base in fp32/bf16/fp16 or exclude this module"
        )
    if weight.device.type == "meta":
        raise ValueError(
            f"{where} has its weight on the meta device (shapes only, no values: built under init_empty_weights "
            "or loaded with device_map='meta'); KaSA needs the real weights. Load the model with its weights "
            "(e.g. from_pretrained(...) on cpu or cuda) before adapting it"
        )
