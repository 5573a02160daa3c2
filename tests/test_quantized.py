"""KaSA on bitsandbytes 4-bit and 8-bit bases (kasa_trl.quantized, kasa_trl.quantized_training).

The base is the tiny Llama saved with ``save_pretrained`` and loaded as users load a quantized model:
``from_pretrained(dir, quantization_config=BitsAndBytesConfig(...), device_map="cpu")``. Loaded models are put
in train mode: bitsandbytes' CPU kernel for eval-mode forwards without gradients (on CPUs with AVX512-BF16)
computes in bfloat16 and repacks the 4-bit weight, while the training path computes ``x @ dequant(W)^T`` in the
compute dtype. The tiny Llama has no dropout, so train mode computes what eval mode would.
"""

import copy
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip(
    "bitsandbytes",
    minversion="0.50",
    reason="bitsandbytes >= 0.50 runs 4-bit/8-bit layers on CPU: pip install 'kasa_trl[quantization]'",
)

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402
from trl import DPOConfig  # noqa: E402

from kasa_trl import (  # noqa: E402
    KaSAConfig,
    KaSALinear,
    apply_kasa,
    kasa_layers,
    load_kasa_adapter,
    merge_and_unload,
    save_kasa_adapter,
    unload,
)
from kasa_trl import cli as kasa_cli  # noqa: E402
from kasa_trl.adapter_io import read_adapter_info  # noqa: E402
from kasa_trl.dpo_trainer import KaSADPOTrainer  # noqa: E402
from kasa_trl.quantized import (  # noqa: E402
    cpu_packed_4bit_weight,
    dequantized_weight,
    is_quantized_layer,
    quantization_kind,
)
from kasa_trl.quantized_training import check_quantized_training  # noqa: E402
from kasa_trl.tiny import build_tiny_llama, build_tokenizer, load_tiny_dataset  # noqa: E402
from kasa_trl.trainer import KaSATrainer  # noqa: E402

from .conftest import randomize_adapters  # noqa: E402
from .distributed import processes  # noqa: E402
from .helpers import tiny_sft_config  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

QUANTIZATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-double-quant": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "nf4-bf16-compute": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "int8": dict(load_in_8bit=True),
}
R = 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("quantized") / "base"
    build_tiny_llama(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load(base_dir, quantization="nf4"):
    """A fresh copy of the base, quantized as ``QUANTIZATIONS[quantization]`` (None: full precision)."""
    if quantization is None:
        return AutoModelForCausalLM.from_pretrained(base_dir).train()
    config = BitsAndBytesConfig(**QUANTIZATIONS[quantization])
    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=config, device_map="cpu"
    ).train()


def quantized_bytes(model):
    """Every quantized layer's stored bytes and quantization statistics, cloned."""
    state = {}
    for name, module in model.named_modules():
        if is_quantized_layer(module):
            name = name.removesuffix(".base_layer")
            weight = module.weight
            if hasattr(weight, "quant_state"):
                stats = weight.quant_state.absmax
            else:  # the int8 row scales move to the layer's state at its first forward
                stats = weight.SCB if weight.SCB is not None else module.state.SCB
            state[name] = (weight.data.clone(), stats.clone())
    return state


