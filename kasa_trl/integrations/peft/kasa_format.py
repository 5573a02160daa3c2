"""PEFT's KaSA variant (``LoraConfig(kasa_config=KasaConfig(beta, gamma))``, peft >= 0.21) in and out of kasa_trl.

PEFT stores ``lora_A``, ``lora_B`` and ``lora_diag`` only and re-runs an fp32 SVD of each target weight when it
loads an adapter. kasa_trl keeps the removed factors with the adapter, so:

- ``import_peft_kasa`` computes the truncation on the untouched base with kasa_trl's decomposition (float64), then
  copies PEFT's factors: the result matches PEFT's outputs up to the two decompositions' rounding.
- ``export_peft_kasa`` writes the factors in PEFT's format; PEFT redoes the truncation on load. PEFT always removes
  exactly ``r`` components of an ``nn.Linear`` weight (the paper's truncation), so adapters on ``Conv1D`` or
  with fewer removed components cannot be expressed: use ``export_lora`` for those.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from kasa_trl.adapter_io import ADAPTER_FILE
from kasa_trl.atomic_outputs import atomic_output_dir
from kasa_trl.model import apply_kasa, kasa_layers
from kasa_trl.peft_compat import kasa_config_from_lora, lora_fields_from_kasa
from kasa_trl.targets import check_adapter_fits

from ._peft_format import (
    CONFIG_NAME,
    KEY_PREFIX,
    WEIGHTS_NAME,
    lora_config_dict,
    split_key,
    write_peft_adapter,
)
from ._source import open_export


def import_peft_kasa(
    model: nn.Module,
    peft_adapter: str | os.PathLike[str] | nn.Module,
    *,
    adapter_name: str | None = None,
    base_mode: str = "auto",
    decomposition_method: str = "auto",
) -> nn.Module:
    """Rebuild a PEFT KaSA adapter as kasa_trl KaSA layers on ``model``, an untouched copy of its base.

    Args:
        model: the ORIGINAL base model (not a ``PeftModel``, no KaSA layers); adapted in place and returned.
        peft_adapter: a directory written by ``PeftModel.save_pretrained``, or a live ``PeftModel`` whose
            adapter is read (its own base, already truncated by PEFT, is not used).
        adapter_name: which adapter of a live ``PeftModel`` (default: its active adapter); ignored for a directory.
        base_mode: kasa_trl's ``base_mode`` for the new layers (default ``"auto"``, as ``KaSAConfig``).
        decomposition_method: kasa_trl's ``decomposition_method`` for the truncation.

    The config is mapped by ``kasa_trl.peft_compat.kasa_config_from_lora`` (every LoraConfig option honoured or
    refused by name); the targets are exactly the modules the adapter holds factors for.
    """
    if model is peft_adapter or getattr(getattr(peft_adapter, "base_model", None), "model", None) is model:
        raise ValueError(
            "model is the PeftModel's own base, which PEFT has already truncated; pass a fresh copy of the base model"
        )
    if hasattr(model, "peft_config"):
        raise ValueError(
            "model is a PeftModel; pass the untouched base model (e.g. a fresh from_pretrained copy)"
        )
    if kasa_layers(model):
        raise ValueError("model already carries KaSA layers; import onto a fresh base model")
    peft_config, state, where = _read_peft_kasa(peft_adapter, adapter_name)
    config = kasa_config_from_lora(
        peft_config,
        where=where,
        new_adapter=False,  # PEFT's saved factors replace the initial ones
        target_modules=_adapted_modules(state),  # exactly the modules the saved adapter holds
        base_mode=base_mode,
        decomposition_method=decomposition_method,
    )
    layers = _group_layers(state, r=config.r)
    for name, tensors in layers.items():
        _check_target(model, name, tensors, config.r, where)
    apply_kasa(model, config)
    with torch.no_grad():
        for name, layer in kasa_layers(model).items():
            for key, param in layer.adapter_params().items():
                param.copy_(layers[name][key])
    return model


def export_peft_kasa(
    model_or_adapter_dir: str | os.PathLike[str] | nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    overwrite: bool = False,
    force_base: bool = False,
) -> Path:
    """Write a kasa_trl adapter in PEFT's KaSA format: ``PeftModel.from_pretrained(fresh_base, out_dir)`` (peft >= 0.21)
    gives kasa_trl's outputs, up to PEFT's fp32 re-decomposition.

    Older PEFT releases do not know ``kasa_config``: they drop it with a warning and load a plain LoRA, which
    computes something else. Check ``peft.__version__ >= "0.21"`` where the adapter is loaded.

    ``base_model_name_or_path``, ``overwrite`` and ``force_base`` work as in ``export_lora``: the base defaults
    to the recorded one and is checked when available locally; only an earlier kasa_trl output is overwritten.

    Raises:
        ValueError: a target is ``Conv1D`` (PEFT's KaSA rejects ``fan_in_fan_out`` layers), or a layer removes
            other than ``r`` components (``truncation="official"`` on a wide weight): PEFT could not reproduce
            it. ``export_lora`` handles both.
    """
    source, inputs = open_export(
        model_or_adapter_dir, out_dir, base_model_name_or_path, overwrite=overwrite, force_base=force_base
    )
    config = source.config
    conv1d = sorted(name for name, is_conv in (source.conv1d or {}).items() if is_conv)
    if conv1d:
        raise ValueError(
            f"PEFT's KaSA supports nn.Linear targets only, but {conv1d[0]} (and {len(conv1d) - 1} more) is a "
            "transformers Conv1D (GPT-2 family); use kasa_trl.integrations.peft.export_lora for an exact plain-LoRA export"
        )
    for name, tensors in source.layers.items():
        n = tensors["removed_left"].shape[1]
        if n != config.r:
            raise ValueError(
                f"{name} had {n} singular components removed (truncation={config.truncation!r}) but PEFT's KaSA "
                f"always removes r={config.r}, so PEFT would compute something else; use "
                "kasa_trl.integrations.peft.export_lora for an exact plain-LoRA export"
            )
    tensors = {}
    for name, t in source.layers.items():
        for key, suffix in (
            ("lora_A", "lora_A.weight"),
            ("lora_B", "lora_B.weight"),
            ("lora_diag", "lora_diag"),
        ):
            tensors[f"{KEY_PREFIX}{name}.{suffix}"] = t[key]
    peft_config = lora_config_dict(
        **lora_fields_from_kasa(config),
        # Full names: PEFT's truncation is destructive, so it must touch exactly the adapted modules.
        target_modules=sorted(source.layers),
        base_model_name_or_path=source.base_model_name_or_path,
        task_type=task_type,
    )
    provenance = {"export": "peft_kasa", "kasa_config": config.to_dict()}
    with atomic_output_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        write_peft_adapter(tmp, peft_config, tensors, provenance)
    return Path(out_dir)


def _read_peft_kasa(
    source: str | os.PathLike[str] | nn.Module, adapter_name: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """The adapter config (a dict), the state dict (PEFT's saved keys) of a PEFT KaSA adapter, and its name."""
    if isinstance(source, nn.Module):
        config, state = _from_peft_model(source, adapter_name)
        where = f"PeftModel adapter {adapter_name or 'active'}"
    else:
        config, state = _from_directory(Path(source))
        where = str(Path(source) / CONFIG_NAME)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where} is a {config.get('peft_type')} adapter, not a LoRA/KaSA one")
    if config.get("kasa_config") is None:
        raise ValueError(
            f"{where} is a plain LoRA adapter (no kasa_config); load it with peft.PeftModel.from_pretrained instead"
        )
    return config, state, where


def _adapted_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The modules a PEFT adapter's state dict holds factors for (checked in detail by ``_group_layers``)."""
    modules = sorted({parts[0] for parts in map(split_key, state) if parts is not None})
    if not modules:
        raise ValueError("the PEFT adapter holds no LoRA tensors")
    return modules


def _from_directory(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        hint = (
            " (it holds a kasa_trl adapter: use kasa_trl.load_kasa_adapter)"
            if (directory / ADAPTER_FILE).is_file()
            else ""
        )
        raise FileNotFoundError(f"no PEFT adapter at {directory}: {CONFIG_NAME} is missing{hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e})") from e
    if (directory / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        state = load_file(str(directory / WEIGHTS_NAME))
    elif (directory / "adapter_model.bin").is_file():
        state = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no adapter weights at {directory}: {WEIGHTS_NAME} is missing")
    return config, state


def _from_peft_model(
    model: nn.Module, adapter_name: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from peft import get_peft_model_state_dict

    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise TypeError(f"expected a PEFT adapter directory or a PeftModel, got {type(model).__name__}")
    name = adapter_name or cast(str, model.active_adapter)  # a PeftModel property
    if name not in configs:
        raise ValueError(f"PeftModel has no adapter {name!r}; it has {sorted(configs)}")
    config = configs[name].to_dict()
    kasa = config.get("kasa_config")
    if kasa is not None and not isinstance(kasa, dict):
        config["kasa_config"] = {"beta": kasa.beta, "gamma": kasa.gamma}
    state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    return config, state


def _group_layers(state: dict[str, torch.Tensor], *, r: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per module, ``lora_A`` (r, in), ``lora_B`` (out, r), ``lora_diag`` (r,), checked complete and consistent."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        parts = split_key(key)
        if parts is None:
            raise ValueError(
                f"unsupported tensor {key!r} in the PEFT adapter: only KaSA lora_A/lora_B/lora_diag are"
            )
        module, param = parts
        layers.setdefault(module, {})[param] = tensor
    if not layers:
        raise ValueError("the PEFT adapter holds no LoRA tensors")
    for module, tensors in layers.items():
        missing = sorted({"lora_A", "lora_B", "lora_diag"} - set(tensors))
        if missing:
            raise ValueError(f"the PEFT adapter lacks {missing} for {module}; is it a KaSA adapter?")
        for key, tensor in tensors.items():
            if not tensor.is_floating_point():
                raise ValueError(
                    f"the PEFT adapter's {module}.{key} is {tensor.dtype}, not a floating-point tensor"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"the PEFT adapter's {module}.{key} holds NaN or Inf values; it cannot be imported"
                )
        if (
            tensors["lora_A"].shape[0] != r
            or tensors["lora_B"].shape[1] != r
            or tuple(tensors["lora_diag"].shape) != (r,)
        ):
            raise ValueError(
                f"{module}: lora_A {tuple(tensors['lora_A'].shape)}, lora_B {tuple(tensors['lora_B'].shape)}, "
                f"lora_diag {tuple(tensors['lora_diag'].shape)} do not match r={r} of the adapter config"
            )
    return layers


def _check_target(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], r: int, where: str) -> None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"the PEFT adapter targets {name}, which {type(model).__name__} does not have; pass its base model"
        ) from None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{name} is a {type(module).__name__}; PEFT's KaSA adapts nn.Linear layers only")
    check_adapter_fits(name, module, tensors, r, where)
