"""Hostile-user findings on configs and training (h12: B1, B5, B7, B10, B11, B13)."""

from __future__ import annotations

import math

import pytest
import torch

from kasa_trl import KaSAConfig, apply_kasa, kasa_layers, save_kasa_adapter
from kasa_trl.config import SCALING_RANGE
from kasa_trl.tiny import build_tiny_llama


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- B1: list/dict fields changed in place are checked where the config is used ---------------------------------


def _mutated_targets() -> KaSAConfig:
    cfg = KaSAConfig(r=4, base_mode="in_place", target_modules=["q_proj"])
    cfg.target_modules.append("v_proj[")  # type: ignore[union-attr]
    return cfg


def _mutated_regularizers() -> KaSAConfig:
    cfg = KaSAConfig(r=4, base_mode="in_place", target_modules=["q_proj"])
    cfg.regularizers["orthogonality"] = float("nan")
    return cfg


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_mutated_targets, r"target_modules entry 'v_proj\[' is not a module name"),
        (_mutated_regularizers, "orthogonality"),
    ],
)
def test_config_changed_in_place_is_refused_by_validate_to_dict_and_apply(make, message):
    with pytest.raises(ValueError, match=message):
        make().validate()
    with pytest.raises(ValueError, match=message):
        make().to_dict()
    model = build_tiny_llama(100)
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        apply_kasa(model, make())
    assert not kasa_layers(model) and _same(before, _state(model))


def test_config_changed_in_place_after_apply_is_refused_by_save(tmp_path):
    model = build_tiny_llama(100)
    apply_kasa(model, KaSAConfig(r=4, base_mode="in_place", target_modules=["q_proj"]))
    model.kasa_config.regularizers["orthogonality"] = float("nan")
    with pytest.raises(ValueError, match="orthogonality"):
        save_kasa_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_validate_keeps_a_valid_config():
    cfg = KaSAConfig(r=4, target_modules=["q_proj", "v_proj"], regularizers={"orthogonality": 0.5})
    cfg.validate()
    assert cfg == KaSAConfig(r=4, target_modules=["q_proj", "v_proj"], regularizers={"orthogonality": 0.5})
    assert KaSAConfig.from_dict(cfg.to_dict()) == cfg


# -- B5, B7: the scaling must stay within float32's usable range ------------------------------------------------


@pytest.mark.parametrize("alpha", [1e39, 1e38, 10**300, 1e-300, 1e-30])
def test_lora_alpha_whose_scaling_float32_cannot_carry_is_refused(alpha):
    with pytest.raises(ValueError, match=r"lora_alpha=.* gives scaling = lora_alpha / r=4"):
        KaSAConfig(r=4, lora_alpha=alpha)


def test_lora_alpha_beyond_the_float_range_names_the_field():
    with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
        KaSAConfig(lora_alpha=10**400)


def test_scaling_checked_on_assignment_of_r_alpha_and_rslora():
    cfg = KaSAConfig(r=4, lora_alpha=4e19)
    with pytest.raises(ValueError, match=r"lora_alpha / r=1 "):
        cfg.r = 1
    with pytest.raises(ValueError, match=r"lora_alpha / sqrt\(r=4\)"):
        cfg.use_rslora = True
    with pytest.raises(ValueError, match="gives scaling"):
        cfg.lora_alpha = 1e-25
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (4, 4e19, False)


def test_scaling_range_edges_are_accepted():
    low, high = SCALING_RANGE
    assert math.isclose(low * high, 1.0)
    assert KaSAConfig(r=1, lora_alpha=high).scaling == high
    assert KaSAConfig(r=1, lora_alpha=low).scaling == low


# -- B11: a regularizer that raises is named, with the layer -----------------------------------------------------


def test_regularizer_that_raises_names_itself_and_the_layer():
    from kasa_trl import kasa_regularization, register_regularizer, unregister_regularizer

    def raises(lora_A, lora_B, lora_diag):
        raise KeyError("oops")

    register_regularizer("test_hostile_raises")(raises)
    try:
        model = build_tiny_llama(100)
        apply_kasa(
            model, KaSAConfig(r=4, target_modules=["q_proj"], regularizers={"test_hostile_raises": 1.0})
        )
        before = _state(model)
        with pytest.raises(
            RuntimeError,
            match=r"regularizer 'test_hostile_raises' .* on model\.layers\.0\.self_attn\.q_proj raised KeyError: 'oops'",
        ) as info:
            kasa_regularization(model)
        assert isinstance(info.value.__cause__, KeyError)
        assert _same(before, _state(model))
    finally:
        unregister_regularizer("test_hostile_raises")


# -- B10: one spectrum record per step after a resume -------------------------------------------------------------