def assert_same_bytes(before, after):
    assert before.keys() == after.keys() and before
    for name, (data, stats) in before.items():
        assert torch.equal(data, after[name][0]) and torch.equal(stats, after[name][1]), name


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def removed_reference(weight, n):
    """The ``n`` smallest singular triplets of ``weight`` (out, in) from a float64 SVD: ``R`` (out, in)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, -n:] * s[-n:]) @ vh[-n:]


# --- the layer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
def test_layer_output_against_float64_svd_of_the_dequantized_weight(base_dir, quantization):
    model = apply_kasa(load(base_dir, quantization), KaSAConfig(r=R))
    assert model.kasa_config.base_mode == "non_destructive"  # "auto" on a quantized base
    randomize_adapters(model, seed=1)
    gen = torch.Generator().manual_seed(0)
    layers = kasa_layers(model)
    assert len(layers) == 14 and all(is_quantized_layer(layer.base_layer) for layer in layers.values())
    for name, layer in layers.items():
        weight = dequantized_weight(layer.base_layer).double()  # (out, in): what the layer computes with
        removed = removed_reference(weight, R)
        scale = float(torch.linalg.matrix_norm(weight))
        assert float(torch.linalg.matrix_norm(layer.removed_weight().double() - removed)) < 1e-6 * scale, name
        x = torch.randn(5, layer.in_features, generator=gen)
        with torch.no_grad():
            out, base_out = layer(x).double(), layer.base_layer(x).double()
        delta = layer.delta_weight().detach().double()
        # base_q(x) - R x + dW x: the correction KaSA adds to whatever the quantized layer computes, to fp32 rounding.
        correction = x.double() @ (delta - removed).T
        torch.testing.assert_close(
            out - base_out, correction, rtol=1e-5, atol=1e-5 * float(correction.abs().max())
        )
        if QUANTIZATIONS[quantization].get("bnb_4bit_compute_dtype") == torch.bfloat16:
            continue  # base_q(x) itself is computed in bfloat16
        # ... and the whole output is (dequant(W) - R + dW) x to fp32 rounding.
        expected = x.double() @ (weight - removed + delta).T
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_truncation_is_really_applied_on_a_4bit_base(base_dir):
    """PEFT 0.21's LoraConfig(kasa_config=...) on a 4-bit base silently trains plain LoRA (no truncation, no
    lora_diag). Here the effective weight dequant(W) - R (dW = 0 at step 0) has lost its r smallest singular
    values, which the dequantized weight has."""
    model = apply_kasa(load(base_dir, "nf4"), KaSAConfig(r=R))
    for name, layer in kasa_layers(model).items():
        weight = dequantized_weight(layer.base_layer).double()
        before = torch.linalg.svdvals(weight)
        after = torch.linalg.svdvals(layer.effective_weight())
        assert float(before[-R]) > 1e-2 * float(before[0]), name  # something to remove, or the test is void
        assert float(after[-R:].max()) < 1e-6 * float(before[0]), name
        torch.testing.assert_close(after[:-R], before[:-R], rtol=1e-6, atol=1e-6 * float(before[0]))
        assert isinstance(layer.lora_diag, torch.nn.Parameter) and layer.lora_diag.requires_grad


def test_in_place_is_refused_on_a_quantized_base_and_nothing_changes(base_dir):
    model = load(base_dir, "nf4")
    before = quantized_bytes(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError, match=r"quantized layer \(bitsandbytes 4-bit nf4\): base_mode='in_place' would"
    ):
        apply_kasa(model, KaSAConfig(r=R, base_mode="in_place"))
    assert not kasa_layers(model) and not hasattr(model, "kasa_config")
    assert_same_bytes(before, quantized_bytes(model))
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    layer = model.model.layers[0].self_attn.q_proj
    left, right = torch.zeros(64, R), torch.zeros(R, 64)
    with pytest.raises(ValueError, match="base_mode='non_destructive'"):
        KaSALinear(layer, left, right, r=R, lora_alpha=8, base_mode="in_place")


def test_merge_refused_on_a_quantized_base_and_merged_after_dequantize(base_dir, input_ids):
    model = apply_kasa(load(base_dir, "nf4"), KaSAConfig(r=R))
    randomize_adapters(model, seed=2)
    expected = logits(model, input_ids)
    before = quantized_bytes(model)
    with pytest.raises(
        ValueError, match=r"is quantized \(bitsandbytes 4-bit nf4\), so merge cannot write it"
    ):
        merge_and_unload(model)
    assert len(kasa_layers(model)) == 14 and not any(layer.merged for layer in kasa_layers(model).values())
    assert_same_bytes(before, quantized_bytes(model))
    # model.dequantize() replaces the bitsandbytes layers, also inside the KaSA layers, by nn.Linear holding the
    # dequantized weights: the same function, which merges into a full-precision model.
    model = model.dequantize()
    assert not any(is_quantized_layer(m) for m in model.modules())
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)
    merged = merge_and_unload(model)
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=1e-4, atol=1e-4)


def test_unload_leaves_the_quantized_base_untouched(base_dir, input_ids):
    model = load(base_dir, "nf4")
    expected, before = logits(model, input_ids), quantized_bytes(model)
    unload(apply_kasa(model, KaSAConfig(r=R)))
    assert_same_bytes(before, quantized_bytes(model))
    assert torch.equal(logits(model, input_ids), expected)


def test_a_4bit_weight_repacked_by_an_eval_forward_is_read_and_still_matches_its_adapter(
    base_dir, tmp_path, input_ids
):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU kernel at the first eval-mode
    forward without gradients (block scales rounded to bfloat16). KaSA reads it back through bitsandbytes' inverse
    of that packing, and an adapter saved before the repacking still loads (its fingerprint moves by the bf16
    rounding of the scales, far within the tolerance)."""
    model = apply_kasa(load(base_dir, "nf4"), KaSAConfig(r=R))
    save_kasa_adapter(model, tmp_path / "adapter")
    base = load(base_dir, "nf4").eval()
    unpacked = {n: dequantized_weight(m) for n, m in base.named_modules() if is_quantized_layer(m)}
    logits(base, input_ids)
    layer = base.model.layers[0].mlp.down_proj
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack the 4-bit weights here (no AVX512-BF16 CPU)")
    state = (layer.weight.data.clone(), layer.weight.quant_state.absmax.clone())
    for name, module in base.named_modules():
        if is_quantized_layer(module):
            torch.testing.assert_close(dequantized_weight(module), unpacked[name], rtol=1e-2, atol=1e-2)
    assert torch.equal(layer.weight.data, state[0]) and torch.equal(layer.weight.quant_state.absmax, state[1])
    loaded = load_kasa_adapter(base, tmp_path / "adapter")
    kasa = kasa_layers(loaded)["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, kasa.in_features)
    with torch.no_grad():
        correction = kasa(x) - kasa.base_layer(x)
    expected = x.double() @ (kasa.delta_weight().detach().double() - kasa.removed_weight().double()).T
    torch.testing.assert_close(correction.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("quant_type", "double"), [("nf4", False), ("fp4", True)])
def test_cpu_packed_4bit_weight_reads_bitsandbytes_cpu_layout(quant_type, double):
    """What bitsandbytes' CPU eval path does to a 4-bit weight, done here directly (on any CPU): the weight read
    back is the one quantized before, with its block scales rounded to bfloat16."""
    import bitsandbytes as bnb

    pack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if pack is None:
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU repacking")
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    data, state = bnb.functional.quantize_4bit(weight, quant_type=quant_type, compress_statistics=double)
    before = bnb.functional.dequantize_4bit(data, state)
    scales = (
        bnb.functional.dequantize_4bit(torch.full_like(data, 0x11), state) / state.code[1]
    )  # absmax per entry
    packed, packed_state = pack(data.clone(), copy.deepcopy(state))
    after = cpu_packed_4bit_weight(packed, packed_state)
    assert after.shape == (96, 128) and after.dtype == torch.float32
    expected = before / scales * scales.to(torch.bfloat16).float()  # code[q] * bf16(absmax)
    torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-7)


