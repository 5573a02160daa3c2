"""A kasa_trl adapter as the exporters see it, read from an adapter directory or from a live model."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kasa_trl.adapter_io import (
    layer_tensors,
    model_name_or_path,
    read_adapter,
    read_adapter_info,
    verify_adapter_base,
)
from kasa_trl.atomic_outputs import check_output_dir
from kasa_trl.config import KaSAConfig
from kasa_trl.model import get_kasa_config, kasa_layers
from kasa_trl.quantized import loading_kwargs
from kasa_trl.weights import stores_transposed

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
    source: str | os.PathLike[str] | nn.Module, base_model_name_or_path: str | None = None
) -> KaSASource:
    """Read a kasa_trl adapter directory, or the adapter carried by a live model (``apply_kasa``/``load_kasa_adapter``).

    With a directory and ``base_model_name_or_path`` naming a model available locally (a directory, or the Hub
    cache), the base is loaded and the adapter checked against it exactly as ``load_kasa_adapter`` checks it
    (modules, shapes, base fingerprints), which also tells which targets are ``Conv1D``.
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
    conv1d = _inspect_base(base_model_name_or_path, directory, layers) if base_model_name_or_path else None
    return KaSASource(config, layers, conv1d, base_model_name_or_path, directory)


def _from_model(model: nn.Module, base_model_name_or_path: str | None) -> KaSASource:
    layers = kasa_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} carries no KaSA layers; apply_kasa or load_kasa_adapter first"
        )
    config = get_kasa_config(model)
    tensors = {
        name: {key: t for key, t in layer_tensors(layer).items() if key in FACTOR_KEYS}
        for name, layer in layers.items()
    }
    conv1d = {name: stores_transposed(layer.base_layer) for name, layer in layers.items()}
    if base_model_name_or_path is None:
        base_model_name_or_path = model_name_or_path(model)
    return KaSASource(config, tensors, conv1d, base_model_name_or_path, None)


def resolve_base(
    adapter_directory: str | os.PathLike[str], given: str | None, *, force: bool = False
) -> str | None:
    """The base model to use with a saved adapter: ``given``, else the one the adapter records (``None`` if
    neither names one).

    A moved or copied output folder: when the recorded base is a local path that no longer exists, the folder
    ``<adapter_directory>/base`` (where the examples and the trainer save it) is used instead, with a warning;
    and a ``given`` local directory is accepted in place of a vanished recorded path without ``force``. Either
    way the weights are still checked against the adapter (the exporters and ``load_kasa_adapter`` do).

    Raises:
        ValueError: ``given`` names another base than the recorded one (which still exists, or is a hub id) and
            ``force`` is false. The same model under two names (a hub id and a local copy) is one case of it;
            ``force`` then uses ``given``, whose weights are still checked against the adapter where they are
            available.
    """
    recorded = read_adapter_info(adapter_directory).base_model_name_or_path
    if recorded is not None and _vanished_path(recorded):
        beside = Path(adapter_directory) / "base"
        if given is None and beside.is_dir():
            warnings.warn(
                f"the recorded base {recorded} does not exist (moved or copied output?); using {beside}, "
                "next to the adapter (its weights are checked against the adapter)",
                stacklevel=2,
            )
            return str(beside)
        if given is not None and os.path.isdir(given):
            return given  # the recorded path is gone: the weights check decides
    if given is None or recorded is None or _same_model(given, recorded):
        return given if given is not None else recorded
    if force:
        return given
    raise ValueError(
        f"the adapter at {adapter_directory} was trained on base model {recorded!r}, not {given!r}; drop the base "
        "argument to use the recorded one, or force it (--force-base, force_base=True) if it names the same weights"
    )


def _vanished_path(name: str) -> bool:
    """Whether a recorded base names a local path (absolute or ./ ../) that does not exist (not a hub id)."""
    return (os.path.isabs(name) or name.startswith(("./", "../"))) and not os.path.exists(name)


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)
    except OSError:
        return False


def open_export(
    source: str | os.PathLike[str] | nn.Module,
    out_dir: str | os.PathLike[str],
    base_model_name_or_path: str | None,
    *,
    overwrite: bool,
    force_base: bool,
) -> tuple[KaSASource, dict[str, str | os.PathLike[str] | None]]:
    """What every export does before writing: the base (given, else recorded; a given one that differs from the
    recorded one refused unless ``force_base``), the inputs no output may overlap, ``out_dir`` checked before any
    work, then the adapter read (and checked against the base where it is available locally).

    Returns:
        The source and the inputs, for ``atomic_outputs.atomic_output_dir``.
    """
    base = base_model_name_or_path
    if not isinstance(source, nn.Module):
        base = resolve_base(source, base, force=force_base)
    inputs = source_inputs(source, base)
    check_output_dir(out_dir, overwrite=overwrite, inputs=inputs)
    return read_kasa_source(source, base), inputs


def source_inputs(
    source: str | os.PathLike[str] | nn.Module, base_model_name_or_path: str | None
) -> dict[str, str | os.PathLike[str] | None]:
    """What an export reads, by role, for ``kasa_trl.atomic_outputs.check_no_overlap``: the adapter directory and a local base."""
    base = base_model_name_or_path
    if base is None and isinstance(source, nn.Module):
        base = model_name_or_path(source)
    return {
        "adapter directory": None if isinstance(source, nn.Module) else source,
        "base model directory": base
        if isinstance(base, (str, os.PathLike)) and os.path.isdir(base)
        else None,
    }


def _inspect_base(
    base: str, directory: Path, layers: dict[str, dict[str, torch.Tensor]]
) -> dict[str, bool] | None:
    """Check the adapter against ``base``'s weights as ``load_kasa_adapter`` does; per layer, whether ``base``
    holds a ``Conv1D`` there. ``None`` when ``base`` is neither a local directory nor in the local Hub cache.

    Raises:
        ValueError: the base lacks an adapted module, its shape differs, or its weights are not the ones the
            adapter was trained on (the fingerprint rule of ``load_kasa_adapter``).
    """
    from transformers import AutoModelForCausalLM

    is_local = os.path.isdir(base)
    # A base the adapter was trained on quantized is loaded quantized the same way (its weights are checked
    # dequantized).
    quantization = loading_kwargs(read_adapter_info(directory).base_quantization, f"adapter {directory}")
    try:
        # dtype="auto": the checkpoint's own dtype (half the memory of float32 for a bf16 base); the fingerprint
        # rule accepts bf16/fp16 copies of the same weights.
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype="auto", local_files_only=True, **quantization
        )
    except (OSError, ValueError, KeyError) as e:
        if is_local:
            raise ValueError(f"cannot load the base model at {base}: {e}") from e
        warnings.warn(
            f"base model {base!r} is not available locally, so the adapter is not checked against it and "
            f"Conv1D layers are not detected ({e})",
            stacklevel=3,
        )
        return None
    modules = dict(model.named_modules())
    conv1d = {name: name in modules and stores_transposed(modules[name]) for name in layers}
    try:
        verify_adapter_base(model, directory)
    except ValueError as e:
        raise ValueError(f"the adapter does not fit base model {base}: {e}") from e
    return conv1d
