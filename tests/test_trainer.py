"""KaSATrainer: regularizers once per step, metrics, saving, resuming."""

import math

import pytest
import torch
from trl import SFTConfig

from kasa_trl import KaSAConfig, kasa_layers, load_kasa_adapter, register_regularizer, unregister_regularizer
from kasa_trl.regularizers import get_regularizer
from kasa_trl.tiny import build_tiny_llama, build_tokenizer, load_tiny_dataset
from kasa_trl.trainer import KaSATrainer

from .helpers import tiny_sft_config

STRONG = {"singular_value_l2": 0.5, "orthogonality": 0.5}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return load_tiny_dataset("sft").select(range(24))


def make_trainer(tmp_path, tokenizer, dataset, *, kasa=None, callbacks=None, **overrides):
    model = build_tiny_llama(len(tokenizer), seed=0)
    return KaSATrainer(
        model=model,
        args=tiny_sft_config(tmp_path, **{"max_steps": 3, **overrides}),
        train_dataset=dataset,
        processing_class=tokenizer,
        kasa_config=kasa or KaSAConfig(r=4, regularizers=STRONG),
        callbacks=callbacks,
    )


def adapter_state(trainer):
    return {
        f"{name}.{key}": p.detach().clone()
        for name, layer in kasa_layers(trainer.model).items()
        for key, p in layer.adapter_params().items()
    }


def assert_states_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    for key in a:
        torch.testing.assert_close(
            a[key], b[key], rtol=rtol, atol=atol, msg=f"{key} (worst abs diff {worst:.2e})"
        )


def test_trains_adapter_only_and_logs_regularizers(tmp_path, tokenizer, dataset):
    trainer = make_trainer(tmp_path, tokenizer, dataset)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    initial = adapter_state(trainer)
    layers = kasa_layers(trainer.model).values()
    by_hand = {
        name: sum(float(get_regularizer(name)(la.lora_A.detach(), la.lora_B, la.lora_diag)) for la in layers)
        for name in STRONG
    }
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    final = adapter_state(trainer)
    assert all(not torch.equal(final[k], initial[k]) for k in final if k.endswith(("lora_B", "lora_diag")))
    first = trainer.state.log_history[0]
    for name, value in by_hand.items():
        assert first[f"kasa/{name}"] == pytest.approx(value, rel=1e-5)
    expected_total = sum(STRONG[n] * v for n, v in by_hand.items())
    assert first["kasa/regularization"] == pytest.approx(expected_total, rel=1e-5)
    assert all("kasa/orthogonality" in entry for entry in trainer.state.log_history if "loss" in entry)


@pytest.mark.parametrize(
    "checkpointing",
    [None, {"use_reentrant": True}, {"use_reentrant": False}],
    ids=["no-checkpointing", "reentrant", "non-reentrant"],
)
def test_gradient_accumulation_invariance(tmp_path, tokenizer, dataset, checkpointing):
    """(batch 4, accumulation 1) == (batch 2, accumulation 2): the regularizer enters once per step."""
    extra = {"gradient_checkpointing": checkpointing is not None}
    if checkpointing is not None:
        extra["gradient_checkpointing_kwargs"] = checkpointing
    one = make_trainer(tmp_path / "a", tokenizer, dataset, **extra)
    one.train()
    two = make_trainer(
        tmp_path / "b",
        tokenizer,
        dataset,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **extra,
    )
    two.train()
    assert_states_close(adapter_state(one), adapter_state(two))
    # The regularizer is strong enough that counting it twice per step would show far above the tolerance.
    doubled = make_trainer(
        tmp_path / "c",
        tokenizer,
        dataset,
        kasa=KaSAConfig(r=4, regularizers={k: 2 * v for k, v in STRONG.items()}),
    )
    doubled.train()
    diff = max(
        float((adapter_state(one)[k] - adapter_state(doubled)[k]).abs().max()) for k in adapter_state(one)
    )
    assert diff > 1e-3


