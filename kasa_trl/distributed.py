"""DeepSpeed ZeRO-3 helpers: gathering partitioned parameters and the sharded decomposition schedule.

Under ZeRO-3 (``deepspeed.zero.Init``) no rank holds a whole weight outside a gather. ``sharded_decompose``
splits the decomposition work over the ranks: the targets are taken ``world_size`` at a time, each group is
gathered once, rank ``i % world_size`` decomposes target ``i`` while the others decompose theirs, and only the
rank-n factors travel afterwards (a broadcast from each owner). Every rank then holds the same factors, so the
truncation that ``apply_kasa`` writes back is the same everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from .decomposition import minor_components

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
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The removed factors of every target, decomposed once in all (each rank its share), known to all ranks."""
    from .model import _check_finite_weight, _progress, base_weight

    rank, world = rank_and_world()
    names = list(targets)
    owner = {name: i % world for i, name in enumerate(names)}
    mine: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    groups = [names[i : i + world] for i in range(0, len(names), world)]
    for group in _progress(groups, f"KaSA: decomposing ({world} ranks)"):
        with gathered([targets[name].weight for name in group]):
            for name in group:  # every rank checks every weight: all raise together, none hangs
                _check_finite_weight(name, base_weight(targets[name]))
            for name in group:
                if owner[name] == rank:
                    mine[name] = minor_components(
                        base_weight(targets[name]), n_removed[name], config.decomposition_method
                    )
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
            left, right = (t.to(device).contiguous() for t in mine[name])
        else:
            left = torch.empty(out_features, n_removed[name], device=device, dtype=dtype)
            right = torch.empty(n_removed[name], in_features, device=device, dtype=dtype)
        dist.broadcast(left, src=owner[name])
        dist.broadcast(right, src=owner[name])
        factors[name] = (left, right)
    return factors


def broadcast_adapters(layers: Sequence[nn.Module]) -> None:
    """Make every rank start from rank 0's adapter initialization (a collective; no-op on one process)."""
    _, world = rank_and_world()
    if world == 1:
        return
    with torch.no_grad():
        for layer in layers:
            for param in layer.adapter_params().values():
                dist.broadcast(param.data, src=0)
