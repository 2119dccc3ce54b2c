"""Patient-grouped train/val/test splits: carving, the splits a layout gives, what they share.

Splits that pneumojax carves are made by whole patients (see
:func:`pneumojax.data.patients.patient_id`), so that no patient is in two of them (DESIGN.md,
principle 6); a split the user gives is used as given, with a warning when names suggest shared
patients.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import re
from typing import Iterable, Mapping, Sequence

from pneumojax.data._common import DataError, Item, Warn, _count, _default_warn
from pneumojax.data.checks import _duplicates_message, duplicates_across_splits
from pneumojax.data.layouts import CLASS_NAMES, KAGGLE_SPLITS, DataSource
from pneumojax.data.patients import patient_id


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
        for b in carved[i + 1 :]:
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
