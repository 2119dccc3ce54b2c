"""Faults a review reproduced (issue 25): each test reproduces one on the code before its fix.

Named pipes with an image name, evaluations of other data, stale staging folders, the demo set
made twice at once, ``--overwrite`` on folders that are no run, failed runs retried, and
``--resume`` with other options.
"""

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import warnings
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
from pneumojax.scoring import gather_image_files

from conftest import TINY_CUT, tiny_train_args


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


def run_state(run):
    from pneumojax.runfolder import run_state  # noqa: PLC0415

    return run_state(run)


def _status(run):
    return json.loads((Path(run) / "status.json").read_text())


# --- 1: --overwrite replaces only a pneumojax run, only once every check has passed -----------


def test_overwrite_refuses_a_folder_that_is_no_run(workspace, tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "config.json").write_text('{"title": "my thesis"}')
    (thesis / "chapters" / "one.tex").write_text("Once upon a time")
    before = _tree(thesis)
    result = _cli(*tiny_train_args(workspace.data, thesis, "--overwrite"))
    assert result.exit_code == 2, result.output
    assert "refusing to replace" in result.output and "lacks plan, environment" in result.output
    assert _tree(thesis) == before


def test_overwrite_refuses_a_run_folder_holding_other_files(workspace, tmp_path):
    run = _copy_run(workspace, tmp_path)
    (run / "notes.txt").write_text("do not lose")
    (run / "drafts").mkdir()
    before = _tree(run)
    result = _cli(*tiny_train_args(workspace.data, run, "--overwrite"))
    assert result.exit_code == 2, result.output
    line = [l for l in result.output.splitlines() if "refusing" in l]
    assert len(line) == 1 and "drafts/, notes.txt" in line[0], result.output
    assert _tree(run) == before


