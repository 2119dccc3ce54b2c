"""Faults a review reproduced (issue 25): each test reproduces one on the code before its fix.

Named pipes with an image name, evaluations of other data, stale staging folders, the demo set
made twice at once.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pneumojax.cli import main
from pneumojax.data import find_images, make_demo_dataset
from pneumojax.inference import gather_image_files

from conftest import tiny_train_args


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


# --- 12: staging folders a killed save left; the demo set made twice at once -------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale(path, pid, age_s=7200.0, folder=True):
    """A staging entry of process ``pid``, last changed ``age_s`` seconds ago."""
    if folder:
        (path / "variables").mkdir(parents=True)
        (path / "variables" / "part").write_bytes(b"x" * 100)
        inner = [path / "variables" / "part", path / "variables", path]
    else:
        path.write_bytes(b"x" * 100)
        inner = [path]
    when = time.time() - age_s
    for p in inner:
        os.utime(p, (when, when))
    return path


def test_a_killed_checkpoint_save_is_cleaned_up_by_the_next_save(tmp_path):
    from pneumojax.checkpoint import load_variables, save_variables

    dead = _dead_pid()
    killed = _stale(tmp_path / f".model.tmp{dead}", dead)
    alive = _stale(tmp_path / f".model.tmp{os.getppid()}", os.getppid())  # a live process's
    dead2 = _dead_pid()
    recent = _stale(tmp_path / f".model.tmp{dead2}", dead2, age_s=5)  # changed just now
    other = _stale(tmp_path / f".other.tmp{dead}", dead)  # another folder's: not this save's
    save_variables(tmp_path / "model", {"params": {"w": np.ones(3, np.float32)}}, {"k": 1})
    assert not killed.exists()
    assert alive.exists() and other.exists() and recent.exists()
    variables, manifest = load_variables(tmp_path / "model")
    assert manifest == {"k": 1} and variables["params"]["w"].tolist() == [1, 1, 1]


def test_a_killed_activation_cache_write_is_cleaned_up_by_the_next_one(tmp_path):
    from pneumojax.features import cached_activations

    cache = tmp_path / "features"
    cache.mkdir()
    dead = _dead_pid()
    killed = _stale(cache / f"{'ab' * 12}.tmp{dead}", dead)
    prefix = SimpleNamespace(
        backbone=SimpleNamespace(dtype=np.float32, outputs=("x",)),
        preprocess_mode="torch",
        intensity="none",
        apply=None,
    )

    def run_batches(fn, variables, inputs, batch_size, sink):
        sink(0, len(inputs), {"x": inputs.astype(np.float32) / 2})

    images = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    got = cached_activations(prefix, {}, images, "key", cache, 2, run_batches)
    np.testing.assert_array_equal(got["x"], images / 2)
    assert not killed.exists()
    assert [p.name for p in cache.iterdir() if ".tmp" in p.name] == []


def test_two_demo_sets_made_at_once_never_replace_a_finished_one(tmp_path, monkeypatch):
    from pneumojax.data import demo

    out = tmp_path / "demo"
    started, go = threading.Event(), threading.Event()
    write = demo._write_demo_images
    calls = []

    def slow_first(folder, *args):
        calls.append(folder)
        if len(calls) == 1:  # the first maker stops half-way until told to go on
            started.set()
            assert go.wait(30)
        write(folder, *args)

    monkeypatch.setattr(demo, "_write_demo_images", slow_first)
    seen = {}

    def make(name):
        folder = demo.make_demo_dataset(out, n_per_class=6, image_size=16, seed=3)
        seen[name] = (folder.stat().st_ino, sorted(p.name for p in folder.rglob("*")))

    first = threading.Thread(target=make, args=("first",))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=make, args=("second",))
    second.start()
    second.join(1.0)  # it waits for the first (or, unlocked, makes its own set meanwhile)
    go.set()
    first.join(60)
    second.join(60)
    final = (out.stat().st_ino, sorted(p.name for p in out.rglob("*")))
    assert len(final[1]) == 2 + 2 * 6 + 2  # NORMAL/, PNEUMONIA/, 12 images, 2 notes
    assert seen["first"] == final and seen["second"] == final  # nobody replaced a set in use
    assert len(calls) == 1  # made once, reused by the second
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --- runs: a finished tiny run shared by the tests below (each changes its own copy) -----------


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMOJAX_CACHE", str(root / "cache"))
        data = make_demo_dataset(root / "xray", n_per_class=40, image_size=48, seed=1)
        run = root / "run"
        result = _cli(*tiny_train_args(data, run, epochs=1))
        assert result.exit_code == 0, result.output
        yield SimpleNamespace(root=root, data=data, run=run)


def _copy_run(workspace, tmp_path, name="run"):
    copy = tmp_path / name
    shutil.copytree(workspace.run, copy, symlinks=True)
    return copy


def _tree(folder):
    """Every file under ``folder`` with its bytes' digest: what must stay as it was."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


# --- 11: evaluate on other data never replaces the run's own evaluation ------------------------


def _kaggle_copy(source, folder, per_class=4):
    """A Kaggle-layout folder (train/, test/) of a few images of ``source``."""
    for split in ("train", "test"):
        for name in ("NORMAL", "PNEUMONIA"):
            (folder / split / name).mkdir(parents=True)
            files = sorted((source / name).iterdir())
            offset = 0 if split == "train" else per_class
            for f in files[offset : offset + per_class]:
                shutil.copy(f, folder / split / name / f.name)
    return folder


def test_evaluating_other_data_keeps_the_runs_own_evaluation(workspace, tmp_path):
    run = _copy_run(workspace, tmp_path)
    own = _cli("evaluate", "--run", run, "--split", "test")
    assert own.exit_code == 0, own.output
    before = _tree(run / "eval-test")
    other = _kaggle_copy(
        make_demo_dataset(tmp_path / "gen", n_per_class=8, image_size=40, seed=5),
        tmp_path / "hospital b",
    )
    result = _cli("evaluate", "--run", run, "--data", other, "--split", "test")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval-test-hospital_b" / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["data"] == str(other)
    assert _tree(run / "eval-test") == before  # the run's own test evaluation, as it was
    # the run's own folder given as --data is the run's own data
    mine = _cli("evaluate", "--run", run, "--data", workspace.data, "--split", "all")
    assert mine.exit_code == 0, mine.output
    assert (run / "eval-all" / "metrics.json").exists()
    assert sorted(p.name for p in run.glob("eval-*")) == [
        "eval-all",
        "eval-test",
        "eval-test-hospital_b",
    ]
