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
