"""A kasa_trl adapter as the exporters see it, read from an adapter directory or from a live model."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kasa_trl.adapter_io import read_adapter
from kasa_trl.config import KaSAConfig
from kasa_trl.model import base_weight, get_kasa_config, kasa_layers

FACTOR_KEYS = ("lora_A", "lora_B", "lora_diag", "removed_left", "removed_right")


@dataclass(frozen=True)
class KaSASource:
    """Everything an export needs.

    Attributes:
        config: the adapter's ``KaSAConfig``.
        layers: per qualified layer name, ``lora_A`` (r, in), ``lora_B`` (out, r), ``lora_diag`` (r,),
            ``removed_left`` (out, n), ``removed_right`` (n, in), on CPU.
        conv1d: per layer, whether the base layer is transformers' ``Conv1D``; ``None`` when unknown (an adapter
            directory read without an inspectable base model).
        base_model_name_or_path: what the exported config names as its base, if known.
        directory: the adapter directory the source was read from (``None`` for a live model).
    """

    config: KaSAConfig
    layers: dict[str, dict[str, torch.Tensor]]
    conv1d: dict[str, bool] | None
    base_model_name_or_path: str | None
    directory: Path | None


def read_kasa_source(
    source: str | os.PathLike | nn.Module, base_model_name_or_path: str | None = None
) -> KaSASource:
    """Read a kasa_trl adapter directory, or the adapter carried by a live model (``apply_kasa``/``load_kasa_adapter``).

    With a directory and ``base_model_name_or_path`` naming a model whose config can be read locally, the base
    is built on the meta device (no weights) to check that every adapted module exists with the adapter's shapes
    and to learn which ones are ``Conv1D``.
    """
    if isinstance(source, nn.Module):
        return _from_model(source, base_model_name_or_path)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"expected an adapter directory or a model carrying KaSA layers, got {type(source).__name__}"
        )
    directory = Path(source)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    config, per_layer = read_adapter(directory)
    layers = {name: {key: tensors[key] for key in FACTOR_KEYS} for name, tensors in per_layer.items()}
    conv1d = _inspect_base(base_model_name_or_path, layers) if base_model_name_or_path else None
    return KaSASource(config, layers, conv1d, base_model_name_or_path, directory)


def _from_model(model: nn.Module, base_model_name_or_path: str | None) -> KaSASource:
    layers = kasa_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} carries no KaSA layers; apply_kasa or load_kasa_adapter first"
        )
    config = get_kasa_config(model)
    tensors = {
        name: {
            **{key: p.detach().cpu() for key, p in layer.adapter_params().items()},
            "removed_left": layer.removed_left.detach().cpu(),
            "removed_right": layer.removed_right.detach().cpu(),
        }
        for name, layer in layers.items()
    }
    conv1d = {name: layer.fan_in_fan_out for name, layer in layers.items()}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return KaSASource(config, tensors, conv1d, base_model_name_or_path, None)


def _inspect_base(base: str, layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, bool] | None:
    """Per layer, whether ``base`` holds a ``Conv1D`` there; ``None`` if its config cannot be read locally.

    Raises:
        ValueError: the base lacks an adapted module or its shape differs from the adapter's (wrong base).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    is_local = os.path.isdir(base)
    try:
        config = AutoConfig.from_pretrained(base, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        if is_local:
            raise ValueError(f"cannot read the base model config at {base}: {e}") from e
        warnings.warn(
            f"base model {base!r} is not available locally, so the adapter is not checked against it and "
            f"Conv1D layers are not detected ({e})",
            stacklevel=3,
        )
        return None
    conv1d = {}
    for name, tensors in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the adapter targets {name}, which base model {base} ({type(model).__name__}) does not have; "
                "pass the base the adapter was trained on"
            ) from None
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise ValueError(
                f"{name} in base model {base} is a {type(module).__name__}, not a Linear/Conv1D layer"
            )
        shape = (tensors["lora_B"].shape[0], tensors["lora_A"].shape[1])
        if tuple(base_weight(module).shape) != shape:
            raise ValueError(
                f"{name} is {tuple(base_weight(module).shape)} (out, in) in base model {base} but the adapter was "
                f"trained on a {shape} weight; pass the base the adapter was trained on"
            )
        conv1d[name] = isinstance(module, Conv1D)
    return conv1d


def check_not_source(out_dir: str | os.PathLike, source: KaSASource) -> None:
    """Refuse to write an export over the adapter it is read from."""
    if source.directory is not None and Path(out_dir).resolve() == source.directory.resolve():
        raise ValueError(f"output directory {out_dir} is the adapter directory itself; choose another one")
