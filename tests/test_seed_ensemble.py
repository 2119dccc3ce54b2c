"""Seed ensembles (``--seed-ensemble K``): K members trained side by side on the same train
set, differing only in their seed (head init, dropout, shuffling order); P(pneumonia) is their
mean, thresholded once on validation; ``evaluate`` and ``predict`` re-score such a run exactly;
``--balance ensemble`` with it is a usage error."""

import csv
import io
import json
import shutil

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax import balance
from pneumojax import data as pj_data
from pneumojax.checkpoint import load_variables
from pneumojax.cli import main
from pneumojax.config import FitOptions
from pneumojax.scoring import predicted_labels
from pneumojax.predictions import read_predictions
from pneumojax.metrics import choose_threshold
from pneumojax.batches import epoch_batches
from pneumojax.train import Progress

from conftest import RESCORED_METRICS, tiny_train_args

COMPARED = (*RESCORED_METRICS, "ensemble")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMOJAX_CACHE", str(root / "cache"))
        data = pj_data.make_demo_dataset(root / "demo", n_per_class=40, image_size=48, seed=5)
        yield root, data


def _train(workdir, name, *extra):
    root, data = workdir
    out = root / name
    r = CliRunner().invoke(main, tiny_train_args(data, out, *extra))
    assert r.exit_code == 0, r.output
    return out, r.output


@pytest.fixture(scope="module")
def seed_run(workdir):
    return _train(workdir, "seeds", "--seed-ensemble", "3", "--balance", "undersample")


def test_members_differ_and_combine_by_their_mean_at_one_validation_threshold(seed_run):
    run, output = seed_run
    assert "seed ensemble: 3 members" in output
    config = json.loads((run / "config.json").read_text())
    assert config["seed_ensemble"] == 3
    record = config["balance_applied"]
    assert record["seed_ensemble"] == 3 and len(record["member_counts"]) == 3
    assert record["member_counts"][0] == record["member_counts"][1] == record["member_counts"][2]

    # Heads start from seed + i and train with their own dropout and order: all differ.
    variables, manifest = load_variables(run / "model")
    assert manifest["members"] == 3 and len(manifest["thresholds"]) == 1
    kernels = [
        np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if "backbone" not in jax.tree_util.keystr(path)
    ]
    assert kernels
    for k in kernels:
        assert not np.array_equal(k[0], k[1]) and not np.array_equal(k[1], k[2])
    # The frozen backbone is shared (one set of cached activations serves all members).
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        if "backbone" in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(np.asarray(leaf)[0], np.asarray(leaf)[2])

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ensemble"]["members"] == 3
    assert metrics["ensemble"]["label"] == "mean probability at one validation threshold"
    _, y_val, p_val = read_predictions(run / "predictions" / "val.csv")
    paths, y_test, p_test = read_predictions(run / "predictions" / "test.csv")
    assert p_val.shape[1] == p_test.shape[1] == 3
    for i in range(3):
        for j in range(i):
            assert not np.array_equal(p_test[:, i], p_test[:, j])
    # One threshold, chosen on the mean validation probability, applied to the mean test one.
    t = choose_threshold(y_val, balance.mean_probability(p_val.T), config["target_recall"])
    assert metrics["member_thresholds"] == [t] and metrics["threshold"] == t
    mean_test = balance.mean_probability(p_test.T)
    labels = (mean_test >= t).astype(int)
    tn = int(((labels == 0) & (y_test == 0)).sum())
    tp = int(((labels == 1) & (y_test == 1)).sum())
    assert metrics["confusion_matrix"] == [
        [tn, int((y_test == 0).sum()) - tn],
        [int((y_test == 1).sum()) - tp, tp],
    ]
    np.testing.assert_array_equal(predicted_labels(p_test, [t]), labels)
    rows = list(csv.DictReader(io.StringIO((run / "predictions" / "test.csv").read_text())))
    assert [float(r["p_pneumonia"]) for r in rows] == [float(m) for m in mean_test]


