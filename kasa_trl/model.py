"""Putting KaSA into a model and taking it out again.

Every operation here checks everything it needs before its first change, so it either finishes or leaves the
model as it was (all or nothing): ``apply_kasa`` validates the targets, decomposes each target weight once,
validates the factors, builds every ``KaSALinear`` (undoing the truncations done so far if anything still fails),
then swaps the targets in; ``merge_and_unload`` and ``unload`` check every layer before writing any weight.

Shared and tied weights: KaSA adapts modules. A target registered under several names (``named_modules`` lists it
once) gets one ``KaSALinear``, installed under every name, so every path computes the same adapted weight. A
target whose weight memory another module also uses (a tied ``lm_head``, one ``Parameter`` given to two layers) is
refused in ``in_place`` mode, which would truncate the weight for every user (``W - 2R`` for two targets);
``non_destructive`` mode never writes the shared weight, so each adapted module computes with ``W - R`` plus its
own update and every other user keeps ``W``; ``"auto"`` picks it for such a model. ``merge_and_unload`` refuses a
layer whose weight is shared (one merged weight cannot serve users that compute different things); ``unload``
works. ``check_shared_weights`` states the rule for adapter loading too.

A model carrying KaSA layers refuses ``save_pretrained`` (which would write a checkpoint that ``from_pretrained``
reloads with every adapted layer randomly initialized) and names the calls that save what the user wants;
``merge_and_unload`` and ``unload`` lift the refusal with the layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .config import LOW_PRECISION_DTYPES, KaSAConfig, resolve_base_mode
from .decomposition import minor_components_many
from .factors import removed_float64, subtract_removed
from .distributed import (
    broadcast_adapters,
    gathered,
    is_partitioned,
    rank_and_world,
    sharded_decompose,
    weight_shape,
    writable_partition,
)
from .layer import (
    SUPPORTED_BASE_LAYERS,
    KaSALinear,
    check_base_weight,
    check_layer_arguments,
    check_removed_factors,
)

# A function computing the removed factors ``(left, right)`` of every target, optionally followed by the original
# weight's fingerprint; replaced under ZeRO-3 by a sharded schedule (which returns the fingerprints).
Decomposer = Callable[[dict[str, nn.Module], dict[str, int], KaSAConfig], dict[str, tuple[torch.Tensor, ...]]]

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
    frozen weight and kept with the adapter (DESIGN.md sections 2 and 4). ``base_mode="auto"`` is resolved here
    (``resolve_model_base_mode``) and ``model.kasa_config`` records the mode chosen. On any error the model is
    left as it was.
    """
    if not isinstance(config, KaSAConfig):
        raise TypeError(f"config must be a kasa_trl.KaSAConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    existing = kasa_layers(model)
    if existing:
        raise ValueError(
            f"model already carries {len(existing)} KaSA layers (e.g. {next(iter(existing))}); "
            "call kasa_trl.unload(model) or merge_and_unload(model) before applying KaSA again"
        )
    targets = find_targets(model, config)
    base_mode = resolve_model_base_mode(model, targets, config.base_mode)
    check_shared_weights(model, targets, base_mode)
    check_layer_arguments(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        base_mode=base_mode,
    )
    if base_mode != config.base_mode:
        config = dataclasses.replace(config, base_mode=base_mode)
    n_removed = {name: removed_rank(module, config, name) for name, module in targets.items()}
    if decomposer is None:
        zero3 = any(is_partitioned(module.weight) for module in targets.values())
        decomposer = sharded_decompose if zero3 or rank_and_world()[1] > 1 else decompose_targets
    factors = decomposer(targets, n_removed, config)
    for name, module in targets.items():
        if name not in factors:
            raise ValueError(f"the decomposer returned no removed factors for {name}")
        check_removed_factors(*factors[name][:2], *weight_shape(module), where=name)
    if config.base_mode == "in_place":
        _warn_low_precision_in_place(targets, factors)
    # Nothing was modified so far. Building a layer truncates its weight in in_place mode: a failure there (out
    # of memory, Ctrl-C) undoes the truncations done so far.
    layers = _build_layers(targets, factors, config)
    broadcast_adapters(list(layers.values()))
    install_kasa_layers(model, layers, config)
    return model


def resolve_model_base_mode(model: nn.Module, targets: dict[str, nn.Module], base_mode: str) -> str:
    """The concrete mode ``base_mode`` stands for on ``targets``: ``"auto"`` is ``"in_place"`` when every target
    weight is fp32/fp64 and none is shared with another module, else ``"non_destructive"`` (a bf16/fp16 copy of
    ``W - R`` is rounded by about as much as ``R``; a shared weight would be truncated for all its users)."""
    mode = resolve_base_mode(base_mode, [module.weight.dtype for module in targets.values()])
    if base_mode == "auto" and shared_weight_users(model, targets):
        return "non_destructive"
    return mode


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
            except ValueError as error:
                # The decomposition finds a non-finite weight in its own pass (for the scale): name the layer
                # (nothing was modified yet), as for its other refusals (removed values beyond the factor dtype).
                _check_finite_weight(name, weight)
                raise ValueError(f"{name}: {error}") from error
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
    """The modules ``config`` selects, by their first qualified name, validated: supported, floating-point, with
    values (not ``meta``), and at least one. A module registered under several names is one target: selected
    when any of its names is, unless any of them is excluded."""
    head = _output_head(model)
    names_of: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            names_of.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    selected: dict[str, nn.Module] = {}
    for key, names in names_of.items():
        module = modules[key]
        if config.exclude_modules is not None and any(_matches(n, config.exclude_modules) for n in names):
            continue
        if config.target_modules == "all-linear":
            chosen = isinstance(module, SUPPORTED_BASE_LAYERS) and module is not head
        else:
            chosen = any(_matches(n, config.target_modules) for n in names)
        if chosen:
            selected[names[0]] = module
    if not selected:
        candidates = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, SUPPORTED_BASE_LAYERS)}
        )
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
            f"Linear/Conv1D module names in this model: {candidates}"
        )
    for name, module in selected.items():
        check_supported(name, module)
    return selected


