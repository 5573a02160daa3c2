import pytest
import torch
from torch import nn

from kasa_trl import KaSAConfig, apply_kasa, kasa_layers, merge_and_unload, unload
from kasa_trl.model import kasa_adapters_disabled
from kasa_trl.tiny import build_tiny_gpt2, build_tiny_llama

from .conftest import VOCAB, randomize_adapters


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_targets_and_trainable_params(tiny_llama):
    apply_kasa(tiny_llama, KaSAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layers = kasa_layers(tiny_llama)
    assert sorted(layers) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    expected = {f"{n}.{k}" for n in layers for k in ("lora_A", "lora_B", "lora_diag")}
    assert trainable == expected


def test_all_linear_skips_output_head(tiny_llama, tiny_gpt2):
    apply_kasa(tiny_llama, KaSAConfig(r=2))
    names = kasa_layers(tiny_llama)
    assert "lm_head" not in names and len(names) == 2 * 7
    apply_kasa(tiny_gpt2, KaSAConfig(r=2))
    assert len(kasa_layers(tiny_gpt2)) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block


def test_exclude_modules_and_regex(tiny_llama):
    apply_kasa(tiny_llama, KaSAConfig(r=2, target_modules=r".*\.mlp\..*_proj", exclude_modules=["down_proj"]))
    assert sorted({n.rsplit(".", 1)[-1] for n in kasa_layers(tiny_llama)}) == ["gate_proj", "up_proj"]


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_gpt2])
@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
def test_unload_restores_original_and_merge_keeps_outputs(builder, base_mode, input_ids):
    model = builder(VOCAB).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = _logits(model, input_ids)
    apply_kasa(model, KaSAConfig(r=4, base_mode=base_mode))
    truncated_logits = _logits(model, input_ids)
    assert not torch.allclose(truncated_logits, base_logits, atol=1e-6)  # truncation changes the model
    randomize_adapters(model)
    adapted = _logits(model, input_ids)

    merged = merge_and_unload(model)
    assert not kasa_layers(merged) and not hasattr(merged, "kasa_config")
    assert all(type(m) is not nn.Module for m in merged.modules())
    torch.testing.assert_close(_logits(merged, input_ids), adapted, rtol=1e-4, atol=1e-5)

    model = builder(VOCAB).eval()
    apply_kasa(model, KaSAConfig(r=4, base_mode=base_mode))
    randomize_adapters(model)
    restored = unload(model)
    for key, value in restored.state_dict().items():
        if base_mode == "non_destructive":
            assert torch.equal(value, original[key]), key
        else:
            torch.testing.assert_close(value, original[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(restored, input_ids), base_logits, rtol=1e-4, atol=1e-5)


def test_disabled_adapters_give_truncated_model(tiny_llama, input_ids):
    apply_kasa(tiny_llama, KaSAConfig(r=4))
    truncated = _logits(tiny_llama, input_ids)
    randomize_adapters(tiny_llama)
    assert not torch.allclose(_logits(tiny_llama, input_ids), truncated)
    with kasa_adapters_disabled(tiny_llama):
        torch.testing.assert_close(_logits(tiny_llama, input_ids), truncated)
    assert all(layer.adapter_enabled for layer in kasa_layers(tiny_llama).values())


def test_official_truncation_keeps_in_minus_r():
    model = nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 16), nn.Linear(10, 8))
    apply_kasa(model, KaSAConfig(r=3, truncation="official"))
    layers = kasa_layers(model)
    # (out=4, in=16): keeps 13 >= 4 components -> drops nothing; (16, 4): drops 3; (8, 10): keeps 7 of 8 -> drops 1.
    assert [layers[n].n_removed for n in ("0", "1", "2")] == [0, 3, 1]
    assert layers["0"](torch.randn(2, 16)).shape == (2, 4)


