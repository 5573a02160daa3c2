"""``KaSAConfig``: what to adapt and how, every field checked when it is set."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard, cast

import numpy as np
import torch

from .regularizers import REDUCTIONS, validate_regularizer_weights

CONFIG_FORMAT_VERSION = 1

# The modes a layer runs in; "auto" stands for one of them, resolved per model (resolve_base_mode).
RESOLVED_BASE_MODES = ("in_place", "non_destructive")
BASE_MODES = ("auto", *RESOLVED_BASE_MODES)
TRUNCATIONS = ("paper", "official")
# Bases whose own dtype cannot hold W_trunc accurately enough: "auto" keeps them untouched (non_destructive).
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)
# The fields that define the adapted model's function (with the set of adapted layers, which target_modules and
# exclude_modules select); the others (dropout, the regularizers, how R is computed) only shape training.
MODEL_FIELDS = ("r", "lora_alpha", "use_rslora", "base_mode", "truncation")
TRAINING_FIELDS = ("lora_dropout", "regularizers", "regularizer_reduction")
# The scalings check_scaling accepts: the square root of float32's normal range, about 5.4e-20 to 1.8e19.
SCALING_RANGE = (1.0 / math.sqrt(torch.finfo(torch.float32).max), math.sqrt(torch.finfo(torch.float32).max))


def _default_regularizers() -> dict[str, float]:
    return {"singular_value_l2": 1e-4, "orthogonality": 1e-3}


@dataclass
class KaSAConfig:
    """Configuration of a KaSA adapter (arXiv 2412.06071).

    Field names follow PEFT's ``LoraConfig`` where the concept is the same (``r``, ``lora_alpha``,
    ``lora_dropout``, ``target_modules``, ``exclude_modules``, ``use_rslora``). Every field is checked when it is
    set (at construction and on assignment); an error names the field, the value and what to pass instead.
    NumPy scalars are accepted and stored as Python ``int``/``float``/``bool``.
    """

    r: int = field(
        default=8, metadata={"help": "Adapter rank; also the number of singular components dropped."}
    )
    lora_alpha: float = field(
        default=16, metadata={"help": "Scaling numerator (finite, > 0): scaling = lora_alpha / r."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    target_modules: list[str] | str = field(
        default="all-linear",
        metadata={
            "help": "Module names (a name matches itself and any '.'-suffix, e.g. 'q_proj'), a regex matched "
            "with re.fullmatch against the qualified name, or 'all-linear' (every Linear/Conv1D except the "
            "output head)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex (same rules as target_modules) never adapted."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "scaling = lora_alpha / sqrt(r) (rsLoRA)."})
    base_mode: Literal["auto", "in_place", "non_destructive"] = field(
        default="auto",
        metadata={
            "help": "'in_place' overwrites W with W_trunc (the paper); 'non_destructive' keeps W bit-exact and "
            "subtracts the removed part R x in forward; 'auto' (default) is 'in_place' on fp32/fp64 bases and "
            "'non_destructive' on bf16/fp16 bases, whose dtype rounds W_trunc by about as much as R itself "
            "(docs/guarantees.md, Numerical limits), and on bitsandbytes 4-bit/8-bit bases (the only mode they "
            "run in: kasa_trl.quantized). The config of an adapted model records the mode chosen."
        },
    )
    truncation: Literal["paper", "official"] = field(
        default="paper",
        metadata={
            "help": "'paper' keeps k - r components (k = min(out, in)); 'official' keeps in_features - r as the "
            "official code does, so nothing is dropped when out_features <= in_features - r."
        },
    )
    decomposition_method: str = field(
        default="auto",
        metadata={"help": "How the r smallest singular triplets are found (see decomposition)."},
    )
    regularizers: dict[str, float] = field(
        default_factory=_default_regularizers,
        metadata={"help": "Regularizer name -> weight (beta, gamma in the paper); names from the registry."},
    )
    regularizer_reduction: Literal["sum", "mean"] = field(
        default="sum",
        metadata={"help": "How per-layer terms combine: 'sum' (paper, PEFT) or 'mean' (official code)."},
    )

    def __setattr__(self, name: str, value: Any) -> None:
        check = _FIELD_CHECKS.get(name)
        if check is not None:
            value = check(name, value)
        if name in _SCALING_FIELDS:
            # Checked once all three are set (construction sets them in field order), before storing the value.
            scaling_fields: dict[str, Any] = {key: self.__dict__.get(key) for key in _SCALING_FIELDS}
            scaling_fields[name] = value
            if all(v is not None for v in scaling_fields.values()):
                check_scaling(**scaling_fields)
        super().__setattr__(name, value)

    def validate(self) -> None:
        """Re-run every field check on the values held now, with the same messages as on assignment.

        The list and dict fields can be changed in place (``config.target_modules.append(...)``,
        ``config.regularizers[name] = w``), which no assignment check sees; ``to_dict`` (so every adapter
        writer) and ``apply_kasa`` call this, so such a change is refused before it is used or written.
        """
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name))

    @property
    def scaling(self) -> float:
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (``lora_scaling``)."""
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    def removed_rank(self, out_features: int, in_features: int) -> int:
        """How many singular triplets the truncation removes from an (out, in) weight: ``r`` with the paper's
        truncation; with the official one only the excess of ``min(out, in)`` over the ``in - r`` components it
        keeps (0 when ``out <= in - r``). Assumes ``r < min(out, in)``, which ``targets.removed_rank`` checks."""
        if self.truncation == "paper":
            return self.r
        return max(0, min(out_features, in_features) - (in_features - self.r))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the format version; the config is checked first (``validate``), so what it
        returns always reads back with ``from_dict``."""
        self.validate()
        return {"kasa_config_version": CONFIG_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KaSAConfig:
        """Inverse of ``to_dict``; unknown keys and future versions fail with the list of known keys."""
        if not isinstance(data, dict):
            raise TypeError(f"KaSAConfig.from_dict expects a dict, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("kasa_config_version", CONFIG_FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(
                f"kasa_config_version must be a positive integer, got {version!r}; the config is damaged: "
                f"re-save the adapter (this kasa_trl writes version {CONFIG_FORMAT_VERSION})"
            )
        if version > CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"KaSA config version {version!r} is newer than this kasa_trl understands "
                f"({CONFIG_FORMAT_VERSION}); upgrade kasa_trl to load it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ValueError(f"unknown KaSAConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> KaSAConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-save the adapter") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """The factor of the update ``dW = scaling * B diag(sigma) A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)``
    with rsLoRA (as LoRA and PEFT)."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def check_scaling(lora_alpha: float, r: int, use_rslora: bool) -> None:
    """Refuse a ``lora_alpha`` whose scaling (``lora_scaling``) lies outside ``SCALING_RANGE``.

    The scaling multiplies the adapter's output and every adapter gradient in float32 (the adapter's dtype):
    1e38 overflows as soon as a singular value exceeds 3.4, and 1e-38 leaves the gradients 0 or subnormal, so
    training changes nothing. Keeping it within the square root of float32's range (about 5.4e-20 to 1.8e19)
    leaves the other half of the exponent range to the factors and activations.
    """
    scaling = lora_scaling(lora_alpha, r, use_rslora)
    low, high = SCALING_RANGE
    if not low <= scaling <= high:
        denominator = f"sqrt(r={r})" if use_rslora else f"r={r}"
        raise ValueError(
            f"lora_alpha={lora_alpha!r} gives scaling = lora_alpha / {denominator} = {scaling:.3g}, outside "
            f"[{low:.3g}, {high:.3g}]: in float32 so large a scaling makes the adapter's output inf/NaN and so small "
            "a one makes it and every adapter gradient 0; pass a lora_alpha of the order of r (PEFT's usual "
            "choice is lora_alpha=2*r)"
        )


