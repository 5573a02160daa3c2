"""``SpectrumCallback``: watch the KaSA adapters' spectra while training, without touching training.

Per KaSA layer a record holds ``lora_diag`` (sigma), the effective singular values of
``dW = scaling * B diag(sigma) A`` (from the factors, never the (out, in) product), the orthogonality errors
``||A A^T - I_r||_F``, ``||B^T B - I_r||_F`` (the paper's L3 terms) and ``||dW||_F``.

How the spectra reach the loggers: through the trainer's ``log()``, the way TRL's own metrics do (TRL merges
``self._metrics`` into ``logs`` there). The TensorBoard / W&B callbacks read ``logs`` in ``on_log`` before any user
callback, so a callback cannot add to them itself. The callback takes a record in ``on_step_end`` (after
``DefaultFlowCallback`` has decided ``control.should_log``) and holds it; the trainer's ``log()`` then calls
:func:`log_spectra`, which merges the record's scalars into ``logs`` (console, ``state.log_history``, TensorBoard,
W&B, tagged like every train metric) and writes its histograms to the trainer's TensorBoard / W&B callbacks (a
``logs`` dict holds floats only). ``KaSATrainer`` and ``KaSADPOTrainer`` do this. With another trainer
(``transformers.Trainer``, ``trl.SFTTrainer``) the records go to the JSONL file and the pictures only, with a
warning, unless its ``log()`` calls :func:`log_spectra`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback, WandbCallback

from .distributed import gathered
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
    "log_spectra",
]

SPECTRUM_PREFIX = "kasa/spectrum"
JSONL_NAME = "kasa_spectrum.jsonl"


class SpectrumCallback(TrainerCallback):
    """Log the KaSA adapters' learned singular values and orthogonality; observes only (no RNG, grads or writes
    to the model).

    Use: ``KaSATrainer(..., callbacks=[SpectrumCallback()])``. Outputs, on the main process only:

    - scalars ``kasa/spectrum/{lora_diag_abs,singular_values}/{min,mean,max}`` pooled over every layer's entries
      and ``kasa/spectrum/{orthogonality_A,orthogonality_B,update_norm}/{min,mean,max}`` across layers; with
      ``per_layer_scalars`` also ``kasa/spectrum/layers/<layer>/...``. They go out with the trainer's logs.
    - histograms ``train/kasa/spectrum/{lora_diag,singular_values}`` to TensorBoard / W&B when active.
    - one JSON line per record in ``jsonl_path``: ``{"step", "epoch", "layers": {name: {"lora_diag": [r],
      "singular_values": [r], "orthogonality_A", "orthogonality_B", "update_norm"}}}``, flushed each time
      (truncated when training starts from step 0; when resuming from step s, records of steps after s, taken by
      the run that went past the checkpoint, are dropped and new ones appended: one record per step).
    - at the end of training ``kasa_spectrum_over_steps.png`` (mean ``|sigma|``, ``||dW||_F`` and the
      orthogonality errors of every layer over steps) and ``kasa_spectrum_final.png`` (the final effective
      singular values: a layer x index heat map and a profile), both summarized over layers (median, 10-90%
      band, min-max, the extreme layers named) so they read alike at 14 and at 200 layers; 1300 x 420 and
      1300 x 520 pixels, from this run's records (``kasa_trl.spectrum_plots``). Needs matplotlib, skipped with
      a warning otherwise.

    Scalars and histograms need a trainer whose ``log()`` calls :func:`log_spectra` (``KaSATrainer``,
    ``KaSADPOTrainer``, or a ``log()`` override of your own, see there). With any other trainer the callback
    writes the JSONL file and the pictures only, and says so in a warning at the first record the trainer's
    ``log()`` left behind.

    Args:
        every_n_steps: record every n optimizer steps, and have the trainer log at those steps too
            (``control.should_log``), so that every record goes out with the trainer's logs. Default: record
            whenever the trainer logs (``logging_steps``, ``logging_first_step``, ``logging_strategy``).
        jsonl_path: where the records go; default ``<output_dir>/kasa_spectrum.jsonl``.
        per_layer_scalars: also log every layer's scalars and histograms (floods loggers on large models).
        histograms: write histograms to TensorBoard / W&B.
        plots: draw the PNG pictures at the end of training, into ``output_dir``.

    A record is also taken at the end of training if the last step was not recorded; it goes to the file and
    the pictures only (the trainer has logged for the last time). Under DeepSpeed ZeRO-3 every rank gathers the
    adapter parameters (a collective, same order everywhere) and merges the scalars into its logs; only rank 0
    writes.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        jsonl_path: str | os.PathLike[str] | None = None,
        per_layer_scalars: bool = False,
        histograms: bool = True,
        plots: bool = True,
    ) -> None:
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0
        ):
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.jsonl_path = jsonl_path
        self.per_layer_scalars = per_layer_scalars
        self.histograms = histograms
        self.plots = plots
        self._pending: dict[str, Any] | None = None  # the latest record, until the trainer's log() takes it
        self._last_step = -1
        # (step, record["layers"]) of this run, for the pictures
        self._history: list[tuple[int, dict[str, dict[str, Any]]]] = []
        self._warned = False

    # -- events ----------------------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._pending, self._last_step, self._history, self._warned = None, -1, [], False
        if not state.is_world_process_zero:
            return
        path = self._jsonl_file(args)
        if state.global_step == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("", encoding="utf-8")
        elif path.exists():
            # Resumed: the records an interrupted run took after this checkpoint are of abandoned steps.
            drop_records_after(path, state.global_step)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self.every_n_steps is None:
            due = control.should_log
        else:
            due = state.global_step % self.every_n_steps == 0
        if due and self._record(args, state, kwargs.get("model")):
            control.should_log = True  # the trainer logs this step, and its log() takes the record
        return control

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # logging_strategy="epoch" decides to log here, after the step ended.
        if self.every_n_steps is None and control.should_log and self._last_step != state.global_step:
            self._record(args, state, kwargs.get("model"))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._pending is None:
            return
        # The trainer's log() did not call log_spectra: this record is in the JSONL file, and no logger gets it.
        self._pending = None
        if state.is_world_process_zero and not self._warned:
            self._warned = True
            warnings.warn(
                "SpectrumCallback: this trainer's log() does not call kasa_trl.callbacks.log_spectra, so the spectra "
                f"go to {self._jsonl_file(args)} and the pictures only, not to the console, TensorBoard or W&B. "
                "Train with KaSATrainer / KaSADPOTrainer, or override log(): "
                "`log_spectra(self, logs); super().log(logs, start_time)`",
                stacklevel=2,
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The trainer has logged for the last time (and TensorBoard has closed its writer): file and pictures only.
        if state.global_step > 0 and self._last_step != state.global_step:
            self._record(args, state, kwargs.get("model"))
        self._pending = None
        if self.plots and state.is_world_process_zero and self._history:
            try:
                if not save_spectrum_plots(self._history, _output_dir(args)):
                    warnings.warn(
                        "matplotlib is not installed: SpectrumCallback skips its pictures", stacklevel=2
                    )
            except Exception as exc:  # an observer's pictures must never cost the run (save_model comes next)
                warnings.warn(f"SpectrumCallback could not draw its pictures: {exc!r}", stacklevel=2)

    # -- internals -------------------------------------------------------------------------------------------
    def _jsonl_file(self, args: TrainingArguments) -> Path:
        return Path(self.jsonl_path) if self.jsonl_path is not None else Path(_output_dir(args)) / JSONL_NAME

    def _record(self, args: TrainingArguments, state: TrainerState, model: nn.Module | None) -> bool:
        """Take a record of ``model``'s adapters (collective under ZeRO-3); False if there is nothing to record."""
        layers = kasa_layers(extract_model_from_parallel(model)) if model is not None else {}
        if not layers:
            return False
        record: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch, "layers": {}}
        for name, layer in layers.items():
            with gathered(list(layer.adapter_params().values())):
                record["layers"][name] = _layer_record(layer)
        self._last_step = state.global_step
        self._pending = record
        if state.is_world_process_zero:
            if self.plots:
                self._history.append((state.global_step, record["layers"]))
            with self._jsonl_file(args).open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return True

    def _log_pending(
        self, logs: dict[str, float], state: TrainerState, callbacks: Sequence[TrainerCallback]
    ) -> None:
        """Merge the pending record's scalars into ``logs`` and, on the main process, write its histograms to the
        TensorBoard / W&B callbacks among ``callbacks``; forget the record. A record of an earlier step (a log the
        trainer skipped) is dropped: the loggers would file it under the wrong step."""
        record, self._pending = self._pending, None
        if record is None or record["step"] != state.global_step:
            return
        logs.update(_summary_scalars(record["layers"], self.per_layer_scalars))
        if self.histograms and state.is_world_process_zero:
            _write_histograms(
                _histograms(record["layers"], self.per_layer_scalars), record["step"], callbacks
            )


