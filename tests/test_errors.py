"""The catalogue of bad input, as a user hits it: every mistake gets an error that names the problem and the fix,
and leaves the model unchanged and no file half-written.

Many cases are also tested next to their module (test_config, test_model, test_adapter_io, test_cli...); this file
is the one place that lists them all from the user's side, one short case each. The numerical faults (non-finite
base weights or regularizer values, fp16/bf16 bases, badly conditioned weights) close the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback
from trl import DPOConfig, SFTConfig

from kasa_trl import (
    KaSAConfig,
    apply_kasa,
    kasa_layers,
    load_kasa_adapter,
    register_regularizer,
    save_kasa_adapter,
    unregister_regularizer,
)
from kasa_trl import cli as kasa_cli
from kasa_trl.adapter_io import ADAPTER_FILE
from kasa_trl.checkpoint import is_complete_checkpoint, last_complete_checkpoint
from kasa_trl.decomposition import minor_components
from kasa_trl.tiny import build_tiny_gpt2, build_tiny_llama, build_tokenizer, load_tiny_dataset

from .conftest import VOCAB
from .helpers import tiny_sft_config

F64 = torch.float64


def snapshot(path: Path) -> dict[str, str] | None:
    """Every file under ``path`` with a hash of its bytes (``None`` if ``path`` does not exist)."""
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(path.rglob("*"))
    }


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A KaSA adapter (r=2) trained on nothing, saved from the seed-0 tiny Llama."""
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    save_kasa_adapter(apply_kasa(build_tiny_llama(VOCAB, seed=0), KaSAConfig(r=2)), directory)
    return directory


# --- apply_kasa and KaSAConfig -------------------------------------------------------------------------------


class FakeQuantLinear(nn.Linear):
    """What a quantized base looks like to KaSA: a Linear holding an int8 weight."""

    def __init__(self) -> None:
        super().__init__(16, 16)
        self.weight = nn.Parameter(torch.zeros(16, 16, dtype=torch.int8), requires_grad=False)


def _quantized_model():
    model = build_tiny_llama(VOCAB)
    model.model.layers[0].self_attn.q_proj = FakeQuantLinear()
    return model


def _already_adapted():
    return apply_kasa(build_tiny_llama(VOCAB), KaSAConfig(r=2, target_modules=["q_proj"]))


APPLY_CASES = {
    # r is checked per layer against min(out, in), naming the layer and both fixes.
    "r-too-large-linear": (
        lambda: build_tiny_llama(VOCAB),
        dict(r=64),
        ValueError,
        r"r=64 must be < min\(in, out\)=64 for model\.layers\.0\.self_attn\.q_proj \(64x64\); lower r or "
        r"exclude 'q_proj' with exclude_modules",
    ),
    "r-too-large-conv1d": (
        lambda: build_tiny_gpt2(VOCAB),
        dict(r=64, target_modules=["c_attn"]),
        ValueError,
        r"r=64 must be < min\(in, out\)=64 for transformer\.h\.0\.attn\.c_attn \(192x64\)",
    ),
    "r-too-large-one-layer-only": (  # k_proj is 32x64 (2 kv heads): r=40 fits q_proj but not k_proj
        lambda: build_tiny_llama(VOCAB),
        dict(r=40, target_modules=["q_proj", "k_proj"]),
        ValueError,
        r"r=40 must be < min\(in, out\)=32 for model\.layers\.0\.self_attn\.k_proj",
    ),
    "targets-match-nothing": (
        lambda: build_tiny_llama(VOCAB),
        dict(target_modules=["query", "value"]),
        ValueError,
        r"target_modules=\['query', 'value'\] matched no module of LlamaForCausalLM; Linear/Conv1D module names "
        r"in this model: \[.*'q_proj'.*\]",
    ),
    "regex-matches-nothing": (
        lambda: build_tiny_llama(VOCAB),
        dict(target_modules=r".*\.attention\..*"),
        ValueError,
        "matched no module of LlamaForCausalLM",
    ),
    "target-is-an-embedding": (
        lambda: build_tiny_llama(VOCAB),
        dict(target_modules=["embed_tokens"]),
        TypeError,
        r"model\.embed_tokens is an Embedding, which KaSA cannot wrap: supported are nn\.Linear and transformers' "
        r"Conv1D\. Narrow target_modules or add it to exclude_modules",
    ),
    "target-is-quantized": (
        _quantized_model,
        dict(target_modules=["q_proj"]),
        TypeError,
        r"q_proj \(FakeQuantLinear\) holds a Parameter of dtype torch\.int8: quantized or packed weights are not "
        r"supported; load the base in fp32/bf16/fp16 or exclude this module",
    ),
    "already-carries-kasa": (
        _already_adapted,
        dict(r=2),
        ValueError,
        r"model already carries 2 KaSA layers \(e\.g\. model\.layers\.0\.self_attn\.q_proj\); call "
        r"kasa_trl\.unload\(model\) or merge_and_unload\(model\) before applying KaSA again",
    ),
}


