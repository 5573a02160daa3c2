"""torch's C++ extension builds (DeepSpeed's CPU ops): where they go, and the build lock a killed build leaves.

DeepSpeed on a CPU compiles a C++ op (``deepspeed_shm_comm``, about a minute, with the system's ``c++``) the
first time a run uses it, through ``torch.utils.cpp_extension.load``. Every process that loads the op first
creates ``<extensions root>/<op>/lock`` (``os.open(O_CREAT | O_EXCL)``, held open while it builds, removed when
done); a process that finds the file waits, polling, for as long as it exists. A build killed in between (Ctrl-C,
SIGKILL, a test timeout) leaves the file behind, and every later run, in any virtual environment sharing the
extensions root, then waits forever without a word. :func:`check_build_locks` finds such a lock before a run
starts and says how to remove it.

A lock is *stale* when no process on this machine has it open (checked through ``/proc/<pid>/fd``), twice, a
moment apart (the builder closes the file just before removing it). Where ``/proc`` cannot tell (another OS),
a lock older than :data:`STALE_AFTER_S` counts as stale. A lock held by a build on another machine sharing the
folder (a network home directory) looks stale here too; the error says so.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "lock"
CPU_COMM_OP = "deepspeed_shm_comm"  # what DeepSpeed builds on a CPU for its collectives
STALE_AFTER_S = 600.0
"""Age past which a lock counts as stale where no process table can be read (a build takes about a minute)."""
RECHECK_S = 0.5


@dataclass(frozen=True)
class BuildLock:
    """A build lock file: ``holders`` are the pids on this machine with it open (``None``: cannot tell)."""

    path: Path
    age_s: float
    holders: tuple[int, ...] | None

    @property
    def stale(self) -> bool:
        return not self.holders if self.holders is not None else self.age_s >= STALE_AFTER_S


def extensions_root() -> Path:
    """The folder torch builds extensions under: ``$TORCH_EXTENSIONS_DIR``, else torch's per-user cache folder
    (``~/.cache/torch_extensions/py311_cpu`` for a CPU build of torch on Python 3.11), as
    ``torch.utils.cpp_extension`` computes it."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def is_built(op: str = CPU_COMM_OP, root: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``op`` has a compiled library under ``root`` (default :func:`extensions_root`)."""
    folder = Path(root if root is not None else extensions_root()) / op
    return any(folder.glob("*.so"))


def build_locks(root: str | os.PathLike[str] | None = None) -> list[BuildLock]:
    """The build locks under ``root`` (default :func:`extensions_root`), one per op being built or killed while
    building; stale ones are confirmed by a second look :data:`RECHECK_S` later."""
    root = Path(root if root is not None else extensions_root())
    locks = [lock for lock in map(_look, sorted(root.glob(f"*/{LOCK_NAME}"))) if lock is not None]
    if any(lock.stale for lock in locks):
        time.sleep(RECHECK_S)
        locks = [again for lock in locks if (again := _look(lock.path) if lock.stale else lock) is not None]
    return locks


def check_build_locks(root: str | os.PathLike[str] | None = None) -> list[BuildLock]:
    """Raise ``RuntimeError`` naming every stale lock under ``root`` and the command that removes it; return the
    live ones (a build in progress: the caller will wait for it, which is fine). Changes nothing on disk."""
    locks = build_locks(root)
    stale = [lock for lock in locks if lock.stale]
    if stale:
        paths = " ".join(str(lock.path) for lock in stale)
        ages = ", ".join(f"{lock.path.parent.name}: {lock.age_s / 60:.0f} min old" for lock in stale)
        raise RuntimeError(
            f"a torch extension build lock was left behind by a build that was killed ({ages}), and DeepSpeed "
            f"would wait for it forever without a message. No process on this machine holds it. Remove it and "
            f"run again (the op is rebuilt, about a minute): rm {paths}  (if another machine shares this "
            f"folder and is building right now, wait for it instead; TORCH_EXTENSIONS_DIR picks another folder)"
        )
    return locks


def compiler() -> str | None:
    """The C++ compiler torch's extension builds call (``$CXX``, else ``c++``), if it is on ``PATH``."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _look(path: Path) -> BuildLock | None:
    try:
        stat = path.stat()
    except FileNotFoundError:  # released meanwhile
        return None
    return BuildLock(path, max(0.0, time.time() - stat.st_mtime), _holders(path, stat))


def _holders(path: Path, stat: os.stat_result) -> tuple[int, ...] | None:
    """Pids with ``path`` open, from ``/proc``; None where there is no ``/proc`` to read."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    holders = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                target = fd.stat()  # follows the link to the open file
            except OSError:
                continue
            if (target.st_dev, target.st_ino) == (stat.st_dev, stat.st_ino):
                holders.append(int(entry.name))
                break
    return tuple(holders)
