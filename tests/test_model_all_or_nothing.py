"""apply_kasa, merge_and_unload and unload finish or leave the model as it was (issue 13, class 4), and the round
trips users try (issue 13 class 6: save_pretrained; issue 16 item 2: unload after merge_and_unload).

A failure at the LAST layer is the test: everything is validated before the first change, so the model is bit for
bit what it was (state dict, no KaSA layer, no config, save_pretrained working), and a retry succeeds.
"""

import copy
import io
import math

import pytest
import torch
from torch import nn

import kasa_trl.model
from kasa_trl import KaSAConfig, KaSALinear, apply_kasa, kasa_layers, merge_and_unload, unload
from kasa_trl.model import SAVE_PRETRAINED_REFUSAL, kasa_adapters_disabled
from kasa_trl.target_decomposition import decompose_targets
from kasa_trl.targets import find_targets
from kasa_trl.tiny import build_tiny_gpt2, build_tiny_llama

from .conftest import VOCAB, randomize_adapters

LAST = "model.layers.1.mlp.down_proj"  # the tiny Llama's last target


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key in before:  # bit for bit, NaN included
        assert torch.equal(after[key].view(torch.uint8), before[key].view(torch.uint8)), key


def _assert_plain(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """The model as it was before apply_kasa: same tensors, no KaSA layer, config or save refusal, all trainable."""
    _assert_state(model, before)
    assert not kasa_layers(model) and not hasattr(model, "kasa_config")
    assert all(p.requires_grad for p in model.parameters())
    assert "save_pretrained" not in vars(model)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _bad_last(factor_fault):
    """A decomposer giving the right factors everywhere but the last target, whose factors ``factor_fault``
    spoils."""

    def decomposer(targets, n_removed, config):
        factors = decompose_targets(targets, n_removed, config)
        left, right = factors[LAST]
        factors[LAST] = factor_fault(left, right)
        return factors

    return decomposer


def _nan(left, right):
    left = left.clone()
    left[0, 0] = math.nan
    return left, right


def _inf_right(left, right):
    right = right.clone()
    right[-1, -1] = math.inf
    return left, right


LAST_LAYER_FAULTS = {
    "nan-factor": (_nan, ValueError, rf"{LAST}: removed_left holds non-finite values \(NaN/Inf\)"),
    "inf-factor": (_inf_right, ValueError, rf"{LAST}: removed_right holds non-finite values"),
    "integer-factor": (
        lambda left, right: (left.to(torch.int64), right),
        TypeError,
        rf"{LAST}: removed_left has dtype torch\.int64; the removed factors must be floating point",
    ),
    "wrong-shape": (
        lambda left, right: (left[:-1], right),
        ValueError,
        rf"{LAST}: removed factors \(63, 2\) @ \(2, 128\) do not fit a \(64, 128\) weight",
    ),
    "too-many-components": (
        lambda left, right: (torch.randn(64, 65), torch.randn(65, 128)),
        ValueError,
        r"do not fit a \(64, 128\) weight \(expected \(out, n\) @ \(n, in\) with n <= min\(out, in\)\)",
    ),
    "missing": (None, ValueError, rf"the decomposer returned no removed factors for {LAST}"),
}


@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
@pytest.mark.parametrize("fault", list(LAST_LAYER_FAULTS))
def test_apply_failing_at_the_last_layer_changes_nothing_and_a_retry_works(fault, base_mode, input_ids):
    spoil, error, message = LAST_LAYER_FAULTS[fault]
    model = build_tiny_llama(VOCAB).eval()
    before = _state(model)
    if spoil is None:

        def decomposer(targets, n_removed, config):
            factors = decompose_targets(targets, n_removed, config)
            del factors[LAST]
            return factors

    else:
        decomposer = _bad_last(spoil)
    with pytest.raises(error, match=message):
        apply_kasa(model, KaSAConfig(r=2, base_mode=base_mode), decomposer=decomposer)
    _assert_plain(model, before)
    apply_kasa(model, KaSAConfig(r=2, base_mode=base_mode))
    fresh = apply_kasa(build_tiny_llama(VOCAB).eval(), KaSAConfig(r=2, base_mode=base_mode))
    assert len(kasa_layers(model)) == 14
    assert torch.equal(_logits(model, input_ids), _logits(fresh, input_ids))


def test_last_layer_on_the_meta_device_is_named_before_anything_changes():
    model = build_tiny_llama(VOCAB)
    model.model.layers[1].mlp.down_proj.to("meta")
    before = {k: v.clone() for k, v in model.state_dict().items() if v.device.type != "meta"}
    with pytest.raises(
        ValueError,
        match=rf"{LAST} \(Linear\) has its weight on the meta device \(shapes only, no values: built under "
        r"init_empty_weights or loaded with device_map='meta'\); KaSA needs the real weights\. Load the model",
    ):
        apply_kasa(model, KaSAConfig(r=2))
    assert not kasa_layers(model)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_model_built_on_meta_gets_a_clear_message():
    with torch.device("meta"):
        model = build_tiny_llama(VOCAB)
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.self_attn\.q_proj \(Linear\) has its weight on the meta"
    ):
        apply_kasa(model, KaSAConfig(r=2))
    assert not kasa_layers(model)


