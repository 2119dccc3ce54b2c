"""Bad input gets a clear error (issue 7, data side): folders, unreadable images, splits, copies.

Every failure is a :class:`DataError` (a ``ValueError``, which the CLI prints without a traceback)
whose message says what is wrong and what to do in one or two lines; unreadable images are
skipped before splits are made, with one warning, or stop everything with ``strict=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumojax import data
from pneumojax.data import DataError

REPO = Path(__file__).resolve().parents[1]

_counter = iter(range(1, 10**6))


def _image(path: Path, mode: str = "L", size: tuple = (16, 12), fmt: str | None = None) -> Path:
    """A small image whose content differs from every other one this module writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(next(_counter))
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    image.save(path, fmt or ("PNG" if path.suffix.lower() == ".png" else "JPEG"))
    return path


def _flat_tree(root: Path, n_normal: int = 8, n_pneumonia: int = 8) -> Path:
    for i in range(1, n_normal + 1):
        _image(root / "NORMAL" / f"IM-{i:04d}-0001.jpeg")
    for i in range(1, n_pneumonia + 1):
        _image(root / "PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg", "RGB")
    return root


def _kaggle_tree(root: Path, per_split: dict[str, int]) -> Path:
    start = 1
    for split, count in per_split.items():
        for i in range(start, start + count):
            _image(root / split / "NORMAL" / f"IM-{i:04d}-0001.jpeg")
            _image(root / split / "PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg", "RGB")
        start += count
    return root


def _truncated(path: Path) -> Path:
    _image(path, size=(64, 64))
    path.write_bytes(path.read_bytes()[:-200])
    return path


def _assert_short(message: str) -> None:
    assert 1 <= len(message.splitlines()) <= 2, message


def _write_png(path: Path, width: int, height: int, value: int, bits: int = 8) -> Path:
    """A constant grayscale PNG written row by row (no full image in memory)."""
    row = b"\x00" + value.to_bytes(bits // 8, "big") * width
    compressor = zlib.compressobj(1)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def test_data_error_is_a_value_error_so_the_cli_prints_it_without_traceback():
    assert issubclass(DataError, ValueError)  # pneumojax.cli reports ValueError as "error: ..."


# ---------------------------------------------------------------------------------------------
# Folders


def test_missing_folder_says_where_and_what_was_expected(tmp_path):
    with pytest.raises(DataError) as error:
        data.find_images(tmp_path / "nope")
    message = str(error.value)
    _assert_short(message)
    assert "not found" in message and str(tmp_path / "nope") in message
    assert "train/val/test/" in message and "NORMAL/PNEUMONIA/" in message


def test_a_file_instead_of_a_folder_says_to_unpack_it(tmp_path):
    archive = tmp_path / "chest-xray-pneumonia.zip"
    archive.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match="is a file, not a folder") as error:
        data.find_images(archive)
    _assert_short(str(error.value))
    assert "unzip" in str(error.value)


def test_no_layout_names_what_was_expected_and_what_was_found(tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "labels.csv").write_text("a,b\n")
    with pytest.raises(DataError) as error:
        data.find_images(tmp_path)
    message = str(error.value)
    _assert_short(message)
    assert "expected train/ val/ test/ (Kaggle) or NORMAL/ PNEUMONIA/ (flat)" in message
    assert "found: scans/" in message

    only_files = tmp_path / "loose"
    _image(only_files / "a.jpeg")
    with pytest.raises(DataError, match=r"found: a\.jpeg"):
        data.find_images(only_files)


def test_empty_class_folder_says_what_it_holds(tmp_path):
    _flat_tree(tmp_path, n_pneumonia=0)
    (tmp_path / "PNEUMONIA").mkdir()
    (tmp_path / "PNEUMONIA/notes.txt").write_text("to do")
    _image(tmp_path / "PNEUMONIA/more/person1_virus_1.jpeg")
    with pytest.raises(DataError) as error:
        data.find_images(tmp_path)
    message = str(error.value)
    _assert_short(message)
    assert "PNEUMONIA holds no image" in message
    assert "expected files ending in .jpeg, .jpg, .png" in message
    assert "found: more/, notes.txt" in message


def test_missing_class_folder_in_a_kaggle_split(tmp_path):
    _kaggle_tree(tmp_path, {"train": 2, "test": 1})
    shutil.rmtree(tmp_path / "test/PNEUMONIA")
    with pytest.raises(DataError) as error:
        data.find_images(tmp_path)
    message = str(error.value)
    _assert_short(message)
    assert "class folder PNEUMONIA/ missing in" in message and "test" in message
    assert "found: NORMAL/" in message


# ---------------------------------------------------------------------------------------------
# Splits


