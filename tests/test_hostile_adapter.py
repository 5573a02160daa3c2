"""Adapter bugs found by the h12 hostile review (B3, B4, B12): loading onto a 16-bit base, huge weights, an
existing file as the save directory."""

import re

import pytest
import torch

from kasa_trl import KaSAConfig, apply_kasa, kasa_layers, load_kasa_adapter, save_kasa_adapter
from kasa_trl.model import get_kasa_config
from kasa_trl.tiny import build_tiny_llama

from .conftest import VOCAB, randomize_adapters


def _saved_adapter(tmp_path, base_mode="auto"):
    model = build_tiny_llama(VOCAB, seed=0)
    apply_kasa(model, KaSAConfig(r=4, target_modules=["q_proj", "v_proj"], base_mode=base_mode))
    randomize_adapters(model)
    save_kasa_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_in_place_adapter_loads_non_destructively_onto_a_16_bit_base(tmp_path, dtype, input_ids):
    adapter = _saved_adapter(tmp_path)  # fp32 base: recorded in_place
    base = build_tiny_llama(VOCAB, seed=0).to(dtype)
    before = {name: p.clone() for name, p in base.named_parameters()}
    load_kasa_adapter(base, adapter)
    assert get_kasa_config(base).base_mode == "non_destructive"
    layers = kasa_layers(base)
    assert {layer.base_mode for layer in layers.values()} == {"non_destructive"}
    for name, layer in layers.items():  # the 16-bit base weight is untouched
        assert torch.equal(layer.base_layer.weight, before[f"{name}.weight"])
    # The same model apply_kasa builds there with "auto" (non_destructive), adapter copied in.
    reference = build_tiny_llama(VOCAB, seed=0).to(dtype)
    load_kasa_adapter(reference, adapter)
    assert torch.equal(base(input_ids).logits, reference(input_ids).logits)


def test_in_place_adapter_stays_in_place_on_an_fp32_base_and_non_destructive_is_kept(tmp_path):
    adapter = _saved_adapter(tmp_path)
    base = build_tiny_llama(VOCAB, seed=0)
    load_kasa_adapter(base, adapter)
    assert get_kasa_config(base).base_mode == "in_place"
    adapter_nd = _saved_adapter(tmp_path / "nd", base_mode="non_destructive")
    base = build_tiny_llama(VOCAB, seed=0)
    load_kasa_adapter(base, adapter_nd)
    assert get_kasa_config(base).base_mode == "non_destructive"


@pytest.mark.parametrize(
    ("dtype", "scale"), [(torch.float32, 2.0**60), (torch.float32, 2.0**122), (torch.float64, 2.0**515)]
)
def test_fingerprint_of_huge_finite_weights_is_finite_and_scales_exactly(dtype, scale):
    from kasa_trl.fingerprint import base_deviation, weight_fingerprint

    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0), dtype=dtype)
    base = weight_fingerprint(w)
    huge = weight_fingerprint(w * scale)
    assert torch.isfinite(huge).all()
    assert torch.equal(huge, base * scale)  # 1e18, 5e36, 1e155: the scaling is exact
    removed_left, removed_right = torch.zeros(64, 0, dtype=dtype), torch.zeros(0, 48, dtype=dtype)
    assert base_deviation(w * scale, huge, removed_left, removed_right).matches


def test_huge_fp32_weight_applies_and_saves_and_loads(tmp_path):
    model = build_tiny_llama(VOCAB, seed=0)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(1e20)
    fresh = [p.clone() for p in model.parameters()]
    apply_kasa(model, KaSAConfig(r=4, target_modules=["q_proj"]))
    save_kasa_adapter(model, tmp_path / "adapter")  # refused before: "the adapter factors have diverged"
    base = build_tiny_llama(VOCAB, seed=0)
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight.mul_(1e20)
        assert all(torch.equal(p, q) for p, q in zip(base.parameters(), fresh, strict=True))
    load_kasa_adapter(base, tmp_path / "adapter")


def test_weight_whose_norm_does_not_fit_float64_is_refused_at_apply_naming_the_layer():
    model = build_tiny_llama(VOCAB, seed=0).double()
    with torch.no_grad():
        weight = model.model.layers[1].self_attn.v_proj.weight
        weight.copy_(
            torch.randn(weight.shape, generator=torch.Generator().manual_seed(0), dtype=weight.dtype) * 1e307
        )
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(
        ValueError,
        match=r"^model\.layers\.1\.self_attn\.v_proj: the fingerprint of this 32x64 weight does not fit float64 "
        r"\(its Frobenius norm exceeds 1\.8e\+308\), so its adapter could not be saved; scale the weight down",
    ):
        apply_kasa(model, KaSAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not kasa_layers(model)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("inside", [False, True])
def test_saving_to_an_existing_file_names_the_path_and_the_fix(tmp_path, inside):
    model = build_tiny_llama(VOCAB, seed=0)
    apply_kasa(model, KaSAConfig(r=4, target_modules=["q_proj"]))
    blocking = tmp_path / "notes.txt"
    blocking.write_text("mine")
    target = blocking / "adapter" if inside else blocking
    with pytest.raises(
        NotADirectoryError,
        match=rf"^not saving the adapter to {re.escape(str(target))}: {re.escape(str(blocking))} is a file, not a directory \(an adapter is a "
        r"directory of kasa_adapter\.safetensors and kasa_config\.json\); pass a directory path that does not "
        r"exist yet or is a directory$",
    ):
        save_kasa_adapter(model, target)
    assert blocking.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
