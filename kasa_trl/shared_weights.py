"""Weights a target shares with other modules (tied embeddings, one ``Parameter`` given to two layers), and the
config a model's targets get (``config_for_targets``: the base mode resolved, sharing and layer arguments checked).

KaSA adapts modules. A target whose weight memory another module also uses is refused in ``in_place`` mode, which
would truncate the weight for every user (``W - 2R`` for two targets); ``non_destructive`` mode never writes the
shared weight, so each adapted module computes with ``W - R`` plus its own update and every other user keeps ``W``;
``"auto"`` picks it for such a model. ``apply_kasa`` and adapter loading apply the same rule
(``check_shared_weights``); ``merge_and_unload`` refuses a layer whose weight is shared.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, cast

import torch
from torch import nn

from .config import KaSAConfig, resolve_base_mode
from .distributed import is_partitioned
from .layer import KaSALinear, check_layer_arguments
from .quantized import in_place_refusal, is_quantized_layer
from .weights import stored_weight


def config_for_targets(model: nn.Module, targets: dict[str, nn.Module], config: KaSAConfig) -> KaSAConfig:
    """``config`` as it applies to ``targets`` of ``model``: ``base_mode`` resolved for them
    (``resolve_model_base_mode``), the shared-weight rule (``check_shared_weights``) and the layer arguments
    checked. ``apply_kasa`` and adapter loading both start here."""
    base_mode = resolve_model_base_mode(model, targets, config.base_mode)
    check_shared_weights(model, targets, base_mode)
    check_layer_arguments(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        base_mode=base_mode,
    )
    resolved = cast(Literal["in_place", "non_destructive"], base_mode)  # checked just above
    return config if resolved == config.base_mode else dataclasses.replace(config, base_mode=resolved)


def resolve_model_base_mode(model: nn.Module, targets: dict[str, nn.Module], base_mode: str) -> str:
    """The concrete mode ``base_mode`` stands for on ``targets``: ``"auto"`` is ``"in_place"`` when every target
    weight is fp32/fp64, none is quantized and none is shared with another module, else ``"non_destructive"`` (a
    bf16/fp16 copy of ``W - R`` is rounded by about as much as ``R``, a quantized one by far more; a shared weight
    would be truncated for all its users). An explicit ``"in_place"`` on a quantized target is refused."""
    quantized = {name: module for name, module in targets.items() if is_quantized_layer(module)}
    if base_mode == "in_place" and quantized:
        name, module = next(iter(quantized.items()))
        raise ValueError(in_place_refusal(name, module))
    if base_mode == "auto" and quantized:
        return "non_destructive"
    mode = resolve_base_mode(base_mode, [stored_weight(module).dtype for module in targets.values()])
    if base_mode == "auto" and shared_weight_users(model, targets):
        return "non_destructive"
    return mode


def shared_weight_users(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, list[str]]:
    """For each target whose weight memory another module of ``model`` also holds (the same ``Parameter``, a
    tied weight, or an overlapping view), the qualified names of those other tensors; targets with a weight of
    their own are absent."""
    by_memory: dict[tuple[Any, ...], list[tuple[str, int, int, nn.Module]]] = {}
    wrapped = {id(m.base_layer) for m in model.modules() if isinstance(m, KaSALinear)}
    for module_name, module in model.named_modules():
        if id(module) in wrapped:  # named as the KaSA layer the user knows, not "<name>.base_layer"
            module_name = module_name.removesuffix(".base_layer")
        prefix = f"{module_name}." if module_name else ""
        holders = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for tensor_name, tensor in holders:
            key, start, end = _memory_span(tensor)
            by_memory.setdefault(key, []).append((prefix + tensor_name, start, end, module))
    shared = {}
    for name, module in targets.items():
        key, start, end = _memory_span(stored_weight(module))
        users = [
            user
            for user, user_start, user_end, owner in by_memory.get(key, [])
            if owner is not module and user_start < end and start < user_end
        ]
        if users:
            shared[name] = users
    return shared


def check_shared_weights(model: nn.Module, targets: dict[str, nn.Module], base_mode: str) -> None:
    """Raise, naming the modules and the fixes, if ``base_mode`` would change a weight that a target shares with
    another module: ``in_place`` truncates the shared memory for every user. ``non_destructive`` never writes
    it, so any sharing is allowed there (each adapted module computes with its own adapted weight, the other
    users with the original). ``apply_kasa`` and adapter loading apply this same rule."""
    if base_mode == "non_destructive":
        return
    shared = shared_weight_users(model, targets)
    if not shared:
        return
    pairs = "; ".join(f"{name}.weight with {', '.join(users)}" for name, users in list(shared.items())[:3])
    first = next(iter(shared))
    raise ValueError(
        f"{len(shared)} target(s) share their weight with other modules ({pairs}): base_mode='in_place' would "
        "truncate the shared weight for every user (twice when two of them are adapted). Use "
        "base_mode='non_destructive' (or 'auto', which picks it here): the shared weight stays untouched, each "
        "adapted module computes with W - R plus its own update and the other users with W. Or exclude "
        f"{first.rsplit('.', 1)[-1]!r} with exclude_modules, or untie the weights first (for tied embeddings: "
        "from_pretrained(..., tie_word_embeddings=False))"
    )


def _memory_span(tensor: torch.Tensor) -> tuple[tuple[Any, ...], int, int]:
    """``(memory key, first byte, end byte)`` of what ``tensor`` covers: tensors overlap when their keys are
    equal and their byte ranges intersect. A ZeRO-3 parameter is keyed by itself (its data is a placeholder)."""
    if is_partitioned(tensor) or tensor.numel() == 0 or tensor.device.type == "meta":
        return ("tensor", id(tensor)), 0, 1
    size = tensor.element_size()
    start = int(tensor.storage_offset()) * size  # an int outside symbolic tracing
    extent = 1 + sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return (str(tensor.device), tensor.untyped_storage().data_ptr()), start, start + extent * size
