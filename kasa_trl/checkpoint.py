"""Which ``checkpoint-N`` directory a run can resume from.

transformers writes a checkpoint non-atomically, in this order: the model (for KaSA: the adapter, itself replaced
atomically, the tokenizer and ``training_args.bin``), the optimizer, scheduler, scaler and RNG states, and
``trainer_state.json`` last. A run killed in between leaves a ``checkpoint-N`` directory that
``transformers.trainer_utils.get_last_checkpoint`` still returns, because it picks the highest ``N`` whatever the
directory holds; ``train(resume_from_checkpoint=True)`` then stops on the missing ``trainer_state.json`` (or, were
only an optimizer file missing, would silently restart the optimizer). ``last_complete_checkpoint`` returns the
newest checkpoint whose every part is there instead.

A process crash (``SIGKILL``, OOM killer, preemption) cannot leave a checkpoint that passes these checks but is
incomplete: ``trainer_state.json`` is written after everything else, and it must parse. A power loss can (files
are not fsynced by transformers); the adapter itself is fsynced by ``adapter_io``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from pathlib import Path

import torch

from .adapter_io import read_adapter
from .config import KaSAConfig

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
# The first byte of a file torch.save wrote in its legacy (pickle) format: a pickle PROTO opcode.
_LEGACY_TORCH_MAGIC = b"\x80"
SCHEDULER_FILE = "scheduler.pt"
DEEPSPEED_LATEST_FILE = "latest"  # DeepSpeed's save_checkpoint: names the tag directory it wrote last


def is_complete_checkpoint(path: str | os.PathLike[str], *, require_optimizer: bool = True) -> bool:
    """Whether ``path`` is a checkpoint training can resume from exactly.

    Complete means: ``trainer_state.json`` parses (and, for a ``checkpoint-N`` directory, records step ``N``); the
    KaSA adapter reads with ``adapter_io.read_adapter`` and holds only finite values; and, with
    ``require_optimizer``, the optimizer state (``optimizer.pt``/``optimizer.bin``, or a DeepSpeed checkpoint),
    the scheduler state (``scheduler.pt``; DeepSpeed keeps its own) and the RNG state (``rng_state*.pth``) exist.

    Args:
        path: a checkpoint directory.
        require_optimizer: pass ``False`` for runs saved with ``save_only_model=True``, whose checkpoints hold no
            optimizer, scheduler or RNG state by design.
    """
    return incomplete_reason(path, require_optimizer=require_optimizer) is None


def incomplete_reason(path: str | os.PathLike[str], *, require_optimizer: bool = True) -> str | None:
    """Why ``path`` is not a checkpoint training can resume from exactly (see ``is_complete_checkpoint``), or
    ``None`` when it is one."""
    return read_checkpoint(path, require_optimizer=require_optimizer)[0]


SavedAdapter = tuple[KaSAConfig, dict[str, dict[str, torch.Tensor]]]


def read_checkpoint(
    path: str | os.PathLike[str], *, require_optimizer: bool = True
) -> tuple[str | None, SavedAdapter | None]:
    """``incomplete_reason(path)`` and, when it is ``None``, the checkpoint's adapter as ``read_adapter`` returns
    it (read once: resuming checks and loads this copy)."""
    return _why_incomplete(Path(path), require_optimizer)


def missing_training_state(path: str | os.PathLike[str]) -> list[str]:
    """The parts of the optimizer, scheduler and RNG state ``path`` lacks (empty when it holds them all).

    Without them transformers' ``Trainer`` resumes silently with a fresh optimizer, a learning-rate schedule
    started over from its first step and other random numbers.
    """
    directory = Path(path)
    missing = []
    deepspeed = _has_deepspeed_checkpoint(directory)
    if not deepspeed and not any((directory / name).is_file() for name in OPTIMIZER_FILES):
        missing.append(f"the optimizer state ({' or '.join(OPTIMIZER_FILES)})")
    if not deepspeed and not (directory / SCHEDULER_FILE).is_file():
        missing.append(f"the scheduler state ({SCHEDULER_FILE})")
    if not any(directory.glob("rng_state*.pth")):
        missing.append("the RNG state (rng_state*.pth)")
    return missing


def unreadable_training_state(path: str | os.PathLike[str]) -> list[str]:
    """The optimizer, scheduler and RNG state files of ``path`` that exist but are cut short, each with the reason.

    ``torch.save`` writes a zip archive whose directory is its last part, so a file whose save was killed or ran
    out of disk is no readable zip; only that directory is read (cheap at any size), not every byte. A file in
    torch's legacy (pre-1.6, pickle) format is not checked.
    """
    directory = Path(path)
    files = [directory / name for name in (*OPTIMIZER_FILES, SCHEDULER_FILE)]
    files += sorted(directory.glob("rng_state*.pth"))
    unreadable = []
    for file in files:
        reason = _torch_file_problem(file) if file.is_file() else None
        if reason is not None:
            unreadable.append(f"{file.name} is unreadable ({reason})")
    return unreadable


def last_complete_checkpoint(
    output_dir: str | os.PathLike[str], *, require_optimizer: bool = True
) -> str | None:
    """The newest ``checkpoint-N`` directory of ``output_dir`` that ``is_complete_checkpoint``, or ``None``.

    Use it instead of ``transformers.trainer_utils.get_last_checkpoint``, which returns the highest ``N`` even
    when that checkpoint was cut short. Every skipped checkpoint is logged (warning) with the reason. ``None``
    also when ``output_dir`` does not exist.
    """
    newest = newest_complete_checkpoint(output_dir, require_optimizer=require_optimizer)
    return None if newest is None else newest[0]


def newest_complete_checkpoint(
    output_dir: str | os.PathLike[str], *, require_optimizer: bool = True
) -> tuple[str, SavedAdapter] | None:
    """``last_complete_checkpoint`` with the adapter it read while checking it (see ``read_checkpoint``)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    candidates = []
    for entry in root.iterdir():
        match = CHECKPOINT_DIR.match(entry.name)
        if match and entry.is_dir():
            candidates.append((int(match.group(1)), entry))
    for _, directory in sorted(candidates, key=lambda item: item[0], reverse=True):
        reason, adapter = _why_incomplete(directory, require_optimizer)
        if adapter is not None:
            return str(directory), adapter
        logger.warning("kasa_trl: skipping incomplete checkpoint %s: %s", directory, reason)
    return None