@pytest.mark.parametrize("case", list(APPLY_CASES))
def test_apply_kasa_refuses_and_leaves_the_model_as_it_was(case):
    build, kwargs, error, message = APPLY_CASES[case]
    model = build()
    before, n_layers = state(model), len(kasa_layers(model))
    with pytest.raises(error, match=message):
        apply_kasa(model, KaSAConfig(**kwargs))
    assert_unchanged(model, before)
    assert len(kasa_layers(model)) == n_layers


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        (
            {"l2": 1e-4},
            ValueError,
            r"unknown regularizer 'l2'; registered: \[.*'singular_value_l2'.*\]\. Register your own with "
            r"@kasa_trl\.register_regularizer\(name\) before building the KaSAConfig",
        ),
        (
            {"orthogonality": -1e-3},
            ValueError,
            r"'orthogonality' must be finite and >= 0, got -0\.001; use 0",
        ),
        (
            {"orthogonality": math.nan},
            ValueError,
            r"must be finite and >= 0, got nan; use 0 \(or drop the entry\)",
        ),
        (
            {"singular_value_l2": math.inf},
            ValueError,
            r"'singular_value_l2' must be finite and >= 0, got inf",
        ),
        ({"orthogonality": "1e-3"}, TypeError, r"weight for 'orthogonality' must be a number, got '1e-3'"),
        (
            ["orthogonality"],
            TypeError,
            r"regularizers must be a mapping name -> weight, e\.g\. \{'singular_value_l2': 1e-4\}; got list",
        ),
    ],
    ids=["unknown-name", "negative", "nan", "inf", "string", "not-a-mapping"],
)
def test_bad_regularizer_weights(weights, error, message):
    with pytest.raises(error, match=message):
        KaSAConfig(regularizers=weights)


def test_regularizer_registered_twice_or_unregistered_twice():
    @register_regularizer("test_errors_twice")
    def first(lora_A, lora_B, lora_diag):
        return lora_diag.sum()

    try:
        with pytest.raises(
            ValueError,
            match=r"regularizer 'test_errors_twice' is already registered \(by tests\.test_errors\..*first\); pick "
            r"another name or call unregister_regularizer first",
        ):
            register_regularizer("test_errors_twice")(lambda a, b, d: d.sum())
        with pytest.raises(ValueError, match="regularizer 'orthogonality' is already registered"):
            register_regularizer("orthogonality")(first)
    finally:
        unregister_regularizer("test_errors_twice")
    with pytest.raises(KeyError, match=r"'test_errors_twice' is not registered; known: \["):
        unregister_regularizer("test_errors_twice")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"lora_rank": 4}, r"unknown KaSAConfig key\(s\) \['lora_rank'\]; known keys: \[.*'r'.*\]"),
        (
            {"kasa_config_version": 2},
            r"KaSA config version 2 is newer than this kasa_trl understands \(1\); upgrade kasa_trl to load it",
        ),
        ("{not json", r"kasa_config\.json is not valid JSON \(.*\); re-save the adapter"),
        ("[1, 2]", r"kasa_config\.json must hold a JSON object, got list"),
        ({"r": 0}, r"r must be a positive integer, got 0"),
    ],
    ids=["unknown-key", "future-version", "not-json", "not-an-object", "bad-value"],
)
def test_bad_config_json(tmp_path, content, message):
    path = tmp_path / "kasa_config.json"
    if isinstance(content, dict):
        content = json.dumps({**KaSAConfig(r=2).to_dict(), **content})
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        KaSAConfig.from_json(path)


# --- adapter files ---------------------------------------------------------------------------------------------


def _rewrite(directory: Path, edit) -> None:
    """Rewrite the adapter file with ``edit(tensors)`` applied (metadata kept): a damaged or foreign file."""
    path = directory / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _truncate(directory: Path) -> None:
    path = directory / ADAPTER_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


