import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from kasa_trl import (
    KaSAConfig,
    adapter_files,
    adapter_io,
    apply_kasa,
    kasa_layers,
    load_kasa_adapter,
    merge_and_unload,
    save_kasa_adapter,
)
from kasa_trl.adapter_io import (
    ADAPTER_FILE,
    BASE_MODEL_KEY,
    CONFIG_FILE,
    TENSOR_KEYS,
    adapter_state_dict,
    read_adapter,
    read_adapter_info,
    verify_adapter_base,
    write_adapter,
)
from kasa_trl.tiny import build_tiny_gpt2, build_tiny_llama

from .conftest import VOCAB, randomize_adapters
from .test_fingerprint import weight_with_triplets


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _forbid_decompositions(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a decomposition ran during load")

    for name in ("svd", "svdvals", "eigh", "eigvalsh", "eig", "qr", "lstsq"):
        monkeypatch.setattr(torch.linalg, name, boom)
    for name in ("svd", "svd_lowrank", "pca_lowrank"):
        monkeypatch.setattr(torch, name, boom)


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_gpt2])
@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
def test_save_load_round_trip_without_decomposition(builder, base_mode, input_ids, tmp_path, monkeypatch):
    model = apply_kasa(builder(VOCAB).eval(), KaSAConfig(r=4, base_mode=base_mode, use_rslora=True))
    randomize_adapters(model)
    expected = _logits(model, input_ids)
    save_kasa_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / ADAPTER_FILE).is_file()
    assert json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())["base_mode"] == base_mode

    fresh = builder(VOCAB).eval()
    with monkeypatch.context() as m:
        _forbid_decompositions(m)
        loaded = load_kasa_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(_logits(loaded, input_ids), expected)  # bit-identical
    assert loaded.kasa_config == model.kasa_config
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_kasa_adapter(builder(VOCAB).eval(), tmp_path / "adapter", is_trainable=True)
    assert {n.rsplit(".", 1)[-1] for n, p in trainable.named_parameters() if p.requires_grad} == {
        "lora_A",
        "lora_B",
        "lora_diag",
    }


def test_load_onto_other_base_fails_and_leaves_it_untouched(tmp_path, input_ids):
    model = apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=4))
    save_kasa_adapter(model, tmp_path)
    other = build_tiny_llama(VOCAB, seed=1).eval()
    before = _logits(other, input_ids)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        load_kasa_adapter(other, tmp_path)
    assert not kasa_layers(other)
    assert torch.equal(_logits(other, input_ids), before)
    # An already-truncated copy of the right base is also refused.
    truncated = apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=4))
    with pytest.raises(ValueError, match="already carries KaSA"):
        load_kasa_adapter(truncated, tmp_path)


def test_load_accepts_same_base_in_bf16(tmp_path):
    model = apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=4))
    save_kasa_adapter(model, tmp_path)
    load_kasa_adapter(build_tiny_llama(VOCAB, seed=0).to(torch.bfloat16), tmp_path)


def test_load_onto_other_architecture_names_the_module(tmp_path):
    save_kasa_adapter(apply_kasa(build_tiny_llama(VOCAB), KaSAConfig(r=2)), tmp_path)
    with pytest.raises(
        ValueError, match=r"targets model\.layers\.0\.\w+\.\w+, which GPT2LMHeadModel does not have"
    ):
        load_kasa_adapter(build_tiny_gpt2(VOCAB), tmp_path)
    save_kasa_adapter(
        apply_kasa(build_tiny_llama(VOCAB, hidden_size=32), KaSAConfig(r=2)), tmp_path / "small"
    )
    with pytest.raises(ValueError, match="has shape .* needs"):
        load_kasa_adapter(build_tiny_llama(VOCAB), tmp_path / "small")


