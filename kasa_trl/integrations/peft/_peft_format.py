"""PEFT's on-disk adapter format, as PEFT 0.21 writes it (``PeftModel.save_pretrained``).

A directory with ``adapter_config.json`` (the ``LoraConfig`` fields) and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r) and, for the KaSA variant,
``...lora_diag`` (r,). The orientation is the same for ``Conv1D`` targets: PEFT's ``fan_in_fan_out`` only
transposes the merged delta, never the stored factors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<param>lora_A\.weight|lora_B\.weight|lora_diag)$")
PARAM_KEYS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_diag": "lora_diag"}


def lora_config_dict(
    *,
    r: int,
    lora_alpha: float,
    target_modules: list[str],
    base_model_name_or_path: str | None,
    task_type: str | None,
    fan_in_fan_out: bool = False,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    kasa_config: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of a LoRA adapter; with ``kasa_config``, of PEFT's KaSA variant.

    Only fields every PEFT >= 0.13 (and vLLM's ``PEFTHelper``) knows are written, plus ``kasa_config`` when given:
    PEFT fills the rest with its defaults.
    """
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": target_modules,
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if kasa_config is not None:
        config["kasa_config"] = kasa_config
    return config


def write_peft_adapter(
    directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], provenance: dict[str, Any]
) -> None:
    """Write ``config`` and ``tensors`` (already keyed the PEFT way) into ``directory``."""
    metadata = {"format": "pt", "kasa_trl": json.dumps(provenance, sort_keys=True)}
    save_file(
        {k: t.contiguous() for k, t in tensors.items()}, str(directory / WEIGHTS_NAME), metadata=metadata
    )
    (directory / CONFIG_NAME).write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def split_key(key: str) -> tuple[str, str] | None:
    """``(module, "lora_A" | "lora_B" | "lora_diag")`` for a PEFT LoRA/KaSA key, else ``None``."""
    match = _KEY.match(key)
    if match is None:
        return None
    return match["module"], PARAM_KEYS[match["param"]]
