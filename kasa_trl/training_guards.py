"""Checks the KaSA trainers run before training, so that training never silently does nothing or the wrong thing.

Each check refuses before anything changes, naming what is wrong and the fix: a model whose training would update
nothing or something the trainer does not save (``check_trainable``), a checkpoint that cannot be resumed from
exactly (``check_resumable``), PEFT layers under KaSA (``check_no_peft_layers``); ``GradientReachesAdapters`` stops
the first optimizer step when no adapter parameter received a gradient.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import is_peft_available

from .checkpoint import SavedAdapter, missing_training_state, read_checkpoint, unreadable_training_state
from .config import MODEL_FIELDS, TRAINING_FIELDS, KaSAConfig, config_differences, format_differences
from .model import kasa_layers

logger = logging.getLogger(__name__)


def check_trainable(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Refuse a model whose training would update nothing, or something the trainer does not save.

    Refused: no KaSA layers; merged or disabled ones; no trainable adapter parameter (an adapter loaded with
    ``is_trainable=False``, the default); an ``optimizer`` (given by the caller, or made by a former ``train()``)
    that does not hold every trainable adapter parameter. Warnings: a partly frozen adapter; trainable parameters
    outside the adapter (trained, but neither saved nor restored by the trainer).
    """
    layers = kasa_layers(model)
    if not layers:
        raise ValueError(
            "the model carries no KaSA layers any more (merge_and_unload or unload was called on it after the "
            "trainer was built); build a new trainer from the base model or from a loaded adapter"
        )
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"{len(merged)} of {len(layers)} KaSA layers are merged into their base weights ({abbreviate(merged)}): "
            "the forward no longer uses the adapter factors, so training would update nothing it computes "
            "with. Call layer.unmerge() for each layer of kasa_trl.kasa_layers(model) before train()"
        )
    disabled = [name for name, layer in layers.items() if not layer.adapter_enabled]
    if disabled:
        raise ValueError(
            f"{len(disabled)} of {len(layers)} KaSA adapters are disabled ({abbreviate(disabled)}): training would "
            "update nothing. Set layer.adapter_enabled = True (or leave the kasa_adapters_disabled block) "
            "before train()"
        )
    adapter = {f"{n}.{k}": p for n, layer in layers.items() for k, p in layer.adapter_params().items()}
    trainable = [name for name, param in adapter.items() if param.requires_grad]
    if not trainable:
        raise ValueError(
            f"no KaSA adapter parameter is trainable (all {len(adapter)} have requires_grad=False): the adapter "
            "was loaded for inference, as load_kasa_adapter(model, path) does by default, or frozen by hand, "
            "so training would update nothing. Load it with load_kasa_adapter(model, path, is_trainable=True)"
        )
    ids = {id(param) for param in adapter.values()}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    if others:
        # Allowed (a user may train a few modules alongside, as PEFT's modules_to_save does), but said loudly:
        # nothing of the trainer's saves or restores them.
        logger.warning(
            "kasa_trl: %d parameters outside the KaSA adapters are trainable (%s): they are trained, but the "
            "KaSA trainers save, checkpoint and resume only the adapter, so their trained values are not in "
            "save_model's output nor restored on resume; save them yourself, or freeze them "
            "(param.requires_grad_(False)) to train the adapter only",
            len(others),
            abbreviate(others),
        )
    if optimizer is not None:
        held = {id(param) for group in optimizer.param_groups for param in group["params"]}
        missing = [name for name in trainable if id(adapter[name]) not in held]
        if missing:
            raise ValueError(
                f"the optimizer does not hold {len(missing)} of the {len(trainable)} trainable KaSA parameters "
                f"({abbreviate(missing)}), so they would never be updated. An optimizer built from the base model "
                "before the trainer applied KaSA holds the old, now frozen, weights: build it from the adapted "
                "model (kasa_trl.apply_kasa(model, config) first, then pass the model), or let the trainer "
                "create it (optimizers=(None, None), optim=... in the training arguments)"
            )
    if len(trainable) < len(adapter):
        frozen = [name for name in adapter if name not in trainable]
        logger.warning(
            "kasa_trl: %d of %d KaSA adapter parameters are frozen (%s) and will not be trained",
            len(frozen),
            len(adapter),
            abbreviate(frozen),
        )


