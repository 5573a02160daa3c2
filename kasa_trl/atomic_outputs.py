"""Writing an output directory or file all at once, without ever destroying anything kasa_trl did not write.

Used by the command line and ``kasa_trl.integrations.peft`` for their outputs (exports, merged models, pictures);
standard library only, so the command line checks an output before it imports torch. The rules
(docs/guarantees.md, "The command line never destroys an input"):

- An output never overlaps an input: it may not equal, contain or lie inside an input directory, nor equal or
  contain a file of one (symbolic links resolved, so a link inside the adapter directory that points elsewhere
  protects its target too). Refused with or without ``overwrite``.
- Without ``overwrite`` an output directory must not exist or be empty. With it, a directory is replaced only
  when kasa_trl wrote everything in it: every output directory gets a manifest (``MANIFEST``) listing its files
  with their sizes and modification times, and a directory holding anything else (or a file changed since) is
  refused, naming those files.
- Everything is written into a sibling created exclusively under an unpredictable name (``tempfile.mkdtemp`` /
  ``mkstemp``: a link planted at a guessed name is never followed) and becomes the output in one rename; an
  existing output is swapped out atomically (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, the old
  output parked in another exclusive sibling in between), then deleted.
- Each writer holds an exclusive ``flock`` on its temporary siblings for its whole life (the kernel releases it
  when the writer dies, however it dies, in whatever PID namespace it runs). The siblings also carry the writer's
  host and pid in their names. A later write to the same output deletes a sibling only if it can take that lock
  (no writer holds it) and it was written on this host by a process that no longer exists here, or restores the
  previous output a writer killed between its two renames had parked, and says so in a warning; any other
  sibling is left alone and named. Where the file system offers no ``flock`` the host and pid alone decide.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .atomic_files import current_umask, fsync_directory, host_tag, process_alive, publish_file

try:  # POSIX; elsewhere only the host and pid in a temporary's name tell whether its writer is gone
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]  # None stands for "no flock on this OS"

MANIFEST = ".kasa-trl-output.json"
_WRITER = "kasa_trl"


# --- checks ------------------------------------------------------------------------------------------------


def check_no_overlap(
    output: str | os.PathLike[str], inputs: Mapping[str, str | os.PathLike[str] | None]
) -> Path:
    """Refuse an ``output`` that equals, contains or lies inside an input; returns it resolved.

    Args:
        output: the path about to be written (a directory or a file).
        inputs: what the command reads, by role (``{"adapter directory": path}``); ``None`` entries are skipped.
            A directory counts with every file under it, each also at the place its symbolic links lead to.

    Raises:
        ValueError: naming the output, the input and how they overlap.
    """
    target = Path(output).resolve()
    for role, given in inputs.items():
        if given is None:
            continue
        for path, shown in _input_members(Path(given)):
            if target == path or _same_file(target, path):  # the same directory through a bind mount, say
                relation = "is"
            elif path.is_relative_to(target):
                relation = "contains"
            elif target.is_relative_to(path):
                relation = "lies inside"
            else:
                continue
            raise ValueError(
                f"output {output} {relation} {shown} (the {role}), which this command reads; nothing was written: "
                "choose an output outside every input"
            )
    return target


def check_output_dir(
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> Path:
    """Fail early, before any work, if ``out_dir`` cannot receive a fresh output; returns it resolved.

    Raises:
        ValueError: ``out_dir`` overlaps an input (see ``check_no_overlap``).
        NotADirectoryError: ``out_dir`` exists and is not a directory.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false, or holds files kasa_trl did not
            write (or changed since), named in the message.
    """
    target = check_no_overlap(out_dir, inputs or {})
    clean_stale(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"output {out_dir} exists and is not a directory")
    if _non_empty(target):
        if not overwrite:
            raise FileExistsError(
                f"output directory {out_dir} exists and is not empty; choose a new directory or pass "
                "overwrite=True (--overwrite on the command line) to replace an earlier kasa_trl output there"
            )
        _check_replaceable(target, shown=str(out_dir))
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _input_members(root: Path) -> Iterator[tuple[Path, str]]:
    """``root`` resolved, then every entry under it at the place it resolves to, each with how to name it."""
    resolved = root.resolve()
    yield resolved, str(root)
    if not resolved.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(resolved):
        for name in dirnames + filenames:
            entry = Path(dirpath, name)
            # os.walk does not enter linked directories, so only a link itself can lead elsewhere.
            if entry.is_symlink():
                real = entry.resolve()
                yield real, f"{real} (reached through {entry})"


def _check_replaceable(target: Path, *, shown: str) -> None:
    """Refuse to replace ``target`` unless its manifest lists every file in it, unchanged."""
    listed = _read_manifest(target)
    if listed is None:
        foreign = sorted(str(p.relative_to(target)) for p in _entries(target))
        if not foreign:
            return  # empty subdirectories only: nothing to lose
        raise FileExistsError(
            f"output directory {shown} was not written by kasa_trl (no {MANIFEST}) and holds "
            f"{_some(foreign)}; overwrite replaces only an earlier kasa_trl output: move those files away or "
            "choose another directory"
        )
    foreign, changed = [], []
    for path in _entries(target):
        relative = path.relative_to(target).as_posix()
        stat = path.lstat()
        if relative not in listed:
            foreign.append(relative)
        elif [stat.st_size, stat.st_mtime_ns] != listed[relative] or path.is_symlink():
            changed.append(relative)
    if foreign or changed:
        problems = ([f"files kasa_trl did not write: {_some(sorted(foreign))}"] if foreign else []) + (
            [f"files changed since kasa_trl wrote them: {_some(sorted(changed))}"] if changed else []
        )
        raise FileExistsError(
            f"output directory {shown} holds {'; and '.join(problems)}; overwrite replaces only what kasa_trl "
            "wrote: move those files away or choose another directory"
        )


def _entries(root: Path) -> Iterator[Path]:
    """Every file and link under ``root`` except the manifest (empty directories hold nothing to lose)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            path = Path(dirpath, name)
            if path != root / MANIFEST:
                yield path


