#!/usr/bin/env python
"""A Kaggle-layout stand-in built from a flat NORMAL/ PNEUMONIA/ folder, so that a command meant
for the Kaggle download (``--data chest_xray``) can be run and timed here as a user runs it.

``test/`` gets whole patients until it holds the official test split's class counts (234 NORMAL,
390 PNEUMONIA), ``val/`` the official val split's 8 + 8, ``train/`` the rest; no patient is in
two of them (patients read from the file names, as pneumojax groups them). Files are symbolic
links to the source, so nothing is copied. Patients are drawn in a seeded order.

Usage: ``python benchmarks/kaggle_standin.py ../shared/data/chest_xray_train224 /tmp/chest_xray``.
The stand-in's test images come from the official *train* split: figures on it are a carve's,
not the official test's.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
from pathlib import Path

from pneumojax.data.patients import patient_id

CLASSES = ("NORMAL", "PNEUMONIA")
OFFICIAL_COUNTS = {"test": {"NORMAL": 234, "PNEUMONIA": 390}, "val": {"NORMAL": 8, "PNEUMONIA": 8}}


def build(
    source: Path, out: Path, seed: int = 0, wanted: dict = OFFICIAL_COUNTS
) -> dict[str, dict[str, int]]:
    """Writes the stand-in into ``out`` (which must not exist); returns its image counts.
    ``wanted``: the most images of each class that ``test`` and ``val`` take."""
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new folder")
    counts = {split: dict.fromkeys(CLASSES, 0) for split in ("train", "val", "test")}
    for cls in CLASSES:
        by_patient = collections.defaultdict(list)
        for path in sorted((source / cls).iterdir()):
            if path.is_file():
                by_patient[patient_id(path.name)].append(path.resolve())
        order = sorted(by_patient)
        random.Random(f"kaggle-standin:{seed}:{cls}").shuffle(order)
        for patient in order:
            files = by_patient[patient]
            split = next(
                (s for s in ("test", "val") if counts[s][cls] + len(files) <= wanted[s][cls]),
                "train",
            )
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for path in files:
                (folder / path.name).symlink_to(path)
            counts[split][cls] += len(files)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="flat folder with NORMAL/ and PNEUMONIA/")
    p.add_argument("out", type=Path, help="new folder for train/ val/ test/")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    missing = [c for c in CLASSES if not (args.source / c).is_dir()]
    if missing:
        print(f"{args.source} has no {', '.join(missing)} folder", file=sys.stderr)
        return 2
    try:
        counts = build(args.source, args.out, args.seed)
    except FileExistsError as e:
        print(e, file=sys.stderr)
        return 2
    for split, by_class in counts.items():
        print(f"{split}: " + ", ".join(f"{n} {c}" for c, n in by_class.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
