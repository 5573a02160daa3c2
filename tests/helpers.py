"""Shared test helpers, importable by the pytest tests (``from .helpers import ...``) and by the worker scripts
under ``tests/distributed`` (which put the repository root on ``sys.path``)."""

from __future__ import annotations

import os
from typing import Any

# The tiny, fast, deterministic CPU training run most tests start from; each site overrides what it needs.
TINY_TRAINING_ARGS: dict[str, Any] = dict(
    max_steps=2,
    per_device_train_batch_size=4,
    learning_rate=0.05,
    optim="sgd",
    lr_scheduler_type="constant",
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    seed=0,
    max_length=32,
    disable_tqdm=True,
    bf16=False,  # exact comparisons; mixed precision has its own tests
)


def tiny_sft_config(output_dir: str | os.PathLike, *, config_class: type | None = None, **overrides: Any):
    """``config_class`` (default: TRL's ``SFTConfig``) of the tiny run writing to ``output_dir``, with
    ``overrides`` applied on top of :data:`TINY_TRAINING_ARGS`."""
    if config_class is None:
        from trl import SFTConfig

        config_class = SFTConfig
    return config_class(**{"output_dir": str(output_dir), **TINY_TRAINING_ARGS, **overrides})