def test_corrupt_truncated_and_missing_files(tmp_path):
    save_kasa_adapter(apply_kasa(build_tiny_llama(VOCAB), KaSAConfig(r=2)), tmp_path)
    path = tmp_path / ADAPTER_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_kasa_adapter(build_tiny_llama(VOCAB), tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_kasa_adapter(build_tiny_llama(VOCAB), tmp_path)
    with pytest.raises(FileNotFoundError, match="no KaSA adapter"):
        load_kasa_adapter(build_tiny_llama(VOCAB), tmp_path / "nowhere")


def test_missing_tensor_is_named(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_kasa_adapter(apply_kasa(build_tiny_llama(VOCAB), KaSAConfig(r=2)), tmp_path)
    path = tmp_path / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.up_proj.lora_diag"}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(
        ValueError, match=r"missing tensors \['lora_diag'\] for layer model.layers.1.mlp.up_proj"
    ):
        load_kasa_adapter(build_tiny_llama(VOCAB), tmp_path)


def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model = apply_kasa(build_tiny_llama(VOCAB), KaSAConfig(r=2))
    save_kasa_adapter(model, tmp_path)
    good = (tmp_path / ADAPTER_FILE).read_bytes()
    randomize_adapters(model)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr("kasa_trl.adapter_files.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_kasa_adapter(model, tmp_path)
    assert (tmp_path / ADAPTER_FILE).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_FILE, CONFIG_FILE]  # the copy put back
    load_kasa_adapter(build_tiny_llama(VOCAB), tmp_path)
    # A save into a new directory that fails leaves no directory behind.
    with pytest.raises(KeyboardInterrupt):
        save_kasa_adapter(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # Killed between the two files: no copy, never one that disagrees with the adapter file.
    monkeypatch.undo()
    real_write = adapter_files.atomic_write

    def killed_after_the_adapter(target, write):
        real_write(target, write)
        if target.name == ADAPTER_FILE:
            raise KeyboardInterrupt("killed between the two files")

    monkeypatch.setattr(adapter_files, "atomic_write", killed_after_the_adapter)
    with pytest.raises(KeyboardInterrupt):
        save_kasa_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_FILE]
    loaded = load_kasa_adapter(build_tiny_llama(VOCAB), tmp_path)
    assert torch.equal(kasa_layers(loaded)[LAST].lora_A, kasa_layers(model)[LAST].lora_A)  # the new adapter


def test_config_file_unknown_key_and_future_version(tmp_path):
    cfg = KaSAConfig(r=2)
    cfg.to_json(tmp_path / "c.json")
    assert KaSAConfig.from_json(tmp_path / "c.json") == cfg
    data = json.loads((tmp_path / "c.json").read_text())
    (tmp_path / "c.json").write_text(json.dumps({**data, "lora_rank": 4}))
    with pytest.raises(ValueError, match=r"unknown KaSAConfig key\(s\) \['lora_rank'\]"):
        KaSAConfig.from_json(tmp_path / "c.json")
    (tmp_path / "c.json").write_text(json.dumps({**data, "kasa_config_version": 99}))
    with pytest.raises(ValueError, match="newer than this kasa_trl"):
        KaSAConfig.from_json(tmp_path / "c.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        KaSAConfig.from_json(tmp_path / "c.json")


# --- base identity (kasa_trl/fingerprint.py states the rule) ---------------------------------------------------


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not kasa_layers(model)


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def test_merged_model_as_base_is_refused_as_already_truncated(tmp_path):
    model = apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=4, base_mode="in_place"))
    save_kasa_adapter(model, tmp_path)
    merged = merge_and_unload(model)  # B = 0: the merged weights are W - R
    before = _state(merged)
    with pytest.raises(
        ValueError,
        match=r"fingerprint mismatch\); load the adapter onto the same base checkpoint, unmodified .*: it no longer "
        r"carries the directions this adapter removes \(0% of their singular values left\): the base is already "
        r"truncated.*; 13 more of the 14 layers differ",
    ):
        load_kasa_adapter(merged, tmp_path)
    _assert_unchanged(merged, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_same_base_in_another_dtype_loads(tmp_path, dtype):
    save_kasa_adapter(apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=4)), tmp_path)
    loaded = load_kasa_adapter(build_tiny_llama(VOCAB, seed=0).to(dtype), tmp_path)
    assert len(kasa_layers(loaded)) == 14


def test_perturbed_base_is_refused_with_the_figures(tmp_path):
    save_kasa_adapter(apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=4)), tmp_path)
    base = build_tiny_llama(VOCAB, seed=0)
    with torch.no_grad():
        weight = base.model.layers[0].mlp.down_proj.weight
        weight += 0.05 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    before = _state(base)
    with pytest.raises(
        ValueError,
        match=r"the weight of model\.layers\.0\.mlp\.down_proj differs .*its fingerprint moved by [\d.e-]+ and the "
        r"removed directions by [\d.e-]+ of the weight's RMS, its norm by [\d.]+%; the tolerance is 0\.02",
    ) as info:
        load_kasa_adapter(base, tmp_path)
    assert "more of the" not in str(info.value)  # only that layer
    _assert_unchanged(base, before)