# --- adapter files -------------------------------------------------------------------------------------------


def test_save_then_load_onto_a_fresh_4bit_base_gives_bit_identical_logits(base_dir, tmp_path, input_ids):
    model = apply_kasa(load(base_dir, "fp4-double-quant"), KaSAConfig(r=R))
    randomize_adapters(model, seed=3)
    save_kasa_adapter(model, tmp_path / "adapter")
    record = read_adapter_info(tmp_path / "adapter").base_quantization
    assert set(record["layers"].values()) == {"bitsandbytes 4-bit fp4, double quantization"}
    assert BitsAndBytesConfig.from_dict(record["config"]).bnb_4bit_use_double_quant is True
    fresh = load_kasa_adapter(load(base_dir, "fp4-double-quant"), tmp_path / "adapter")
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))


def test_a_4bit_adapter_is_refused_on_the_full_precision_base_and_back(base_dir, tmp_path):
    """4-bit quantization moves a weight by about 0.1 of its RMS, five times the base check's tolerance: the
    removed directions of dequant(W) are not the smallest of W. Refused both ways, naming both precisions."""
    quantized = apply_kasa(load(base_dir, "nf4"), KaSAConfig(r=R))
    save_kasa_adapter(quantized, tmp_path / "q_adapter")
    full = load(base_dir, None)
    weights = {n: p.detach().clone() for n, p in full.named_parameters()}
    with pytest.raises(
        ValueError, match=r"trained on bitsandbytes 4-bit nf4 for .* and it is full precision here"
    ) as error:
        load_kasa_adapter(full, tmp_path / "q_adapter")
    assert "kasa-trl merge" in str(error.value)
    assert not kasa_layers(full)
    assert all(torch.equal(p, weights[n]) for n, p in full.named_parameters())
    save_kasa_adapter(apply_kasa(load(base_dir, None), KaSAConfig(r=R)), tmp_path / "fp_adapter")
    base = load(base_dir, "nf4")
    before = quantized_bytes(base)
    with pytest.raises(
        ValueError, match=r"trained on a full-precision weight for .* bitsandbytes 4-bit nf4 here"
    ):
        load_kasa_adapter(base, tmp_path / "fp_adapter")
    assert not kasa_layers(base)
    assert_same_bytes(before, quantized_bytes(base))


