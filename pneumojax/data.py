"""Chest X-ray image folders: discovery, patient-grouped splits, decoding with a cache, demo data.

Two folder layouts are understood:

* ``kaggle``: ``<root>/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` as the Kaggle/Mendeley archive
  unpacks (``val`` may be missing);
* ``flat``: ``<root>/{NORMAL,PNEUMONIA}/*.jpeg``, one pool from which every split is carved.

Splits are made by whole patients (the patient is read from the file name, see
:func:`patient_id`), so that no patient is in two splits (DESIGN.md, principle 6). Decoded, resized
images are cached as ``.npy`` files (principle 4).

Bad input gets a clear error: every :class:`DataError` says what is wrong and what to do in one or
two lines. Unreadable images (truncated, corrupt, not an image at all, too large) are found by
:func:`check_images` before any split is made and skipped with one warning (or, with
``strict=True``, stop everything with a :class:`DataError` naming the first), so that splits,
labels and cached arrays only ever hold images that decode.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import struct
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from pneumojax.io import write_text_atomic
from pneumojax.progress import progress_bar
from pneumojax.resize import RESIZE_METHODS, resize_image

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
KAGGLE_SPLITS = ("train", "val", "test")
# DICOM (.dcm, .dicom) is read with pydicom, see pneumojax.dicom; any file that holds DICOM (the
# 'DICM' marker after its 128-byte preamble) is read as DICOM, whatever its name.
DICOM_EXTENSIONS = (".dcm", ".dicom")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png") + DICOM_EXTENSIONS

# Bump when decoding changes, so that stale caches are not reused.
_DECODER_VERSION = "1"
# Bump when check_images changes what it calls unreadable.
_CHECK_VERSION = "2"  # 2: DICOM is read

# Images with more pixels are refused as unreadable (16384 x 16384: far beyond any radiograph
# detector; a grayscale image this size takes 256 MiB to decode). PIL's own decompression-bomb
# limit (89 Mpx, a warning; twice that, an error) is raised to this at import so that a large but
# sane image such as 12000 x 12000 decodes quietly; larger ones are refused with a clear reason.
MAX_IMAGE_PIXELS = 16384 * 16384
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Images with more pixels than this are shrunk before they are fully decoded and converted (JPEG:
# DCT-scaled decoding via Image.draft; other formats: Image.reduce), so that their decoding needs
# about one byte per stored pixel and no more. Smaller images (every image of the Kaggle set,
# at most ~3000 x 2700) decode exactly as before.
_LARGE_PIXELS = 4096 * 4096

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


# ---------------------------------------------------------------------------------------------
# Finding images


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
    if has_splits:
        source = DataSource(root, "kaggle", _kaggle_splits(root, subdirs))
    elif has_classes:
        source = DataSource(root, "flat", {"all": _class_items(root)})
    else:
        raise DataError(_no_layout_message(root, subdirs))
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


def _kaggle_splits(root: Path, subdirs: dict[str, Path]) -> dict[str, list[Item]]:
    for required in ("train", "test"):
        if required not in subdirs:
            raise DataError(
                f"{root} looks like the Kaggle layout but has no {required}/ folder\n"
                f"expected train/ and test/ (val/ optional); found: {_listing(subdirs)}"
            )
    splits = {name: _class_items(subdirs[name]) for name in ("train", "test")}
    splits["val"] = _class_items(subdirs["val"]) if "val" in subdirs else []
    return {name: splits[name] for name in KAGGLE_SPLITS}


def _class_items(folder: Path) -> list[Item]:
    """The images of ``folder/NORMAL`` and ``folder/PNEUMONIA``, labelled 0 and 1."""
    subdirs = _subdirs_by_lower_name(folder)
    items: list[Item] = []
    for label, name in enumerate(CLASS_NAMES):
        class_dir = subdirs.get(name.lower())
        if class_dir is None:
            raise DataError(
                f"class folder {name}/ missing in {folder}\n"
                f"expected {' and '.join(CLASS_NAMES)}; found: {_listing(subdirs)}"
            )
        paths = _image_files(class_dir)
        if not paths:
            raise DataError(
                f"class folder {class_dir} holds no image\n"
                f"expected files ending in {', '.join(IMAGE_EXTENSIONS)}; "
                f"found: {_contents(class_dir)}"
            )
        items.extend((str(p), label) for p in paths)
    return items


def _image_files(folder: Path) -> list[Path]:
    # Dot files are skipped: macOS archives carry '._name.jpeg' resource forks that are no images.
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
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


# ---------------------------------------------------------------------------------------------
# Checking images


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
            key = _key(f"pneumojax-check:{_CHECK_VERSION}:{MAX_IMAGE_PIXELS}", abs_paths)
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


def _shown(path: str, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` when inside it, for messages."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return path if relative.startswith("..") else relative


class _Unusable(Exception):
    """An image file PIL opens but pneumojax refuses; the message is the reason."""


# What PIL's decoders raise on bad files (fuzzing finds all of these); not AssertionError and the
# like, which are bugs rather than bad data.
_DECODE_ERRORS = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    MemoryError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    _Unusable,
)


def _reason(error: BaseException, path: str | os.PathLike) -> str:
    """A short, plain reason for a failure to open or decode ``path``."""
    if isinstance(error, _Unusable):
        return str(error)
    if isinstance(error, Image.DecompressionBombError):  # over PIL's limit (raised at import)
        return f"too large for PIL ({error}); shrink it first"
    if isinstance(error, Image.UnidentifiedImageError):
        try:
            if os.path.getsize(path) == 0:
                return "empty file (0 bytes)"
        except OSError:
            pass
        return "not an image (neither DICOM nor JPEG, PNG or another format PIL can identify)"
    if isinstance(error, OSError) and error.strerror:  # the file system's own error
        return error.strerror[0].lower() + error.strerror[1:]
    text = str(error) or type(error).__name__
    if isinstance(error, (OSError, SyntaxError, EOFError)):  # PIL's ways of saying "broken data"
        return f"corrupt or truncated image data: {text}"
    return f"cannot decode ({type(error).__name__}: {text})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# ---------------------------------------------------------------------------------------------
# Patients

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE),
)


def patient_id(filename: str | os.PathLike) -> str:
    """The patient a file belongs to, read from its name.

    ``person123_bacteria_4.jpeg`` and ``person123_virus_9.jpeg`` -> ``person123`` (one patient);
    ``IM-0115-0001.jpeg`` -> ``IM-0115``; ``NORMAL2-IM-0012-0001.jpeg`` -> ``NORMAL2-IM-0012``.
    A name of any other pattern is its own patient: the file stem is returned.
    """
    name = Path(filename).name
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return Path(name).stem


# ---------------------------------------------------------------------------------------------
# Splits


@dataclasses.dataclass
class Splits:
    """Train/val/test lists of ``(path, label)``, no patient in two of them.

    ``root`` is the data folder; ``info`` records how the splits were made (layout, seed,
    fractions) so that ``splits.json`` documents itself.
    """

    train: list[Item]
    val: list[Item]
    test: list[Item]
    root: str = ""
    info: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, list[Item]]:
        """The three splits by name, in train/val/test order."""
        return {"train": self.train, "val": self.val, "test": self.test}

    def summary(self) -> dict[str, dict[str, int]]:
        """Per split: image count, count per class and number of distinct patients."""
        return {name: _split_summary(items) for name, items in self.as_dict().items()}

    def to_json(self) -> str:
        """The splits as JSON text, paths relative to ``root`` so that the data may move."""
        payload = {
            "root": self.root,
            "info": self.info,
            "summary": self.summary(),
            **{
                name: [[_relative(path, self.root), label] for path, label in items]
                for name, items in self.as_dict().items()
            },
        }
        return json.dumps(payload, indent=1)

    @classmethod
    def from_json(cls, text: str, root: str | os.PathLike | None = None) -> "Splits":
        """Splits from :meth:`to_json` text; ``root`` overrides the stored data folder."""
        payload = json.loads(text)
        base = str(root) if root is not None else payload["root"]
        splits = {
            name: [(os.path.join(base, path), int(label)) for path, label in payload[name]]
            for name in KAGGLE_SPLITS
        }
        return cls(**splits, root=base, info=payload.get("info", {}))


def _split_summary(items: Sequence[Item]) -> dict[str, int]:
    labels = [label for _, label in items]
    return {
        "n": len(items),
        "normal": labels.count(0),
        "pneumonia": labels.count(1),
        "patients": len({patient_id(path) for path, _ in items}),
    }


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root) if root else path


def make_splits(
    source: DataSource,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    merge_kaggle_val: bool = True,
    *,
    warn: Warn | None = None,
) -> Splits:
    """Patient-grouped train/val/test splits of ``source``.

    Kaggle layout: test is the official test folder, used **as given**; the official val (16
    images) joins train when ``merge_kaggle_val`` (otherwise it is the validation split as
    given), and a validation split of ``val_fraction`` is carved from train. Flat layout: val
    and test are both carved from all images. Carving is seeded, moves whole patients, and is
    stratified: each carved split gets about its fraction of each class's images.
    ``test_fraction`` is unused for the Kaggle layout.

    The guarantee: splits that pneumojax carves never share a patient. A split the user gives
    is kept as it is, even when file names suggest that some of its patients are also in
    another split (the official Kaggle folders reuse patient numbers: names cannot tell whether
    equal numbers are the same child); that is one ``warn`` with the count and a few examples,
    recorded in ``info["shared_patients"]``. Raises :class:`DataError` when a split would lack a
    class. Files with identical content in two splits are kept but reported with one ``warn``
    (default: a :class:`DataWarning`); ``info["duplicates_across_splits"]`` counts them.
    """
    kaggle = source.layout == "kaggle"
    info = {
        "layout": source.layout,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": None if kaggle else test_fraction,
        "merge_kaggle_val": merge_kaggle_val if kaggle else None,
        "grouping": "patient",
    }
    if kaggle:
        splits = _kaggle_splits_by_patient(source.splits, val_fraction, seed, merge_kaggle_val)
        given = ("test",) if merge_kaggle_val else ("train", "val", "test")
    else:
        fractions = {"test": test_fraction, "val": val_fraction}
        splits = _carve(source.splits["all"], fractions, seed)
        given = ()
    splits = {name: sorted(items) for name, items in splits.items()}
    info["given_splits"] = list(given)
    info["carved_splits"] = [name for name in KAGGLE_SPLITS if name not in given]
    _check_both_classes(splits)
    carved = [name for name in splits if name not in given]
    patients = {name: {patient_id(path) for path, _ in items} for name, items in splits.items()}
    for i, a in enumerate(carved):  # disjoint by construction; this guards the construction
        for b in carved[i + 1:]:
            if patients[a] & patients[b]:
                raise AssertionError(f"carved splits {a} and {b} share patients")
    shared = shared_patients(splits, given)
    info["shared_patients"] = shared
    if shared:
        (warn or _default_warn)(_shared_patients_message(shared))
    duplicates = duplicates_across_splits(splits)
    info["duplicates_across_splits"] = len(duplicates)
    if duplicates:
        (warn or _default_warn)(_duplicates_message(duplicates, str(source.root)))
    return Splits(**splits, root=str(source.root), info=info)


def shared_patients(splits: Mapping[str, Sequence[Item]], given: Sequence[str]) -> dict[str, dict]:
    """Per given split (train aside): the name-derived patient ids it shares with the other
    splits, counted (patients, of how many, their images in it) with a few examples."""
    out = {}
    for name in (g for g in given if g != "train"):  # train is what the others are held against
        own = {patient_id(path) for path, _ in splits[name]}
        others = [o for o in splits if o != name]
        common = own & {patient_id(path) for o in others for path, _ in splits[o]}
        if common:
            out[name] = {
                "patients": len(common),
                "of_patients": len(own),
                "images": sum(patient_id(path) in common for path, _ in splits[name]),
                "with": others,
                "examples": sorted(common, key=_natural_key)[:5],
            }
    return out


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _shared_patients_message(shared: dict[str, dict]) -> str:
    parts = [
        f"{s['patients']} of the {s['of_patients']} patient ids in the given {name} folder "
        f"({_count(s['images'], 'image')}) also occur in {'/'.join(s['with'])}, e.g. "
        f"{', '.join(s['examples'][:3])}"
        for name, s in shared.items()
    ]
    return (
        f"{'; '.join(parts)} (ids read from file names). The folder is used as given: names "
        "cannot tell whether equal numbers are the same child (the official Kaggle folders reuse "
        "patient numbers); if they are, figures on it are optimistic. splits.json records the "
        "overlap; splits that pneumojax carves itself never share a patient"
    )


def _kaggle_splits_by_patient(
    official: dict[str, list[Item]], val_fraction: float, seed: int, merge_val: bool
) -> dict[str, list[Item]]:
    if not merge_val:
        return {"train": official["train"], "val": official["val"], "test": official["test"]}
    carved = _carve(official["train"] + official["val"], {"val": val_fraction}, seed)
    return {"train": carved["train"], "val": carved["val"], "test": official["test"]}


def _carve(items: Sequence[Item], fractions: dict[str, float], seed: int) -> dict[str, list[Item]]:
    """Split ``items`` by whole patients: each named split gets ~its fraction of every class.

    What is not carved stays in ``train``. Patients are shuffled per class with a string-seeded
    generator (stable across processes and Python hash seeds), then each patient goes to the
    carved split whose target it brings closest, largest remaining need first, or else to train.
    """
    for name, fraction in fractions.items():
        if not 0.0 <= fraction < 1.0:
            raise DataError(f"{name} fraction must be in [0, 1), got {fraction}")
    if sum(fractions.values()) >= 1.0:
        raise DataError(f"split fractions {fractions} leave nothing for train")
    out: dict[str, list[Item]] = {"train": [], **{name: [] for name in fractions}}
    for label, groups in _patient_groups_by_class(items).items():
        order = sorted(groups)
        random.Random(f"pneumojax-splits:{seed}:{label}").shuffle(order)
        n_class = sum(len(groups[p]) for p in order)
        targets = {name: round(fraction * n_class) for name, fraction in fractions.items()}
        counts = dict.fromkeys(fractions, 0)
        for patient in order:
            size = len(groups[patient])
            name = _closest_split(size, targets, counts)
            if name is not None:
                counts[name] += size
            out[name or "train"].extend(groups[patient])
    return out


def _patient_groups_by_class(items: Iterable[Item]) -> dict[int, dict[str, list[Item]]]:
    """Items grouped by patient, each patient filed under its majority label."""
    by_patient: dict[str, list[Item]] = collections.defaultdict(list)
    for item in items:
        by_patient[patient_id(item[0])].append(item)
    by_class: dict[int, dict[str, list[Item]]] = collections.defaultdict(dict)
    for patient, group in by_patient.items():
        labels = [label for _, label in group]
        by_class[max(set(labels), key=lambda c: (labels.count(c), -c))][patient] = group
    return dict(sorted(by_class.items()))


def _closest_split(size: int, targets: dict[str, int], counts: dict[str, int]) -> str | None:
    need = {name: targets[name] - counts[name] for name in targets}
    # Adding the group moves the count closer to the target iff size < 2 * need.
    helped = [name for name in targets if size < 2 * need[name]]
    return max(helped, key=lambda name: need[name]) if helped else None


def _check_both_classes(splits: dict[str, list[Item]]) -> None:
    pool = [item for items in splits.values() for item in items]
    for name, items in splits.items():
        labels = {label for _, label in items}
        if labels == {0, 1}:
            continue
        if not items:
            raise DataError(
                f"split {name} would be empty\n"
                f"give it a fraction above 0 (--val-fraction/--test-fraction) or use more images"
            )
        scarce = "/".join(CLASS_NAMES[c] for c in (0, 1) if c not in labels)
        have = ", ".join(
            f"{CLASS_NAMES[c]} {_count(n, 'image')} of {_count(p, 'patient')}"
            for c, (n, p) in enumerate(_class_counts(pool))
        )
        raise DataError(
            f"split {name} would hold {CLASS_NAMES[labels.pop()]} only "
            f"({_count(len(items), 'image')}); "
            f"all splits together: {have}\n"
            f"every split needs both classes: add {scarce} images (of more patients) or use "
            "larger split fractions (--val-fraction/--test-fraction)"
        )


def _class_counts(items: Sequence[Item]) -> list[tuple[int, int]]:
    """Per class: (images, distinct patients)."""
    return [
        (
            sum(label == c for _, label in items),
            len({patient_id(path) for path, label in items if label == c}),
        )
        for c in (0, 1)
    ]


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
                by_digest[_file_sha256(entry[1])].append(entry)
            except OSError:
                continue
        groups += [sorted(g) for g in by_digest.values() if len({n for n, _, _ in g}) > 1]
    return sorted(groups)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_image(
    path: str | os.PathLike, image_size: int, resize: str = "antialias"
) -> np.ndarray:
    """One image as uint8 ``(S, S, 3)`` RGB, resized (aspect ratio not kept) by ``resize``:
    ``antialias`` (PIL bilinear, antialiased when downscaling) or ``keras`` (exactly
    ``tf.image.resize``'s bilinear without antialiasing, the study's pipeline; see
    :mod:`pneumojax.resize`), rounded to uint8.

    Images over 16 Mpx are first shrunk to about twice the output size (JPEG: decoded at reduced
    scale, never in full), so a 12000 x 12000 image needs no more memory than its stored pixels
    (PNG) or a small fraction of that (JPEG). DICOM is decoded in full (pydicom has no
    reduced-scale decoding), made 8-bit (:mod:`pneumojax.dicom`) and then shrunk the same way
    (so ``keras`` equals ``tf.image.resize`` of the full image up to 16 Mpx: every image of the
    Kaggle set, at most ~3000 x 2700). Raises PIL's errors for unreadable files
    (:func:`load_images` turns them into :class:`DataError`).
    """
    with open_image(path) as image:
        image = to_8bit_rgb_or_gray(_shrink(image, image_size))
        array = resize_image(image, image_size, resize)
    # Grayscale is resized on one channel (a third of the work) and replicated afterwards.
    return np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array


def to_8bit_rgb_or_gray(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit ``L`` or ``RGB``, whatever mode it was stored in.

    16-bit and 32-bit integer grayscale is scaled from 0..65535 to 0..255 (PIL's own conversion
    clips instead, which turns most X-rays white); float images are clipped to 0..255. The
    arithmetic runs on blocks of rows, so no float64 copy of the whole image is ever made.
    """
    if image.mode in ("L", "RGB"):
        return image
    if image.mode.startswith("I"):
        # round(v / 257) == (v + 128) // 257 for integers (257 is odd: no ties), clipped to 0..255.
        return _to_8bit(image, lambda a: np.clip((a.astype(np.int64) + 128) // 257, 0, 255))
    if image.mode == "F":
        return _to_8bit(image, lambda a: np.clip(np.rint(a), 0, 255))
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    return image.convert("RGB")  # CMYK, P, RGBA, YCbCr, LAB, ...


def _to_8bit(image: Image.Image, scale: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    array = np.asarray(image)
    out = np.empty(array.shape, np.uint8)
    rows = max(1, (1 << 20) // max(1, array.shape[1]))  # ~1 Mpx per block
    for start in range(0, array.shape[0], rows):
        out[start : start + rows] = scale(array[start : start + rows])
    return Image.fromarray(out, "L")


def open_image(path: str | os.PathLike) -> Image.Image:
    """``Image.open(path)``, refusing images over :data:`MAX_IMAGE_PIXELS` with a clear reason.

    DICOM files are decoded to an 8-bit ``L`` or ``RGB`` image by :func:`pneumojax.dicom.to_image`
    (modality LUT, VOI LUT or window, MONOCHROME1 inverted), their size checked before their
    pixel data is read. Raises PIL's errors for files that are no image; use it as a context
    manager.
    """
    if _holds_dicom(path):
        return _open_dicom(path)
    try:
        image = Image.open(path)
    except Image.UnidentifiedImageError:
        if Path(path).suffix.lower() in DICOM_EXTENSIONS and os.path.getsize(path) > 0:
            raise _Unusable(
                "not a DICOM file (no 'DICM' marker after the 128-byte preamble) and no image "
                "PIL can read either"
            ) from None
        raise
    _check_size(*image.size, close=image.close)
    return image


def _check_size(width: int, height: int, close: Callable[[], None] = lambda: None) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        close()
        raise _Unusable(
            f"too large: {width} x {height} = {width * height:,} pixels, over pneumojax's limit "
            f"of {MAX_IMAGE_PIXELS:,} (pneumojax.data.MAX_IMAGE_PIXELS); shrink it first"
        )
    if width < 1 or height < 1:
        close()
        raise _Unusable(f"empty image ({width} x {height} pixels)")


def _holds_dicom(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _open_dicom(path: str | os.PathLike) -> Image.Image:
    from pneumojax import dicom  # pydicom is imported only once a DICOM file is met

    try:
        ds = dicom.read(path)
        _check_size(*dicom.size(ds))
        return dicom.to_image(ds)
    except dicom.DicomError as error:
        raise _Unusable(str(error)) from error


def _shrink(image: Image.Image, image_size: int, always: bool = False) -> Image.Image:
    """``image`` reduced cheaply to no less than ``2 * image_size`` a side, when it is large.

    Only images over ``_LARGE_PIXELS`` are touched unless ``always``. JPEG is decoded at a reduced
    scale (``Image.draft``: 1/2, 1/4 or 1/8, never below the target), so the full-size image is
    never in memory; other formats are decoded and then reduced by an integer factor (box filter).
    """
    width, height = image.size
    if not always and width * height <= _LARGE_PIXELS:
        return image
    target = 2 * image_size
    if image.format == "JPEG":
        image.draft(None, (target, target))  # takes effect on load
        return image
    factor = min(width, height) // target
    if factor < 2:
        return image
    try:
        return image.reduce(factor)
    except ValueError:  # modes reduce() lacks (I;16, P, 1): resize, box filter (P/1: nearest)
        size = (max(1, width // factor), max(1, height // factor))
        return image.resize(size, Image.Resampling.BOX)


def load_images(
    items: Sequence[Item] | Sequence[str | os.PathLike],
    image_size: int,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int = 2,
    resize: str = "antialias",
) -> np.ndarray:
    """Decode ``items`` (``(path, label)`` pairs or paths) into uint8 ``(N, S, S, 3)``, in order,
    resized by ``resize`` (see :func:`decode_image`).

    With ``cache_dir`` the array is stored there as ``.npy`` under a key over the image size, the
    resize method and each file's absolute path, size and mtime; a later call with the same
    files returns it memory-mapped read-only without decoding. Decoding runs on ``workers``
    threads (PIL releases the GIL while decoding and resizing).
    """
    if resize not in RESIZE_METHODS:
        raise ValueError(f"resize {resize!r}: expected one of {', '.join(RESIZE_METHODS)}")
    paths = [os.path.abspath(_item_path(item)) for item in items]
    if cache_dir is None:
        out = np.empty((len(paths), image_size, image_size, 3), np.uint8)
        _decode_into(out, paths, image_size, progress, workers, resize)
        return out
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(paths, image_size, resize)
    cache_file = cache_dir / f"images-{image_size}px-{resize}-{len(paths)}-{key}.npy"
    expected_shape = (len(paths), image_size, image_size, 3)
    if cache_file.exists():
        cached = np.load(cache_file, mmap_mode="r")
        if cached.shape == expected_shape and cached.dtype == np.uint8:
            return cached
    _write_cache(cache_file, expected_shape, paths, image_size, progress, workers, resize)
    return np.load(cache_file, mmap_mode="r")


def _item_path(item) -> str:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else os.fspath(item[0])


def image_set_key(paths: Sequence[str], image_size: int, resize: str = "antialias") -> str:
    """Identifies decoded images: file paths, sizes and mtimes, the output size and the resize
    method."""
    return _cache_key(paths, image_size, resize)


def _cache_key(paths: Sequence[str], image_size: int, resize: str) -> str:
    return _key(f"pneumojax-images:{_DECODER_VERSION}:{image_size}:{resize}", paths)


def _key(header: str, paths: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{header}\n".encode())
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise DataError(
                f"cannot read image file {path}: {_reason(error, path)}\n"
                "the data folder changed after the images were listed: check it and run again"
            ) from error
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _write_cache(
    cache_file: Path,
    shape: tuple,
    paths: Sequence[str],
    image_size: int,
    progress: bool,
    workers: int,
    resize: str,
) -> None:
    # Decode straight into a memory-mapped temp file (no second copy in RAM), then publish it
    # with an atomic rename so a reader never sees a half-written cache.
    fd, tmp_name = tempfile.mkstemp(
        prefix=cache_file.name + ".", suffix=".tmp", dir=cache_file.parent
    )
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp_name, mode="w+", dtype=np.uint8, shape=shape)
        _decode_into(out, paths, image_size, progress, workers, resize)
        out.flush()
        del out
        os.replace(tmp_name, cache_file)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _decode_into(
    out: np.ndarray, paths: Sequence[str], image_size: int, progress: bool, workers: int,
    resize: str = "antialias",
) -> None:
    def decode(path: str) -> np.ndarray:
        try:
            return decode_image(path, image_size, resize)
        except _DECODE_ERRORS as error:
            raise DataError(
                f"cannot decode {path}: {_reason(error, path)}\n"
                "remove or replace the file (pneumojax.data.check_images finds all such files)"
            ) from error

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        decoded = pool.map(decode, paths)  # map yields in input order
        bar = progress_bar(
            decoded,
            total=len(paths),
            desc=f"decoding {image_size}px",
            unit="img",
            disable=not progress,
        )
        for index, image in enumerate(bar):
            out[index] = image
    finally:
        # On an error, do not decode the rest of a large set before reporting it.
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Synthetic demo data

_DEMO_VERSION = 2
_DEMO_PARAMS_FILE = "demo_params.json"
_SYNTHETIC_NOTE = """\
SYNTHETIC DATA. These images were generated by pneumojax.data.make_demo_dataset: radiograph-like
drawings (two lung fields with rib-like stripes, a mediastinum, noise); PNEUMONIA images have
blurry bright opacities inside a lung field. They are not X-rays of anyone and say nothing about
real pneumonia. Use them only to exercise the pipeline.
"""


def make_demo_dataset(
    out_dir: str | os.PathLike, n_per_class: int = 150, image_size: int = 128, seed: int = 0
) -> Path:
    """Write (or reuse) a synthetic flat ``NORMAL/ PNEUMONIA/`` folder of radiograph-like images.

    PNEUMONIA images carry blurry bright opacities in a lung field, so a classifier can learn the
    task. File names follow the real patterns (``IM-NNNN-0001.jpeg``,
    ``personN_bacteria_K.jpeg``), some patients have two images, and every tenth file is a PNG.
    The output is deterministic for a seed; a folder already made with the same parameters is
    reused, one made with other parameters is replaced, any other existing folder is an error.
    """
    out = Path(out_dir)
    params = {
        "version": _DEMO_VERSION,
        "n_per_class": n_per_class,
        "image_size": image_size,
        "seed": seed,
    }
    if _demo_params(out) == params:
        return out
    if out.exists() and any(out.iterdir()) and _demo_params(out) is None:
        raise DataError(
            f"{out} exists and is not a pneumojax demo folder; refusing to overwrite it\n"
            f"expected a missing, empty or demo folder (one with {_DEMO_PARAMS_FILE})"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent))
    try:
        _write_demo_images(staging, n_per_class, image_size, seed)
        (staging / "SYNTHETIC.txt").write_text(_SYNTHETIC_NOTE)
        (staging / _DEMO_PARAMS_FILE).write_text(json.dumps(params, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _demo_params(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _DEMO_PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_demo_images(folder: Path, n_per_class: int, image_size: int, seed: int) -> None:
    for label, class_name in enumerate(CLASS_NAMES):
        (folder / class_name).mkdir()
        for index, (name, patient, shot) in enumerate(_demo_file_names(label, n_per_class)):
            anatomy = np.random.default_rng([seed, label, patient])  # shared by a patient's images
            noise = np.random.default_rng([seed, label, patient, shot, 1])
            pixels = _demo_radiograph(image_size, anatomy, noise, pneumonia=label == 1)
            if index % 10 == 9:
                name = name.rsplit(".", 1)[0] + ".png"
            Image.fromarray(pixels, "L").save(folder / class_name / name, quality=92)


def _demo_file_names(label: int, count: int) -> list[tuple[str, int, int]]:
    """``count`` (file name, patient number, image number) triples; every 7th patient has two."""
    names: list[tuple[str, int, int]] = []
    patient = 0
    while len(names) < count:
        patient += 1
        shots = 2 if patient % 7 == 3 else 1
        for shot in range(min(shots, count - len(names))):
            if label == 0:
                name = f"IM-{1000 + patient:04d}-{shot + 1:04d}.jpeg"
            else:
                kind = "virus" if shot == 1 or patient % 5 == 0 else "bacteria"
                name = f"person{patient}_{kind}_{100 + len(names)}.jpeg"
            names.append((name, patient, shot))
    return names


def _demo_radiograph(
    size: int, anatomy: np.random.Generator, noise: np.random.Generator, pneumonia: bool
) -> np.ndarray:
    """A grayscale uint8 ``(size, size)`` chest-like drawing."""
    y, x = np.mgrid[0:size, 0:size] / size
    dx, dy = anatomy.normal(0, 0.02, 2)
    lung_w, lung_h = anatomy.uniform(0.12, 0.16), anatomy.uniform(0.26, 0.32)
    gain = anatomy.uniform(0.85, 1.15)
    image = np.full((size, size), 18.0)
    image += 45.0 * (((x - 0.5 - dx) / 0.42) ** 2 + ((y - 0.52 - dy) / 0.48) ** 2 < 1)  # body
    lungs = []
    for side in (-1, 1):
        cx, cy = 0.5 + dx + side * 0.19, 0.5 + dy
        lung = ((x - cx) / lung_w) ** 2 + ((y - cy) / lung_h) ** 2 < 1
        ribs = np.sin(2 * np.pi * (y * 9 + 2.5 * (x - cx) ** 2 * side) + anatomy.uniform(0, 6.3))
        image += lung * (55.0 + 18.0 * ribs)
        lungs.append((cx, cy, lung))
    image += 95.0 * np.exp(-(((x - 0.5 - dx) / 0.06) ** 2)) * (y > 0.2 + dy)  # mediastinum
    if pneumonia:
        for _ in range(anatomy.integers(1, 4)):
            cx, cy, lung = lungs[anatomy.integers(0, 2)]
            ox = cx + anatomy.uniform(-0.6, 0.6) * lung_w
            oy = cy + anatomy.uniform(-0.6, 0.6) * lung_h
            sigma = anatomy.uniform(0.05, 0.10)
            blob = np.exp(-((x - ox) ** 2 + (y - oy) ** 2) / (2 * sigma**2))
            image += anatomy.uniform(70, 110) * blob * (0.4 + 0.6 * lung)
    image = image * gain + noise.normal(0, 7.0, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
