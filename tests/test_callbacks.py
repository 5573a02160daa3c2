"""SpectrumCallback: records equal their formulas, reach the loggers through the trainer's log(), and change
nothing."""

import importlib.machinery
import json
import struct
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainerControl, TrainerState, set_seed
from transformers.integrations import WandbCallback
from trl import DPOConfig, SFTConfig, SFTTrainer

from kasa_trl import KaSAConfig, apply_kasa, kasa_layers, spectrum_plots
from kasa_trl.callbacks import FINAL_PNG, JSONL_NAME, OVER_STEPS_PNG, SpectrumCallback, log_spectra
from kasa_trl.dpo_trainer import KaSADPOTrainer
from kasa_trl.tiny import build_tiny_llama, build_tokenizer, load_tiny_dataset
from kasa_trl.trainer import KaSATrainer

from .conftest import VOCAB, randomize_adapters

QUANTITIES = ("lora_diag_abs", "singular_values", "orthogonality_A", "orthogonality_B", "update_norm")
TARGETS = ["q_proj", "v_proj"]  # 4 layers keep the pictures (the slowest part) quick
N_LAYERS = 2 * len(TARGETS)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return load_tiny_dataset("sft").select(range(16))


def train(out_dir, tokenizer, dataset, *, trainer_cls=KaSATrainer, callbacks=None, **overrides):
    args = dict(
        output_dir=str(out_dir),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=2,
        save_strategy="no",
        report_to="tensorboard",
        use_cpu=True,
        seed=0,
        max_length=32,
        disable_tqdm=True,
        activation_checkpointing=True,  # TRL's default, under transformers 5's name (no deprecation warning)
    )
    args.update(overrides)
    # Dropout draws from the global RNG every step: a callback consuming RNG would change the weights. The
    # adapter's initialization draws from it too, before the trainer seeds: seed it, whatever ran before.
    set_seed(0)
    model = apply_kasa(
        build_tiny_llama(len(tokenizer), seed=0), KaSAConfig(r=4, lora_dropout=0.1, target_modules=TARGETS)
    )
    trainer = trainer_cls(
        model=model,
        args=SFTConfig(**args),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def kasa_run(tmp_path_factory, tokenizer, dataset):
    out = tmp_path_factory.mktemp("kasa")
    return train(out, tokenizer, dataset, callbacks=[SpectrumCallback()]), out


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tokenizer, dataset):
    """trl.SFTTrainer, whose log() knows nothing of the spectra; logging_steps=3: a log at step 3, a final
    unlogged record at 4."""
    out = tmp_path_factory.mktemp("plain")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(
            out, tokenizer, dataset, trainer_cls=SFTTrainer, callbacks=[SpectrumCallback()], logging_steps=3
        )
    return trainer, out, [str(w.message) for w in caught if "SpectrumCallback" in str(w.message)]


def read_records(out):
    return [json.loads(line) for line in (Path(out) / JSONL_NAME).read_text().splitlines()]


def tensorboard_events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = Path(out).glob("runs/*/events.out.tfevents.*")
    acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def by_hand(layer):
    """The record's quantities from the (out, in) update itself, in float64."""
    a, b, diag = (
        layer.lora_A.detach().double(),
        layer.lora_B.detach().double(),
        layer.lora_diag.detach().double(),
    )
    delta = layer.scaling * (b * diag) @ a  # (out, in)
    eye = torch.eye(layer.r, dtype=torch.float64)
    return {
        "lora_diag": diag,
        "singular_values": torch.linalg.svdvals(delta)[: layer.r],
        "orthogonality_A": torch.linalg.matrix_norm(a @ a.T - eye),
        "orthogonality_B": torch.linalg.matrix_norm(b.T @ b - eye),
        "update_norm": torch.linalg.matrix_norm(delta),
    }


def summary(record):
    """kasa/spectrum/<quantity>/<stat> recomputed from a JSONL record."""
    pooled = {q: [] for q in QUANTITIES}
    for layer in record["layers"].values():
        pooled["lora_diag_abs"] += [abs(v) for v in layer["lora_diag"]]
        pooled["singular_values"] += layer["singular_values"]
        for q in QUANTITIES[2:]:
            pooled[q].append(layer[q])
    return {
        f"kasa/spectrum/{q}/{stat}": float(fn(values))
        for q, values in pooled.items()
        for stat, fn in (("min", np.min), ("mean", np.mean), ("max", np.max))
    }