def check_resumable(
    checkpoint: str,
    model: nn.Module,
    config: KaSAConfig,
    *,
    save_only_model: bool = False,
    adapter: SavedAdapter | None = None,
) -> SavedAdapter:
    """Refuse a checkpoint ``model`` (trained with ``config``) cannot resume from exactly; nothing is loaded.
    Returns the checkpoint's adapter as ``read_adapter`` returns it, read once (``adapter``: already read from a
    checkpoint found complete, e.g. by ``newest_complete_checkpoint``; not read again).

    Refused: not a directory; not a complete checkpoint apart from the training state (``incomplete_reason``);
    an adapter of other model settings (``check_same_adapter``); no optimizer, scheduler or RNG state, unless the
    run saves only the model (``save_only_model``), where it is a warning: the optimizer starts fresh; an optimizer,
    scheduler or RNG state file cut short (``unreadable_training_state``), always.
    """
    if not Path(checkpoint).is_dir():
        raise ValueError(
            f"resume_from_checkpoint={checkpoint!r} is not a directory; pass a checkpoint-N directory of this "
            "run, or True for the newest complete one in output_dir"
        )
    reason = None
    if adapter is None:
        reason, adapter = read_checkpoint(checkpoint, require_optimizer=False)
    if adapter is None:
        raise ValueError(
            f"cannot resume from {checkpoint}: {reason}. Pass a complete checkpoint "
            "(kasa_trl.last_complete_checkpoint(output_dir) finds the newest one), or start a new run from a "
            "saved adapter with load_kasa_adapter(model, path, is_trainable=True)"
        )
    saved, per_layer = adapter
    check_same_adapter(checkpoint, saved, per_layer, model, config)
    unreadable = unreadable_training_state(checkpoint)
    if unreadable:
        raise ValueError(
            f"cannot resume from {checkpoint}: {'; '.join(unreadable)}. Resume from an earlier complete "
            "checkpoint (kasa_trl.last_complete_checkpoint(output_dir) skips this one), or start a new run from "
            "its adapter with load_kasa_adapter(model, path, is_trainable=True)"
        )
    missing = missing_training_state(checkpoint)
    if missing and not save_only_model:
        raise ValueError(
            f"cannot resume from {checkpoint}: {', '.join(missing)} missing, so training would go on with a "
            "fresh optimizer and a learning-rate schedule started over. Pass a complete checkpoint "
            "(kasa_trl.last_complete_checkpoint(output_dir)), or start a new run from its adapter with "
            "load_kasa_adapter(model, path, is_trainable=True); runs saved with save_only_model=True resume "
            "from such checkpoints with a warning"
        )
    if missing:
        logger.warning(
            "kasa_trl: resuming from %s without %s (save_only_model=True): the optimizer starts fresh, the "
            "learning-rate schedule starts over from its first step and the random numbers differ from an "
            "uninterrupted run",
            checkpoint,
            ", ".join(missing),
        )
    return adapter


