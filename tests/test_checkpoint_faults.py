"""A kill at every stage of a checkpoint save, then resume: the run ends as if never stopped.

Every orbax save and delete is watched at each of its stages: before anything is written,
with the temporary folder written (before its rename), just renamed, save returned, before a
delete, halfway through a delete, after it. At each stage the run folder is copied exactly as
a kill -9 at that instant would leave it on disk (saves are synchronous, so nothing else is
being written meanwhile; a half-done delete is made by deleting every other file), and a
resume from that copy must end with the same best weights, history and early-stopping record
as the uninterrupted run. One more test kills a real process (``os._exit``) inside a save and
compares ``metrics.json`` of the resumed CLI run with an uninterrupted one.

The runs train two ensemble members side by side; the second learns from flipped labels, so
its validation loss is best at epoch 1 while the first keeps improving: a ``best`` checkpoint
lost and silently replaced by the initial weights shows in the second member's result.
"""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from click.testing import CliRunner

from pneumojax.checkpoint import CheckpointError
from pneumojax.cli import main
from pneumojax.train import FitOptions, Interrupted, fit

from conftest import REPO, tiny_train_args
from test_train import CUT, MID, _tiny

EPOCHS = 2
LR = 3e-3
OPTS = FitOptions(epochs=EPOCHS, batch_size=8, patience=0, seed=2, learning_rate=LR)


@contextlib.contextmanager
def watch_saves(on_event):
    """Calls ``on_event(stage, which, target)`` at every stage of each orbax save and delete;
    ``which`` is the checkpoint folder's name (``last`` or ``best``), ``target`` the folder being
    deleted (only for ``deleting``)."""
    manager, temp = ocp.CheckpointManager, ocp.path.atomicity.AtomicRenameTemporaryPath
    deleter = ocp.path.deleter.StandardCheckpointDeleter
    save, finalize = manager.save, temp.finalize
    delete, wipe = deleter.delete, deleter._delete_step_permanently

    def save_(self, *a, **k):
        which = Path(self.directory).name
        on_event("save", which, None)
        out = save(self, *a, **k)
        on_event("saved", which, None)
        return out

    async def finalize_(self):
        which = Path(self.get_final()).parent.name
        if which not in ("last", "best"):  # an item inside the step's temporary folder
            return await finalize(self)
        on_event("written", which, None)
        await finalize(self)
        on_event("renamed", which, None)

    def delete_(self, step):
        which = Path(self._directory).name
        on_event("delete", which, None)
        delete(self, step)
        on_event("deleted", which, None)

    def wipe_(self, step, target):
        on_event("deleting", Path(self._directory).name, Path(target))
        wipe(self, step, target)

    with (
        mock.patch.object(manager, "save", save_),
        mock.patch.object(temp, "finalize", finalize_),
        mock.patch.object(deleter, "delete", delete_),
        mock.patch.object(deleter, "_delete_step_permanently", wipe_),
    ):
        yield


class KillPoints:
    """Copies the run folder at every save stage, as a kill -9 at that instant leaves it.

    ``points`` lists them all in order, each with a digest of its files: a resume from the same
    files does the same, so one resume per digest is enough."""

    def __init__(self, run_dir: Path, out: Path, after_a_checkpoint: bool = False):
        self.run_dir, self.out, self.points, self.distinct = run_dir, out, [], {}
        self.lasts_done = int(after_a_checkpoint)

    def __call__(self, stage, which, target):
        dest = self.out / f"{len(self.points):03d}-{which}-{stage}"
        shutil.copytree(self.run_dir, dest)
        if target is not None:  # killed halfway through deleting target
            files = sorted(
                p for p in (dest / target.relative_to(self.run_dir)).rglob("*") if p.is_file()
            )
            for p in files[::2]:
                p.unlink()
        point = {
            "stage": stage,
            "which": which,
            "dir": dest,
            "digest": _digest(dest),
            "after_a_checkpoint": self.lasts_done > 0,
        }
        self.points.append(point)
        first = self.distinct.setdefault(point["digest"], point)
        first["after_a_checkpoint"] |= point["after_a_checkpoint"]
        if (stage, which) == ("saved", "last"):
            self.lasts_done += 1


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def setup():
    steps, variables, _, (images, labels, weights), val = _tiny(MID, lr=LR)
    n = len(labels)
    train = (
        np.concatenate([images, images]),
        np.concatenate([labels, 1 - labels]),
        np.concatenate([weights, weights]),
    )
    members = [np.arange(n), np.arange(n, 2 * n)]
    return steps, variables, train, val, members


def _fit(setup, run_dir, **kw):
    steps, variables, train, val, members = setup
    lines = []
    best, progress = fit(
        steps, variables, train, val, OPTS, run_dir, members=members, log=lines.append, **kw
    )
    return best, progress, lines


def _check_same(result, reference, run_dir):
    (best, progress, _), (ref_best, ref_progress, _) = result, reference
    assert progress.history == ref_progress.history
    assert progress.best_epoch == ref_progress.best_epoch
    for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(ref_best)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, EPOCHS + 1))