def resolve_base_mode(base_mode: str, weight_dtypes: Iterable[torch.dtype]) -> str:
    """The mode ``base_mode`` stands for on targets whose weights have ``weight_dtypes``.

    ``"auto"`` is ``"non_destructive"`` when any target weight is bf16/fp16 (rounding ``W_trunc`` to that dtype
    would change it by about as much as the removed part ``R``), else ``"in_place"``; the other modes are
    returned as they are.
    """
    _check_choice("base_mode", base_mode, BASE_MODES)
    if base_mode != "auto":
        return base_mode
    return "non_destructive" if any(d in LOW_PRECISION_DTYPES for d in weight_dtypes) else "in_place"


def config_differences(
    requested: KaSAConfig, actual: KaSAConfig, fields: Iterable[str] | None = None
) -> list[tuple[str, Any, Any]]:
    """``(field, requested value, actual value)`` for each of ``fields`` (default: all) that differs.

    A requested ``base_mode="auto"`` matches either resolved mode: ``actual`` is usually the config an adapted
    model carries, where ``"auto"`` was resolved for the base's dtype.
    """
    names = list(fields) if fields is not None else [f.name for f in dataclasses.fields(KaSAConfig)]
    differences = []
    for name in names:
        want, have = getattr(requested, name), getattr(actual, name)
        if name == "base_mode" and "auto" in (want, have):
            continue
        if want != have:
            differences.append((name, want, have))
    return differences


