"""Tests for pneumojax.data (folders, patients, splits, decoding, demo) and its TFDS builder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumojax import data
from pneumojax.data import DataError

from conftest import MINI_DATA, TRAIN224_DATA

REPO = Path(__file__).resolve().parents[1]


def _write_image(path: Path, mode: str = "L", size: tuple = (12, 10), value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new(mode, size, value if mode == "L" else (value, value // 2, 30)).save(path, fmt)
    return path


def _class_tree(folder: Path, normal: list[str], pneumonia: list[str]) -> None:
    for name in normal:
        _write_image(folder / "NORMAL" / name)
    for name in pneumonia:
        _write_image(folder / "PNEUMONIA" / name, mode="RGB")


def _normal_names(start: int, count: int) -> list[str]:
    return [f"IM-{start + i:04d}-0001.jpeg" for i in range(count)]


def _pneumonia_names(start: int, count: int) -> list[str]:
    return [f"person{start + i}_bacteria_{start + i}.jpeg" for i in range(count)]


def _kaggle_tree(root: Path, per_class: dict[str, int]) -> Path:
    """A Kaggle-layout tree with ``per_class[split]`` images per class and distinct patients."""
    start = 1
    for split, count in per_class.items():
        _class_tree(root / split, _normal_names(start, count), _pneumonia_names(start, count))
        start += count
    return root


# ---------------------------------------------------------------------------------------------
# find_images


def test_find_images_kaggle_layout_case_insensitive_and_filters_files(tmp_path):
    _kaggle_tree(tmp_path, {"Train": 3, "val": 1, "TEST": 2})
    (tmp_path / "Train/NORMAL/notes.txt").write_text("not an image")
    (tmp_path / "Train/NORMAL/.DS_Store").write_bytes(b"")
    (tmp_path / "Train/NORMAL/._IM-0001-0001.jpeg").write_bytes(b"resource fork")
    _write_image(tmp_path / "Train/NORMAL/extra.PNG")
    (tmp_path / "Train/pneumonia_renamed").mkdir()  # unrelated folders are ignored

    source = data.find_images(tmp_path)

    assert source.layout == "kaggle"
    assert {k: len(v) for k, v in source.splits.items()} == {"train": 7, "val": 2, "test": 4}
    train_labels = [label for _, label in source.splits["train"]]
    assert train_labels == [0, 0, 0, 0, 1, 1, 1]
    assert all(Path(p).suffix.lower() in (".jpeg", ".png") for p, _ in source.items)


def test_find_images_flat_layout(tmp_path):
    _class_tree(tmp_path, _normal_names(1, 2), _pneumonia_names(1, 3))
    _write_image(tmp_path / "PNEUMONIA/x.jpg")
    source = data.find_images(tmp_path)
    assert source.layout == "flat"
    assert list(source.splits) == ["all"]
    assert [label for _, label in source.items] == [0, 0, 1, 1, 1, 1]


def test_find_images_kaggle_without_val(tmp_path):
    _kaggle_tree(tmp_path, {"train": 2, "test": 2})
    assert data.find_images(tmp_path).splits["val"] == []


@pytest.mark.parametrize(
    "make_tree, expected",
    [
        (lambda root: None, ["not found", "expected"]),
        (
            lambda root: (root / "images").mkdir(parents=True),
            ["no chest X-ray layout", "found: images/"],
        ),
        (
            lambda root: (_class_tree(root, _normal_names(1, 1), []), (root / "PNEUMONIA").mkdir()),
            ["PNEUMONIA", "holds no image"],
        ),
        (
            lambda root: _write_image(root / "NORMAL/IM-0001-0001.jpeg"),
            ["class folder PNEUMONIA/ missing", "found: NORMAL/"],
        ),
        (
            lambda root: _kaggle_tree(root, {"train": 1, "val": 1}),
            ["no test/ folder", "found: train/, val/"],
        ),
        (
            lambda root: _kaggle_tree(root / "chest_xray", {"train": 1, "test": 1}),
            ["did you mean", "chest_xray"],
        ),
    ],
    ids=["missing", "no-layout", "empty-class", "missing-class", "missing-test", "nested-hint"],
)
def test_find_images_errors_say_what_was_expected_and_found(tmp_path, make_tree, expected):
    root = tmp_path / "data"
    make_tree(root)
    with pytest.raises(DataError) as error:
        data.find_images(root)
    message = str(error.value)
    assert len(message.splitlines()) <= 2
    for fragment in expected:
        assert fragment in message


# ---------------------------------------------------------------------------------------------
# patient_id


@pytest.mark.parametrize(
    "filename, patient",
    [
        ("person123_bacteria_4.jpeg", "person123"),
        ("person123_virus_9.jpeg", "person123"),
        ("person447_virus_921_1.jpeg", "person447"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0429-0001-0002.jpeg", "IM-0429"),
        ("NORMAL2-IM-0012-0001.jpeg", "NORMAL2-IM-0012"),
        ("/some/dir/train/NORMAL/IM-0115-0001.jpeg", "IM-0115"),
        ("scan_42.png", "scan_42"),
        ("person12.jpeg", "person12"),
    ],
)
def test_patient_id(filename, patient):
    assert data.patient_id(filename) == patient


# ---------------------------------------------------------------------------------------------
# make_splits


def _flat_tree_with_repeat_patients(root: Path, n_patients: int = 40) -> Path:
    normal, pneumonia = [], []
    for p in range(1, n_patients + 1):
        shots = 3 if p % 4 == 0 else 1
        normal += [f"IM-{p:04d}-{k + 1:04d}.jpeg" for k in range(shots)]
        pneumonia += [f"person{p}_bacteria_{10 * p + k}.jpeg" for k in range(shots)]
        if p % 5 == 0:
            pneumonia.append(f"person{p}_virus_{10 * p + 9}.jpeg")  # same patient, other kind
    _class_tree(root, normal, pneumonia)
    return root


def _patients(items) -> set[str]:
    return {data.patient_id(path) for path, _ in items}


def _assert_no_shared_patients(splits: data.Splits) -> None:
    train, val, test = (_patients(s) for s in (splits.train, splits.val, splits.test))
    assert not train & val and not train & test and not val & test


def test_make_splits_flat_groups_patients_and_stratifies(tmp_path):
    source = data.find_images(_flat_tree_with_repeat_patients(tmp_path))
    splits = data.make_splits(source, val_fraction=0.2, test_fraction=0.2, seed=3)

    _assert_no_shared_patients(splits)
    assert sorted(splits.train + splits.val + splits.test) == sorted(source.items)
    summary = splits.summary()
    n_normal = sum(label == 0 for _, label in source.items)
    for name in ("val", "test"):
        assert summary[name]["normal"] > 0 and summary[name]["pneumonia"] > 0
        assert abs(summary[name]["normal"] - 0.2 * n_normal) <= 3  # whole groups of <= 3 images
    assert summary["train"]["n"] == len(splits.train)
    assert splits.train == sorted(splits.train)


def test_make_splits_is_seeded(tmp_path):
    source = data.find_images(_flat_tree_with_repeat_patients(tmp_path))
    first = data.make_splits(source, seed=1)
    assert data.make_splits(source, seed=1).as_dict() == first.as_dict()
    assert data.make_splits(source, seed=2).as_dict() != first.as_dict()


def test_make_splits_kaggle_merges_val_into_train_and_keeps_test(tmp_path):
    source = data.find_images(_kaggle_tree(tmp_path, {"train": 20, "val": 2, "test": 4}))
    splits = data.make_splits(source, val_fraction=0.2)

    _assert_no_shared_patients(splits)
    assert splits.test == source.splits["test"]
    official_val = set(source.splits["val"])
    assert official_val <= set(splits.train) | set(splits.val)
    pool = source.splits["train"] + source.splits["val"]
    assert sorted(splits.train + splits.val) == sorted(pool)
    assert splits.summary()["val"] == {"n": 8, "normal": 4, "pneumonia": 4, "patients": 8}
    assert splits.info["layout"] == "kaggle"


def test_make_splits_kaggle_without_merge_keeps_official_val(tmp_path):
    source = data.find_images(_kaggle_tree(tmp_path, {"train": 6, "val": 2, "test": 2}))
    splits = data.make_splits(source, merge_kaggle_val=False)
    assert splits.val == source.splits["val"] and splits.train == source.splits["train"]


def test_make_splits_warns_about_shared_patients_between_given_folders(tmp_path):
    _kaggle_tree(tmp_path, {"train": 3, "val": 1, "test": 1})
    _write_image(tmp_path / "val/NORMAL/IM-0001-0002.jpeg")  # IM-0001 is a train patient
    warnings = []
    splits = data.make_splits(
        data.find_images(tmp_path), merge_kaggle_val=False, warn=warnings.append
    )
    assert splits.info["shared_patients"]["val"]["examples"] == ["IM-0001"]
    assert sum("used as given" in w for w in warnings) == 1


def test_make_splits_raises_when_a_split_gets_one_class(tmp_path):
    _class_tree(tmp_path, _normal_names(1, 2), _pneumonia_names(1, 12))
    with pytest.raises(DataError, match="NORMAL only|PNEUMONIA only"):
        data.make_splits(data.find_images(tmp_path), val_fraction=0.1, test_fraction=0.1)


def test_splits_json_round_trip_with_moved_root(tmp_path):
    source = data.find_images(_flat_tree_with_repeat_patients(tmp_path / "a", n_patients=12))
    splits = data.make_splits(source, val_fraction=0.2, test_fraction=0.2)
    text = splits.to_json()
    payload = json.loads(text)
    assert payload["summary"] == splits.summary()
    assert not os.path.isabs(payload["train"][0][0])

    assert data.Splits.from_json(text).as_dict() == splits.as_dict()
    moved = data.Splits.from_json(text, root=tmp_path / "b")
    assert moved.train[0][0] == str(tmp_path / "b" / payload["train"][0][0])


# ---------------------------------------------------------------------------------------------
# load_images


def _mixed_mode_images(folder: Path) -> list[tuple[str, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    gray = _write_image(folder / "gray.jpeg", "L", (30, 20), 200)
    rgb = _write_image(folder / "rgb.png", "RGB", (16, 40), 90)
    deep = folder / "deep16.png"
    Image.fromarray(np.full((24, 24), 32896, np.uint16)).save(deep)  # 32896 = 128 * 257
    cmyk = folder / "cmyk.jpg"
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(cmyk, "JPEG")  # no ink: white
    return [(str(p), 0) for p in (gray, rgb, deep, cmyk)]


def test_load_images_handles_gray_rgb_16bit_and_cmyk(tmp_path):
    items = _mixed_mode_images(tmp_path)
    assert Image.open(items[2][0]).mode.startswith("I;16")
    assert Image.open(items[3][0]).mode == "CMYK"

    images = data.load_images(items, 8, progress=False)

    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    gray, rgb, deep, cmyk = images
    assert np.abs(gray.astype(int) - 200).max() <= 3 and (gray[..., 0] == gray[..., 2]).all()
    assert tuple(rgb[4, 4]) == (90, 45, 30)
    assert (deep == 128).all()
    assert cmyk.min() >= 250


def test_load_images_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    items = _mixed_mode_images(tmp_path / "img")
    cache = tmp_path / "cache"
    first = data.load_images(items, 8, cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.npy"))) == 1 and not list(cache.glob("*.tmp"))

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded although the cache holds these images")

    monkeypatch.setattr(data.decode, "decode_image", must_not_decode)
    again = data.load_images([p for p, _ in items], 8, cache_dir=cache, progress=False)
    assert isinstance(again, np.memmap)
    np.testing.assert_array_equal(again, first)

    os.utime(items[0][0], ns=(1, 1))  # a changed file must not be served from the cache
    with pytest.raises(AssertionError, match="decoded although"):
        data.load_images(items, 8, cache_dir=cache, progress=False)
    assert not list(cache.glob("*.tmp"))  # the failed write left no temp file behind


def test_load_images_keeps_input_order_with_threads(tmp_path):
    paths = [_write_image(tmp_path / f"{v}.png", "L", (9, 9), v) for v in range(0, 250, 10)]
    images = data.load_images(paths, 4, progress=False, workers=2)
    assert [int(img[0, 0, 0]) for img in images] == list(range(0, 250, 10))


def test_load_images_names_the_file_it_cannot_decode(tmp_path):
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpeg"):
        data.load_images([broken], 8, progress=False)


# ---------------------------------------------------------------------------------------------
# make_demo_dataset


def test_demo_dataset_is_deterministic_reused_and_learnable(tmp_path):
    first = data.make_demo_dataset(tmp_path / "a", n_per_class=24, image_size=48, seed=5)
    second = data.make_demo_dataset(tmp_path / "b", n_per_class=24, image_size=48, seed=5)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert "synthetic" in (first / "SYNTHETIC.txt").read_text().lower()

    stamp = (first / "NORMAL").stat().st_mtime_ns
    assert data.make_demo_dataset(first, n_per_class=24, image_size=48, seed=5) == first
    assert (first / "NORMAL").stat().st_mtime_ns == stamp  # reused, not rewritten

    source = data.find_images(first)
    assert source.layout == "flat" and len(source.items) == 48
    assert any(p.suffix == ".png" for p in files)
    patients = [data.patient_id(p) for p, _ in source.items]
    assert len(set(patients)) < len(patients)  # some patients have two images
    images = data.load_images(source.items, 48, progress=False).astype(np.float32)
    labels = np.array([label for _, label in source.items])
    mean_difference = images[labels == 1].mean(0) - images[labels == 0].mean(0)
    assert mean_difference.max() > 15  # opacities brighten the lungs somewhere


def test_demo_dataset_regenerates_on_new_params_and_refuses_foreign_folders(tmp_path):
    demo = data.make_demo_dataset(tmp_path / "demo", n_per_class=4, image_size=16)
    data.make_demo_dataset(demo, n_per_class=6, image_size=16)
    assert len(data.find_images(demo).items) == 12

    foreign = tmp_path / "mine"
    _write_image(foreign / "keep.jpeg")
    with pytest.raises(DataError, match="refusing to overwrite"):
        data.make_demo_dataset(foreign, n_per_class=4, image_size=16)
    assert (foreign / "keep.jpeg").exists()


# ---------------------------------------------------------------------------------------------
# Real data (skipped where the shared folders are absent)


@pytest.mark.skipif(
    not MINI_DATA.is_dir(),
    reason=f"chest_xray_mini not found at {MINI_DATA} (set PNEUMOJAX_MINI_DATA)",
)
def test_real_mini_kaggle_split_is_patient_grouped():
    source = data.find_images(MINI_DATA)
    assert source.layout == "kaggle"
    splits = data.make_splits(source)

    _assert_no_shared_patients(splits)
    assert len(splits.test) == 120
    assert splits.test == source.splits["test"]
    assert all(Path(p).parts[-3] == "test" for p, _ in splits.test)
    assert len(splits.train) + len(splits.val) == 480

    sample = splits.train[:2] + splits.train[-2:]  # a few real JPEGs decode to RGB
    assert data.load_images(sample, 32, progress=False).shape == (4, 32, 32, 3)


@pytest.mark.skipif(
    not TRAIN224_DATA.is_dir(),
    reason=f"chest_xray_train224 not found at {TRAIN224_DATA} (set PNEUMOJAX_TRAIN224_DATA)",
)
def test_real_train224_flat_split_is_patient_grouped():
    source = data.find_images(TRAIN224_DATA)
    assert source.layout == "flat" and len(source.items) == 5216
    splits = data.make_splits(source, val_fraction=0.15, test_fraction=0.15, seed=0)

    _assert_no_shared_patients(splits)
    summary = splits.summary()
    assert sum(s["n"] for s in summary.values()) == 5216
    for name in ("val", "test"):
        assert abs(summary[name]["normal"] - 0.15 * 1341) <= 5
        assert abs(summary[name]["pneumonia"] - 0.15 * 3875) <= 10


# ---------------------------------------------------------------------------------------------
# TFDS builder


@pytest.mark.tensorflow
def test_tfds_builder_prepares_official_splits(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from pneumojax.tfds_chest_xray import ChestXrayPneumonia

    manual = tmp_path / "manual"
    _kaggle_tree(manual / "chest_xray", {"train": 3, "val": 1, "test": 2})
    cmyk = manual / "chest_xray/test/NORMAL/IM-0900-0001.jpeg"  # stored converted, as PNG
    Image.new("CMYK", (10, 8), (0, 0, 0, 0)).save(cmyk)

    builder = ChestXrayPneumonia(data_dir=str(tmp_path / "tfds"))
    config = tfds.download.DownloadConfig(manual_dir=str(manual))
    builder.download_and_prepare(download_config=config)

    assert {name: info.num_examples for name, info in builder.info.splits.items()} == {
        "train": 6,
        "val": 2,
        "test": 5,
    }
    examples = list(tfds.as_numpy(builder.as_dataset(split="test")))
    assert sorted(int(e["label"]) for e in examples) == [0, 0, 0, 1, 1]
    assert all(e["image"].ndim == 3 and e["image"].shape[-1] == 3 for e in examples)
    assert {e["patient"].decode() for e in examples} >= {"IM-0900", "person6"}
    assert builder.info.features["label"].names == ["NORMAL", "PNEUMONIA"]