def test_errors_leave_model_untouched(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"r=64 must be < min\(in, out\)=64 for model.layers.0.self_attn.q_proj"
    ):
        apply_kasa(tiny_llama, KaSAConfig(r=64, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        apply_kasa(tiny_llama, KaSAConfig(r=2, target_modules=["query"]))
    with pytest.raises(TypeError, match="Embedding, which KaSA cannot wrap"):
        apply_kasa(tiny_llama, KaSAConfig(r=2, target_modules=["embed_tokens"]))
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj has non-finite"):
        apply_kasa(tiny_llama, KaSAConfig(r=2))
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = before["model.layers.1.mlp.up_proj.weight"][
            0, 0
        ]
    assert not kasa_layers(tiny_llama)
    for key, value in tiny_llama.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_rejects_quantized_and_double_application(tiny_llama):
    class FakeQuantLinear(nn.Linear):
        def __init__(self):
            super().__init__(8, 8)
            self.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)

    model = nn.Sequential(FakeQuantLinear())
    with pytest.raises(TypeError, match="quantized or packed weights are not supported"):
        apply_kasa(model, KaSAConfig(r=2))
    apply_kasa(tiny_llama, KaSAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already carries 2 KaSA layers"):
        apply_kasa(tiny_llama, KaSAConfig(r=2))


def test_train_step_changes_adapter_only(tiny_llama, input_ids):
    apply_kasa(tiny_llama, KaSAConfig(r=4))
    tiny_llama.train()
    frozen = {n: p.clone() for n, p in tiny_llama.named_parameters() if not p.requires_grad}
    trainable = {n: p.clone() for n, p in tiny_llama.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in tiny_llama.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = tiny_llama(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in tiny_llama.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trainable[n]) for n, p in tiny_llama.named_parameters() if n in trainable)


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_gpt2])
def test_layers_decomposed_at_once_match_one_at_a_time(builder):
    """With 2 threads apply_kasa decomposes two layers at once, each on one thread: the adapted model is bit for
    bit the one a single thread gives (Linear and Conv1D), and a non-finite weight is still reported by name with
    nothing changed."""
    previous = torch.get_num_threads()
    try:
        models = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)  # the same base and the same adapter initialization
            models[threads] = apply_kasa(builder(VOCAB), KaSAConfig(r=3))
            assert torch.get_num_threads() == threads  # restored after the pool
        one, two = (m.state_dict() for m in models.values())
        assert one.keys() == two.keys()
        for key in one:
            assert torch.equal(one[key], two[key]), key

        torch.set_num_threads(2)
        model = builder(VOCAB)
        name, layer = [(n, m) for n, m in model.named_modules() if n.endswith(("down_proj", "c_proj"))][-1]
        with torch.no_grad():
            layer.weight[0, 0] = float("inf")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=rf"{name} has non-finite \(NaN/Inf\) weights"):
            apply_kasa(model, KaSAConfig(r=3))
        assert not kasa_layers(model)
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    finally:
        torch.set_num_threads(previous)


def test_interrupted_decomposition_leaves_no_worker_threads(monkeypatch):
    """Ctrl-C between two layers: apply_kasa's decomposition threads are shut down before the interrupt propagates
    (not when the traceback holding them is dropped), and the model is untouched."""
    import threading

    import kasa_trl.target_decomposition

    def interrupted(items, _description):
        yield next(iter(items))
        raise KeyboardInterrupt

    monkeypatch.setattr(kasa_trl.target_decomposition, "_progress", interrupted)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = build_tiny_llama(VOCAB)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(KeyboardInterrupt) as interrupt:  # kept, as a REPL keeps the last traceback
            apply_kasa(model, KaSAConfig(r=3))
        assert interrupt.traceback
        assert not [t for t in threading.enumerate() if t.name.startswith("kasa-decompose")]
        assert torch.get_num_threads() == 2
        assert not kasa_layers(model)
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    finally:
        torch.set_num_threads(previous)


def test_profiler_scopes_name_the_phases_of_apply_kasa():
    """Each decomposition and each in-place truncation is a ``record_function`` scope (benchmarks time them
    without patching the library); the sharded schedule is one scope around its decompositions."""
    from torch.profiler import profile

    from kasa_trl.target_decomposition import sharded_decompose
    from kasa_trl.targets import find_targets, removed_rank

    def scopes(prof) -> list[str]:
        return [event.name for event in prof.events() if event.name.startswith("kasa_trl.")]

    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8))
    with profile() as prof:
        apply_kasa(model, KaSAConfig(r=2, base_mode="in_place"))
    assert sorted(scopes(prof)) == ["kasa_trl.decompose"] * 2 + ["kasa_trl.truncate"] * 2
    config = KaSAConfig(r=2)
    targets = find_targets(nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8)), config)
    with profile() as prof:
        sharded_decompose(targets, {n: removed_rank(m, config, n) for n, m in targets.items()}, config)
    assert sorted(scopes(prof)) == ["kasa_trl.decompose"] * 2 + ["kasa_trl.sharded_decompose"]
