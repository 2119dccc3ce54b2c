"""Unreadable images (truncated, corrupt, not an image at all, too large) and identical files
across splits.

:func:`check_images` test-decodes every file before any split is made, so that splits, labels and
cached arrays only ever hold images that decode; its result is cached by the files' paths, sizes
and mtimes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

from pneumojax.data._common import DataError, Item, Warn, _count, _default_warn, _item_path, _shown
from pneumojax.data.decode import (
    _DECODE_ERRORS,
    _key,
    _max_image_pixels,
    _reason,
    _shrink,
    open_image,
    to_8bit_rgb_or_gray,
)
from pneumojax.io import file_sha256, write_text_atomic
from pneumojax.progress import progress_bar

# Bump when check_images changes what it calls unreadable.
_CHECK_VERSION = "2"  # 2: DICOM is read


def check_images(
    items: Sequence[Item] | Sequence[str | os.PathLike],
    strict: bool = False,
    warn: Warn | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
    progress: bool = False,
    root: str | os.PathLike | None = None,
) -> list:
    """``items`` (``(path, label)`` pairs or paths) without the files that do not decode, in order.

    Each file is opened and test-decoded cheaply (JPEG at 1/8 scale via ``Image.draft``, then the
    same mode conversion :func:`decode_image` does; DICOM in full, as it has no reduced-scale
    decoding): truncated or corrupt files, non-images with an
    image name, images over :data:`MAX_IMAGE_PIXELS` and missing or unreadable files fail. The bad
    ones are dropped with a single ``warn`` (default: a :class:`DataWarning`) that counts them and
    names a few; with ``strict`` a :class:`DataError` names the first bad file and its reason
    instead. Messages show paths relative to ``root`` (default: the files' common folder).
    ``cache_dir`` keeps the result, keyed by the files' paths, sizes and mtimes.
    """
    paths = [_item_path(item) for item in items]
    bad = _unreadable(paths, strict, warn, cache_dir, workers, progress, root)
    return [item for item, path in zip(items, paths) if path not in bad]


def image_problem(path: str | os.PathLike) -> str | None:
    """Why the image at ``path`` cannot be used (``"empty file ..."``), or None if it decodes."""
    try:
        with open_image(path) as image:
            small = _shrink(image, 8, always=True)
            to_8bit_rgb_or_gray(small).resize((8, 8), Image.Resampling.BILINEAR)
    except _DECODE_ERRORS as error:
        return _reason(error, path)
    return None


def _unreadable(
    paths: Sequence[str],
    strict: bool,
    warn: Warn | None,
    cache_dir: str | os.PathLike | None,
    workers: int,
    progress: bool,
    root: str | os.PathLike | None,
) -> dict[str, str]:
    """``{path: reason}`` of the files that do not decode, in input order; warns or raises."""
    bad = _cached_problems(paths, cache_dir, workers, progress)
    if not bad:
        return bad
    if root is None:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    first, reason = next(iter(bad.items()))
    if strict:
        raise DataError(
            f"unreadable image {_shown(first, root)}: {reason}\n"
            "remove or replace it (without strict, unreadable images are skipped with a warning)"
        )
    names = [_shown(path, root) for path in bad]
    more = f", +{len(names) - 3} more" if len(names) > 3 else ""
    (warn or _default_warn)(
        f"skipped {_count(len(bad), 'unreadable image')} of {len(paths)} "
        f"({', '.join(names[:3])}{more}): {names[0]}: {reason}\n"
        "they are left out of every split; remove or replace them, or use --strict "
        "(strict=True) to stop on them instead"
    )
    return bad


def _cached_problems(
    paths: Sequence[str], cache_dir: str | os.PathLike | None, workers: int, progress: bool
) -> dict[str, str]:
    # The cache is only a shortcut: a file that cannot be stat'ed, or a cache folder that cannot
    # be written, means checking without it (the file then fails the check with its reason).
    cache_file = None
    if cache_dir is not None:
        abs_paths = [os.path.abspath(p) for p in paths]
        try:
            key = _key(f"pneumojax-check:{_CHECK_VERSION}:{_max_image_pixels()}", abs_paths)
            cache_file = Path(cache_dir) / f"checked-{len(paths)}-{key}.json"
            stored = json.loads(cache_file.read_text())["unreadable"]
            return {paths[index]: reason for index, reason in stored}
        except (DataError, OSError, ValueError, KeyError, TypeError, IndexError):
            pass
    bad = _problems(paths, workers, progress)
    if cache_file is not None:
        index = {path: i for i, path in enumerate(paths)}
        stored = [[index[path], reason] for path, reason in bad.items()]
        try:
            write_text_atomic(cache_file, json.dumps({"unreadable": stored}))
        except OSError:
            pass
    return bad


def _problems(paths: Sequence[str], workers: int, progress: bool) -> dict[str, str]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        reasons = progress_bar(
            pool.map(image_problem, paths),
            total=len(paths),
            desc="checking images",
            unit="img",
            disable=not progress,
        )
        return {path: reason for path, reason in zip(paths, reasons) if reason is not None}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C stops at once


def duplicates_across_splits(
    splits: Mapping[str, Sequence[Item]],
) -> list[list[tuple[str, str, int]]]:
    """Groups of files with byte-identical content found in more than one split.

    Each group lists ``(split, path, label)``, sorted; groups are sorted too. Only files whose size
    matches a file of another split are read (and sha256-hashed), so this is cheap.
    """
    by_size: dict[int, list[tuple[str, str, int]]] = collections.defaultdict(list)
    for name, items in splits.items():
        for path, label in items:
            try:
                by_size[os.stat(path).st_size].append((name, path, label))
            except OSError:
                continue  # a vanished file is reported when it is loaded
    groups = []
    for entries in by_size.values():
        if len({name for name, _, _ in entries}) < 2:
            continue
        by_digest: dict[str, list[tuple[str, str, int]]] = collections.defaultdict(list)
        for entry in entries:
            try:
                by_digest[file_sha256(entry[1])].append(entry)
            except OSError:
                continue
        groups += [sorted(g) for g in by_digest.values() if len({n for n, _, _ in g}) > 1]
    return sorted(groups)


def _duplicates_message(groups: list[list[tuple[str, str, int]]], root: str) -> str:
    def pair(group: list[tuple[str, str, int]]) -> str:
        # Two copies from different splits, and how many more there are.
        first = group[0]
        second = next(entry for entry in group if entry[0] != first[0])
        extra = f" (+{len(group) - 2} more copies)" if len(group) > 2 else ""
        shown = (f"{_shown(path, root)} ({name})" for name, path, _ in (first, second))
        return " = ".join(shown) + extra

    shown = [pair(g) for g in groups[:3]]
    more = f"; +{len(groups) - 3} more" if len(groups) > 3 else ""
    conflicting = sum(len({label for _, _, label in g}) > 1 for g in groups)
    labels = f"; {conflicting} with different labels" if conflicting else ""
    images = sum(len(g) for g in groups)
    return (
        f"{images} images in {_count(len(groups), 'group')} of identical files span several splits "
        f"({'; '.join(shown)}{more}){labels}: figures on those splits are not independent of "
        "training\nremove the copies from the data folder (they are kept; this is a warning)"
    )
