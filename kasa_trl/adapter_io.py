"""Saving a model's KaSA adapter, and loading one onto a base model.

The files and every check of them that needs no model live in ``adapter_files`` (their contents:
``adapter_format``). Loading checks, before the model is changed, that the model is the base the adapter was trained
on: every target module exists, is supported, has the adapter's shapes and still holds the base weight
(``fingerprint``: a copy in another float dtype passes, a different checkpoint or an already truncated one does
not). It rebuilds the truncation from the stored factors: no
decomposition runs, and the result is bit-identical on any hardware.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_files import AdapterInfo, read_adapter, read_adapter_info, read_adapter_with_info, write_adapter
from .adapter_format import (
    ADAPTER_FILE,
    BASE_MODEL_KEY,
    BASE_QUANTIZATION_KEY,
    CONFIG_FILE,
    FORMAT,
    TENSOR_KEYS,
)
from .config import KaSAConfig
from .distributed import is_partitioned
from .fingerprint import TOLERANCE, base_deviation
from .layer import KaSALinear
from .model import get_kasa_config, install_kasa_layers, kasa_layers
from .quantized import (
    RECORD_LAYERS,
    base_mismatch_detail,
    quantization_kind,
    quantization_record,
)
from .shared_weights import config_for_targets
from .targets import check_adapter_fits, check_supported, removed_rank
from .weights import base_weight, stored_weight, weight_shape

__all__ = [  # the file-level names are re-exported: callers import them from here
    "ADAPTER_FILE",
    "BASE_MODEL_KEY",
    "BASE_QUANTIZATION_KEY",
    "CONFIG_FILE",
    "FORMAT",
    "TENSOR_KEYS",
    "AdapterInfo",
    "adapter_state_dict",
    "base_quantization",
    "layer_tensors",
    "load_kasa_adapter",
    "model_name_or_path",
    "read_adapter",
    "read_adapter_info",
    "save_kasa_adapter",
    "verify_adapter_base",
    "write_adapter",
]


# --- saving ------------------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter, keyed ``<layer>.<key>``, detached and on CPU."""
    tensors = {
        f"{name}.{key}": tensor
        for name, layer in kasa_layers(model).items()
        for key, tensor in layer_tensors(layer).items()
    }
    if not tensors:
        raise ValueError("model carries no KaSA layers; nothing to save (call apply_kasa first)")
    return tensors


def layer_tensors(layer: KaSALinear) -> dict[str, torch.Tensor]:
    """What an adapter file holds for ``layer``: each of ``TENSOR_KEYS``, detached, contiguous, on CPU."""
    values = {
        **layer.adapter_params(),
        "removed_left": layer.removed_left,
        "removed_right": layer.removed_right,
        "base_fingerprint": layer.base_fingerprint,
    }
    return {key: values[key].detach().cpu().contiguous() for key in TENSOR_KEYS}


def model_name_or_path(model: nn.Module) -> str | None:
    """The hub id or directory ``model`` was loaded from, as transformers records it (``None`` if unknown)."""
    for owner in (model, getattr(model, "config", None)):
        name = getattr(owner, "name_or_path", None)
        if isinstance(name, str) and name:
            return name
    return None


def base_quantization(model: nn.Module) -> dict[str, Any] | None:
    """What the adapter file records about the quantization of ``model``'s adapted base layers (``None`` when none
    is quantized): see ``kasa_trl.quantized.quantization_record``."""
    return quantization_record(model, {name: layer.base_layer for name, layer in kasa_layers(model).items()})


def save_kasa_adapter(
    model: nn.Module, save_directory: str | os.PathLike[str], *, base_model_name_or_path: str | None = None
) -> Path:
    """Write the adapter of ``model`` to ``save_directory`` (created if needed); returns the directory.

    ``base_model_name_or_path`` (default: the name transformers recorded when loading the base, if any) is stored
    with the adapter; ``read_adapter_info`` returns it. Nothing is written if a tensor is non-finite.
    """
    base = base_model_name_or_path if base_model_name_or_path is not None else model_name_or_path(model)
    return write_adapter(
        save_directory,
        adapter_state_dict(model),
        get_kasa_config(model),
        base_model_name_or_path=base,
        base_quantization=base_quantization(model),
    )


