"""``KaSAConfig``: what to adapt and how, validated when it is built."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from .regularizers import REDUCTIONS, validate_regularizer_weights

CONFIG_FORMAT_VERSION = 1

BASE_MODES = ("in_place", "non_destructive")
TRUNCATIONS = ("paper", "official")


def _default_regularizers() -> dict[str, float]:
    return {"singular_value_l2": 1e-4, "orthogonality": 1e-3}


@dataclass
class KaSAConfig:
    """Configuration of a KaSA adapter (arXiv 2412.06071).

    Field names follow PEFT's ``LoraConfig`` where the concept is the same (``r``, ``lora_alpha``,
    ``lora_dropout``, ``target_modules``, ``exclude_modules``, ``use_rslora``).
    """

    r: int = field(
        default=8, metadata={"help": "Adapter rank; also the number of singular components dropped."}
    )
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator: scaling = lora_alpha / r."})
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
    base_mode: Literal["in_place", "non_destructive"] = field(
        default="in_place",
        metadata={
            "help": "'in_place' overwrites W with W_trunc (the paper); 'non_destructive' keeps W bit-exact and "
            "subtracts the removed part R x in forward."
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

    def __post_init__(self) -> None:
        # Local import: decomposition is pure math and must not depend on config.
        from .decomposition import DECOMPOSITION_METHODS

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or self.lora_alpha <= 0
        ):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.target_modules = _check_targets("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = _check_targets("exclude_modules", self.exclude_modules)
        _check_choice("base_mode", self.base_mode, BASE_MODES)
        _check_choice("truncation", self.truncation, TRUNCATIONS)
        _check_choice("decomposition_method", self.decomposition_method, DECOMPOSITION_METHODS)
        _check_choice("regularizer_reduction", self.regularizer_reduction, REDUCTIONS)
        self.regularizers = validate_regularizer_weights(self.regularizers)

    @property
    def scaling(self) -> float:
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the format version."""
        return {"kasa_config_version": CONFIG_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KaSAConfig:
        """Inverse of ``to_dict``; unknown keys and future versions fail with the list of known keys."""
        data = dict(data)
        version = data.pop("kasa_config_version", CONFIG_FORMAT_VERSION)
        if not isinstance(version, int) or version > CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"KaSA config version {version!r} is newer than this kasa_trl understands "
                f"({CONFIG_FORMAT_VERSION}); upgrade kasa_trl to load it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown KaSAConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> KaSAConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-save the adapter") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def _check_targets(name: str, value: object) -> list[str] | str:
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be empty")
        return value
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v for v in value):
        return sorted(value) if isinstance(value, set) else list(value)
    raise ValueError(f"{name} must be a non-empty list of module names or a regex string, got {value!r}")
