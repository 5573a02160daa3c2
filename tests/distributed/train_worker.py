"""A deterministic KaSATrainer SFT run on the tiny Llama, to be killed by tests/test_interrupt.py.

    python tests/distributed/train_worker.py --out DIR [--max_steps 8] [--save_steps 2]

AdamW with a linear schedule and adapter dropout, so that resuming exactly needs the optimizer, scheduler and RNG
states of the checkpoint, not only the adapter. ``build_trainer`` is shared with the test, which runs the
uninterrupted reference and the resumed runs in-process with the very same settings.

Hooks for the test, set through the environment (this script only; the library has none):

* ``KASA_TEST_PROGRESS_DIR``: after each optimizer step, just before the trainer saves its checkpoint, an empty
  file ``step-N`` appears there (outside the output directory, which keeps only what the trainer writes).
* ``KASA_TEST_STEP_SLEEP``: seconds to sleep before each step, so that a test can aim its kill at a step.
* ``KASA_TEST_PAUSE_IN_SAVE``: ``N``; while saving ``checkpoint-N``, after the adapter, optimizer, scheduler and
  RNG states are written and before ``trainer_state.json`` is, create ``paused-N`` in the progress directory and
  sleep (until killed): the most complete a checkpoint can look while still being incomplete.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

if not __package__:  # run as a script: make the repository's tests package (tests/helpers.py) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers import tiny_sft_config  # noqa: E402

PROGRESS_ENV = "KASA_TEST_PROGRESS_DIR"
STEP_SLEEP_ENV = "KASA_TEST_STEP_SLEEP"
PAUSE_ENV = "KASA_TEST_PAUSE_IN_SAVE"

MAX_STEPS = 8
SAVE_STEPS = 2
N_ROWS = 32  # 8 steps of 4 rows: one epoch


def build_trainer(output_dir: str | os.PathLike, *, max_steps: int = MAX_STEPS, save_steps: int = SAVE_STEPS):
    """The KaSATrainer of this run (also used in-process by the test for the reference and resumed runs)."""
    from kasa_trl import KaSAConfig
    from kasa_trl.tiny import build_tiny_llama, build_tokenizer, load_tiny_dataset
    from kasa_trl.trainer import KaSATrainer

    trainer_class = _pausing_trainer_class(KaSATrainer) if os.environ.get(PAUSE_ENV) else KaSATrainer
    tokenizer = build_tokenizer()
    args = tiny_sft_config(
        output_dir,
        max_steps=max_steps,
        learning_rate=1e-2,
        optim="adamw_torch",
        lr_scheduler_type="linear",
        weight_decay=0.01,
        save_strategy="steps",
        save_steps=save_steps,
        dataloader_num_workers=0,
        activation_checkpointing=True,  # TRL's default, under transformers 5's name (no deprecation warning)
    )
    return trainer_class(
        model=build_tiny_llama(len(tokenizer), seed=0),
        args=args,
        train_dataset=load_tiny_dataset("sft").select(range(N_ROWS)),
        processing_class=tokenizer,
        kasa_config=KaSAConfig(
            r=4, lora_dropout=0.1, regularizers={"singular_value_l2": 1e-2, "orthogonality": 1e-2}
        ),
        callbacks=[_ProgressCallback()] if os.environ.get(PROGRESS_ENV) else None,
    )


def adapter_tensors(trainer) -> dict:
    """The trained factors, keyed ``<layer>.<name>`` (detached copies)."""
    from kasa_trl import kasa_layers

    return {
        f"{name}.{key}": param.detach().clone()
        for name, layer in kasa_layers(trainer.model).items()
        for key, param in layer.adapter_params().items()
    }


def _touch(name: str) -> None:
    (Path(os.environ[PROGRESS_ENV]) / name).write_text("")


class _ProgressCallback(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        delay = float(os.environ.get(STEP_SLEEP_ENV, "0"))
        if delay:
            time.sleep(delay)

    def on_step_end(self, args, state, control, **kwargs):
        # The trainer saves checkpoint-N right after this: a kill on seeing step-N lands in or just after that save.
        _touch(f"step-{state.global_step}")


def _pausing_trainer_class(base: type) -> type:
    pause_step = int(os.environ[PAUSE_ENV])

    class PausingTrainer(base):
        def _save_rng_state(self, output_dir: str) -> None:
            # transformers calls this after the adapter, optimizer and scheduler, and before trainer_state.json.
            super()._save_rng_state(output_dir)
            if self.state.global_step == pause_step:
                _touch(f"paused-{pause_step}")
                time.sleep(600)

    return PausingTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max_steps", type=int, default=MAX_STEPS)
    parser.add_argument("--save_steps", type=int, default=SAVE_STEPS)
    args = parser.parse_args()
    trainer = build_trainer(args.out, max_steps=args.max_steps, save_steps=args.save_steps)
    trainer.train()
    if os.environ.get(PROGRESS_ENV):
        _touch("done")


if __name__ == "__main__":
    main()
