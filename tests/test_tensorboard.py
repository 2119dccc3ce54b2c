"""TensorBoard event files in every run folder (``RUN/tensorboard/``): read back with
TensorBoard's own event reader, the curves equal history.jsonl epoch by epoch (per member of a
seed ensemble, train and validation), the test figures, images and hyperparameters are there,
and an interrupted run keeps its curves while a resumed one holds each epoch exactly once."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax import data as pj_data
from pneumojax.cli import main
from pneumojax.config import TrainConfig
from pneumojax.run import train_run
from pneumojax.tensorboard import EventLog, read_history
from pneumojax.train import Interrupted

from conftest import REPO, TINY_CUT, tiny_train_args

TRAIN = {"loss": "epoch_loss", "accuracy": "epoch_accuracy", "lr": "epoch_learning_rate"}
VALIDATION = {"val_loss": "epoch_loss", "val_accuracy": "epoch_accuracy", "val_auc": "epoch_auc"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensorboard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMOJAX_CACHE", str(root / "cache"))
        data = pj_data.make_demo_dataset(root / "demo", n_per_class=40, image_size=48, seed=5)
        yield root, data


@pytest.fixture(scope="module")
def members_run(workdir):
    """Two seed-ensemble members, three epochs."""
    root, data = workdir
    out = root / "members"
    args = tiny_train_args(data, out, "--seed-ensemble", "2", "--patience", "0", epochs=3)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return out


def events(folder: Path) -> list:
    """Every event of every event file in ``folder``, in file order (TensorBoard's reader)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for path in sorted(folder.glob("*tfevents*")):
        out += list(EventFileLoader(str(path)).Load())
    return out


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar summary in ``folder``, repeats kept."""
    from tensorboard.util import tensor_util

    out: dict[str, list] = {}
    for event in events(folder):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "scalars":
                number = float(tensor_util.make_ndarray(value.tensor))
                out.setdefault(value.tag, []).append((event.step, number))
    return out


def expected(history: list[dict], keys: dict, member: int | None = None) -> dict:
    """{tag: [(epoch, value), ...]} as history.jsonl has them (one member's, or the row's)."""
    out: dict[str, list] = {}
    for row in history:
        for key, tag in keys.items():
            value = row[key] if member is None or key == "lr" else row[f"member_{key}"][member]
            if value is not None:
                out.setdefault(tag, []).append((row["epoch"], float(np.float32(value))))
    return out


def test_curves_equal_history_per_epoch_and_member(members_run):
    history = read_history(members_run)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    tb = members_run / "tensorboard"
    assert scalars(tb / "train") == expected(history, TRAIN)
    assert scalars(tb / "validation") == expected(history, VALIDATION)
    for i in range(2):
        assert scalars(tb / f"member-{i + 1}" / "train") == expected(history, TRAIN, i)
        assert scalars(tb / f"member-{i + 1}" / "validation") == expected(history, VALIDATION, i)
    for row in history:  # the rows' figures are the members' means
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_auc"):
            assert row[key] == pytest.approx(np.mean(row[f"member_{key}"]), rel=1e-6)  # float32
    names = sorted(p.name for p in tb.iterdir())
    assert [n for n in names if "tfevents" not in n] == [
        "member-1",
        "member-2",
        "test",
        "train",
        "validation",
    ]
    assert len([n for n in names if "tfevents" in n]) == 1  # the hparams


def test_test_figures_images_and_hparams_are_there(members_run):
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.plugins.hparams import metadata as hp_metadata
    from tensorboard.util import tensor_util

    metrics = json.loads((members_run / "metrics.json").read_text())
    test = members_run / "tensorboard" / "test"
    figures = scalars(test)
    for name in ("auc", "accuracy", "recall", "specificity", "precision", "threshold"):
        assert figures[name] == [(3, float(np.float32(metrics[name])))], name
    acc = pea.EventAccumulator(str(test), size_guidance={"tensors": 0})
    acc.Reload()
    for name in ("roc", "confusion_matrix"):
        [image] = acc.Tensors(name)
        width, height, png = tensor_util.make_ndarray(image.tensor_proto)
        assert png == (members_run / "plots" / f"{name}.png").read_bytes()
        assert int(width) > 100 and int(height) > 100
        assert acc.SummaryMetadata(name).plugin_data.plugin_name == "images"
    [session] = [
        v
        for e in events(members_run / "tensorboard")
        for v in e.summary.value
        if v.tag == hp_metadata.SESSION_START_INFO_TAG
    ]
    info = hp_metadata.parse_session_start_info_plugin_data(session.metadata.plugin_data.content)
    assert info.hparams["out"].string_value == str(members_run)
    assert info.hparams["seed_ensemble"].number_value == 2
    assert info.hparams["backbone"].string_value == "densenet121"
    assert info.hparams["cut"].string_value == TINY_CUT
    assert info.hparams["tta_augment"].string_value == "none"  # None


def test_an_interrupted_run_keeps_its_curves_and_a_resumed_one_has_each_epoch_once(workdir):
    root, data = workdir
    run = root / "resumed"
    cfg = TrainConfig(
        data=str(data),
        weights="none",
        cut=TINY_CUT,
        image_size=32,
        batch_size=8,
        epochs=3,
        patience=0,
        out=str(run),
    )
    with pytest.raises(Interrupted, match="epoch 2, batch"):  # 7 batches an epoch
        train_run(cfg, log=lambda line: None, stop_after_steps=9)
    tb = run / "tensorboard"
    history = read_history(run)
    assert [row["epoch"] for row in history] == [1]
    assert scalars(tb / "validation") == expected(history, VALIDATION)
    resumed = CliRunner().invoke(main, ["train", "--out", str(run), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    history = read_history(run)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert scalars(tb / "train") == expected(history, TRAIN)
    assert scalars(tb / "validation") == expected(history, VALIDATION)
    assert len(list((tb / "train").glob("*tfevents*"))) == 1  # the interrupted one's is gone
    assert not (tb / "member-1").exists()


def test_curves_append_live_and_are_rewritten_when_history_differs(tmp_path):
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    rows = [
        {"epoch": e, "lr": 0.1, "loss": 1.0 / e, "accuracy": 0.5, "val_loss": 2.0 / e}
        for e in (1, 2, 3)
    ]
    log = EventLog(tmp_path)
    log.epochs(rows[:1])
    log.epochs(rows[:2])  # appended to the same file, flushed: a live reader sees epoch 2
    [file] = (tmp_path / "tensorboard" / "train").glob("*tfevents*")
    assert scalars(file.parent)["epoch_loss"] == [(1, 1.0), (2, 0.5)]
    live = pea.EventAccumulator(str(file.parent))  # TensorBoard's Python loader, watching
    live.Reload()
    log.close()
    again = EventLog(tmp_path)  # another process (a resume) whose history has moved on
    changed = [rows[0], {**rows[1], "loss": 0.25}, rows[2]]
    again.epochs(changed)
    again.close()
    third = float(np.float32(1 / 3))
    assert scalars(file.parent)["epoch_loss"] == [(1, 1.0), (2, 0.25), (3, third)]
    assert not file.exists()
    live.Reload()  # it drops what it had read from the old file: each step once
    seen = [
        (t.step, float(tensor_util.make_ndarray(t.tensor_proto)))
        for t in live.Tensors("epoch_loss")
    ]
    assert seen == [(1, 1.0), (2, 0.25), (3, third)]
    assert "epoch_auc" not in scalars(tmp_path / "tensorboard" / "validation")  # not recorded


def test_writing_events_does_not_import_tensorflow():
    code = (
        "import sys, pneumojax.run, pneumojax.tensorboard as t, tempfile; "
        "t.EventLog(tempfile.mkdtemp()).epochs([{'epoch': 1, 'loss': 1.0}]); "
        "assert 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
