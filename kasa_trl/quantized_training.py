"""The KaSA trainers on a quantized base (bitsandbytes 4-bit or 8-bit, QLoRA-style): what they do differently.

* transformers' ``Trainer`` refuses a quantized model that carries no trainable adapter it recognizes ("You
  cannot perform fine-tuning on purely quantized models", ``transformers.trainer_utils.
  validate_quantization_for_training``). It recognizes adapters by the model attribute ``_hf_peft_config_loaded``,
  which transformers' own adapter integration sets on a model when it attaches trainable adapters. The KaSA
  trainers therefore attach KaSA's adapters BEFORE the TRL constructor runs, and set that attribute on the model
  instance for the duration of the constructor only (``trainer_construction``): the check then sees what it asks
  for, trainable adapters on the quantized model. Nothing in transformers is patched; the attribute is gone
  afterwards, so transformers' PEFT methods on the model behave as before.
* TRL's constructors cast every trainable parameter of a quantized model to bfloat16 (its QLoRA convention for
  PEFT's LoRA factors). KaSA's adapter keeps its own dtype (float32 by default): the learned singular values move
  by updates bfloat16 would round away (TRL exempts DoRA's magnitude vector for the same reason). The
  constructor's casts of the adapter are undone (the very same tensors are put back).
* The k-bit preparation PEFT's ``prepare_model_for_kbit_training`` does: the input gradients that checkpointing
  needs when the base is frozen are enabled by the trainers (``gradient_checkpointing``, reentrant or not); norms
  and other unquantized parameters are left in the dtype the model was loaded in (transformers keeps what its
  quantizer does not quantize in the ``dtype`` given to ``from_pretrained``; Llama's RMSNorm computes in float32
  internally). Call ``peft.prepare_model_for_kbit_training(model)`` before the trainer to also cast them to
  float32: it adds no PEFT layers, so the KaSA trainers accept the model it returns.
* Supported: one process (CPU or one GPU), DDP, DeepSpeed ZeRO-1/2 (they partition only the adapter's gradients
  and optimizer states; the quantized base is held whole by every rank). Refused (``check_quantized_training``):
  ZeRO-3 and FSDP, which partition the frozen base weights: neither can partition bitsandbytes' packed weights
  with their quantization state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from .model import kasa_layers
from .quantized import has_quantized_layers


def check_quantized_training(model: Any, args: Any, quantization_config: Any = None) -> None:
    """Refuse, before anything changes, a KaSA trainer setup that cannot train a quantized base: ZeRO-3 or FSDP
    in ``args`` with a ``model`` holding bitsandbytes layers; a quantized model given by name to ``KaSATrainer``
    (``quantization_config``, or one in ``args.model_init_kwargs``), which TRL would load and transformers refuse
    before KaSA could be applied."""
    if isinstance(model, str):
        init_kwargs = getattr(args, "model_init_kwargs", None) or {}
        if quantization_config is not None or init_kwargs.get("quantization_config") is not None:
            raise ValueError(
                f"KaSATrainer got the model as a name ({model!r}) with a quantization_config: KaSA must be applied "
                "to a quantized base before the trainer is built, so load it first and pass the model: "
                f"AutoModelForCausalLM.from_pretrained({model!r}, quantization_config=BitsAndBytesConfig(...), "
                "device_map=...)"
            )
        return
    if not isinstance(model, nn.Module) or not has_quantized_layers(model):
        return
    plugin = getattr(args, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None) if plugin is not None else None
    if stage == 3:
        raise ValueError(
            "DeepSpeed ZeRO-3 cannot train on a quantized (bitsandbytes) base: it partitions the frozen base "
            "weights, and bitsandbytes' packed 4-bit/8-bit weights and their quantization state cannot be "
            "partitioned. Supported with a quantized base: one process, DDP (torchrun/accelerate without "
            "DeepSpeed) and ZeRO-1/2 (e.g. deepspeed_configs/zero2.json); for ZeRO-3, load the base in bf16"
        )
    if getattr(args, "fsdp", None):
        raise ValueError(
            "FSDP cannot train KaSA on a quantized (bitsandbytes) base: it shards the frozen base weights, which "
            "bitsandbytes packs with their quantization state. Supported with a quantized base: one process, DDP "
            "and DeepSpeed ZeRO-1/2; for FSDP, load the base in bf16"
        )


@contextlib.contextmanager
def trainer_construction(model: Any) -> Iterator[None]:
    """Around the TRL/transformers trainer constructor, for a model carrying KaSA layers on a quantized base: mark
    it as carrying trainable adapters (``_hf_peft_config_loaded`` on the instance, see the module docstring) and
    undo the constructor's casts of the adapter parameters. A no-op for any other model."""
    if not isinstance(model, nn.Module) or not has_quantized_layers(model) or not kasa_layers(model):
        yield
        return
    adapter = [p for layer in kasa_layers(model).values() for p in layer.adapter_params().values()]
    data = [p.data for p in adapter]
    marked = "_hf_peft_config_loaded" not in vars(model)
    if marked:
        model._hf_peft_config_loaded = True  # type: ignore[assignment]  # torch types Module attributes Tensor | Module
    try:
        yield
    finally:
        if marked:
            del model._hf_peft_config_loaded
        for param, original in zip(adapter, data, strict=True):
            if param.data is not original:
                param.data = original
