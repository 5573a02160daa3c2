import json

import pytest
import torch

from kasa_trl import KaSAConfig, apply_kasa, kasa_layers, load_kasa_adapter, save_kasa_adapter
from kasa_trl.adapter_io import ADAPTER_FILE, CONFIG_FILE
from kasa_trl.tiny import build_tiny_gpt2, build_tiny_llama

from .conftest import VOCAB, randomize_adapters


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
    # kasa_config.json is removed before the adapter file is replaced and written back after: a save killed in
    # between leaves no copy, never one that disagrees with the adapter file.
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_FILE]
    load_kasa_adapter(build_tiny_llama(VOCAB), tmp_path)


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
