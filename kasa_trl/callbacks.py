"""``SpectrumCallback``: watch the KaSA adapters' spectra while training, without touching training.

Per KaSA layer a record holds ``lora_diag`` (sigma), the effective singular values of
``dW = scaling * B diag(sigma) A`` (from the factors, never the (out, in) product), the orthogonality errors
``||A A^T - I_r||_F``, ``||B^T B - I_r||_F`` (the paper's L3 terms) and ``||dW||_F``.

How scalars reach the loggers. User callbacks run after the TensorBoard / W&B callbacks in ``on_log``, so adding
keys to ``logs`` there is too late. The callback therefore computes a record in ``on_step_end`` (after
``DefaultFlowCallback`` has decided ``control.should_log``) and holds its scalars until the trainer logs:

1. A trainer whose ``log()`` merges ``consume_scalars()`` (``KaSATrainer`` and ``KaSADPOTrainer`` do;
   :func:`pop_spectrum_scalars` is the one-liner for other trainers) sends them through its own logging:
   ``state.log_history``, console, TensorBoard, W&B and any other integration, tagged like every train metric.
2. With any other Trainer the scalars are still pending in ``on_log``; the callback then writes them itself
   (the TensorBoard callback's writer, ``wandb.log``), adds them to ``logs`` (seen by the console printer, which
   runs after user callbacks) and to the matching ``state.log_history`` entry, under the same ``train/`` tags.

Histograms always go directly to the TensorBoard writer / ``wandb.log`` (a ``log()`` dict holds floats only).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback, WandbCallback
from transformers.integrations.integration_utils import rewrite_logs
from transformers.trainer_callback import CallbackHandler

from .factors import factor_singular_values, orthogonality_error
from .layer import KaSALinear
from .model import kasa_layers
from .spectrum_plots import FINAL_PNG, OVER_STEPS_PNG, save_spectrum_plots

__all__ = [
    "FINAL_PNG",
    "JSONL_NAME",
    "OVER_STEPS_PNG",
    "SPECTRUM_PREFIX",
    "SpectrumCallback",
    "pop_spectrum_scalars",
]

SPECTRUM_PREFIX = "kasa/spectrum"
JSONL_NAME = "kasa_spectrum.jsonl"
# Wrappers whose ``attr`` holds the model the Trainer built (matched by name: importing DeepSpeed costs seconds).
_WRAPPERS = {"DeepSpeedEngine": "module", "DistributedDataParallel": "module", "DataParallel": "module"}


class SpectrumCallback(TrainerCallback):
    """Log the KaSA adapters' learned singular values and orthogonality; observes only (no RNG, grads or writes
    to the model).

    Use: ``SFTTrainer(..., callbacks=[SpectrumCallback()])``. Outputs, on the main process only:

    - scalars ``kasa/spectrum/{lora_diag_abs,singular_values}/{min,mean,max}`` pooled over every layer's entries
      and ``kasa/spectrum/{orthogonality_A,orthogonality_B,update_norm}/{min,mean,max}`` across layers; with
      ``per_layer_scalars`` also ``kasa/spectrum/layers/<layer>/...``. See the module docstring for the route.
    - histograms ``train/kasa/spectrum/{lora_diag,singular_values}`` to TensorBoard / W&B when active.
    - one JSON line per record in ``jsonl_path``: ``{"step", "epoch", "layers": {name: {"lora_diag": [r],
      "singular_values": [r], "orthogonality_A", "orthogonality_B", "update_norm"}}}``, flushed each time
      (truncated when training starts from step 0, appended to when resuming).
    - at the end of training ``kasa_spectrum_over_steps.png`` (mean ``|sigma|``, ``||dW||_F`` and the
      orthogonality errors of every layer over steps) and ``kasa_spectrum_final.png`` (the final effective
      singular values: a layer x index heat map and a profile), both summarized over layers (median, 10-90%
      band, min-max, the extreme layers named) so they read alike at 14 and at 200 layers; 1300 x 420 and
      1300 x 520 pixels, from this run's records (``kasa_trl.spectrum_plots``). Needs matplotlib, skipped with
      a warning otherwise.

    Args:
        every_n_steps: record every n optimizer steps. Default: whenever the trainer logs (``logging_steps``,
            ``logging_first_step``, ``logging_strategy``), which keeps scalars aligned with the trainer's logs.
            Records at steps where the trainer does not log go straight to TensorBoard / W&B.
        jsonl_path: where the records go; default ``<output_dir>/kasa_spectrum.jsonl``.
        per_layer_scalars: also log every layer's scalars and histograms (floods loggers on large models).
        histograms: write histograms to TensorBoard / W&B.
        plots: draw the PNG pictures at the end of training, into ``output_dir``.

    A record is also taken at the end of training if the last step was not recorded. Under DeepSpeed ZeRO-3
    every rank gathers the adapter parameters (a collective, same order everywhere); only rank 0 writes.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        jsonl_path: str | os.PathLike | None = None,
        per_layer_scalars: bool = False,
        histograms: bool = True,
        plots: bool = True,
    ) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps <= 0):
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.jsonl_path = jsonl_path
        self.per_layer_scalars = per_layer_scalars
        self.histograms = histograms
        self.plots = plots
        self._handler: CallbackHandler | None = None
        self._scalars: dict[str, float] = {}  # of the pending record, until a trainer's log() consumes them
        self._pending: dict[str, Any] | None = None  # awaits on_log: histograms, fallback scalars
        self._last_step = -1
        self._history: list[
            tuple[int, dict[str, dict[str, Any]]]
        ] = []  # (step, record["layers"]) for the plots

    def consume_scalars(self) -> dict[str, float]:
        """The scalars of the latest record not yet logged, and forget them; ``{}`` if none.

        Called by ``KaSATrainer.log`` (and :func:`pop_spectrum_scalars`) before ``super().log(logs)``."""
        scalars, self._scalars = self._scalars, {}
        return scalars

    # -- events ----------------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._handler = _calling_callback_handler()
        self._scalars, self._pending, self._last_step = {}, None, -1
        self._history = []
        if state.is_world_process_zero and state.global_step == 0:
            path = self._jsonl_file(args)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("", encoding="utf-8")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.every_n_steps is None:
            due = control.should_log
        else:
            due = state.global_step % self.every_n_steps == 0
        if due and self._record(args, state, kwargs.get("model")) and not control.should_log:
            self._deliver(args, state, logs=None)  # no trainer log at this step: straight to the loggers

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # logging_strategy="epoch" decides to log here, after the step ended.
        if self.every_n_steps is None and control.should_log and self._last_step != state.global_step:
            self._record(args, state, kwargs.get("model"))

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ):
        if self._pending is not None:
            self._deliver(args, state, logs=logs)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # The TensorBoard callback has closed its writer by now: the final record goes to the file only.
        if state.global_step > 0 and self._last_step != state.global_step:
            self._record(args, state, kwargs.get("model"))
            self._scalars, self._pending = {}, None
        if self.plots and state.is_world_process_zero and self._history:
            try:
                if not save_spectrum_plots(self._history, args.output_dir):
                    warnings.warn(
                        "matplotlib is not installed: SpectrumCallback skips its pictures", stacklevel=2
                    )
            except Exception as exc:  # an observer's pictures must never cost the run (save_model comes next)
                warnings.warn(f"SpectrumCallback could not draw its pictures: {exc!r}", stacklevel=2)

    # -- internals -------------------------------------------------------------------------------------------
    def _jsonl_file(self, args: TrainingArguments) -> Path:
        return Path(self.jsonl_path) if self.jsonl_path is not None else Path(args.output_dir) / JSONL_NAME

    def _record(self, args: TrainingArguments, state: TrainerState, model: nn.Module | None) -> bool:
        """Take a record of ``model``'s adapters (collective under ZeRO-3); False if there is nothing to record."""
        layers = kasa_layers(_unwrap(model)) if model is not None else {}
        if not layers:
            return False
        record = {"step": state.global_step, "epoch": state.epoch, "layers": {}}
        for name, layer in layers.items():
            with _gathered(list(layer.adapter_params().values())):
                record["layers"][name] = _layer_record(layer)
        self._last_step = state.global_step
        self._scalars = _summary_scalars(record["layers"], self.per_layer_scalars)
        self._pending = record
        if state.is_world_process_zero and self.plots:
            self._history.append((state.global_step, record["layers"]))
        if state.is_world_process_zero:
            with self._jsonl_file(args).open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return True

    def _deliver(self, args: TrainingArguments, state: TrainerState, logs: dict[str, float] | None) -> None:
        """Write the pending record's histograms, and its scalars unless a trainer's log() consumed them."""
        record, self._pending = self._pending, None
        step, scalars = record["step"], self.consume_scalars()
        if scalars and logs is not None:
            logs.update(scalars)
            if state.log_history and state.log_history[-1].get("step") == step:
                state.log_history[-1].update(scalars)
        if not state.is_world_process_zero:
            return
        tagged = rewrite_logs(scalars)  # the "train/" tags the integrations give every train metric
        hists = _histograms(record["layers"], self.per_layer_scalars) if self.histograms else {}
        writer = self._tb_writer(args)
        if writer is not None and (tagged or hists):
            for tag, value in tagged.items():
                writer.add_scalar(tag, value, step)
            for tag, values in hists.items():
                writer.add_histogram(tag, values, step)
            writer.flush()
        wandb = self._wandb(args)
        if wandb is not None and (tagged or hists):
            wandb.log(
                {**tagged, **{t: wandb.Histogram(v) for t, v in hists.items()}, "train/global_step": step}
            )

    def _tb_writer(self, args: TrainingArguments) -> Any:
        if self._handler is not None:
            for callback in self._handler.callbacks:
                if isinstance(callback, TensorBoardCallback):
                    return callback.tb_writer
        elif "tensorboard" in (args.report_to or []):
            warnings.warn(
                "SpectrumCallback could not find the trainer's TensorBoardCallback; spectra go to the JSONL file "
                "and to whatever the trainer's log() merges from consume_scalars()",
                stacklevel=2,
            )
        return None

    def _wandb(self, args: TrainingArguments) -> Any:
        wandb = sys.modules.get("wandb")  # imported by WandbCallback when W&B is on; never import it here
        if wandb is None or getattr(wandb, "run", None) is None:
            return None
        if self._handler is not None:
            active = any(isinstance(c, WandbCallback) for c in self._handler.callbacks)
        else:
            active = "wandb" in (args.report_to or [])
        return wandb if active else None


