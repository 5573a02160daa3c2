"""Which modules of a model KaSA adapts, and whether a module can take a given adapter.

``find_targets`` selects by ``KaSAConfig.target_modules``/``exclude_modules``; ``check_supported`` states what KaSA
can wrap; ``removed_rank`` how many triplets it removes from a module (validating ``r`` for it);
``check_adapter_fits`` whether saved adapter factors fit a module's weight. Applying KaSA, loading an adapter and
importing a PEFT adapter all go through these, so they refuse the same things with the same words.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping

import torch
from torch import nn

from .config import KaSAConfig
from .weights import SUPPORTED_BASE_LAYERS, check_base_weight, weight_shape


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


def removed_rank(module: nn.Module, config: KaSAConfig, name: str) -> int:
    """How many singular triplets KaSA removes from ``module`` (``KaSAConfig.removed_rank``), after checking that
    ``r`` fits this layer."""
    out_features, in_features = weight_shape(module)
    k = min(out_features, in_features)
    if config.r >= k:
        raise ValueError(
            f"r={config.r} must be < min(in, out)={k} for {name} ({out_features}x{in_features}); "
            f"lower r or exclude {name.rsplit('.', 1)[-1]!r} with exclude_modules"
        )
    return config.removed_rank(out_features, in_features)


def check_adapter_fits(
    name: str, module: nn.Module, factors: Mapping[str, torch.Tensor], r: int, where: str
) -> None:
    """Raise unless the adapter factors ``lora_A`` (r, in) and ``lora_B`` (out, r) of ``factors`` fit ``module``'s
    (out, in) weight. ``where`` names the adapter (a file, a PEFT model) in the message."""
    out_features, in_features = weight_shape(module)
    for key, shape in (("lora_A", (r, in_features)), ("lora_B", (out_features, r))):
        if tuple(factors[key].shape) != shape:
            raise ValueError(
                f"adapter tensor {name}.{key} has shape {tuple(factors[key].shape)} but {name} "
                f"({out_features}x{in_features}, r={r}) needs {shape}; the adapter belongs to another model "
                f"({where}): load it onto the base model it was trained on"
            )


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