class _FailsOnLast(KaSALinear):
    """Raises like an out-of-memory or a Ctrl-C would, while building the last layer (after the others truncated
    their weights)."""

    def __init__(self, base_layer, *args, **kwargs):
        if base_layer is _FailsOnLast.last:
            raise KeyboardInterrupt
        super().__init__(base_layer, *args, **kwargs)


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_gpt2])
@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
def test_interrupt_while_building_the_last_layer_undoes_the_truncations(builder, base_mode, monkeypatch):
    """Non-destructive: bit for bit. In place: W_trunc + R, which differs from W by the rounding of W_trunc (half an
    fp32 ulp of max(|W|, |W_trunc|); measured: 1-15% of the elements of the tiny models' weights)."""
    model = builder(VOCAB).eval()
    before = _state(model)
    targets = find_targets(model, KaSAConfig(r=2))
    _FailsOnLast.last = list(targets.values())[-1]
    monkeypatch.setattr(kasa_trl.model, "KaSALinear", _FailsOnLast)
    with pytest.raises(KeyboardInterrupt):
        apply_kasa(model, KaSAConfig(r=2, base_mode=base_mode))
    monkeypatch.undo()
    assert not kasa_layers(model) and not hasattr(model, "kasa_config")
    after = model.state_dict()
    for key, value in before.items():
        if base_mode == "non_destructive":
            assert torch.equal(after[key], value), key
        else:  # one rounding at the weight's scale
            atol = torch.finfo(value.dtype).eps * float(value.abs().max())
            torch.testing.assert_close(after[key], value, rtol=0, atol=atol, msg=key)
    apply_kasa(model, KaSAConfig(r=2, base_mode=base_mode))  # a retry works
    assert len(kasa_layers(model)) == len(targets)


# --- merge_and_unload and unload ---------------------------------------------------------------------------------


def _adapted(base_mode="in_place", dtype=torch.float32):
    model = build_tiny_llama(VOCAB).to(dtype).eval()
    apply_kasa(model, KaSAConfig(r=2, base_mode=base_mode))
    randomize_adapters(model)
    return model


def _kasa_state(model):
    """Base weights and adapters as they are now, and the merged flags: what a refused call must leave."""
    return _state(model), {name: layer.merged for name, layer in kasa_layers(model).items()}


def _assert_kasa_state(model, saved):
    state, merged = saved
    _assert_state(model, state)
    assert {name: layer.merged for name, layer in kasa_layers(model).items()} == merged


@pytest.mark.parametrize("operation", [merge_and_unload, unload])
@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
def test_non_finite_adapter_in_the_last_layer_is_refused_before_any_write(operation, base_mode):
    model = _adapted(base_mode)
    layers = kasa_layers(model)
    if operation is unload:
        layers[LAST].merge()  # unload reads dW only for merged layers
    with torch.no_grad():
        layers[LAST].lora_B[0, 0] = math.nan
    saved = _kasa_state(model)
    with pytest.raises(
        ValueError,
        match=rf"{LAST}: lora_B hold non-finite values \(NaN/Inf\); (merge|restore_base) would write them into "
        r"the base weight\. Nothing was changed",
    ):
        operation(model)
    _assert_kasa_state(model, saved)
    assert len(kasa_layers(model)) == 14 and "save_pretrained" in vars(model)


def test_merge_that_would_overflow_fp16_is_refused_naming_the_layer():
    model = _adapted("non_destructive", torch.float16)
    with torch.no_grad():
        kasa_layers(model)[LAST].lora_B.fill_(1e6)
    saved = _kasa_state(model)
    with pytest.raises(ValueError, match=rf"{LAST}: merge would overflow the base dtype torch\.float16"):
        merge_and_unload(model)
    _assert_kasa_state(model, saved)


def test_partitioned_last_layer_is_refused_before_merging_any_other(monkeypatch):
    """A ZeRO-3 partitioned weight (a placeholder with a ds_id) cannot be merged here: refused, nothing merged."""
    model = _adapted()
    saved = _kasa_state(model)
    param = kasa_layers(model)[LAST].base_layer.weight
    data = param.data
    param.data = torch.empty(0)
    param.ds_id = 7
    try:
        for operation in (merge_and_unload, unload):
            with pytest.raises(
                ValueError, match=rf"{LAST}: the base weight is partitioned by DeepSpeed ZeRO-3"
            ):
                operation(model)
    finally:
        del param.ds_id
        param.data = data
    _assert_kasa_state(model, saved)