def pop_spectrum_scalars(trainer: Any) -> dict[str, float]:
    """Consume the pending scalars of every ``SpectrumCallback`` of ``trainer``; for a ``log()`` override::

    def log(self, logs, start_time=None):
        logs.update(pop_spectrum_scalars(self))
        super().log(logs, start_time)
    """
    scalars: dict[str, float] = {}
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, SpectrumCallback):
            scalars.update(callback.consume_scalars())
    return scalars


@torch.no_grad()
def _layer_record(layer: KaSALinear) -> dict[str, Any]:
    """One layer's spectrum, in float64: sigma, the effective singular values of dW, L3 terms and ||dW||_F."""
    a = layer.lora_A.detach().to(torch.float64)  # (r, in)
    b = layer.lora_B.detach().to(torch.float64)  # (out, r)
    diag = layer.lora_diag.detach().to(torch.float64)  # (r,)
    singular_values = factor_singular_values(layer.scaling * b * diag, a)  # (r,) descending
    orth_a, orth_b = orthogonality_error(a, b)
    return {
        "lora_diag": diag.cpu().tolist(),
        "singular_values": singular_values.cpu().tolist(),
        "orthogonality_A": float(orth_a),
        "orthogonality_B": float(orth_b),
        "update_norm": float(torch.linalg.vector_norm(singular_values)),  # ||dW||_F = ||singular values||_2
    }


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max())}


