"""KaSAConfig: every field checked, at construction, on assignment and from a file; each error names the field,
the value and the fix. Also the regularizer results the penalty accepts, and config comparison with "auto"."""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from kasa_trl import KaSAConfig, register_regularizer, unregister_regularizer
from kasa_trl.config import config_differences, resolve_base_mode
from kasa_trl.regularizers import evaluate_regularizer

BAD_FIELDS = {
    "alpha-nan": (
        {"lora_alpha": math.nan},
        r"lora_alpha must be a positive number, got nan: pass a finite value > 0",
    ),
    "alpha-inf": ({"lora_alpha": math.inf}, r"lora_alpha must be a positive number, got inf"),
    "alpha-minus-inf": ({"lora_alpha": -math.inf}, r"lora_alpha must be a positive number, got -inf"),
    "alpha-numpy-nan": (
        {"lora_alpha": np.float64("nan")},
        r"lora_alpha must be a positive number, got .*nan",
    ),
    "alpha-bool": ({"lora_alpha": True}, r"lora_alpha must be a positive number, got True"),
    "alpha-string": ({"lora_alpha": "16"}, r"lora_alpha must be a positive number, got '16'"),
    "alpha-tensor": ({"lora_alpha": torch.tensor(16.0)}, r"lora_alpha must be a positive number, got tensor"),
    "r-bool": ({"r": True}, r"r must be a positive integer, got True; pass e\.g\. r=8"),
    "r-numpy-bool": ({"r": np.bool_(True)}, r"r must be a positive integer, got .*True"),
    "r-float": ({"r": 4.0}, r"r must be a positive integer, got 4\.0"),
    "r-string": ({"r": "4"}, r"r must be a positive integer, got '4'"),
    "dropout-nan": (
        {"lora_dropout": math.nan},
        r"lora_dropout must be in \[0, 1\), got nan; 0 turns dropout off",
    ),
    "dropout-inf": ({"lora_dropout": math.inf}, r"lora_dropout must be in \[0, 1\), got inf"),
    "dropout-negative": ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\), got -0\.1"),
    "dropout-bool": ({"lora_dropout": False}, r"lora_dropout must be in \[0, 1\), got False"),
    "dropout-string": ({"lora_dropout": "0.1"}, r"lora_dropout must be in \[0, 1\), got '0\.1'"),
    "dropout-rounds-to-one": (  # below 1, but stored as float(value) == 1.0
        {"lora_dropout": Fraction(2**60 - 1, 2**60)},
        r"lora_dropout must be in \[0, 1\), got Fraction\(1152921504606846975, 1152921504606846976\)",
    ),
    "rslora-string": ({"use_rslora": "no"}, r"use_rslora must be True or False, got 'no'"),
    "rslora-int": ({"use_rslora": 1}, r"use_rslora must be True or False, got 1"),
    "rslora-none": ({"use_rslora": None}, r"use_rslora must be True or False, got None"),
    "targets-bad-regex": (
        {"target_modules": "(q|v_proj"},
        r"target_modules='\(q\|v_proj' is not a valid regular expression \(missing \), unterminated subpattern at "
        r"position 0\); fix the pattern, or pass a list of module names such as \['q_proj', 'v_proj'\]",
    ),
    "exclude-bad-regex": (
        {"exclude_modules": "*_proj"},
        r"exclude_modules='\*_proj' is not a valid regular expression \(nothing to repeat at position 0\)",
    ),
    "targets-regex-in-list": (
        {"target_modules": ["q_proj", ".*v_proj"]},
        r"target_modules entry '\.\*v_proj' is not a module name: list entries are names matched as themselves or a "
        r"'\.'-suffix; pass a single string to match a regular expression, e\.g\. target_modules='\.\*v_proj'",
    ),
    "all-linear-in-a-list": (
        {"target_modules": ["all-linear"]},
        r"target_modules holds 'all-linear' in a list, where it would be read as a module name; pass "
        r"target_modules='all-linear' as a string",
    ),
    "targets-not-strings": ({"target_modules": ["q_proj", 3]}, r"target_modules must be a non-empty list"),
    "targets-none": ({"target_modules": None}, r"target_modules must be a non-empty list"),
    "exclude-empty-list": ({"exclude_modules": []}, r"exclude_modules must be a non-empty list"),
    "base-mode-not-a-string": ({"base_mode": ["in_place"]}, r"base_mode=\['in_place'\] is not one of"),
    "truncation-none": ({"truncation": None}, r"truncation=None is not one of \['paper', 'official'\]"),
    "reduction-upper": ({"regularizer_reduction": "SUM"}, r"regularizer_reduction='SUM' is not one of"),
    "weight-tensor": (
        {"regularizers": {"orthogonality": torch.tensor(1e-3)}},
        r"regularizer weight for 'orthogonality' must be a number, got tensor\(0\.0010\) \(Tensor\); pass e\.g\. "
        r"\{'orthogonality': 1e-3\}",
    ),
    "weight-bool": (
        {"regularizers": {"orthogonality": True}},
        r"weight for 'orthogonality' must be a number",
    ),
    "weight-numpy-bool": ({"regularizers": {"orthogonality": np.bool_(True)}}, r"must be a number"),
    "weight-none": (
        {"regularizers": {"orthogonality": None}},
        r"weight for 'orthogonality' must be a number",
    ),
    "weight-numpy-nan": ({"regularizers": {"orthogonality": np.float32("nan")}}, r"must be finite and >= 0"),
    "weight-name-not-a-string": ({"regularizers": {1: 0.1}}, r"regularizers keys must be regularizer names"),
    "regularizers-none": ({"regularizers": None}, r"regularizers must be a mapping name -> weight"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_field_is_refused_naming_field_value_and_fix(case):
    kwargs, message = BAD_FIELDS[case]
    with pytest.raises((ValueError, TypeError), match=message):
        KaSAConfig(**kwargs)


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_field_is_refused_on_assignment_and_the_config_is_unchanged(case):
    kwargs, message = BAD_FIELDS[case]
    config = KaSAConfig(r=4, target_modules=["q_proj"])
    before = config.to_dict()
    ((name, value),) = kwargs.items()
    with pytest.raises((ValueError, TypeError), match=message):
        setattr(config, name, value)
    assert config.to_dict() == before


def test_numpy_scalars_are_stored_as_python_values_and_the_config_saves(tmp_path):
    config = KaSAConfig(
        r=np.int64(4),
        lora_alpha=np.float32(8.0),
        lora_dropout=np.float64(0.1),
        use_rslora=np.bool_(True),
        target_modules=("q_proj", "v_proj"),
        regularizers={"orthogonality": np.float32(0.5), "singular_value_l2": np.int64(0)},
    )
    assert type(config.r) is int and config.r == 4
    assert type(config.lora_alpha) is float and config.lora_alpha == 8.0
    assert type(config.lora_dropout) is float and config.lora_dropout == pytest.approx(0.1)
    assert config.use_rslora is True
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.regularizers == {"orthogonality": 0.5, "singular_value_l2": 0.0}
    assert all(type(w) is float for w in config.regularizers.values())
    config.to_json(tmp_path / "c.json")  # json refuses NumPy integers: stored as Python ones, it does not
    assert KaSAConfig.from_json(tmp_path / "c.json") == config
    assert KaSAConfig(lora_alpha=np.int64(16)).lora_alpha == 16


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (
            0,
            r"kasa_config_version must be a positive integer, got 0; the config is damaged: re-save the adapter",
        ),
        (True, r"kasa_config_version must be a positive integer, got True"),
        (-1, r"kasa_config_version must be a positive integer, got -1"),
        ("1", r"kasa_config_version must be a positive integer, got '1'"),
        (1.0, r"kasa_config_version must be a positive integer, got 1\.0"),
        (None, r"kasa_config_version must be a positive integer, got None"),
        (2, r"KaSA config version 2 is newer than this kasa_trl understands \(1\)"),
    ],
)
def test_bad_config_version_is_refused(tmp_path, version, message):
    path = tmp_path / "kasa_config.json"
    path.write_text(json.dumps({**KaSAConfig(r=2).to_dict(), "kasa_config_version": version}))
    with pytest.raises(ValueError, match=message):
        KaSAConfig.from_json(path)
    with pytest.raises(ValueError, match=message):
        KaSAConfig.from_dict({**KaSAConfig(r=2).to_dict(), "kasa_config_version": version})