def check_supported(name: str, module: nn.Module) -> None:
    """Raise unless ``module`` (named ``name``) is a Linear/Conv1D KaSA can wrap, holding a plain fp16/bf16/fp32/
    fp64 weight with values."""
    if not isinstance(module, SUPPORTED_BASE_LAYERS):
        raise TypeError(
            f"{name} is {_article(type(module).__name__)} {type(module).__name__}, which KaSA cannot wrap: "
            "supported are nn.Linear and transformers' Conv1D. Narrow target_modules or add it to exclude_modules"
        )
    check_base_weight(module.weight, f"{name} ({type(module).__name__})")


def shared_weight_users(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, list[str]]:
    """For each target whose weight memory another module of ``model`` also holds (the same ``Parameter``, a
    tied weight, or an overlapping view), the qualified names of those other tensors; targets with a weight of
    their own are absent."""
    by_memory: dict[tuple, list[tuple[str, int, int, nn.Module]]] = {}
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
        key, start, end = _memory_span(module.weight)
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
    model.kasa_config = config
    for module in model.modules():
        if _has_save_pretrained(module) and any(isinstance(m, KaSALinear) for m in module.modules()):
            module.save_pretrained = _SavePretrainedRefusal()


def freeze_all_but_adapters(model: nn.Module) -> None:
    """``requires_grad=False`` on every parameter of ``model`` except the KaSA adapters' (True)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in kasa_layers(model).values():
        for param in layer.adapter_params().values():
            param.requires_grad_(True)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every KaSA layer by its base layer holding ``W_trunc + dW``: a plain model, same outputs.

    Works in place and returns ``model`` itself: its original weights are gone afterwards (keep the adapter with
    ``save_kasa_adapter`` first, or call ``unload`` instead). Every layer is checked before the first weight is
    written (a whole, finite, unshared weight; finite adapter factors; a result within the base dtype's range).
    """
    layers = _require_kasa_layers(model, "merge_and_unload")
    shared = shared_weight_users(model, {name: layer.base_layer for name, layer in layers.items()})
    if shared:
        name, users = next(iter(shared.items()))
        raise ValueError(
            f"cannot merge {name}: its weight is shared with {', '.join(users)}, which compute with the original "
            "weight (or their own adapter), so one merged weight cannot serve them all. Nothing was changed. Keep "
            "the adapter (kasa_trl.save_kasa_adapter) or take it out with kasa_trl.unload(model); to merge, untie "
            "the weights before applying KaSA"
        )
    for name, layer in layers.items():
        if not layer.merged:
            layer.check_base_write("merge", name)
    merged_here: list[KaSALinear] = []
    try:
        for layer in layers.values():
            if not layer.merged:
                layer.merge()
                merged_here.append(layer)
    except BaseException:
        for layer in reversed(merged_here):
            layer.unmerge()
        raise
    _take_out(model, layers)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Replace every KaSA layer by its base layer holding the ORIGINAL weight: bit-exact for an unmerged
    non-destructive layer, within one rounding of the base dtype otherwise (in place, or merged with
    ``layer.merge()``). Works in place and returns ``model`` itself; every layer is checked before the first
    weight is written."""
    layers = _require_kasa_layers(model, "unload")
    for name, layer in layers.items():
        if layer.merged or layer.base_mode == "in_place":
            layer.check_base_write("restore_base", name)
    restored: list[tuple[KaSALinear, str, bool]] = []
    try:
        for layer in layers.values():
            before = (layer, layer.base_mode, layer.merged)
            layer.restore_base()
            restored.append(before)
    except BaseException:
        for layer, base_mode, merged in reversed(restored):
            if base_mode == "in_place":
                layer.truncate_base()
            if merged:
                layer.merge()
        raise
    _take_out(model, layers)
    return model


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
    targets: dict[str, nn.Module], factors: dict[str, tuple[torch.Tensor, ...]], config: KaSAConfig
) -> dict[str, KaSALinear]:
    """A ``KaSALinear`` per target (truncating the weight in in_place mode); on failure the truncations done so
    far are undone (within one rounding of the base dtype) before the error propagates."""
    layers: dict[str, KaSALinear] = {}
    in_place = config.base_mode == "in_place"
    try:
        for name, module in targets.items():
            left, right, *known = factors[
                name
            ]  # the sharded decomposer also returns the original's fingerprint
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


def _warn_low_precision_in_place(
    targets: dict[str, nn.Module], factors: dict[str, tuple[torch.Tensor, ...]]
) -> None:
    """Warn when an explicit in_place truncation is stored in a 16-bit dtype, with the measured error."""
    errors = {}
    for name, module in targets.items():
        if module.weight.dtype in LOW_PRECISION_DTYPES:
            with gathered([module.weight]):
                errors[name] = truncation_rounding_error(base_weight(module), *factors[name][:2])
    if not errors:
        return
    worst = max(errors, key=errors.get)
    dtype = targets[worst].weight.dtype
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


def _require_kasa_layers(model: nn.Module, operation: str) -> dict[str, KaSALinear]:
    layers = kasa_layers(model)
    if not layers:
        raise ValueError(
            f"{operation}: {type(model).__name__} carries no KaSA layers, so there is nothing to take out (it was "
            "never adapted, or already merged or unloaded). merge_and_unload and unload work in place and return "
            "the model itself: after merge_and_unload(model) the original weights are gone. To get the original "
            "base back, call kasa_trl.unload(model) instead of merging, or reload the base model; keep the adapter "
            "with kasa_trl.save_kasa_adapter(model, dir) before merging"
        )
    return layers


def _take_out(model: nn.Module, layers: dict[str, KaSALinear]) -> None:
    """Put every layer's base layer back under each of its names; drop the config and the save refusal."""
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