# --- loading onto a model ----------------------------------------------------------------------------------------


def verify_adapter_base(model: nn.Module, adapter_directory: str | os.PathLike[str]) -> None:
    """Every check ``load_kasa_adapter`` runs, without changing ``model``: the files (header, dtypes, shapes,
    finite values, ``kasa_config.json``), and that ``model`` is the base the adapter was trained on (each target
    exists, is supported, has the adapter's shapes and the base weight: see ``fingerprint``)."""
    _checked_load(model, adapter_directory, True)


def load_kasa_adapter(
    model: nn.Module, adapter_directory: str | os.PathLike[str], *, is_trainable: bool = False
) -> nn.Module:
    """Rebuild the saved KaSA adapter on ``model``, an untouched copy of the base it was trained on.

    Runs no decomposition. Everything ``verify_adapter_base`` checks is checked before the model is modified,
    so an error leaves ``model`` unchanged. A failure while the layers are built (out of memory, Ctrl-C) writes
    back the weights truncated so far (within one rounding of the base dtype) before it propagates.

    The base mode is chosen for ``model``, silently: the file's ``base_mode`` records how the adapter was trained,
    and both modes compute the same function. An ``in_place`` adapter is rebuilt ``non_destructive`` on a base whose
    target weights are bf16/fp16, quantized or shared with another module (the choice ``apply_kasa``'s ``"auto"``
    makes there: a 16-bit copy of ``W - R`` would be rounded by about as much as ``R``); the loaded model's
    ``kasa_config.base_mode`` records the mode used.
    """
    config, per_layer, modules = _checked_load(model, adapter_directory, is_trainable)
    # Nothing was modified so far. Building a layer truncates its weight in in_place mode.
    layers: dict[str, KaSALinear] = {}
    try:
        for name, tensors in per_layer.items():
            layer = KaSALinear(
                modules[name],
                tensors["removed_left"],
                tensors["removed_right"],
                r=config.r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                base_mode=config.base_mode,
                adapter_dtype=tensors["lora_A"].dtype,
                base_fingerprint=tensors["base_fingerprint"],
            )
            layers[name] = layer
            with torch.no_grad():
                for key, param in layer.adapter_params().items():
                    param.copy_(tensors[key])
    except BaseException:
        for layer in reversed(layers.values()):
            layer.restore_base()
        raise
    install_kasa_layers(model, layers, config)
    if not is_trainable:
        for layer in layers.values():
            for param in layer.adapter_params().values():
                param.requires_grad_(False)
    return model


