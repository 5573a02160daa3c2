"""Quantized base layers: bitsandbytes 4-bit (``Linear4bit``: nf4 or fp4, with or without double quantization,
any compute dtype) and 8-bit (``Linear8bitLt``, LLM.int8), as transformers loads them with
``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``.

KaSA adapts a quantized layer in ``non_destructive`` mode only: the packed weight is never written, and the layer
computes ``base_q(x) - R x + s B diag(sigma) A x``. Everything KaSA reads from the weight (the decomposition, the
fingerprint, ``effective_weight``) reads the DEQUANTIZED weight, ``dequant(W)``: what the quantized layer computes
with. The removed part ``R`` is the ``n`` smallest singular triplets of ``dequant(W)``, so the layer's effective
weight ``dequant(W) - R + dW`` has exactly those directions removed.

``in_place`` is refused: it would have to re-quantize ``W - R``, and the 4-bit rounding of the result changes the
weight by about as much as ``R`` itself (the truncation would drown in it, and the original weight be lost).

bitsandbytes is never imported here: a model holding bitsandbytes layers has imported it already, so
``sys.modules`` tells whether any layer can be one (and models without bitsandbytes pay nothing).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any, cast

import torch
from torch import nn

# The adapter file's record of its base's quantization (``adapter_format.BASE_QUANTIZATION_KEY``): {"layers":
# {name: kind}, "config": the BitsAndBytesConfig as a dict (None when the model carries none)}.
RECORD_LAYERS = "layers"
RECORD_CONFIG = "config"


def _bnb() -> ModuleType | None:
    return sys.modules.get("bitsandbytes")


def _loaded_bnb() -> ModuleType:
    """bitsandbytes, which a quantized layer's existence proves imported."""
    bnb = _bnb()
    if bnb is None:  # unreachable for a layer is_quantized_layer accepted
        raise RuntimeError("bitsandbytes is not imported, so no layer is quantized by it")
    return bnb


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``."""
    bnb = _bnb()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes ``Params4bit`` or ``Int8Params`` (a quantized layer's weight)."""
    bnb = _bnb()
    return bnb is not None and isinstance(weight, (bnb.nn.Params4bit, bnb.nn.Int8Params))


