"""Writing files so that a kill -9 or a power loss leaves the old version or the new one, never
half of one: write aside, flush to disk, rename, flush the folder."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

# A staging folder of a process that is gone is removed only once nothing in it has changed for
# this long: on a file system shared by several machines a writer elsewhere has a PID that is
# not alive here, and its files are still being written.
STALE_AFTER_S = 3600.0


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


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def remove_stale_staging(
    parent: str | os.PathLike, pattern: str, min_age_s: float = STALE_AFTER_S
) -> list[Path]:
    """Removes what a killed write left in ``parent``: the files and folders whose name matches
    ``pattern`` (a regular expression with a group ``pid``, e.g. ``\\.model\\.tmp(?P<pid>\\d+)``)
    whose process is no longer alive and in which nothing changed for ``min_age_s`` seconds.
    Returns what was removed. Errors (another process removing the same) are ignored."""
    parent = Path(parent)
    regex = re.compile(pattern)
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = regex.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match.group("pid"))
        if pid == os.getpid() or pid_alive(pid) or now - _newest_mtime(entry) < min_age_s:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _newest_mtime(path: Path) -> float:
    try:
        newest = path.lstat().st_mtime
    except OSError:
        return time.time()
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except OSError:
                    pass
    return newest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read 1 MiB at a time (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class NoSpaceError(OSError):
    """A cache that does not fit on its disk; raised before it is used, its partial files
    removed. An OSError with errno ENOSPC, so callers that handle a full disk handle it."""

    def __init__(self, folder: Path, needed: int, free: int):
        import errno  # noqa: PLC0415

        super().__init__(
            errno.ENOSPC,
            f"not enough space in {folder}: {_size(needed)} needed, {_size(free)} free; free "
            "some space there, or point PNEUMOJAX_CACHE at a folder on a larger disk",
        )
        self.folder, self.needed, self.free = folder, needed, free

    def __str__(self) -> str:
        return self.strerror


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_space(folder: str | os.PathLike, needed: int) -> None:
    """Raises :class:`NoSpaceError` unless ``folder``'s disk has ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise NoSpaceError(Path(folder), needed, free)


def allocate(path: str | os.PathLike, needed_in: str | os.PathLike | None = None) -> None:
    """Gives the file at ``path`` (already at its final length, e.g. made by ``open_memmap``)
    its disk blocks now, so that writing it through a memory map cannot meet a full disk: a
    store into a page the disk has no room for kills the process with SIGBUS, while
    ``posix_fallocate`` reports ENOSPC here, as :class:`NoSpaceError`. File systems that cannot
    preallocate are left as they are (the caller checked the space with :func:`check_space`)."""
    import errno  # noqa: PLC0415

    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            folder = Path(needed_in or Path(path).parent)
            raise NoSpaceError(folder, size, shutil.disk_usage(folder).free) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def array_digest(array) -> str:
    """SHA-256 of an array's bytes, read a few MB at a time (a memory-mapped cache is never
    read into RAM whole)."""
    import numpy as np  # noqa: PLC0415

    digest = hashlib.sha256()
    flat = array.reshape(len(array), -1) if len(array) else array.reshape(0, 1)
    for start in range(0, len(flat), 256):  # a few MB at a time: never the whole set in RAM
        digest.update(np.ascontiguousarray(flat[start : start + 256]).data)
    return digest.hexdigest()
