"""KaSADPOTrainer: the reference is the adapters-off policy, regularizers once per step, metrics, data checks."""

import math

import pytest
import torch
from torch import nn
from trl import DPOConfig

import kasa_trl.decomposition
import kasa_trl.model
from kasa_trl import KaSAConfig, apply_kasa, kasa_layers
from kasa_trl.dpo_trainer import KaSADPOTrainer
from kasa_trl.tiny import build_tiny_llama, build_tokenizer, load_tiny_dataset

from .helpers import tiny_sft_config

STRONG = {"singular_value_l2": 0.5, "orthogonality": 0.5}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return load_tiny_dataset("dpo").select(range(16))


def dpo_args(output_dir, **overrides):
    overrides = {"max_length": 64, "gradient_checkpointing": False, **overrides}
    return tiny_sft_config(output_dir, config_class=DPOConfig, **overrides)


def make_trainer(tmp_path, tokenizer, dataset, *, kasa=None, model=None, **overrides):
    return KaSADPOTrainer(
        model=model if model is not None else build_tiny_llama(len(tokenizer), seed=0),
        args=dpo_args(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        kasa_config=kasa or KaSAConfig(r=4, regularizers=STRONG),
    )


def adapter_state(trainer):
    return {
        f"{name}.{key}": p.detach().clone()
        for name, layer in kasa_layers(trainer.model).items()
        for key, p in layer.adapter_params().items()
    }


def truncated_base(tokenizer):
    """A fresh base with KaSA applied by hand, for the step-0 policy with adapters disabled."""
    return apply_kasa(build_tiny_llama(len(tokenizer), seed=0), KaSAConfig(r=4)).eval()


def completion_logps(model, input_ids, attention_mask, labels):
    """Per-token log-probabilities of ``labels`` (shifted; 0 where masked), from the full logits: (B, T-1)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask


def test_step0_loss_is_ln2_and_no_second_decomposition(tmp_path, tokenizer, dataset, monkeypatch):
    calls = []
    original = kasa_trl.decomposition._minor_components

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    # Every decomposition (one at a time, several at once, sharded) goes through this one function.
    monkeypatch.setattr(kasa_trl.decomposition, "_minor_components", counting)
    trainer = make_trainer(tmp_path, tokenizer, dataset, max_steps=3)
    n_layers = len(kasa_layers(trainer.model))
    assert len(calls) == n_layers  # one decomposition per layer, for the policy only
    assert not isinstance(trainer.ref_model, nn.Module)
    trainer.train()
    assert len(calls) == n_layers  # none during training (no reference copy, no reference adapter)

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    first = logs[0]
    # dW = 0 at step 0, so policy == reference: the sigmoid DPO loss is -log sigmoid(0) = ln 2. The logged loss
    # also holds the (detached) regularizer value.
    assert first["loss"] - first["kasa/regularization"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for entry in logs:
        for key in ("kasa/regularization", "kasa/singular_value_l2", "kasa/orthogonality"):
            assert math.isfinite(entry[key]), key
    assert logs[-1]["rewards/margins"] != 0.0  # the adapter moved the policy away from the reference


def test_reference_log_probs_are_the_truncated_base(tmp_path, tokenizer, dataset):
    trainer = make_trainer(tmp_path, tokenizer, dataset)
    reference = trainer.ref_model
    recorded = []

    def recording_reference(**kwargs):
        out = reference(**kwargs)
        recorded.append((trainer.state.global_step, kwargs, out.log_probs.detach().clone()))
        return out

    trainer.ref_model = recording_reference
    trainer.train()
    assert [step for step, _, _ in recorded] == [0, 1]  # the second call runs after an update of the adapter
    assert any(layer.lora_B.abs().max() > 0 for layer in kasa_layers(trainer.model).values())

    by_hand = truncated_base(tokenizer)
    untouched = build_tiny_llama(len(tokenizer), seed=0).eval()
    for _, kwargs, log_probs in recorded:
        inputs = (kwargs["input_ids"], kwargs["attention_mask"], kwargs["labels"])
        expected = completion_logps(by_hand, *inputs)
        torch.testing.assert_close(log_probs, expected, rtol=1e-5, atol=1e-5)
        # The check tells the truncated base from the original one.
        assert (completion_logps(untouched, *inputs) - expected).abs().max() > 1e-3


def test_precomputed_reference_log_probs_are_the_truncated_base(tmp_path, tokenizer, dataset):
    trainer = make_trainer(tmp_path, tokenizer, dataset, precompute_ref_log_probs=True, max_steps=1)
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model = truncated_base(tokenizer)
    logps = completion_logps(model, batch["input_ids"], batch["attention_mask"], labels).sum(-1)
    chosen, rejected = logps.chunk(2)
    torch.testing.assert_close(
        torch.tensor([r["ref_chosen_logps"] for r in rows]), chosen, rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(
        torch.tensor([r["ref_rejected_logps"] for r in rows]), rejected, rtol=1e-5, atol=1e-4
    )
    # The adapters are back on after the precompute.
    assert all(layer.adapter_enabled for layer in kasa_layers(trainer.model).values())
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] - first["kasa/regularization"] == pytest.approx(math.log(2), abs=1e-4)


def test_gradient_accumulation_invariance(tmp_path, tokenizer, dataset):
    """(batch 4, accumulation 1) == (batch 2, accumulation 2): the regularizer enters once per step."""
    # No clipping: it would rescale a doubled regularizer gradient back to the same norm.
    one = make_trainer(tmp_path / "a", tokenizer, dataset, max_grad_norm=0)
    one.train()
    two = make_trainer(
        tmp_path / "b",
        tokenizer,
        dataset,
        max_grad_norm=0,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    two.train()
    a, b = adapter_state(one), adapter_state(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # Counting the regularizer twice per step would show far above the tolerance.
    doubled = make_trainer(
        tmp_path / "c",
        tokenizer,
        dataset,
        max_grad_norm=0,
        kasa=KaSAConfig(r=4, regularizers={k: 2 * v for k, v in STRONG.items()}),
    )
    doubled.train()
    c = adapter_state(doubled)
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3


def test_model_by_name_loads_once_and_explicit_ref_model_is_kept(tmp_path, tokenizer, dataset, monkeypatch):
    from kasa_trl import dpo_trainer as trainer_module

    build_tiny_llama(len(tokenizer), seed=0).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    loads = []
    original = trainer_module._trl_dpo.create_model_from_path

    def counting(*args, **kwargs):
        loads.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module._trl_dpo, "create_model_from_path", counting)
    args = dpo_args(tmp_path, model_init_kwargs={"dtype": "float32"})
    by_name = KaSADPOTrainer(
        model=str(tmp_path / "base"), args=args, train_dataset=dataset, kasa_config=KaSAConfig(r=4)
    )
    assert loads == [(str(tmp_path / "base"),)]  # the policy only: no reference model loaded
    assert kasa_layers(by_name.model) and not isinstance(by_name.ref_model, nn.Module)
    assert args.model_init_kwargs == {"dtype": "float32"}  # left as the user gave them

    ref = build_tiny_llama(len(tokenizer), seed=1)
    explicit = KaSADPOTrainer(
        model=build_tiny_llama(len(tokenizer), seed=0),
        ref_model=ref,
        args=dpo_args(tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
        kasa_config=KaSAConfig(r=4),
    )
    assert explicit.ref_model is ref and not kasa_layers(ref)


def test_bad_dpo_setups(tmp_path, tokenizer, dataset):
    for drop, missing in (
        (["rejected"], r"\['rejected'\]"),
        (["chosen", "rejected"], r"\['chosen', 'rejected'\]"),
    ):
        with pytest.raises(
            ValueError, match=rf"train_dataset is missing the column\(s\) {missing}.*'prompt', 'chosen'"
        ):
            make_trainer(tmp_path, tokenizer, dataset.remove_columns(drop))
    with pytest.raises(
        ValueError, match=r"eval_dataset\['held_out'\] is missing the column\(s\) \['chosen'\]"
    ):
        KaSADPOTrainer(
            model=build_tiny_llama(len(tokenizer)),
            args=dpo_args(tmp_path),
            train_dataset=dataset,
            eval_dataset={"held_out": dataset.remove_columns("chosen")},
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="sync_ref_model=True is not supported"):
        make_trainer(tmp_path, tokenizer, dataset, sync_ref_model=True)
    with pytest.raises(ValueError, match="KaSA adapter on the LM head"):
        make_trainer(tmp_path, tokenizer, dataset, kasa=KaSAConfig(r=4, target_modules=["q_proj", "lm_head"]))