def test_a_4bit_adapter_loads_onto_the_dequantized_base(base_dir, tmp_path, input_ids):
    model = apply_kasa(load(base_dir, "nf4"), KaSAConfig(r=R))
    randomize_adapters(model, seed=4)
    save_kasa_adapter(model, tmp_path / "adapter")
    dequantized = load_kasa_adapter(load(base_dir, "nf4").dequantize(), tmp_path / "adapter")
    torch.testing.assert_close(logits(dequantized, input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)


def test_an_8bit_adapter_loads_onto_the_full_precision_base(base_dir, tmp_path):
    """int8 with one scale per row moves these weights by under 0.01 of their RMS, within the base check's
    tolerance (0.02): the full-precision base passes as the same base, as a bf16 copy of it does."""
    save_kasa_adapter(apply_kasa(load(base_dir, "int8"), KaSAConfig(r=R)), tmp_path / "adapter")
    model = load_kasa_adapter(load(base_dir, None), tmp_path / "adapter")
    assert len(kasa_layers(model)) == 14


def test_export_lora_reproduces_the_logits_on_the_same_4bit_base(base_dir, tmp_path, input_ids):
    peft = pytest.importorskip("peft")
    from kasa_trl.integrations.peft import export_lora

    model = apply_kasa(load(base_dir, "nf4"), KaSAConfig(r=R))
    randomize_adapters(model, seed=5)
    save_kasa_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    # The base is checked against the adapter loaded quantized as the adapter records.
    export_lora(tmp_path / "adapter", tmp_path / "lora")
    served = peft.PeftModel.from_pretrained(load(base_dir, "nf4"), tmp_path / "lora").train()
    torch.testing.assert_close(logits(served, input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)


def test_cli_merge_dequantizes_and_writes_a_full_precision_model(base_dir, tmp_path, input_ids, capsys):
    model = apply_kasa(load(base_dir, "nf4"), KaSAConfig(r=R))
    randomize_adapters(model, seed=6)
    save_kasa_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    assert kasa_cli.main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    assert "dequantized the bitsandbytes 4-bit nf4 base" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").train()
    assert getattr(merged.config, "quantization_config", None) is None
    assert not any(is_quantized_layer(m) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), logits(model, input_ids), rtol=1e-4, atol=1e-4)


# --- trainers ------------------------------------------------------------------------------------------------


def sft_args(tmp_path, **overrides):
    return tiny_sft_config(tmp_path, **{"activation_checkpointing": False, **overrides})


@pytest.mark.parametrize(
    ("quantization", "checkpointing"),
    [("fp4-double-quant", {"use_reentrant": True}), ("nf4", {"use_reentrant": False}), ("int8", None)],
)
def test_training_moves_the_adapter_and_keeps_the_quantized_bytes(
    base_dir, tmp_path, tokenizer, quantization, checkpointing
):
    model = load(base_dir, quantization)
    before = quantized_bytes(model)
    args = sft_args(
        tmp_path,
        activation_checkpointing=checkpointing is not None,
        activation_checkpointing_kwargs=checkpointing,
    )
    trainer = KaSATrainer(
        model=model,
        args=args,
        train_dataset=load_tiny_dataset("sft").select(range(16)),
        processing_class=tokenizer,
        kasa_config=KaSAConfig(r=R),
    )
    assert "_hf_peft_config_loaded" not in vars(model)  # set during the TRL constructor only
    layers = kasa_layers(model)
    # TRL casts a quantized model's trainable parameters to bf16; KaSA's adapter keeps float32.
    assert {p.dtype for layer in layers.values() for p in layer.adapter_params().values()} == {torch.float32}
    initial = {name: layer.lora_B.detach().clone() for name, layer in layers.items()}
    trainer.train()  # GradientReachesAdapters stops it if checkpointing cut the adapters off
    assert all(not torch.equal(initial[name], layer.lora_B) for name, layer in layers.items())
    assert_same_bytes(before, quantized_bytes(model))
    trainer.save_model()
    assert read_adapter_info(tmp_path).base_quantization["layers"]["model.layers.0.mlp.up_proj"] == (
        quantization_kind(layers["model.layers.0.mlp.up_proj"].base_layer)
    )


def test_dpo_first_step_loss_is_ln2_on_a_4bit_base(base_dir, tmp_path, tokenizer):
    model = load(base_dir, "nf4")
    trainer = KaSADPOTrainer(
        model=model,
        args=DPOConfig(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=4,
            learning_rate=0.05,
            optim="sgd",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=0,
            max_length=64,
            disable_tqdm=True,
            activation_checkpointing=False,
            bf16=False,
        ),
        train_dataset=load_tiny_dataset("dpo").select(range(8)),
        processing_class=tokenizer,
        kasa_config=KaSAConfig(r=R),
    )
    trainer.train()
    first = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert first["loss"] - first["kasa/regularization"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_sft_trainer_refuses_a_quantized_model_given_by_name(base_dir, tmp_path, tokenizer):
    with pytest.raises(ValueError, match="load it first and pass the model"):
        KaSATrainer(
            model=str(base_dir),
            args=sft_args(tmp_path),
            train_dataset=load_tiny_dataset("sft").select(range(4)),
            processing_class=tokenizer,
            quantization_config=BitsAndBytesConfig(**QUANTIZATIONS["nf4"]),
        )


def test_a_full_precision_in_place_adapter_loads_onto_an_8bit_base(base_dir, tmp_path, input_ids):
    """Both base modes compute W - R + dW: on a quantized base the adapter loads non_destructive."""
    model = apply_kasa(load(base_dir, None), KaSAConfig(r=R))
    assert model.kasa_config.base_mode == "in_place"
    save_kasa_adapter(model, tmp_path / "adapter")
    base = load(base_dir, "int8")
    before = quantized_bytes(base)
    loaded = load_kasa_adapter(base, tmp_path / "adapter")
    assert loaded.kasa_config.base_mode == "non_destructive"
    logits(loaded, input_ids)
    assert_same_bytes(before, quantized_bytes(loaded))


def test_zero3_and_fsdp_are_refused_with_a_quantized_base(base_dir):
    model = load(base_dir, "nf4")
    zero = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3), fsdp=None)
    with pytest.raises(
        ValueError, match=r"ZeRO-3 cannot train on a quantized .* one process, DDP .* ZeRO-1/2"
    ):
        check_quantized_training(model, zero)
    with pytest.raises(ValueError, match="FSDP cannot train KaSA on a quantized"):
        check_quantized_training(model, SimpleNamespace(deepspeed_plugin=None, fsdp="full_shard"))
    check_quantized_training(
        model, SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2), fsdp=None)
    )
    check_quantized_training(load(base_dir, None), zero)  # a full-precision base trains under ZeRO-3
    assert not kasa_layers(model)


# --- examples ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "flag", "kind"),
    [
        ("sft_llama.py", "--load_in_4bit", "bitsandbytes 4-bit nf4, double quantization"),
        ("dpo_llama.py", "--load_in_8bit", "bitsandbytes 8-bit (LLM.int8)"),
    ],
)
def test_examples_train_on_the_quantized_embedded_model(tmp_path, script, flag, kind):
    out = tmp_path / "run"
    command = [sys.executable, str(EXAMPLES / script), flag, "--max_steps", "2", "--output_dir", str(out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = processes.run([*command, "--disable_tqdm"], cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"KaSA adapter saved to {out}" in proc.stdout
    info = read_adapter_info(out)
    assert set(info.base_quantization["layers"].values()) == {kind}
    assert info.config.base_mode == "non_destructive"
