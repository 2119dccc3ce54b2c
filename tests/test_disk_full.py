"""A full disk (issue 25, item 2): the decoded-image and activation caches are written through
memory maps, and a store into a page the disk has no room for killed the process with SIGBUS
("Bus error", exit 135), leaving ``*.tmp`` files. Now the space is checked and the blocks are
allocated before a cache is written: "not enough space in CACHE: N needed, M free", exit 1,
the partial files removed, the run folder marked failed and retried by the same command."""

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax import io as pj_io
from pneumojax.cli import main
from pneumojax.data import load_images, make_demo_dataset
from pneumojax.features import cached_activations
from pneumojax.io import NoSpaceError

from conftest import tiny_train_args


def _leftovers(folder):
    return [str(p) for p in Path(folder).rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("xray"), n_per_class=20, image_size=48, seed=3)


def _paths(folder):
    files = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix in (".png", ".jpeg"))
    assert len(files) == 40
    return files


def _free(monkeypatch, free):
    real = shutil.disk_usage
    monkeypatch.setattr(
        pj_io.shutil, "disk_usage", lambda p: real(p)._replace(free=free), raising=True
    )


def test_an_image_cache_that_does_not_fit_is_refused_before_it_is_written(
    images, tmp_path, monkeypatch
):
    _free(monkeypatch, 10_000)
    with pytest.raises(
        NoSpaceError,
        match=r"not enough space in .*cache: 0\.1 MB needed, 0\.0 MB free; free some space",
    ):
        load_images(_paths(images), 32, cache_dir=tmp_path / "cache", progress=False)
    assert _leftovers(tmp_path) == [] and not list((tmp_path / "cache").glob("*.npy"))


def test_a_disk_that_fills_while_allocating_is_an_error_not_a_bus_error(
    images, tmp_path, monkeypatch
):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pj_io.os, "posix_fallocate", full)
    with pytest.raises(NoSpaceError) as caught:
        load_images(_paths(images), 32, cache_dir=tmp_path / "cache", progress=False)
    assert caught.value.errno == errno.ENOSPC and caught.value.needed >= 40 * 32 * 32 * 3
    assert _leftovers(tmp_path) == []


def test_an_activation_cache_that_does_not_fit_leaves_nothing(tmp_path, monkeypatch):
    prefix = SimpleNamespace(
        backbone=SimpleNamespace(dtype=np.float32, outputs=("x", "y")),
        preprocess_mode="torch",
        intensity="none",
        apply=None,
    )
    calls = []

    def run_batches(fn, variables, inputs, batch_size, sink):
        for start in range(0, len(inputs), 2):
            calls.append(start)
            chunk = inputs[start : start + 2].astype(np.float32)
            sink(start, start + len(chunk), {"x": chunk, "y": chunk[:, :1]})

    data = np.ones((6, 4, 4), np.uint8)
    _free(monkeypatch, 6 * 16 * 4)  # room for "x" alone, not for both
    with pytest.raises(NoSpaceError, match=r"needed"):
        cached_activations(prefix, {}, data, "key", tmp_path / "features", 2, run_batches)
    assert calls == [0]  # refused at the first batch, before any more work
    assert list((tmp_path / "features").iterdir()) == []
    monkeypatch.undo()
    got = cached_activations(prefix, {}, data, "key", tmp_path / "features", 2, run_batches)
    np.testing.assert_array_equal(got["x"], data.astype(np.float32))


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
    )
    return done.returncode == 0


def test_train_on_a_real_full_disk_fails_in_one_line_and_retries(images, tmp_path, monkeypatch):
    """On a 1 MB tmpfs (where the machine lets root mount one): the decoded images fit, the
    activations do not."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        monkeypatch.setenv("PNEUMOJAX_CACHE", str(small))
        run = tmp_path / "run"
        args = tiny_train_args(images, run, epochs=1)
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("error: not enough space in ") and "MB needed" in last
        assert str(small) in last and _leftovers(small) == []
        assert json.loads((run / "status.json").read_text())["state"] == "failed"
        monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "big"))
        retried = CliRunner().invoke(main, args)  # the same command, no --overwrite
        assert retried.exit_code == 0, retried.output
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)  # lazily: maps may be open
