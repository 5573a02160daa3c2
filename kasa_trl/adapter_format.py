"""What a kasa_trl adapter file holds: its names, and for every layer the tensors with their dtypes and shapes.

``kasa_adapter.safetensors`` holds, per KaSA layer, ``TENSOR_KEYS``: ``lora_A`` (r, in), ``lora_B`` (out, r),
``lora_diag`` (r,), the removed factors ``removed_left`` (out, n) and ``removed_right`` (n, in) in one of
``FACTOR_DTYPES``, and ``base_fingerprint`` (float64, see ``fingerprint``); its metadata holds ``FORMAT``, the config,
the layer list, when known the base model's name (``BASE_MODEL_KEY``), and for a quantized base how it was
quantized (``BASE_QUANTIZATION_KEY``, ``check_quantization_record``). ``check_layout`` and ``check_finite``
are the checks writing and reading share (``adapter_files``), so that a file written always reads back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NoReturn

import torch

from .config import KaSAConfig
from .fingerprint import N_PROBES
from .quantized import RECORD_CONFIG, RECORD_LAYERS

ADAPTER_FILE = "kasa_adapter.safetensors"
CONFIG_FILE = "kasa_config.json"
FORMAT = "kasa_trl.adapter.v1"

TENSOR_KEYS = ("lora_A", "lora_B", "lora_diag", "removed_left", "removed_right", "base_fingerprint")
# Metadata keys: FORMAT, the config and the layer list always; the base model's name when known (added later:
# files without it load as before).
BASE_MODEL_KEY = "base_model_name_or_path"
# The base's quantization when any adapted layer is quantized (``quantized.quantization_record``, as JSON; added
# later as well: files without it are from full-precision bases).
BASE_QUANTIZATION_KEY = "base_quantization"
FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# safetensors' dtype names, as a header lists them (to name a wrong dtype as torch does).
HEADER_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}

# A tensor's dtype (its header name if torch has none) and shape, as the header gives them.
Spec = tuple[torch.dtype | str, tuple[int, ...]]


def check_layout(
    specs: Mapping[str, Spec], layers: list[str], config: KaSAConfig, where: str, *, for_saving: bool
) -> None:
    """Raise unless every listed layer has exactly the adapter's tensors, with supported dtypes and consistent
    shapes (``specs``: per ``<layer>.<key>``, the dtype and shape). ``where`` names the file (or the save) in the
    message; ``for_saving`` picks the advice (a failed save is the caller's, a failed read asks to re-save)."""
    redo = "" if for_saving else "; re-save the adapter"
    if not layers:
        raise ValueError(f"{where}: the adapter holds no KaSA layers{redo}")
    bad = [name for name in layers if not isinstance(name, str) or not all(name.split("."))]
    if bad:
        raise ValueError(f"{where}: the layer list holds {bad[:3]!r}, not module names{redo}")
    expected_keys = {f"{name}.{key}" for name in layers for key in TENSOR_KEYS}
    for name in layers:
        missing = [key for key in TENSOR_KEYS if f"{name}.{key}" not in specs]
        if missing:
            raise ValueError(f"{where}: missing tensors {missing} for layer {name}; the file is incomplete")
    extra = sorted(set(specs) - expected_keys)
    if extra:
        raise ValueError(
            f"{where}: tensors {extra[:5]} belong to no listed layer (each layer has {list(TENSOR_KEYS)}){redo}"
        )
    for name in layers:
        _check_layer_layout({key: specs[f"{name}.{key}"] for key in TENSOR_KEYS}, name, config.r, where, redo)


def _check_layer_layout(specs: Mapping[str, Spec], name: str, r: int, where: str, redo: str) -> None:
    def fail(key: str, problem: str) -> NoReturn:
        raise ValueError(f"{where}: adapter tensor {name}.{key} {problem}{redo}")

    for key, (dtype, _) in specs.items():
        allowed = (torch.float64,) if key == "base_fingerprint" else FACTOR_DTYPES
        if dtype not in allowed:
            fail(key, f"has dtype {dtype}, expected one of {[str(d) for d in allowed]}")
    adapter_dtypes = {specs[key][0] for key in ("lora_A", "lora_B", "lora_diag")}
    if len(adapter_dtypes) > 1:
        fail("lora_B", f"and lora_A, lora_diag have different dtypes {sorted(map(str, adapter_dtypes))}")
    ranks = {key: len(shape) for key, (_, shape) in specs.items()}
    expected_ranks = {key: 1 if key in ("lora_diag", "base_fingerprint") else 2 for key in TENSOR_KEYS}
    for key, ndim in ranks.items():
        if ndim != expected_ranks[key]:
            fail(key, f"has shape {specs[key][1]}, expected a {expected_ranks[key]}-D tensor")
    out_features, in_features = specs["lora_B"][1][0], specs["lora_A"][1][1]
    n = specs["removed_left"][1][1]
    expected = {
        "lora_A": (r, in_features),
        "lora_B": (out_features, r),
        "lora_diag": (r,),
        "removed_left": (out_features, n),
        "removed_right": (n, in_features),
        "base_fingerprint": (N_PROBES + 1,),
    }
    for key, shape in expected.items():
        if specs[key][1] != shape:
            fail(
                key,
                f"has shape {specs[key][1]} but {name} ({out_features}x{in_features}, r={r}) needs {shape}; the "
                "adapter belongs to another model or the file is damaged",
            )
    if n > min(out_features, in_features):
        fail(
            "removed_left",
            f"holds {n} removed components, more than min(out, in)={min(out_features, in_features)}",
        )


def check_finite(tensors: Mapping[str, torch.Tensor], where: str, *, for_saving: bool) -> None:
    bad = sorted(key for key, t in tensors.items() if not bool(torch.isfinite(t).all()))
    if bad:
        fix = (
            "the adapter factors have diverged: lower the learning rate or the regularizer weights"
            if for_saving
            else "the adapter is damaged: restore a copy or an earlier checkpoint"
        )
        error = FloatingPointError if for_saving else ValueError
        raise error(f"{where}: non-finite (NaN/Inf) values in {bad[:5]}; {fix}")


def check_quantization_record(record: Any, layers: list[str], where: str, *, for_saving: bool) -> None:
    """Raise unless ``record`` (``BASE_QUANTIZATION_KEY``'s value) is ``{"layers": {adapted layer: kind (str)},
    "config": dict or None}`` naming only layers of ``layers``."""
    kinds = record.get(RECORD_LAYERS) if isinstance(record, dict) else None
    config = record.get(RECORD_CONFIG) if isinstance(record, dict) else None
    if (
        not isinstance(kinds, dict)
        or not all(isinstance(k, str) and k in layers and isinstance(v, str) for k, v in kinds.items())
        or not (config is None or isinstance(config, dict))
    ):
        redo = "" if for_saving else "; re-save the adapter"
        raise ValueError(
            f"{where}: the base quantization record must be {{'layers': {{adapted layer: kind}}, 'config': dict or "
            f"null}} naming adapted layers, got {json.dumps(record, default=str)[:200]}{redo}"
        )