def _read_manifest(directory: Path) -> dict[str, list[int]] | None:
    path = directory / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("written_by") == _WRITER else None
    return files if isinstance(files, dict) else None


def _write_manifest(directory: Path) -> None:
    files = {}
    for path in sorted(_entries(directory)):
        stat = path.lstat()
        files[path.relative_to(directory).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    text = json.dumps({"written_by": _WRITER, "format": 1, "files": files}, indent=2, sort_keys=True)
    (directory / MANIFEST).write_text(text + "\n", encoding="utf-8")


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


# --- writing -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> Iterator[Path]:
    """Yield a fresh temporary directory; when the block succeeds it becomes ``out_dir``, with a manifest.

    ``out_dir`` is checked first (``check_output_dir``) and again just before the swap. A failure or an interrupt
    leaves ``out_dir`` as it was and removes the temporary directory.
    """
    target = check_output_dir(out_dir, overwrite=overwrite, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, lock = _locked_temporary(
        lambda: Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent))
    )
    try:
        yield tmp
        _write_manifest(tmp)
        _fsync_tree(tmp)
        _make_shareable(tmp)
        _move_into_place(tmp, target, overwrite=overwrite, shown=str(out_dir))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _release(lock)


@contextlib.contextmanager
def atomic_output_file(
    path: str | os.PathLike[str],
    *,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
    is_ours: Callable[[Path], bool],
    what: str = "file",
) -> Iterator[Path]:
    """Yield a fresh temporary file path; when the block succeeds the file replaces ``path``.

    An existing ``path`` is replaced only when ``is_ours(path)`` says kasa_trl wrote it (e.g. a PNG carrying
    kasa-trl's tag). Same overlap rule and stale-file cleanup as ``atomic_output_dir``.
    """
    target = check_no_overlap(path, inputs or {})
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {Path(path).parent} does not exist")
    clean_stale(target)
    if target.exists() and not target.is_file():
        raise FileExistsError(f"cannot write {path}: it exists and is not a regular file")
    if target.exists() and not is_ours(target):
        raise FileExistsError(
            f"{path} exists and is not a {what} written by kasa_trl; move it away or choose another name"
        )
    tmp, lock = _locked_temporary(lambda: _new_file(target))
    try:
        yield tmp
        publish_file(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _release(lock)


def _new_file(target: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(name)


# --- the writer's lock -------------------------------------------------------------------------------------


def _locked_temporary(create: Callable[[], Path]) -> tuple[Path, int | None]:
    """A new temporary from ``create()`` with this writer's exclusive lock on it (``None``: no flock here).

    Between creating and locking, a cleaner may find the temporary unlocked and delete it; the writer then
    holds the lock of a removed inode, so it checks the path still leads to what it locked, else starts over.
    """
    for _ in range(100):
        path = create()
        lock = _try_lock(path)
        if lock is None:
            return path, None
        if lock >= 0:
            try:
                if os.path.samestat(os.fstat(lock), os.lstat(path)):
                    return path, lock
            except OSError:  # removed meanwhile
                pass
            os.close(lock)
    raise OSError(f"cannot create a locked temporary next to {path}: removed by other processes each time")


def _try_lock(path: Path) -> int | None:
    """Take ``path``'s exclusive lock without waiting: the open descriptor holding it, ``-1`` if another process
    holds it, ``None`` where flock is unavailable (no fcntl, or a file system without it)."""
    if fcntl is None:
        return None
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    except OSError:  # e.g. ENOLCK / EOPNOTSUPP: a file system without flock
        os.close(fd)
        return None
    return fd


def _release(lock: int | None) -> None:
    if lock is not None and lock >= 0:
        os.close(lock)  # releases the flock


def _prefix(target: Path) -> str:
    return f".{target.name}.kasa-trl-{host_tag()}-{os.getpid()}-"


def _move_into_place(tmp: Path, target: Path, *, overwrite: bool, shown: str) -> None:
    if not _non_empty(target):
        try:
            os.replace(tmp, target)  # rename(2) replaces an empty directory
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if not overwrite:  # the target filled up while we were writing
        raise FileExistsError(
            f"output directory {shown} was filled by someone else while writing; not replaced"
        )
    _check_replaceable(target, shown=shown)  # again: someone may have added files since the first check
    # The previous output, once swapped to the temporary's name, must stay locked until it is deleted.
    previous = _try_lock(target)
    if previous == -1:
        raise FileExistsError(
            f"output directory {shown} is being replaced by another kasa_trl command; not replaced"
        )
    try:
        if _exchange(tmp, target):
            shutil.rmtree(tmp)  # now the previous output
            return
        # No atomic exchange here: park the old output in an exclusive sibling; a run killed in between leaves it
        # for clean_stale to restore.
        holder, lock = _locked_temporary(
            lambda: Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".old", dir=target.parent))
        )
        try:
            os.replace(target, holder / target.name)
            os.replace(tmp, target)
            shutil.rmtree(holder)
        finally:
            _release(lock)
    finally:
        _release(previous)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` if unsupported here."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a filesystem without it
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc < 2.28, or another libc
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


# --- what a killed writer leaves ---------------------------------------------------------------------------


def clean_stale(target: Path) -> list[str]:
    """Remove what killed writers of ``target`` left next to it; returns (and warns) what was done or left.

    Only siblings whose names this module creates for ``target`` are considered, and only those whose lock no
    process holds (where flock works), created on this host by a process that no longer exists here, owned by this
    user, are deleted; a parked previous output whose target is missing is renamed back into place instead. The
    lock is what proves a writer gone: a writer in another PID namespace (another container sharing the volume
    and the host name) is invisible to the pid check, but its lock is not.
    """
    pattern = re.compile(
        rf"^\.{re.escape(target.name)}\.kasa-trl-(?P<host>[A-Za-z0-9_]{{1,64}})-(?P<pid>\d+)-[a-z0-9_]{{8}}\.(?P<kind>tmp|old)$"
    )
    notes: list[str] = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return notes
    for path in siblings:
        match = pattern.match(path.name)
        if match is not None:
            try:
                notes.append(_clean_one(path, target, int(match["pid"]), match["host"], match["kind"]))
            except OSError as e:  # e.g. another writer cleaned it at the same time
                notes.append(
                    f"could not clean up {path} ({e}); remove it by hand once no kasa_trl command runs"
                )
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return notes


def _clean_one(path: Path, target: Path, pid: int, host: str, kind: str) -> str:
    if host != host_tag() or path.lstat().st_uid != os.getuid():
        return f"left {path} alone: written by kasa_trl on another host or by another user"
    if path.is_symlink() or not (path.is_dir() or path.is_file()):
        return f"left {path} alone: not a file or directory kasa_trl creates"
    lock = _try_lock(path)
    if lock == -1:
        return f"left {path} alone: a kasa_trl process (pid {pid} where it runs) holds its lock and is still writing it"
    try:
        if lock is not None and not os.path.samestat(os.fstat(lock), os.lstat(path)):
            return f"left {path} alone: it changed while being checked"
        if process_alive(pid):
            return f"left {path} alone: process {pid}, which may still be writing it, exists"
        if kind == "old" and (path / target.name).is_dir() and not target.exists():
            os.replace(path / target.name, target)
            path.rmdir()
            return f"restored the previous output {target}, which a killed kasa_trl process (pid {pid}) had moved aside"
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return f"removed {path}, left by a kasa_trl process (pid {pid}) killed while writing"
    finally:
        _release(lock)


def _fsync_tree(root: Path) -> None:
    """Flush every file, then the directories, so the rename publishes complete data even after a crash."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_directory(root)


def _make_shareable(root: Path) -> None:
    """Give the output the permissions a plain mkdir and write would have: ``mkdtemp`` creates the directory 0o700
    and some writers (safetensors) create files 0o600; directories get ``0o777 & ~umask``, files ``0o666 & ~umask``
    (keeping an executable bit a writer set)."""
    umask = current_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o777 & ~umask)
        elif path.is_file():
            executable = path.stat().st_mode & 0o111
            os.chmod(path, (0o666 | (0o111 if executable else 0)) & ~umask)