def test_a_seed_ensemble_rescores_exactly(seed_run):
    run, _ = seed_run
    trained = json.loads((run / "metrics.json").read_text())
    shutil.rmtree(run.parent / "cache" / "features", ignore_errors=True)
    r = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--split", "test"])
    assert r.exit_code == 0, r.output
    again = json.loads((run / "eval-test" / "metrics.json").read_text())
    for key in COMPARED:
        assert again[key] == trained[key], key
    stored = (run / "predictions" / "test.csv").read_text()
    assert (run / "eval-test" / "predictions.csv").read_text() == stored
    rows = list(csv.DictReader(io.StringIO(stored)))
    r = CliRunner().invoke(main, ["predict", "--run", str(run)] + [s["path"] for s in rows])
    assert r.exit_code == 0, r.output
    predicted = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [float(p["p_pneumonia"]) for p in predicted] == [float(s["p_pneumonia"]) for s in rows]
    t = trained["threshold"]
    assert [p["label"] for p in predicted] == [
        "PNEUMONIA" if float(s["p_pneumonia"]) >= t else "NORMAL" for s in rows
    ]
    assert {p["threshold"] for p in predicted} == {str(t)}


def test_a_seed_ensemble_with_tta_and_no_cache_rescores_exactly(workdir):
    """Both levers at once, on the full-model path (no frozen-prefix cache)."""
    run, _ = _train(
        workdir, "seeds-tta", "--seed-ensemble", "2", "--tta", "2", "--no-feature-cache"
    )
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["tta"]["views"] == 2 and trained["ensemble"]["members"] == 2
    r = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--split", "test"])
    assert r.exit_code == 0, r.output
    again = json.loads((run / "eval-test" / "metrics.json").read_text())
    for key in COMPARED:
        assert again[key] == trained[key], key
    assert (run / "eval-test" / "predictions.csv").read_text() == (
        run / "predictions" / "test.csv"
    ).read_text()


def test_each_member_gets_its_own_order_of_the_same_images():
    class Unsharded:
        def shard(self, batch, members=False):
            return batch

    n, k = 40, 3
    members = [np.arange(n)] * k
    train = (np.arange(n)[:, None].astype(np.float32), np.zeros(n, np.int32), np.ones(n))
    opts = FitOptions(batch_size=8, seed=7)
    progress = Progress(steps_per_epoch=n // 8)
    batches = list(epoch_batches(Unsharded(), train, members, opts, 0, progress))
    seen = np.stack([b["image"][:, :, 0] for b in batches], 1)  # (members, steps, batch)
    for i in range(k):
        np.testing.assert_array_equal(np.sort(seen[i].ravel()), np.arange(n))  # all images
        for j in range(i):
            assert not np.array_equal(seen[i], seen[j])  # in another order


def test_seed_ensemble_usage_errors_exit_2(workdir, tmp_path):
    _, data = workdir
    runner = CliRunner()
    for extra in (
        ["--seed-ensemble", "2", "--balance", "ensemble"],
        ["--seed-ensemble", "0"],
    ):
        r = runner.invoke(main, tiny_train_args(data, tmp_path / "r", *extra))
        assert r.exit_code == 2, (extra, r.output)
        assert not (tmp_path / "r").exists()
    exp = tmp_path / "e.toml"
    exp.write_text('balance = "ensemble"\nseed_ensemble = 3\n')
    r = runner.invoke(main, tiny_train_args(data, tmp_path / "r", "--config", str(exp)))
    assert r.exit_code == 2 and "--seed-ensemble cannot be combined" in r.output, r.output
    # The library refuses it too (a study calls train_run directly).
    from pneumojax.config import TrainConfig
    from pneumojax.runconfig import resolved_config

    with pytest.raises(ValueError, match="seed-ensemble"):
        resolved_config(
            TrainConfig(balance="ensemble", seed_ensemble=2), tmp_path / "x", resume=False
        )