_VECTORS = ("lora_diag_abs", "singular_values")  # r values per layer: min/mean/max even per layer
_SCALARS = ("orthogonality_A", "orthogonality_B", "update_norm")  # one value per layer


def _quantities(layer: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        "lora_diag_abs": np.abs(np.asarray(layer["lora_diag"])),
        "singular_values": np.asarray(layer["singular_values"]),
        **{k: np.asarray([layer[k]]) for k in _SCALARS},
    }


def _summary_scalars(layers: dict[str, dict[str, Any]], per_layer: bool) -> dict[str, float]:
    """min/mean/max of each quantity pooled over all layers, plus each layer's own when ``per_layer``."""
    per_quantity = [_quantities(layer) for layer in layers.values()]
    scalars = {}
    for quantity in (*_VECTORS, *_SCALARS):
        pooled = np.concatenate([q[quantity] for q in per_quantity])
        for stat, value in _stats(pooled).items():
            scalars[f"{SPECTRUM_PREFIX}/{quantity}/{stat}"] = value
    if per_layer:
        for name, quantities in zip(layers, per_quantity, strict=True):
            for quantity in _VECTORS:
                for stat, value in _stats(quantities[quantity]).items():
                    scalars[f"{SPECTRUM_PREFIX}/layers/{name}/{quantity}/{stat}"] = value
            for quantity in _SCALARS:
                scalars[f"{SPECTRUM_PREFIX}/layers/{name}/{quantity}"] = float(quantities[quantity][0])
    return scalars


def _histograms(layers: dict[str, dict[str, Any]], per_layer: bool) -> dict[str, np.ndarray]:
    """Finite values only (a histogram of NaNs makes the writers raise; the scalars still show the NaN)."""
    groups = {"": list(layers.values())}
    if per_layer:
        groups.update({f"layers/{name}/": [layer] for name, layer in layers.items()})
    hists = {}
    for prefix, group in groups.items():
        for key in ("lora_diag", "singular_values"):
            values = np.concatenate([np.asarray(layer[key]) for layer in group])
            values = values[np.isfinite(values)]
            if values.size:
                hists[f"train/{SPECTRUM_PREFIX}/{prefix}{key}"] = values
    return hists


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Make ZeRO-3 partitioned ``params`` whole for reading (no-op otherwise). A collective: every rank must enter
    it with the same parameters in the same order."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _unwrap(model: nn.Module) -> nn.Module:
    while type(model).__name__ in _WRAPPERS:
        model = getattr(model, _WRAPPERS[type(model).__name__])
    return model


def _calling_callback_handler() -> CallbackHandler | None:
    """The ``CallbackHandler`` dispatching the current event (the ``self`` of ``call_event`` up the stack).

    Callbacks are given no reference to their trainer; this is how a callback built with no arguments finds the
    TensorBoard / W&B callbacks it shares the trainer with. None if not called through a handler."""
    frame = inspect.currentframe()
    try:
        for _ in range(8):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler):
                return owner
        return None
    finally:
        del frame
