"""Decomposing a model's target weights: what ``apply_kasa`` removes from each, in one process or over ZeRO-3 ranks.

A decomposer maps the targets (``{name: module}``) and how many triplets to remove from each to the removed factors
``(left (out, n), right (n, in))`` of every target, optionally followed by the original weight's fingerprint.

- ``decompose_targets``: one process; several weights at once on CPU cores (``decomposition.minor_components_many``).
- ``decompose_dequantized``: one process, a quantized model: dequantized copies a few at a time (never the whole
  model in full precision at once), fingerprinted from the same copy.
- ``sharded_decompose``: under ZeRO-3 (or any process group) no rank holds a whole weight outside a gather. The
  targets, largest first, are taken ``world_size`` at a time, each group is gathered once, rank ``i % world_size``
  decomposes target ``i`` (and fingerprints its original weight) while the others decompose theirs, and only the
  rank-n factors and fingerprints travel afterwards (a broadcast from each owner). Every rank then holds the same
  factors, and ``distributed.truncate_partition`` truncates each rank's own partition without a second gather.

Profiler scope (``torch.profiler.record_function``): ``kasa_trl.sharded_decompose``, one call of the schedule (its
``kasa_trl.gather`` and ``kasa_trl.decompose`` scopes inside).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function
from tqdm.auto import tqdm

from .config import KaSAConfig
from .decomposition import minor_components, minor_components_many
from .distributed import gathered, is_partitioned, rank_and_world
from .fingerprint import N_PROBES, weight_fingerprint
from .quantized import is_quantized_layer
from .weights import base_weight, stored_weight, weight_shape

# The removed factors ``(left, right)`` of every target, optionally followed by the original weight's fingerprint.
Decomposer = Callable[
    [dict[str, nn.Module], dict[str, int], KaSAConfig], Mapping[str, tuple[torch.Tensor, ...]]
]

_Item = TypeVar("_Item")


def decompose_targets(
    targets: dict[str, nn.Module], n_removed: dict[str, int], config: KaSAConfig
) -> dict[str, tuple[torch.Tensor, ...]]:
    """The removed factors ``(left (out, n), right (n, in))`` of each target (several at once on CPU cores); on a
    quantized model ``(left, right, fingerprint)``, from dequantized copies (``decompose_dequantized``)."""
    if any(is_quantized_layer(module) for module in targets.values()):
        return decompose_dequantized(targets, n_removed, config)
    names = list(targets)
    weights = [base_weight(targets[name]) for name in names]
    ns = [n_removed[name] for name in names]
    factors: dict[str, tuple[torch.Tensor, ...]] = {}
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


def decompose_dequantized(
    targets: dict[str, nn.Module], n_removed: dict[str, int], config: KaSAConfig
) -> dict[str, tuple[torch.Tensor, ...]]:
    """``(left, right, fingerprint)`` of each target of a quantized model. A quantized target's weight is a
    dequantized copy (``weights.base_weight``), so they are made a few at a time, as many as decompose at once on
    CPU cores (one at a time elsewhere), and dropped after: never all at once (the whole model in full precision).
    """
    names = list(targets)
    on_cpu = all(stored_weight(targets[name]).device.type == "cpu" for name in names)
    group = max(1, min(torch.get_num_threads(), 8)) if on_cpu else 1
    factors: dict[str, tuple[torch.Tensor, ...]] = {}
    for start in _progress(range(0, len(names), group), "KaSA: decomposing"):
        chunk = names[start : start + group]
        weights = [base_weight(targets[name]) for name in chunk]
        for name, weight in zip(chunk, weights, strict=True):
            _check_finite_weight(name, weight)
        ns = [n_removed[name] for name in chunk]
        with contextlib.closing(minor_components_many(weights, ns, config.decomposition_method)) as results:
            for name, weight in zip(chunk, weights, strict=True):
                try:
                    left, right = next(results)
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from error
                factors[name] = (left, right, weight_fingerprint(weight))
        del weights
    return factors


def sharded_decompose(
    targets: dict[str, nn.Module], n_removed: dict[str, int], config: KaSAConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(left, right, fingerprint of the original weight)`` of every target, decomposed once in all (each rank
    its share), known to all ranks (a collective: every rank calls it with the same targets)."""
    with record_function("kasa_trl.sharded_decompose"):
        return _sharded_decompose(targets, n_removed, config)


def _sharded_decompose(
    targets: dict[str, nn.Module], n_removed: dict[str, int], config: KaSAConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    rank, world = rank_and_world()
    # Largest first, so the ranks of a group decompose weights of one size and none waits long for another
    # (a stable sort of the same list on every rank: the same schedule everywhere).
    names = sorted(targets, key=lambda name: -math.prod(weight_shape(targets[name])))
    owner = {name: i % world for i, name in enumerate(names)}
    mine: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    groups = [names[i : i + world] for i in range(0, len(names), world)]
    for group in _progress(groups, f"KaSA: decomposing ({world} ranks)"):
        with gathered([stored_weight(targets[name]) for name in group]):
            for name in group:  # every rank checks every weight: all raise together, none hangs
                _check_finite_weight(name, base_weight(targets[name]))
            for name in group:
                if owner[name] == rank:
                    weight = base_weight(targets[name])
                    left, right = minor_components(weight, n_removed[name], config.decomposition_method)
                    mine[name] = (left, right, weight_fingerprint(weight))
    if world == 1:
        return mine
    factors = {}
    for name in names:
        module = targets[name]
        out_features, in_features = weight_shape(module)
        weight = stored_weight(module)
        # ds_tensor: this rank's partition, which DeepSpeed sets on the parameters it partitions
        device = cast(Any, weight).ds_tensor.device if is_partitioned(weight) else weight.device
        dtype = torch.promote_types(weight.dtype, torch.float32)
        if owner[name] == rank:
            left, right, fingerprint = (t.to(device).contiguous() for t in mine[name])
        else:
            left = torch.empty(out_features, n_removed[name], device=device, dtype=dtype)
            right = torch.empty(n_removed[name], in_features, device=device, dtype=dtype)
            fingerprint = torch.empty(N_PROBES + 1, device=device, dtype=torch.float64)
        for t in (left, right, fingerprint):
            dist.broadcast(t, src=owner[name])
        factors[name] = (left, right, fingerprint.cpu())
    return factors


def _check_finite_weight(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"{name} has non-finite (NaN/Inf) weights; KaSA cannot decompose it. Check the checkpoint or "
            "exclude the module"
        )


def _progress(items: Iterable[_Item], desc: str) -> Iterable[_Item]:
    """``items`` with a progress bar on rank 0 when there are several (``RANK``: set by every launcher)."""
    items = list(items)
    rank = int(os.environ.get("RANK", "0"))
    return tqdm(items, desc=desc, unit="layer", disable=rank != 0 or len(items) < 2, leave=False)
