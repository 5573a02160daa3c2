"""Taking KaSA out of a model: ``merge_and_unload`` (the adapted weights, as a plain model) and ``unload`` (the
original weights back).

Both work in place, check every layer before the first weight is written, and undo the layers already written if
one still fails (all or nothing). ``merge_and_unload`` refuses a layer whose weight is shared with other modules
(``shared_weights``): one merged weight cannot serve users that compute different things; ``unload`` works.
"""

from __future__ import annotations

from torch import nn

from .layer import KaSALinear
from .model import kasa_layers, uninstall_kasa_layers
from .shared_weights import shared_weight_users


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
    uninstall_kasa_layers(model, layers)
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
    uninstall_kasa_layers(model, layers)
    return model


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