def test_spectrum_records_after_the_resumed_step_are_dropped(tmp_path):
    import json

    from kasa_trl.callbacks import drop_records_after

    path = tmp_path / "kasa_spectrum.jsonl"
    records = [json.dumps({"step": s, "epoch": 0.1 * s, "layers": {}}) + "\n" for s in (1, 2, 3, 4)]
    path.write_text("".join(records) + '{"step": 5, "ep', encoding="utf-8")  # a record torn by a kill
    drop_records_after(path, 2)
    assert path.read_text(encoding="utf-8") == "".join(records[:2])
    drop_records_after(path, 2)  # nothing to drop: unchanged
    assert path.read_text(encoding="utf-8") == "".join(records[:2])
    assert [p.name for p in tmp_path.iterdir()] == ["kasa_spectrum.jsonl"]


def test_spectrum_log_holds_one_record_per_step_after_resume(tmp_path):
    import json

    from trl import SFTConfig

    from kasa_trl.callbacks import SpectrumCallback
    from kasa_trl.tiny import build_tokenizer, load_tiny_dataset
    from kasa_trl.trainer import KaSATrainer

    tok = build_tokenizer()
    ds = load_tiny_dataset("sft").select(range(8))
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=4, save_steps=2, logging_steps=1, per_device_train_batch_size=4,
        report_to="none", use_cpu=True, max_length=32,
    )  # fmt: skip

    def trainer() -> KaSATrainer:
        return KaSATrainer(
            model=build_tiny_llama(len(tok)), args=args, train_dataset=ds, processing_class=tok,
            kasa_config=KaSAConfig(r=4, target_modules=["q_proj"]), callbacks=[SpectrumCallback(plots=False)],
        )  # fmt: skip

    trainer().train()
    trainer().train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    lines = (tmp_path / "kasa_spectrum.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


# -- B13: a checkpoint whose optimizer/scheduler/RNG file is cut short is not complete ------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from trl import SFTConfig

    from kasa_trl.tiny import build_tokenizer, load_tiny_dataset
    from kasa_trl.trainer import KaSATrainer

    out = tmp_path_factory.mktemp("run")
    tok = build_tokenizer()
    args = SFTConfig(
        output_dir=str(out), max_steps=2, save_steps=1, per_device_train_batch_size=4, report_to="none",
        use_cpu=True, max_length=32,
    )  # fmt: skip

    def trainer() -> KaSATrainer:
        return KaSATrainer(
            model=build_tiny_llama(len(tok)), args=args, train_dataset=load_tiny_dataset("sft").select(range(8)),
            processing_class=tok, kasa_config=KaSAConfig(r=4, target_modules=["q_proj"]),
        )  # fmt: skip

    trainer().train()
    return out, trainer


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_checkpoint_with_a_cut_short_state_file_is_skipped_and_refused(finished_run, tmp_path, caplog, name):
    import shutil

    from kasa_trl.checkpoint import incomplete_reason, last_complete_checkpoint

    run, trainer = finished_run
    out = tmp_path / "out"
    shutil.copytree(run, out)
    assert incomplete_reason(out / "checkpoint-2") is None
    data = (out / "checkpoint-2" / name).read_bytes()
    (out / "checkpoint-2" / name).write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(out) == str(out / "checkpoint-1")
    assert f"checkpoint-2: {name} is unreadable (not a complete torch.save archive" in caplog.text
    (out / "checkpoint-2" / name).write_bytes(b"garbage")
    assert incomplete_reason(out / "checkpoint-2").startswith(f"{name} is unreadable")

    t = trainer()
    before = _state(t.model)
    with pytest.raises(ValueError, match=rf"cannot resume from .*checkpoint-2: {name} is unreadable"):
        t.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert _same(before, _state(t.model))


# -- B7 (the other half): all-zero adapter gradients at the first step are reported ---------------------------------


@pytest.mark.parametrize("zero", [True, False])
def test_all_zero_adapter_gradients_at_the_first_step_are_reported(caplog, zero):
    from types import SimpleNamespace

    from kasa_trl.training_guards import GradientReachesAdapters

    model = build_tiny_llama(100)
    apply_kasa(model, KaSAConfig(r=4, target_modules=["q_proj"]))
    for layer in kasa_layers(model).values():
        for p in layer.adapter_params().values():
            p.grad = torch.zeros_like(p) if zero else torch.ones_like(p)
    args = SimpleNamespace(deepspeed=None, fsdp=None)
    with caplog.at_level("WARNING"):
        GradientReachesAdapters().on_pre_optimizer_step(args, None, None, model=model)  # type: ignore[arg-type]
    assert ("gradient is exactly 0 in the first step" in caplog.text) == zero
