"""Putting KaSA into a model and taking it out again.

``apply_kasa`` validates every target before it touches anything, decomposes each target weight once, then
swaps the targets for ``KaSALinear`` layers; a failure leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .config import KaSAConfig
from .decomposition import minor_components_many
from .distributed import (
    broadcast_adapters,
    gathered,
    is_partitioned,
    rank_and_world,
    sharded_decompose,
    weight_shape,
    writable_partition,
)
from .layer import SUPPORTED_BASE_LAYERS, KaSALinear

# A function computing the removed factors ``(left, right)`` of every target, optionally followed by the original
# weight's fingerprint; replaced under ZeRO-3 by a sharded schedule (which returns the fingerprints).
Decomposer = Callable[[dict[str, nn.Module], dict[str, int], KaSAConfig], dict[str, tuple[torch.Tensor, ...]]]


def kasa_layers(model: nn.Module) -> dict[str, KaSALinear]:
    """Every KaSA layer of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, KaSALinear)}


def get_kasa_config(model: nn.Module) -> KaSAConfig:
    """The ``KaSAConfig`` ``model`` was adapted with."""
    config = getattr(model, "kasa_config", None)
    if not isinstance(config, KaSAConfig):
        raise ValueError("model carries no KaSA adapter; call kasa_trl.apply_kasa(model, config) first")
    return config


def apply_kasa(model: nn.Module, config: KaSAConfig, *, decomposer: Decomposer | None = None) -> nn.Module:
    """Adapt ``model`` in place with KaSA and return it; only adapter parameters stay trainable.

    Each target's ``n`` smallest singular triplets (n = r with the paper's truncation) are removed from the
    frozen weight and kept with the adapter (DESIGN.md sections 2 and 4).
    """
    if not isinstance(config, KaSAConfig):
        raise TypeError(f"config must be a kasa_trl.KaSAConfig, got {type(config).__name__}")
    existing = kasa_layers(model)
    if existing:
        raise ValueError(
            f"model already carries {len(existing)} KaSA layers (e.g. {next(iter(existing))}); "
            "call kasa_trl.unload(model) or merge_and_unload(model) before applying KaSA again"
        )
    targets = find_targets(model, config)
    n_removed = {name: removed_rank(module, config, name) for name, module in targets.items()}
    if decomposer is None:
        zero3 = any(is_partitioned(module.weight) for module in targets.values())
        decomposer = sharded_decompose if zero3 or rank_and_world()[1] > 1 else decompose_targets
    factors = decomposer(targets, n_removed, config)
    # Nothing was modified so far; from here on every step succeeds or is a bug.
    layers = []
    for name, module in targets.items():
        left, right, *known = factors[name]  # the sharded decomposer also returns the original's fingerprint
        fingerprint = known[0] if known else None
        layer_args = dict(
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            base_mode=config.base_mode,
            base_fingerprint=fingerprint,
        )
        weight = module.weight
        in_place = config.base_mode == "in_place"
        if is_partitioned(weight) and (
            fingerprint is None or (in_place and writable_partition(weight) is None)
        ):
            # Gathered so the layer can fingerprint and truncate the whole weight; rank 0's result is
            # re-partitioned on exit (every rank computed the same one from the same factors).
            with gathered([weight], modifier_rank=0 if in_place else None):
                layer = KaSALinear(module, left, right, **layer_args)
        else:  # whole, or ZeRO-3 with a known fingerprint: each rank truncates its own partition
            layer = KaSALinear(module, left, right, **layer_args)
        _set_submodule(model, name, layer)
        layers.append(layer)
    broadcast_adapters(layers)
    _freeze_all_but_adapters(model)
    model.kasa_config = config
    return model


