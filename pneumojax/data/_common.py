"""What every data module shares: the item type, the error and warning types, message helpers."""

from __future__ import annotations

import os
import warnings
from typing import Callable

Item = tuple[str, int]  # (path, label)
Warn = Callable[[str], None]


class DataError(ValueError):
    """A data folder, image or split that cannot be used as asked; the message says why and what
    to do, in one or two lines.

    A :class:`ValueError`, so that callers which report ``ValueError`` without a traceback (the
    CLI) report this too.
    """


class DataWarning(UserWarning):
    """Data that is used, but with a problem the user should know about (skipped images,
    duplicates across splits)."""


def _default_warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=3)


def _item_path(item) -> str:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else os.fspath(item[0])


def _shown(path: str, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` when inside it, for messages."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return path if relative.startswith("..") else relative


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