class _OneLayer(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def test_base_identity_at_4096(tmp_path):
    """One 4096x4096 layer (as in a Llama of hidden 4096): every copy of the same weights loads, nothing else."""
    weight, left, right = weight_with_triplets(4096, 4096, 16, seed=0)

    def known_factors(targets, n_removed, config):
        return {"proj": (left, right)}

    model = apply_kasa(_OneLayer(weight), KaSAConfig(r=16, target_modules=["proj"]), decomposer=known_factors)
    save_kasa_adapter(model, tmp_path)
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    del model
    other = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(1)) * 0.02
    perturbed = weight + 0.05 * 0.02 * torch.randn(4096, 4096, generator=torch.Generator().manual_seed(2))
    refused = {
        "another random weight of the same norm": (other, r"its fingerprint moved by"),
        "a truncated copy": (weight - left @ right, r"the base is already truncated"),
        "a copy perturbed by 5%": (perturbed, r"its fingerprint moved by"),
    }
    for case, (candidate, message) in refused.items():
        base = _OneLayer(candidate)
        with pytest.raises(ValueError, match=r"the weight of proj differs .*" + message):
            verify_adapter_base(base, tmp_path)
        assert torch.equal(base.proj.weight, candidate), case
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        verify_adapter_base(_OneLayer(weight).to(dtype), tmp_path)
    loaded = load_kasa_adapter(_OneLayer(weight), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


# --- all or nothing --------------------------------------------------------------------------------------------


def _rewrite(directory, edit, metadata_edit=None):
    path = Path(directory) / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    if metadata_edit is not None:
        metadata_edit(metadata)
    save_file(tensors, str(path), metadata=metadata)


LAST = "model.layers.1.self_attn.v_proj"  # the last layer of the file (sorted)


@pytest.fixture
def adapter(tmp_path):
    model = apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=2))
    randomize_adapters(model)
    save_kasa_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_integer_tensor_in_the_last_layer_changes_nothing_and_a_retry_works(adapter, tmp_path):
    shutil.copytree(adapter, tmp_path / "good")
    _rewrite(adapter, lambda t: t.update({f"{LAST}.lora_A": t[f"{LAST}.lora_A"].to(torch.int32)}))
    assert sorted(read_adapter(tmp_path / "good")[1])[-1] == LAST
    model = build_tiny_llama(VOCAB, seed=0)
    before = _state(model)
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(adapter / ADAPTER_FILE))}: adapter tensor {re.escape(LAST)}\.lora_A has dtype "
        r"torch\.int32, expected one of \['torch\.float16', 'torch\.bfloat16', 'torch\.float32', 'torch\.float64'\]",
    ):
        load_kasa_adapter(model, adapter)
    _assert_unchanged(model, before)
    load_kasa_adapter(model, tmp_path / "good")  # the retry is accepted
    assert len(kasa_layers(model)) == 14


@pytest.mark.parametrize(
    "key", ["lora_A", "lora_B", "lora_diag", "removed_left", "removed_right", "base_fingerprint"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensor_is_refused_naming_tensor_and_file(adapter, key, value):
    def poison(tensors):
        t = tensors[f"{LAST}.{key}"].clone()
        t.view(-1)[0] = value
        tensors[f"{LAST}.{key}"] = t

    _rewrite(adapter, poison)
    model = build_tiny_llama(VOCAB, seed=0)
    before = _state(model)
    files = _snapshot(adapter)
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(adapter / ADAPTER_FILE))}: non-finite \(NaN/Inf\) values in "
        rf"\['{re.escape(LAST)}\.{key}'\]; the adapter is damaged",
    ):
        load_kasa_adapter(model, adapter)
    _assert_unchanged(model, before)
    assert _snapshot(adapter) == files


def test_saving_a_non_finite_adapter_writes_nothing(tmp_path):
    model = apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=2))
    with torch.no_grad():
        kasa_layers(model)[LAST].lora_diag[0] = float("nan")
    with pytest.raises(
        FloatingPointError,
        match=rf"not saving the adapter to .*: non-finite \(NaN/Inf\) values in \['{re.escape(LAST)}\.lora_diag'\]",
    ):
        save_kasa_adapter(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    save_kasa_adapter(apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=2)), tmp_path / "old")
    files = _snapshot(tmp_path / "old")
    with pytest.raises(FloatingPointError):
        save_kasa_adapter(model, tmp_path / "old")
    assert _snapshot(tmp_path / "old") == files


def test_meta_device_model_gets_a_clear_message(adapter):
    with torch.device("meta"):
        model = build_tiny_llama(VOCAB, seed=0)
    with pytest.raises(
        ValueError, match=r"the weight of model\.layers\.0\.mlp\.down_proj is on the meta device"
    ):
        load_kasa_adapter(model, adapter)
    assert not kasa_layers(model)


