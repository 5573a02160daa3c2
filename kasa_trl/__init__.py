"""kasa_trl: KaSA (Knowledge-aware Singular-value Adaptation, ICLR 2025) for the Hugging Face training stack.

Names are imported on first use (PEP 562), so ``import kasa_trl`` and the ``kasa-trl`` CLI's ``--help`` stay
fast; ``from kasa_trl import KaSATrainer`` loads TRL only then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "KaSAConfig": "config",
    "KaSALinear": "layer",
    "KaSATrainer": "trainer",
    "KaSADPOTrainer": "dpo_trainer",
    "SpectrumCallback": "callbacks",
    "apply_kasa": "model",
    "attach_kasa_regularization": "regularization",
    "detach_kasa_regularization": "regularization",
    "get_kasa_config": "model",
    "is_complete_checkpoint": "checkpoint",
    "last_complete_checkpoint": "checkpoint",
    "kasa_adapters_disabled": "model",
    "kasa_layers": "model",
    "kasa_regularization": "regularization",
    "load_kasa_adapter": "adapter_io",
    "merge_and_unload": "unloading",
    "read_adapter_info": "adapter_files",
    "register_regularizer": "regularizers",
    "registered_regularizers": "regularizers",
    "save_kasa_adapter": "adapter_io",
    "unload": "unloading",
    "unregister_regularizer": "regularizers",
    "verify_adapter_base": "adapter_io",
}

__all__ = [
    "KaSAConfig",
    "KaSADPOTrainer",
    "KaSALinear",
    "KaSATrainer",
    "SpectrumCallback",
    "apply_kasa",
    "attach_kasa_regularization",
    "detach_kasa_regularization",
    "get_kasa_config",
    "is_complete_checkpoint",
    "kasa_adapters_disabled",
    "kasa_layers",
    "kasa_regularization",
    "last_complete_checkpoint",
    "load_kasa_adapter",
    "merge_and_unload",
    "read_adapter_info",
    "register_regularizer",
    "registered_regularizers",
    "save_kasa_adapter",
    "unload",
    "unregister_regularizer",
    "verify_adapter_base",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kasa_trl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from .adapter_files import read_adapter_info
    from .adapter_io import load_kasa_adapter, save_kasa_adapter, verify_adapter_base
    from .callbacks import SpectrumCallback
    from .checkpoint import is_complete_checkpoint, last_complete_checkpoint
    from .config import KaSAConfig
    from .dpo_trainer import KaSADPOTrainer
    from .layer import KaSALinear
    from .model import apply_kasa, get_kasa_config, kasa_adapters_disabled, kasa_layers
    from .regularization import attach_kasa_regularization, detach_kasa_regularization, kasa_regularization
    from .regularizers import register_regularizer, registered_regularizers, unregister_regularizer
    from .trainer import KaSATrainer
    from .unloading import merge_and_unload, unload
