"""Putting KaSA into a model: ``apply_kasa``, the layers it installs, and what a model carrying them answers.

``apply_kasa`` checks everything it needs before its first change, so it either finishes or leaves the model as it
was (all or nothing): it validates the targets (``targets``, ``shared_weights``), decomposes each target weight once
(``target_decomposition``), validates the factors, builds every ``KaSALinear`` (undoing the truncations done so far
if anything still fails), then swaps the targets in. Taking KaSA out again is ``unloading``'s.

A target registered under several names (``named_modules`` lists it once) gets one ``KaSALinear``, installed under
every name, so every path computes the same adapted weight. Weights shared with other modules follow the rule of
``shared_weights``.

A model carrying KaSA layers refuses ``save_pretrained`` (which would write a checkpoint that ``from_pretrained``
reloads with every adapted layer randomly initialized) and names the calls that save what the user wants;
``uninstall_kasa_layers`` lifts the refusal with the layers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .config import LOW_PRECISION_DTYPES, KaSAConfig
from .distributed import broadcast_adapters, gathered, is_partitioned, rank_and_world, writable_partition
from .factors import removed_float64, subtract_removed
from .fingerprint import check_fingerprint, weight_fingerprint
from .layer import KaSALinear, check_removed_factors
from .shared_weights import config_for_targets
from .target_decomposition import Decomposer, decompose_targets, sharded_decompose
from .targets import find_targets, removed_rank
from .weights import base_weight, stored_weight, weight_shape

SAVE_PRETRAINED_REFUSAL = (
    "save_pretrained() is refused on a model carrying KaSA layers: it would write a checkpoint that "
    "from_pretrained() reloads with every adapted layer randomly initialized. Save the adapter with "
    "kasa_trl.save_kasa_adapter(model, dir) (reload it with kasa_trl.load_kasa_adapter(base_model, dir)), or a "
    "plain transformers model with kasa_trl.merge_and_unload(model).save_pretrained(dir); a Trainer should be "
    "kasa_trl.KaSATrainer, whose save_model writes the adapter"
)


def kasa_layers(model: nn.Module) -> dict[str, KaSALinear]:
    """Every KaSA layer of ``model`` by qualified name (a layer installed under several names: its first)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, KaSALinear)}


def get_kasa_config(model: nn.Module) -> KaSAConfig:
    """The ``KaSAConfig`` ``model`` was adapted with (``base_mode`` as resolved for this model, never "auto")."""
    config = getattr(model, "kasa_config", None)
    if not isinstance(config, KaSAConfig):
        raise ValueError("model carries no KaSA adapter; call kasa_trl.apply_kasa(model, config) first")
    return config


