"""Writing files so that a kill -9 or a power loss leaves the old version or the new one, never
half of one: write aside, flush to disk, rename, flush the folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes one file or folder to disk (a folder: the names in it, so renames are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flushes a finished folder to disk: every file and folder in it, and the folder holding
    it (which makes its own rename durable)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing right after it was written")
    for root, _, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)
    fsync_path(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` so that a reader (or a resume after kill -9 or power loss)
    sees the old file or the new one, never half of it: a temporary file, flushed to disk,
    replaces it, then the folder is flushed so the replacement itself is on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; files are for all
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def replace_folder(staging: Path, target: Path) -> None:
    """Puts the finished folder ``staging`` in ``target``'s place, keeping the old ``target``
    (as ``.NAME.old``) until the new one is in place and on disk: at every moment one complete
    copy exists (:func:`existing_folder` finds it)."""
    fsync_tree(staging)
    old = _old(target)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def existing_folder(target: Path) -> Path:
    """``target``, or the previous copy that :func:`replace_folder` set aside if a kill struck
    between its two renames."""
    old = _old(target)
    return old if not target.exists() and old.is_dir() else target


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
