"""Saving and loading KaSA adapters.

An adapter directory holds ``kasa_adapter.safetensors`` (for every KaSA layer: ``lora_A``, ``lora_B``,
``lora_diag``, the removed factors and a fingerprint of the original base weight; the config and the layer list
in the file's metadata) and ``kasa_config.json``, a human-readable copy of the config. The safetensors file is
self-contained and replaced atomically, so a crash while saving leaves the previous adapter loadable. Loading
rebuilds the truncation from the stored factors: no decomposition runs, and the result is bit-identical on any
hardware.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import KaSAConfig
from .fingerprint import fingerprints_match, weight_fingerprint
from .layer import KaSALinear
from .model import _check_supported, _freeze_all_but_adapters, _set_submodule, base_weight, kasa_layers
from .regularizers import registered_regularizers

ADAPTER_FILE = "kasa_adapter.safetensors"
CONFIG_FILE = "kasa_config.json"
FORMAT = "kasa_trl.adapter.v1"
TENSOR_KEYS = ("lora_A", "lora_B", "lora_diag", "removed_left", "removed_right", "base_fingerprint")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter, keyed ``<layer>.<key>``, detached and on CPU."""
    tensors = {}
    for name, layer in kasa_layers(model).items():
        tensors.update(layer_tensors(name, layer))
    if not tensors:
        raise ValueError("model carries no KaSA layers; nothing to save (call apply_kasa first)")
    return tensors


def layer_tensors(name: str, layer: KaSALinear) -> dict[str, torch.Tensor]:
    """One layer's adapter tensors, keyed ``<name>.<key>``."""
    values = {
        **layer.adapter_params(),
        "removed_left": layer.removed_left,
        "removed_right": layer.removed_right,
        "base_fingerprint": layer.base_fingerprint,
    }
    return {f"{name}.{key}": t.detach().cpu().contiguous() for key, t in values.items()}


def save_kasa_adapter(model: nn.Module, save_directory: str | os.PathLike) -> Path:
    """Write the adapter of ``model`` to ``save_directory`` (created if needed); returns the directory."""
    from .model import get_kasa_config

    return write_adapter(save_directory, adapter_state_dict(model), get_kasa_config(model))


def write_adapter(
    save_directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: KaSAConfig
) -> Path:
    """Atomically write ``tensors`` (from ``adapter_state_dict``) and ``config`` as an adapter directory."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = sorted({key.rsplit(".", 1)[0] for key in tensors})
    metadata = {
        "format": FORMAT,
        "kasa_config": json.dumps(config.to_dict(), sort_keys=True),
        "layers": json.dumps(layers),
    }
    # Temporary files left by a save that was killed mid-write (never a complete adapter).
    for stale in directory.glob(f".{ADAPTER_FILE}.*.tmp"):
        stale.unlink(missing_ok=True)
    _atomic_write(directory / ADAPTER_FILE, lambda path: save_file(tensors, str(path), metadata=metadata))
    _atomic_write(
        directory / CONFIG_FILE,
        lambda path: path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"),
    )
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[KaSAConfig, dict[str, dict[str, torch.Tensor]]]:
    """The config and, per layer, the tensors of a saved adapter; every format problem is a ``ValueError``."""
    path = Path(directory) / ADAPTER_FILE
    if not path.is_file():
        hint = (
            " (it holds a PEFT adapter: see integrations/peft)"
            if (Path(directory) / "adapter_config.json").is_file()
            else ""
        )
        raise FileNotFoundError(f"no KaSA adapter at {directory}: {ADAPTER_FILE} is missing{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path} is corrupt or truncated ({e}); re-save the adapter or restore a copy"
        ) from e
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a kasa_trl adapter (format {metadata.get('format')!r}, expected {FORMAT!r})"
        )
    config = _config_from_metadata(metadata, path)
    layers = json.loads(metadata.get("layers", "[]"))
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    for name in layers:
        missing = [key for key in TENSOR_KEYS if f"{name}.{key}" not in tensors]
        if missing:
            raise ValueError(f"{path} is missing tensors {missing} for layer {name}; the file is incomplete")
        per_layer[name] = {key: tensors[f"{name}.{key}"] for key in TENSOR_KEYS}
    if not per_layer:
        raise ValueError(f"{path} holds no KaSA layers")
    return config, per_layer


def load_kasa_adapter(
    model: nn.Module, adapter_directory: str | os.PathLike, *, is_trainable: bool = False
) -> nn.Module:
    """Rebuild the saved KaSA adapter on ``model``, an untouched copy of the base it was trained on.

    Runs no decomposition. Every layer is checked (module exists and is supported, shapes, base fingerprint)
    before the model is modified, so a failed load leaves ``model`` unchanged.
    """
    if kasa_layers(model):
        raise ValueError("model already carries KaSA layers; load the adapter onto a fresh base model")
    config, per_layer = read_adapter(adapter_directory)
    modules = {
        name: _check_layer(model, name, tensors, config, adapter_directory)
        for name, tensors in per_layer.items()
    }
    for name, tensors in per_layer.items():
        module = modules[name]
        layer = KaSALinear(
            module,
            tensors["removed_left"],
            tensors["removed_right"],
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            base_mode=config.base_mode,
            adapter_dtype=tensors["lora_A"].dtype,
            base_fingerprint=tensors["base_fingerprint"],
        )
        with torch.no_grad():
            for key, param in layer.adapter_params().items():
                param.copy_(tensors[key])
        _set_submodule(model, name, layer)
    _freeze_all_but_adapters(model)
    if not is_trainable:
        for layer in kasa_layers(model).values():
            for param in layer.adapter_params().values():
                param.requires_grad_(False)
    model.kasa_config = config
    return model


def _check_layer(
    model: nn.Module,
    name: str,
    tensors: dict[str, torch.Tensor],
    config: KaSAConfig,
    where: str | os.PathLike,
) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"adapter at {where} targets {name}, which {type(model).__name__} does not have; "
            "load it onto the base model it was trained on"
        ) from None
    _check_supported(name, module)
    out_features, in_features = base_weight(module).shape
    r = config.r
    n = tensors["removed_left"].shape[-1]
    expected = {
        "lora_A": (r, in_features),
        "lora_B": (out_features, r),
        "lora_diag": (r,),
        "removed_left": (out_features, n),
        "removed_right": (n, in_features),
    }
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"adapter tensor {name}.{key} has shape {tuple(tensors[key].shape)} but {name} "
                f"({out_features}x{in_features}, r={r}) needs {shape}; the adapter belongs to another model"
            )
    if not fingerprints_match(tensors["base_fingerprint"], weight_fingerprint(base_weight(module))):
        raise ValueError(
            f"the weight of {name} differs from the base this adapter was trained on (fingerprint mismatch); "
            "load the adapter onto the same base checkpoint, unmodified (not already truncated or merged)"
        )
    return module


def _config_from_metadata(metadata: dict[str, str], path: Path) -> KaSAConfig:
    try:
        data = json.loads(metadata["kasa_config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} has no readable KaSA config in its metadata; re-save the adapter") from e
    # Regularizers matter for training only; an adapter trained with a user-registered one must still load.
    weights = data.get("regularizers") or {}
    unknown = sorted(set(weights) - set(registered_regularizers()))
    if unknown:
        warnings.warn(
            f"adapter was trained with regularizers {unknown} that are not registered here; they are dropped "
            "from the loaded config (register them before loading to keep them)",
            stacklevel=3,
        )
        data["regularizers"] = {k: v for k, v in weights.items() if k not in unknown}
    return KaSAConfig.from_dict(data)


def _atomic_write(target: Path, write) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over ``target``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