def _checked_load(
    model: nn.Module, adapter_directory: str | os.PathLike[str], is_trainable: bool
) -> tuple[KaSAConfig, dict[str, dict[str, torch.Tensor]], dict[str, nn.Module]]:
    """The adapter's config (its base mode resolved for ``model``), tensors and target modules, all checked."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(is_trainable, bool):
        raise TypeError(f"is_trainable must be True or False, got {is_trainable!r}")
    if kasa_layers(model):
        raise ValueError("model already carries KaSA layers; load the adapter onto a fresh base model")
    info, per_layer = read_adapter_with_info(adapter_directory)
    config = info.config
    where = Path(adapter_directory) / ADAPTER_FILE
    modules = {
        name: _target_module(model, name, tensors, config, where) for name, tensors in per_layer.items()
    }
    names_of: dict[int, list[str]] = {}
    for name, module in modules.items():
        names_of.setdefault(id(module), []).append(name)
    aliases = [names for names in names_of.values() if len(names) > 1]
    if aliases:
        raise ValueError(
            f"adapter {where} lists {aliases[0]}, which are one module of {type(model).__name__} under several "
            "names: loading would truncate its weight once per name. The file was not written by this kasa_trl "
            "for this model; re-save the adapter"
        )
    try:
        # The file's mode is a record, not a request: both modes compute the same function W - R + dW. A recorded
        # in_place is resolved as "auto" for this base (config_for_targets): non_destructive on a 16-bit,
        # quantized or shared target weight, where W - R stored in place would be rounded by about as much as R.
        if config.base_mode == "in_place":
            config = dataclasses.replace(config, base_mode="auto")
        config = config_for_targets(model, modules, config)
    except (TypeError, ValueError) as e:
        raise type(e)(f"adapter {where}: {e}") from None
    recorded = info.base_quantization or {}
    _check_base_weights(modules, per_layer, where, recorded.get(RECORD_LAYERS, {}))
    return config, per_layer, modules


def _target_module(
    model: nn.Module, name: str, tensors: dict[str, torch.Tensor], config: KaSAConfig, where: Path
) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"adapter {where} targets {name}, which {type(model).__name__} does not have; "
            "load it onto the base model it was trained on"
        ) from None
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_meta:
        raise ValueError(
            f"adapter {where}: the weight of {name} is on the meta device (the model was built without its "
            "weights, e.g. under init_empty_weights or with device_map='meta'); load the base model with its "
            "weights, then the adapter"
        )
    try:
        check_supported(name, module)
    except (TypeError, ValueError) as e:
        raise type(e)(f"adapter {where}: {e}") from None
    if is_partitioned(stored_weight(module)):
        raise ValueError(
            f"adapter {where}: the weight of {name} is partitioned by DeepSpeed ZeRO-3; load the adapter onto "
            "the model before deepspeed.initialize (or the Trainer) partitions it"
        )
    check_adapter_fits(name, module, tensors, config.r, f"file {where}")
    out_features, in_features = weight_shape(module)
    r, n = config.r, tensors["removed_left"].shape[1]
    try:
        expected_n = removed_rank(module, config, name)
    except ValueError as e:
        raise ValueError(f"adapter {where}: {e}") from None
    if n != expected_n:
        raise ValueError(
            f"adapter {where}: layer {name} holds {n} removed components but truncation={config.truncation!r} "
            f"with r={r} removes {expected_n} from a {out_features}x{in_features} weight; the file is damaged: "
            "re-save the adapter"
        )
    return module


def _check_base_weights(
    modules: dict[str, nn.Module],
    per_layer: dict[str, dict[str, torch.Tensor]],
    where: Path,
    recorded_kinds: dict[str, str],
) -> None:
    """Every target weight is the base the adapter was trained on (the rule: ``fingerprint``'s docstring; a
    quantized weight is compared dequantized). ``recorded_kinds``: the quantization of each layer at training."""
    mismatched = {}
    for name, module in modules.items():
        tensors = per_layer[name]
        deviation = base_deviation(
            base_weight(module),
            tensors["base_fingerprint"],
            tensors["removed_left"],
            tensors["removed_right"],
        )
        if not deviation.matches:
            mismatched[name] = deviation
    if not mismatched:
        return
    name, deviation = next(iter(mismatched.items()))
    quantization = base_mismatch_detail(recorded_kinds.get(name), quantization_kind(modules[name]), name)
    if quantization is not None:
        detail = f"{quantization} (its fingerprint moved by {deviation.projections:.3g} of the weight's RMS)"
    elif not bool(torch.isfinite(base_weight(modules[name])).all()):
        detail = "its weights hold NaN/Inf: check the base checkpoint"
    elif deviation.already_truncated:
        detail = (
            f"it no longer carries the directions this adapter removes ({deviation.removed_kept:.0%} of their "
            "singular values left): the base is already truncated, e.g. a merged model or one that had this "
            "adapter loaded"
        )
    else:
        detail = (
            f"its fingerprint moved by {deviation.projections:.3g} and the removed directions by "
            f"{deviation.removed:.3g} of the weight's RMS, its norm by {deviation.norm:.2%}; the tolerance is "
            f"{TOLERANCE} (a bf16/fp16 copy of the same weights moves them by under 0.006)"
        )
    others = (
        f"; {len(mismatched) - 1} more of the {len(modules)} layers differ" if len(mismatched) > 1 else ""
    )
    raise ValueError(
        f"adapter {where}: the weight of {name} differs from the base this adapter was trained on (fingerprint "
        f"mismatch); load the adapter onto the same base checkpoint, unmodified (not already truncated or "
        f"merged): {detail}{others}"
    )