def test_from_dict_refuses_a_non_dict():
    with pytest.raises(TypeError, match=r"KaSAConfig\.from_dict expects a dict, got list"):
        KaSAConfig.from_dict([("r", 2)])


def test_valid_regexes_and_names_are_kept():
    assert KaSAConfig(target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj").target_modules.startswith(
        "model"
    )
    assert KaSAConfig(target_modules=["self_attn.q_proj", "c_attn"]).target_modules == [
        "self_attn.q_proj",
        "c_attn",
    ]
    assert KaSAConfig(exclude_modules={"v_proj", "q_proj"}).exclude_modules == ["q_proj", "v_proj"]


def test_copies_keep_working():
    config = KaSAConfig(r=4, base_mode="auto")
    assert dataclasses.replace(config, r=2).r == 2
    with pytest.raises(ValueError, match="r must be a positive integer"):
        dataclasses.replace(config, r=0)
    import copy
    import pickle

    assert copy.deepcopy(config) == config and pickle.loads(pickle.dumps(config)) == config


# --- base_mode "auto" ------------------------------------------------------------------------------------------


def test_resolve_base_mode():
    assert resolve_base_mode("auto", [torch.float32, torch.float64]) == "in_place"
    assert resolve_base_mode("auto", [torch.float32, torch.bfloat16]) == "non_destructive"
    assert resolve_base_mode("auto", [torch.float16]) == "non_destructive"
    assert resolve_base_mode("in_place", [torch.bfloat16]) == "in_place"
    assert resolve_base_mode("non_destructive", [torch.float32]) == "non_destructive"
    with pytest.raises(ValueError, match="base_mode='inplace' is not one of"):
        resolve_base_mode("inplace", [torch.float32])