LAYER = "model.layers.1.mlp.up_proj"
ADAPTER_CASES = {
    "other-base-fingerprint": (
        lambda d: None,
        lambda: build_tiny_llama(VOCAB, seed=1),
        ValueError,
        r"the weight of model\.layers\.0\.mlp\.down_proj differs from the base this adapter was trained on "
        r"\(fingerprint mismatch\); load the adapter onto the same base checkpoint, unmodified",
    ),
    "other-architecture": (
        lambda d: None,
        lambda: build_tiny_gpt2(VOCAB),
        ValueError,
        r"targets model\.layers\.0\.mlp\.down_proj, which GPT2LMHeadModel does not have; load it onto the "
        r"base model it was trained on",
    ),
    "missing-tensor": (
        lambda d: _rewrite(d, lambda t: t.pop(f"{LAYER}.lora_B")),
        lambda: build_tiny_llama(VOCAB),
        ValueError,
        rf"missing tensors \['lora_B'\] for layer {re.escape(LAYER)}; the file is incomplete",
    ),
    "wrong-shape": (
        lambda d: _rewrite(d, lambda t: t.update({f"{LAYER}.lora_A": torch.zeros(3, 64)})),
        lambda: build_tiny_llama(VOCAB),
        ValueError,
        rf"adapter tensor {re.escape(LAYER)}\.lora_A has shape \(3, 64\) but {re.escape(LAYER)} \(128x64, r=2\) "
        r"needs \(2, 64\); the adapter belongs to another model",
    ),
    "truncated-on-disk": (
        _truncate,
        lambda: build_tiny_llama(VOCAB),
        ValueError,
        r"kasa_adapter\.safetensors is corrupt or truncated \(.*\); re-save the adapter or restore a copy",
    ),
    "no-adapter-file": (
        lambda d: (d / ADAPTER_FILE).unlink(),
        lambda: build_tiny_llama(VOCAB),
        FileNotFoundError,
        r"no KaSA adapter at .*: kasa_adapter\.safetensors is missing",
    ),
    "peft-adapter-directory": (
        lambda d: [(d / ADAPTER_FILE).unlink(), (d / "adapter_config.json").write_text("{}")],
        lambda: build_tiny_llama(VOCAB),
        FileNotFoundError,
        r"kasa_adapter\.safetensors is missing \(it holds a PEFT adapter: import a PEFT KaSA adapter with "
        r"kasa_trl\.integrations\.peft\.import_peft_kasa\)",
    ),
    "model-already-carries-kasa": (
        lambda d: None,
        lambda: apply_kasa(build_tiny_llama(VOCAB), KaSAConfig(r=2)),
        ValueError,
        r"model already carries KaSA layers; load the adapter onto a fresh base model",
    ),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_bad_adapter_is_refused_and_the_model_stays_untouched(saved_adapter, tmp_path, case):
    damage, build, error, message = ADAPTER_CASES[case]
    directory = tmp_path / "adapter"
    shutil.copytree(saved_adapter, directory)
    damage(directory)
    files = snapshot(directory)
    model = build()
    before, n_layers = state(model), len(kasa_layers(model))
    with pytest.raises(error, match=message):
        load_kasa_adapter(model, directory)
    assert_unchanged(model, before)
    assert len(kasa_layers(model)) == n_layers
    assert snapshot(directory) == files  # reading never writes


def test_saving_a_model_without_kasa_writes_nothing(tmp_path):
    with pytest.raises(
        ValueError, match=r"model carries no KaSA layers; nothing to save \(call apply_kasa first\)"
    ):
        save_kasa_adapter(build_tiny_llama(VOCAB), tmp_path / "adapter")
    assert snapshot(tmp_path / "adapter") is None


# --- trainers --------------------------------------------------------------------------------------------------


def _sft_args(output_dir: Path, **overrides) -> SFTConfig:
    return tiny_sft_config(
        output_dir, **{"max_steps": 3, "learning_rate": 1e-2, "lr_scheduler_type": "linear", **overrides}
    )


def _dpo_args(output_dir: Path, **overrides) -> DPOConfig:
    args = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", max_length=64, bf16=False)
    return DPOConfig(**{**args, **overrides})


def _kasa_trainer(tokenizer, args, **kwargs):
    from kasa_trl.trainer import KaSATrainer

    kwargs.setdefault("model", build_tiny_llama(len(tokenizer), seed=0))
    kwargs.setdefault("train_dataset", load_tiny_dataset("sft").select(range(8)))
    return KaSATrainer(args=args, processing_class=tokenizer, **kwargs)


def _dpo_trainer(tokenizer, args, **kwargs):
    from kasa_trl.dpo_trainer import KaSADPOTrainer

    kwargs.setdefault("train_dataset", load_tiny_dataset("dpo").select(range(8)))
    return KaSADPOTrainer(
        model=build_tiny_llama(len(tokenizer), seed=0), args=args, processing_class=tokenizer, **kwargs
    )


def _peft_lora():
    from peft import LoraConfig

    return LoraConfig(r=4)


TRAINER_CASES = {
    "peft-config-is-plain-lora": (
        lambda tok, out: _kasa_trainer(tok, _sft_args(out), peft_config=_peft_lora()),
        TypeError,
        r"peft_config must be a kasa_trl\.KaSAConfig \(or a peft\.LoraConfig with kasa_config set\), got LoraConfig "
        r"without kasa_config; pass kasa_config=KaSAConfig\(\.\.\.\) instead",
    ),
    "kasa-and-peft-config": (
        lambda tok, out: _kasa_trainer(
            tok, _sft_args(out), kasa_config=KaSAConfig(), peft_config=KaSAConfig()
        ),
        ValueError,
        r"pass either kasa_config or peft_config \(a KaSA config\), not both",
    ),
    "kasa-config-is-a-dict": (
        lambda tok, out: _kasa_trainer(tok, _sft_args(out), kasa_config={"r": 4}),
        TypeError,
        r"kasa_config must be a kasa_trl\.KaSAConfig, got dict",
    ),
    "model-adapted-with-another-config": (
        lambda tok, out: _kasa_trainer(
            tok,
            _sft_args(out),
            model=apply_kasa(build_tiny_llama(len(tok)), KaSAConfig(r=2)),
            kasa_config=KaSAConfig(r=4),
        ),
        ValueError,
        r"the model already carries KaSA layers with a different KaSAConfig; drop kasa_config or start from an "
        r"untouched base model",
    ),
    "dpo-train-set-missing-rejected": (
        lambda tok, out: _dpo_trainer(
            tok,
            _dpo_args(out),
            train_dataset=load_tiny_dataset("dpo").select(range(8)).remove_columns("rejected"),
        ),
        ValueError,
        r"train_dataset is missing the column\(s\) \['rejected'\] \(it has \['chosen', 'prompt'\]\)\. "
        r"KaSADPOTrainer expects TRL's preference format: 'prompt', 'chosen', 'rejected'",
    ),
    "dpo-eval-set-missing-columns": (
        lambda tok, out: _dpo_trainer(
            tok,
            _dpo_args(out),
            eval_dataset={"held_out": load_tiny_dataset("sft").select(range(4))},
        ),
        ValueError,
        r"eval_dataset\['held_out'\] is missing the column\(s\) \['chosen', 'rejected'\] \(it has \['messages'\]\)",
    ),
    "dpo-sync-ref-model": (
        lambda tok, out: _dpo_trainer(tok, _dpo_args(out, sync_ref_model=True)),
        ValueError,
        r"sync_ref_model=True is not supported by KaSADPOTrainer: the reference is the policy with its KaSA "
        r"adapters disabled .*; set sync_ref_model=False",
    ),
    "deepspeed-config-does-not-exist": (
        lambda tok, out: _kasa_trainer(tok, _sft_args(out, deepspeed=str(out.parent / "zero3.json"))),
        ValueError,
        r"Expected a string path to an existing deepspeed config, or a dictionary, or a base64 encoded string\. "
        r"Received: .*zero3\.json",
    ),
}


@pytest.fixture
def no_deepspeed_leak():
    """transformers registers a DeepSpeed config globally (weakref) BEFORE parsing it: a failed SFTConfig(deepspeed=...)
    leaves a half-built config that, while its traceback keeps it alive, breaks later from_pretrained calls
    (AttributeError: '_stage'). Unregister it after the test."""
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_refuses_bad_setup_before_writing_anything(tokenizer, tmp_path, no_deepspeed_leak, case):
    make, error, message = TRAINER_CASES[case]
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        make(tokenizer, out)
    # Absent, or empty where TRL's constructor ran (and created it) before the check.
    assert not snapshot(out), snapshot(out)


def test_deepspeed_config_that_is_not_json_is_named(tmp_path, monkeypatch, no_deepspeed_leak):
    from examples._common import KaSAScriptArguments, parse_args

    bad = tmp_path / "zero3.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}')  # trailing comma
    monkeypatch.setattr(
        "sys.argv", ["sft_llama.py", "--deepspeed", str(bad), "--output_dir", str(tmp_path / "o")]
    )
    with pytest.raises(ValueError) as info:
        parse_args(KaSAScriptArguments, SFTConfig, "sft", {})
    assert "zero3.json" in str(info.value) and "DeepSpeed" in str(info.value), str(info.value)
    assert snapshot(tmp_path / "o") is None


# --- the kasa-trl command line: exit code 2, one "kasa-trl: error:" line, outputs untouched ------------------------


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("other_base")
    build_tiny_llama(VOCAB, seed=1).save_pretrained(directory)
    return directory


CLI_CASES = {
    "adapter-dir-missing": (["inspect", "{tmp}/nowhere"], r"adapter directory .*nowhere does not exist"),
    "adapter-truncated": (["inspect", "{truncated}"], r"kasa_adapter\.safetensors is corrupt or truncated"),
    "out-dir-not-empty": (
        ["export-lora", "{adapter}", "{nonempty}"],
        r"output directory .*nonempty exists and is not empty; choose a new directory or pass --overwrite",
    ),
    "merge-onto-another-base": (
        ["merge", "{adapter}", "{tmp}/merged", "--base", "{other_base}"],
        r"fingerprint mismatch\); load the adapter onto the same base checkpoint",
    ),
    "merge-base-missing": (
        ["merge", "{adapter}", "{tmp}/merged", "--base", "{tmp}/no_base"],
        r"base model directory .*no_base does not exist",
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_exits_2_with_one_error_line(saved_adapter, other_base, tmp_path, capsys, case):
    argv, message = CLI_CASES[case]
    truncated = tmp_path / "truncated"
    shutil.copytree(saved_adapter, truncated)
    _truncate(truncated)
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "keep.txt").write_text("previous")
    paths = dict(tmp=tmp_path, adapter=saved_adapter, truncated=truncated, nonempty=tmp_path / "nonempty")
    before = snapshot(tmp_path)
    code = kasa_cli.main([a.format(**paths, other_base=other_base) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("kasa-trl: error: ")]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before  # nothing written, not even a temporary directory


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["merge", "a", "b", "--base", "m", "--dtype", "int8"], r"argument --dtype: invalid choice: 'int8'"),
        (["inspect", "a", "--top", "0"], r"argument --top: expected a positive integer, got '0'"),
    ],
    ids=["bad-dtype", "bad-top"],
)
def test_cli_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        kasa_cli.main(argv)
    assert info.value.code == 2
    assert re.search(rf"kasa-trl \S+: error: {message}", capsys.readouterr().err)


