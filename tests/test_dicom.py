"""DICOM input: LUTs and windows, MONOCHROME1, colour, codecs, bad files, and train/predict on .dcm.

Every DICOM file here is written by the tests themselves with pydicom, from generated arrays (so
the core tests always run) and from real Kaggle JPEGs when ``../shared/data/chest_xray_mini`` is
there (or at ``PNEUMOJAX_MINI_DATA``).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    generate_uid,
)

from pneumojax import data
from pneumojax.data import DataError

from conftest import MINI_DATA as MINI, REPO, tiny_train_args


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=None, **elements):
    """A DICOM Part 10 file of ``pixels`` (uncompressed), with extra data elements."""
    ds = _dataset(pixels, photometric, bits_stored, **elements)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def write_encapsulated(path, frame: bytes, syntax, shape, photometric="MONOCHROME2", bits=8):
    """A DICOM file whose pixel data is ``frame``, compressed in transfer syntax ``syntax``."""
    colour = len(shape) == 3
    ds = _dataset(
        np.zeros(shape, np.uint8 if bits == 8 else np.uint16),
        "RGB" if colour else "MONOCHROME2",
        bits,
    )
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PhotometricInterpretation = photometric
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def _dataset(pixels, photometric, bits_stored, **elements):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    pixels = np.asarray(pixels)
    ds.set_pixel_data(
        pixels, photometric, bits_stored or 8 * pixels.dtype.itemsize, generate_instance_uid=False
    )
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def decoded(path) -> np.ndarray:
    with data.open_image(path) as image:
        return np.asarray(image)


def expected_window(stored, slope, intercept, center, width):
    """PS3.3 C.11.2.1.2.1 (LINEAR), onto 0..255, written out independently of pydicom."""
    value = stored.astype(np.float64) * slope + intercept
    y = ((value - (center - 0.5)) / (width - 1) + 0.5) * 255
    y[value <= center - 0.5 - (width - 1) / 2] = 0
    y[value > center - 0.5 + (width - 1) / 2] = 255
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def gradient(rows=64, columns=48, bits=12, seed=0):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 2**bits - 1, columns)[None, :] * np.linspace(0.2, 1, rows)[:, None]
    return np.clip(ramp + rng.normal(0, 20, (rows, columns)), 0, 2**bits - 1).astype(np.uint16)


def test_16bit_rescale_and_window_give_the_dicom_formula(tmp_path):
    stored = gradient()
    path = write_dicom(
        tmp_path / "a.dcm",
        stored,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=1500,
        WindowWidth=3000,
    )
    image = decoded(path)
    want = expected_window(stored, 2, -1024, 1500, 3000)
    assert image.dtype == np.uint8 and image.shape == stored.shape
    assert np.abs(image.astype(int) - want).max() <= 1  # float rounding at .5 only
    assert (image == want).mean() > 0.99
    assert image.min() == 0 and image.max() == 255  # the window clips both ends
    # The window, not the image's own range: a narrower window gives another image.
    narrow = decoded(
        write_dicom(
            tmp_path / "b.dcm",
            stored,
            bits_stored=12,
            RescaleSlope=2,
            RescaleIntercept=-1024,
            WindowCenter=2000,
            WindowWidth=500,
        )
    )
    assert np.abs(narrow.astype(int) - expected_window(stored, 2, -1024, 2000, 500)).max() <= 1


def test_without_a_window_the_modality_values_are_scaled_min_to_max(tmp_path):
    stored = gradient(bits=14)
    image = decoded(
        write_dicom(
            tmp_path / "a.dcm", stored, bits_stored=14, RescaleSlope=0.5, RescaleIntercept=100
        )
    )
    value = stored * 0.5 + 100
    want = np.rint((value - value.min()) * 255 / (value.max() - value.min()))
    np.testing.assert_array_equal(image, want.astype(np.uint8))
    # A window of width 0 is unusable: min-max too, not an unreadable file.
    bad = decoded(
        write_dicom(
            tmp_path / "b.dcm",
            stored,
            bits_stored=14,
            RescaleSlope=0.5,
            RescaleIntercept=100,
            WindowCenter=300,
            WindowWidth=0,
        )
    )
    np.testing.assert_array_equal(bad, image)


@pytest.mark.parametrize("bits", [8, 16])
def test_voi_lut_sequence_is_applied(tmp_path, bits):
    stored = gradient(bits=12)
    lut = (np.linspace(0, 1, 4096) ** 0.5 * (2**bits - 1)).astype(np.uint16)  # a gamma curve
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, bits])
    item.add_new("LUTData", "US", lut.tolist())
    path = write_dicom(
        tmp_path / "a.dcm",
        stored,
        bits_stored=12,
        WindowCenter=100,
        WindowWidth=10,
        VOILUTSequence=[item],
    )
    want = np.rint(lut[stored] / lut.max() * 255).astype(np.uint8)  # the LUT's range: 0..255
    np.testing.assert_array_equal(decoded(path), want)  # and the LUT wins over the window


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    stored = gradient(64, 64)
    elements = dict(
        bits_stored=12, RescaleSlope=1, RescaleIntercept=0, WindowCenter=2048, WindowWidth=4096
    )
    two = write_dicom(tmp_path / "two.dcm", stored, "MONOCHROME2", **elements)
    one = write_dicom(tmp_path / "one.dcm", stored, "MONOCHROME1", **elements)
    np.testing.assert_array_equal(decoded(one), 255 - decoded(two))
    # Through decode_image at the image's own size (no resampling): RGB, still inverted.
    rgb_one, rgb_two = data.decode_image(one, 64), data.decode_image(two, 64)
    assert rgb_one.shape == (64, 64, 3)
    np.testing.assert_array_equal(rgb_one, 255 - rgb_two)
    plain = write_dicom(tmp_path / "plain.dcm", stored, "MONOCHROME1", bits_stored=12)
    assert decoded(plain)[stored == stored.max()].max() == 0  # the highest value is black


def test_8bit_dicom_keeps_its_pixels_and_rgb_dicom_decodes(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(20, 200, (30, 40), dtype=np.uint8)  # not full range: kept, not stretched
    np.testing.assert_array_equal(decoded(write_dicom(tmp_path / "g.dcm", gray)), gray)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "c.dcm", rgb, "RGB")
    with data.open_image(path) as image:
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), rgb)
    np.testing.assert_array_equal(
        data.decode_image(path, 40)[:30],
        np.asarray(Image.fromarray(rgb).resize((40, 40), Image.Resampling.BILINEAR))[:30],
    )
    deep = rgb.astype(np.uint16) * 257  # 16-bit RGB scales back to the same 8 bits
    np.testing.assert_array_equal(decoded(write_dicom(tmp_path / "d.dcm", deep, "RGB")), rgb)


def test_dicom_is_found_by_content_and_by_extension(tmp_path):
    stored = gradient()
    named = write_dicom(tmp_path / "NORMAL" / "IM-0001-0001.dcm", stored, bits_stored=12)
    write_dicom(tmp_path / "NORMAL" / "IM-0002-0001.DICOM", stored, bits_stored=12)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "NORMAL" / "IM-0003-0001.jpeg")
    (tmp_path / "NORMAL" / "notes.txt").write_text("not listed")
    names = [p.name for p in data.layouts._image_files(tmp_path / "NORMAL", [])]
    assert names == ["IM-0001-0001.dcm", "IM-0002-0001.DICOM", "IM-0003-0001.jpeg"]
    # A DICOM file without an extension (as PACS exports often are) is read as DICOM too.
    bare = tmp_path / "IM000001"
    bare.write_bytes(named.read_bytes())
    np.testing.assert_array_equal(decoded(bare), decoded(named))


def test_compressed_dicom_without_a_codec_names_the_package(tmp_path):
    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG lossless decoder is installed here")
    # Encapsulated bytes with a JPEG lossless transfer syntax: never decoded, the codec is missing.
    path = write_encapsulated(
        tmp_path / "lossless.dcm",
        b"\xff\xd8\xff\xc3" + bytes(40) + b"\xff\xd9",
        JPEGLosslessSV1,
        (8, 8),
        bits=16,
    )
    reason = data.image_problem(path)
    assert reason.startswith("pixel data compressed as JPEG Lossless")
    assert "1.2.840.10008.1.2.4.70" in reason
    assert "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)" in reason
    assert "\n" not in reason
    with pytest.raises(DataError, match="lossless.dcm: pixel data compressed .* pip install pylib"):
        data.load_images([path], 8, progress=False)


def test_12bit_jpeg_that_pillow_refuses_names_the_package(tmp_path):
    if get_decoder(JPEGExtended12Bit).available_plugins != ("pillow",):
        pytest.skip("a decoder beyond Pillow's is installed here")
    path = write_encapsulated(
        tmp_path / "extended.dcm",
        b"\xff\xd8\xff\xc1" + bytes(40) + b"\xff\xd9",
        JPEGExtended12Bit,
        (8, 8),
        bits=16,
    )
    reason = data.image_problem(path)
    assert "Pillow does not support 'JPEG Extended' for samples with 12-bit precision" in reason
    assert reason.endswith(
        "another decoder may read it: pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
    )
    assert "\n" not in reason


def test_bad_dicom_files_are_skipped_with_a_reason(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", gradient(), bits_stored=12)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-500])
    header_only = tmp_path / "header.dcm"
    header_only.write_bytes(good.read_bytes()[:300])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"0123456789" * 50)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    report = Dataset()  # a DICOM object with no image: a structured report, say
    report.file_meta = FileMetaDataset()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID
    report.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    paths = [str(p) for p in (good, truncated, header_only, junk, empty, tmp_path / "report.dcm")]

    reasons = {Path(p).name: data.image_problem(p) for p in paths}
    assert reasons["good.dcm"] is None
    assert reasons["truncated.dcm"].startswith("corrupt or undecodable pixel data (Explicit VR")
    assert "less than expected" in reasons["truncated.dcm"]
    assert reasons["header.dcm"] is not None
    assert reasons["junk.dcm"].startswith("not a DICOM file (no 'DICM' marker")
    assert reasons["empty.dcm"] == "empty file (0 bytes)"
    assert (
        reasons["report.dcm"]
        == "DICOM file without pixel data (Basic Text SR Storage), not an image"
    )

    warned: list[str] = []
    assert data.check_images(paths, warn=warned.append) == [str(good)]
    assert warned[0].startswith("skipped 5 unreadable images of 6 (truncated.dcm, header.dcm,")
    with pytest.raises(DataError, match="unreadable image truncated.dcm: corrupt or undecodable"):
        data.check_images(paths, strict=True)


def test_dicom_over_the_pixel_limit_is_refused_before_its_pixels_are_read(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "big.dcm", gradient(30, 20), bits_stored=12)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    assert data.image_problem(path) == (
        "too large: 20 x 30 = 600 pixels, over pneumojax's limit "
        "of 100 (pneumojax.data.MAX_IMAGE_PIXELS); shrink it first"
    )


def test_large_dicom_is_shrunk_in_bounded_memory(tmp_path):
    """A 4200 x 4200 16-bit DICOM (35 MB of pixels): over 16 Mpx, so it is reduced like a large
    PNG once 8-bit; the conversion runs on row blocks, so no float64 copy is ever made."""
    side = 4200
    ramp = np.broadcast_to(np.linspace(0, 4095, side).astype(np.uint16), (side, side))
    write_dicom(
        tmp_path / "big.dcm",
        np.ascontiguousarray(ramp),
        bits_stored=12,
        WindowCenter=2048,
        WindowWidth=4096,
    )
    # Peak memory from /proc (VmHWM): ru_maxrss would carry over pytest's own peak across exec.
    script = textwrap.dedent(
        """
        import json, re, sys
        from pathlib import Path
        from pneumojax import data
        import pydicom.pixels  # imported before the baseline: only decoding is measured
        def peak_mb():
            status = Path("/proc/self/status").read_text()
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024
        base = peak_mb()
        image = data.decode_image(sys.argv[1], 32)
        print(json.dumps({"mb": peak_mb() - base, "row": image[0, :, 0].tolist()}))
        """
    )
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to measure peak memory")
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "big.dcm")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    row = np.array(result["row"])
    assert row[0] < 8 and row[-1] > 247 and np.all(np.diff(row) >= 0)  # the ramp survives
    # Pixel data read (35 MB) then decoded (35 MB, the bytes freed), 18 MB of 8-bit: ~80 MB,
    # where one float64 copy of the image alone would be 141 MB.
    assert result["mb"] < 110, result


def test_train_and_predict_on_a_folder_mixing_dicom_and_jpeg(tmp_path, monkeypatch):
    from pneumojax.cli import main

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    root = data.make_demo_dataset(tmp_path / "demo", n_per_class=40, image_size=48, seed=1)
    folder = tmp_path / "xray"
    kinds = {"16bit": 0, "mono1": 0, "8bit": 0, "jpeg": 0}
    for index, source in enumerate(sorted(root.glob("*/*.*g"))):
        target = folder / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(Image.open(source).convert("L"))
        kind = ("16bit", "mono1", "8bit", "jpeg")[index % 4]
        kinds[kind] += 1
        if kind == "jpeg":
            target.write_bytes(source.read_bytes())
            continue
        target = target.with_suffix(".dcm")
        if kind == "8bit":
            write_dicom(target, pixels)
        else:  # 12-bit stored values, rescaled and windowed back onto the 8-bit picture
            stored = pixels.astype(np.uint16) * 16
            if kind == "mono1":
                stored = 4095 - stored
            write_dicom(
                target,
                stored,
                "MONOCHROME1" if kind == "mono1" else "MONOCHROME2",
                bits_stored=12,
                RescaleSlope=1,
                RescaleIntercept=-1000,
                WindowCenter=1048,
                WindowWidth=4096,
            )
    assert min(kinds.values()) >= 15
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main, tiny_train_args(folder, run, "--backbone", "densenet121", epochs=1)
    )
    assert result.exit_code == 0, result.output
    assert "unreadable" not in result.output
    splits = json.loads((run / "splits.json").read_text())
    assert ".dcm" in json.dumps(splits)

    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--run",
            str(run),
            "--data",
            str(folder),
            "--split",
            "all",
            "--out",
            str(tmp_path / "all.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "all.json").read_text())["n"] == 80

    dcm = sorted(folder.glob("PNEUMONIA/*.dcm"))[0]
    result = CliRunner().invoke(main, ["predict", "--run", str(run), str(dcm)])
    assert result.exit_code == 0, result.output
    rows = result.output.strip().splitlines()
    assert rows[0] == "path,p_pneumonia,label,threshold"
    path, p, label, _ = rows[1].split(",")
    assert path == str(dcm) and 0.0 <= float(p) <= 1.0 and label in ("NORMAL", "PNEUMONIA")
    # A folder: its .dcm files are listed beside its JPEGs.
    result = CliRunner().invoke(main, ["predict", "--run", str(run), str(folder / "NORMAL")])
    assert result.exit_code == 0, result.output
    listed = [r.split(",")[0] for r in result.output.strip().splitlines()[1:]]
    assert len(listed) == 40 and sum(p.endswith(".dcm") for p in listed) >= 25


def _mini_jpegs(mode, count):
    files = sorted(MINI.glob("*/*/*.jpeg")) if MINI.is_dir() else []
    if not files:
        pytest.skip(f"no real images at {MINI}")
    chosen = []
    for path in files:
        with Image.open(path) as image:
            if image.mode == mode:
                chosen.append(path)
        if len(chosen) == count:
            return chosen
    pytest.skip(f"fewer than {count} {mode} JPEGs at {MINI}")


def test_dicom_of_a_real_jpeg_decodes_to_the_jpeg_pixels(tmp_path):
    for jpeg in _mini_jpegs("L", 3):
        with Image.open(jpeg) as image:
            gray = np.asarray(image)
        # Lossless: the JPEG's decoded pixels as 8-bit uncompressed DICOM give the same pixels.
        plain = write_dicom(tmp_path / (jpeg.stem + ".dcm"), gray)
        np.testing.assert_array_equal(decoded(plain), gray)
        np.testing.assert_array_equal(data.decode_image(plain, 64), data.decode_image(jpeg, 64))
        # The JPEG file itself inside DICOM (JPEG baseline, as modalities store it): Pillow
        # decodes it for pydicom, so the pixels are the JPEG's own.
        wrapped = write_encapsulated(
            tmp_path / (jpeg.stem + "-jpeg.dcm"), jpeg.read_bytes(), JPEGBaseline8Bit, gray.shape
        )
        np.testing.assert_array_equal(decoded(wrapped), gray)


def test_dicom_of_a_real_rgb_jpeg_decodes_to_its_colours(tmp_path):
    for jpeg in _mini_jpegs("RGB", 2):
        with Image.open(jpeg) as image:
            rgb = np.asarray(image)
        plain = write_dicom(tmp_path / (jpeg.stem + ".dcm"), rgb, "RGB")
        np.testing.assert_array_equal(data.decode_image(plain, 64), data.decode_image(jpeg, 64))
        wrapped = write_encapsulated(
            tmp_path / (jpeg.stem + "-jpeg.dcm"),
            jpeg.read_bytes(),
            JPEGBaseline8Bit,
            rgb.shape,
            "YBR_FULL_422",
        )
        with data.open_image(wrapped) as image:
            assert image.mode == "RGB"
            assert np.abs(np.asarray(image).astype(int) - rgb).max() <= 2


def test_windowed_12bit_dicom_of_a_real_jpeg_matches_it_closely(tmp_path):
    for jpeg in _mini_jpegs("L", 2):
        with Image.open(jpeg) as image:
            gray = np.asarray(image)
        stored = gray.astype(np.uint16) * 16 + 8  # 12 bits, as a detector stores them
        for photometric in ("MONOCHROME2", "MONOCHROME1"):
            values = stored if photometric == "MONOCHROME2" else 4095 - stored
            path = write_dicom(
                tmp_path / f"{photometric}.dcm",
                values,
                photometric,
                bits_stored=12,
                RescaleSlope=1,
                RescaleIntercept=-1024,
                WindowCenter=1024,
                WindowWidth=4096,
            )
            image = decoded(path).astype(int)
            assert np.abs(image - gray).max() <= 1, (jpeg.name, photometric)
            small = data.decode_image(path, 64).astype(int)
            assert np.abs(small - data.decode_image(jpeg, 64)).max() <= 1
