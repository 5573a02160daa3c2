"""``KaSATrainer`` (SFT) and the mixin the KaSA trainers share: TRL's trainers plus the KaSA regularizers.

The glue is thin: a mixin applies KaSA to the model (unless it already carries KaSA layers), installs the
regularizer ``PenaltySession`` (see ``penalty``), and overrides ``compute_loss`` (charge the regularizers, log
their values through TRL's ``self._metrics``), ``log`` (merge ``SpectrumCallback`` scalars), ``save_model`` and
the checkpoint loading (a KaSA adapter directory instead of full weights).

``train`` first refuses what would train nothing or resume the wrong thing (a frozen, merged or disabled adapter,
an optimizer without the adapter, a checkpoint of other model settings or without optimizer state), before
anything changes; a callback stops the first step if no adapter parameter received a gradient (see
``training_guards``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import set_seed
from transformers.trainer_utils import TrainOutput
from trl import SFTConfig, SFTTrainer

from .adapter_io import base_quantization, layer_tensors, model_name_or_path, read_adapter, write_adapter
from .callbacks import log_spectra
from .checkpoint import SavedAdapter, newest_complete_checkpoint
from .config import KaSAConfig, config_differences, format_differences
from .distributed import gathered
from .model import apply_kasa, get_kasa_config, kasa_layers
from .penalty import PenaltySession, attach_penalties
from .quantized import has_quantized_layers
from .quantized_training import check_quantized_training, trainer_construction
from .training_guards import (
    GradientReachesAdapters,
    check_no_peft_layers,
    check_resumable,
    check_same_adapter,
    check_trainable,
)
from .unloading import unload

if TYPE_CHECKING:
    # What the mixin is mixed into, for the type checker: TRL's trainers are transformers Trainers.
    from transformers import Trainer as _MixedInto
else:
    _MixedInto = object

TRAINING_ARGS_NAME = "training_args.bin"


def kasa_config_from_peft(peft_config: Any) -> KaSAConfig:
    """A ``KaSAConfig`` from a ``KaSAConfig`` or a PEFT ``LoraConfig(kasa_config=...)``; else a clear error."""
    if isinstance(peft_config, KaSAConfig):
        return peft_config
    kasa = getattr(peft_config, "kasa_config", None)
    if kasa is None or not hasattr(kasa, "beta"):
        raise TypeError(
            f"peft_config must be a kasa_trl.KaSAConfig (or a peft.LoraConfig with kasa_config set), got "
            f"{type(peft_config).__name__}{' without kasa_config' if hasattr(peft_config, 'kasa_config') else ''}; "
            "pass kasa_config=KaSAConfig(...) instead"
        )
    # The one mapping of LoraConfig fields (each honoured or refused by name) lives in peft_compat.
    from .peft_compat import kasa_config_from_lora

    return kasa_config_from_lora(peft_config, where="peft_config", new_adapter=True)


class KaSATrainerMixin(_MixedInto):
    """What the KaSA trainers add to a TRL trainer. Put it before the TRL class in the bases."""

    kasa_config: KaSAConfig
    _kasa_session: PenaltySession
    model: nn.Module  # the Trainer's (PreTrainedModel | Module | None): never None once its constructor ran
    _metrics: dict[str, defaultdict[str, list[float]]]  # TRL's, averaged in its log()

    def _kasa_resolve_config(self, kasa_config: KaSAConfig | None, peft_config: Any) -> KaSAConfig | None:
        if kasa_config is not None and peft_config is not None:
            raise ValueError("pass either kasa_config or peft_config (a KaSA config), not both")
        if peft_config is not None:
            return kasa_config_from_peft(peft_config)
        if kasa_config is not None and not isinstance(kasa_config, KaSAConfig):
            raise TypeError(f"kasa_config must be a kasa_trl.KaSAConfig, got {type(kasa_config).__name__}")
        return kasa_config

    @staticmethod
    def _kasa_adapt(model: nn.Module, kasa_config: KaSAConfig | None) -> KaSAConfig:
        """Apply KaSA to ``model`` unless it already carries KaSA layers; return the config it is adapted with.

        A model that carries KaSA layers keeps them: ``kasa_config`` must then describe them (every field but the
        regularizers, which only shape training, and a requested ``base_mode="auto"`` matches either mode); the
        trainer trains with its regularizers (and saves them with the adapter); ``model.kasa_config`` is left as is.
        """
        check_no_peft_layers(model)
        if kasa_layers(model):
            existing = get_kasa_config(model)
            if kasa_config is None:
                return existing
            fields = [f.name for f in dataclasses.fields(KaSAConfig)]
            differences = config_differences(
                kasa_config,
                existing,
                [f for f in fields if f not in ("regularizers", "regularizer_reduction")],
            )
            if differences:
                raise ValueError(
                    "the model already carries KaSA layers with a different KaSAConfig; drop kasa_config or start "
                    "from an untouched base model (without kasa_config the model's adapter is trained as it is). "
                    f"Differences: {format_differences(differences, ('kasa_config', 'model'))}"
                )
            return dataclasses.replace(
                existing,
                regularizers=kasa_config.regularizers,
                regularizer_reduction=kasa_config.regularizer_reduction,
            )
        apply_kasa(model, kasa_config if kasa_config is not None else KaSAConfig())
        # The model's copy: apply_kasa records the base_mode "auto" stood for.
        return get_kasa_config(model)

    @contextlib.contextmanager
    def _kasa_quantized_base(
        self, model: Any, kasa_config: KaSAConfig | None, args: Any, quantization_config: Any
    ) -> Iterator[None]:
        """Around the TRL constructor: on a quantized base, KaSA goes on first (transformers' Trainer refuses a
        quantized model without trainable adapters) and the constructor runs inside
        ``quantized_training.trainer_construction``; if it fails, the model is left as it was. A no-op for any
        other model."""
        check_quantized_training(model, args, quantization_config)
        if not isinstance(model, nn.Module) or not has_quantized_layers(model):
            yield
            return
        adapted_here = not kasa_layers(model)
        requires_grad = [(param, param.requires_grad) for param in model.parameters()]
        # Seeds the adapter's random init (A, sigma), as TRL's constructor seeds before creating PEFT adapters.
        set_seed(args.seed if args is not None else SFTConfig.seed)
        self._kasa_adapt(model, kasa_config)
        try:
            with trainer_construction(model):
                yield
        except BaseException:
            if adapted_here:
                unload(model)
                for param, flag in requires_grad:
                    param.requires_grad_(flag)
            raise

    def _kasa_setup(self, kasa_config: KaSAConfig | None) -> None:
        """After the TRL constructor: adapt ``self.model`` (if not done yet) and install the regularizers."""
        model = self.model
        self.kasa_config = self._kasa_adapt(model, kasa_config)
        if self.args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            # The base is frozen: reentrant checkpointing needs inputs that require grad to reach the adapters.
            model.enable_input_require_grads()  # type: ignore[operator]  # torch types Module attributes Tensor | Module
        self._kasa_session = attach_penalties(
            model, self.kasa_config.regularizers, self.kasa_config.regularizer_reduction
        )
        self.add_callback(GradientReachesAdapters())

    # -- loss and metrics ------------------------------------------------------------------------------
    def _kasa_micro_batch_factor(self, num_items_in_batch: Any) -> float:
        """1 / accumulation steps when the task loss is already normalized over the accumulated batch."""
        if not self.model.training:
            return 1.0
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        session = self._kasa_session
        session.begin(self._kasa_micro_batch_factor(num_items_in_batch))
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss, outputs = result if return_outputs else (result, None)
        loss = session.finish(cast(torch.Tensor, loss))
        mode = "train" if self.model.training else "eval"
        values = session.values()
        for name, value in values.items():
            self._metrics[mode][f"kasa/{name}"].append(float(value))
        total = session.total(values)
        if total is not None:
            self._metrics[mode]["kasa/regularization"].append(float(total))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Before the parent's: the TensorBoard / W&B callbacks read ``logs`` in on_log, before any user callback.
        log_spectra(self, logs)
        super().log(logs, start_time)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """As the Trainer's, minus ``lora_diag``: the learned singular values already carry their own explicit
        L2 penalty (``singular_value_l2``, the paper's beta); decoupled weight decay would add a second,
        hidden one whose strength depends on the learning rate."""
        return [name for name in super().get_decay_parameter_names(model) if not name.endswith("lora_diag")]

    # -- saving and loading ----------------------------------------------------------------------------
    def kasa_adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors, gathered under ZeRO-3 (a collective: every rank must call it)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in kasa_layers(self.model).items():
            with gathered(list(layer.adapter_params().values())):
                tensors.update({f"{name}.{key}": t for key, t in layer_tensors(layer).items()})
        return tensors

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """As ``Trainer.train``, refusing what would train nothing or resume the wrong thing, before any change.

        Refused: a model with no trainable KaSA parameter (an adapter loaded with ``is_trainable=False``, the
        default), merged or disabled KaSA layers, an optimizer without the adapter's parameters (trainable
        parameters outside the adapter are a warning: the trainer saves only the adapter); resuming from a
        checkpoint whose adapter was trained with other model settings (``r``,
        ``lora_alpha``, ``use_rslora``, ``base_mode``, ``truncation``, other layers or another truncation), and
        from one without optimizer, scheduler or RNG state unless ``save_only_model=True`` (then it is a warning:
        the optimizer starts fresh). ``resume_from_checkpoint=True`` takes the newest COMPLETE checkpoint
        (transformers' ``get_last_checkpoint`` takes the highest number even if its save was cut short).
        """
        check_trainable(self.model, self.optimizer)
        adapter = None
        if resume_from_checkpoint is True:
            newest = newest_complete_checkpoint(
                cast(str, self.args.output_dir),  # TrainingArguments sets it when not given
                require_optimizer=not self.args.save_only_model,
            )
            if newest is None:
                raise ValueError(
                    f"no complete checkpoint to resume from in {self.args.output_dir} (skipped ones are logged); "
                    "pass resume_from_checkpoint=None to start over"
                )
            resume_from_checkpoint, adapter = newest
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is not None:
            resume_from_checkpoint = os.fspath(resume_from_checkpoint)
            adapter = check_resumable(
                resume_from_checkpoint,
                self.model,
                self.kasa_config,
                save_only_model=self.args.save_only_model,
                adapter=adapter,
            )
            # checked against this model: _load_from_checkpoint copies it in without reading the file again
            self._kasa_resume_adapter: tuple[str, SavedAdapter] | None = (resume_from_checkpoint, adapter)
        try:
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        finally:
            self._kasa_resume_adapter = None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the KaSA adapter (not the full model) plus the tokenizer and training arguments."""
        # args.output_dir: TrainingArguments sets it when not given
        output_dir = output_dir if output_dir is not None else cast(str, self.args.output_dir)
        tensors = self.kasa_adapter_tensors()
        # Every rank holds the same gathered tensors, so under ZeRO-3 all ranks raise together.
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise FloatingPointError(
                f"KaSA adapter holds non-finite values ({', '.join(bad[:5])}); not saving it to {output_dir}. The "
                "adapter factors have diverged: lower the learning rate or the regularizer weights, enable "
                "max_grad_norm, and resume from kasa_trl.last_complete_checkpoint(output_dir)"
            )
        if self.args.should_save:
            # The base's name or folder, as transformers recorded it (the examples point it at the base they
            # saved): `kasa-trl merge ADAPTER OUT` then needs no --base.
            base = model_name_or_path(self.model)
            write_adapter(
                output_dir,
                tensors,
                self.kasa_config,
                base_model_name_or_path=base,
                base_quantization=base_quantization(self.model),
            )
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        checked = getattr(self, "_kasa_resume_adapter", None)
        if checked is not None and checked[0] == resume_from_checkpoint:
            self._kasa_copy_adapter(checked[1][1])
        else:
            self._kasa_load_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:
            return super()._load_best_model()
        # the Trainer calls this only when there is a best checkpoint
        self._kasa_load_adapter_weights(cast(str, self.state.best_model_checkpoint))

    def _kasa_load_adapter_weights(self, directory: str) -> None:
        """Copy a saved adapter's trained factors into this model's KaSA layers (same layers, same base)."""
        saved, per_layer = read_adapter(directory)
        check_same_adapter(directory, saved, per_layer, self.model, self.kasa_config)
        self._kasa_copy_adapter(per_layer)

    def _kasa_copy_adapter(self, per_layer: dict[str, dict[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for name, layer in kasa_layers(self.model).items():
                for key, param in layer.adapter_params().items():
                    param.copy_(per_layer[name][key])


class KaSATrainer(KaSATrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` training a KaSA adapter with the KaSA regularizers.

    Same arguments as ``SFTTrainer`` plus ``kasa_config`` (default ``KaSAConfig()``). ``peft_config`` may be a
    ``KaSAConfig`` or a ``peft.LoraConfig(kasa_config=...)`` (converted), nothing else. A model on a bitsandbytes
    4-bit/8-bit base is adapted before TRL's constructor runs (``kasa_trl.quantized_training``); pass it loaded.
    """

    def __init__(self, model: Any, *args: Any, kasa_config: KaSAConfig | None = None, **kwargs: Any) -> None:
        config = self._kasa_resolve_config(kasa_config, kwargs.pop("peft_config", None))
        training_args = kwargs.get("args", args[0] if args else None)
        with self._kasa_quantized_base(model, config, training_args, kwargs.get("quantization_config")):
            super().__init__(model, *args, **kwargs)
        self._kasa_setup(config)
