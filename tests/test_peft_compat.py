"""kasa_trl.peft_compat: every LoraConfig(kasa_config=...) option is honoured or refused by name, in the trainer
and in import_peft_kasa alike; PEFT's layer selection becomes a regex that selects exactly PEFT's modules."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

peft = pytest.importorskip("peft")
if not hasattr(peft, "KasaConfig"):
    pytest.skip("needs peft >= 0.21 (KasaConfig)", allow_module_level=True)

from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402

from kasa_trl import KaSAConfig, apply_kasa, kasa_layers  # noqa: E402
from kasa_trl.integrations.peft import import_peft_kasa  # noqa: E402
from kasa_trl.peft_compat import kasa_config_from_lora, layer_selection_regex  # noqa: E402
from kasa_trl.tiny import build_tiny_llama  # noqa: E402
from kasa_trl.trainer import kasa_config_from_peft  # noqa: E402

from .conftest import VOCAB  # noqa: E402


def _lora(**fields):
    return peft.LoraConfig(
        **{"r": 4, "target_modules": ["q_proj", "v_proj"], "kasa_config": peft.KasaConfig(), **fields}
    )


def _as_saved(config, **changes):
    """What adapter_config.json would hold, with some fields changed (PEFT's own checks bypassed)."""
    as_json = json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    return {**json.loads(as_json), **changes}


def test_honoured_fields_map_exactly_from_a_config_its_dict_and_its_json():
    config = _lora(
        lora_alpha=16,
        lora_dropout=0.1,
        use_rslora=True,
        exclude_modules=["model.layers.0.self_attn.q_proj"],
        fan_in_fan_out=True,  # PEFT, like kasa_trl, takes the layout from the module type
        kasa_config=peft.KasaConfig(beta=0.5, gamma=0.25),
    )
    expected = KaSAConfig(
        r=4,
        lora_alpha=16,
        lora_dropout=0.1,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["model.layers.0.self_attn.q_proj"],
        truncation="paper",
        regularizers={"singular_value_l2": 0.5, "orthogonality": 0.25},
        regularizer_reduction="sum",
    )
    for form in (config, config.to_dict(), _as_saved(config)):
        assert kasa_config_from_lora(form, where="cfg") == expected
    assert kasa_config_from_peft(config) == expected  # the trainer uses the same mapping
    # PEFT's defaults where a field is absent: lora_alpha 8 (not KaSAConfig's 16), beta 1e-4, gamma 1e-3.
    minimal = kasa_config_from_lora({"target_modules": ["q_proj"], "kasa_config": {}}, where="cfg")
    assert (minimal.r, minimal.lora_alpha) == (8, 8)
    assert minimal.regularizers == {"singular_value_l2": 1e-4, "orthogonality": 1e-3}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank_pattern", {"q_proj": 8}),
        ("alpha_pattern", {"v_proj": 32}),
        ("modules_to_save", ["lm_head"]),
        ("bias", "all"),
        ("bias", "lora_only"),
        ("use_dora", True),
        ("lora_bias", True),
        ("target_parameters", ["mlp.experts.down_proj"]),
        ("trainable_token_indices", [1, 2]),
        ("layer_replication", [[0, 1]]),
        ("megatron_config", {"hidden_size": 8}),
        ("velora_config", {}),  # {} enables the variant with its defaults in PEFT
        ("monteclora_config", {}),
        ("use_bdlora", {}),
        ("arrow_config", {}),
        ("alora_invocation_tokens", [5, 6]),
        ("use_qalora", True),
        ("ensure_weight_tying", True),
        ("init_lora_weights", False),
        ("init_lora_weights", "gaussian"),
        ("init_lora_weights", "pissa"),
        ("inference_mode", True),
        ("target_modules", None),
        ("target_modules", []),
        ("layers_pattern", "layers"),  # without layers_to_transform
        ("peft_type", "IA3"),
        ("an_option_of_a_future_peft", True),
    ],
)
def test_each_option_kasa_does_not_honour_is_refused_by_name(field, value):
    saved = _as_saved(_lora(), **{field: value})
    with pytest.raises(
        ValueError, match=rf"cfg sets LoraConfig options .*{field}={re.escape(repr(value))} \("
    ):
        kasa_config_from_lora(saved, where="cfg")


def test_values_at_peft_defaults_or_without_effect_are_accepted():
    saved = _as_saved(
        _lora(),
        rank_pattern={"q_proj": 4},  # equal to r
        alpha_pattern={"q_proj": 8},  # equal to lora_alpha
        loftq_config={},
        megatron_core="megatron.core",
        an_option_of_a_future_peft=None,
        inference_mode=False,
    )
    assert kasa_config_from_lora(saved, where="cfg").r == 4


def test_a_saved_adapter_may_carry_an_init_that_only_picked_its_starting_factors():
    for init in (False, "gaussian", "orthogonal"):
        saved = _as_saved(_lora(), init_lora_weights=init, inference_mode=True)
        assert kasa_config_from_lora(saved, where="cfg", new_adapter=False, target_modules=["q_proj"]).r == 4
    for init in ("pissa", "olora", "corda", "loftq", "mica"):  # these change the base or the layer
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}'"):
            kasa_config_from_lora(_as_saved(_lora(), init_lora_weights=init), where="cfg", new_adapter=False)


