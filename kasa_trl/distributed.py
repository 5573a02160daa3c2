"""DeepSpeed ZeRO-3 and ``torch.distributed`` primitives: which parameters are partitioned, gathering them, writing
a rank's own partition, the rank and world size, broadcasting adapters.

Under ZeRO-3 (``deepspeed.zero.Init``) no rank holds a whole weight outside a gather. ``truncate_partition`` writes
``W_trunc`` into each rank's own partition with the arithmetic of ``factors.truncate``, so a weight whose removed
factors every rank knows needs no second gather. The schedule that decomposes a model's targets over the ranks
(``target_decomposition.sharded_decompose``) is built on these.

Profiler scope (``torch.profiler.record_function``): ``kasa_trl.gather``, a ``gathered`` block that really gathers
(the block's body included).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from .factors import subtract_removed


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is managed by ZeRO-3 (it then has a ``ds_id``)."""
    return hasattr(param, "ds_id")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
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

    with (
        record_function("kasa_trl.gather"),
        deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank),
    ):
        yield


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
    """``W_trunc = W - R`` on this rank's partition of ``param``, by ``factors.subtract_removed`` like
    ``factors.truncate``, so every rank's share is bit-identical to a single process's.

    Args:
        param (torch.Tensor): a ZeRO-3 parameter with a ``writable_partition``.
        removed (torch.Tensor): ``factors.removed_float64`` in the parameter's own layout
            (``weights.to_storage_layout``).
    """
    shard = writable_partition(param)
    if shard is None:
        raise ValueError("parameter has no writable ZeRO-3 partition; gather it instead")
    # ds_numel and ds_process_group: attributes DeepSpeed sets on the parameters it partitions and their shards
    zero_param, zero_shard = cast(Any, param), cast(Any, shard)
    # DeepSpeed partitions the flattened parameter in rank order, the last partition padded.
    start = zero_shard.ds_numel * dist.get_rank(group=zero_param.ds_process_group)
    count = max(0, min(zero_shard.ds_numel, zero_param.ds_numel - start))
    if count == 0:
        return
    part = shard.narrow(0, 0, count)
    piece = removed.reshape(-1).narrow(0, start, count).to(part.device)
    part.copy_(subtract_removed(part, piece))


class AdapterLayer(Protocol):
    """A layer with trainable adapter parameters (``layer.KaSALinear``)."""

    def adapter_params(self) -> dict[str, nn.Parameter]: ...


def broadcast_adapters(layers: Sequence[AdapterLayer]) -> None:
    """Make every rank start from rank 0's adapter initialization (a collective; no-op on one process)."""
    _, world = rank_and_world()
    if world == 1:
        return
    with torch.no_grad():
        for layer in layers:
            for param in layer.adapter_params().values():
                dist.broadcast(param.data, src=0)
