"""base_mode="auto" and the in_place rounding of 16-bit bases (issue 13, class 8).

The rule: apply_kasa resolves "auto" per model, "in_place" when every target weight is fp32/fp64 (and none is
shared with another module), "non_destructive" otherwise; model.kasa_config records the mode chosen. An explicit
"in_place" on a bf16/fp16 base warns with the measured ||W_trunc_stored - (W - R)||_F / ||R||_F (worst layer).
Measured (r=4 on the tiny Llama; r=8/16 on nn.Linear-initialized layers): bf16 0.011-0.19 (tiny), 0.72-0.97
(square 1024/2048), 0.03-0.05 (1024x2816); fp16 about 8x less; fp32 3e-7.
"""

import math
import re
import warnings

import pytest
import torch
from torch import nn

from kasa_trl import KaSAConfig, KaSALinear, apply_kasa, kasa_layers
from kasa_trl.decomposition import minor_components
from kasa_trl.model import truncation_rounding_error
from kasa_trl.tiny import build_tiny_gpt2, build_tiny_llama

from .conftest import VOCAB


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_gpt2])
@pytest.mark.parametrize(
    ("dtype", "resolved"),
    [
        (torch.float32, "in_place"),
        (torch.float64, "in_place"),
        (torch.bfloat16, "non_destructive"),
        (torch.float16, "non_destructive"),
    ],
)
def test_auto_resolves_per_model_and_the_model_records_the_resolved_mode(builder, dtype, resolved):
    model = builder(VOCAB).to(dtype)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    config = KaSAConfig(r=2, base_mode="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" never warns
        apply_kasa(model, config)
    assert config.base_mode == "auto"  # the caller's config is not changed
    assert model.kasa_config.base_mode == resolved
    assert model.kasa_config.r == 2 and {layer.base_mode for layer in kasa_layers(model).values()} == {
        resolved
    }
    untouched = [
        n for n, m in kasa_layers(model).items() if torch.equal(m.base_layer.weight, weights[f"{n}.weight"])
    ]
    assert len(untouched) == (len(kasa_layers(model)) if resolved == "non_destructive" else 0)


def test_auto_with_one_16_bit_target_is_non_destructive_for_the_model():
    model = build_tiny_llama(VOCAB)
    model.model.layers[1].mlp.down_proj.to(torch.bfloat16)
    apply_kasa(model, KaSAConfig(r=2, base_mode="auto"))
    assert model.kasa_config.base_mode == "non_destructive"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_explicit_in_place_on_a_16_bit_base_warns_with_the_measured_error(dtype):
    model = build_tiny_llama(VOCAB).to(dtype)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with pytest.warns(UserWarning) as record:
        apply_kasa(model, KaSAConfig(r=4, base_mode="in_place"))
    [warning] = [w for w in record if "base_mode='in_place'" in str(w.message)]
    message = str(warning.message)
    assert warning.filename == __file__  # points at the caller's apply_kasa line
    match = re.search(r"\|\|R\|\|_F is ([0-9.e-]+) at (\S+) \(worst of 14 16-bit layers\)", message)
    assert match, message
    assert "Use base_mode='non_destructive' (or 'auto', which picks it for bf16/fp16 bases)" in message
    # The figure is the stored truncation's error, recomputed here from the weights before and after.
    errors = {}
    for name, layer in kasa_layers(model).items():
        removed = layer.removed_left.double() @ layer.removed_right.double()
        exact = originals[name].double() - removed
        errors[name] = float((layer.base_layer.weight.double() - exact).norm() / removed.norm())
    worst = max(errors, key=errors.get)
    assert match.group(2) == worst
    assert float(match.group(1)) == pytest.approx(errors[worst], rel=0.06)  # printed with 2 digits
    assert errors[worst] > 0.01  # the rounding is a visible fraction of R


@pytest.mark.parametrize(
    ("dtype", "base_mode"), [(torch.float32, "in_place"), (torch.bfloat16, "non_destructive")]
)
def test_no_warning_where_the_base_holds_the_truncation_exactly_enough(dtype, base_mode):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_kasa(build_tiny_llama(VOCAB).to(dtype), KaSAConfig(r=2, base_mode=base_mode))


def test_truncation_rounding_error_closed_forms():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 48, generator=gen, dtype=torch.float64)
    left, right = minor_components(weight, 4, "svd")
    assert truncation_rounding_error(weight, left, right) == 0.0  # float64 stores W - R as computed
    assert truncation_rounding_error(weight, left[:, :0], right[:0]) == 0.0  # nothing removed
    fp32 = truncation_rounding_error(weight.float(), left, right)
    bf16 = truncation_rounding_error(weight.bfloat16(), left, right)
    assert 0 < fp32 < 1e-5 < bf16 and math.isfinite(bf16)


def test_the_layer_takes_only_concrete_modes():
    with pytest.raises(
        ValueError,
        match=r"base_mode='auto' is not one of \['in_place', 'non_destructive'\]; 'auto' is resolved by "
        r"kasa_trl\.apply_kasa, pass the mode it stands for",
    ):
        KaSALinear(nn.Linear(6, 6), torch.zeros(6, 1), torch.zeros(1, 6), r=1, lora_alpha=1, base_mode="auto")