def test_jsonl_records_equal_the_formulas(kasa_run):
    trainer, out = kasa_run
    records = read_records(out)
    assert [r["step"] for r in records] == [2, 4]
    layers = kasa_layers(trainer.model)
    assert all(sorted(r["layers"]) == sorted(layers) for r in records)
    last = records[-1]["layers"]
    for name, layer in layers.items():
        expected = by_hand(layer)
        assert set(last[name]) == set(expected)
        assert last[name]["lora_diag"] == expected["lora_diag"].tolist()  # fp32 -> fp64 is exact
        # QR-core singular values vs a full SVD of dW, both float64: agree to ~1e-15 of the largest.
        scale = float(expected["singular_values"][0]) + 1e-30
        sv = torch.tensor(last[name]["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(sv, expected["singular_values"], rtol=0, atol=1e-10 * scale)
        for key in ("orthogonality_A", "orthogonality_B", "update_norm"):
            assert last[name][key] == pytest.approx(float(expected[key]), rel=1e-10, abs=1e-12), key
    assert all(layer["update_norm"] > 0 for layer in last.values())  # training moved the adapters


def test_kasa_trainer_log_merges_the_scalars(kasa_run):
    trainer, out = kasa_run
    records = {r["step"]: r for r in read_records(out)}
    logged = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert sorted(logged) == [2, 4]
    for step, entry in logged.items():
        expected = summary(records[step])
        spectra = {k for k in entry if k.startswith("kasa/spectrum/")}
        assert spectra == set(expected)  # per-layer scalars are opt-in
        assert "kasa/regularization" in entry  # next to TRL's own metrics
        for key, value in expected.items():
            assert entry[key] == pytest.approx(value, rel=1e-12), key
    # The final log (train_runtime, ...) carries no stale record.
    assert not any(k.startswith("kasa/spectrum/") for k in trainer.state.log_history[-1])


def test_tensorboard_gets_scalars_and_histograms(kasa_run):
    _, out = kasa_run
    acc = tensorboard_events(out)
    tags = acc.Tags()
    assert {f"train/kasa/spectrum/{q}/{s}" for q in QUANTITIES for s in ("min", "mean", "max")} <= set(
        tags["scalars"]
    )
    assert [e.step for e in acc.Scalars("train/kasa/spectrum/update_norm/mean")] == [2, 4]
    for key in ("lora_diag", "singular_values"):
        events = acc.Histograms(f"train/kasa/spectrum/{key}")
        assert [e.step for e in events] == [2, 4]
        assert events[-1].histogram_value.num == N_LAYERS * 4


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pictures(kasa_run):
    import matplotlib.image

    _, out = kasa_run
    # Documented sizes at 100 dpi: 13 x 4.2 in and 13 x 5.2 in, whatever the number of layers.
    assert png_size(out / OVER_STEPS_PNG) == (1300, 420)
    assert png_size(out / FINAL_PNG) == (1300, 520)
    for name in (OVER_STEPS_PNG, FINAL_PNG):
        assert (out / name).stat().st_size > 10_000
        assert matplotlib.image.imread(out / name)[..., :3].std() > 0.05  # something was drawn


def synthetic_history(n_layers, r=4, steps=(0, 5, 10)):
    names = [f"model.layers.{i // 2}.{('q_proj', 'v_proj')[i % 2]}" for i in range(n_layers)]
    return [
        (
            step,
            {
                name: {
                    "lora_diag": [(j + 1) * (1 + step)] * r,
                    "singular_values": [float(j + k) for k in range(r)],
                    "orthogonality_A": 1.0 / (1 + step),
                    "orthogonality_B": 2.0,
                    "update_norm": float(j * step),
                }
                for j, name in enumerate(names)
            },
        )
        for step in steps
    ]


def test_picture_summaries_are_exact():
    stats = spectrum_plots.band_over_layers(np.array([[0.0, 1.0], [10.0, 1.0], [20.0, np.nan]]))
    np.testing.assert_allclose(stats["median"], [10.0, 1.0])
    np.testing.assert_allclose(stats["low"], [2.0, 1.0])  # 10th percentile, linear interpolation
    np.testing.assert_allclose(stats["high"], [18.0, 1.0])
    np.testing.assert_allclose(stats["min"], [0.0, 1.0])
    np.testing.assert_allclose(stats["max"], [20.0, 1.0])
    assert spectrum_plots.extreme_layers(["a", "b", "c"], np.array([1.0, np.nan, -2.0])) == (0, 2)
    assert spectrum_plots.short_names(["model.layers.0.q_proj", "model.layers.1.mlp.up"]) == [
        "0.q_proj",
        "1.mlp.up",
    ]
    assert spectrum_plots.short_names(["model.layers.0.q_proj"]) == ["model.layers.0.q_proj"]

    names, series = spectrum_plots.over_steps_series(synthetic_history(3))
    assert names == ["model.layers.0.q_proj", "model.layers.0.v_proj", "model.layers.1.q_proj"]
    np.testing.assert_allclose(series["mean_abs_sigma"][:, 2], [3.0, 18.0, 33.0])  # (steps, layers)
    np.testing.assert_allclose(series["update_norm"][-1], [0.0, 10.0, 20.0])
    _, matrix = spectrum_plots.final_matrix(
        {"a": {"singular_values": [1.0, 3.0]}, "b": {"singular_values": [2.0]}}
    )
    np.testing.assert_array_equal(matrix, [[3.0, 1.0], [2.0, np.nan]])  # sorted largest first, NaN-padded


@pytest.mark.parametrize("n_layers", [1, 14, 200])
def test_pictures_keep_their_size_at_any_depth(tmp_path, n_layers):
    """One layer, a small model, a deep one: the same two pictures (summaries, not one line per layer)."""
    assert spectrum_plots.save_spectrum_plots(synthetic_history(n_layers), tmp_path)
    assert png_size(tmp_path / OVER_STEPS_PNG) == (1300, 420)
    assert png_size(tmp_path / FINAL_PNG) == (1300, 520)


def test_plain_trainer_gets_the_file_only_and_a_warning(plain_run):
    trainer, out, messages = plain_run
    assert [r["step"] for r in read_records(out)] == [3, 4]  # 4: the end of training, not a logging step
    assert (out / OVER_STEPS_PNG).is_file() and (out / FINAL_PNG).is_file()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [3]
    assert not any(k.startswith("kasa/") for e in trainer.state.log_history for k in e)
    tags = tensorboard_events(out).Tags()
    assert "train/loss" in tags["scalars"]
    assert not [t for kind in ("scalars", "histograms") for t in tags[kind] if "kasa" in t]
    assert len(messages) == 1  # once per run
    assert "does not call kasa_trl.callbacks.log_spectra" in messages[0] and JSONL_NAME in messages[0]


def test_observes_only(kasa_run, tmp_path, tokenizer, dataset):
    trainer, _ = kasa_run
    baseline = train(tmp_path, tokenizer, dataset)
    with_cb, without = kasa_layers(trainer.model), kasa_layers(baseline.model)
    for name, layer in with_cb.items():
        for key, param in layer.adapter_params().items():
            assert torch.equal(param, without[name].adapter_params()[key]), f"{name}.{key}"
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (trainer, baseline)]
    assert losses[0] == losses[1]


def test_kasa_dpo_trainer_logs_spectra(tmp_path, tokenizer):
    trainer = KaSADPOTrainer(
        model=build_tiny_llama(len(tokenizer), seed=0),
        args=DPOConfig(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=4,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            max_length=64,
            disable_tqdm=True,
            gradient_checkpointing=False,
        ),
        train_dataset=load_tiny_dataset("dpo").select(range(8)),
        processing_class=tokenizer,
        kasa_config=KaSAConfig(r=4, target_modules=TARGETS),
        callbacks=[SpectrumCallback(plots=False)],
    )
    trainer.train()
    records = {r["step"]: r for r in read_records(tmp_path)}
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == sorted(records) == [1, 2]
    for entry in logged:
        assert "rewards/margins" in entry  # DPOTrainer's own metrics, merged by its log() after ours
        for key, value in summary(records[entry["step"]]).items():
            assert entry[key] == pytest.approx(value, rel=1e-12), key


@pytest.fixture
def model():
    model = apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=4, target_modules=TARGETS))
    randomize_adapters(model)
    return model


