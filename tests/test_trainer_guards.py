"""KaSATrainer / KaSADPOTrainer never train nothing, nor the wrong thing, silently: a frozen, merged or disabled
adapter, parameters the trainer would not save, a checkpoint of another configuration or without optimizer state.
Every refusal comes before anything changes: the adapter and the files stay as they were."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from trl import DPOConfig, SFTConfig

from kasa_trl import (
    KaSAConfig,
    apply_kasa,
    get_kasa_config,
    kasa_adapters_disabled,
    kasa_layers,
    load_kasa_adapter,
    save_kasa_adapter,
)
from kasa_trl.dpo_trainer import KaSADPOTrainer
from kasa_trl.tiny import build_tiny_llama, build_tokenizer, load_tiny_dataset
from kasa_trl.trainer import KaSATrainer

from .helpers import tiny_sft_config

CONFIG = dict(r=4, base_mode="in_place", regularizers={"singular_value_l2": 0.5, "orthogonality": 0.5})


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return load_tiny_dataset("sft").select(range(8))


def sft_args(output_dir: Path, **overrides) -> SFTConfig:
    return tiny_sft_config(output_dir, **overrides)


def make_trainer(out, tokenizer, dataset, *, model=None, kasa=None, **overrides):
    return KaSATrainer(
        model=model if model is not None else build_tiny_llama(len(tokenizer), seed=0),
        args=sft_args(out, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        kasa_config=kasa,
    )


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": p.detach().clone()
        for name, layer in kasa_layers(model).items()
        for key, p in layer.adapter_params().items()
    }


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def snapshot(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(path.rglob("*"))
    }


def refuses_to_train(trainer, out: Path, error, message) -> None:
    """``trainer.train()`` raises ``error`` matching ``message``; the model and ``out`` are left as they were."""
    before, files = state(trainer.model), snapshot(out)
    with pytest.raises(error, match=message):
        trainer.train()
    assert_unchanged(trainer.model, before)
    assert snapshot(out) == files
    assert trainer.state.global_step == 0


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    save_kasa_adapter(apply_kasa(build_tiny_llama(len(tokenizer), seed=0), KaSAConfig(**CONFIG)), directory)
    return directory


# --- nothing to train --------------------------------------------------------------------------------------------


def test_adapter_loaded_frozen_is_refused_and_evaluation_still_works(
    tmp_path, tokenizer, dataset, saved_adapter
):
    model = load_kasa_adapter(build_tiny_llama(len(tokenizer), seed=0), saved_adapter)  # is_trainable=False
    trainer = make_trainer(tmp_path / "out", tokenizer, dataset, model=model, per_device_eval_batch_size=4)
    refuses_to_train(
        trainer,
        tmp_path / "out",
        ValueError,
        r"no KaSA adapter parameter is trainable \(all 42 have requires_grad=False\): the adapter was loaded for "
        r"inference, as load_kasa_adapter\(model, path\) does by default, or frozen by hand, so training would "
        r"update nothing\. Load it with load_kasa_adapter\(model, path, is_trainable=True\)",
    )
    assert "eval_loss" in trainer.evaluate(eval_dataset=dataset.select(range(4)))
    trainable = load_kasa_adapter(build_tiny_llama(len(tokenizer), seed=0), saved_adapter, is_trainable=True)
    trainer = make_trainer(tmp_path / "ok", tokenizer, dataset, model=trainable, max_steps=1)
    before = adapter_state(trainer.model)
    trainer.train()
    after = adapter_state(trainer.model)
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_merged_adapter_is_refused(tmp_path, tokenizer, dataset):
    trainer = make_trainer(tmp_path / "out", tokenizer, dataset, kasa=KaSAConfig(**CONFIG))
    layers = list(kasa_layers(trainer.model).values())
    for layer in layers:
        layer.merge()
    refuses_to_train(
        trainer,
        tmp_path / "out",
        ValueError,
        r"14 of 14 KaSA layers are merged into their base weights \(model\.layers\.0\.self_attn\.q_proj, "
        r"model\.layers\.0\.self_attn\.k_proj, model\.layers\.0\.self_attn\.v_proj and 11 more\): .* Call "
        r"layer\.unmerge\(\) for each layer of kasa_trl\.kasa_layers\(model\) before train\(\)",
    )
    layers[3].unmerge()  # one merged layer is enough to refuse
    for layer in layers[4:]:
        layer.unmerge()
    refuses_to_train(trainer, tmp_path / "out", ValueError, r"3 of 14 KaSA layers are merged")


def test_disabled_adapter_is_refused(tmp_path, tokenizer, dataset):
    trainer = make_trainer(tmp_path / "out", tokenizer, dataset, kasa=KaSAConfig(**CONFIG))
    with kasa_adapters_disabled(trainer.model):
        refuses_to_train(
            trainer,
            tmp_path / "out",
            ValueError,
            r"14 of 14 KaSA adapters are disabled \(.* and 11 more\): training would update nothing\. Set "
            r"layer\.adapter_enabled = True",
        )


def test_trainable_parameters_outside_the_adapter_train_with_a_warning(tmp_path, tokenizer, dataset, caplog):
    trainer = make_trainer(tmp_path / "out", tokenizer, dataset, kasa=KaSAConfig(**CONFIG), max_steps=1)
    norm = trainer.model.model.norm.weight.requires_grad_(True)
    before = norm.detach().clone()
    with caplog.at_level(logging.WARNING, logger="kasa_trl.training_guards"):
        trainer.train()
    assert not torch.equal(norm, before)
    assert (
        "1 parameters outside the KaSA adapters are trainable (model.norm.weight): they are trained, but the KaSA "
        "trainers save, checkpoint and resume only the adapter" in caplog.text
    )


def test_optimizer_built_before_kasa_is_refused(tmp_path, tokenizer, dataset):
    model = build_tiny_llama(len(tokenizer), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # the base's weights: KaSA is not on yet
    trainer = KaSATrainer(
        model=model,
        args=sft_args(tmp_path / "out"),
        train_dataset=dataset,
        processing_class=tokenizer,
        kasa_config=KaSAConfig(**CONFIG),
        optimizers=(optimizer, None),
    )
    refuses_to_train(
        trainer,
        tmp_path / "out",
        ValueError,
        r"the optimizer does not hold 42 of the 42 trainable KaSA parameters \(model\.layers\.0\.self_attn\.q_proj"
        r"\.lora_A, .* and 39 more\), so they would never be updated\. An optimizer built from the base model before "
        r"the trainer applied KaSA",
    )
    adapted = apply_kasa(build_tiny_llama(len(tokenizer), seed=0), KaSAConfig(**CONFIG))
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.05)
    trainer = KaSATrainer(
        model=adapted,
        args=sft_args(tmp_path / "ok", max_steps=1),
        train_dataset=dataset,
        processing_class=tokenizer,
        optimizers=(optimizer, None),
    )
    trainer.train()
    assert trainer.state.global_step == 1


def test_partly_frozen_adapter_trains_with_a_warning(tmp_path, tokenizer, dataset, caplog):
    trainer = make_trainer(tmp_path / "out", tokenizer, dataset, kasa=KaSAConfig(**CONFIG), max_steps=1)
    for layer in kasa_layers(trainer.model).values():
        layer.lora_diag.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="kasa_trl.training_guards"):
        trainer.train()
    assert (
        "14 of 42 KaSA adapter parameters are frozen (model.layers.0.self_attn.q_proj.lora_diag"
        in caplog.text
    )


def test_adapter_off_the_forward_path_stops_at_the_first_step(tmp_path, tokenizer, dataset):
    model = build_tiny_llama(len(tokenizer), seed=0)
    model.unused = nn.Linear(64, 64)  # adapted, but the forward never calls it
    trainer = make_trainer(
        tmp_path / "out",
        tokenizer,
        dataset,
        model=model,
        kasa=KaSAConfig(**{**CONFIG, "target_modules": ["unused"]}),
    )
    before = adapter_state(trainer.model)
    with pytest.raises(
        RuntimeError,
        match=r"no trainable KaSA parameter received a gradient in the first step \(3 parameters, e\.g\. "
        r"unused\.lora_A\): the adapted modules do not take part in the loss",
    ):
        trainer.train()
    after = adapter_state(trainer.model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert trainer.state.global_step == 0 and not list((tmp_path / "out").glob("checkpoint-*"))


def test_peft_model_is_refused(tmp_path, tokenizer, dataset):
    import peft

    model = peft.get_peft_model(
        build_tiny_llama(len(tokenizer), seed=0), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    before = state(model)
    with pytest.raises(
        ValueError,
        match=r"the model carries PEFT adapter layers \(base_model\.model\.model\.layers\.0\.self_attn\.q_proj, "
        r".*\); KaSA trainers train their own KaSA layers on a plain base model\. Pass the base model",
    ):
        make_trainer(tmp_path / "out", tokenizer, dataset, model=model)
    assert_unchanged(model, before)
    assert not kasa_layers(model)


def test_preadapted_model_takes_requested_regularizers_and_auto_matches(tmp_path, tokenizer, dataset):
    model = apply_kasa(build_tiny_llama(len(tokenizer), seed=0), KaSAConfig(r=4, base_mode="non_destructive"))
    wanted = {"singular_value_l2": 0.25}
    trainer = make_trainer(
        tmp_path / "out",
        tokenizer,
        dataset,
        model=model,
        kasa=KaSAConfig(r=4, base_mode="auto", regularizers=wanted),
    )
    assert trainer.kasa_config.regularizers == wanted and trainer.kasa_config.base_mode == "non_destructive"
    assert (
        get_kasa_config(trainer.model).regularizers == KaSAConfig().regularizers
    )  # the model's own, untouched
    assert trainer._kasa_session.weights == wanted
    with pytest.raises(
        ValueError, match=r"Differences: base_mode: 'in_place' \(kasa_config\) vs 'non_destructive'"
    ):
        make_trainer(
            tmp_path / "out", tokenizer, dataset, model=model, kasa=KaSAConfig(r=4, base_mode="in_place")
        )


# --- resuming ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer, dataset):
    """checkpoint-1 of a run with CONFIG (all-linear, in_place, r=4)."""
    out = tmp_path_factory.mktemp("run")
    make_trainer(
        out, tokenizer, dataset, kasa=KaSAConfig(**CONFIG), max_steps=1, save_strategy="steps", save_steps=1
    ).train()
    return out / "checkpoint-1"


RESUME_MISMATCHES = {
    "r": (dict(r=2), r"r: 4 \(checkpoint\) vs 2 \(this trainer\)"),
    "alpha": (dict(lora_alpha=32), r"lora_alpha: 16 \(checkpoint\) vs 32 \(this trainer\)"),
    "rslora": (dict(use_rslora=True), r"use_rslora: False \(checkpoint\) vs True \(this trainer\)"),
    "base-mode": (
        dict(base_mode="non_destructive"),
        r"base_mode: 'in_place' \(checkpoint\) vs 'non_destructive'",
    ),
    "truncation": (
        dict(truncation="official"),
        r"truncation: 'paper' \(checkpoint\) vs 'official' \(this trainer\)",
    ),
    "targets": (
        dict(target_modules=["q_proj", "v_proj"]),
        r"adapted layers differ \(only in the checkpoint: model\.layers\.0\.mlp\.down_proj, .* and 7 more; "
        r"target_modules: 'all-linear' \(checkpoint\) vs \['q_proj', 'v_proj'\] \(this trainer\)\)",
    ),
    "exclusions": (
        dict(exclude_modules=["down_proj"]),
        r"only in the checkpoint: model\.layers\.0\.mlp\.down_proj, model\.layers\.1\.mlp\.down_proj; "
        r"exclude_modules: None \(checkpoint\) vs \['down_proj'\]",
    ),
    "two-fields": (
        dict(r=2, lora_alpha=4),
        r"r: 4 \(checkpoint\) vs 2 \(this trainer\); lora_alpha: 16 \(checkpoint\) vs 4",
    ),
}


@pytest.mark.parametrize("case", list(RESUME_MISMATCHES))
def test_resume_with_another_model_config_is_refused(tmp_path, tokenizer, dataset, checkpoint, case):
    changes, message = RESUME_MISMATCHES[case]
    trainer = make_trainer(tmp_path / "run", tokenizer, dataset, kasa=KaSAConfig(**{**CONFIG, **changes}))
    before, files = state(trainer.model), snapshot(checkpoint)
    with pytest.raises(
        ValueError,
        match=rf"checkpoint .*checkpoint-1 holds a KaSA adapter trained with other model settings than this "
        rf"trainer's: .*{message}.*\. Resume with the KaSAConfig the run was started with "
        rf"\(KaSAConfig\.from_json\('.*checkpoint-1/kasa_config\.json'\)\), or start a new run",
    ):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert_unchanged(trainer.model, before)
    assert snapshot(checkpoint) == files and trainer.state.global_step == 0


def test_resume_with_same_model_and_auto_base_mode_or_new_regularizers(
    tmp_path, tokenizer, dataset, checkpoint, caplog
):
    trainer = make_trainer(
        tmp_path / "run",
        tokenizer,
        dataset,
        kasa=KaSAConfig(**{**CONFIG, "regularizers": {"orthogonality": 0.1}}),
        max_steps=2,
    )
    with caplog.at_level(logging.WARNING, logger="kasa_trl.training_guards"):
        trainer.train(resume_from_checkpoint=checkpoint)  # a Path works too
    assert trainer.state.global_step == 2
    assert "resuming from" in caplog.text and "with changed training settings: regularizers:" in caplog.text


def _copy_without(checkpoint: Path, tmp_path: Path, *names: str) -> Path:
    copy = tmp_path / "copy" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    for name in names:
        for path in copy.glob(name):
            path.unlink()
    return copy


@pytest.mark.parametrize(
    ("removed", "message"),
    [
        (("optimizer.pt",), r"the optimizer state \(optimizer\.pt or optimizer\.bin\) missing"),
        (
            ("scheduler.pt", "rng_state*.pth"),
            r"the scheduler state \(scheduler\.pt\), the RNG state \(rng_state\*\.pth\) missing",
        ),
    ],
    ids=["optimizer", "scheduler-and-rng"],
)
def test_resume_without_optimizer_state_is_refused(
    tmp_path, tokenizer, dataset, checkpoint, removed, message
):
    copy = _copy_without(checkpoint, tmp_path, *removed)
    trainer = make_trainer(tmp_path / "run", tokenizer, dataset, kasa=KaSAConfig(**CONFIG))
    before, files = state(trainer.model), snapshot(copy)
    with pytest.raises(
        ValueError,
        match=rf"cannot resume from .*checkpoint-1: {message}, so training would go on with a fresh optimizer and "
        r"a learning-rate schedule started over\. Pass a complete checkpoint",
    ):
        trainer.train(resume_from_checkpoint=str(copy))
    assert_unchanged(trainer.model, before)
    assert snapshot(copy) == files


def test_resume_without_optimizer_state_warns_when_the_run_saves_only_the_model(
    tmp_path, tokenizer, dataset, checkpoint, caplog
):
    copy = _copy_without(checkpoint, tmp_path, "optimizer.pt", "scheduler.pt", "rng_state*.pth")
    trainer = make_trainer(
        tmp_path / "run", tokenizer, dataset, kasa=KaSAConfig(**CONFIG), save_only_model=True
    )
    with caplog.at_level(logging.WARNING, logger="kasa_trl.training_guards"):
        trainer.train(resume_from_checkpoint=str(copy))
    assert trainer.state.global_step == 2
    assert "without the optimizer state (optimizer.pt or optimizer.bin)" in caplog.text
    assert "the optimizer starts fresh, the learning-rate schedule starts over" in caplog.text


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", r"resume_from_checkpoint='.*nowhere' is not a directory; pass a checkpoint-N directory"),
        (
            "no-state",
            r"cannot resume from .*: trainer_state\.json is missing \(the save was interrupted\)\. Pass a ",
        ),
        (
            "final-adapter",
            r"cannot resume from .*final: trainer_state\.json is missing .* or start a new run from a "
            r"saved adapter with load_kasa_adapter\(model, path, is_trainable=True\)",
        ),
    ],
)
def test_resume_from_what_is_no_checkpoint_is_refused(
    tmp_path, tokenizer, dataset, checkpoint, saved_adapter, damage, message
):
    path = {
        "missing": tmp_path / "nowhere",
        "no-state": _copy_without(checkpoint, tmp_path, "trainer_state.json"),
        "final-adapter": Path(shutil.copytree(saved_adapter, tmp_path / "final")),
    }[damage]
    trainer = make_trainer(tmp_path / "run", tokenizer, dataset, kasa=KaSAConfig(**CONFIG))
    before = state(trainer.model)
    with pytest.raises(ValueError, match=message):
        trainer.train(resume_from_checkpoint=str(path))
    assert_unchanged(trainer.model, before)


# --- DPO: the same guards --------------------------------------------------------------------------------------


def test_dpo_refuses_a_frozen_adapter_and_a_mismatched_checkpoint(
    tmp_path, tokenizer, saved_adapter, checkpoint
):
    dpo = load_tiny_dataset("dpo").select(range(8))
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        max_length=64,
        bf16=False,
        max_steps=1,
    )
    frozen = load_kasa_adapter(build_tiny_llama(len(tokenizer), seed=0), saved_adapter)
    trainer = KaSADPOTrainer(model=frozen, args=args, train_dataset=dpo, processing_class=tokenizer)
    refuses_to_train(trainer, tmp_path / "out", ValueError, r"no KaSA adapter parameter is trainable")
    trainer = KaSADPOTrainer(
        model=build_tiny_llama(len(tokenizer), seed=0),
        args=args,
        train_dataset=dpo,
        processing_class=tokenizer,
        kasa_config=KaSAConfig(**{**CONFIG, "r": 2}),
    )
    before = state(trainer.model)
    with pytest.raises(
        ValueError, match=r"other model settings than this trainer's: r: 4 \(checkpoint\) vs 2"
    ):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert_unchanged(trainer.model, before)


def _dpo_args(out: Path) -> DPOConfig:
    return DPOConfig(
        output_dir=str(out), use_cpu=True, report_to="none", max_length=64, bf16=False, max_steps=1
    )


@pytest.mark.parametrize("base_mode", ["non_destructive", "in_place"])
def test_dpo_refusal_after_adapting_gives_the_model_back_as_it_was(tmp_path, tokenizer, base_mode):
    """KaSA goes on before TRL's constructor; a refusal from there on (here: the LM head targeted) takes it off
    again, trainable flags included: bit-exact in non_destructive mode, within one rounding in place."""
    model = build_tiny_llama(len(tokenizer), seed=0)
    model.model.norm.weight.requires_grad_(False)
    before = state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"a KaSA adapter on the LM head is not supported by DPO"):
        KaSADPOTrainer(
            model=model,
            args=_dpo_args(tmp_path / "out"),
            train_dataset=load_tiny_dataset("dpo").select(range(8)),
            processing_class=tokenizer,
            kasa_config=KaSAConfig(r=2, target_modules=["q_proj", "lm_head"], base_mode=base_mode),
        )
    assert not kasa_layers(model) and "kasa_config" not in vars(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if base_mode == "non_destructive":
            assert torch.equal(after[key], value), key
        else:
            torch.testing.assert_close(after[key], value, rtol=2**-23, atol=1e-7, msg=key)


def test_dpo_refuses_the_policy_as_its_own_reference(tmp_path, tokenizer):
    model = build_tiny_llama(len(tokenizer), seed=0)
    before = state(model)
    with pytest.raises(
        ValueError,
        match=r"model and ref_model are the same object; omit ref_model: KaSADPOTrainer's reference is the policy "
        r"with its KaSA adapters disabled",
    ):
        KaSADPOTrainer(
            model=model,
            ref_model=model,
            args=_dpo_args(tmp_path / "out"),
            train_dataset=load_tiny_dataset("dpo").select(range(8)),
            processing_class=tokenizer,
        )
    assert_unchanged(model, before)
    assert not kasa_layers(model)
