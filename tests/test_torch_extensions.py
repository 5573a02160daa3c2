"""kasa_trl.torch_extensions: a build lock left by a killed build is found (and left alone), a live one is not
called stale; and the tests' process groups die whole (tests/distributed/processes.py)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from kasa_trl import torch_extensions as ext

from .distributed import processes


@pytest.fixture
def lock(tmp_path):
    path = tmp_path / ext.CPU_COMM_OP / ext.LOCK_NAME
    path.parent.mkdir()
    path.touch()
    return path


def test_lock_nobody_holds_is_stale_and_reported_with_the_fix(tmp_path, lock):
    (found,) = ext.build_locks(tmp_path)
    assert found.path == lock and found.holders == () and found.stale
    with pytest.raises(RuntimeError) as error:
        ext.check_build_locks(tmp_path)
    message = str(error.value)
    assert f"rm {lock}" in message and "killed" in message and "TORCH_EXTENSIONS_DIR" in message
    assert lock.is_file()  # reported, not removed


def test_lock_held_open_by_a_build_is_live(tmp_path, lock):
    """A build holds its lock open (torch's FileBaton keeps the descriptor) until it removes it."""
    fd = os.open(lock, os.O_RDONLY)
    try:
        (found,) = ext.check_build_locks(tmp_path)
        assert os.getpid() in found.holders and not found.stale
    finally:
        os.close(fd)


def test_lock_held_by_another_process_is_live(tmp_path, lock):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import os, sys; fd = os.open({str(lock)!r}, os.O_RDONLY); print(1, flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        holder.stdout.readline()  # the file is open
        (found,) = ext.check_build_locks(tmp_path)
        assert found.holders == (holder.pid,)
    finally:
        holder.stdin.close()
        holder.wait()
    assert ext.build_locks(tmp_path)[0].stale  # once its holder is gone


def test_without_a_process_table_age_decides(tmp_path, lock, monkeypatch):
    monkeypatch.setattr(ext, "_holders", lambda path, stat: None)
    assert not ext.build_locks(tmp_path)[0].stale
    old = time.time() - ext.STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    assert ext.build_locks(tmp_path)[0].stale


def test_no_locks_and_built_op(tmp_path):
    assert ext.check_build_locks(tmp_path) == [] and not ext.is_built(root=tmp_path)
    (tmp_path / ext.CPU_COMM_OP).mkdir()
    (tmp_path / ext.CPU_COMM_OP / f"{ext.CPU_COMM_OP}.so").touch()
    assert ext.is_built(root=tmp_path)


def test_extensions_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ext.extensions_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    root = ext.extensions_root()
    assert root.parent.name == "torch_extensions" and root.name.startswith(f"py{sys.version_info.major}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(") ")[1][0] != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_timeout_kills_the_whole_process_group():
    """A launcher whose child outlives it (a rank, a compiler): a timeout kills both, and fails the test."""
    script = "import subprocess, sys, time; c = subprocess.Popen(['sleep', '300'], stdout=subprocess.DEVNULL); print(c.pid, flush=True); time.sleep(300)"
    process = processes.start([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(process.stdout.readline())
    with pytest.raises(pytest.fail.Exception, match="process group was killed"):
        processes.finish(process, timeout=0.5)
    assert process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30  # SIGKILL is delivered at once; the wait only covers reaping by init
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_interrupt_kills_the_whole_process_group(monkeypatch):
    script = "import subprocess, sys, time; c = subprocess.Popen(['sleep', '300'], stdout=subprocess.DEVNULL); print(c.pid, flush=True); time.sleep(300)"
    process = processes.start([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(process.stdout.readline())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(process, "communicate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        processes.finish(process, timeout=60)
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child) and process.returncode == -signal.SIGKILL