def has_quantized_layers(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a bitsandbytes quantized layer."""
    return _bnb() is not None and any(is_quantized_layer(m) for m in model.modules())


def quantization_kind(module: nn.Module) -> str | None:
    """How ``module``'s weight is quantized, in words (``"bitsandbytes 4-bit nf4, double quantization"``,
    ``"bitsandbytes 8-bit (LLM.int8)"``); ``None`` for a layer that is not quantized. Two layers of one kind
    dequantize the same full-precision weight alike."""
    if not is_quantized_layer(module):
        return None
    weight: Any = module.weight
    if isinstance(module, _loaded_bnb().nn.Linear4bit):
        double = ", double quantization" if weight.compress_statistics else ""
        return f"bitsandbytes 4-bit {weight.quant_type}{double}"
    return "bitsandbytes 8-bit (LLM.int8)"


def quantized_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of the quantized layer ``module`` (its packed weight has another shape)."""
    layer: Any = module
    return int(layer.out_features), int(layer.in_features)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a quantized layer computes with, (out, in), as a new full-precision tensor on its device:
    ``dequantize_4bit`` (in the dtype the weight was quantized from) or the int8 rows times their scales / 127
    (float32). The layer's quantized state is not changed.

    bitsandbytes repacks a 4-bit weight for its CPU kernel at the first eval-mode forward without gradients on CPUs
    with AVX512-BF16 (``packing_format_for_cpu``; the block scales are rounded to bfloat16 on the way): such a
    weight is read through bitsandbytes' inverse of that packing, on copies.
    """
    bnb = _loaded_bnb()
    out_features, in_features = quantized_shape(module)
    where = f"{type(module).__name__} ({out_features}x{in_features})"
    layer: Any = module  # bitsandbytes' attributes (weight.quant_state, state.SCB...) are untyped
    weight = layer.weight
    if isinstance(module, bnb.nn.Linear4bit):
        state = weight.quant_state
        if state is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError(
                f"{where} holds a weight bitsandbytes has not quantized yet (it quantizes when the layer is moved "
                "to its device); load the model with from_pretrained(..., quantization_config=...) or move it to "
                "its device before applying KaSA"
            )
        if getattr(state, "packing_format_for_cpu", False):
            return cpu_packed_4bit_weight(weight.data, state)
        return cast(torch.Tensor, bnb.functional.dequantize_4bit(weight.data, state))
    if layer.state.has_fp16_weights:
        raise ValueError(
            f"{where} keeps trainable fp16 weights (has_fp16_weights=True), not int8 ones; KaSA adapts int8 bases "
            "as transformers loads them (BitsAndBytesConfig(load_in_8bit=True), llm_int8_has_fp16_weight=False)"
        )
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return cast(torch.Tensor, bnb.functional.int8_vectorwise_dequant(weight.data, scales))


def cpu_packed_4bit_weight(packed: torch.Tensor, state: Any, block_n: int = 32) -> torch.Tensor:
    """The (out, in) weight of a 4-bit layer repacked for bitsandbytes' CPU kernel (0.50: ``functional.
    _convert_weight_packed_for_cpu``, whose own inverse does not restore non-nested block scales), as that kernel
    reads it: ``code[q] * absmax`` with the bfloat16 block scales, in the dtype the weight was quantized from.

    The packing: the (N, K) 4-bit codes, in tiles of ``block_n`` rows and pairs of columns, tile row-major, 64 codes
    per 32 bytes (the first 32 in the low nibbles, the next 32 in the high ones); ``absmax`` (K / blocksize, N),
    the per-block scales of the row-major (N, K) weight, transposed.
    """
    out_features, in_features = state.shape
    if packed.shape != (out_features, in_features // 2) or out_features % block_n:
        raise ValueError(
            f"a 4-bit weight packed for the CPU kernel has shape {tuple(packed.shape)}, not the expected "
            f"({out_features}, {in_features // 2}); this bitsandbytes packs differently from 0.50: put the model in "
            "train mode (model.train()) before its first forward to keep the standard layout"
        )
    rows = packed.reshape(-1, 32)
    codes = torch.cat([rows & 0xF, rows >> 4], dim=-1).long()  # (N * K / 64, 64)
    codes = codes.reshape(out_features // block_n, in_features // 2, block_n, 2).transpose(1, 2)
    codes = codes.reshape(out_features, in_features)  # (N, K)
    scales = state.absmax.T.float().repeat_interleave(state.blocksize, dim=1)  # (N, K)
    weight = state.code.float().to(codes.device)[codes] * scales
    return weight.to(getattr(state, "original_dtype", torch.float32))


def in_place_refusal(where: str, module: nn.Module) -> str:
    """Why ``base_mode='in_place'`` is refused for the quantized layer ``module`` (named ``where``), and what to
    use instead."""
    return (
        f"{where} is a quantized layer ({quantization_kind(module)}): base_mode='in_place' would have to re-quantize "
        "W - R, and the quantization rounding of the result changes the weight by about as much as the removed part "
        "R (the truncation would drown in it, and the original weight be lost). Use base_mode='non_destructive' "
        "(or 'auto', which picks it for quantized bases): the quantized weight stays as it is and R x is "
        "subtracted in forward"
    )


def write_refusal(where: str, module: nn.Module, operation: str) -> str:
    """Why ``operation`` (``merge``, ``unmerge``, ``restore_base``, ``truncate_base``) cannot write the weight of
    the quantized layer ``module`` (named ``where``), and what to do instead."""
    return (
        f"{where}: the base weight is quantized ({quantization_kind(module)}), so {operation} cannot write it; "
        "nothing was changed. To get a merged full-precision model, dequantize the whole model first "
        "(model.dequantize(): every bitsandbytes layer becomes an nn.Linear holding its dequantized weight, and "
        "the KaSA layers compute exactly what they computed), then merge; or save the adapter "
        "(kasa_trl.save_kasa_adapter) and run `kasa-trl merge ADAPTER OUT`, which does the same. "
        "kasa_trl.unload(model) takes the adapter out and leaves the quantized base untouched"
    )


def quantization_record(model: nn.Module, base_layers: Mapping[str, nn.Module]) -> dict[str, Any] | None:
    """What an adapter file records about its base's quantization: the kind of each quantized layer among
    ``base_layers`` (adapted name -> base layer) and the model's quantization config as a dict (what
    ``BitsAndBytesConfig.from_dict`` reads back), or ``None`` when no adapted layer is quantized."""
    kinds = {name: kind for name, layer in base_layers.items() if (kind := quantization_kind(layer))}
    if not kinds:
        return None
    config: Any = getattr(getattr(model, "config", None), "quantization_config", None)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {RECORD_LAYERS: kinds, RECORD_CONFIG: dict(config) if isinstance(config, Mapping) else None}


def loading_kwargs(record: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load a base quantized as ``record`` (``quantization_record``)
    says, on CPU (bitsandbytes 0.50 runs 4-bit and 8-bit layers there); ``{}`` for a full-precision base.
    ``where`` names the adapter in errors."""
    if record is None:
        return {}
    config = record.get(RECORD_CONFIG)
    if not isinstance(config, Mapping):
        raise ValueError(
            f"{where} was trained on a quantized base ({sorted(set(record[RECORD_LAYERS].values()))}) whose "
            "quantization config was not recorded (a model quantized by hand, not by from_pretrained); load that "
            "base quantized yourself and use kasa_trl.load_kasa_adapter"
        )
    try:
        import bitsandbytes  # noqa: F401  (the layers need it; fail here with the fix)
    except ImportError:
        raise ImportError(
            f"{where} was trained on a bitsandbytes-quantized base, which loads only with bitsandbytes installed: "
            "pip install 'kasa_trl[quantization]'"
        ) from None
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig.from_dict(dict(config)), "device_map": "cpu"}


def base_mismatch_detail(recorded: str | None, actual: str | None, name: str) -> str | None:
    """Why layer ``name`` of a base may differ from the one an adapter was trained on, when the quantization
    differs (``recorded``: the kind the adapter records, ``actual``: this layer's; ``None`` = full precision).
    ``None`` when both are the same kind."""
    if recorded == actual:
        return None
    was = recorded or "a full-precision weight"
    now = actual or "full precision"
    if recorded is not None:
        fix = (
            "load the base quantized as it was trained (from_pretrained with the BitsAndBytesConfig the adapter "
            "records: kasa_trl.adapter_io.read_adapter_info(dir).base_quantization['config']); for a "
            "full-precision model, merge the adapter into the dequantized base with `kasa-trl merge ADAPTER OUT`"
        )
    else:
        fix = (
            "load the full-precision base it was trained on; to serve it quantized, merge it first (`kasa-trl "
            "merge`) and quantize the merged model"
        )
    return (
        f"the adapter was trained on {was} for {name} and it is {now} here; the difference (a quantization "
        "error) is beyond the base check's tolerance, and the removed directions and the fingerprint the adapter "
        f"holds belong to the weight it was trained on: {fix}"
    )
