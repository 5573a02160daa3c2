"""Subprocesses for the tests: each in its own process group, and the whole group killed when the test stops.

A test that launches ``torchrun`` or ``deepspeed`` starts a tree of processes (launcher, ranks, a compiler). Killing
only the launcher on a timeout or a Ctrl-C leaves the ranks running, holding ports, cores and build locks. Every
process started here leads a new session (``start_new_session=True``); on a timeout, an exception, a
KeyboardInterrupt, a fixture's teardown or the interpreter's exit, its whole group gets SIGKILL.

Runs that may use DeepSpeed on a CPU first check the torch extensions folder for a build lock a killed build left
behind (``kasa_trl.torch_extensions``): DeepSpeed would wait for it forever; the test fails at once with the fix.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence

import pytest

from kasa_trl import torch_extensions

_LIVE: set[subprocess.Popen] = set()


def start(cmd: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **popen_kwargs)`` leading its own process group; :func:`stop` kills the group."""
    process = subprocess.Popen(list(cmd), start_new_session=True, **popen_kwargs)
    _LIVE.add(process)
    return process


def stop(process: subprocess.Popen) -> None:
    """SIGKILL ``process``'s whole group (its children too, even if ``process`` itself already exited), reap it."""
    _kill_group(process)
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()
    _LIVE.discard(process)


def finish(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Wait for ``process`` (started with text pipes) and return its ``(stdout, stderr)``; on a timeout, an error
    or an interrupt, kill its group first. A timeout fails the test with the output so far and the build locks."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        stdout, stderr = process.communicate()  # the pipes close once the whole group is dead
        stop(process)
        pytest.fail(
            f"{' '.join(map(str, process.args[:4]))} ... still running after {timeout:.0f} s: its process group "
            f"was killed. {_locks_report()}\nstdout:\n{(stdout or '')[-3000:]}\nstderr:\n{(stderr or '')[-6000:]}"
        )
    except BaseException:
        stop(process)
        raise
    stop(process)  # a launcher can exit while a rank of its group lingers: leave nothing behind
    return stdout or "", stderr or ""


def run(cmd: Sequence[str], *, timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)``, in a process group of its
    own that is killed on a timeout (failing the test), an error or a Ctrl-C."""
    process = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs)
    stdout, stderr = finish(process, timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()


def check_build_locks() -> None:
    """Fail the test, with the fix, if DeepSpeed would wait forever on a build lock a killed build left."""
    try:
        torch_extensions.check_build_locks()
    except RuntimeError as e:
        pytest.fail(str(e))


def _locks_report() -> str:
    locks = torch_extensions.build_locks()
    if not locks:
        return f"No build lock under {torch_extensions.extensions_root()}."
    return "Build locks: " + "; ".join(
        f"{lock.path} ({lock.age_s:.0f} s old, {'stale' if lock.stale else f'held by {lock.holders}'})"
        for lock in locks
    )


@atexit.register
def _stop_all() -> None:  # an interrupted session that skipped a teardown still leaves no process behind
    for process in list(_LIVE):
        stop(process)
