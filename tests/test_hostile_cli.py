"""Hostile-user review findings on the command line's outputs (h12 B2, B14) and the README walk (h13)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kasa_trl import atomic_outputs
from kasa_trl.atomic_files import current_umask

_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from kasa_trl.atomic_outputs import atomic_output_dir

    with atomic_output_dir(sys.argv[1], overwrite=True) as tmp:
        (tmp / "payload.txt").write_text("from the writer")
        print(tmp, flush=True)
        sys.stdin.readline()  # the test says when to finish
    print("done", flush=True)
    """
)


def _start_writer(out: Path) -> tuple[subprocess.Popen[str], Path]:
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_a_live_writer_invisible_to_the_pid_check_keeps_its_temporary(tmp_path, monkeypatch):
    # B2: a writer in another PID namespace looks dead to process_alive; its lock still proves it alive.
    out = tmp_path / "out"
    writer, tmp = _start_writer(out)
    try:
        assert tmp.is_dir() and tmp.name.startswith(".out.kasa-trl-")
        monkeypatch.setattr(atomic_outputs, "process_alive", lambda pid: False)
        with pytest.warns(UserWarning, match="holds its lock and is still writing it"):
            notes = atomic_outputs.clean_stale(out.resolve())
        assert len(notes) == 1 and str(tmp) in notes[0]
        assert (tmp / "payload.txt").read_text() == "from the writer"
        stdout, _ = writer.communicate("go\n", timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0 and stdout.strip() == "done"
    assert (out / "payload.txt").read_text() == "from the writer"
    assert not tmp.exists()


def test_a_killed_writers_temporary_is_removed_once_its_lock_is_gone(tmp_path):
    out = tmp_path / "out"
    writer, tmp = _start_writer(out)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    assert tmp.is_dir()
    with pytest.warns(UserWarning, match="killed while writing"):
        atomic_outputs.clean_stale(out.resolve())
    assert not tmp.exists() and not out.exists()


def test_outputs_get_the_permissions_of_a_plain_write(tmp_path):
    # B14: safetensors creates its files 0600; an output must be readable as a plain write would leave it.
    out = tmp_path / "out"
    with atomic_outputs.atomic_output_dir(out) as tmp:
        secret = tmp / "adapter_model.safetensors"
        secret.write_bytes(b"x")
        os.chmod(secret, 0o600)
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "f").write_bytes(b"y")
        os.chmod(tmp / "sub" / "f", 0o600)
    umask = current_umask()
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((out / "sub" / "f").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


# --- h13: a moved output folder, the merge message, the noise ----------------------------------------------


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory):
    """An output folder (adapter + base/) recording its base by absolute path, copied elsewhere, original gone."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from kasa_trl import KaSAConfig, apply_kasa, register_regularizer, save_kasa_adapter
    from kasa_trl.regularizers import registered_regularizers
    from kasa_trl.tiny import build_tiny_llama, build_tokenizer

    from .conftest import randomize_adapters

    root = tmp_path_factory.mktemp("moved")
    run = root / "run"
    tokenizer = build_tokenizer()
    build_tiny_llama(len(tokenizer), seed=0).save_pretrained(run / "base")
    tokenizer.save_pretrained(run / "base")
    build_tiny_llama(len(tokenizer), seed=1).save_pretrained(root / "other_base")
    name = "h13_training_only"
    if name not in registered_regularizers():
        register_regularizer(name)(lambda A, B, diag: diag.pow(2).sum())
    config = KaSAConfig(r=3, lora_alpha=6, regularizers={name: 0.1})
    model = apply_kasa(AutoModelForCausalLM.from_pretrained(str(run / "base")), config)
    randomize_adapters(model, seed=5)
    save_kasa_adapter(model, run)
    shutil.copytree(run, root / "moved")
    run.rename(root / "gone")
    torch.manual_seed(0)
    return root


def test_a_moved_output_folder_uses_the_base_beside_it(moved_run, capsys, monkeypatch):
    import kasa_trl.adapter_files as adapter_files
    from kasa_trl import cli

    moved = moved_run / "moved"
    recorded = str(moved_run / "run" / "base")
    # merge reads the adapter where a training-only regularizer is not registered: no warning about it either.
    monkeypatch.setattr(adapter_files, "registered_regularizers", lambda: ())
    assert cli.main(["merge", str(moved), str(moved_run / "merged")]) == 0
    captured = capsys.readouterr()
    warnings_ = [line for line in captured.err.splitlines() if line.startswith("kasa-trl: warning: ")]
    assert warnings_ == [
        f"kasa-trl: warning: the recorded base {recorded} does not exist (moved or copied output?); using "
        f"{moved / 'base'}, next to the adapter (its weights are checked against the adapter)"
    ], captured.err
    assert "Setting accelerator to CPU" not in captured.err + captured.out
    assert captured.out.strip().splitlines()[-1] == (
        f"loaded {moved / 'base'}, merged 14 KaSA layers, saved the merged model to {moved_run / 'merged'}; "
        f"{moved / 'base'} is unchanged"
    )
    assert (moved_run / "merged" / "config.json").is_file()


def test_a_base_given_for_a_vanished_recorded_path_needs_no_force_but_its_weights_are_checked(
    moved_run, capsys
):
    from kasa_trl import cli

    moved = moved_run / "moved"
    out = moved_run / "lora"
    assert cli.main(["export-lora", str(moved), str(out), "--base", str(moved / "base")]) == 0
    printed = capsys.readouterr().out
    assert f"vllm serve {moved / 'base'} --enable-lora" in printed
    # Other weights under the given name: refused by the weights check, nothing written.
    wrong = moved_run / "lora_wrong"
    code = cli.main(["export-lora", str(moved), str(wrong), "--base", str(moved_run / "other_base")])
    error = capsys.readouterr().err
    assert code == 2 and "kasa-trl: error: the adapter does not fit base model" in error, error
    assert not wrong.exists()


def test_the_merge_command_prints_no_library_noise(moved_run):
    # A real process, as a user runs it: no DeepSpeed accelerator warning, no progress bars.
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = moved_run / "merged_subprocess"
    result = subprocess.run(
        [sys.executable, "-m", "kasa_trl.cli", "merge", str(moved_run / "moved"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # Only the moved-base warning (the training-only regularizer, unregistered there, is not mentioned) and the result.
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("kasa-trl: warning: the recorded base"), result.stderr
    assert result.stdout.strip().splitlines() == [result.stdout.strip()], result.stdout
    assert result.stdout.startswith("loaded "), result.stdout


def test_the_inspect_png_labels_layers_by_name(moved_run):
    pytest.importorskip("matplotlib")
    from kasa_trl.adapter_io import read_adapter
    from kasa_trl.inspect_report import draw, layer_stats

    config, per_layer = read_adapter(moved_run / "moved")
    stats = [layer_stats(name, tensors, config.scaling, top=2) for name, tensors in per_layer.items()]
    figure = draw(stats)
    for axes in figure.axes:
        labels = [label.get_text() for label in axes.get_xticklabels()]
        assert len(labels) == 14 and labels[0] == "0.mlp.down_proj" and labels[-1] == "1.self_attn.v_proj"
