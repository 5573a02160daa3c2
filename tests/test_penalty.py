"""The regularizer gradient enters exactly once, whatever the loss scaling, forwards and checkpointing."""

import pytest
import torch

from kasa_trl import KaSAConfig, apply_kasa, kasa_layers
from kasa_trl.penalty import attach_penalties
from kasa_trl.regularizers import get_regularizer
from kasa_trl.tiny import build_tiny_llama

from .conftest import VOCAB, randomize_adapters

WEIGHTS = {"singular_value_l2": 0.3, "orthogonality": 0.2, "orthogonality_official": 0.1}


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=4, regularizers=WEIGHTS))
    randomize_adapters(model, seed=1)
    return model.train()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _reference_penalty(model, reduction="sum"):
    layers = kasa_layers(model).values()
    total = sum(
        w * get_regularizer(n)(layer.lora_A, layer.lora_B, layer.lora_diag)
        for layer in layers
        for n, w in WEIGHTS.items()
    )
    return total / len(layers) if reduction == "mean" else total


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("loss_scale", [1.0, 0.25, 1024.0])
def test_injected_gradient_equals_loss_plus_penalty(input_ids, reduction, loss_scale):
    reference = _model()
    loss = reference(input_ids, labels=input_ids).loss + _reference_penalty(reference, reduction)
    (loss * loss_scale).backward()
    expected = _grads(reference)

    model = _model()
    session = attach_penalties(model, WEIGHTS, reduction)
    session.begin()
    out = session.finish(model(input_ids, labels=input_ids).loss)
    torch.testing.assert_close(out.detach(), loss.detach())
    (out * loss_scale).backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_micro_batch_factor_scales_only_the_penalty(input_ids):
    reference = _model()
    (reference(input_ids, labels=input_ids).loss + 0.5 * _reference_penalty(reference)).backward()
    model = _model()
    session = attach_penalties(model, WEIGHTS)
    session.begin(micro_batch_factor=0.5)
    session.finish(model(input_ids, labels=input_ids).loss).backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, _grads(reference)[name], rtol=1e-5, atol=1e-6)


def test_two_forwards_in_one_micro_batch_charge_once(input_ids):
    reference = _model()
    loss = sum(reference(ids, labels=ids).loss for ids in input_ids.split(1)) + _reference_penalty(reference)
    loss.backward()
    model = _model()
    session = attach_penalties(model, WEIGHTS)
    session.begin()
    session.finish(sum(model(ids, labels=ids).loss for ids in input_ids.split(1))).backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, _grads(reference)[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing(input_ids, use_reentrant):
    reference = _model()
    (reference(input_ids, labels=input_ids).loss + _reference_penalty(reference)).backward()
    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    session = attach_penalties(model, WEIGHTS)
    session.begin()
    session.finish(model(input_ids, labels=input_ids).loss).backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, _grads(reference)[name], rtol=1e-5, atol=1e-6, msg=name)


def test_values_and_no_grad_forward(input_ids):
    model = _model()
    session = attach_penalties(model, WEIGHTS)
    session.begin()
    with torch.no_grad():
        loss = session.finish(model(input_ids, labels=input_ids).loss)
    assert not loss.requires_grad
    values = session.values()
    layers = kasa_layers(model).values()
    for name in WEIGHTS:
        expected = sum(float(get_regularizer(name)(la.lora_A, la.lora_B, la.lora_diag)) for la in layers)
        assert float(values[name]) == pytest.approx(expected, rel=1e-6)
    assert float(session.total()) == pytest.approx(float(_reference_penalty(model)), rel=1e-6)


def test_backward_without_finish_is_a_clear_error(input_ids):
    model = _model()
    session = attach_penalties(model, WEIGHTS)
    session.begin()
    with pytest.raises(RuntimeError, match="return PenaltySession.finish"):
        model(input_ids, labels=input_ids).loss.backward()


def test_non_finite_regularizer_stops_with_a_clear_message(input_ids):
    model = _model()
    layer = next(iter(kasa_layers(model).values()))
    with torch.no_grad():
        layer.lora_diag[0] = float("inf")
    session = attach_penalties(model, WEIGHTS)
    session.begin()
    loss = model(input_ids, labels=input_ids).loss
    with pytest.raises(FloatingPointError, match=r"singular_value_l2=inf.*lower the learning rate"):
        session.finish(loss)


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (
            lambda a, b, d: float(d.detach().pow(2).sum()),
            r"returned \d+\.\d+ \(float\); it must return a scalar",
        ),
        (lambda a, b, d: d.pow(2), r"returned a tensor of shape \(4,\); it must return a scalar"),
        (lambda a, b, d: (d > 0).sum(), r"returned a torch\.int64 tensor"),
        (
            lambda a, b, d: torch.zeros(()),
            r"returned a tensor that is not connected to lora_A, lora_B, lora_diag",
        ),
    ],
    ids=["python-float", "vector", "int-tensor", "constant"],
)
def test_bad_user_regularizer_is_named_in_the_forward(input_ids, result, message):
    """The error comes from the first training forward, naming the regularizer and the layer, not from autograd;
    parameters untouched."""
    from kasa_trl import register_regularizer, unregister_regularizer

    register_regularizer("test_penalty_bad")(result)
    try:
        model = _model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        session = attach_penalties(model, {"test_penalty_bad": 1.0})
        session.begin()
        with pytest.raises(
            TypeError,
            match=rf"regularizer 'test_penalty_bad' \(.*\) on model\.layers\.0\.self_attn\.q_proj {message}",
        ):
            model(input_ids, labels=input_ids)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())
        # In evaluation (no grad) a value cut from the graph is fine: nothing is trained.
        if "connected" in message:
            with torch.no_grad():
                model(input_ids)
            assert float(session.values()["test_penalty_bad"]) == 0.0
    finally:
        unregister_regularizer("test_penalty_bad")
