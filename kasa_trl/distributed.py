"""DeepSpeed ZeRO-3 helpers: gathering partitioned parameters and the sharded decomposition schedule.

Under ZeRO-3 (``deepspeed.zero.Init``) no rank holds a whole weight outside a gather. ``sharded_decompose``
splits the decomposition work over the ranks: the targets, largest first, are taken ``world_size`` at a time,
each group is gathered once, rank ``i % world_size`` decomposes target ``i`` (and fingerprints its original
weight) while the others decompose theirs, and only the rank-n factors and fingerprints travel afterwards (a
broadcast from each owner). Every rank then holds the same factors; ``truncate_partition`` writes ``W_trunc``
into each rank's own partition with the arithmetic of ``decomposition.truncate``, so no weight is gathered a
second time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from .decomposition import minor_components
from .factors import subtract_removed
from .fingerprint import N_PROBES, weight_fingerprint

if TYPE_CHECKING:
    from .config import KaSAConfig


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is managed by ZeRO-3 (it then has a ``ds_id``)."""
    return hasattr(param, "ds_id")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Within the block every ZeRO-3 parameter of ``params`` is whole on every rank (a collective: all ranks
    must enter it with the same parameters in the same order). With ``modifier_rank``, that rank's changes are
    kept (broadcast and re-partitioned) on exit. A no-op without ZeRO-3."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear/Conv1D target, also when its weight is partitioned."""
    from transformers.pytorch_utils import Conv1D

    weight = module.weight
    shape = tuple(weight.ds_shape) if is_partitioned(weight) else tuple(weight.shape)
    return (shape[1], shape[0]) if isinstance(module, Conv1D) else (shape[0], shape[1])


def sharded_decompose(
    targets: dict[str, nn.Module], n_removed: dict[str, int], config: KaSAConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(left, right, fingerprint of the original weight)`` of every target, decomposed once in all (each rank
    its share), known to all ranks."""
    from .model import _check_finite_weight, _progress, base_weight

    rank, world = rank_and_world()
    # Largest first, so the ranks of a group decompose weights of one size and none waits long for another
    # (a stable sort of the same list on every rank: the same schedule everywhere).
    names = sorted(targets, key=lambda name: -math.prod(weight_shape(targets[name])))
    owner = {name: i % world for i, name in enumerate(names)}
    mine: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    groups = [names[i : i + world] for i in range(0, len(names), world)]
    for group in _progress(groups, f"KaSA: decomposing ({world} ranks)"):
        with gathered([targets[name].weight for name in group]):
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
        weight = module.weight
        device = weight.ds_tensor.device if is_partitioned(weight) else weight.device
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


def writable_partition(param: torch.Tensor) -> torch.Tensor | None:
    """This rank's ZeRO-3 partition of ``param`` when it can be written in place, else None (then gather).

    Not with ZeRO++'s secondary copies (hpZ) or quantized weights, nor while the partition sits on NVMe.
    """
    shard = getattr(param, "ds_tensor", None)
    if shard is None or getattr(param, "ds_secondary_tensor", None) is not None:
        return None
    if hasattr(shard, "ds_quant_scale") or "nvme" in str(getattr(shard, "final_location", None) or ""):
        return None
    return shard if shard.numel() == shard.ds_numel else None


@torch.no_grad()
def truncate_partition(param: torch.Tensor, removed: torch.Tensor) -> None:
    """``W_trunc = W - R`` on this rank's partition of ``param``, by ``decomposition.subtract_removed`` like
    ``decomposition.truncate``, so every rank's share is bit-identical to a single process's.

    Args:
        param (torch.Tensor): a ZeRO-3 parameter with a ``writable_partition``.
        removed (torch.Tensor): ``decomposition.removed_float64`` in the parameter's own layout (transposed for
            Conv1D).
    """
    shard = writable_partition(param)
    if shard is None:
        raise ValueError("parameter has no writable ZeRO-3 partition; gather it instead")
    # DeepSpeed partitions the flattened parameter in rank order, the last partition padded.
    start = shard.ds_numel * dist.get_rank(group=param.ds_process_group)
    count = max(0, min(shard.ds_numel, param.ds_numel - start))
    if count == 0:
        return
    part = shard.narrow(0, 0, count)
    piece = removed.reshape(-1).narrow(0, start, count).to(part.device)
    part.copy_(subtract_removed(part, piece))


def broadcast_adapters(layers: Sequence[nn.Module]) -> None:
    """Make every rank start from rank 0's adapter initialization (a collective; no-op on one process)."""
    _, world = rank_and_world()
    if world == 1:
        return
    with torch.no_grad():
        for layer in layers:
            for param in layer.adapter_params().values():
                dist.broadcast(param.data, src=0)