def _resume_from_each(setup, points: list[dict], reference):
    """Resumes from each kill point (once per distinct set of files) and checks the result."""
    done = set()
    for point in points:
        if point["digest"] in done:
            continue
        done.add(point["digest"])
        run = point["dir"]
        result = _fit(setup, run, resume=True)
        where = f"killed at {run.name}"
        if point["after_a_checkpoint"]:
            assert any(line.startswith("resuming at epoch") for line in result[2]), where
        try:
            _check_same(result, reference, run)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from e
    return len(done)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run, with a kill point at every stage of each of its saves."""
    tmp = tmp_path_factory.mktemp("reference")
    kills = KillPoints(tmp / "run", tmp / "points")
    with watch_saves(kills):
        result = _fit(setup, tmp / "run")
    best_epoch = result[1].best_epoch
    # what the scenarios need: the first member improves at the last epoch, the second not
    assert best_epoch[1] < best_epoch[0] == EPOCHS, best_epoch
    seen = {(p["stage"], p["which"]) for p in kills.points}  # the watch sees every stage
    assert seen == {
        (stage, which)
        for which in ("last", "best")
        for stage in ("save", "written", "renamed", "saved", "delete", "deleting", "deleted")
    }
    return result, kills.points


def _nth(points, stage, which, n):
    return [p for p in points if (p["stage"], p["which"]) == (stage, which)][n]


def test_a_kill_at_any_stage_of_any_save_then_resume_ends_as_uninterrupted(setup, reference):
    result, points = reference
    assert sum(p["after_a_checkpoint"] for p in points) > len(points) / 2
    assert _resume_from_each(setup, points, result) >= 10


# resave-best: killed after the last epoch's best is saved, before its last: the resume saves
# that epoch's best again. resave-step: interrupted on the last batch of epoch 1: the resume
# saves `last` at the same training step again.
@pytest.mark.parametrize("start", ["resave-best", "resave-step"])
def test_a_second_kill_while_the_resumed_run_redoes_a_save(setup, reference, tmp_path, start):
    result, points = reference
    run = tmp_path / "run"
    if start == "resave-best":
        shutil.copytree(_nth(points, "save", "last", -1)["dir"], run)
    else:
        with pytest.raises(Interrupted, match="epoch 1, batch 3"):
            _fit(setup, run, stop_after_steps=3)
    kills = KillPoints(run, tmp_path / "points", after_a_checkpoint=True)
    with watch_saves(kills):
        resumed = _fit(setup, run, resume=True)
    assert any(line.startswith("resuming at epoch") for line in resumed[2])
    _check_same(resumed, result, run)
    # a kill at every stage of the resumed run's first epoch of saves (its best and its last)
    starts = [i for i, p in enumerate(kills.points) if p["stage"] == "save"]
    first_epoch = kills.points[: starts[2] if len(starts) > 2 else None]
    assert _resume_from_each(setup, first_epoch, result) >= 5


def test_best_weights_missing_is_an_error_not_the_initial_weights(setup, reference, tmp_path):
    _, points = reference
    shutil.copytree(_nth(points, "save", "last", -1)["dir"], tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "best")
    with pytest.raises(CheckpointError, match="lacks the best weights"):
        _fit(setup, tmp_path / "run", resume=True)


# A real process, killed by os._exit inside a save, then `pneumojax train --resume`.
_KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from test_checkpoint_faults import watch_saves
    from pneumojax.cli import main

    def kill(stage, which, target):
        if (stage, which) == {at!r}:
            print("killed at", stage, which, flush=True)
            os._exit(137)
    with watch_saves(kill):
        main({args!r})
""")


def _figures(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["training"].pop("seconds")
    return metrics


@pytest.mark.slow
def test_a_process_killed_inside_a_save_resumes_to_the_same_metrics(tmp_path, monkeypatch):
    from pneumojax.data import Splits, make_demo_dataset
    from pneumojax.run import TrainConfig, train_run

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    data = make_demo_dataset(tmp_path / "xray", n_per_class=24, image_size=40, seed=1)
    done = CliRunner().invoke(
        main, tiny_train_args(data, tmp_path / "ref", "--patience", "0", epochs=3)
    )
    assert done.exit_code == 0, done.output
    # Stopped on the last batch of epoch 1: the resume saves that training step again.
    steps_per_epoch = (
        len(Splits.from_json((tmp_path / "ref" / "splits.json").read_text()).train) // 8
    )
    run = tmp_path / "run"
    cfg = TrainConfig(
        data=str(data),
        weights="none",
        cut=CUT,
        image_size=32,
        batch_size=8,
        epochs=3,
        patience=0,
        out=str(run),
    )
    with pytest.raises(Interrupted, match=f"epoch 1, batch {steps_per_epoch};"):
        train_run(cfg, log=lambda line: None, stop_after_steps=steps_per_epoch)
    # The resume is killed (os._exit) just after its first delete of an old `last`.
    script = _KILL_SCRIPT.format(
        tests=str(REPO / "tests"),
        at=("deleted", "last"),
        args=["train", "--out", str(run), "--resume"],
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    killed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == 137, killed.stdout + killed.stderr
    assert "resuming at epoch 1, batch" in killed.stdout + killed.stderr
    assert "killed at deleted last" in killed.stdout and not (run / "metrics.json").exists()
    resumed = CliRunner().invoke(main, ["train", "--out", str(run), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at epoch 2, batch 0" in resumed.output
    assert _figures(run) == _figures(tmp_path / "ref")
