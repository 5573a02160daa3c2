"""Files that readers never see half-written, even with several writers at once.

A file is written to an exclusively created temporary file with an unpredictable name in the target's directory
(``mkstemp``: no following a link planted at a known name), fsynced, then renamed over the target. Writers that
must replace several files of one directory together hold the directory's exclusive lock (``flock``; readers hold
it shared), so the files always come from one writer. A temporary file is named
``.<target>.<host>-<pid>.<random>.tmp``: one left by a killed writer is removed by the next writer once that
writer can prove it stale (same host, process gone); any other is left alone, and named in a warning.

The pieces every kasa_trl writer shares (``host_tag``, ``process_alive``, ``current_umask``, ``publish_file``,
``fsync_directory``) live here; ``atomic_outputs`` builds the command line's output directories on them.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

try:  # POSIX; elsewhere writers of one directory are not serialized
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]  # None stands for "no fcntl on this OS"


@contextlib.contextmanager
def directory_lock(directory: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold ``directory``'s lock, exclusively (writers) or shared (readers); no lock where the OS offers none."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. no permission to open it: nothing to serialize with
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as e:  # e.g. a file system without flock
            if exclusive:
                warnings.warn(
                    f"cannot lock {directory} ({e}); concurrent writers into it are not serialized",
                    stacklevel=4,
                )
        yield
    finally:
        os.close(fd)  # releases the lock


def atomic_write(target: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(path)`` on a new temporary file next to ``target``, fsync it, then rename it over ``target``.

    The caller fsyncs the directory (``fsync_directory``) once its renames are done.
    """
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.{host_tag()}-{os.getpid()}.", suffix=".tmp", dir=target.parent
    )
    tmp_path = Path(tmp)
    try:
        os.close(fd)
        write(tmp_path)
        publish_file(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def publish_file(tmp: Path, target: Path) -> None:
    """Give the written temporary ``tmp`` a plain file's permissions (``0o666 & ~umask``), fsync it, and rename it
    over ``target``."""
    with contextlib.suppress(OSError):  # after writing: some writers (safetensors) recreate the file 0600
        os.chmod(tmp, 0o666 & ~current_umask())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


def remove_stale_temporaries(directory: Path, targets: Iterable[str]) -> None:
    """Remove the temporary files that killed writers of ``targets`` (file names) left in ``directory``.

    Call it holding the directory's exclusive lock. Only a file whose writer is provably gone is removed: written
    on this host by a process that no longer runs. The others (a writer still running, or one on another host or
    from an older version, which named its files differently) are named in a warning and left alone.
    """
    names = "|".join(re.escape(name) for name in targets)
    pattern = re.compile(rf"^\.(?:{names})\.(?P<host>[A-Za-z0-9_]*)-(?P<pid>\d+)\.[^.]+\.tmp$")
    prefixes = tuple(f".{name}." for name in targets)
    host, kept = host_tag(), []
    for path in directory.iterdir():
        if not (path.name.startswith(prefixes) and path.name.endswith(".tmp")):
            continue
        match = pattern.match(path.name)
        if match and match["host"] == host and not process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
        else:
            kept.append(path.name)
    if kept:
        warnings.warn(
            f"{directory} holds temporary files {sorted(kept)[:5]} of a write that may still be running (or of one "
            "killed on another machine or by an older version); they are ignored. Delete them once no other process "
            "writes into this directory",
            stacklevel=3,
        )


def fsync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def host_tag() -> str:
    """This machine's name as temporary file names carry it (letters, digits and ``_``; at most 64): a writer
    only ever removes the leftovers of processes it can check, those of its own host."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64]


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's counts): its temporary files may be in use."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: another user's process
        return True
    return True


def current_umask() -> int:
    """The process's umask: new files get ``0o666 & ~umask``, new directories ``0o777 & ~umask`` (``mkstemp`` and
    ``mkdtemp`` give 0o600 and 0o700, which would hide an output from the user's group). Read from /proc, because
    ``os.umask`` can only be read by setting it (racing other threads); 0o022 where /proc does not say."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022