def test_split_with_one_class_says_how_many_of_each_there_are(tmp_path):
    _flat_tree(tmp_path, n_normal=2, n_pneumonia=12)
    with pytest.raises(DataError) as error:
        data.make_splits(data.find_images(tmp_path), val_fraction=0.1, test_fraction=0.1)
    message = str(error.value)
    _assert_short(message)
    assert "PNEUMONIA only" in message
    assert "NORMAL 2 images of 2 patients, PNEUMONIA 12 images of 12 patients" in message
    assert "add NORMAL images" in message


def test_empty_split_is_named(tmp_path):
    _flat_tree(tmp_path)
    with pytest.raises(DataError, match="split val would be empty") as error:
        data.make_splits(data.find_images(tmp_path), val_fraction=0.0)
    _assert_short(str(error.value))


def test_copies_across_official_train_and_test_warn_and_are_kept(tmp_path):
    _kaggle_tree(tmp_path, {"train": 10, "test": 3})
    normal = tmp_path / "train/NORMAL/IM-0002-0001.jpeg"
    shutil.copy(normal, tmp_path / "test/NORMAL/IM-0900-0001.jpeg")
    pneumonia = tmp_path / "train/PNEUMONIA/person3_bacteria_3.jpeg"
    shutil.copy(pneumonia, tmp_path / "test/NORMAL/IM-0901-0001.jpeg")  # and mislabelled
    warned: list[str] = []

    splits = data.make_splits(data.find_images(tmp_path), val_fraction=0.2, warn=warned.append)

    assert len(warned) == 1
    message = warned[0]
    _assert_short(message)
    assert "4 images in 2 groups of identical files" in message
    assert "test/NORMAL/IM-0900-0001.jpeg (test) = train/NORMAL/IM-0002-0001.jpeg" in message
    assert "1 with different labels" in message and "remove the copies" in message
    assert len(splits.test) == 8  # kept: a warning, not a failure
    assert splits.info["duplicates_across_splits"] == 2
    assert json.loads(splits.to_json())["info"]["duplicates_across_splits"] == 2


def test_no_copies_no_warning_and_default_warning_category(tmp_path):
    _kaggle_tree(tmp_path, {"train": 6, "test": 2})
    warned: list[str] = []
    data.make_splits(data.find_images(tmp_path), warn=warned.append)
    assert warned == []

    shutil.copy(tmp_path / "train/NORMAL/IM-0001-0001.jpeg", tmp_path / "test/NORMAL/copy.jpeg")
    with pytest.warns(data.DataWarning, match="identical files"):
        data.make_splits(data.find_images(tmp_path))


# ---------------------------------------------------------------------------------------------
# Unreadable images: skipped before splitting, or an error with strict