def check_same_adapter(
    directory: str,
    saved: KaSAConfig,
    per_layer: dict[str, dict[str, torch.Tensor]],
    model: nn.Module,
    config: KaSAConfig,
) -> None:
    """Refuse a saved adapter (``saved``, ``per_layer``) for another model than ``model`` adapted with ``config``: other model settings (``MODEL_FIELDS``),
    other layers or another truncation. Changed training settings (``TRAINING_FIELDS``) are logged."""
    layers = kasa_layers(model)
    problems = []
    differences = config_differences(saved, config, MODEL_FIELDS)
    if differences:
        problems.append(format_differences(differences, ("checkpoint", "this trainer")))
    only_saved = sorted(set(per_layer) - set(layers))
    only_here = sorted(set(layers) - set(per_layer))
    if only_saved or only_here:
        targets = config_differences(saved, config, ("target_modules", "exclude_modules"))
        problems.append(
            "adapted layers differ ("
            + "; ".join(
                [f"only in the checkpoint: {abbreviate(only_saved)}"] * bool(only_saved)
                + [f"only in this model: {abbreviate(only_here)}"] * bool(only_here)
                + [format_differences(targets, ("checkpoint", "this trainer"))] * bool(targets)
            )
            + ")"
        )
    if problems:
        raise ValueError(
            f"checkpoint {directory} holds a KaSA adapter trained with other model settings than this "
            f"trainer's: {'; '.join(problems)}. Resume with the KaSAConfig the run was started with "
            f"(KaSAConfig.from_json({str(Path(directory) / 'kasa_config.json')!r})), or start a new run"
        )
    for name, layer in layers.items():
        if not torch.equal(per_layer[name]["removed_left"], layer.removed_left.cpu()):
            method = config_differences(saved, config, ("decomposition_method",))
            raise ValueError(
                f"checkpoint {directory} was trained on another truncation of {name}: another base model"
                + (f" or {format_differences(method, ('checkpoint', 'this trainer'))}" if method else "")
                + "; resume with the same base model and KaSAConfig"
            )
    changed = config_differences(saved, config, TRAINING_FIELDS)
    if changed:
        logger.warning(
            "kasa_trl: resuming from %s with changed training settings: %s",
            directory,
            format_differences(changed, ("checkpoint", "this trainer")),
        )


class GradientReachesAdapters(TrainerCallback):
    """Stops training at its first optimizer step when no trainable KaSA parameter received a gradient (the
    adapted modules are not on the forward's path, or reentrant checkpointing cut them off): the step would
    update nothing; warns when every gradient is exactly 0 (nothing would change either). Skipped under DeepSpeed
    and FSDP, which keep gradients out of ``param.grad``."""

    def __init__(self) -> None:
        self.checked = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.checked = False

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if self.checked or model is None or args.deepspeed or args.fsdp:
            return
        self.checked = True
        params = [
            (f"{name}.{key}", p)
            for name, layer in kasa_layers(model).items()
            for key, p in layer.adapter_params().items()
            if p.requires_grad
        ]
        if params and all(p.grad is None for _, p in params):
            raise RuntimeError(
                f"no trainable KaSA parameter received a gradient in the first step ({len(params)} parameters, "
                f"e.g. {params[0][0]}): the adapted modules do not take part in the loss. Check target_modules "
                "against the modules the forward uses; with gradient_checkpointing (reentrant), the inputs must "
                "require grad (model.enable_input_require_grads())"
            )
        grads = [p.grad for _, p in params if p.grad is not None]
        # One device synchronization, at the first step only: any() stops at the first nonzero gradient.
        if grads and not any(bool(g.any()) for g in grads):
            logger.warning(
                "kasa_trl: every trainable KaSA parameter's gradient is exactly 0 in the first step (%d parameters, "
                "e.g. %s), so the step changes nothing: check that the loss depends on the adapted modules (labels "
                "not all masked) and that lora_alpha / r is not vanishingly small",
                len(grads),
                params[0][0],
            )


def check_no_peft_layers(model: nn.Module) -> None:
    """KaSA layers are not stacked on PEFT tuner layers: ``all-linear`` would adapt PEFT's own ``lora_A``/``lora_B``
    Linear modules, and the trainer would save only part of what trains."""
    if not is_peft_available():
        return
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuned = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if isinstance(model, PeftModel) or tuned:
        raise ValueError(
            f"the model carries PEFT adapter layers ({abbreviate(tuned) if tuned else type(model).__name__}); KaSA "
            "trainers train their own KaSA layers on a plain base model. Pass the base model "
            "(peft_model.unload(), or merge_and_unload() to keep a trained LoRA in the base), and a PEFT KaSA "
            "config as kasa_config or peft_config; convert a PEFT KaSA adapter with kasa_trl.integrations.peft.import_peft_kasa"
        )


def abbreviate(names: list[str], shown: int = 3) -> str:
    """``a, b, c and 10 more``."""
    head = ", ".join(names[:shown])
    return f"{head} and {len(names) - shown} more" if len(names) > shown else head
