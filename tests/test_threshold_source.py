"""The decision threshold is chosen on validation and only applied to test.

Checked through what runs do, not by reading ``threshold_source`` (a constant): runs that
train the same model (one epoch, so validation cannot pick the epoch either) and differ only in
their test labels choose the same threshold, although a threshold tuned on test would differ;
a run whose validation labels differ chooses another one, the one those labels give.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax import data as pj_data
from pneumojax.cli import main
from pneumojax.metrics import choose_threshold
from pneumojax.scoring import load_run
from pneumojax.workspace import load_split_arrays

from conftest import tiny_train_args

SIZE = 32


@pytest.fixture
def kaggle_pair(tmp_path, monkeypatch):
    """Two Kaggle-layout folders, identical but for a third of the test labels."""
    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    train = pj_data.make_demo_dataset(
        tmp_path / "demo_train", n_per_class=40, image_size=48, seed=1
    )
    test = pj_data.make_demo_dataset(tmp_path / "demo_test", n_per_class=15, image_size=48, seed=2)
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        for split, src in (("train", train), ("test", test)):
            for cls in pj_data.CLASS_NAMES:
                shutil.copytree(src / cls, root / split / cls)
    for cls, other in zip(pj_data.CLASS_NAMES, pj_data.CLASS_NAMES[::-1]):
        for path in sorted((b / "test" / cls).iterdir())[::3]:
            path.rename(b / "test" / other / path.name)
    return a, b


def _train(data, out):
    result = CliRunner().invoke(
        main, tiny_train_args(data, out, "--seed", "3", image_size=SIZE, epochs=1)
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text())


def _split(run_dir, name):
    splits = pj_data.Splits.from_json((run_dir / "splits.json").read_text())
    return load_split_arrays(splits.as_dict()[name], SIZE)


def test_threshold_comes_from_validation_not_test(kaggle_pair, tmp_path, monkeypatch):
    a, b = kaggle_pair
    ma, mb = _train(a, tmp_path / "run_a"), _train(b, tmp_path / "run_b")
    run = load_run(tmp_path / "run_a")
    (val_x, val_y), (test_x, test_a) = _split(run.run_dir, "val"), _split(run.run_dir, "test")
    # run B's test labels, in run A's order (the same files, some in the other class folder)
    label_b = {
        os.path.basename(path): y
        for path, y in pj_data.Splits.from_json(
            (tmp_path / "run_b" / "splits.json").read_text()
        ).test
    }
    test_b = np.array(
        [
            label_b[os.path.basename(path)]
            for path, _ in pj_data.Splits.from_json((run.run_dir / "splits.json").read_text()).test
        ]
    )
    p_val = run.model.probabilities_of_images(val_x)[:, 0]
    p_test = run.model.probabilities_of_images(test_x)[:, 0]

    # Other test labels reached the test figures and would have moved a threshold tuned on
    # test; the chosen one did not move, and it is the one validation gives.
    assert not np.array_equal(test_a, test_b)
    assert ma["confusion_matrix"] != mb["confusion_matrix"]
    assert choose_threshold(test_a, p_test) != choose_threshold(test_b, p_test)
    assert ma["member_thresholds"] == mb["member_thresholds"]
    assert ma["threshold"] == mb["threshold"] == choose_threshold(val_y, p_val, ma["target_recall"])
    assert run.thresholds == ma["member_thresholds"]  # what evaluate and predict apply

    # Other validation labels, same images, same training: the lowest-scoring PNEUMONIA
    # validation image decides a 0.98-recall threshold, so relabelling it NORMAL must raise
    # the threshold to the next PNEUMONIA image's score.
    positives = np.flatnonzero(val_y == 1)
    lowest = positives[np.argmin(p_val[positives])]
    val_paths = {
        path for path, _ in pj_data.Splits.from_json((run.run_dir / "splits.json").read_text()).val
    }
    make_splits = pj_data.make_splits

    def relabelled_val(*args, **kwargs):
        splits = make_splits(*args, **kwargs)
        assert {p for p, _ in splits.val} == val_paths  # same carve as run A
        val = [(p, 0 if i == lowest else y) for i, (p, y) in enumerate(splits.val)]
        return dataclasses.replace(splits, val=val)

    monkeypatch.setattr(pj_data, "make_splits", relabelled_val)
    mc = _train(a, tmp_path / "run_c")
    assert mc["threshold"] > ma["threshold"]
    assert mc["threshold"] == pytest.approx(np.sort(p_val[positives])[1], abs=1e-6)
    _, val_c = _split(tmp_path / "run_c", "val")
    assert val_c[lowest] == 0 and (val_c != val_y).sum() == 1
    assert mc["auc"] == ma["auc"]  # the same model scored the same test set