def test_verify_adapter_base_checks_without_changing_the_model(adapter):
    model = build_tiny_llama(VOCAB, seed=0)
    before = _state(model)
    assert verify_adapter_base(model, adapter) is None
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        verify_adapter_base(build_tiny_llama(VOCAB, seed=1), adapter)
    with pytest.raises(TypeError, match="is_trainable must be True or False, got 'yes'"):
        load_kasa_adapter(model, adapter, is_trainable="yes")


def test_one_module_listed_under_two_names_is_refused(adapter):
    model = build_tiny_llama(VOCAB, seed=0)
    model.model.layers[0].mlp.alias = model.model.layers[0].mlp.down_proj  # the same module, a second name
    source = "model.layers.0.mlp.down_proj"

    def duplicate(tensors):
        for key in TENSOR_KEYS:
            tensors[f"model.layers.0.mlp.alias.{key}"] = tensors[f"{source}.{key}"].clone()

    def list_it(metadata):
        metadata["layers"] = json.dumps(sorted([*json.loads(metadata["layers"]), "model.layers.0.mlp.alias"]))

    _rewrite(adapter, duplicate, list_it)
    before = _state(model)
    with pytest.raises(
        ValueError,
        match=r"lists \['model\.layers\.0\.mlp\.alias', '" + re.escape(source) + r"'\], "
        r"which are one module of LlamaForCausalLM under several names",
    ):
        load_kasa_adapter(model, adapter)
    _assert_unchanged(model, before)


# --- kasa_config.json: the adapter file is the single source of truth ----------------------------------------------


def test_edited_config_copy_is_refused_naming_the_fields(adapter):
    path = adapter / CONFIG_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "lora_alpha": 32, "use_rslora": 1}))
    model = build_tiny_llama(VOCAB, seed=0)
    with pytest.raises(
        ValueError,
        match=r"kasa_config\.json disagrees with .*kasa_adapter\.safetensors on \['lora_alpha', 'use_rslora'\] "
        r"\(lora_alpha: 32 in kasa_config\.json, 16 in kasa_adapter\.safetensors; use_rslora: 1 in kasa_config\.json, "
        r"false in kasa_adapter\.safetensors\); the config in kasa_adapter\.safetensors is the one that loads, so an "
        r"edit of kasa_config\.json would be ignored: delete kasa_config\.json or re-save the adapter",
    ):
        load_kasa_adapter(model, adapter)
    assert not kasa_layers(model)
    path.write_text("{broken")
    with pytest.raises(ValueError, match=r"kasa_config\.json is unreadable .*delete kasa_config\.json"):
        read_adapter(adapter)
    path.write_text(json.dumps({**data, "lora_alpha": 16.0}))  # the same value, written differently
    read_adapter(adapter)
    path.unlink()  # a missing copy is fine
    load_kasa_adapter(model, adapter)


# --- the base model's name -------------------------------------------------------------------------------------


def test_base_model_name_is_recorded(tmp_path):
    build_tiny_llama(VOCAB, seed=0).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    save_kasa_adapter(apply_kasa(base, KaSAConfig(r=2)), tmp_path / "a")
    info = read_adapter_info(tmp_path / "a")
    assert info.base_model_name_or_path == str(tmp_path / "base")
    assert (
        info.config.r == 2
        and info.config.base_mode == "in_place"
        and len(info.layers) == 14
        and info.path == tmp_path / "a" / ADAPTER_FILE
    )
    assert BASE_MODEL_KEY not in json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    model = apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=2))  # built in code: no name
    save_kasa_adapter(model, tmp_path / "b")
    assert read_adapter_info(tmp_path / "b").base_model_name_or_path is None
    save_kasa_adapter(model, tmp_path / "c", base_model_name_or_path="org/tiny")
    assert read_adapter_info(tmp_path / "c").base_model_name_or_path == "org/tiny"
    # write_adapter keeps its positional signature (the trainer's call).
    write_adapter(tmp_path / "d", adapter_state_dict(model), model.kasa_config)
    assert read_adapter_info(tmp_path / "d").base_model_name_or_path is None


def test_file_without_the_newer_fields_still_loads(tmp_path):
    """An adapter written before base_model_name_or_path existed: only the three original metadata keys."""
    model = apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=2))
    tensors = adapter_state_dict(model)
    metadata = {
        "format": "kasa_trl.adapter.v1",
        "kasa_config": json.dumps(model.kasa_config.to_dict(), sort_keys=True),
        "layers": json.dumps(sorted(kasa_layers(model))),
    }
    tmp_path.joinpath("old").mkdir()
    save_file(tensors, str(tmp_path / "old" / ADAPTER_FILE), metadata=metadata)
    assert read_adapter_info(tmp_path / "old").base_model_name_or_path is None
    load_kasa_adapter(build_tiny_llama(VOCAB, seed=0), tmp_path / "old")


