"""Faults a review reproduced (issue 25): each test reproduces one on the code before its fix.

Named pipes with an image name, evaluations of other data, stale staging folders, the demo set
made twice at once, ``--overwrite`` on folders that are no run, failed runs retried, and
``--resume`` with other options.
"""

import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from pneumojax.data import find_images
from pneumojax.inference import gather_image_files


def _png(path, value=128, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8), "L").save(path)


def _returns_within(fn, seconds=20.0):
    """``fn()``'s result, or a failure if it blocks (a reader stuck on a named pipe); a stuck
    reader is released by opening its pipes for writing (the test's cleanup)."""
    result, error = [], []

    def target():
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001
            error.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive(), result, error


def _release(*fifos):
    """Opens each pipe for writing and closes it while a reader waits on it: a reader blocked
    on it gets end of file."""
    for fifo in fifos:
        for _ in range(100):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: no reader (left)
                break
            time.sleep(0.05)


@pytest.fixture
def fifo_folder(tmp_path):
    folder = tmp_path / "images"
    _png(folder / "a.png")
    _png(folder / "sub" / "b.png", 90)
    os.mkfifo(folder / "pipe.png")
    os.mkfifo(folder / "sub" / "pipe.jpeg")
    yield folder
    _release(folder / "pipe.png", folder / "sub" / "pipe.jpeg")


def test_a_named_pipe_with_an_image_name_is_skipped_not_read(fifo_folder):
    lines = []
    stuck, result, error = _returns_within(
        lambda: gather_image_files([str(fifo_folder)], lines.append)
    )
    assert not stuck, "gather_image_files blocked on a named pipe"
    assert not error, error
    assert result[0] == [str(fifo_folder / "a.png"), str(fifo_folder / "sub" / "b.png")]
    warning = [line for line in lines if "not a regular file" in line]
    assert len(warning) == 1 and "pipe.png" in warning[0] and "2 paths" in warning[0]


def test_a_named_pipe_given_by_name_is_skipped_with_a_warning(fifo_folder):
    lines = []
    stuck, result, error = _returns_within(
        lambda: gather_image_files(
            [str(fifo_folder / "pipe.png"), str(fifo_folder / "a.png")], lines.append
        )
    )
    assert not stuck and not error, error
    assert result[0] == [str(fifo_folder / "a.png")]
    assert any("not a regular file" in line and "pipe.png" in line for line in lines)


def test_a_named_pipe_in_a_class_folder_is_never_opened(tmp_path):
    root = tmp_path / "flat"
    for k, name in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(3):
            _png(root / name / f"IM-{k}{i}.png", 40 * i + 20 * k + 10)
    os.mkfifo(root / "NORMAL" / "pipe.png")
    warnings = []
    try:
        stuck, result, error = _returns_within(
            lambda: find_images(root, warn=warnings.append, workers=1)
        )
    finally:
        _release(root / "NORMAL" / "pipe.png")
    assert not stuck and not error, error
    paths = [p for p, _ in result[0].items]
    assert len(paths) == 6 and not any("pipe" in os.path.basename(p) for p in paths)
    assert any("not a regular file" in w and "pipe.png" in w for w in warnings), warnings
