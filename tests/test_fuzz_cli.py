"""A property-based fuzz of the command line (issue 25): random trees of files (valid, empty,
truncated and mislabelled images, text files, FIFOs, symbolic-link loops, DICOM without pixel
data or in a transfer syntax with no decoder, one class, nested and Kaggle layouts) and random
option sets for train, evaluate, predict and explain. Every case must end in exit 0, 1 or 2
with no traceback, and nothing outside ``--out`` and the cache may change.

Bounded for the suite (a fixed number of examples, derandomized so CI is repeatable);
``make fuzz`` runs a longer, random profile (``PNEUMOJAX_FUZZ_EXAMPLES``,
``PNEUMOJAX_FUZZ_RANDOM=1``).
"""

import hashlib
import io
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import JPEG2000Lossless

from pneumojax.cli import main

from conftest import TINY_CUT, TINY_MID, tiny_train_args
from test_dicom import write_dicom, write_encapsulated

EXAMPLES = int(os.environ.get("PNEUMOJAX_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(
    max_examples=EXAMPLES or 10,
    deadline=None,
    derandomize=not os.environ.get("PNEUMOJAX_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
KINDS = (
    "png",
    "jpeg",
    "png16",
    "empty",
    "truncated",
    "text_as_png",
    "txt",
    "fifo",
    "dicom",
    "dicom_no_pixels",
    "dicom_no_codec",
    "dicom_truncated",
)
LAYOUTS = ("flat", "kaggle", "one_class", "nested")


def _image(seed: int, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((size, size)) * 255).astype(np.uint8)


def _write(path: Path, kind: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = _image(seed)
    if kind in ("png", "jpeg", "png16", "truncated"):
        name = path.with_suffix(".jpeg" if kind == "jpeg" else ".png")
        image = Image.fromarray(pixels.astype(np.uint16) * 200 if kind == "png16" else pixels)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG" if kind == "jpeg" else "PNG")
        data = buffer.getvalue()
        name.write_bytes(data[: len(data) // 2] if kind == "truncated" else data)
    elif kind == "empty":
        path.with_suffix(".png").write_bytes(b"")
    elif kind == "text_as_png":
        path.with_suffix(".png").write_text("not an image\n")
    elif kind == "txt":
        path.with_suffix(".txt").write_text("notes\n")
    elif kind == "fifo":
        os.mkfifo(path.with_suffix(".png"))
    elif kind == "dicom":
        write_dicom(path.with_suffix(".dcm"), pixels.astype(np.uint16) * 16, bits_stored=12)
    elif kind == "dicom_no_codec":
        write_encapsulated(path.with_suffix(".dcm"), b"\x00" * 64, JPEG2000Lossless, (8, 8))
    elif kind == "dicom_truncated":
        good = write_dicom(path.with_suffix(".dcm"), pixels)
        good.write_bytes(good.read_bytes()[:-300])
    elif kind == "dicom_no_pixels":
        good = write_dicom(path.with_suffix(".dcm"), pixels)
        from pydicom import dcmread  # noqa: PLC0415

        ds = dcmread(good)
        del ds.PixelData
        ds.save_as(good)


@st.composite
def trees(draw):
    layout = draw(st.sampled_from(LAYOUTS))
    kinds = st.lists(st.sampled_from(KINDS), max_size=7)
    # mostly valid images, so that some cases get as far as training
    valid = st.lists(st.sampled_from(("png", "jpeg", "dicom")), min_size=0, max_size=10)
    classes = ("NORMAL",) if layout == "one_class" else ("NORMAL", "PNEUMONIA")
    splits = ("train", "test") if layout == "kaggle" else ("",)
    files = {(split, cls): draw(valid) + draw(kinds) for split in splits for cls in classes}
    return layout, files, draw(st.booleans())


def _build(root: Path, tree) -> Path:
    layout, files, loop = tree
    folder = root / "data"
    base = folder / "extra" if layout == "nested" else folder
    base.mkdir(parents=True)
    for (split, cls), kinds in files.items():
        for i, kind in enumerate(kinds):
            _write(base / split / cls / f"IM-{i:04d}-0001", kind, hash((split, cls, i)) % 2**16)
    if loop:
        (base / "loop").symlink_to(base, target_is_directory=True)
    return folder


def _tree_digest(root: Path, skip: tuple[str, ...]) -> dict:
    """Every entry under ``root`` (names, kinds, bytes of regular files; links not followed)
    outside the folders named in ``skip``."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root)
        if rel.parts and rel.parts[0] in skip:
            dirnames[:] = []
            continue
        for name in filenames + dirnames:
            if not rel.parts and name in skip:
                continue
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            key = str(rel / name)
            if stat.S_ISREG(mode):
                seen[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                seen[key] = stat.S_IFMT(mode)
    return seen


def _check(result, root: Path, before: dict):
    event(f"exit {result.exit_code}")  # pytest --hypothesis-show-statistics shows the spread
    assert result.exit_code in (0, 1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    )
    assert "Traceback" not in result.output, result.output
    assert _tree_digest(root, ("out", "cache")) == before


TRAIN_OPTIONS = st.lists(
    st.sampled_from(
        (
            ("--balance", "undersample"),
            ("--balance", "ensemble"),
            ("--balance", "oversample"),
            ("--val-fraction", "0.3"),
            ("--val-fraction", "1.5"),
            ("--test-fraction", "0.0"),
            ("--seed-ensemble", "2"),
            ("--trainable", TINY_MID),
            ("--trainable", "no_such_layer"),
            ("--image-size", "8"),
            ("--strict",),
            ("--device-augment", "light"),
            ("--device-augment", "blur=x"),
            ("--tta", "2"),
            ("--no-feature-cache",),
            ("--epochs", "0"),
            ("--batch-size", "3"),
        )
    ),
    max_size=3,
    unique=True,
)


@FUZZ
@given(tree=trees(), options=TRAIN_OPTIONS)
def test_train_on_any_tree_with_any_options_ends_cleanly(tree, options, monkeypatch):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        monkeypatch.setenv("PNEUMOJAX_CACHE", str(root / "cache"))
        data = _build(root, tree)
        before = _tree_digest(root, ("out", "cache"))
        args = tiny_train_args(data, root / "out", epochs=1)
        result = CliRunner().invoke(main, args + [a for option in options for a in option])
        _check(result, root, before)


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's tiny finished run (tests/conftest.py), scored on every fuzz tree."""
    return tiny_run


SCORING = st.sampled_from(
    (
        ("evaluate", "--split", "all"),
        ("evaluate", "--split", "test"),
        ("evaluate", "--split", "all", "--explain", "2"),
        ("predict",),
        ("predict", "--json"),
        ("predict", "--tta", "2"),
        ("explain",),
        ("explain", "--layer", "no_such_layer"),
    )
)


@FUZZ
@given(tree=trees(), command=SCORING, name=st.sampled_from(("data", "file", "missing")))
def test_scoring_any_tree_ends_cleanly(trained, tree, command, name, monkeypatch):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        monkeypatch.setenv("PNEUMOJAX_CACHE", str(root / "cache"))
        data = _build(root, tree)
        before = _tree_digest(root, ("out", "cache"))
        target = data
        if name == "file":
            target = next((p for p in sorted(data.rglob("*")) if p.is_file()), data)
        elif name == "missing":
            target = data / "no_such_file.png"
        verb, *rest = command
        args = [verb, "--run", str(trained), *rest]
        if verb == "evaluate":
            args += ["--data", str(target), "--out", str(root / "out" / "metrics.json")]
        elif verb == "explain":
            args += [str(target), "--out", str(root / "out")]
        else:
            args += [str(target)]
        _check(CliRunner().invoke(main, args), root, before)


def test_the_fuzz_trees_hold_what_they_say(tmp_path):
    """The generator's own check: each kind of file is written as intended."""
    files = {("", "NORMAL"): list(KINDS), ("", "PNEUMONIA"): ["png"]}
    folder = _build(tmp_path, ("flat", files, True))
    names = {p.name: p for p in (folder / "NORMAL").iterdir()}
    assert stat.S_ISFIFO(os.lstat(names["IM-0007-0001.png"]).st_mode)
    assert names["IM-0003-0001.png"].stat().st_size == 0
    assert (folder / "loop").is_symlink()
    assert len(names) == len(KINDS)
    assert TINY_CUT in " ".join(tiny_train_args(folder))


def test_an_undecodable_dicom_shows_one_line_not_pydicoms_traceback(trained, tmp_path):
    """Found by this fuzz: pydicom logged a traceback for each undecodable frame to the user's
    terminal, above pneumojax's own one-line reason (only a real process shows it: pytest
    captures logging)."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    _write(tmp_path / "IM-0001-0001", "dicom_no_codec", 0)
    done = subprocess.run(
        [sys.executable, "-m", "pneumojax", "predict", "--run", str(trained)]
        + [str(tmp_path / "IM-0001-0001.dcm")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "skipped 1 unreadable image" in done.stderr and "pip install" in done.stderr