def test_unreadable_images_are_skipped_with_one_warning_before_splitting(tmp_path):
    _flat_tree(tmp_path, n_normal=10, n_pneumonia=10)
    _truncated(tmp_path / "NORMAL/IM-0100-0001.jpeg")
    (tmp_path / "NORMAL/IM-0101-0001.jpeg").write_text("meeting notes, not an X-ray")
    (tmp_path / "PNEUMONIA/person100_virus_1.png").write_bytes(b"")
    (tmp_path / "PNEUMONIA/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # ignored, silently
    (tmp_path / "PNEUMONIA/._person1_bacteria_1.jpeg").write_bytes(b"\x00\x05\x16\x07")
    warned: list[str] = []

    source = data.find_images(tmp_path, warn=warned.append)

    assert len(warned) == 1
    message = warned[0]
    _assert_short(message)
    assert message.startswith("skipped 3 unreadable images of 23 (NORMAL/IM-0100-0001.jpeg, ")
    assert "NORMAL/IM-0101-0001.jpeg" in message and "PNEUMONIA/person100_virus_1.png" in message
    assert "truncated" in message and "--strict" in message
    assert ".DS_Store" not in message and "._person1" not in message
    reasons = dict(source.skipped)
    assert "truncated" in reasons[str(tmp_path / "NORMAL/IM-0100-0001.jpeg")]
    assert reasons[str(tmp_path / "NORMAL/IM-0101-0001.jpeg")].startswith("not an image")
    assert reasons[str(tmp_path / "PNEUMONIA/person100_virus_1.png")] == "empty file (0 bytes)"

    assert len(source.items) == 20 and not set(reasons) & {p for p, _ in source.items}
    splits = data.make_splits(source, val_fraction=0.2, test_fraction=0.2, warn=warned.append)
    assert len(warned) == 1  # the healthy images are all distinct: no other warning
    everything = splits.train + splits.val + splits.test
    assert sorted(everything) == sorted(source.items)
    # splits.json never names a skipped file (its file lists, not the tmp folder's own name:
    # pytest's "pytest-100" folder once made a substring check fail)
    listed = {
        path for name in ("train", "val", "test") for path, _ in json.loads(splits.to_json())[name]
    }
    assert not listed & {os.path.relpath(path, tmp_path) for path in reasons}
    assert not any("100" in Path(path).name for path in listed)
    images = data.load_images(everything, 8, progress=False)
    assert images.shape == (20, 8, 8, 3)


def test_default_warning_is_a_data_warning(tmp_path):
    _flat_tree(tmp_path, 3, 3)
    _truncated(tmp_path / "NORMAL/IM-0100-0001.jpeg")
    with pytest.warns(data.DataWarning, match="skipped 1 unreadable image of 7"):
        source = data.find_images(tmp_path)
    assert len(source.items) == 6


def test_strict_names_the_first_bad_file_and_why(tmp_path):
    _kaggle_tree(tmp_path, {"train": 3, "test": 2})
    (tmp_path / "train/PNEUMONIA/x.jpeg").write_text("notes.txt, renamed")
    _truncated(tmp_path / "train/NORMAL/IM-0100-0001.jpeg")
    with pytest.raises(DataError) as error:
        data.find_images(tmp_path, strict=True)
    message = str(error.value)
    _assert_short(message)
    assert message.startswith("unreadable image train/NORMAL/IM-0100-0001.jpeg: corrupt or trunc")
    assert "remove or replace it" in message


def test_a_class_left_without_readable_images_is_an_error(tmp_path):
    _flat_tree(tmp_path, 3, 0)
    (tmp_path / "PNEUMONIA").mkdir()
    for i in range(2):
        (tmp_path / f"PNEUMONIA/person{i}_virus_{i}.jpeg").write_text("not an image")
    with pytest.raises(DataError) as error:
        data.find_images(tmp_path, warn=lambda message: None)
    message = str(error.value)
    _assert_short(message)
    assert "PNEUMONIA holds no readable image: all 2 files failed to decode" in message
    assert "person0_virus_0.jpeg: not an image" in message


def test_check_images_keeps_order_and_type_and_caches_its_result(tmp_path, monkeypatch):
    good = [_image(tmp_path / f"{i}.jpeg") for i in range(4)]
    bad = _truncated(tmp_path / "bad.jpeg")
    items = [(str(good[0]), 0), (str(bad), 1), (str(good[1]), 1), (str(good[2]), 0)]
    cache = tmp_path / "cache"
    warned: list[str] = []

    kept = data.check_images(items, warn=warned.append, cache_dir=cache)
    assert kept == [items[0], items[2], items[3]]
    assert len(list(cache.glob("checked-4-*.json"))) == 1
    assert data.check_images([str(good[3])], warn=warned.append) == [str(good[3])]

    def must_not_check(path):
        raise AssertionError("checked although the cache holds the result")

    monkeypatch.setattr(data.checks, "image_problem", must_not_check)
    assert data.check_images(items, warn=warned.append, cache_dir=cache) == kept
    assert len(warned) == 2 and warned[0] == warned[1]  # the warning repeats with the cache
    with pytest.raises(DataError, match="bad.jpeg"):
        data.check_images(items, strict=True, cache_dir=cache)

    os.utime(good[0], ns=(1, 1))  # a changed file is checked again
    with pytest.raises(AssertionError, match="checked although"):
        data.check_images(items, cache_dir=cache)


def test_check_images_reports_a_missing_file_with_or_without_cache(tmp_path):
    good = _image(tmp_path / "good.jpeg")
    missing = tmp_path / "missing.jpeg"
    for cache_dir in (None, tmp_path / "cache"):
        warned: list[str] = []
        assert data.check_images([good, missing], warn=warned.append, cache_dir=cache_dir) == [good]
        assert "missing.jpeg: no such file or directory" in warned[0]


# ---------------------------------------------------------------------------------------------
# Unusual but valid images decode


def test_16bit_cmyk_palette_and_one_pixel_high_images_pass_and_decode(tmp_path):
    deep = tmp_path / "deep16.png"
    Image.fromarray(np.full((30, 40), 32896, np.uint16)).save(deep)  # 32896 = 128 * 257
    cmyk = tmp_path / "cmyk.jpeg"
    Image.new("CMYK", (40, 30), (0, 0, 0, 0)).save(cmyk, "JPEG")
    strip = _image(tmp_path / "strip.jpeg", size=(500, 1))
    column = _image(tmp_path / "column.png", size=(1, 300))
    palette = tmp_path / "palette.png"
    Image.new("P", (20, 20), 3).save(palette)
    paths = [str(p) for p in (deep, cmyk, strip, column, palette)]
    warned: list[str] = []

    assert data.check_images(paths, warn=warned.append) == paths and warned == []
    images = data.load_images(paths, 16, progress=False)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert (images[0] == 128).all() and images[1].min() >= 250


def test_16bit_conversion_matches_rounding_and_stays_small(tmp_path):
    values = np.array([[0, 128, 129, 385, 386, 65535, 32896, 1000]], np.uint16)
    image = data.to_8bit_rgb_or_gray(Image.fromarray(values))
    expected = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(image), expected)
    signed = Image.fromarray(np.array([[-5, 300, 70000, 2**31 - 1]], np.int32), "I")
    assert np.asarray(data.to_8bit_rgb_or_gray(signed)).tolist() == [[0, 1, 255, 255]]


