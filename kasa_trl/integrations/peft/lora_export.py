"""Exact export of a KaSA adapter to a vanilla PEFT LoRA adapter on the untouched base (docs/design.md section 1).

Each KaSA layer computes ``W_trunc x + s B diag(sigma) A x`` with ``W_trunc = W - left @ right``. Since
``W + B2 A2 = W_trunc + s B diag(sigma) A`` for ``B2 = [s B diag(sigma) | -left]`` and ``A2 = [A ; right]``
(``kasa_trl.factors.lora_export_factors``), a plain LoRA of rank ``r + n`` on the ORIGINAL weight gives
the KaSA layer's outputs: PEFT, vLLM multi-LoRA and TGI can serve it without knowing KaSA. The exported config
has ``lora_alpha == rank`` (LoRA scaling 1); KaSA's scaling is folded into ``B2``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from kasa_trl.atomic_outputs import atomic_output_dir
from kasa_trl.factors import lora_export_factors

from ._peft_format import KEY_PREFIX, lora_config_dict, write_peft_adapter
from ._source import open_export

VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank`` (``vllm.config.lora.MaxLoRARanks``); an adapter's rank must be
at most the server's ``--max-lora-rank``."""


def export_lora(
    adapter_dir_or_model: str | os.PathLike[str] | nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    pad_to_rank: int | Literal["vllm"] | None = None,
    dtype: torch.dtype | None = None,
    task_type: str | None = "CAUSAL_LM",
    overwrite: bool = False,
    force_base: bool = False,
) -> Path:
    """Write a standard PEFT LoRA adapter equivalent to a KaSA adapter, to be loaded on the ORIGINAL base.

    Args:
        adapter_dir_or_model: a kasa_trl adapter directory, or a model carrying KaSA layers (either base mode,
            merged or not).
        out_dir: the directory to create (written atomically: complete or absent).
        base_model_name_or_path: recorded in ``adapter_config.json``; defaults to the base the adapter directory
            records (``kasa_trl.adapter_io.read_adapter_info``), or the live model's ``config.name_or_path``. For
            a directory source, a base available locally (a directory or the Hub cache) is loaded and checked
            against the adapter as ``load_kasa_adapter`` checks it (modules, shapes, base weights), and tells
            which targets are ``Conv1D`` (``fan_in_fan_out``; without it PEFT sets that flag itself, with a
            warning, when it meets a ``Conv1D``). A base other than the recorded one is refused unless
            ``force_base``.
        pad_to_rank: pad every layer with zero rows/columns up to this rank (>= r + n), or ``"vllm"`` for the
            smallest rank vLLM accepts as ``--max-lora-rank`` (see ``VLLM_MAX_LORA_RANKS``). Padding is exact.
        dtype: dtype of the exported factors; default float32 (or the adapter's, if wider). Only float32 or
            wider keeps the export exact to rounding.
        task_type: PEFT ``task_type`` (``"CAUSAL_LM"`` makes ``PeftModel.from_pretrained`` build a
            ``PeftModelForCausalLM``); ``None`` for a bare ``PeftModel``.
        overwrite: replace an earlier kasa_trl output in ``out_dir``; a directory holding anything else, or an
            ``out_dir`` overlapping the adapter directory or a local base, is refused all the same
            (``kasa_trl.atomic_outputs``).
        force_base: use ``base_model_name_or_path`` even though the adapter records another base (e.g. a local
            copy of the recorded hub model); its weights are still checked.

    ``target_modules`` lists leaf names (``q_proj``), as vLLM expects. Where the adapter covers only some
    modules of a name, PEFT also wraps the others, with ``lora_B = 0``: no effect on the outputs.

    Returns:
        ``out_dir`` as a ``Path``. The adapter's rank is ``max(r + n)`` over layers (``2 r`` with the paper's
        truncation), or ``pad_to_rank``; layers with a smaller ``r + n`` are zero-padded to it.
    """
    source, inputs = open_export(
        adapter_dir_or_model, out_dir, base_model_name_or_path, overwrite=overwrite, force_base=force_base
    )
    config = source.config
    factors = {
        name: lora_export_factors(
            t["lora_A"], t["lora_B"], t["lora_diag"], config.scaling, t["removed_left"], t["removed_right"]
        )
        for name, t in source.layers.items()
    }
    natural_rank = max(b2.shape[1] for b2, _ in factors.values())
    rank = padded_rank(natural_rank, pad_to_rank, r=config.r)
    tensors = {}
    for name, (b2, a2) in factors.items():
        b2, a2 = _pad(b2, a2, rank)
        out_dtype = dtype or b2.dtype
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a2.to(out_dtype)
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b2.to(out_dtype)
    peft_config = lora_config_dict(
        r=rank,
        lora_alpha=rank,  # LoRA scaling = lora_alpha / r = 1: all of KaSA's scaling lives in B2
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in source.layers}),
        base_model_name_or_path=source.base_model_name_or_path,
        task_type=task_type,
        fan_in_fan_out=source.conv1d is not None and any(source.conv1d.values()),
    )
    provenance = {
        "export": "lora",
        "kasa_config": config.to_dict(),
        "rank": rank,
        "natural_rank": natural_rank,
    }
    with atomic_output_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        write_peft_adapter(tmp, peft_config, tensors, provenance)
    return Path(out_dir)


def padded_rank(rank: int, pad_to_rank: int | str | None, *, r: int) -> int:
    """The exported rank: ``rank`` itself, ``pad_to_rank``, or the smallest vLLM rank >= ``rank``."""
    if pad_to_rank is None:
        return rank
    if pad_to_rank == "vllm":
        fitting = [v for v in VLLM_MAX_LORA_RANKS if v >= rank]
        if not fitting:
            raise ValueError(
                f"the exported rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}; "
                "retrain with a smaller r"
            )
        return fitting[0]
    if isinstance(pad_to_rank, bool) or not isinstance(pad_to_rank, int):
        raise ValueError(f"pad_to_rank must be a positive integer or 'vllm', got {pad_to_rank!r}")
    if pad_to_rank < rank:
        hint = [v for v in VLLM_MAX_LORA_RANKS if v >= rank]
        raise ValueError(
            f"pad_to_rank={pad_to_rank} is below the exported rank {rank} (r={r} plus the removed components); "
            f"pick a rank >= {rank}" + (f", e.g. {hint[0]} for vLLM" if hint else "")
        )
    return pad_to_rank


def _pad(b2: torch.Tensor, a2: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns of ``B2`` (out, k) and zero rows of ``A2`` (k, in) up to ``rank``: ``B2 @ A2`` is unchanged."""
    extra = rank - b2.shape[1]
    if extra == 0:
        return b2, a2
    b2 = torch.cat([b2, b2.new_zeros(b2.shape[0], extra)], dim=1)
    a2 = torch.cat([a2, a2.new_zeros(extra, a2.shape[1])], dim=0)
    return b2, a2