def test_overwrite_with_a_typo_in_data_leaves_the_run_untouched(workspace, tmp_path):
    run = _copy_run(workspace, tmp_path)
    before = _tree(run)
    result = _cli(*tiny_train_args(tmp_path / "no-such-data", run, "--overwrite"))
    assert result.exit_code == 1 and "data folder not found" in result.output, result.output
    assert _tree(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing set aside


def test_a_replacement_that_fails_before_its_first_checkpoint_puts_the_old_run_back(
    workspace, tmp_path, monkeypatch
):
    from pneumojax import run as run_module

    run = _copy_run(workspace, tmp_path)
    before = _tree(run)
    seen = {}

    def failing(*args, **kwargs):  # the new run has started its folder, the old is aside
        seen["aside"] = [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.old-")]
        seen["config"] = json.loads((run / "config.json").read_text())["seed"]
        raise OSError(errno.EIO, "Input/output error", "an image")

    monkeypatch.setattr(run_module, "load_split_arrays", failing)
    result = _cli(*tiny_train_args(workspace.data, run, "--overwrite", "--seed", "7"))
    assert result.exit_code == 1, result.output
    assert seen["aside"] == [f".run.old-{os.getpid()}"] and seen["config"] == 7
    assert "the previous run is back" in result.output
    assert _tree(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --- 3: a run folder says whether it finished, failed or was interrupted ----------------------


# --- 5: a damaged image cache is rebuilt with a warning, never used -------------------------


def test_a_truncated_or_zeroed_image_cache_is_rebuilt_with_a_warning(tmp_path):
    from pneumojax.data import DataWarning, load_images  # noqa: PLC0415

    data = make_demo_dataset(tmp_path / "xray", n_per_class=6, image_size=40, seed=2)
    files = sorted(str(p) for p in data.rglob("*.jpeg"))
    cache = tmp_path / "cache"
    fresh = np.array(load_images(files, 32, cache_dir=cache, progress=False))
    (cache_file,) = cache.glob("images-*.npy")
    assert fresh.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole cache is used without a word
        np.testing.assert_array_equal(
            load_images(files, 32, cache_dir=cache, progress=False), fresh
        )
    whole = cache_file.read_bytes()
    damages = {
        "unreadable": whole[: len(whole) // 2],  # truncated: numpy's mmap would fail for ever
        "do not match": whole[:128] + bytes(len(whole) - 128),  # pixels zeroed: black images
    }
    for reason, damaged in damages.items():
        cache_file.write_bytes(damaged)
        with pytest.warns(DataWarning, match=f"image cache .* is damaged .*{reason}"):
            again = load_images(files, 32, cache_dir=cache, progress=False)
        np.testing.assert_array_equal(again, fresh)
        assert cache_file.read_bytes() == whole  # rebuilt in place
    cache_file.with_name(cache_file.name + ".sha256").unlink()
    with pytest.warns(DataWarning, match="no checksum beside it"):
        np.testing.assert_array_equal(
            load_images(files, 32, cache_dir=cache, progress=False), fresh
        )


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_a_truncated_or_zeroed_activation_cache_is_rebuilt_with_a_warning(tmp_path, storage):
    from pneumojax.data import DataWarning  # noqa: PLC0415
    from pneumojax.features import DIGESTS, cached_activations  # noqa: PLC0415

    prefix = SimpleNamespace(
        backbone=SimpleNamespace(dtype=np.float32, outputs=("x",)),
        preprocess_mode="torch",
        intensity="none",
        apply=None,
    )
    runs = []

    def run_batches(fn, variables, inputs, batch_size, sink):
        runs.append(1)
        sink(0, len(inputs), {"x": inputs.astype(np.float32) + 1.5})

    images = np.arange(4 * 64, dtype=np.uint8).reshape(4, 8, 8)
    cache = tmp_path / "features"

    def scored():
        got = cached_activations(prefix, {}, images, "k", cache, 4, run_batches, storage)
        return np.array(got["x"], np.float32)  # a copy: the test overwrites the file

    fresh = scored()
    (folder,) = cache.iterdir()
    whole = (folder / "x.npy").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole cache is used without a word, not recomputed
        np.testing.assert_array_equal(scored(), fresh)
    assert len(runs) == 1
    damages = {
        "unreadable": whole[: len(whole) // 2],  # truncated: numpy's mmap fails for ever
        "does not match": whole[:128] + bytes(len(whole) - 128),  # zeroed: trains on zeros
    }
    for reason, damaged in damages.items():
        (folder / "x.npy").write_bytes(damaged)
        with pytest.warns(DataWarning, match=f"activation cache .* is damaged .*{reason}"):
            np.testing.assert_array_equal(scored(), fresh)
        assert (folder / "x.npy").read_bytes() == whole  # rebuilt in place
    (folder / DIGESTS).unlink()
    with pytest.warns(DataWarning, match="no checksum in it"):
        np.testing.assert_array_equal(scored(), fresh)
    assert len(runs) == 4 and [p.name for p in cache.iterdir()] == [folder.name]


# --- 7: two processes never write one run folder -------------------------------------------


def test_a_run_being_written_by_another_process_is_refused(workspace, tmp_path):
    import socket  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    run = _copy_run(workspace, tmp_path)
    other = subprocess.Popen(["sleep", "60"])  # stands for a train still writing the folder
    try:
        record = {
            "state": "running",
            "error": None,
            "pid": other.pid,
            "host": socket.gethostname(),
            "time": "2026-01-01T00:00:00+00:00",
        }
        (run / "status.json").write_text(json.dumps(record))
        before = _tree(run)
        for args in (
            ["train", "--out", run, "--resume"],
            tiny_train_args(workspace.data, run, "--overwrite"),
            tiny_train_args(workspace.data, run),
        ):
            result = _cli(*args)
            assert result.exit_code == 2, (args, result.output)
            assert f"another pneumojax process (pid {other.pid}" in result.output, result.output
        assert _tree(run) == before
    finally:
        other.kill()
        other.wait()
    # its process gone, the same folder is an interrupted run again, resumable
    assert run_state(run) == "interrupted"
    from pneumojax.runfolder import writer  # noqa: PLC0415

    assert writer(run) is None


def test_a_finished_run_says_so(workspace):
    assert _status(workspace.run)["state"] == "finished"
    assert run_state(workspace.run) == "finished"


def test_run_folders_without_a_status_keep_their_meaning(workspace, tmp_path):
    run = _copy_run(workspace, tmp_path)
    (run / "status.json").unlink()  # as a run made before status.json
    assert run_state(run) == "finished"
    (run / "metrics.json").unlink()
    assert run_state(run) == "interrupted"
    assert run_state(tmp_path / "nothing") == "new"


def test_a_failed_run_is_retried_by_the_same_command(workspace, tmp_path, monkeypatch):
    from pneumojax import balance
    from pneumojax import runfolder

    run = tmp_path / "run"
    args = tiny_train_args(workspace.data, run, epochs=1)
    with monkeypatch.context() as m:
        m.setattr(balance, "apply_balance", _raise(ValueError("the balance went wrong\nmore")))
        failed = _cli(*args)
    assert failed.exit_code == 1 and "the balance went wrong" in failed.output
    status = _status(run)
    assert status["state"] == "failed"
    assert status["error"] == "ValueError: the balance went wrong"
    assert run_state(run) == "failed"

    commits = []
    commit = runfolder.Replacement.commit

    def watched(self):  # the failed run stays aside until the new one has its checkpoint
        if self.aside is not None:
            commits.append((self.aside.exists(), runfolder.has_checkpoint(self.run_dir)))
        commit(self)

    monkeypatch.setattr(runfolder.Replacement, "commit", watched)
    retried = _cli(*args)  # the same command, no --overwrite
    assert retried.exit_code == 0, retried.output
    assert "holds a failed run (ValueError: the balance went wrong)" in retried.output
    assert commits[0] == (True, True)
    assert _status(run)["state"] == "finished"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    again = _cli(*args)  # a finished run is still not replaced without --overwrite
    assert again.exit_code == 2 and "already holds a run (finished)" in again.output


def _raise(error):
    def fail(*args, **kwargs):
        raise error

    return fail


def test_ctrl_c_outside_the_epochs_is_recorded_and_reported(workspace, tmp_path, monkeypatch):
    from pneumojax import balance

    run = tmp_path / "run"
    monkeypatch.setattr(balance, "apply_balance", _raise(KeyboardInterrupt()))
    result = _cli(*tiny_train_args(workspace.data, run, epochs=1))
    assert result.exit_code == 130, result.output
    assert f"continue with: pneumojax train --out {run} --resume" in result.output
    assert _status(run)["state"] == "interrupted" and run_state(run) == "interrupted"


def test_a_study_restarts_a_failed_experiment_with_its_config_of_now(tmp_path, monkeypatch):
    from test_study import _study

    from pneumojax import balance
    from pneumojax.experiments import load_study
    from pneumojax.study import run_folder_state, run_study

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    data = make_demo_dataset(tmp_path / "xray", n_per_class=30, image_size=48, seed=1)
    spec, out = load_study(_study(tmp_path)), tmp_path / "study"
    with monkeypatch.context() as m:
        m.setattr(balance, "apply_balance", _raise(ValueError("out of luck")))
        first = run_study(spec, out, {"data": str(data)}, only=["plain"], log=lambda m: None)
    assert [o.status for o in first] == ["failed"] and run_folder_state(out / "plain") == "failed"
    assert json.loads((out / "plain" / "config.json").read_text())["seed"] == 0
    second = run_study(
        spec, out, {"data": str(data), "seed": 4}, only=["plain"], log=lambda m: None
    )
    assert [o.status for o in second] == ["restarted"], second
    assert run_folder_state(out / "plain") == "finished"
    config = json.loads((out / "plain" / "config.json").read_text())
    assert config["seed"] == 4 and config["experiment"]["name"] == "plain"


# --- 8: a study reruns a finished experiment whose options changed since -------------------


def test_a_study_reruns_a_finished_experiment_whose_options_changed(tmp_path, monkeypatch):
    from test_study import _study

    from pneumojax.experiments import load_study
    from pneumojax.study import changed_options, run_study

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    data = make_demo_dataset(tmp_path / "xray", n_per_class=30, image_size=48, seed=1)
    spec, out = load_study(_study(tmp_path)), tmp_path / "study"
    quiet = lambda m: None  # noqa: E731
    first = run_study(spec, out, {"data": str(data)}, only=["plain"], log=quiet)
    assert [o.status for o in first] == ["done"], first
    same = run_study(spec, out, {"data": str(data)}, only=["plain"], log=quiet)
    assert [o.status for o in same] == ["skipped"], same  # nothing changed: nothing retrained
    changed = run_study(spec, out, {"data": str(data), "seed": 4}, only=["plain"], log=quiet)
    assert [o.status for o in changed] == ["rerun, its options changed: seed 0 -> 4"], changed
    config = json.loads((out / "plain" / "config.json").read_text())
    assert config["seed"] == 4 and config["experiment"]["name"] == "plain"
    assert run_state(out / "plain") == "finished"
    assert not list(tmp_path.glob("study/.plain.old-*"))  # the old run went once replaced
    from pneumojax.config import TrainConfig  # noqa: PLC0415

    cfg = TrainConfig(**{k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__})
    assert changed_options(out / "plain", cfg) == []
    moved = tmp_path / "elsewhere"
    shutil.copytree(data, moved)
    cfg.data = str(moved)
    assert changed_options(out / "plain", cfg) == [f"data {str(data)!r} -> {str(moved)!r}"]
    # An experiment that names no cut asks for the backbone's default, which the run stored:
    # no change (every finished experiment of such a study was retrained by each rerun).
    cfg.data = str(data)
    stored = out / "plain" / "config.json"
    default = json.loads(stored.read_text())
    default["cut"] = "conv5_block15_1_relu"  # densenet121's default cut, as a run stores it
    stored.write_text(json.dumps(default))
    assert changed_options(out / "plain", dataclasses.replace(cfg, cut=None)) == []
    assert changed_options(out / "plain", dataclasses.replace(cfg, cut=TINY_CUT)) == [
        f"cut 'conv5_block15_1_relu' -> {TINY_CUT!r}"
    ]


# --- 4: --resume takes --epochs and --patience, and refuses every other option by name --------


def test_resume_refuses_other_options_by_name(workspace, tmp_path):
    run = _copy_run(workspace, tmp_path)
    before = _tree(run)
    for extra, names in (
        (
            ["--lr", "0.1", "--batch-size", "4"],
            "--lr 0.1 (the run's: 0.001), --batch-size 4 (the run's: 8) cannot change",
        ),
        (["--no-feature-cache"], "--no-feature-cache (the run's: True) cannot change"),
        (["--overwrite"], "--overwrite cannot change"),
        (["--data", tmp_path, "--epochs", "3"], f"--data {tmp_path} (the run's: "),
    ):
        result = _cli("train", "--out", run, "--resume", *extra)
        assert result.exit_code == 2, result.output
        assert names in result.output and "only --epochs and --patience" in result.output
    assert _tree(run) == before
    # the command that started the run, plus --resume: its options are the run's own
    same = _cli(*tiny_train_args(workspace.data, run, "--resume", epochs=1))
    assert same.exit_code == 0 and "cannot change" not in same.output, same.output


def test_resume_dry_run_prints_the_stored_plan(workspace, tmp_path):
    run = _copy_run(workspace, tmp_path)
    before = _tree(run)
    result = _cli("train", "--out", run, "--resume", "--dry-run", "--epochs", "4")
    assert result.exit_code == 0, result.output
    assert f"cut={TINY_CUT} input_size=32" in result.output
    assert "--epochs 4 (was 1), --patience 5" in result.output
    assert _tree(run) == before
    missing = _cli("train", "--out", tmp_path / "none", "--resume", "--dry-run")
    assert missing.exit_code == 1 and "holds no run to continue" in missing.output


def test_resume_with_more_epochs_continues_training(workspace, tmp_path):
    run = _copy_run(workspace, tmp_path)
    result = _cli("train", "--out", run, "--resume", "--epochs", "3", "--patience", "9")
    assert result.exit_code == 0, result.output
    assert "--epochs 3 (was 1), --patience 9 (was 5)" in result.output
    history = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 3 and config["patience"] == 9
    assert config["resume_changes"] == [{"epochs": [1, 3], "patience": [5, 9]}]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"]["epochs_run"] == 3 and _status(run)["state"] == "finished"
    fewer = _cli("train", "--out", run, "--resume", "--epochs", "2")
    assert fewer.exit_code == 2 and "already trained 3 epochs" in fewer.output


def test_a_resumed_run_ends_by_the_patience_it_has_now():
    from pneumojax.config import FitOptions
    from pneumojax.train import EarlyStopping, Progress, _continue_with

    def progress():  # stopped early: no improvement for 3 epochs after epoch 2
        stopping = EarlyStopping([0.5], [2], [3])
        return Progress(epoch=5, stopping=stopping, stopped_early=True, finished=True)

    same = progress()
    _continue_with(same, FitOptions(epochs=20, patience=3), print)
    assert same.finished and same.stopped_early
    more = progress()
    _continue_with(more, FitOptions(epochs=20, patience=10), lambda m: None)
    assert not more.finished and not more.stopped_early
    ended = progress()
    _continue_with(ended, FitOptions(epochs=5, patience=10), print)
    assert ended.finished and not ended.stopped_early


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


# --- 10: no traceback from a bad augmentation file, Ctrl-C in a study, compare on odd runs -----


def _error_lines(output):
    return [line for line in output.splitlines() if line.startswith("error:") or "Error:" in line]


@pytest.mark.parametrize(
    "text",
    [
        "{{{ not: yaml",  # not YAML
        "a: 1\n",  # YAML, but no pipeline
        "transform:\n  __class_fullname__: NoSuchTransform\n",  # an unknown transform
    ],
)
def test_a_bad_augmentation_file_is_a_usage_error_before_anything_is_written(
    workspace, tmp_path, text
):
    spec = tmp_path / "augment.yaml"
    spec.write_text(text)
    run = tmp_path / "run"
    result = _cli(
        *tiny_train_args(workspace.data, run, "--balance", "oversample", "--augment", spec)
    )
    assert result.exit_code == 2, result.output
    lines = _error_lines(result.output)
    assert len(lines) == 1 and f"--augment {spec}" in lines[0], result.output
    assert not run.exists()


def test_ctrl_c_in_a_study_outside_the_epochs_says_how_to_continue(tmp_path, monkeypatch):
    from test_study import _study

    from pneumojax import study

    monkeypatch.setattr(study, "check_plan", _raise(KeyboardInterrupt()))
    result = _cli("study", _study(tmp_path), "--data", tmp_path, "--out", tmp_path / "s")
    assert result.exit_code == 130, result.output
    assert "continue with the same pneumojax study command" in result.output


def test_compare_on_runs_without_figures_is_a_one_line_error(workspace, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    (unfinished / "metrics.json").write_text('{"balance": {"method": "none"}}')
    result = _cli("compare", workspace.run, unfinished, "--out", tmp_path / "c.png")
    assert result.exit_code == 1, result.output
    lines = _error_lines(result.output)
    assert len(lines) == 1 and "unfinished" in lines[0] and "threshold" in lines[0], lines
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    result = _cli("compare", workspace.run, a_file, "--out", tmp_path / "c.png")
    assert result.exit_code == 1 and len(_error_lines(result.output)) == 1, result.output
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "metrics.json").write_text('{"n": 3, "thr')
    result = _cli("compare", workspace.run, truncated, "--out", tmp_path / "c.png")
    assert result.exit_code == 1 and len(_error_lines(result.output)) == 1, result.output
