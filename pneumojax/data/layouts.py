"""Finding the images of a data folder: the Kaggle and the flat layout, class and split names.

* ``kaggle``: ``<root>/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` as the Kaggle/Mendeley archive
  unpacks (``val`` may be missing);
* ``flat``: ``<root>/{NORMAL,PNEUMONIA}/*.jpeg``, one pool from which every split is carved.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pneumojax.data._common import DataError, Item, Warn, _count, _default_warn, _shown
from pneumojax.data.checks import _unreadable
from pneumojax.data.decode import DICOM_EXTENSIONS

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
KAGGLE_SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png") + DICOM_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Images found under ``root``.

    ``splits`` maps a split name to sorted ``(path, label)`` items: ``train``/``val``/``test`` for
    the ``kaggle`` layout (``val`` empty when the folder is absent), ``all`` for ``flat``.
    ``skipped`` lists the ``(path, reason)`` of the image files left out as unreadable.
    """

    root: Path
    layout: str
    splits: dict[str, list[Item]]
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def items(self) -> list[Item]:
        """Every image of every split."""
        return [item for split in self.splits.values() for item in split]


def find_images(
    data_dir: str | os.PathLike,
    *,
    check: bool = True,
    strict: bool = False,
    warn: Warn | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
    progress: bool = False,
    one_class: bool = False,
) -> DataSource:
    """Find the labelled images under ``data_dir``, in the Kaggle or the flat layout.

    Folder names are matched case-insensitively; only ``.jpeg``/``.jpg``/``.png`` files count
    (dot files such as ``.DS_Store`` and macOS ``._name.jpeg`` forks are ignored). Raises
    :class:`DataError` when the folder is missing, matches neither layout, or a class folder is
    missing or holds no (readable) image.

    With ``check`` (the default) every image is test-decoded by :func:`check_images` before
    anything else sees it: unreadable ones are left out with one ``warn`` (``DataSource.skipped``
    lists them), or with ``strict`` the first one raises :class:`DataError`. ``cache_dir`` keeps
    the result of the check (keyed by the files' paths, sizes and mtimes) so that later calls on
    unchanged files only ``stat`` them.

    ``one_class`` accepts a flat folder with one class folder only (an external test set of
    NORMAL images, say): nothing is trained on it, but specificity or recall still exist.
    """
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        if root.is_file():
            raise DataError(
                f"data folder {root} is a file, not a folder\n"
                f"expected a folder with {'/'.join(KAGGLE_SPLITS)}/ or {'/'.join(CLASS_NAMES)}/ "
                "inside (unpack an archive first, e.g. unzip chest-xray-pneumonia.zip)"
            )
        raise DataError(
            f"data folder not found: {root}\n"
            f"expected a folder with {'/'.join(KAGGLE_SPLITS)}/ or {'/'.join(CLASS_NAMES)}/ inside"
        )
    subdirs = _subdirs_by_lower_name(root)
    has_splits = "train" in subdirs or "test" in subdirs
    has_classes = any(name.lower() in subdirs for name in CLASS_NAMES)
    if has_splits and has_classes:
        raise DataError(
            f"{root} mixes split folders (train/test) and class folders (NORMAL/PNEUMONIA);\n"
            "expected one of the two layouts, not both"
        )
    special: list[Path] = []  # image names that are no regular file (FIFO, device, socket)
    if has_splits:
        source = DataSource(root, "kaggle", _kaggle_splits(root, subdirs, special))
    elif has_classes:
        source = DataSource(root, "flat", {"all": _class_items(root, one_class, special)})
    else:
        raise DataError(_no_layout_message(root, subdirs))
    if special:
        (warn or _default_warn)(not_regular_message([str(p) for p in special], root))
    if not check:
        return source
    bad = _unreadable(
        [path for path, _ in source.items], strict, warn, cache_dir, workers, progress, root
    )
    if not bad:
        return source
    splits = {
        name: [item for item in items if item[0] not in bad]
        for name, items in source.splits.items()
    }
    _check_classes_readable(source.splits, splits, bad, root)
    return DataSource(root, source.layout, splits, tuple(bad.items()))


def _check_classes_readable(
    before: dict[str, list[Item]], after: dict[str, list[Item]], bad: dict[str, str], root: Path
) -> None:
    for name, items in before.items():
        for label in (0, 1):
            if not items or any(item_label == label for _, item_label in after[name]):
                continue
            paths = [path for path, item_label in items if item_label == label]
            folder = os.path.dirname(paths[0])
            raise DataError(
                f"class folder {folder} holds no readable image: all {len(paths)} files failed "
                f"to decode (first: {_shown(paths[0], root)}: {bad[paths[0]]})\n"
                "replace them with JPEG or PNG chest X-rays"
            )