def apply_kasa(model: nn.Module, config: KaSAConfig, *, decomposer: Decomposer | None = None) -> nn.Module:
    """Adapt ``model`` in place with KaSA and return it; only adapter parameters stay trainable.

    Each target's ``n`` smallest singular triplets (n = r with the paper's truncation) are removed from the
    frozen weight and kept with the adapter (docs/design.md sections 1 and 4). ``base_mode="auto"`` is resolved
    here (``resolve_model_base_mode``) and ``model.kasa_config`` records the mode chosen. On any error the model is
    left as it was.
    """
    if not isinstance(config, KaSAConfig):
        raise TypeError(f"config must be a kasa_trl.KaSAConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config.validate()  # a list/dict field changed in place skipped the assignment checks
    existing = kasa_layers(model)
    if existing:
        raise ValueError(
            f"model already carries {len(existing)} KaSA layers (e.g. {next(iter(existing))}); "
            "call kasa_trl.unload(model) or merge_and_unload(model) before applying KaSA again"
        )
    targets = find_targets(model, config)
    config = config_for_targets(model, targets, config)
    n_removed = {name: removed_rank(module, config, name) for name, module in targets.items()}
    if decomposer is None:
        zero3 = any(is_partitioned(stored_weight(module)) for module in targets.values())
        decomposer = sharded_decompose if zero3 or rank_and_world()[1] > 1 else decompose_targets
    factors = decomposer(targets, n_removed, config)
    for name, module in targets.items():
        if name not in factors:
            raise ValueError(f"the decomposer returned no removed factors for {name}")
        left, right = factors[name][:2]
        check_removed_factors(left, right, *weight_shape(module), where=name)
    if config.base_mode == "in_place":
        _warn_low_precision_in_place(targets, factors)
    # Nothing was modified so far. Building a layer truncates its weight in in_place mode: a failure there (out
    # of memory, Ctrl-C) undoes the truncations done so far.
    layers = _build_layers(targets, factors, config)
    broadcast_adapters(list(layers.values()))
    install_kasa_layers(model, layers, config)
    return model


def install_kasa_layers(model: nn.Module, layers: dict[str, KaSALinear], config: KaSAConfig) -> None:
    """Put each layer in place of its base layer under every name the base layer has in ``model``, freeze all
    but the adapter parameters, record ``config`` as ``model.kasa_config`` and make ``save_pretrained`` refuse
    (``SAVE_PRETRAINED_REFUSAL``). Every base layer is checked to be in ``model`` before anything changes."""
    slots = _module_slots(model)
    missing = [name for name, layer in layers.items() if id(layer.base_layer) not in slots]
    if missing:
        raise ValueError(f"the base layers of {missing[:3]} are not submodules of {type(model).__name__}")
    for layer in layers.values():
        for parent, key in slots[id(layer.base_layer)]:
            setattr(parent, key, layer)
    freeze_all_but_adapters(model)
    model.kasa_config = config  # type: ignore[assignment]  # torch types nn.Module attributes Tensor | Module
    for module in model.modules():
        if _has_save_pretrained(module) and any(isinstance(m, KaSALinear) for m in module.modules()):
            module.save_pretrained = _SavePretrainedRefusal()  # type: ignore[assignment]  # as for kasa_config


def freeze_all_but_adapters(model: nn.Module) -> None:
    """``requires_grad=False`` on every parameter of ``model`` except the KaSA adapters' (True)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in kasa_layers(model).values():
        for param in layer.adapter_params().values():
            param.requires_grad_(True)


@contextlib.contextmanager
def kasa_adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes with the truncated base only (dW off): the step-0 policy."""
    layers = list(kasa_layers(model).values())
    merged = [name for name, layer in kasa_layers(model).items() if layer.merged]
    if merged:
        raise RuntimeError(f"cannot disable a merged KaSA adapter ({merged[0]}); unmerge it first")
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield
    finally:
        for layer, enabled in zip(layers, previous, strict=True):
            layer.adapter_enabled = enabled


def _build_layers(
    targets: dict[str, nn.Module], factors: Mapping[str, tuple[torch.Tensor, ...]], config: KaSAConfig
) -> dict[str, KaSALinear]:
    """A ``KaSALinear`` per target (truncating the weight in in_place mode); on failure the truncations done so
    far are undone (within one rounding of the base dtype) before the error propagates."""
    fingerprints = _base_fingerprints(targets, factors)  # checked before any weight is truncated
    layers: dict[str, KaSALinear] = {}
    in_place = config.base_mode == "in_place"
    try:
        for name, module in targets.items():
            left, right = factors[name][:2]
            fingerprint = fingerprints.get(name)
            layer_args: dict[str, Any] = dict(
                r=config.r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                base_mode=config.base_mode,
                base_fingerprint=fingerprint,
            )
            weight = stored_weight(module)
            if is_partitioned(weight) and (
                fingerprint is None or (in_place and writable_partition(weight) is None)
            ):
                # Gathered so the layer can fingerprint and truncate the whole weight; rank 0's result is
                # re-partitioned on exit (every rank computed the same one from the same factors).
                with gathered([weight], modifier_rank=0 if in_place else None):
                    layers[name] = KaSALinear(module, left, right, **layer_args)
            else:  # whole, or ZeRO-3 with a known fingerprint: each rank truncates its own partition
                layers[name] = KaSALinear(module, left, right, **layer_args)
    except BaseException:
        for layer in reversed(layers.values()):
            weight = layer.base_layer.weight
            with gathered([weight], modifier_rank=0 if is_partitioned(weight) else None):
                layer.restore_base()
        raise
    return layers


def _base_fingerprints(
    targets: dict[str, nn.Module], factors: Mapping[str, tuple[torch.Tensor, ...]]
) -> dict[str, torch.Tensor]:
    """The fingerprint of each target's original weight (the sharded decomposer's, else computed here; a ZeRO-3
    partitioned weight without one is fingerprinted by its layer, gathered), each checked to fit float64
    (``check_fingerprint``, naming the target) before any layer truncates a weight."""
    fingerprints = {}
    for name, module in targets.items():
        known = factors[name][2:]
        if known:
            fingerprints[name] = known[0]
        elif not is_partitioned(stored_weight(module)):
            fingerprints[name] = weight_fingerprint(base_weight(module))
        if name in fingerprints:
            check_fingerprint(fingerprints[name], weight_shape(module), name)
    return fingerprints


def _warn_low_precision_in_place(
    targets: dict[str, nn.Module], factors: Mapping[str, tuple[torch.Tensor, ...]]
) -> None:
    """Warn when an explicit in_place truncation is stored in a 16-bit dtype, with the measured error."""
    errors = {}
    for name, module in targets.items():
        if stored_weight(module).dtype in LOW_PRECISION_DTYPES:
            with gathered([stored_weight(module)]):
                errors[name] = truncation_rounding_error(base_weight(module), *factors[name][:2])
    if not errors:
        return
    worst = max(errors, key=errors.__getitem__)
    dtype = stored_weight(targets[worst]).dtype
    warnings.warn(
        f"base_mode='in_place' stores W_trunc = W - R in the base dtype ({dtype}), whose rounding swamps the "
        f"truncation: ||W_trunc_stored - (W - R)||_F / ||R||_F is {errors[worst]:.2g} at {worst} (worst of "
        f"{len(errors)} 16-bit layers). Use base_mode='non_destructive' (or 'auto', which picks it for bf16/fp16 "
        "bases): the base stays untouched and R is subtracted exactly in forward",
        UserWarning,
        stacklevel=3,
    )


def truncation_rounding_error(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    """``||W_trunc_stored - (W - R)||_F / ||R||_F``: how much storing the truncated ``weight`` (out, in) in its own
    dtype changes it, relative to the removed part ``R = left @ right`` (0 when ``R`` is 0)."""
    removed = removed_float64(left, right)
    exact = weight.to(torch.float64) - removed
    stored = subtract_removed(weight, removed).to(torch.float64)  # what in_place writes
    norm = float(torch.linalg.matrix_norm(removed))
    return float(torch.linalg.matrix_norm(stored - exact)) / norm if norm > 0 else 0.0


def uninstall_kasa_layers(model: nn.Module, layers: dict[str, KaSALinear]) -> None:
    """Inverse of ``install_kasa_layers``: put every layer's base layer back under each of its names; drop
    ``model.kasa_config`` and the ``save_pretrained`` refusal. The base weights are left as they are."""
    slots = _module_slots(model)
    for layer in layers.values():
        for parent, key in slots[id(layer)]:
            setattr(parent, key, layer.base_layer)
    for module in model.modules():
        if isinstance(vars(module).get("save_pretrained"), _SavePretrainedRefusal):
            del module.save_pretrained
    if "kasa_config" in vars(model):
        del model.kasa_config


def _module_slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``id(module)`` -> every ``(parent, attribute)`` that holds it: all the names of a module."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        # _modules, not named_children(), which lists a child registered twice in one parent once.
        for key, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((parent, key))
    return slots


class _SavePretrainedRefusal:
    """Stands in for ``save_pretrained`` on a model carrying KaSA layers (an instance attribute that shadows the
    method; picklable, and it holds no reference to the model)."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(SAVE_PRETRAINED_REFUSAL)

    def __repr__(self) -> str:
        return "<save_pretrained refused while the model carries KaSA layers>"


def _has_save_pretrained(module: nn.Module) -> bool:
    return not isinstance(module, KaSALinear) and callable(getattr(type(module), "save_pretrained", None))