# --- numerical faults ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_base_weight_is_refused(bad):
    model = build_tiny_llama(VOCAB)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = bad
    before = state(model)
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.1\.mlp\.down_proj has non-finite \(NaN/Inf\) weights; KaSA cannot decompose it\. "
        r"Check the checkpoint or exclude the module",
    ):
        apply_kasa(model, KaSAConfig(r=2))
    assert not kasa_layers(model)
    for key, value in model.state_dict().items():  # NaN != NaN: compare with equal_nan
        assert torch.allclose(value, before[key], rtol=0, atol=0, equal_nan=True), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_bases_train_with_finite_losses(tokenizer, tmp_path, dtype):
    """A bf16/fp16 base (cast by the user, as from_pretrained(dtype=...) loads it) with the fp32 adapter KaSA
    gives it: AdamW for 4 steps on CPU (fp16 matmuls run on CPU in torch 2.13), every loss and grad norm finite."""
    trainer = _kasa_trainer(
        tokenizer,
        _sft_args(tmp_path, max_steps=4, optim="adamw_torch"),
        model=build_tiny_llama(len(tokenizer), seed=0).to(dtype),
        train_dataset=load_tiny_dataset("sft").select(range(16)),
        kasa_config=KaSAConfig(r=4),
    )
    layer = next(iter(kasa_layers(trainer.model).values()))
    assert layer.base_layer.weight.dtype == dtype and layer.lora_A.dtype == torch.float32
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for entry in logs:
        for key in ("loss", "grad_norm", "kasa/regularization"):
            assert math.isfinite(entry[key]), (key, entry)
    assert logs[-1]["loss"] < logs[0]["loss"]
    for layer in kasa_layers(trainer.model).values():
        assert all(torch.isfinite(p).all() for p in layer.adapter_params().values())


