"""The adapter directory: writing and reading its files, and every check of them that needs no model.

An adapter directory holds ``kasa_adapter.safetensors`` (its contents: ``adapter_format``) and ``kasa_config.json``,
a human-readable copy of the config. The safetensors file is the single source of truth: self-contained and replaced
atomically, so a crash while saving leaves the previous adapter loadable. ``kasa_config.json`` may be missing; when
present it must agree with it (an edit by hand would otherwise be silently ignored). Writers of one directory are
serialized (``atomic_files``), so concurrent saves leave one writer's adapter, whole.

Writing checks what reading checks (complete layers, dtypes, shapes, finite values): a file written here always
reads back. Reading checks every header field and tensor before returning anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapter_format import (
    ADAPTER_FILE,
    BASE_MODEL_KEY,
    BASE_QUANTIZATION_KEY,
    CONFIG_FILE,
    FORMAT,
    HEADER_DTYPES,
    TENSOR_KEYS,
    Spec,
    check_finite,
    check_layout,
    check_quantization_record,
)
from .atomic_files import atomic_write, directory_lock, fsync_directory, remove_stale_temporaries
from .config import KaSAConfig
from .regularizers import registered_regularizers


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter file's header says (``read_adapter_info``).

    Attributes:
        path: the ``kasa_adapter.safetensors`` file.
        config: the KaSA config the adapter was trained with.
        layers: the adapted modules' qualified names, sorted.
        base_model_name_or_path: the base model it was saved from (a hub id or a path), if recorded.
        base_quantization: for an adapter trained on a quantized base, ``{"layers": {name: kind}, "config":
            BitsAndBytesConfig as a dict or None}`` (``kasa_trl.quantized``); ``None`` for a full-precision base.
    """

    path: Path
    config: KaSAConfig
    layers: tuple[str, ...]
    base_model_name_or_path: str | None
    base_quantization: dict[str, Any] | None = None


def write_adapter(
    save_directory: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    config: KaSAConfig,
    *,
    base_model_name_or_path: str | None = None,
    base_quantization: dict[str, Any] | None = None,
) -> Path:
    """Atomically write ``tensors`` (from ``adapter_state_dict``) and ``config`` as an adapter directory;
    ``base_quantization``: how the base was quantized (``adapter_io.base_quantization``), ``None`` if it was not.

    The tensors are checked as a load checks them (complete layers, dtypes, shapes, finite values) before
    anything is written: a file this function writes always reads back.
    """
    directory = Path(save_directory)
    if not isinstance(config, KaSAConfig):
        raise TypeError(f"config must be a kasa_trl.KaSAConfig, got {type(config).__name__}")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(
            f"base_model_name_or_path must be a str (a hub id or a path) or None, got "
            f"{type(base_model_name_or_path).__name__}"
        )
    where = f"not saving the adapter to {directory}"
    if not isinstance(tensors, Mapping) or not all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in tensors.items()
    ):
        raise TypeError(f"{where}: tensors must map names to torch.Tensor (as adapter_state_dict returns)")
    tensors = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}
    layers = sorted({key.rsplit(".", 1)[0] for key in tensors})
    check_layout(
        {key: (t.dtype, tuple(t.shape)) for key, t in tensors.items()}, layers, config, where, for_saving=True
    )
    check_finite(tensors, where, for_saving=True)
    metadata = {
        "format": FORMAT,
        "kasa_config": json.dumps(config.to_dict(), sort_keys=True),
        "layers": json.dumps(layers),
    }
    if base_model_name_or_path:
        metadata[BASE_MODEL_KEY] = base_model_name_or_path
    if base_quantization is not None:
        check_quantization_record(base_quantization, layers, where, for_saving=True)
        metadata[BASE_QUANTIZATION_KEY] = json.dumps(base_quantization, sort_keys=True)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # the path, or a folder above it, is a file
        blocking = next(p for p in (directory, *directory.parents) if p.exists() and not p.is_dir())
        raise NotADirectoryError(
            f"{where}: {blocking} is a file, not a directory (an adapter is a directory of {ADAPTER_FILE} and "
            f"{CONFIG_FILE}); pass a directory path that does not exist yet or is a directory"
        ) from None
    try:
        with directory_lock(directory, exclusive=True):
            remove_stale_temporaries(directory, (ADAPTER_FILE, CONFIG_FILE))
            _replace_adapter(directory, tensors, metadata, config)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # only if empty
                directory.rmdir()
        raise
    return directory


