"""Shared and tied weights (issue 13, class 3): each case is adapted correctly (truncated once, every path to a
module computes the same adapted weight) or refused before anything changes, naming the modules.

The rule (kasa_trl/model.py): a module registered under several names gets one KaSALinear under every name; a
target whose weight memory another module also uses is refused in in_place mode, adapted in non_destructive mode
(the shared weight is never written: each adapted module computes with W - R plus its own update, the others with
W), and "auto" picks non_destructive for it; merge_and_unload refuses such a model, unload works.
"""

import pytest
import torch
from torch import nn

from kasa_trl import KaSAConfig, KaSALinear, apply_kasa, kasa_layers, merge_and_unload, unload
from kasa_trl.decomposition import minor_components
from kasa_trl.shared_weights import check_shared_weights, shared_weight_users
from kasa_trl.tiny import build_tiny_llama

from .conftest import VOCAB, randomize_adapters

F64 = torch.float64


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key


def _shared_parameter_model() -> nn.Sequential:
    """Two Linear(8, 8) holding ONE weight Parameter (own biases), float64."""
    torch.manual_seed(0)
    first, second = nn.Linear(8, 8).double(), nn.Linear(8, 8).double()
    second.weight = first.weight
    return nn.Sequential(first, nn.Tanh(), second)


def _removed(weight: torch.Tensor, r: int) -> torch.Tensor:
    left, right = minor_components(weight.detach().to(F64), r, "svd")
    return left @ right


def test_one_parameter_in_two_targets_is_refused_in_place_naming_both():
    model = _shared_parameter_model()
    before = _state(model)
    with pytest.raises(
        ValueError,
        match=r"2 target\(s\) share their weight with other modules \(0\.weight with 2\.weight; 2\.weight with "
        r"0\.weight\): base_mode='in_place' would truncate the shared weight for every user .*"
        r"Use base_mode='non_destructive' \(or 'auto', which picks it here\)",
    ):
        apply_kasa(model, KaSAConfig(r=2, base_mode="in_place"))
    _assert_state(model, before)
    assert not kasa_layers(model) and model[2].weight is model[0].weight
    assert not hasattr(model, "kasa_config")


@pytest.mark.parametrize("base_mode", ["non_destructive", "auto"])
def test_one_parameter_in_two_targets_is_truncated_once_non_destructive(base_mode):
    model = _shared_parameter_model()
    weight = model[0].weight.detach().clone()
    apply_kasa(model, KaSAConfig(r=2, base_mode=base_mode))
    assert model.kasa_config.base_mode == "non_destructive"  # "auto" resolved for the shared weight
    layers = kasa_layers(model)
    assert sorted(layers) == ["0", "2"]
    assert layers["0"].base_layer.weight is layers["2"].base_layer.weight  # still one Parameter...
    assert torch.equal(layers["0"].base_layer.weight, weight)  # ...never written
    expected_trunc = weight - _removed(weight, 2)  # W - R, not W - 2R
    x = torch.randn(5, 8, dtype=F64)
    for name in ("0", "2"):
        layer = layers[name]
        torch.testing.assert_close(
            layer(x), x @ expected_trunc.T + layer.base_layer.bias, rtol=1e-12, atol=1e-12
        )
    randomize_adapters(model)
    with pytest.raises(
        ValueError, match=r"cannot merge 0: its weight is shared with 2\.weight.*Nothing was changed"
    ):
        merge_and_unload(model)
    assert not any(layer.merged for layer in layers.values())
    assert torch.equal(layers["0"].base_layer.weight, weight)
    unload(model)
    assert not kasa_layers(model) and model[2].weight is model[0].weight
    assert torch.equal(model[0].weight, weight)