@pytest.mark.parametrize("operation", ["merge", "restore_base"])
def test_interrupt_at_the_last_layer_of_merge_or_unload_undoes_the_others(operation, input_ids, monkeypatch):
    model = _adapted()
    adapted = _logits(model, input_ids)
    last = kasa_layers(model)[LAST]
    monkeypatch.setattr(last, operation, lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        (merge_and_unload if operation == "merge" else unload)(model)
    monkeypatch.undo()
    layers = kasa_layers(model)
    assert len(layers) == 14 and not any(layer.merged for layer in layers.values())
    assert {layer.base_mode for layer in layers.values()} == {"in_place"}
    torch.testing.assert_close(_logits(model, input_ids), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first", [merge_and_unload, unload])
@pytest.mark.parametrize("then", [merge_and_unload, unload])
def test_taking_out_kasa_twice_is_refused_with_what_happened(first, then, input_ids):
    """Issue 16: merged = merge_and_unload(model); unload(model) silently did nothing (merged is model)."""
    model = _adapted()
    result = first(model)
    assert result is model
    logits = _logits(model, input_ids)
    with pytest.raises(
        ValueError,
        match=rf"{then.__name__}: LlamaForCausalLM carries no KaSA layers, so there is nothing to take out \(it was "
        r"never adapted, or already merged or unloaded\)\. merge_and_unload and unload work in place and return the "
        r"model itself: after merge_and_unload\(model\) the original weights are gone\. To get the original base "
        r"back, call kasa_trl\.unload\(model\) instead of merging",
    ):
        then(model)
    assert torch.equal(_logits(model, input_ids), logits)


@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_gpt2])
def test_unload_of_merged_layers_restores_the_original(base_mode, builder, input_ids):
    """layer.merge() on every layer, then unload: the original weights within one fp32 rounding (a merged
    non-destructive layer used to come back as W - R)."""
    model = builder(VOCAB).eval()
    original = _state(model)
    base_logits = _logits(model, input_ids)
    apply_kasa(model, KaSAConfig(r=4, base_mode=base_mode))
    randomize_adapters(model)
    for layer in kasa_layers(model).values():
        layer.merge()
    unload(model)
    assert not kasa_layers(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(_logits(model, input_ids), base_logits, rtol=1e-5, atol=1e-5)


def test_disabling_adapters_with_a_merged_layer_is_refused_before_any_is_disabled():
    model = _adapted()
    kasa_layers(model)[LAST].merge()
    with (
        pytest.raises(
            RuntimeError, match=rf"cannot disable a merged KaSA adapter \({LAST}\); unmerge it first"
        ),
        kasa_adapters_disabled(model),
    ):
        pass
    assert all(layer.adapter_enabled for layer in kasa_layers(model).values())


# --- save_pretrained ---------------------------------------------------------------------------------------------


def test_save_pretrained_of_a_kasa_model_is_refused_and_writes_nothing(tmp_path):
    model = _adapted()
    for module in (model, model.model, copy.deepcopy(model)):
        with pytest.raises(
            RuntimeError, match=r"save_pretrained\(\) is refused on a model carrying KaSA layers"
        ):
            module.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    buffer = io.BytesIO()
    torch.save(model, buffer)  # pickling keeps the refusal
    buffer.seek(0)
    with pytest.raises(RuntimeError, match=r"kasa_trl\.save_kasa_adapter\(model, dir\)"):
        torch.load(buffer, weights_only=False).save_pretrained(tmp_path / "out")
    assert "kasa_trl.merge_and_unload(model).save_pretrained(dir)" in SAVE_PRETRAINED_REFUSAL


@pytest.mark.parametrize("operation", [merge_and_unload, unload])
def test_taking_kasa_out_lifts_the_save_refusal(operation, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    model = _adapted()
    expected = _logits(operation(model), input_ids)
    assert not any("save_pretrained" in vars(m) for m in model.modules())
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, input_ids), expected, rtol=0, atol=0)


def test_plain_transformers_trainer_cannot_save_a_kasa_model(tmp_path):
    """A user training with transformers' Trainer instead of KaSATrainer gets the refusal at the first save."""
    from transformers import Trainer, TrainingArguments

    trainer = Trainer(
        model=_adapted(), args=TrainingArguments(tmp_path / "run", use_cpu=True, report_to="none")
    )
    with pytest.raises(RuntimeError, match=r"a Trainer should be kasa_trl\.KaSATrainer"):
        trainer.save_model()
    assert not list((tmp_path / "run").glob("*.safetensors"))