def format_differences(differences: list[tuple[str, Any, Any]], labels: tuple[str, str]) -> str:
    """``"r: 4 (requested) vs 2 (model); ..."`` for ``config_differences``' result."""
    first, second = labels
    return "; ".join(f"{name}: {a!r} ({first}) vs {b!r} ({second})" for name, a, b in differences)


# -- field checks: each returns the value to store (plain Python types) or raises naming the field ---------------


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")
    return str(value)


def _choice(choices: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> Callable[[str, object], str]:
    def check(name: str, value: object) -> str:
        return _check_choice(name, value, choices() if callable(choices) else choices)

    return check


def _decomposition_methods() -> tuple[str, ...]:
    # Local import: importing the config must not load the LAPACK bindings.
    from .decomposition import DECOMPOSITION_METHODS

    return DECOMPOSITION_METHODS


def _is_integer(value: object) -> TypeGuard[numbers.Integral]:
    """Python and NumPy integers; not bools (``numbers.Integral`` includes ``bool``, not ``numpy.bool_``)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> TypeGuard[numbers.Real]:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_finite(value: numbers.Real) -> bool:
    """Finite as a float; False for an int or Fraction beyond the float range (``math.isfinite`` raises there)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _check_r(name: str, value: object) -> int:
    if not _is_integer(value) or int(value) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; pass e.g. {name}=8")
    return int(value)


def _check_alpha(name: str, value: object) -> float:
    if not _is_real(value) or not _is_finite(value) or value <= 0:
        raise ValueError(
            f"{name} must be a positive number, got {value!r}: pass a finite value > 0 (scaling = {name} / r; "
            f"PEFT's usual choice is {name}=2*r)"
        )
    return int(value) if _is_integer(value) else float(value)


def _check_dropout(name: str, value: object) -> float:
    # Checked as stored too: a value just below 1 (a Fraction, a NumPy long double) can round to the float 1.0.
    if not _is_real(value) or value < 0.0 or not value < 1.0 or float(value) >= 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}; 0 turns dropout off")
    return float(value)


def _check_flag(name: str, value: object) -> bool:
    # numpy.bool_ is no bool subclass; 0/1 or "no" are refused: "no" would silently read as True.
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


# Characters no module name holds: a list entry with one of them was meant as a regex.
_REGEX_ONLY = re.compile(r"[*+?()\[\]{}|^$\\]")


def _check_targets(name: str, value: object) -> list[str] | str:
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be empty")
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(
                f"{name}={value!r} is not a valid regular expression ({e}); fix the pattern, or pass a list of "
                "module names such as ['q_proj', 'v_proj']"
            ) from None
        return str(value)
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v for v in value):
        for entry in value:
            if entry == "all-linear":
                raise ValueError(
                    f"{name} holds 'all-linear' in a list, where it would be read as a module name; pass "
                    f"{name}='all-linear' as a string"
                )
            if _REGEX_ONLY.search(entry):
                raise ValueError(
                    f"{name} entry {entry!r} is not a module name: list entries are names matched as themselves or "
                    f"a '.'-suffix; pass a single string to match a regular expression, e.g. {name}={entry!r}"
                )
        return sorted(value) if isinstance(value, set) else [str(v) for v in value]
    raise ValueError(f"{name} must be a non-empty list of module names or a regex string, got {value!r}")


def _check_optional_targets(name: str, value: object) -> list[str] | str | None:
    return None if value is None else _check_targets(name, value)


def _check_regularizers(name: str, value: object) -> dict[str, float]:
    return validate_regularizer_weights(cast(Mapping[str, float], value))  # it checks what it gets


# The fields the scaling depends on (check_scaling).
_SCALING_FIELDS = ("lora_alpha", "r", "use_rslora")

_FIELD_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "r": _check_r,
    "lora_alpha": _check_alpha,
    "lora_dropout": _check_dropout,
    "target_modules": _check_targets,
    "exclude_modules": _check_optional_targets,
    "use_rslora": _check_flag,
    "base_mode": _choice(BASE_MODES),
    "truncation": _choice(TRUNCATIONS),
    "decomposition_method": _choice(_decomposition_methods),
    "regularizers": _check_regularizers,
    "regularizer_reduction": _choice(REDUCTIONS),
}
