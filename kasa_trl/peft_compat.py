"""PEFT's ``LoraConfig(kasa_config=KasaConfig(beta, gamma))`` and ``KaSAConfig``: the one mapping, field by field,
both ways (``kasa_config_from_lora``, ``lora_fields_from_kasa``).

Every place that meets a PEFT config uses it: ``KaSATrainer(peft_config=LoraConfig(...))`` (a new adapter) and
``kasa_trl.integrations.peft.import_peft_kasa`` (a saved PEFT KaSA adapter). Every field of PEFT 0.21's ``LoraConfig`` is
mapped, accepted because it cannot change the result, or refused by name with what to do; nothing is dropped
silently. A field this module does not know (a newer PEFT) is refused unless it is empty (``None``, ``False``,
``{}``, ``[]``). peft itself is never imported: the config is read as a dataclass or a mapping (its ``to_dict()``
or ``adapter_config.json``).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from .config import KaSAConfig

# PEFT's KasaConfig defaults (peft/tuners/lora/config.py) and the kasa_trl regularizers they weight; both use
# the paper's sum over layers.
PEFT_KASA_DEFAULTS = {"beta": 1e-4, "gamma": 1e-3}
BETA_REGULARIZER = "singular_value_l2"
GAMMA_REGULARIZER = "orthogonality"

# Fields that say where the adapter came from, or take effect only at run time or with an option that is itself
# refused below (megatron_core with megatron_config, qalora_group_size with use_qalora, the init sub-configs with
# their init_lora_weights, which PEFT itself ignores otherwise).
_NO_EFFECT = frozenset(
    {
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "runtime_config",
        "megatron_core",
        "qalora_group_size",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
    }
)
_MAPPED = frozenset(
    {
        "peft_type",
        "kasa_config",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "inference_mode",
        "fan_in_fan_out",
    }
)
_TARGETS = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"})
# Options kasa_trl's KaSA layers do not have, refused unless empty: field -> what to do instead.
_UNSUPPORTED = {
    "modules_to_save": "kasa_trl saves the adapter only: drop it and unfreeze and save those modules yourself",
    "megatron_config": "kasa_trl wraps nn.Linear and Conv1D only, not Megatron's parallel layers",
    "trainable_token_indices": "kasa_trl trains no embedding rows: drop it",
    "use_dora": "DoRA is another LoRA variant: drop it to train KaSA",
    "velora_config": "VeLoRA is another LoRA variant: drop it to train KaSA",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is another LoRA variant: drop it to train KaSA",
    "use_qalora": "QALoRA is another LoRA variant: drop it to train KaSA",
    "monteclora_config": "MonteCLoRA is another LoRA variant: drop it to train KaSA",
    "use_bdlora": "BD-LoRA is another LoRA variant: drop it to train KaSA",
    "arrow_config": "Arrow routing is another LoRA variant: drop it to train KaSA",
    "layer_replication": "kasa_trl does not replicate layers: build the expanded model first",
    "lora_bias": "KaSA layers have no bias on lora_B: drop it",
    "target_parameters": "kasa_trl adapts modules (nn.Linear, Conv1D), not bare parameters: use target_modules",
    "ensure_weight_tying": "kasa_trl applies its own rule to tied weights (docs/guarantees.md): drop it",
}
# PEFT turns a dict in these into the sub-config (``{}`` enables the variant with its defaults): set unless None.
_SUB_CONFIGS = frozenset({"velora_config", "monteclora_config", "use_bdlora", "arrow_config"})
# init_lora_weights values that only choose the starting A and B, harmless when saved factors replace them.
_INIT_ONLY = (True, False, "gaussian", "orthogonal", "eva")


def kasa_config_from_lora(
    config: Any, *, where: str, new_adapter: bool = True, **overrides: Any
) -> KaSAConfig:
    """The ``KaSAConfig`` equivalent to a PEFT ``LoraConfig(kasa_config=...)``, or a ``ValueError`` naming every
    option kasa_trl cannot honour.

    Args:
        config: a ``peft.LoraConfig`` or its dict (``to_dict()``, ``adapter_config.json``) with ``kasa_config``.
        where: how to name the config in messages (``"peft_config"``, a path).
        new_adapter: ``True`` when kasa_trl initializes the adapter (training), ``False`` when saved factors
            replace the initial ones (import): then ``init_lora_weights`` values that only pick the starting
            factors are accepted.
        overrides: ``KaSAConfig`` fields to set (``base_mode``, ``decomposition_method``...). Passing
            ``target_modules`` (an import knows the adapted modules exactly) replaces PEFT's target selection
            (``target_modules``, ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``).

    Mapped: ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``target_modules`` and ``exclude_modules``
    (same matching rules), ``layers_to_transform``/``layers_pattern`` (into an equivalent ``target_modules``
    regex), ``kasa_config`` (``beta``, ``gamma`` -> the ``singular_value_l2`` and ``orthogonality`` weights, sum
    over layers, as PEFT's ``_get_kasa_loss``). ``fan_in_fan_out`` is accepted either way: PEFT, like kasa_trl,
    takes the layout from the module type (``Conv1D`` or ``nn.Linear``). The result uses the paper's truncation
    and the ``sum`` reduction, as PEFT does, unless overridden.
    """
    fields = _as_dict(config, where)
    problems: list[str] = []

    def refuse(name: str, advice: str) -> None:
        problems.append(f"{name}={fields[name]!r} ({advice})")

    peft_type = fields.get("peft_type")
    if peft_type not in (None, "LORA"):
        refuse("peft_type", "only LoRA configs carry KaSA")
    if fields.get("kasa_config") is None:
        raise ValueError(
            f"{where} has no kasa_config: it is a plain LoRA config; pass LoraConfig(kasa_config=KasaConfig(...)) "
            "or a kasa_trl.KaSAConfig"
        )
    kasa = _as_dict(fields["kasa_config"], f"{where}: kasa_config")
    unknown_kasa = sorted(set(kasa) - set(PEFT_KASA_DEFAULTS))
    if unknown_kasa:
        problems.append(f"kasa_config fields {unknown_kasa} (unknown to kasa_trl: upgrade it, or drop them)")
    if new_adapter and fields.get("inference_mode"):
        refuse("inference_mode", "it freezes the adapter, so training would change nothing: drop it")
    if fields.get("bias", "none") != "none":
        refuse(
            "bias", "kasa_trl trains the adapter only: set bias='none' and unfreeze biases yourself if needed"
        )
    init = fields.get("init_lora_weights", True)
    if init is not True and (new_adapter or init not in _INIT_ONLY):
        refuse(
            "init_lora_weights",
            "kasa_trl initializes as the paper and PEFT's default (True): A kaiming-uniform, B = 0, sigma ~ N(0, 1); "
            "drop it"
            if new_adapter
            else "this init changes the base weights or the layer, so the saved factors do not apply to the "
            "original base: convert the adapter with PEFT first",
        )
    r, alpha = fields.get("r", 8), fields.get("lora_alpha", 8)
    for name, default in (("rank_pattern", r), ("alpha_pattern", alpha)):
        if any(value != default for value in (fields.get(name) or {}).values()):
            refuse(
                name,
                "KaSA layers share one r and one lora_alpha: use a single value, or adapt in two configs",
            )
    for name, advice in _UNSUPPORTED.items():
        value = fields.get(name)
        if value is not None if name in _SUB_CONFIGS else bool(value):
            refuse(name, advice)
    known = _MAPPED | _NO_EFFECT | _TARGETS | set(_UNSUPPORTED) | {"bias", "init_lora_weights"}
    known |= {"rank_pattern", "alpha_pattern"}
    for name in sorted(set(fields) - known):
        # {} is not "unset": PEFT builds a sub-config with its defaults from it.
        if fields[name] is not None and fields[name] is not False and fields[name] not in ([], ""):
            refuse(
                name, "a LoraConfig field this kasa_trl does not know: upgrade kasa_trl, or leave it unset"
            )
    targets = {} if "target_modules" in overrides else _targets(fields, refuse)
    if problems:
        raise ValueError(
            f"{where} sets LoraConfig options kasa_trl's KaSA does not honour: " + "; ".join(problems)
        )
    mapped = {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": fields.get("lora_dropout", 0.0),
        "use_rslora": fields.get("use_rslora", False),
        **targets,
        "truncation": "paper",
        "regularizers": {
            BETA_REGULARIZER: kasa.get("beta", PEFT_KASA_DEFAULTS["beta"]),
            GAMMA_REGULARIZER: kasa.get("gamma", PEFT_KASA_DEFAULTS["gamma"]),
        },
        "regularizer_reduction": "sum",
    }
    return KaSAConfig(**{**mapped, **overrides})


def lora_fields_from_kasa(config: KaSAConfig) -> dict[str, Any]:
    """The ``LoraConfig`` fields (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``kasa_config``) that
    give PEFT's KaSA the model settings and regularizers of ``config``: the inverse of ``kasa_config_from_lora``
    on what PEFT can hold. The targets are the caller's (an adapter knows its modules exactly).

    Warns:
        UserWarning: ``config`` uses regularizers other than beta and gamma, or the ``mean`` reduction, which
        PEFT's ``KasaConfig`` cannot hold (they only shape training).
    """
    weights = dict(config.regularizers)
    beta, gamma = weights.pop(BETA_REGULARIZER, 0.0), weights.pop(GAMMA_REGULARIZER, 0.0)
    if weights or config.regularizer_reduction != "sum":
        warnings.warn(
            f"PEFT's KasaConfig holds only beta ({BETA_REGULARIZER}) and gamma ({GAMMA_REGULARIZER}) summed over "
            f"layers; regularizers {sorted(weights)} and reduction={config.regularizer_reduction!r} are not exported",
            stacklevel=3,
        )
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "kasa_config": {"beta": beta, "gamma": gamma},
    }


def _as_dict(config: Any, where: str) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    raise TypeError(f"{where} must be a peft.LoraConfig or its dict, got {type(config).__name__}")


def _targets(fields: dict[str, Any], refuse: Callable[[str, str], None]) -> dict[str, Any]:
    """``target_modules`` and ``exclude_modules`` for ``KaSAConfig``, with PEFT's layer selection folded in."""
    targets = fields.get("target_modules")
    layers: Any = fields.get("layers_to_transform")  # checked below
    patterns = fields.get("layers_pattern")
    result: dict[str, Any] = {}
    exclude = fields.get("exclude_modules")
    if exclude:
        result["exclude_modules"] = sorted(exclude) if isinstance(exclude, (set, frozenset)) else exclude
    if targets is None:
        refuse(
            "target_modules",
            "PEFT then picks defaults per architecture (q_proj and v_proj for Llama); name the modules, or pass "
            "'all-linear'",
        )
        return result
    if isinstance(targets, str):
        for name in ("layers_to_transform", "layers_pattern"):
            if fields.get(name) not in (None, [], ""):
                refuse(
                    name, "PEFT does not allow it with a regex target_modules: put the layers in the regex"
                )
        result["target_modules"] = targets
        return result
    names = sorted(targets)
    if not names:
        refuse("target_modules", "an empty list adapts nothing")
        return result
    uses_layers = layers is not None and (not isinstance(layers, list) or len(layers) > 0)
    if patterns and not uses_layers:
        refuse(
            "layers_pattern", "PEFT requires layers_to_transform with it: add layers_to_transform or drop it"
        )
        return result
    if not uses_layers:
        result["target_modules"] = names
        return result
    indices = [layers] if isinstance(layers, int) else list(layers)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
        refuse("layers_to_transform", "layer indices must be integers")
        return result
    result["target_modules"] = layer_selection_regex(names, indices, patterns)
    return result


def layer_selection_regex(targets: list[str], layers: list[int], patterns: str | list[str] | None) -> str:
    """A regex (``re.fullmatch`` on the qualified name) selecting exactly the modules PEFT selects with
    ``target_modules=targets``, ``layers_to_transform=layers`` and ``layers_pattern=patterns``.

    PEFT (``check_target_module_exists``) takes a module whose name is one of ``targets``, or ends with
    ``.<target>`` and whose layer index is in ``layers``; the index is the number after the first match of
    ``(?:^|.*?\\.)<pattern>\\.(\\d+)\\.`` for the first pattern that matches (``.*?\\.[^.]*\\.(\\d+)\\.`` without a
    pattern), compared as an integer. The regex replays that first match in a lookahead (Python's lookaheads do
    not backtrack), consumes it, and requires the index that follows to be one of ``layers``.
    """
    names = "|".join(re.escape(t) for t in targets)
    wanted = sorted({i for i in layers if i >= 0})
    index = rf"0*(?:{'|'.join(str(i) for i in wanted)})\." if wanted else r"(?!)"
    if not patterns:
        prefixes = [r".*?\.[^.]*\."]
    else:
        prefixes = [rf"(?:^|.*?\.)(?:{p})\." for p in ([patterns] if isinstance(patterns, str) else patterns)]
    branches = []
    for k, prefix in enumerate(prefixes):
        earlier = "".join(rf"(?!{p}\d+\.)" for p in prefixes[:k])
        branches.append(rf"{earlier}(?=(?P<layer{k}>{prefix})\d+\.)(?P=layer{k}){index}")
    return rf"(?:{names})|(?=(?:.*\.)?(?:{names})\Z)(?:{'|'.join(branches)}).*"
