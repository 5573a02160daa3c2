"""Damaged adapter files, generated: mutated bytes, header JSON fields, tensor dtypes, shapes and values. Every
mutation gives a clear error (ValueError or FileNotFoundError naming the adapter file) or a correct load; after an
error the model is unchanged (state dict equal, no KaSA layer) and the files too (reading never writes)."""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from kasa_trl import KaSAConfig, apply_kasa, kasa_layers, load_kasa_adapter, save_kasa_adapter
from kasa_trl.adapter_io import ADAPTER_FILE, CONFIG_FILE, TENSOR_KEYS
from kasa_trl.tiny import build_tiny_llama

from .conftest import VOCAB, randomize_adapters

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _base():
    return build_tiny_llama(VOCAB, num_layers=1, seed=0).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The files of a valid adapter (r=2, 7 layers), and its tensors and metadata."""
    directory = tmp_path_factory.mktemp("fuzz") / "adapter"
    model = apply_kasa(_base(), KaSAConfig(r=2))
    randomize_adapters(model)
    save_kasa_adapter(model, directory)
    with safe_open(str(directory / ADAPTER_FILE), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    files = {name: (directory / name).read_bytes() for name in (ADAPTER_FILE, CONFIG_FILE)}
    return files, tensors, metadata


@pytest.fixture(scope="module")
def base_state():
    return {k: v.clone() for k, v in _base().state_dict().items()}


def _check_outcome(directory: Path, base_state: dict[str, torch.Tensor]) -> None:
    """Load onto a fresh base: a clear error with nothing changed, or a load that holds what the file holds."""
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    model = _base()
    try:
        load_kasa_adapter(model, directory)
    except (ValueError, FileNotFoundError) as e:
        assert str(directory) in str(e), f"the error does not name the adapter: {e}"
        state = model.state_dict()
        assert state.keys() == base_state.keys()
        assert all(torch.equal(state[k], base_state[k]) for k in state), "a failed load changed the model"
        assert not kasa_layers(model)
        assert {p.name: p.read_bytes() for p in directory.iterdir()} == files
        return
    with safe_open(str(directory / ADAPTER_FILE), framework="pt") as f:
        layers = json.loads(f.metadata()["layers"])
        assert sorted(kasa_layers(model)) == sorted(layers)
        for name, layer in kasa_layers(model).items():
            for key, param in layer.adapter_params().items():
                assert torch.equal(param.detach(), f.get_tensor(f"{name}.{key}"))
                assert torch.isfinite(param).all()
            assert torch.isfinite(layer.removed_left).all() and torch.isfinite(layer.removed_right).all()
            assert torch.equal(layer.base_fingerprint, f.get_tensor(f"{name}.base_fingerprint"))


def _write(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)


# --- raw bytes ---------------------------------------------------------------------------------------------------


@FUZZ
@given(
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    tail=st.binary(max_size=16),
)
def test_mutated_bytes(saved, base_state, edits, cut, tail):
    files, _, _ = saved
    data = bytearray(files[ADAPTER_FILE])
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "adapter"
        _write(directory, {ADAPTER_FILE: bytes(data) + tail, CONFIG_FILE: files[CONFIG_FILE]})
        _check_outcome(directory, base_state)


# --- the header: metadata fields and tensor entries, as JSON ---------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
CONFIG_EDITS = st.dictionaries(
    st.sampled_from(
        [
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "base_mode",
            "truncation",
            "target_modules",
            "regularizers",
            "kasa_config_version",
            "decomposition_method",
            "unknown_key",
        ]
    ),
    JSON_VALUES | st.sampled_from([1, 2, 3, 0, -1, 16, 16.0, math.inf, "auto", "in_place", "official"]),
    min_size=1,
    max_size=3,
)
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XX"]


def _split(data: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@FUZZ
@given(
    field=st.sampled_from(["format", "kasa_config", "layers", "base_model_name_or_path", "other"]),
    value=JSON_VALUES,
    raw=st.booleans(),
    config_edit=CONFIG_EDITS,
    layers_edit=st.sampled_from(["drop", "duplicate", "unknown", "empty", "non-string", "module", "swap"]),
    choice=st.data(),
)
def test_mutated_metadata(saved, base_state, field, value, raw, config_edit, layers_edit, choice):
    files, _, _ = saved
    header, body = _split(files[ADAPTER_FILE])
    metadata = header["__metadata__"]
    layers = json.loads(metadata["layers"])
    if field == "kasa_config" and not raw:
        metadata["kasa_config"] = json.dumps({**json.loads(metadata["kasa_config"]), **config_edit})
    elif field == "layers" and not raw:
        pick = choice.draw(st.sampled_from(layers))
        edited = {
            "drop": [n for n in layers if n != pick],
            "duplicate": [*layers, pick],
            "unknown": [*layers, "model.layers.0.nowhere"],
            "empty": [],
            "non-string": [*layers[:-1], 7],
            "module": [*layers, "model.layers.0.mlp"],  # a module KaSA cannot wrap (and no tensors for it)
            "swap": [n.replace("q_proj", "o_proj") for n in layers],
        }[layers_edit]
        metadata["layers"] = json.dumps(edited)
    elif field == "other":
        metadata["other"] = json.dumps(value)
    else:
        metadata[field] = json.dumps(value) if raw else str(value)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "adapter"
        _write(directory, {ADAPTER_FILE: _join(header, body)})  # no kasa_config.json: the file alone
        _check_outcome(directory, base_state)


@FUZZ
@given(
    key=st.sampled_from(TENSOR_KEYS),
    what=st.sampled_from(["dtype", "shape", "offsets"]),
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 130), max_size=3),
    offsets=st.tuples(st.integers(0, 10**5), st.integers(0, 10**5)),
    choice=st.data(),
)
def test_mutated_tensor_entries(saved, base_state, key, what, dtype, shape, offsets, choice):
    files, tensors, _ = saved
    header, body = _split(files[ADAPTER_FILE])
    layer = choice.draw(st.sampled_from(sorted({k.rsplit(".", 1)[0] for k in tensors})))
    entry = header[f"{layer}.{key}"]
    if what == "dtype":
        entry["dtype"] = dtype
    elif what == "shape":
        entry["shape"] = shape
    else:
        entry["data_offsets"] = list(offsets)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "adapter"
        _write(directory, {ADAPTER_FILE: _join(header, body), CONFIG_FILE: files[CONFIG_FILE]})
        _check_outcome(directory, base_state)


# --- tensors: well-formed files holding the wrong dtype, shape or values ----------------------------------------

TORCH_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
]
VALUES = [math.nan, math.inf, -math.inf, 1e38, -1e38, 0.0, 1e-45, 3.0]


@FUZZ
@given(
    key=st.sampled_from(TENSOR_KEYS),
    what=st.sampled_from(["dtype", "shape", "scalar", "value", "remove", "extra"]),
    dtype=st.sampled_from(TORCH_DTYPES),
    shape=st.lists(st.integers(0, 9), max_size=3),
    value=st.sampled_from(VALUES),
    position=st.floats(0, 1, exclude_max=True),
    choice=st.data(),
)
def test_mutated_tensors(saved, base_state, key, what, dtype, shape, value, position, choice):
    files, tensors, metadata = saved
    tensors = dict(tensors)
    name = f"{choice.draw(st.sampled_from(sorted({k.rsplit('.', 1)[0] for k in tensors})))}.{key}"
    t = tensors[name]
    if what == "dtype":
        tensors[name] = t.to(dtype)
    elif what == "shape":
        tensors[name] = torch.ones(shape, dtype=t.dtype)
    elif what == "scalar":
        tensors[name] = t.reshape(-1)[0].clone()  # a 0-dim tensor
    elif what == "value":
        t = t.clone()
        t.view(-1)[int(position * t.numel())] = value
        tensors[name] = t
    elif what == "remove":
        del tensors[name]
    else:
        tensors[choice.draw(st.sampled_from([f"{name}_extra", "lora_A", "model.other.lora_A"]))] = t.clone()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "adapter"
        directory.mkdir()
        save_file(tensors, str(directory / ADAPTER_FILE), metadata=metadata)
        (directory / CONFIG_FILE).write_bytes(files[CONFIG_FILE])
        _check_outcome(directory, base_state)


def test_unmutated_file_loads(saved, base_state):
    """The fuzzed file itself loads (so the tests above start from a valid adapter)."""
    files, _, _ = saved
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "adapter"
        _write(directory, files)
        model = _base()
        load_kasa_adapter(model, directory)
        assert len(kasa_layers(model)) == 7