def _replace_adapter(
    directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], config: KaSAConfig
) -> None:
    """Replace both files. The copy goes first and comes back last: a save killed in between leaves no copy,
    never one that disagrees; a save that fails before replacing the adapter file puts the previous copy back."""
    copy = directory / CONFIG_FILE
    try:
        previous = copy.read_bytes()
    except FileNotFoundError:
        previous = None
    adapter = directory / ADAPTER_FILE
    before = _identity(adapter)
    copy.unlink(missing_ok=True)
    fsync_directory(directory)
    try:
        atomic_write(adapter, lambda path: save_file(tensors, str(path), metadata=metadata))
    except BaseException:
        if previous is not None and _identity(adapter) == before:  # the previous adapter is still there
            with contextlib.suppress(Exception):
                atomic_write(copy, lambda path: path.write_bytes(previous))
        raise
    atomic_write(
        copy, lambda path: path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    )
    fsync_directory(directory)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


# --- reading -----------------------------------------------------------------------------------------------------


def read_adapter(directory: str | os.PathLike[str]) -> tuple[KaSAConfig, dict[str, dict[str, torch.Tensor]]]:
    """The config and, per layer, the tensors of a saved adapter.

    Every problem of the files is a ``ValueError`` naming the file (a missing adapter a ``FileNotFoundError``):
    header fields, tensor names, dtypes, shapes, non-finite values, a ``kasa_config.json`` that disagrees.
    """
    info, per_layer = read_adapter_with_info(directory)
    return info.config, per_layer


def read_adapter_with_info(
    directory: str | os.PathLike[str],
) -> tuple[AdapterInfo, dict[str, dict[str, torch.Tensor]]]:
    """``read_adapter`` with the whole header (``read_adapter_info``) instead of only its config: one read."""
    with directory_lock(_existing_directory(directory), exclusive=False):
        info, specs = _read_header(directory)
        try:
            with safe_open(str(info.path), framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in specs}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(
                f"{info.path} is corrupt or truncated ({e}); re-save the adapter or restore a copy"
            ) from e
    check_finite(tensors, str(info.path), for_saving=False)
    per_layer = {name: {key: tensors[f"{name}.{key}"] for key in TENSOR_KEYS} for name in info.layers}
    return info, per_layer


def read_adapter_info(directory: str | os.PathLike[str]) -> AdapterInfo:
    """The header of a saved adapter: config, layers, base model name. Checks the header as ``read_adapter`` does
    (not the tensors' values, which it does not read)."""
    with directory_lock(_existing_directory(directory), exclusive=False):
        return _read_header(directory)[0]


def _existing_directory(directory: str | os.PathLike[str]) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"adapter directory must be a str or a path, got {type(directory).__name__}")
    path = Path(directory) / ADAPTER_FILE
    if not path.is_file():
        hint = ""
        if (Path(directory) / "adapter_config.json").is_file():
            hint = (
                " (it holds a PEFT adapter: import a PEFT KaSA adapter with "
                "kasa_trl.integrations.peft.import_peft_kasa)"
            )
        elif Path(directory).is_file():
            hint = f" ({directory} is a file: pass the directory that holds {ADAPTER_FILE})"
        raise FileNotFoundError(f"no KaSA adapter at {directory}: {ADAPTER_FILE} is missing{hint}")
    return Path(directory)


def _read_header(directory: str | os.PathLike[str]) -> tuple[AdapterInfo, dict[str, Spec]]:
    path = _existing_directory(directory) / ADAPTER_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            specs: dict[str, Spec] = {}
            for key in f.keys():
                piece = f.get_slice(key)
                dtype = piece.get_dtype()
                specs[key] = (HEADER_DTYPES.get(dtype, dtype), tuple(piece.get_shape()))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path} is corrupt or truncated ({e}); re-save the adapter or restore a copy"
        ) from e
    if metadata.get("format") != FORMAT:
        newer = str(metadata.get("format", "")).startswith(FORMAT.rsplit(".", 1)[0] + ".")
        raise ValueError(
            f"{path} is not a kasa_trl adapter (format {metadata.get('format')!r}, expected {FORMAT!r})"
            + (
                "; it was written by another version of kasa_trl: upgrade kasa_trl to read it"
                if newer
                else ""
            )
        )
    config_dict = _json_field(metadata, "kasa_config", path, dict, "a JSON object (the KaSA config)")
    config = _config_from_dict(config_dict, path)
    layers = _json_field(metadata, "layers", path, list, "a JSON list of module names")
    duplicates = sorted({name for name in layers if isinstance(name, str) and layers.count(name) > 1})
    if duplicates:
        raise ValueError(f"{path}: metadata field 'layers' lists {duplicates[:3]} twice; re-save the adapter")
    base = metadata.get(BASE_MODEL_KEY)  # other metadata keys are ignored: room for fields added later
    check_layout(specs, layers, config, str(path), for_saving=False)
    _check_config_copy(Path(directory) / CONFIG_FILE, config_dict, path)
    quantization = None
    if BASE_QUANTIZATION_KEY in metadata:
        quantization = _json_field(metadata, BASE_QUANTIZATION_KEY, path, dict, "a JSON object")
        check_quantization_record(
            quantization, layers, f"{path}: metadata field {BASE_QUANTIZATION_KEY!r}", for_saving=False
        )
    return AdapterInfo(path, config, tuple(sorted(layers)), base or None, quantization), specs


def _json_field(metadata: Mapping[str, str], key: str, path: Path, kind: type, what: str) -> Any:
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise ValueError(f"{path} has no {key!r} in its metadata; re-save the adapter") from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: metadata field {key!r} is not valid JSON ({e}); re-save the adapter"
        ) from e
    if not isinstance(value, kind):
        raise ValueError(
            f"{path}: metadata field {key!r} holds {type(value).__name__}, expected {what}; re-save the adapter"
        )
    return value


def _config_from_dict(data: dict[str, Any], path: Path) -> KaSAConfig:
    # Regularizers matter for training only; an adapter trained with a user-registered one must still load.
    data = dict(data)
    weights = data.get("regularizers")
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - set(registered_regularizers()), key=str)
        if unknown:
            warnings.warn(
                f"adapter {path} was trained with regularizers {unknown} that are not registered here; they are "
                "dropped from the loaded config (register them before loading to keep them)",
                stacklevel=4,
            )
            data["regularizers"] = {k: v for k, v in weights.items() if k not in unknown}
    try:
        return KaSAConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} holds an invalid KaSA config: {e}") from e


def _check_config_copy(json_path: Path, saved: dict[str, Any], path: Path) -> None:
    """``kasa_config.json`` (optional) must say what the adapter file says: the file is what loads."""
    fix = (
        f"the config in {path.name} is the one that loads, so an edit of {json_path.name} would be ignored: "
        f"delete {json_path.name} or re-save the adapter to restore it"
    )
    try:
        copy = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{json_path} is unreadable ({e}); {fix}") from e
    if not isinstance(copy, dict):
        raise ValueError(f"{json_path} holds {type(copy).__name__}, not a JSON object; {fix}")
    differing = sorted(
        (k for k in saved.keys() | copy.keys() if not _same_json(saved.get(k), copy.get(k))), key=str
    )
    if differing:
        details = "; ".join(
            f"{k}: {json.dumps(copy.get(k))} in {json_path.name}, {json.dumps(saved.get(k))} in {path.name}"
            for k in differing[:5]
        )
        raise ValueError(f"{json_path} disagrees with {path} on {differing} ({details}); {fix}")


def _same_json(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
    return (type(a) is type(b) or numbers) and a == b