def test_checkpointing_matches_plain_run(tmp_path, tokenizer, dataset):
    plain = make_trainer(tmp_path / "a", tokenizer, dataset)
    plain.train()
    for reentrant in (True, False):
        ckpt = make_trainer(
            tmp_path / f"b{reentrant}",
            tokenizer,
            dataset,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        )
        ckpt.train()
        assert_states_close(adapter_state(plain), adapter_state(ckpt))


def test_user_regularizer_moves_parameters(tmp_path, tokenizer, dataset):
    @register_regularizer("test_diag_to_three")
    def diag_to_three(lora_A, lora_B, lora_diag):
        return (lora_diag - 3.0).pow(2).sum()

    try:
        base = make_trainer(
            tmp_path / "a", tokenizer, dataset, kasa=KaSAConfig(r=4, regularizers={}), max_grad_norm=0
        )
        base.train()
        pulled = make_trainer(
            tmp_path / "b",
            tokenizer,
            dataset,
            kasa=KaSAConfig(r=4, regularizers={"test_diag_to_three": 1.0}),
            max_grad_norm=0,
        )
        pulled.train()
    finally:
        unregister_regularizer("test_diag_to_three")

    def mean_distance(trainer):
        return torch.stack(
            [(la.lora_diag - 3).abs().mean() for la in kasa_layers(trainer.model).values()]
        ).mean()

    assert float(mean_distance(pulled)) < float(mean_distance(base)) - 0.1
    assert "kasa/test_diag_to_three" in pulled.state.log_history[0]


def test_lora_diag_gets_no_weight_decay(tmp_path, tokenizer, dataset):
    trainer = make_trainer(tmp_path, tokenizer, dataset, weight_decay=0.1)
    names = trainer.get_decay_parameter_names(trainer.model)
    assert not any(n.endswith("lora_diag") for n in names)
    assert any(n.endswith("lora_A") for n in names) and any(n.endswith("lora_B") for n in names)
    trainer.create_optimizer()
    for group in trainer.optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        diag_ids = {id(la.lora_diag) for la in kasa_layers(trainer.model).values()}
        if ids & diag_ids:
            assert group["weight_decay"] == 0.0


def test_save_model_writes_loadable_adapter(tmp_path, tokenizer, dataset):
    trainer = make_trainer(tmp_path, tokenizer, dataset)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    ids = torch.tensor([tokenizer("what is 2 + 2 ?")["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(ids).logits
        loaded = load_kasa_adapter(build_tiny_llama(len(tokenizer), seed=0).eval(), tmp_path / "final")
        torch.testing.assert_close(loaded(ids).logits, expected)
    assert (tmp_path / "final" / "tokenizer.json").is_file()


def test_resume_from_checkpoint_continues_exactly(tmp_path, tokenizer, dataset):
    full = make_trainer(tmp_path / "full", tokenizer, dataset, max_steps=4)
    full.train()
    interrupted = make_trainer(
        tmp_path / "run", tokenizer, dataset, max_steps=2, save_strategy="steps", save_steps=2
    )
    interrupted.train()
    resumed = make_trainer(
        tmp_path / "run", tokenizer, dataset, max_steps=4, save_strategy="steps", save_steps=2
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert_states_close(adapter_state(full), adapter_state(resumed), rtol=0, atol=0)


def test_eval_logs_regularizers(tmp_path, tokenizer, dataset):
    trainer = make_trainer(tmp_path, tokenizer, dataset, per_device_eval_batch_size=4)
    metrics = trainer.evaluate(eval_dataset=dataset.select(range(8)))
    assert (
        math.isfinite(metrics["eval_kasa/singular_value_l2"]) and metrics["eval_kasa/singular_value_l2"] > 0
    )


def test_bad_trainer_config(tmp_path, tokenizer, dataset):
    from peft import LoraConfig

    with pytest.raises(TypeError, match="peft_config must be a kasa_trl.KaSAConfig"):
        KaSATrainer(
            model=build_tiny_llama(len(tokenizer)),
            args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4),
        )
    with pytest.raises(TypeError, match="kasa_config must be a kasa_trl.KaSAConfig"):
        KaSATrainer(
            model=build_tiny_llama(len(tokenizer)),
            args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
            train_dataset=dataset,
            processing_class=tokenizer,
            kasa_config={"r": 4},
        )
