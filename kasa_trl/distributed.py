"""DeepSpeed ZeRO-3 helpers: gathering partitioned parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is managed by ZeRO-3 (it then has a ``ds_id``)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Within the block every ZeRO-3 parameter of ``params`` is whole on every rank (a collective: all ranks
    must enter it with the same parameters in the same order). A no-op without ZeRO-3."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield
