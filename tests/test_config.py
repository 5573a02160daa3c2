import math

import pytest

from kasa_trl import KaSAConfig, register_regularizer, unregister_regularizer


def test_defaults_match_paper():
    cfg = KaSAConfig()
    assert cfg.regularizers == {"singular_value_l2": 1e-4, "orthogonality": 1e-3}
    assert cfg.base_mode == "auto" and cfg.truncation == "paper" and cfg.regularizer_reduction == "sum"
    assert cfg.scaling == 2.0
    assert KaSAConfig(r=4, lora_alpha=8, use_rslora=True).scaling == 4.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -3}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"lora_alpha": 0}, "lora_alpha must be a positive number"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        (
            {"base_mode": "inplace"},
            r"base_mode='inplace' is not one of \['auto', 'in_place', 'non_destructive'\]",
        ),
        ({"truncation": "pissa"}, "truncation='pissa' is not one of"),
        ({"decomposition_method": "magic"}, "decomposition_method='magic' is not one of"),
        ({"regularizer_reduction": "max"}, "regularizer_reduction='max' is not one of"),
        ({"regularizers": {"l2": 1.0}}, r"unknown regularizer 'l2'; registered: \[.*'singular_value_l2'"),
        ({"regularizers": {"orthogonality": -1.0}}, "must be finite and >= 0"),
        ({"regularizers": {"orthogonality": math.nan}}, "must be finite and >= 0"),
        ({"regularizers": {"orthogonality": "big"}}, "must be a number"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        KaSAConfig(**kwargs)


def test_user_regularizer_can_be_referenced_by_name():
    @register_regularizer("test_config_user_reg")
    def user_reg(lora_A, lora_B, lora_diag):
        return lora_diag.sum()

    try:
        assert KaSAConfig(regularizers={"test_config_user_reg": 0.5}).regularizers == {
            "test_config_user_reg": 0.5
        }
        with pytest.raises(ValueError, match="already registered"):
            register_regularizer("test_config_user_reg")(user_reg)
    finally:
        unregister_regularizer("test_config_user_reg")


def test_round_trip_dict():
    cfg = KaSAConfig(r=3, target_modules=["q_proj"], exclude_modules="lm_head", regularizers={})
    assert KaSAConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("r", [1, 3, 8, 12])
def test_one_scaling_formula_for_the_config_and_the_layer(r, use_rslora):
    import torch

    from kasa_trl import KaSALinear
    from kasa_trl.config import lora_scaling

    config = KaSAConfig(r=r, lora_alpha=7, use_rslora=use_rslora)
    expected = 7 / (math.sqrt(r) if use_rslora else r)
    assert config.scaling == lora_scaling(7, r, use_rslora) == expected
    base = torch.nn.Linear(16, 16)
    layer = KaSALinear(base, torch.zeros(16, 1), torch.zeros(1, 16), r=r, lora_alpha=7, use_rslora=use_rslora)
    assert layer.scaling == expected


@pytest.mark.parametrize(
    ("shape", "paper", "official"),
    [((4, 16), 3, 0), ((16, 4), 3, 3), ((8, 10), 3, 1), ((10, 10), 3, 3)],  # (out, in); r = 3
)
def test_removed_rank_per_truncation(shape, paper, official):
    """Paper: r. Official: the official code keeps in - r components, so only min(out, in) - (in - r) go."""
    assert KaSAConfig(r=3).removed_rank(*shape) == paper
    assert KaSAConfig(r=3, truncation="official").removed_rank(*shape) == official