def _why_incomplete(directory: Path, require_optimizer: bool) -> tuple[str | None, SavedAdapter | None]:
    """What makes ``directory`` unusable for resuming and ``None``, or ``None`` and its adapter when complete."""
    if not directory.is_dir():
        return "not a directory", None
    reason = _check_trainer_state(directory)
    if reason is not None:
        return reason, None
    reason, adapter = _check_adapter(directory)
    if reason is None and require_optimizer:
        reason = _check_training_state(directory)
    return (reason, None) if reason is not None else (None, adapter)


def _check_trainer_state(directory: Path) -> str | None:
    path = directory / TRAINER_STATE_FILE
    if not path.is_file():
        return f"{TRAINER_STATE_FILE} is missing (the save was interrupted)"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{TRAINER_STATE_FILE} is unreadable ({e})"
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
        return f"{TRAINER_STATE_FILE} records no global_step"
    match = CHECKPOINT_DIR.match(directory.name)
    if match and int(match.group(1)) != step:
        return f"{TRAINER_STATE_FILE} records step {step}, not {match.group(1)}"
    return None


def _check_adapter(directory: Path) -> tuple[str | None, SavedAdapter | None]:
    try:
        adapter = read_adapter(directory)
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
        return f"the KaSA adapter is unreadable ({e})", None
    for layer, tensors in adapter[1].items():
        for key, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"the KaSA adapter holds non-finite values ({layer}.{key})", None
    return None, adapter


def _check_training_state(directory: Path) -> str | None:
    missing = missing_training_state(directory)
    if missing:
        return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    unreadable = unreadable_training_state(directory)
    return "; ".join(unreadable) if unreadable else None


def _torch_file_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` file, or ``None`` (see ``unreadable_training_state``)."""
    try:
        with path.open("rb") as f:
            if f.read(1) == _LEGACY_TORCH_MAGIC:
                return None
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                return "an empty archive"
    except (OSError, zipfile.BadZipFile) as e:
        return f"not a complete torch.save archive, the save was cut short: {e}"
    return None


def _has_deepspeed_checkpoint(directory: Path) -> bool:
    latest = directory / DEEPSPEED_LATEST_FILE
    if not latest.is_file():
        return False
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(tag) and (directory / tag).is_dir()