def log_spectra(trainer: Trainer, logs: dict[str, float]) -> None:
    """Merge the pending spectra of ``trainer``'s ``SpectrumCallback`` into ``logs`` (in place) and write their
    histograms to its TensorBoard / W&B callbacks. For a trainer's ``log()``, before the parent's::

        def log(self, logs, start_time=None):
            log_spectra(self, logs)
            super().log(logs, start_time)

    ``KaSATrainer`` and ``KaSADPOTrainer`` do this. Call it on every rank (each merges the same scalars)."""
    callbacks = trainer.callback_handler.callbacks
    for callback in callbacks:
        if isinstance(callback, SpectrumCallback):
            callback._log_pending(logs, trainer.state, callbacks)


def _output_dir(args: TrainingArguments) -> str:
    """``args.output_dir``, typed ``str | None`` but set by ``TrainingArguments`` itself when not given."""
    return cast(str, args.output_dir)


def _write_histograms(hists: dict[str, np.ndarray], step: int, callbacks: Sequence[TrainerCallback]) -> None:
    if not hists:
        return
    for callback in callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            for tag, values in hists.items():
                callback.tb_writer.add_histogram(tag, values, step)
        elif isinstance(callback, WandbCallback):
            import wandb  # a WandbCallback exists only where wandb is installed, and has imported it

            if wandb.run is not None:
                wandb.log(
                    {**{tag: wandb.Histogram(v) for tag, v in hists.items()}, "train/global_step": step}
                )


@torch.no_grad()
def drop_records_after(path: Path, step: int) -> None:
    """Rewrite the JSONL records file ``path`` (atomically: a temporary file renamed over it) without the records
    of steps after ``step`` and without lines that are not complete records (a run killed mid-write); left as it is
    when there is nothing to drop."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if (line_step := _record_step(line)) is not None and line_step <= step]
    if len(kept) == len(lines) and all(line.endswith("\n") for line in lines):
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _record_step(line: str) -> int | None:
    """The ``step`` of one JSONL record line, or None if it is not a complete record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


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
