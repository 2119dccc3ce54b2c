"""The real X-ray sample shipped inside pneumojax (``--data sample``): what its manifest says,
patient-disjoint train and test, rebuilt from chest_xray_mini to the same images, and shipped
as package data."""

import csv
import hashlib
import tomllib

import numpy as np
import pytest
from PIL import Image

from pneumojax import data as pj_data
from pneumojax.data.sample import COUNTS, SAMPLE_DIR, build_sample
from pneumojax.workspace import resolve_data

from conftest import MINI_DATA, REPO


def _manifest(folder):
    with open(folder / "MANIFEST.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_manifest_lists_every_shipped_file_with_its_digest():
    rows = _manifest(SAMPLE_DIR)
    files = sorted(p.relative_to(SAMPLE_DIR).as_posix() for p in SAMPLE_DIR.rglob("*.jpeg"))
    assert sorted(r["file"] for r in rows) == files
    assert len(files) == 2 * sum(COUNTS.values())
    for r in rows:
        assert hashlib.sha256((SAMPLE_DIR / r["file"]).read_bytes()).hexdigest() == r["sha256"]
    assert "CC BY 4.0" in (SAMPLE_DIR / "ATTRIBUTION.md").read_text()


def test_data_sample_is_a_kaggle_folder_with_no_patient_in_train_and_test():
    source = resolve_data("sample", log=lambda m: None)
    assert source.layout == "kaggle"
    counts = {s: len(items) for s, items in source.splits.items() if items}
    assert counts["train"] == 2 * COUNTS["train"] and counts["test"] == 2 * COUNTS["test"]
    patients = {s: {pj_data.patient_id(p) for p, _ in source.splits[s]} for s in ("train", "test")}
    assert not patients["train"] & patients["test"]
    groups = {r["file"].split("/")[0]: set() for r in _manifest(SAMPLE_DIR)}
    for r in _manifest(SAMPLE_DIR):
        groups[r["file"].split("/")[0]].add(r["patient_group"])
    assert not groups["train"] & groups["test"]


@pytest.mark.skipif(not MINI_DATA.is_dir(), reason=f"no data at {MINI_DATA}")
def test_the_sample_rebuilds_from_chest_xray_mini(tmp_path):
    rows = build_sample(MINI_DATA, tmp_path)
    shipped = {r["file"]: r for r in _manifest(SAMPLE_DIR)}
    assert [r["file"] for r in rows] == [r["file"] for r in _manifest(SAMPLE_DIR)]
    for r in rows[:: len(rows) // 40]:  # the same pixels (a JPEG encoder may differ by a level)
        a = np.asarray(Image.open(tmp_path / r["file"]), np.int16)
        b = np.asarray(Image.open(SAMPLE_DIR / r["file"]), np.int16)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2
        assert r["patient_group"] == shipped[r["file"]]["patient_group"]
    assert min(min(Image.open(SAMPLE_DIR / f).size) for f in list(shipped)[:20]) == 128


def test_the_sample_is_package_data():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["pneumojax.data"]
    folder = SAMPLE_DIR.name
    assert {f"{folder}/*.md", f"{folder}/*.csv", f"{folder}/*/*/*.jpeg"} <= set(globs)