# --- files: modes, temporaries ---------------------------------------------------------------------------------


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_kasa_adapter(apply_kasa(build_tiny_llama(VOCAB), KaSAConfig(r=2)), tmp_path)
    finally:
        os.umask(old)
    assert {stat.S_IMODE((tmp_path / name).stat().st_mode) for name in (ADAPTER_FILE, CONFIG_FILE)} == {0o644}


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_are_removed_only_when_provably_stale(tmp_path):
    model = apply_kasa(build_tiny_llama(VOCAB), KaSAConfig(r=2))
    save_kasa_adapter(model, tmp_path)
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64]
    stale = tmp_path / f".{ADAPTER_FILE}.{host}-{_dead_pid()}.abc123.tmp"
    running = tmp_path / f".{CONFIG_FILE}.{host}-{os.getppid()}.def456.tmp"  # a live process
    elsewhere = tmp_path / f".{ADAPTER_FILE}.otherhost-1.ghi789.tmp"
    old_style = tmp_path / f".{ADAPTER_FILE}.x1y2z3.tmp"  # named by an older kasa_trl
    unrelated = tmp_path / "notes.tmp"
    for path in (stale, running, elsewhere, old_style, unrelated):
        path.write_bytes(b"partial")
    with pytest.warns(
        UserWarning, match=r"holds temporary files \[.*\] of a write that may still be running"
    ):
        save_kasa_adapter(model, tmp_path)
    assert not stale.exists()
    assert all(p.exists() for p in (running, elsewhere, old_style, unrelated))
    load_kasa_adapter(build_tiny_llama(VOCAB), tmp_path)  # ignored when loading


def test_more_mistakes_get_a_message_naming_the_fix(adapter, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"is a file: pass the directory that holds kasa_adapter\.safetensors"
    ):
        load_kasa_adapter(build_tiny_llama(VOCAB, seed=0), adapter / ADAPTER_FILE)
    tensors = {f"a..b.{k}": t for k, t in read_adapter(adapter)[1][LAST].items()}
    _rewrite(adapter, lambda t: None, lambda m: m.update({"format": "kasa_trl.adapter.v2"}))
    with pytest.raises(
        ValueError, match=r"written by another version of kasa_trl: upgrade kasa_trl to read it"
    ):
        read_adapter_info(adapter)
    with pytest.raises(TypeError, match=r"tensors must map names to torch\.Tensor"):
        write_adapter(tmp_path / "x", {"proj.lora_A": [1.0]}, KaSAConfig(r=2))
    with pytest.raises(
        ValueError, match=r"not saving the adapter to .*: the layer list holds \['a\.\.b'\], not module"
    ):
        write_adapter(tmp_path / "x", tensors, KaSAConfig(r=2))
    assert not (tmp_path / "x").exists()


def test_non_finite_base_weight_is_named(tmp_path):
    save_kasa_adapter(apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=2)), tmp_path)
    base = build_tiny_llama(VOCAB, seed=0)
    with torch.no_grad():
        base.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    before = _state(base)
    with pytest.raises(
        ValueError, match=r"the weight of model\.layers\.1\.mlp\.up_proj differs .*its weights hold NaN/Inf"
    ):
        load_kasa_adapter(base, tmp_path)
    _assert_unchanged(base, before)


@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
def test_interrupt_while_building_the_layers_puts_the_weights_back(tmp_path, monkeypatch, base_mode):
    save_kasa_adapter(
        apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=2, base_mode=base_mode)), tmp_path
    )
    real, built = adapter_io.KaSALinear, []

    def interrupted(*args, **kwargs):
        if len(built) == 5:
            raise KeyboardInterrupt("Ctrl-C at the 6th layer")
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(adapter_io, "KaSALinear", interrupted)
    model = build_tiny_llama(VOCAB, seed=0)
    before = _state(model)
    with pytest.raises(KeyboardInterrupt):
        load_kasa_adapter(model, tmp_path)
    assert not kasa_layers(model)
    after = model.state_dict()
    for key, value in before.items():  # in place: W_trunc + R, within one float32 rounding
        assert torch.allclose(after[key], value, rtol=0, atol=1e-6 if base_mode == "in_place" else 0), key
