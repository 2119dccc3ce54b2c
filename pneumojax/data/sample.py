"""The real chest X-ray sample that ships inside pneumojax (``--data sample``): 400 images of the
Kermany data set (CC BY 4.0), patient-grouped, downscaled to 128 px so the package stays small.

``pneumojax/data/xray_sample/`` holds ``train/{NORMAL,PNEUMONIA}`` (150 each) and
``test/{NORMAL,PNEUMONIA}`` (50 each) under the images' original file names, so patients are
read from them as from the download; ``ATTRIBUTION.md`` says where they come from and
``MANIFEST.csv`` lists every file with its patient group, source and sha256. It is built, once
and deterministically, from the ``chest_xray_mini`` developer sample (itself drawn from the
official TRAIN split, patient-disjoint across its folders): ``python -m pneumojax.data.sample
SOURCE OUT``; a test rebuilds it and compares every byte.

It is for seeing pneumojax work on real X-rays in a minute (``make demo``), not for figures: 400
images of one site, 100 of them for test.
"""

from __future__ import annotations

import csv
import hashlib
import io
import sys
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "xray_sample"
SIZE = 128  # the shorter side, in pixels
QUALITY = 85  # JPEG
COUNTS = {"train": 150, "test": 50}  # per class
SOURCES = {"train": ("train", "val"), "test": ("test",)}  # chest_xray_mini's folders
CLASSES = ("NORMAL", "PNEUMONIA")


def _order(name: str) -> str:
    return hashlib.sha256(f"pneumojax-sample/v1:{name}".encode()).hexdigest()


def _resized(path: Path) -> bytes:
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as im:
        im = im.convert("L")  # the data set mixes grayscale and RGB JPEGs of grayscale X-rays
        w, h = im.size
        scale = SIZE / min(w, h)
        size = (max(SIZE, round(w * scale)), max(SIZE, round(h * scale)))
        out = io.BytesIO()
        im.resize(size, Image.LANCZOS).save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


def _groups(source: Path) -> dict[str, str]:
    with open(source / "MANIFEST.csv", newline="") as f:
        return {row["file"]: row["patient_group"] for row in csv.DictReader(f)}


def build_sample(source: str | Path, out: str | Path) -> list[dict]:
    """Writes the sample from a ``chest_xray_mini`` folder into ``out``; returns the manifest
    rows. Whole patient groups are taken in a fixed hash order until a split's count is met."""
    source, out = Path(source), Path(out)
    groups, rows = _groups(source), []
    for split, count in COUNTS.items():
        for cls in CLASSES:
            files = sorted(
                (
                    f"{folder}/{cls}/{p.name}"
                    for folder in SOURCES[split]
                    for p in (source / folder / cls).iterdir()
                ),
                key=lambda f: (_order(groups[f]), f),
            )
            for f in files[:count]:
                data = _resized(source / f)
                target = out / split / cls / Path(f).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                rows.append(
                    {
                        "file": f"{split}/{cls}/{target.name}",
                        "class": cls,
                        "patient_group": groups[f],
                        "source": f"chest_xray_mini/{f}",
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                )
    with open(out / "MANIFEST.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m pneumojax.data.sample CHEST_XRAY_MINI OUT")
    print(f"{len(build_sample(sys.argv[1], sys.argv[2]))} images written to {sys.argv[2]}")