def test_large_images_decode_in_bounded_memory_and_time(tmp_path):
    """12000 x 12000 PNG, 8000 x 8000 JPEG, 6000 x 6000 16-bit PNG: no bomb error, no blow-up.

    Run in a fresh process so that its peak resident memory (``ru_maxrss``) measures only this.
    Without the shrink-before-convert path the 16-bit image alone would take ~1 GB (float64).
    """
    _write_png(tmp_path / "huge.png", 12000, 12000, 77)
    _write_png(tmp_path / "deep.png", 6000, 6000, 32896, bits=16)
    Image.new("L", (8000, 8000), 99).save(tmp_path / "big.jpeg", quality=90)
    script = textwrap.dedent(
        """
        import json, resource, sys, time, warnings
        warnings.simplefilter("error")  # a DecompressionBombWarning fails the test
        from pneumojax import data
        def peak_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = {"base": peak_mb()}
        t0 = time.perf_counter()
        for name in ("big.jpeg", "huge.png", "deep.png"):
            path = sys.argv[1] + "/" + name
            assert data.check_images([path], strict=True) == [path]
            image = data.load_images([path], 64, progress=False)[0]
            result[name] = [peak_mb(), int(image.min()), int(image.max())]
        result["seconds"] = time.perf_counter() - t0
        print(json.dumps(result))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    base = result["base"]
    assert result["big.jpeg"][1:] == [99, 99]
    assert result["big.jpeg"][0] - base < 30  # decoded at 1/8 scale: never 64 MB
    assert result["huge.png"][1:] == [77, 77]
    assert result["deep.png"][1:] == [128, 128]
    # 144 MB of 8-bit pixels must be decoded for the PNG; nothing much on top of that.
    assert result["deep.png"][0] - base < 300, result
    assert result["seconds"] < 30, result


def test_images_over_the_pixel_limit_are_skipped_with_a_reason(tmp_path, monkeypatch):
    big = _image(tmp_path / "big.png", size=(30, 20))
    small = _image(tmp_path / "small.png", size=(5, 5))
    warned: list[str] = []

    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    assert data.check_images([big, small], warn=warned.append) == [small]
    assert "big.png: too large: 30 x 20 = 600 pixels, over pneumojax's limit of 100" in warned[0]

    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own bomb error (over 200)
    with pytest.raises(DataError, match="big.png: too large for PIL"):
        data.check_images([big, small], strict=True)
    with pytest.raises(DataError, match=r"cannot decode .*big.png: too large for PIL"):
        data.load_images([small, big], 8, progress=False)


def test_pil_limit_is_raised_for_large_but_sane_images():
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= 12000 * 12000


# ---------------------------------------------------------------------------------------------
# load_images never crashes on a file that slipped through


def test_load_images_names_a_corrupt_file_that_slipped_through(tmp_path):
    good = _image(tmp_path / "good.jpeg")
    bad = _truncated(tmp_path / "late.jpeg")
    with pytest.raises(DataError) as error:
        data.load_images([good, bad], 8, progress=False)
    message = str(error.value)
    _assert_short(message)
    assert f"cannot decode {bad}: corrupt or truncated image data" in message
    assert "remove or replace the file" in message


def test_load_images_wraps_any_decoder_failure(tmp_path, monkeypatch):
    path = _image(tmp_path / "odd.png")

    def fails(path, image_size, resize="antialias"):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(data.decode, "decode_image", fails)
    with pytest.raises(DataError, match=r"cannot decode .*odd.png: cannot decode \(error: unpack"):
        data.load_images([path], 8, progress=False)


def test_load_images_names_a_file_that_vanished(tmp_path):
    gone = _image(tmp_path / "gone.jpeg")
    items = [(str(gone), 0)]
    gone.unlink()
    for call in (
        lambda: data.load_images(items, 8, cache_dir=tmp_path / "cache", progress=False),
        lambda: data.load_images(items, 8, progress=False),
        lambda: data.image_set_key([str(gone)], 8),
    ):
        with pytest.raises(DataError, match="gone.jpeg") as error:
            call()
        _assert_short(str(error.value))
