"""kasa_trl.integrations.peft: exact export to vanilla LoRA, PEFT KaSA adapters in and out.

Every comparison loads the exported adapter with PEFT itself on a fresh, ORIGINAL base and compares logits in
fp32; the measured max abs differences are printed (``pytest -s``) and quoted in the assertion messages.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
if not hasattr(peft, "KasaConfig"):
    pytest.skip("needs peft >= 0.21 (KasaConfig)", allow_module_level=True)

from kasa_trl import KaSAConfig, apply_kasa, save_kasa_adapter  # noqa: E402
from kasa_trl.atomic_outputs import MANIFEST  # noqa: E402
from kasa_trl.integrations.peft import export_lora, export_peft_kasa, import_peft_kasa  # noqa: E402
from kasa_trl.integrations.peft import lora_export as lora_export_module  # noqa: E402
from kasa_trl.tiny import build_tiny_gpt2, build_tiny_llama  # noqa: E402

from .conftest import VOCAB, randomize_adapters  # noqa: E402

TOL = 1e-5  # fp32 max abs logit difference
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUILDERS = {"llama": build_tiny_llama, "gpt2": build_tiny_gpt2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: a second OpenMP thread only adds synchronisation, 10-50x slower on a shared 2-core CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _kasa_model(arch, **config):
    config = {"r": 4, "lora_alpha": 8, "decomposition_method": "svd", **config}
    model = apply_kasa(BUILDERS[arch](VOCAB).eval(), KaSAConfig(**config))
    randomize_adapters(model, seed=1)
    return model


def _max_abs_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
@pytest.mark.parametrize("pad_to_rank", [None, 16])
def test_exported_lora_on_original_base_matches_kasa(arch, base_mode, pad_to_rank, input_ids, tmp_path):
    model = _kasa_model(arch, base_mode=base_mode, use_rslora=arch == "gpt2")
    expected = _logits(model, input_ids)
    # Export from the live model without padding, from the saved adapter directory with padding: both paths.
    source = model
    if pad_to_rank is not None:
        source = save_kasa_adapter(model, tmp_path / "kasa")
    out = export_lora(source, tmp_path / "lora", pad_to_rank=pad_to_rank)

    config = json.loads((out / "adapter_config.json").read_text())
    rank = pad_to_rank or 2 * 4
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == (
        "LORA",
        rank,
        rank,
        False,
    )
    assert config["fan_in_fan_out"] is (arch == "gpt2" and source is model)  # a directory alone cannot tell
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(
        key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
        for key in tensors
    )
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {rank}

    original = BUILDERS[arch](VOCAB).eval()
    base_logits = _logits(original, input_ids)
    served = peft.PeftModel.from_pretrained(original, out).eval()
    assert served.peft_config["default"].fan_in_fan_out is (arch == "gpt2")  # PEFT corrects it for Conv1D
    got = _logits(served, input_ids)
    diff = _max_abs_diff(got, expected)
    print(f"\nexport_lora {arch} {base_mode} pad={pad_to_rank}: max abs diff {diff:.3g}")
    assert diff <= TOL, f"PEFT LoRA vs KaSA logits: max abs diff {diff:.3g} > {TOL}"
    assert _max_abs_diff(base_logits, expected) > 1e-3, (
        "the adapter must change the outputs for the test to mean anything"
    )


def test_export_lora_from_directory_equals_from_model_and_checks_the_base(tmp_path):
    model = _kasa_model("gpt2", r=3)
    save_kasa_adapter(model, tmp_path / "kasa")
    BUILDERS["gpt2"](VOCAB).save_pretrained(tmp_path / "base")
    from_model = export_lora(model, tmp_path / "a", pad_to_rank="vllm")
    from_dir = export_lora(
        tmp_path / "kasa", tmp_path / "b", pad_to_rank="vllm", base_model_name_or_path=str(tmp_path / "base")
    )
    a, b = (
        load_file(from_model / "adapter_model.safetensors"),
        load_file(from_dir / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((from_dir / "adapter_config.json").read_text())
    # r + n = 6 padded to vLLM's 8; the local base told us the targets are Conv1D.
    assert config["r"] == 8 and config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    lora_a = next(t for k, t in b.items() if k.endswith("lora_A.weight"))
    assert torch.count_nonzero(lora_a[6:]) == 0

    BUILDERS["llama"](VOCAB).save_pretrained(tmp_path / "llama_base")
    with pytest.raises(ValueError, match="does not have"):
        export_lora(tmp_path / "kasa", tmp_path / "c", base_model_name_or_path=str(tmp_path / "llama_base"))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("export", [export_lora, export_peft_kasa])
def test_exports_default_to_the_recorded_base_and_check_a_forced_one(export, tmp_path):
    from transformers import AutoModelForCausalLM

    build_tiny_llama(VOCAB, seed=0).save_pretrained(tmp_path / "base")
    build_tiny_llama(VOCAB, seed=1).save_pretrained(tmp_path / "other")
    model = apply_kasa(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), KaSAConfig(r=2, lora_alpha=4))
    adapter = save_kasa_adapter(model, tmp_path / "adapter")  # records tmp_path / "base"
    out = export(adapter, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base"
    )
    other = str(tmp_path / "other")
    with pytest.raises(ValueError, match=r"trained on base model '.*base', not '.*other'; .*force_base=True"):
        export(adapter, tmp_path / "x", base_model_name_or_path=other)
    # Forced, the other base is still loaded and checked: same architecture, other weights.
    with pytest.raises(ValueError, match=r"does not fit base model .*other: .*fingerprint mismatch"):
        export(adapter, tmp_path / "x", base_model_name_or_path=other, force_base=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "other", "out"]


def test_export_lora_rank_padding_rules():
    assert lora_export_module.padded_rank(6, None, r=3) == 6
    assert lora_export_module.padded_rank(6, "vllm", r=3) == 8
    assert lora_export_module.padded_rank(300, "vllm", r=150) == 320
    with pytest.raises(ValueError, match="exceeds vLLM"):
        lora_export_module.padded_rank(600, "vllm", r=300)
    with pytest.raises(ValueError, match="below the exported rank 8"):
        lora_export_module.padded_rank(8, 6, r=4)


def test_exports_are_atomic_and_never_overwrite_by_accident(tmp_path, monkeypatch):
    model = _kasa_model("llama", target_modules=["q_proj"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("previous")
    for overwrite in (False, True):
        with pytest.raises(
            FileExistsError, match="not empty" if not overwrite else "not written by kasa_trl"
        ):
            export_lora(model, foreign, overwrite=overwrite)
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]

    out = export_lora(model, tmp_path / "out")  # an earlier kasa_trl output: overwrite may replace it
    previous = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("kasa_trl.integrations.peft._peft_format.save_file", failing_save)
    for export in (export_lora, export_peft_kasa):
        with pytest.raises(OSError, match="disk full"):
            export(model, tmp_path / "new")
        with pytest.raises(OSError, match="disk full"):
            export(model, out, overwrite=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out"]  # no temporary directory left
        assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    monkeypatch.undo()
    export_peft_kasa(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        MANIFEST,
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert "kasa_config" in json.loads((out / "adapter_config.json").read_text())


def _peft_kasa_model(beta=0.5, gamma=0.25):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        kasa_config=peft.KasaConfig(beta=beta, gamma=gamma),
    )
    model = peft.get_peft_model(build_tiny_llama(VOCAB).eval(), config).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


@pytest.mark.parametrize("from_directory", [True, False])
def test_imported_peft_kasa_adapter_matches_peft(from_directory, input_ids, tmp_path):
    peft_model = _peft_kasa_model()
    expected = _logits(peft_model, input_ids)
    source = peft_model
    if from_directory:
        peft_model.save_pretrained(tmp_path / "peft_kasa")
        source = tmp_path / "peft_kasa"
    model = import_peft_kasa(build_tiny_llama(VOCAB).eval(), source)
    config = model.kasa_config
    assert (config.r, config.lora_alpha, config.use_rslora, config.truncation) == (4, 16, True, "paper")
    assert config.regularizers == {"singular_value_l2": 0.5, "orthogonality": 0.25}
    assert len(config.target_modules) == 6  # exactly the adapted modules, by qualified name
    diff = _max_abs_diff(_logits(model, input_ids), expected)
    print(f"\nimport_peft_kasa from_directory={from_directory}: max abs diff {diff:.3g}")
    assert diff <= TOL, f"imported KaSA vs PEFT KaSA logits: max abs diff {diff:.3g} > {TOL}"


@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
def test_exported_peft_kasa_adapter_loads_in_peft_with_kasa_outputs(base_mode, input_ids, tmp_path):
    model = _kasa_model("llama", base_mode=base_mode, target_modules=LLAMA_TARGETS, use_rslora=True)
    model.kasa_config.regularizers = {"singular_value_l2": 0.01, "orthogonality": 0.02}
    expected = _logits(model, input_ids)
    out = export_peft_kasa(model, tmp_path / "peft_kasa")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["kasa_config"] == {"beta": 0.01, "gamma": 0.02}
    loaded = peft.PeftModel.from_pretrained(build_tiny_llama(VOCAB).eval(), out).eval()
    diff = _max_abs_diff(_logits(loaded, input_ids), expected)
    print(f"\nexport_peft_kasa {base_mode}: max abs diff {diff:.3g}")
    assert diff <= TOL, f"PEFT-loaded KaSA vs kasa_trl logits: max abs diff {diff:.3g} > {TOL}"


def test_export_peft_kasa_refuses_what_peft_cannot_reproduce(tmp_path):
    with pytest.raises(ValueError, match="Conv1D.*export_lora"):
        export_peft_kasa(_kasa_model("gpt2"), tmp_path / "a")
    # The official truncation removes nothing from the wide k_proj (32 x 64) and down_proj (64 x 128).
    with pytest.raises(ValueError, match="had 0 singular components removed.*export_lora"):
        export_peft_kasa(_kasa_model("llama", truncation="official"), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_import_peft_kasa_rejects_wrong_inputs(tmp_path):
    plain = peft.get_peft_model(build_tiny_llama(VOCAB), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="plain LoRA adapter"):
        import_peft_kasa(build_tiny_llama(VOCAB), tmp_path / "plain")
    with pytest.raises(ValueError, match="PeftModel"):
        import_peft_kasa(plain, tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        import_peft_kasa(build_tiny_llama(VOCAB), tmp_path)
    peft_model = _peft_kasa_model()
    with pytest.raises(ValueError, match="already truncated"):
        import_peft_kasa(peft_model.base_model.model, peft_model)
    with pytest.raises(ValueError, match="does not have"):
        import_peft_kasa(build_tiny_gpt2(VOCAB), peft_model)


def test_import_peft_kasa_refuses_a_base_of_other_shapes_with_the_load_wording():
    """The shape check is the one adapter loading uses (targets.check_adapter_fits); the model is unchanged."""
    peft_model = _peft_kasa_model()
    model = build_tiny_llama(VOCAB)
    model.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 48, bias=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"adapter tensor model\.layers\.0\.self_attn\.q_proj\.lora_B has shape \(64, 4\) but "
        r"model\.layers\.0\.self_attn\.q_proj \(48x64, r=4\) needs \(48, 4\); the adapter belongs to another "
        r"model \(PeftModel adapter active\): load it onto the base model it was trained on",
    ):
        import_peft_kasa(model, peft_model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
