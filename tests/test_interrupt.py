"""Interrupted training: SIGKILL at a random step or in the middle of a checkpoint save, then resume.

``tests/distributed/train_worker.py`` (AdamW, linear schedule, adapter dropout: resuming exactly needs the optimizer,
scheduler and RNG states too) runs in a subprocess and is killed; the uninterrupted reference and the resumed runs
use the same ``build_trainer`` in-process. On CPU with one thread and a fixed seed every run computes the same
kernels in the same order, so the resumed adapter must equal the reference BITWISE (tolerance 0).

The two killed runs start as soon as the module's fixtures are built, each watched by a thread that kills it, and
train meanwhile with the reference run (each subprocess pays ~10 s of CPU for its imports; ~30 s of wall time on
the loaded 2-core machine).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers.trainer_utils import get_last_checkpoint

from kasa_trl import load_kasa_adapter
from kasa_trl.adapter_io import ADAPTER_FILE, read_adapter
from kasa_trl.checkpoint import is_complete_checkpoint, last_complete_checkpoint
from kasa_trl.tiny import build_tiny_llama, build_tokenizer

from .distributed import processes, train_worker
from .distributed.train_worker import MAX_STEPS, SAVE_STEPS, adapter_tensors, build_trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(train_worker.__file__)
PAUSED_STEP = 6
# Reproduce a failing random kill with KASA_TEST_KILL_SEED=<the seed printed in the failure>.
KILL_SEED = int(os.environ.get("KASA_TEST_KILL_SEED", time.time_ns() % 2**31))
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "PYTHONWARNINGS": "ignore",
}


class KilledRun:
    """A worker subprocess and the thread that SIGKILLs it when ``trigger`` (a path) appears."""

    def __init__(self, root: Path, trigger: str, *, step: int, extra_env: dict[str, str]) -> None:
        """``trigger``: ``checkpoint-N`` (in the output directory) or a progress file of the worker."""
        self.out, self.progress = root / "out", root / "progress"
        self.progress.mkdir(parents=True)
        self.step = step
        self.trigger = (self.out if trigger.startswith("checkpoint-") else self.progress) / trigger
        self.log = root / "worker.log"
        env = {**ENV, train_worker.PROGRESS_ENV: str(self.progress), **extra_env}
        with open(self.log, "w") as log:
            self.proc = processes.start(
                [sys.executable, str(WORKER), "--out", str(self.out)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.killed = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.trigger.exists():
                self.proc.send_signal(signal.SIGKILL)
                self.killed = True
                break
            time.sleep(0.001)

    def wait(self) -> None:
        self._thread.join(timeout=420)
        self.proc.wait(timeout=30)
        assert self.killed and self.proc.returncode == -signal.SIGKILL, (
            f"the worker was not killed at {self.trigger.name} (exit {self.proc.returncode}); "
            f"log:\n{self.log.read_text()[-4000:]}"
        )

    def stop(self) -> None:
        processes.stop(self.proc)


def _kill_target(rng: random.Random) -> tuple[int, str]:
    """A random step 3..7: at a save step, kill as soon as its checkpoint directory appears (mid-save); else as
    soon as the step ends."""
    step = rng.randint(3, MAX_STEPS - 1)
    return step, (f"checkpoint-{step}" if step % SAVE_STEPS == 0 else f"step-{step}")


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Both killed runs, started before the reference trains (the slow test consumes them)."""
    root = tmp_path_factory.mktemp("interrupt")
    step, trigger = _kill_target(random.Random(KILL_SEED))
    runs = {
        # The sleep before each step leaves the watcher time to aim at the step it drew.
        "random": KilledRun(
            root / "random", trigger, step=step, extra_env={train_worker.STEP_SLEEP_ENV: "0.3"}
        ),
        "paused": KilledRun(
            root / "paused",
            f"paused-{PAUSED_STEP}",
            step=PAUSED_STEP,
            extra_env={train_worker.PAUSE_ENV: str(PAUSED_STEP)},
        ),
    }
    yield runs
    for run in runs.values():
        run.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, request):
    """The uninterrupted run (checkpoints every 2 steps): its final adapter and output directory."""
    if any(
        item.get_closest_marker("slow") and item.module is request.module for item in request.session.items
    ):
        request.getfixturevalue("killed_runs")  # start the subprocesses first: they train meanwhile
    out = tmp_path_factory.mktemp("reference") / "out"
    trainer = build_trainer(out)
    trainer.train()
    return adapter_tensors(trainer), out