def _memory_span(tensor: torch.Tensor) -> tuple[tuple, int, int]:
    """``(memory key, first byte, end byte)`` of what ``tensor`` covers: tensors overlap when their keys are
    equal and their byte ranges intersect. A ZeRO-3 parameter is keyed by itself (its data is a placeholder)."""
    if is_partitioned(tensor) or tensor.numel() == 0 or tensor.device.type == "meta":
        return ("tensor", id(tensor)), 0, 1
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    extent = 1 + sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return (str(tensor.device), tensor.untyped_storage().data_ptr()), start, start + extent * size


class _SavePretrainedRefusal:
    """Stands in for ``save_pretrained`` on a model carrying KaSA layers (an instance attribute that shadows the
    method; picklable, and it holds no reference to the model)."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(SAVE_PRETRAINED_REFUSAL)

    def __repr__(self) -> str:
        return "<save_pretrained refused while the model carries KaSA layers>"


def _has_save_pretrained(module: nn.Module) -> bool:
    return not isinstance(module, KaSALinear) and callable(getattr(type(module), "save_pretrained", None))


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


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _check_finite_weight(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"{name} has non-finite (NaN/Inf) weights; KaSA cannot decompose it. Check the checkpoint or "
            "exclude the module"
        )


def _progress(items, desc: str):
    items = list(items)
    rank = int(os.environ.get("RANK", "0"))
    return tqdm(items, desc=desc, unit="layer", disable=rank != 0 or len(items) < 2, leave=False)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    # Kept for kasa_trl.adapter_io until it installs through install_kasa_layers (every name of a module).
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# Old private names kasa_trl.adapter_io still imports; the public ones above replace them.
_check_supported = check_supported
_freeze_all_but_adapters = freeze_all_but_adapters
