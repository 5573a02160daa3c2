"""Adapter bugs found by the h12 hostile review (B3, B4, B12): loading onto a 16-bit base, huge weights, an
existing file as the save directory."""

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