def test_every_problem_is_named_at_once_and_the_trainer_refuses_too():
    with pytest.raises(ValueError) as error:
        kasa_config_from_peft(_lora(use_dora=True, modules_to_save=["lm_head"], rank_pattern={"q_proj": 2}))
    message = str(error.value)
    assert message.startswith("peft_config sets LoraConfig options kasa_trl's KaSA does not honour: ")
    assert all(f"{name}=" in message for name in ("use_dora", "modules_to_save", "rank_pattern"))
    with pytest.raises(ValueError, match=r"kasa_config fields \['delta'\]"):
        kasa_config_from_lora(_as_saved(_lora(), kasa_config={"beta": 0.1, "delta": 1.0}), where="cfg")


def test_import_peft_kasa_refuses_a_saved_option_by_name_and_leaves_the_model_unchanged(tmp_path):
    peft_model = peft.get_peft_model(build_tiny_llama(VOCAB), _lora())
    peft_model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "bias": "all"}))
    model = build_tiny_llama(VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} sets LoraConfig options .*bias='all'"):
        import_peft_kasa(model, tmp_path / "adapter")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# --- layers_to_transform / layers_pattern ------------------------------------------------------------------


def _peft_selects(targets, layers, patterns, key):
    config = SimpleNamespace(
        exclude_modules=None,
        modules_to_save=None,
        target_parameters=None,
        target_modules=set(targets),
        layers_to_transform=layers,
        layers_pattern=patterns,
    )
    return bool(check_target_module_exists(config, key))


_SEGMENTS = ["model", "layers", "h", "blocks", "0", "1", "2", "10", "01", "mlp", "experts", "q_proj"]
_KEY = st.builds(
    lambda head, last: ".".join([*head, last]),
    st.lists(st.sampled_from(_SEGMENTS), max_size=7),
    st.sampled_from(["q_proj", "v_proj", "mlp", "1", "layers"]),
)


@settings(deadline=None, max_examples=300)
@given(
    keys=st.lists(_KEY, min_size=1, max_size=20),
    targets=st.lists(st.sampled_from(["q_proj", "v_proj", "mlp", "mlp.q_proj", "0.q_proj"]), min_size=1),
    layers=st.one_of(st.integers(0, 11), st.lists(st.integers(0, 11), min_size=1, max_size=3)),
    patterns=st.sampled_from([None, "", [], "layers", "h", ["blocks", "layers"], ["h", "blocks"]]),
)
@example(keys=["model.layers.0.mlp.layers.1.q_proj"], targets=["q_proj"], layers=[1], patterns=None)
@example(keys=["model.layers.0.mlp.layers.1.q_proj"], targets=["q_proj"], layers=[1], patterns="layers")
@example(
    keys=["h.2.blocks.1.q_proj", "x.h.01.q_proj"], targets=["q_proj"], layers=1, patterns=["h", "blocks"]
)
def test_the_layer_regex_selects_exactly_what_peft_selects(keys, targets, layers, patterns):
    regex = layer_selection_regex(targets, [layers] if isinstance(layers, int) else layers, patterns)
    for key in keys:
        assert (re.fullmatch(regex, key) is not None) == _peft_selects(targets, layers, patterns, key), key


def test_layers_to_transform_adapts_the_modules_peft_adapts(tiny_llama):
    config = _lora(layers_to_transform=[1], layers_pattern="layers")
    theirs = peft.get_peft_model(build_tiny_llama(VOCAB), config)
    peft_modules = sorted(
        name.removeprefix("base_model.model.")
        for name, m in theirs.named_modules()
        if hasattr(m, "lora_diag")
    )
    ours = apply_kasa(tiny_llama, kasa_config_from_lora(config, where="cfg"))
    assert (
        sorted(kasa_layers(ours))
        == peft_modules
        == [
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ]
    )


def test_kasa_config_to_lora_fields_and_back():
    """lora_fields_from_kasa is the inverse of kasa_config_from_lora on what PEFT's KaSA holds; what it cannot
    hold (other regularizers, the mean reduction) is named in a warning."""
    from kasa_trl.config import MODEL_FIELDS, config_differences
    from kasa_trl.peft_compat import lora_fields_from_kasa

    config = KaSAConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        use_rslora=True,
        regularizers={"singular_value_l2": 0.5, "orthogonality": 0.25},
    )
    fields = lora_fields_from_kasa(config)
    lora = _lora(**{**fields, "kasa_config": peft.KasaConfig(**fields["kasa_config"])})
    back = kasa_config_from_lora(lora, where="peft_config")
    assert not config_differences(config, back, [*MODEL_FIELDS, "lora_dropout", "regularizers"])
    odd = KaSAConfig(regularizers={"orthogonality_official": 1.0}, regularizer_reduction="mean")
    with pytest.warns(UserWarning, match=r"regularizers \['orthogonality_official'\] and reduction='mean'"):
        assert lora_fields_from_kasa(odd)["kasa_config"] == {"beta": 0.0, "gamma": 0.0}
