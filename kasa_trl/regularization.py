"""The KaSA regularizers in any training loop (plain PyTorch, accelerate, Lightning): what ``KaSATrainer`` adds to
the loss, for loops of your own.

One process, DDP, DeepSpeed ZeRO-1/2: add ``kasa_regularization(model)`` to the loss you back-propagate::

    model = kasa_trl.apply_kasa(model, KaSAConfig(r=8))
    for batch in loader:
        loss = model(**batch).loss + kasa_trl.kasa_regularization(model)
        loss.backward()  # accelerator.backward(loss), engine.backward(loss)
        optimizer.step(); optimizer.zero_grad()

It is exact there: every rank holds the whole adapter, so the term (the same on every rank) and its gradient are
what one process computes, and DDP's gradient average leaves them as they are. With gradient accumulation, add it
to every micro-batch's loss before that loss is divided by the number of micro-batches, as the task loss is: the
regularizer then enters once per optimizer step.

DeepSpeed ZeRO-3: a layer's ``lora_A``/``lora_B``/``lora_diag`` are partitioned outside that layer's forward, so
``kasa_regularization`` refuses. Use ``attach_kasa_regularization``, which computes each layer's term inside its
forward (where ZeRO-3 has gathered the factors) and feeds its gradient from there, as the KaSA trainers do::

    session = kasa_trl.attach_kasa_regularization(model)
    for batch in loader:
        session.begin()
        loss = session.finish(engine(**batch).loss)  # adds the regularization's value
        engine.backward(loss)
        engine.step()

(It works on one process, DDP and ZeRO-1/2 as well; ``session.finish`` must receive the loss that is then
back-propagated, and ``begin`` starts each micro-batch. ``detach_kasa_regularization(model)`` removes it.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .distributed import is_partitioned
from .model import get_kasa_config, kasa_layers
from .penalty import PenaltySession, attach_penalties, detach_penalties
from .regularizers import REDUCTIONS, evaluate_regularizer, get_regularizer, validate_regularizer_weights


def kasa_regularization(
    model: nn.Module, *, regularizers: Mapping[str, float] | None = None, reduction: str | None = None
) -> torch.Tensor:
    """The weighted, reduced KaSA regularization of ``model`` as a 0-dim float32 tensor carrying the gradient of
    the adapter factors: ``sum_name weight[name] * reduce_layers(fn_name(A, B, sigma))`` (KaSA paper Eq. 9-12),
    the value ``KaSATrainer`` logs as ``kasa/regularization``.

    Args:
        model: a model carrying KaSA layers (``apply_kasa`` or ``load_kasa_adapter(..., is_trainable=True)``).
        regularizers: name -> weight; default the model's ``KaSAConfig.regularizers``.
        reduction: ``"sum"`` or ``"mean"`` over layers; default the model's ``regularizer_reduction``.

    Raises:
        ValueError: the model carries no KaSA layers, or its adapter is partitioned by ZeRO-3 (use
            ``attach_kasa_regularization``).
    """
    config = get_kasa_config(model)
    weights = validate_regularizer_weights(config.regularizers if regularizers is None else regularizers)
    reduction = config.regularizer_reduction if reduction is None else reduction
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {list(REDUCTIONS)}")
    layers = kasa_layers(model)
    partitioned = [name for name, layer in layers.items() if _partitioned(layer.lora_A)]
    if partitioned:
        raise ValueError(
            f"the KaSA factors of {partitioned[0]} are partitioned by DeepSpeed ZeRO-3 outside forward, so their "
            "regularization cannot be computed here; use session = kasa_trl.attach_kasa_regularization(model) "
            "(session.begin() before each micro-batch, loss = session.finish(loss) before backward), or the KaSA "
            "trainers"
        )
    first = next(iter(layers.values())).lora_A
    total = torch.zeros((), dtype=torch.float32, device=first.device)
    functions = {name: get_regularizer(name) for name, weight in weights.items() if weight != 0}
    with torch.autocast(first.device.type, enabled=False):
        for layer_name, layer in layers.items():
            factors = (layer.lora_A, layer.lora_B, layer.lora_diag)
            needs_grad = torch.is_grad_enabled() and all(p.requires_grad for p in factors)
            for name, fn in functions.items():
                value = evaluate_regularizer(name, fn, *factors, layer=layer_name, needs_grad=needs_grad)
                total = total + weights[name] * value.float()
    return total / len(layers) if reduction == "mean" else total


def attach_kasa_regularization(
    model: nn.Module, *, regularizers: Mapping[str, float] | None = None, reduction: str | None = None
) -> PenaltySession:
    """Compute ``model``'s KaSA regularization inside each KaSA layer's forward and feed its gradient from there
    (the mechanism of the KaSA trainers, right under ZeRO-3 too); returns the session that a loop drives with
    ``session.begin()`` before each micro-batch and ``loss = session.finish(loss)`` before back-propagating
    ``loss``. ``session.total()`` is the value added. Defaults as ``kasa_regularization``."""
    config = get_kasa_config(model)
    weights = config.regularizers if regularizers is None else regularizers
    return attach_penalties(model, weights, config.regularizer_reduction if reduction is None else reduction)


def detach_kasa_regularization(model: nn.Module) -> None:
    """Remove what ``attach_kasa_regularization`` installed."""
    detach_penalties(model)


def _partitioned(param: torch.Tensor) -> bool:
    return is_partitioned(param) and param.numel() == 0
