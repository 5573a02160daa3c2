"""kasa_trl <-> PEFT: exact export to vanilla LoRA, and PEFT's KaSA variant (peft >= 0.21) in and out.

- ``export_lora``: a KaSA adapter as a plain PEFT LoRA adapter of rank ``r + n`` on the ORIGINAL base, exact
  (``W + B2 A2 = W_trunc + dW``); servable by PEFT, vLLM multi-LoRA and TGI. Works for Linear and Conv1D targets.
- ``import_peft_kasa``: a PEFT KaSA adapter (directory or live ``PeftModel``) as kasa_trl KaSA layers.
- ``export_peft_kasa``: a kasa_trl adapter in PEFT's KaSA format (Linear targets, paper truncation).

Outputs are written atomically and never over an input or over files kasa_trl did not write
(``kasa_trl.atomic_outputs``). Writing the files does not need PEFT installed; PEFT is needed to load them, and to
import from a live ``PeftModel``.
"""

from ._source import resolve_base
from .kasa_format import export_peft_kasa, import_peft_kasa
from .lora_export import VLLM_MAX_LORA_RANKS, export_lora

__all__ = [
    "VLLM_MAX_LORA_RANKS",
    "export_lora",
    "export_peft_kasa",
    "import_peft_kasa",
    "resolve_base",
]
