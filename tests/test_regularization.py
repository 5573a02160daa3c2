"""kasa_regularization / attach_kasa_regularization: the KaSA regularizers in a training loop of one's own."""

import pytest
import torch
from trl import SFTConfig

from kasa_trl import (
    KaSAConfig,
    apply_kasa,
    attach_kasa_regularization,
    detach_kasa_regularization,
    kasa_layers,
    kasa_regularization,
)
from kasa_trl.regularizers import get_regularizer
from kasa_trl.tiny import build_tiny_llama, build_tokenizer, load_tiny_dataset
from kasa_trl.trainer import KaSATrainer

from .conftest import VOCAB, randomize_adapters

WEIGHTS = {"singular_value_l2": 0.3, "orthogonality": 0.2, "orthogonality_official": 0.1}


def _model(reduction="sum"):
    config = KaSAConfig(r=4, regularizers=WEIGHTS, regularizer_reduction=reduction)
    model = apply_kasa(build_tiny_llama(VOCAB, seed=0), config)
    randomize_adapters(model, seed=1)
    return model.train()


def _by_hand(model, weights=WEIGHTS, reduction="sum"):
    layers = kasa_layers(model).values()
    total = sum(
        w * get_regularizer(n)(layer.lora_A, layer.lora_B, layer.lora_diag)
        for layer in layers
        for n, w in weights.items()
    )
    return total / len(layers) if reduction == "mean" else total


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_value_and_gradient_are_the_weighted_reduced_sum(reduction):
    model = _model(reduction)
    value = kasa_regularization(model)
    assert value.shape == () and value.dtype == torch.float32
    value.backward()
    got = _grads(model)
    model.zero_grad()
    expected = _by_hand(model, reduction=reduction)
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_arguments_override_the_config():
    model = _model()
    only_l2 = {"singular_value_l2": 2.0}
    value = kasa_regularization(model, regularizers=only_l2, reduction="mean")
    assert float(value) == pytest.approx(float(_by_hand(model, only_l2, "mean")), rel=1e-6)
    with pytest.raises(ValueError, match="unknown regularizer 'nope'"):
        kasa_regularization(model, regularizers={"nope": 1.0})
    with pytest.raises(ValueError, match="reduction='max' is not one of"):
        kasa_regularization(model, reduction="max")
    with pytest.raises(ValueError, match="carries no KaSA adapter"):
        kasa_regularization(build_tiny_llama(VOCAB, seed=0))


def test_hooked_session_gives_the_same_step_as_the_direct_call(input_ids):
    direct, hooked = _model(), _model()
    loss = direct(input_ids=input_ids, labels=input_ids).loss + kasa_regularization(direct)
    loss.backward()
    session = attach_kasa_regularization(hooked)
    session.begin()
    hooked_loss = session.finish(hooked(input_ids=input_ids, labels=input_ids).loss)
    hooked_loss.backward()
    assert float(hooked_loss) == pytest.approx(float(loss), rel=1e-6)
    assert float(session.total()) == pytest.approx(float(kasa_regularization(direct)), rel=1e-6)
    expected = _grads(direct)
    for name, grad in _grads(hooked).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    detach_kasa_regularization(hooked)
    assert all(layer.penalty_hook is None for layer in kasa_layers(hooked).values())


def test_equals_what_the_trainer_logs(tmp_path):
    tokenizer = build_tokenizer()
    trainer = KaSATrainer(
        model=build_tiny_llama(len(tokenizer), seed=0),
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=4,
            learning_rate=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            max_length=32,
            disable_tqdm=True,
            bf16=False,
            activation_checkpointing=False,
        ),
        train_dataset=load_tiny_dataset("sft").select(range(4)),
        processing_class=tokenizer,
        kasa_config=KaSAConfig(r=4, regularizers=WEIGHTS),
    )
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "kasa/regularization" in entry)
    assert logged["kasa/regularization"] == pytest.approx(float(kasa_regularization(trainer.model)), rel=1e-5)


def test_refuses_adapters_partitioned_by_zero3(monkeypatch):
    import kasa_trl.regularization

    model = _model()
    q_proj = "model.layers.0.self_attn.q_proj"
    lora_a = kasa_layers(model)[q_proj].lora_A
    # What ZeRO-3 leaves outside forward: an empty placeholder of a partitioned parameter.
    monkeypatch.setattr(kasa_trl.regularization, "is_partitioned", lambda param: param is lora_a)
    with torch.no_grad():
        lora_a.data = lora_a.data.new_empty(0)
    with pytest.raises(
        ValueError, match=rf"{q_proj} are partitioned by DeepSpeed ZeRO-3.*attach_kasa_regularization"
    ):
        kasa_regularization(model)