def _condition_1e6_weight(out_features: int, in_features: int, n: int) -> torch.Tensor:
    """Singular values from 1 down to 1e-6 (geometric), with a gap of sqrt(10) at the cut between kept and removed."""
    k = min(out_features, in_features)
    s = torch.empty(k, dtype=F64)
    s[: k - n] = torch.logspace(0, -5, k - n, dtype=F64)
    s[k - n :] = torch.logspace(-5.5, -6, n, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(out_features, k, generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(in_features, k, generator=gen, dtype=F64)).Q
    return (u * s) @ v.T


def test_decomposition_stays_accurate_at_condition_number_1e6():
    """||R - R_svd||_F / ||R_svd||_F with R_svd from a float64 SVD. Measured (128x352, n=16): auto 9e-10 on a
    float64 weight and 4e-8 (fp32 output rounding) on its float32 copy; plain gram_eigh 1e-6."""
    n = 16
    weight = _condition_1e6_weight(128, 352, n)
    errors = {}
    for dtype in (F64, torch.float32):
        w = weight.to(dtype)
        u, s, vh = torch.linalg.svd(w.to(F64), full_matrices=False)
        reference = (u[:, -n:] * s[-n:]) @ vh[-n:]
        for method in ("auto", "gram_eigh"):
            left, right = minor_components(w, n, method)
            error = torch.linalg.matrix_norm(
                left.to(F64) @ right.to(F64) - reference
            ) / torch.linalg.matrix_norm(reference)
            errors[str(dtype), method] = float(error)
    print("\ncond 1e6 relative error of R:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert errors["torch.float64", "auto"] < 1e-8
    assert errors["torch.float32", "auto"] < 1e-6
    assert errors["torch.float64", "gram_eigh"] > 10 * errors["torch.float64", "auto"]  # what deflation buys


class _DivergeAt(TrainerCallback):
    """Sets one learned singular value to +inf right after optimizer step ``step``: a diverged update."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(iter(kasa_layers(model).values())).lora_diag[0] = math.inf


NON_FINITE_MESSAGE = (
    r"KaSA regularizer value is not finite \(model\.layers\.0\.self_attn\.q_proj: singular_value_l2=inf\); "
    r"training stopped before the adapter is corrupted\. .*lower the learning rate"
)


def test_non_finite_regularizer_stops_training_before_anything_is_saved(tokenizer, tmp_path):
    trainer = _kasa_trainer(tokenizer, _sft_args(tmp_path / "out", save_strategy="steps", save_steps=1))
    with torch.no_grad():
        next(iter(kasa_layers(trainer.model).values())).lora_diag[0] = math.inf
    with pytest.raises(FloatingPointError, match=NON_FINITE_MESSAGE):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_divergence_mid_run_stops_and_the_last_complete_checkpoint_is_finite(tokenizer, tmp_path):
    """The update of step 2 diverges: step 3's forward stops training with the message. checkpoint-2, saved right
    after step 2, holds the non-finite factor; ``last_complete_checkpoint`` skips it (see the xfail below)."""
    out = tmp_path / "out"
    trainer = _kasa_trainer(
        tokenizer, _sft_args(out, max_steps=4, save_strategy="steps", save_steps=1), callbacks=[_DivergeAt(2)]
    )
    # Today the next forward stops it (NON_FINITE_MESSAGE); once save_model refuses non-finite factors (xfail
    # below), the save of checkpoint-2 does.
    with pytest.raises(FloatingPointError, match=r"KaSA .*(not finite|non-finite).*lower the learning rate"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert last_complete_checkpoint(out) == str(out / "checkpoint-1")
    assert not is_complete_checkpoint(out / "checkpoint-2")


def test_no_checkpoint_with_non_finite_adapter_is_written(tokenizer, tmp_path):
    out = tmp_path / "out"
    trainer = _kasa_trainer(
        tokenizer, _sft_args(out, max_steps=4, save_strategy="steps", save_steps=1), callbacks=[_DivergeAt(2)]
    )
    with pytest.raises(FloatingPointError, match=r"not finite|non-finite"):
        trainer.train()
    written = sorted(out.glob("checkpoint-*/" + ADAPTER_FILE))
    for path in written:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                assert torch.isfinite(f.get_tensor(key)).all(), f"{path.parent.name}: {key}"