def _resume(output_dir: Path, checkpoint: str | bool) -> dict[str, torch.Tensor]:
    trainer = build_trainer(output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    return adapter_tensors(trainer)


def _assert_bitwise(actual: dict, expected: dict, context: str) -> None:
    assert actual.keys() == expected.keys()
    worst = max(float((actual[k] - expected[k]).abs().max()) for k in expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected), f"{context}: max abs diff {worst:.3g}"


def _same_adapter(a: str | Path, b: str | Path) -> bool:
    (_, x), (_, y) = read_adapter(a), read_adapter(b)
    return x.keys() == y.keys() and all(torch.equal(x[n][k], y[n][k]) for n in x for k in x[n])


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_reaches_the_same_adapter(killed_runs, reference, tmp_path):
    run = killed_runs["random"]
    run.wait()
    cut = run.out / f"checkpoint-{run.step}"
    held = sorted(p.name for p in cut.iterdir()) if cut.is_dir() else None
    context = (
        f"killed at {run.trigger.name} (KASA_TEST_KILL_SEED={KILL_SEED}); checkpoint-{run.step} held {held}"
    )
    print(f"\n{context}")
    if cut.is_dir() and not is_complete_checkpoint(cut):  # killed mid-save: transformers would pick it
        assert get_last_checkpoint(str(run.out)) == str(cut), context
    last = last_complete_checkpoint(run.out)
    assert last is not None, context
    last_step = int(Path(last).name.split("-")[1])
    # Only the save in progress (if any) is lost: the one before it is complete.
    assert run.step - SAVE_STEPS <= last_step <= run.step, context
    # The checkpoint is the reference run's checkpoint of that step, bit for bit, and loads onto a fresh base.
    assert _same_adapter(last, reference[1] / f"checkpoint-{last_step}"), context
    load_kasa_adapter(build_tiny_llama(len(build_tokenizer()), seed=0), last)
    _assert_bitwise(_resume(run.out, last), reference[0], context)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save(killed_runs, reference, tmp_path):
    """Killed after checkpoint-6's adapter, optimizer, scheduler and RNG states, before its trainer_state.json."""
    run = killed_runs["paused"]
    run.wait()
    incomplete = run.out / f"checkpoint-{PAUSED_STEP}"
    assert (incomplete / ADAPTER_FILE).is_file() and (incomplete / "optimizer.pt").is_file()
    assert not (incomplete / "trainer_state.json").exists()
    # transformers would resume from the incomplete checkpoint; kasa_trl picks the one before.
    assert get_last_checkpoint(str(run.out)) == str(incomplete)
    assert not is_complete_checkpoint(incomplete)
    last = last_complete_checkpoint(run.out)
    assert last == str(run.out / f"checkpoint-{PAUSED_STEP - SAVE_STEPS}")
    assert _same_adapter(last, reference[1] / f"checkpoint-{PAUSED_STEP - SAVE_STEPS}")
    # Resume as a user would, in the same output directory (a copy: the next test needs the killed one).
    out = tmp_path / "out"
    shutil.copytree(run.out, out)
    _assert_bitwise(_resume(out, last.replace(str(run.out), str(out))), reference[0], "resumed")
    assert is_complete_checkpoint(out / f"checkpoint-{PAUSED_STEP}")  # rewritten by the resumed run


@pytest.mark.slow
def test_resume_true_skips_the_incomplete_checkpoint(killed_runs, reference, tmp_path):
    run = killed_runs["paused"]
    run.wait()
    out = tmp_path / "out"
    shutil.copytree(run.out, out)
    _assert_bitwise(_resume(out, True), reference[0], "train(resume_from_checkpoint=True)")


# --- is_complete_checkpoint / last_complete_checkpoint on damaged copies of a complete checkpoint ---------------


def _poison_adapter(directory: Path) -> None:
    """A NaN in a saved lora_diag, written past write_adapter (which refuses to save one): a file damaged on disk
    or left by an older writer."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = directory / ADAPTER_FILE
    with safe_open(path, "pt") as f:
        metadata, flat = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    flat[next(k for k in flat if k.endswith("lora_diag"))][0] = float("nan")
    save_file(flat, path, metadata=metadata)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "no-trainer-state": (lambda d: (d / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "truncated-trainer-state": (lambda d: _truncate(d / "trainer_state.json"), "unreadable"),
    "no-adapter": (lambda d: (d / ADAPTER_FILE).unlink(), "KaSA adapter is unreadable"),
    "truncated-adapter": (lambda d: _truncate(d / ADAPTER_FILE), "corrupt or truncated"),
    "nan-adapter": (_poison_adapter, r"non-finite .*lora_diag"),
    "no-optimizer": (lambda d: (d / "optimizer.pt").unlink(), "optimizer state"),
    "no-scheduler": (lambda d: (d / "scheduler.pt").unlink(), "scheduler state"),
    "no-rng-state": (lambda d: (d / "rng_state.pth").unlink(), "RNG state"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_is_skipped_with_the_reason(reference, tmp_path, caplog, damage):
    source = reference[1]
    out = tmp_path / "out"
    for step in (2, 4):
        shutil.copytree(source / f"checkpoint-{step}", out / f"checkpoint-{step}")
    assert is_complete_checkpoint(out / "checkpoint-4")
    apply, reason = DAMAGES[damage]
    apply(out / "checkpoint-4")
    assert not is_complete_checkpoint(out / "checkpoint-4")
    with caplog.at_level(logging.WARNING, logger="kasa_trl.checkpoint"):
        assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert any("checkpoint-4" in r.message for r in caplog.records)
    assert re.search(reason, caplog.text), caplog.text
    if damage in ("no-optimizer", "no-scheduler", "no-rng-state"):  # a save_only_model run has none of them
        assert is_complete_checkpoint(out / "checkpoint-4", require_optimizer=False)


def test_newest_by_step_number_and_none_without_checkpoints(reference, tmp_path):
    out = tmp_path / "out"
    assert last_complete_checkpoint(out) is None  # no output directory yet
    out.mkdir()
    assert last_complete_checkpoint(out) is None
    for step in (9, 10):  # "checkpoint-9" > "checkpoint-10" as strings
        target = out / f"checkpoint-{step}"
        shutil.copytree(reference[1] / "checkpoint-8", target)
        state = json.loads((target / "trainer_state.json").read_text())
        (target / "trainer_state.json").write_text(json.dumps({**state, "global_step": step}))
    assert last_complete_checkpoint(out) == str(out / "checkpoint-10")
    shutil.copytree(reference[1] / "checkpoint-8", out / "checkpoint-11")  # says step 8: a stray copy
    assert not is_complete_checkpoint(out / "checkpoint-11")
    assert last_complete_checkpoint(out) == str(out / "checkpoint-10")
