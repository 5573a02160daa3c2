"""Writing an output directory all at once.

Everything goes into a temporary sibling of the target (same filesystem, so the final move is a rename); only a
complete directory is renamed into place. A failure, or an interrupt, leaves the target as it was and removes the
temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fail early, before any work, if ``out_dir`` cannot receive a fresh output; returns it as a ``Path``.

    Raises:
        NotADirectoryError: ``out_dir`` exists and is not a directory.
        FileExistsError: ``out_dir`` is a non-empty directory and ``overwrite`` is false.
    """
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"output {target} exists and is not a directory")
    if not overwrite and _non_empty(target):
        raise FileExistsError(
            f"output directory {target} exists and is not empty; choose a new directory or pass "
            "overwrite=True (--overwrite on the command line) to replace it"
        )
    return target


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; when the block succeeds it becomes ``out_dir``.

    An existing non-empty ``out_dir`` is replaced only with ``overwrite=True``: it is renamed aside, the new
    directory renamed in, and the old one deleted, so a reader sees either the old or the new output.
    """
    target = check_output_dir(out_dir, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _make_shareable(tmp)
        _move_into_place(tmp, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _move_into_place(tmp: Path, target: Path, *, overwrite: bool) -> None:
    if not _non_empty(target):
        os.replace(tmp, target)  # rename(2) replaces an empty directory
        return
    if not overwrite:  # the target filled up while we were writing
        raise FileExistsError(
            f"output directory {target} was filled by someone else while writing; not replaced"
        )
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file, then the directories, so the rename publishes complete data even after a crash."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_shareable(root: Path) -> None:
    # mkdtemp creates the directory 0o700; give the output the permissions a plain mkdir would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
