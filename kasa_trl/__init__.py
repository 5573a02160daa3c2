"""kasa_trl: KaSA (Knowledge-aware Singular-value Adaptation, ICLR 2025) for the Hugging Face training stack."""

from .adapter_io import load_kasa_adapter, save_kasa_adapter
from .callbacks import SpectrumCallback
from .config import KaSAConfig
from .layer import KaSALinear
from .model import apply_kasa, get_kasa_config, kasa_adapters_disabled, kasa_layers, merge_and_unload, unload
from .regularizers import register_regularizer, registered_regularizers, unregister_regularizer

__version__ = "0.1.0"


def __getattr__(name: str):
    # The trainers pull in TRL (seconds to import); load them on first use so `import kasa_trl` stays light.
    if name in ("KaSATrainer", "KaSADPOTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'kasa_trl' has no attribute {name!r}")


__all__ = [
    "KaSAConfig",
    "KaSALinear",
    "KaSATrainer",
    "KaSADPOTrainer",
    "SpectrumCallback",
    "apply_kasa",
    "get_kasa_config",
    "kasa_adapters_disabled",
    "kasa_layers",
    "load_kasa_adapter",
    "merge_and_unload",
    "register_regularizer",
    "registered_regularizers",
    "save_kasa_adapter",
    "unload",
    "unregister_regularizer",
]