def run_events(callback, model, out, steps=(1,), log=None):
    """Drive the callback like a Trainer would, outside any Trainer; the trainer's own flow decides not to log
    at these steps. ``log(state, control)`` stands for the trainer's logging after each step."""
    args = types.SimpleNamespace(output_dir=str(out), report_to=[])
    state = TrainerState()
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    for step in steps:
        state.global_step = step
        control = callback.on_step_end(args, state, TrainerControl(should_log=False), model=model)
        if log is not None:
            log(state, control)
    return args, state


def fake_trainer(state, *callbacks):
    return types.SimpleNamespace(
        callback_handler=types.SimpleNamespace(callbacks=list(callbacks)), state=state
    )


def test_every_n_steps_asks_the_trainer_to_log(model, tmp_path):
    callback = SpectrumCallback(every_n_steps=2, plots=False)
    asked = []
    run_events(callback, model, tmp_path, steps=(1, 2, 3, 4), log=lambda s, c: asked.append(c.should_log))
    assert asked == [False, True, False, True]
    assert [r["step"] for r in read_records(tmp_path)] == [2, 4]


def test_wandb_per_layer_and_missing_matplotlib(model, tmp_path, monkeypatch):
    logged = []
    fake_wandb = types.SimpleNamespace(run=object(), log=logged.append, Histogram=lambda v: ("hist", len(v)))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any matplotlib import now fails
    callback = SpectrumCallback(every_n_steps=1, per_layer_scalars=True)
    wandb_callback = WandbCallback.__new__(
        WandbCallback
    )  # what the trainer holds when W&B is on (not set up)
    logs = {}

    def log(state, control):
        assert control.should_log
        logs.clear()
        log_spectra(fake_trainer(state, callback, wandb_callback), logs)

    args, state = run_events(callback, model, tmp_path, steps=(1, 2), log=log)
    assert [entry["train/global_step"] for entry in logged] == [1, 2]
    entry = logged[-1]
    assert entry["train/kasa/spectrum/lora_diag"] == ("hist", 4 * 4)
    name = "model.layers.1.self_attn.v_proj"
    assert f"train/kasa/spectrum/layers/{name}/singular_values" in entry  # per-layer histogram
    # The scalars go to W&B through logs (WandbCallback.on_log), per layer too.
    assert logs[f"kasa/spectrum/layers/{name}/update_norm"] == pytest.approx(
        float(by_hand(kasa_layers(model)[name])["update_norm"]), rel=1e-10
    )
    assert logs["kasa/spectrum/update_norm/max"] >= logs[f"kasa/spectrum/layers/{name}/update_norm"]
    with pytest.warns(UserWarning, match="matplotlib"):
        callback.on_train_end(args, state, TrainerControl(), model=model)
    assert not list(tmp_path.glob("*.png"))
    assert [r["step"] for r in read_records(tmp_path)] == [1, 2]