def _tied_llama() -> nn.Module:
    model = build_tiny_llama(VOCAB, seed=0, tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_tied_lm_head_in_place_is_refused_and_the_embeddings_are_untouched():
    model = _tied_llama()
    before = _state(model)
    with pytest.raises(
        ValueError,
        match=r"lm_head\.weight with model\.embed_tokens\.weight\): base_mode='in_place' would truncate the shared "
        r"weight .* exclude 'lm_head' with exclude_modules, or untie the weights first \(for tied embeddings: "
        r"from_pretrained\(\.\.\., tie_word_embeddings=False\)\)",
    ):
        apply_kasa(model, KaSAConfig(r=2, target_modules=["lm_head"], base_mode="in_place"))
    _assert_state(model, before)
    assert not kasa_layers(model) and model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_lm_head_auto_keeps_the_embeddings_and_truncates_the_head_once(input_ids):
    model = _tied_llama()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        hidden = model.model(input_ids).last_hidden_state
    apply_kasa(model, KaSAConfig(r=2, target_modules=["lm_head", "q_proj"], base_mode="auto"))
    assert model.kasa_config.base_mode == "non_destructive"
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    head = model.lm_head
    assert isinstance(head, KaSALinear) and head.base_layer.weight is model.model.embed_tokens.weight
    w = embeddings.to(F64)
    r = _removed(embeddings, 2)
    torch.testing.assert_close(head(hidden).to(F64), hidden.to(F64) @ (w - r).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"cannot merge lm_head: its weight is shared with model\.embed_tokens\.weight"
    ):
        merge_and_unload(model)
    unload(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embeddings)


def test_all_linear_still_skips_a_tied_head_and_stays_in_place():
    model = _tied_llama()
    apply_kasa(model, KaSAConfig(r=2, base_mode="auto"))
    assert "lm_head" not in kasa_layers(model) and model.kasa_config.base_mode == "in_place"


class _Aliased(nn.Module):
    """One Linear registered under two names (``named_modules`` lists it once, as ``first``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(6, 6).double()
        self.block = nn.ModuleDict({"second": self.first})
        self.other = nn.Linear(6, 6).double()

    def forward(self, x):
        return self.other(self.first(x)) + self.block["second"](x)


@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
@pytest.mark.parametrize("target", ["first", "second"])  # either name selects the module
def test_module_registered_twice_gets_one_layer_under_both_names(base_mode, target):
    model = _Aliased()
    weight = model.first.weight.detach().clone()
    x = torch.randn(3, 6, dtype=F64)
    apply_kasa(model, KaSAConfig(r=2, target_modules=[target], base_mode=base_mode))
    layers = kasa_layers(model)
    assert list(layers) == ["first"]
    assert model.first is model.block["second"] is layers["first"]
    expected = x @ (weight - _removed(weight, 2)).T + model.first.base_layer.bias
    torch.testing.assert_close(model.block["second"](x), expected, rtol=1e-12, atol=1e-12)
    stored = model.first.base_layer.weight
    assert torch.equal(stored, weight) if base_mode == "non_destructive" else not torch.equal(stored, weight)
    randomize_adapters(model)
    adapted = model(x)
    merge_and_unload(model)
    assert type(model.first) is nn.Linear and model.first is model.block["second"]
    torch.testing.assert_close(model(x), adapted, rtol=1e-12, atol=1e-12)


def test_module_registered_twice_in_one_parent_gets_the_layer_under_both_names():
    model = nn.Module()
    model.x = model.y = nn.Linear(6, 6)
    apply_kasa(model, KaSAConfig(r=2))
    assert isinstance(model.x, KaSALinear) and model.y is model.x
    unload(model)
    assert type(model.x) is nn.Linear and model.y is model.x


def test_module_registered_twice_unloads_under_both_names():
    model = _Aliased()
    weight = model.first.weight.detach().clone()
    apply_kasa(model, KaSAConfig(r=2, target_modules=["first"]))
    randomize_adapters(model)
    unload(model)
    assert type(model.first) is nn.Linear and model.first is model.block["second"]
    torch.testing.assert_close(model.first.weight, weight, rtol=1e-15, atol=1e-15)


def test_excluding_either_name_of_a_module_excludes_the_module():
    model = _Aliased()
    apply_kasa(model, KaSAConfig(r=2, target_modules="all-linear", exclude_modules=["second"]))
    assert list(kasa_layers(model)) == ["other"]
    assert type(model.first) is nn.Linear and model.first is model.block["second"]


def test_views_count_as_shared_only_where_their_memory_overlaps():
    """Weights that are views of one buffer: disjoint halves are independent (in_place allowed), overlapping
    ones are shared."""
    storage = torch.randn(16, 8, dtype=F64)
    model = nn.Sequential(nn.Linear(8, 8).double(), nn.Linear(8, 8).double(), nn.Linear(8, 8).double())
    model[0].weight = nn.Parameter(storage[:8])
    model[1].weight = nn.Parameter(storage[8:])
    model[2].weight = nn.Parameter(storage[4:12])
    targets = dict(model.named_children())
    assert shared_weight_users(model, {"0": model[0], "1": model[1]}) == {
        "0": ["2.weight"],
        "1": ["2.weight"],
    }
    assert shared_weight_users(nn.Sequential(model[0], model[1]), {"0": model[0], "1": model[1]}) == {}
    with pytest.raises(ValueError, match=r"3 target\(s\) share their weight"):
        check_shared_weights(model, targets, "in_place")
    check_shared_weights(model, targets, "non_destructive")  # never writes the weights: allowed
    halves = nn.Sequential(model[0], model[1])
    top = storage[:8].clone()
    apply_kasa(halves, KaSAConfig(r=2, base_mode="in_place"))
    # each half truncated once, by its own R
    torch.testing.assert_close(storage[:8], top - _removed(top, 2), rtol=1e-12, atol=1e-12)


def test_a_buffer_aliasing_a_target_weight_is_a_user():
    model = nn.Sequential(nn.Linear(4, 4).double())
    holder = nn.Module()
    holder.register_buffer("copy_of_weight", model[0].weight.data)
    model.append(holder)
    assert shared_weight_users(model, {"0": model[0]}) == {"0": ["1.copy_of_weight"]}