def _subdirs_by_lower_name(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}


def _kaggle_splits(
    root: Path, subdirs: dict[str, Path], special: list[Path]
) -> dict[str, list[Item]]:
    for required in ("train", "test"):
        if required not in subdirs:
            raise DataError(
                f"{root} looks like the Kaggle layout but has no {required}/ folder\n"
                f"expected train/ and test/ (val/ optional); found: {_listing(subdirs)}"
            )
    splits = {name: _class_items(subdirs[name], special=special) for name in ("train", "test")}
    splits["val"] = _class_items(subdirs["val"], special=special) if "val" in subdirs else []
    return {name: splits[name] for name in KAGGLE_SPLITS}


def _class_items(
    folder: Path, one_class: bool = False, special: list[Path] | None = None
) -> list[Item]:
    """The images of ``folder/NORMAL`` and ``folder/PNEUMONIA``, labelled 0 and 1 (with
    ``one_class``, either folder may be missing or empty, not both). Image names that are no
    regular file are added to ``special``, never opened."""
    subdirs = _subdirs_by_lower_name(folder)
    special = [] if special is None else special
    found = {
        name: _image_files(subdirs[name.lower()], special) if name.lower() in subdirs else None
        for name in CLASS_NAMES
    }
    if one_class and any(found.values()):
        found = {name: paths for name, paths in found.items() if paths}
    items: list[Item] = []
    for name, paths in found.items():
        if paths is None:
            raise DataError(
                f"class folder {name}/ missing in {folder}\n"
                f"expected {' and '.join(CLASS_NAMES)}; found: {_listing(subdirs)}"
            )
        if not paths:
            class_dir = subdirs[name.lower()]
            raise DataError(
                f"class folder {class_dir} holds no image\n"
                f"expected files ending in {', '.join(IMAGE_EXTENSIONS)}; "
                f"found: {_contents(class_dir)}"
            )
        items.extend((str(p), CLASS_NAMES.index(name)) for p in paths)
    return items


def _image_files(folder: Path, special: list[Path]) -> list[Path]:
    """The regular files with an image name in ``folder`` (``is_file``: S_ISREG, after links);
    other entries with an image name but no folder (a named pipe, device or socket, which a
    reader would block on, or a broken link) go to ``special`` and are never opened."""
    # Dot files are skipped: macOS archives carry '._name.jpeg' resource forks that are no images.
    named = sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    special.extend(p for p in named if not p.is_file() and not p.is_dir())
    return [p for p in named if p.is_file()]


def not_regular_message(paths: list[str], root: str | os.PathLike | None = None) -> str:
    """The warning for image names that are no regular file, naming a few."""
    shown = [_shown(p, root) if root is not None else p for p in paths[:3]]
    more = f" (+{len(paths) - 3} more)" if len(paths) > 3 else ""
    return (
        f"skipped {_count(len(paths), 'path')} with an image name that "
        f"{'is' if len(paths) == 1 else 'are'} not a regular file (a named pipe, device, socket "
        f"or broken link; never opened): {', '.join(shown)}{more}"
    )


def _listing(subdirs: dict[str, Path], limit: int = 8) -> str:
    names = [p.name + "/" for p in subdirs.values()]
    if not names:
        return "no folders"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _contents(folder: Path, limit: int = 5) -> str:
    """What ``folder`` holds, for messages: ``sub/, notes.txt, scan.tif (+3 more)``."""
    entries = sorted(folder.iterdir(), key=lambda p: (not p.is_dir(), p.name))
    if not entries:
        return "nothing (empty folder)"
    names = [p.name + ("/" if p.is_dir() else "") for p in entries]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _no_layout_message(root: Path, subdirs: dict[str, Path]) -> str:
    found = _listing(subdirs) if subdirs else _contents(root)
    message = (
        f"no chest X-ray layout in {root}: expected train/ val/ test/ (Kaggle) or NORMAL/ "
        f"PNEUMONIA/ (flat); found: {found}"
    )
    # The Kaggle archive unpacks into chest_xray/; point at it instead of leaving a puzzle.
    nested = [p for p in subdirs.values() if "train" in _subdirs_by_lower_name(p)]
    if nested:
        message += f"\ndid you mean {nested[0]}?"
    return message