def test_a_record_is_merged_once_and_only_at_its_step(model, tmp_path):
    callback = SpectrumCallback(every_n_steps=1, plots=False)
    args, state = run_events(
        callback, model, tmp_path, steps=(1,)
    )  # a trainer that skipped its log() at step 1
    state.global_step = 2
    logs = {"loss": 1.0}
    log_spectra(fake_trainer(state, callback), logs)
    assert logs == {"loss": 1.0}  # the loggers would file step 1's record under step 2
    run_events(
        callback, model, tmp_path, steps=(3,), log=lambda s, c: log_spectra(fake_trainer(s, callback), logs)
    )
    assert logs["kasa/spectrum/update_norm/max"] > 0
    again = {}
    log_spectra(fake_trainer(state, callback), again)
    assert again == {}


def test_zero3_parameters_are_gathered_for_reading(model, tmp_path, monkeypatch):
    entered = []

    class GatheredParameters:  # records what DeepSpeed would gather
        def __init__(self, params, modifier_rank=-1):
            entered.append(([id(p) for p in params], modifier_rank))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class DeepSpeedEngine(
        torch.nn.Module
    ):  # accelerate's unwrapping looks for it when deepspeed is installed
        pass

    fake_deepspeed = types.ModuleType("deepspeed")
    fake_deepspeed.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
    fake_deepspeed.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    fake_deepspeed.DeepSpeedEngine = DeepSpeedEngine
    monkeypatch.setitem(sys.modules, "deepspeed", fake_deepspeed)
    layers = kasa_layers(model)
    for layer in layers.values():
        for param in layer.adapter_params().values():
            param.ds_id = 0
    callback = SpectrumCallback(plots=False)
    args = types.SimpleNamespace(output_dir=str(tmp_path), report_to=[])
    state = TrainerState(global_step=1)
    control = callback.on_step_end(args, state, TrainerControl(should_log=True), model=torch.nn.Linear(2, 2))
    assert (
        entered == [] and control.should_log
    )  # no KaSA layer: nothing recorded, the trainer's decision stands
    logs = {}
    log_spectra(fake_trainer(state, callback), logs)
    assert logs == {}
    wrapped = torch.nn.DataParallel(model)  # unwrapped by accelerate (layer names without "module.")
    callback.on_step_end(args, state, TrainerControl(should_log=True), model=wrapped)
    expected = [([id(p) for p in la.adapter_params().values()], None) for la in layers.values()]
    assert entered == expected  # one read-only gather per layer, in model order (the same on every rank)
    assert sorted(read_records(tmp_path)[-1]["layers"]) == sorted(layers)
    log_spectra(fake_trainer(state, callback), logs)
    assert logs["kasa/spectrum/update_norm/max"] > 0


def test_rejects_bad_every_n_steps():
    with pytest.raises(ValueError, match="every_n_steps"):
        SpectrumCallback(every_n_steps=0)