def test_config_differences_treat_a_requested_auto_as_either_mode():
    resolved = KaSAConfig(r=4, base_mode="non_destructive")
    assert config_differences(KaSAConfig(r=4, base_mode="auto"), resolved) == []
    assert config_differences(KaSAConfig(r=4, base_mode="in_place"), resolved) == [
        ("base_mode", "in_place", "non_destructive")
    ]
    assert config_differences(KaSAConfig(r=2, lora_alpha=4), resolved, ["r", "lora_alpha", "truncation"]) == [
        ("r", 2, 4),
        ("lora_alpha", 4, 16),
    ]


# --- what a regularizer may return -----------------------------------------------------------------------------


def _factors(requires_grad=True):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=gen).requires_grad_(requires_grad) for s in ((2, 5), (4, 2), (2,))]


BAD_RESULTS = {
    "python-float": (
        lambda a, b, d: float(d.detach().sum()),
        r"returned -?\d\.\d+ \(float\); it must return a scalar torch\.Tensor computed from lora_A",
    ),
    "numpy": (
        lambda a, b, d: np.float32(1.0),
        r"returned np\.float32\(1\.0\) \(float32\); it must return a scalar torch\.Tensor",
    ),
    "vector": (
        lambda a, b, d: d.pow(2),
        r"returned a tensor of shape \(2,\); it must return a scalar \(reduce it",
    ),
    "int-tensor": (
        lambda a, b, d: (d > 0).sum(),
        r"returned a torch\.int64 tensor; it must return a floating-point",
    ),
    "detached": (
        lambda a, b, d: d.detach().sum(),
        r"returned a tensor that is not connected to lora_A, lora_B, lora_diag \(requires_grad=False\)",
    ),
    "constant": (
        lambda a, b, d: torch.tensor(0.5),
        r"returned a tensor that is not connected to lora_A, lora_B, lora_diag",
    ),
    "none": (lambda a, b, d: None, r"returned None \(NoneType\); it must return a scalar torch\.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_RESULTS))
def test_bad_regularizer_result_names_the_regularizer_and_layer(case):
    fn, message = BAD_RESULTS[case]
    with pytest.raises(TypeError, match=rf"regularizer 'mine' \(.*\) on model\.layers\.0\.q_proj {message}"):
        evaluate_regularizer("mine", fn, *_factors(), layer="model.layers.0.q_proj", needs_grad=True)


def test_good_regularizer_results():
    a, b, d = _factors()
    value = evaluate_regularizer(
        "sq", lambda a, b, d: d.pow(2).sum().reshape(1), a, b, d, layer="x", needs_grad=True
    )
    assert value.shape == () and value.requires_grad
    # Without grad (evaluation), a detached or constant value is fine.
    assert (
        float(
            evaluate_regularizer("c", lambda a, b, d: torch.tensor(0.5), a, b, d, layer="x", needs_grad=False)
        )
        == 0.5
    )


def test_regularizer_with_a_wrong_signature_is_refused_at_registration():
    with pytest.raises(
        TypeError,
        match=r"register_regularizer\('two_args'\): .*\(lora_A, lora_B\) cannot be called as fn\(lora_A, lora_B, "
        r"lora_diag\); a regularizer takes the three factors as positional arguments",
    ):

        @register_regularizer("two_args")
        def two_args(lora_A, lora_B):
            return lora_A.sum()

    with pytest.raises(ValueError, match="unknown regularizer 'two_args'"):
        KaSAConfig(regularizers={"two_args": 1.0})

    @register_regularizer("test_config_checks_varargs")
    def flexible(*factors, scale=1.0):
        return factors[2].sum() * scale

    unregister_regularizer("test_config_checks_varargs")