def decompose_targets(
    targets: dict[str, nn.Module], n_removed: dict[str, int], config: KaSAConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The removed factors ``(left (out, n), right (n, in))`` of each target (several at once on CPU cores)."""
    names = list(targets)
    weights = [base_weight(targets[name]) for name in names]
    ns = [n_removed[name] for name in names]
    factors = {}
    # closing: interrupted between two layers (Ctrl-C), the worker threads are shut down here, not whenever the
    # generator is collected (an error raised inside the decomposition ends the generator itself).
    with contextlib.closing(minor_components_many(weights, ns, config.decomposition_method)) as results:
        for name, weight in _progress(list(zip(names, weights, strict=True)), "KaSA: decomposing"):
            try:
                factors[name] = next(results)
            except ValueError:
                # The decomposition finds a non-finite weight from its Gram's diagonal, without a pass of its own
                # over every weight: name the layer (nothing was modified yet).
                _check_finite_weight(name, weight)
                raise
    return factors


def base_weight(module: nn.Module) -> torch.Tensor:
    """A target's weight as (out, in), whatever its storage layout."""
    weight = module.weight.data
    return weight.T if isinstance(module, Conv1D) else weight


def removed_rank(module: nn.Module, config: KaSAConfig, name: str) -> int:
    """How many singular triplets KaSA removes from ``module`` (validates ``r`` for this layer)."""
    out_features, in_features = weight_shape(module)
    k = min(out_features, in_features)
    if config.r >= k:
        raise ValueError(
            f"r={config.r} must be < min(in, out)={k} for {name} ({out_features}x{in_features}); "
            f"lower r or exclude {name.rsplit('.', 1)[-1]!r} with exclude_modules"
        )
    if config.truncation == "paper":
        return config.r
    # The official code keeps in_features - r components, so only the excess over that is dropped.
    return max(0, k - (in_features - config.r))


def find_targets(model: nn.Module, config: KaSAConfig) -> dict[str, nn.Module]:
    """The modules ``config`` selects, validated: supported, floating-point, and at least one."""
    head = _output_head(model)
    selected: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        if config.target_modules == "all-linear":
            if isinstance(module, SUPPORTED_BASE_LAYERS) and module is not head:
                selected[name] = module
        elif _matches(name, config.target_modules):
            selected[name] = module
    if not selected:
        candidates = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, SUPPORTED_BASE_LAYERS)}
        )
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
            f"Linear/Conv1D module names in this model: {candidates}"
        )
    for name, module in selected.items():
        _check_supported(name, module)
    return selected


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every KaSA layer by its base layer holding ``W_trunc + dW``: a plain model, same outputs."""
    for name, layer in kasa_layers(model).items():
        if not layer.merged:
            layer.merge()
        _set_submodule(model, name, layer.base_layer)
    _drop_config(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Replace every KaSA layer by its base layer holding the ORIGINAL weight (bit-exact in non-destructive
    mode; within one rounding of the base dtype in in-place mode)."""
    for name, layer in kasa_layers(model).items():
        original = layer.original_weight()
        layer._write_base_weight(original)
        _set_submodule(model, name, layer.base_layer)
    _drop_config(model)
    return model


@contextlib.contextmanager
def kasa_adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes with the truncated base only (dW off): the step-0 policy."""
    layers = list(kasa_layers(model).values())
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        if layer.merged:
            raise RuntimeError("cannot disable a merged KaSA adapter; unmerge it first")
        layer.adapter_enabled = False
    try:
        yield
    finally:
        for layer, enabled in zip(layers, previous, strict=True):
            layer.adapter_enabled = enabled


def _matches(name: str, pattern: list[str] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _output_head(model: nn.Module) -> nn.Module | None:
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        with contextlib.suppress(Exception):
            return get_head()
    return None


def _check_supported(name: str, module: nn.Module) -> None:
    if not isinstance(module, SUPPORTED_BASE_LAYERS):
        raise TypeError(
            f"{name} is {_article(type(module).__name__)} {type(module).__name__}, which KaSA cannot wrap: supported are nn.Linear and "
            "transformers' Conv1D. Narrow target_modules or add it to exclude_modules"
        )
    weight = module.weight
    if type(weight) is not nn.Parameter or not weight.is_floating_point():
        raise TypeError(
            f"{name} ({type(module).__name__}) holds a {type(weight).__name__} of dtype {weight.dtype}: "
            "quantized or packed weights are not supported; load the base in fp32/bf16/fp16 "
            "or exclude this module"
        )


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _check_finite_weight(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"{name} has non-finite (NaN/Inf) weights; KaSA cannot decompose it. Check the checkpoint or "
            "exclude the module"
        )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _freeze_all_but_adapters(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in kasa_layers(model).values():
        for param in layer.adapter_params().values():
            param.requires_grad_(True)


def _drop_config(model: nn.Module) -> None:
    if "kasa_config" in vars(model):
        del model.kasa_config


def _progress(items, desc: str):
    items = list(items)
    rank = int(os.environ.get("RANK", "0"))
    return tqdm(items, desc=desc, unit="layer", disable=rank != 0 or len(items) < 2, leave=False)
