"""``merge_and_unload`` + ``save_pretrained`` gives a plain transformers checkpoint with the KaSA model's outputs.

The tiny models are built in code; each test saves a fresh one with ``save_pretrained`` and uses that directory as
"the base model", as a user's Hub checkpoint would be.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kasa_trl import (
    KaSAConfig,
    KaSALinear,
    apply_kasa,
    load_kasa_adapter,
    merge_and_unload,
    save_kasa_adapter,
)
from kasa_trl.tiny import build_tiny_gpt2, build_tiny_llama

from .conftest import VOCAB, randomize_adapters

TOL = 1e-5  # fp32 max abs logit difference, merged vs unmerged
BUILDERS = {"llama": build_tiny_llama, "gpt2": build_tiny_gpt2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: a second OpenMP thread only adds synchronisation, 10-50x slower on a shared 2-core CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def base_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"{request.param}_base")
    BUILDERS[request.param](VOCAB).save_pretrained(directory)
    return directory


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
def test_merged_model_saves_and_reloads_as_plain_transformers_model(base_dir, base_mode, input_ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base_logits = _logits(model, input_ids)
    apply_kasa(model, KaSAConfig(r=4, lora_alpha=8, base_mode=base_mode, use_rslora=True))
    randomize_adapters(model, seed=3)
    expected = _logits(model, input_ids)

    merged = merge_and_unload(model)
    assert not any(isinstance(m, KaSALinear) for m in merged.modules())
    merged_logits = _logits(merged, input_ids)
    merged.save_pretrained(tmp_path / "merged")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded) is type(merged)
    assert not any(isinstance(m, KaSALinear) for m in reloaded.modules())
    reloaded_logits = _logits(reloaded, input_ids)
    assert torch.equal(reloaded_logits, merged_logits), "save/reload must be bit-exact"
    diff = (reloaded_logits - expected).abs().max().item()
    print(f"\nmerge+save+reload {type(merged).__name__} {base_mode}: max abs diff {diff:.3g}")
    assert diff <= TOL, f"merged+reloaded vs KaSA logits: max abs diff {diff:.3g} > {TOL}"
    assert (base_logits - expected).abs().max().item() > 1e-3


def test_adapter_loaded_on_saved_base_merges_to_the_same_checkpoint(base_dir, input_ids, tmp_path):
    """Train-time model -> adapter directory -> fresh from_pretrained base -> merge: same weights as merging directly."""
    model = apply_kasa(AutoModelForCausalLM.from_pretrained(base_dir).eval(), KaSAConfig(r=4))
    randomize_adapters(model, seed=4)
    save_kasa_adapter(model, tmp_path / "adapter")
    direct = merge_and_unload(model).state_dict()

    loaded = load_kasa_adapter(AutoModelForCausalLM.from_pretrained(base_dir).eval(), tmp_path / "adapter")
    merge_and_unload(loaded).save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert direct.keys() == reloaded.keys()
    assert all(torch.equal(direct[k], reloaded[k]) for k in direct)
