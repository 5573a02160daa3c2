"""Parity with PEFT's KaSA variant (peft >= 0.21): same truncation, same outputs with the same factors."""

import pytest
import torch

peft = pytest.importorskip("peft")
if not hasattr(peft, "KasaConfig"):
    pytest.skip("needs peft >= 0.21 (KasaConfig)", allow_module_level=True)

from kasa_trl import KaSAConfig, apply_kasa, kasa_layers  # noqa: E402
from kasa_trl.tiny import build_tiny_llama  # noqa: E402

from .conftest import VOCAB  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("method", ["svd", "auto"])
def test_same_truncation_and_outputs_as_peft(method, input_ids):
    ours = apply_kasa(
        build_tiny_llama(VOCAB, seed=0).eval(),
        KaSAConfig(r=4, lora_alpha=8, target_modules=TARGETS, decomposition_method=method),
    )
    theirs = peft.get_peft_model(
        build_tiny_llama(VOCAB, seed=0).eval(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, kasa_config=peft.KasaConfig()),
    ).eval()
    layers = kasa_layers(ours)
    peft_layers = {
        name.removeprefix("base_model.model."): m
        for name, m in theirs.named_modules()
        if hasattr(m, "lora_diag") and "default" in getattr(m, "lora_diag", {})
    }
    assert sorted(layers) == sorted(peft_layers)
    for name, layer in layers.items():
        peft_layer = peft_layers[name]
        torch.testing.assert_close(
            layer.base_layer.weight, peft_layer.get_base_layer().weight, rtol=1e-5, atol=2e-6, msg=name
        )
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.normal_()
            peft_layer.lora_B["default"].weight.normal_()
            peft_layer.lora_diag["default"].normal_()
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
            layer.lora_diag.copy_(peft_layer.lora_diag["default"])
        assert layer.scaling == peft_layer.scaling["default"]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, rtol=1e-4, atol=1e-4)
