"""Feeding the KaSA regularizers' gradient into training, exactly once per optimizer step.

Why not simply ``loss + penalty``: under ZeRO-3 a layer's ``lora_A``/``lora_B``/``lora_diag`` are partitioned
outside that layer's forward, so a penalty computed from them in ``compute_loss`` has a correct value and a
broken backward. Instead each KaSA layer computes its own term inside its forward (where ZeRO-3 has gathered
its parameters) and attaches it to its (..., r) adapter activation with an identity autograd function. When the
backward pass reaches that activation, ZeRO-3 has re-gathered the layer's parameters, and the identity's
backward feeds the term the gradient the loss would have given it.

That gradient is ``c = lambda * k``:

* ``lambda`` = d(what is back-propagated) / d(the loss ``compute_loss`` returned): the trainer's division by the
  accumulation steps, AMP/DeepSpeed fp16 loss scales... It is read at the start of backward by a zero-valued
  probe added to the returned loss (its gradient hook runs before any model node);
* ``k`` = 1 when the trainer divides the loss by the accumulation steps itself, else 1 / accumulation steps
  (losses normalized by ``num_items_in_batch`` over the whole accumulated batch).

Each layer is charged at most once per micro-batch (several policy forwards in DPO), only in forwards that
build a graph: the no-grad first pass of reentrant checkpointing is skipped and its recomputation in backward
is charged; a non-reentrant recomputation happens after the charge and is not charged again; reference
forwards run with the adapter disabled and never reach the hook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from .layer import KaSALinear
from .model import kasa_layers
from .regularizers import REDUCTIONS, evaluate_regularizer, get_regularizer, validate_regularizer_weights


class _AttachPenalty(torch.autograd.Function):
    """Identity on ``h`` whose backward gives ``penalty`` the gradient ``session.gradient_coefficient()``
    (zero when ``session`` is None: the layer was already charged in this micro-batch)."""

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, penalty: torch.Tensor, session: PenaltySession | None
    ) -> torch.Tensor:
        ctx.session = session
        ctx.penalty_meta = (penalty.dtype, penalty.device)
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dtype, device = ctx.penalty_meta
        value = ctx.session.gradient_coefficient() if ctx.session is not None else 0.0
        coefficient = torch.tensor(value, dtype=dtype, device=device)
        return grad_h, coefficient, None


class PenaltySession:
    """The regularizers of one model's KaSA layers during training, and their per-micro-batch bookkeeping.

    Usage (what ``KaSATrainer.compute_loss`` does)::

        session = attach_penalties(model, weights, reduction)
        session.begin(micro_batch_factor)        # before the forward(s) of a micro-batch
        loss = session.finish(task_loss)          # adds the (detached) penalty value and the probe
    """

    def __init__(
        self, layers: Mapping[str, KaSALinear], weights: Mapping[str, float], reduction: str
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"regularizer_reduction={reduction!r} is not one of {list(REDUCTIONS)}")
        self.layers = dict(layers)
        self._names = {id(layer): name for name, layer in self.layers.items()}
        # Checked again: the config's dict may have been edited in place after the config checked it.
        weights = validate_regularizer_weights(weights)
        self.weights = {name: w for name, w in weights.items() if w != 0}
        self.functions = {name: get_regularizer(name) for name in self.weights}
        self.layer_weight = 1.0 / len(self.layers) if reduction == "mean" and self.layers else 1.0
        self.micro_batch_factor = 1.0
        self._charged: set[int] = set()
        self._values: dict[str, dict[str, torch.Tensor]] = {}
        self._grad_scale: float | None = None

    # -- per micro-batch -------------------------------------------------------------------------------
    def begin(self, micro_batch_factor: float = 1.0) -> None:
        """Start a micro-batch: forget charges and values of the previous one."""
        self.micro_batch_factor = float(micro_batch_factor)
        self._charged.clear()
        self._values = {}
        self._grad_scale = None

    def finish(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` + k * (penalty value, detached) + a zero probe that reads lambda at the start of backward."""
        total = self.total()
        if total is not None and not torch.isfinite(total):
            raise FloatingPointError(self._non_finite_message())
        if total is not None:
            loss = loss + self.micro_batch_factor * total.to(loss.device, loss.dtype)
        # Even with nothing charged yet: reentrant checkpointing charges in its recomputation, during backward.
        if loss.requires_grad and self.functions and self.layers:
            probe = torch.zeros((), device=loss.device, dtype=loss.dtype, requires_grad=True)
            probe.register_hook(self._read_grad_scale)
            loss = loss + probe
        return loss

    def values(self) -> dict[str, torch.Tensor]:
        """Each regularizer's value reduced over layers (unweighted), from this micro-batch's first forward."""
        reduced: dict[str, torch.Tensor] = {}
        for per_term in self._values.values():
            for name, value in per_term.items():
                reduced[name] = reduced.get(name, 0) + value * self.layer_weight
        return reduced

    def total(self, values: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        """The weighted penalty of this micro-batch (detached), or None if no layer ran. ``values``: ``values()``,
        when the caller has it already."""
        if values is None:
            values = self.values()
        if not values:
            return None
        total = sum(self.weights[name] * value for name, value in values.items())
        return cast(torch.Tensor, total)  # not the int 0 of an empty sum: values is not empty

    def _non_finite_message(self) -> str:
        bad = [
            f"{layer}: {name}={float(value)}"
            for layer, terms in self._values.items()
            for name, value in terms.items()
            if not torch.isfinite(value)
        ]
        return (
            f"KaSA regularizer value is not finite ({'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); "
            "training stopped before the adapter is corrupted. The adapter factors have diverged: lower the "
            "learning rate or the regularizer weights, enable gradient clipping (max_grad_norm), and resume from "
            "the last complete checkpoint (kasa_trl.last_complete_checkpoint(output_dir))"
        )

    def gradient_coefficient(self) -> float:
        if self._grad_scale is None:
            raise RuntimeError(
                "KaSA penalty backward ran before the loss returned by compute_loss was back-propagated; "
                "return PenaltySession.finish(loss) from compute_loss and back-propagate that loss"
            )
        return self._grad_scale * self.micro_batch_factor

    def _read_grad_scale(self, grad: torch.Tensor) -> None:
        scale = float(grad)
        if not math.isfinite(scale):  # fp16 overflow step: the optimizer will skip it anyway
            scale = 0.0
        self._grad_scale = scale

    # -- called from KaSALinear.forward -----------------------------------------------------------------
    def __call__(self, layer: KaSALinear, h: torch.Tensor) -> torch.Tensor:
        key = id(layer)
        name = self._names.get(key)
        if name is None or not self.functions:
            return h
        with_grad = torch.is_grad_enabled() and layer.lora_A.requires_grad
        if not with_grad and name in self._values:
            return h
        # Autocast off: Gram errors of near-orthonormal factors are differences of O(1) numbers, which bf16 rounds
        # away; the regularizers upcast to fp32 themselves.
        factors = (layer.lora_A, layer.lora_B, layer.lora_diag)
        needs_grad = with_grad and all(p.requires_grad for p in factors)
        with torch.set_grad_enabled(with_grad), torch.autocast(h.device.type, enabled=False):
            terms = {
                n: evaluate_regularizer(n, fn, *factors, layer=name, needs_grad=needs_grad)
                for n, fn in self.functions.items()
            }
        if name not in self._values:
            self._values[name] = {n: t.detach().float() for n, t in terms.items()}
        if not with_grad:
            return h
        # Later forwards of the micro-batch still build the same graph (a non-reentrant checkpoint
        # recomputation must save the same tensors as the forward it replays) but feed it no gradient.
        charge = key not in self._charged
        self._charged.add(key)
        penalty = sum(self.weights[n] * t for n, t in terms.items()) * self.layer_weight
        return _AttachPenalty.apply(h, penalty, self if charge else None)


def attach_penalties(
    model: nn.Module, weights: Mapping[str, float], reduction: str = "sum"
) -> PenaltySession:
    """Install a ``PenaltySession`` on every KaSA layer of ``model`` and return it."""
    layers = kasa_layers(model)
    session = PenaltySession(layers, weights, reduction)
    for layer in layers.values():
        layer.penalty_hook = session
    return session


def detach_penalties(model: nn.Module) -> None:
    """Remove the hooks ``attach_penalties`` installed on ``model``'s KaSA layers."""
    for layer in kasa_layers(model).values():
        layer.penalty_hook = None
