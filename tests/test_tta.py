"""Test-time augmentation (``--tta N``, ``--tta-augment``): N identical views are exactly no
TTA; views differ, are deterministic and do not depend on their batch; a run trained with TTA
chooses its thresholds on TTA validation probabilities and re-scores exactly with ``evaluate``
and ``predict``; another TTA than the run's re-derives the thresholds on validation."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax import data as pj_data
from pneumojax.cli import main
from pneumojax.scoring import load_run
from pneumojax.predictions import read_predictions
from pneumojax.metrics import choose_threshold
from pneumojax.tta import TTA, image_ids, resolve_tta, view_images
from pneumojax.workspace import load_split_arrays

from conftest import RESCORED_METRICS, tiny_train_args

COMPARED = RESCORED_METRICS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMOJAX_CACHE", str(root / "cache"))
        data = pj_data.make_demo_dataset(root / "demo", n_per_class=40, image_size=48, seed=4)
        yield root, data


def _train(workdir, name, *extra, epochs=1):
    root, data = workdir
    out = root / name
    if not (out / "metrics.json").exists():
        r = CliRunner().invoke(main, tiny_train_args(data, out, *extra, epochs=epochs))
        assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def plain_run(workdir):
    return _train(workdir, "plain")


@pytest.fixture(scope="module")
def tta_run(workdir):
    return _train(workdir, "tta", "--tta", "3")


def _split(run, name):
    splits = pj_data.Splits.from_json((run / "splits.json").read_text())
    return load_split_arrays(splits.as_dict()[name], 32)


def test_identical_views_equal_no_tta_exactly(plain_run):
    """The identity spec makes every view the image itself: the TTA path (views through the
    frozen prefix, rounded as cached, suffix, mean over views) must give back exactly the plain
    path's probabilities, for any N."""
    run = load_run(plain_run)
    assert run.model.prefix is not None  # the run trained on cached activations
    x, _ = _split(plain_run, "test")
    plain = run.model.probabilities_of_images(x)
    for n in (1, 3):
        same = run.model.probabilities_of_images(x, tta=TTA(n, "none"))
        np.testing.assert_array_equal(same, plain)
    light = run.model.probabilities_of_images(x, tta=TTA(3, "light"))
    assert not np.array_equal(light, plain)  # real views change the probabilities


def test_views_differ_are_deterministic_and_independent_of_the_batch(plain_run):
    run = load_run(plain_run)
    x, _ = _split(plain_run, "test")
    tta = resolve_tta(4, "light")
    ids = image_ids(x)
    views = [view_images(run.model.steps, x, ids, tta, v, 8) for v in range(4)]
    for v in range(4):
        assert views[v].dtype == np.uint8 and views[v].shape == x.shape
        assert not np.array_equal(views[v], x)
        for w in range(v):
            assert (views[v] != views[w]).any(axis=(1, 2, 3)).all()  # every image, every pair
    np.testing.assert_array_equal(view_images(run.model.steps, x, ids, tta, 2, 8), views[2])
    # Another batch composition and order (reversed, in batches of 4, one image alone): the
    # same view of each image.
    order = np.arange(len(x))[::-1]
    np.testing.assert_array_equal(
        view_images(run.model.steps, x[order], ids[order], tta, 1, 4), views[1][order]
    )
    alone = view_images(run.model.steps, x[5:6], image_ids(x[5:6]), tta, 3, 8)
    np.testing.assert_array_equal(alone, views[3][5:6])
    other_seed = view_images(run.model.steps, x, ids, TTA(4, tta.augment, seed=1), 0, 8)
    assert not np.array_equal(other_seed, views[0])


def test_the_default_spec_is_the_runs_device_augment_else_light():
    assert resolve_tta(2, None).augment == str(resolve_tta(2, "light").spec)
    assert resolve_tta(2, None, "strong").augment == resolve_tta(2, "strong").augment
    assert resolve_tta(2, "rotate=3").augment == "rotate=3"
    assert resolve_tta(0, None) is None


def test_a_tta_run_thresholds_on_tta_validation_and_rescores_exactly(tta_run):
    config = json.loads((tta_run / "config.json").read_text())
    assert config["tta"] == 3 and config["tta_augment"] == resolve_tta(3, "light").augment
    trained = json.loads((tta_run / "metrics.json").read_text())
    assert trained["tta"] == {"views": 3, "augment": config["tta_augment"], "seed": 0}
    # The threshold is the validation rule applied to the TTA validation probabilities.
    _, y_val, p_val = read_predictions(tta_run / "predictions" / "val.csv")
    assert trained["threshold"] == choose_threshold(y_val, p_val[:, 0], config["target_recall"])
    x_val, _ = _split(tta_run, "val")
    run = load_run(tta_run)
    np.testing.assert_array_equal(run.model.probabilities_of_images(x_val, tta=run.tta), p_val)
    assert not np.array_equal(run.model.probabilities_of_images(x_val), p_val)

    shutil.rmtree(tta_run / "eval-test", ignore_errors=True)
    r = CliRunner().invoke(main, ["evaluate", "--run", str(tta_run), "--split", "test"])
    assert r.exit_code == 0, r.output
    assert "re-derived" not in r.output
    again = json.loads((tta_run / "eval-test" / "metrics.json").read_text())
    for key in COMPARED:
        assert again[key] == trained[key], key
    assert again["tta"] == trained["tta"] and again["thresholds_rederived"] is False
    stored = (tta_run / "predictions" / "test.csv").read_text()
    assert (tta_run / "eval-test" / "predictions.csv").read_text() == stored

    rows = list(csv.DictReader(io.StringIO(stored)))
    paths = [row["path"] for row in rows]
    # Reversed: each image's views depend on the image alone, not on its place. (Its batch
    # neighbours change, and XLA:CPU's vectorised kernels are not bitwise independent of them
    # on every processor: equal to float32 rounding, measured up to 6e-8 on an AMD EPYC.)
    r = CliRunner().invoke(main, ["predict", "--run", str(tta_run)] + paths[::-1])
    assert r.exit_code == 0, r.output
    predicted = list(csv.DictReader(io.StringIO(r.stdout)))[::-1]
    np.testing.assert_allclose(
        [float(p["p_pneumonia"]) for p in predicted],
        [float(s["p_pneumonia"]) for s in rows],
        rtol=0,
        atol=1e-6,
    )
    t = trained["threshold"]
    assert [p["label"] for p in predicted] == [
        "PNEUMONIA" if float(s["p_pneumonia"]) >= t else "NORMAL" for s in rows
    ]


def test_evaluate_with_another_tta_rederives_the_thresholds_on_validation(plain_run, tta_run):
    # A run trained without TTA, evaluated with it: thresholds from its TTA validation split.
    out = plain_run / "eval-val-tta" / "metrics.json"
    r = CliRunner().invoke(
        main,
        ["evaluate", "--run", str(plain_run), "--split", "val", "--tta", "2", "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    assert "re-derived on the run's validation split" in r.output
    m = json.loads(out.read_text())
    assert m["tta"]["views"] == 2 and m["tta"]["augment"] == resolve_tta(2, None).augment
    assert m["thresholds_rederived"] is True
    trained = json.loads((plain_run / "metrics.json").read_text())
    assert m["run_thresholds"] == trained["member_thresholds"]
    _, y, p = read_predictions(out.parent / "predictions.csv")  # the TTA validation p
    assert m["threshold"] == choose_threshold(y, p[:, 0], trained["target_recall"])
    plain_val = (plain_run / "predictions" / "val.csv").read_text()
    assert (out.parent / "predictions.csv").read_text() != plain_val

    # A TTA run evaluated without (--tta 0): thresholds from its plain validation split.
    out = tta_run / "eval-val-plain" / "metrics.json"
    r = CliRunner().invoke(
        main,
        ["evaluate", "--run", str(tta_run), "--split", "val", "--tta", "0", "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    assert "re-derived" in r.output
    m = json.loads(out.read_text())
    assert m["tta"] is None and m["thresholds_rederived"] is True
    _, y, p = read_predictions(out.parent / "predictions.csv")
    assert m["threshold"] == choose_threshold(y, p[:, 0], trained["target_recall"])
    x_val, _ = _split(tta_run, "val")
    np.testing.assert_array_equal(load_run(tta_run).model.probabilities_of_images(x_val), p)

    # predict with another TTA labels at the re-derived threshold.
    paths = [row["path"] for row in csv.DictReader(open(plain_run / "predictions" / "test.csv"))]
    r = CliRunner().invoke(
        main, ["predict", "--run", str(plain_run), "--tta", "2", "--json"] + paths[:3]
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    rederived = json.loads((plain_run / "eval-val-tta" / "metrics.json").read_text())["threshold"]
    assert all(row["threshold"] == rederived for row in rows)


def test_tta_usage_errors_exit_2(workdir, plain_run, tmp_path):
    root, data = workdir
    runner = CliRunner()
    for extra in (
        ["--tta-augment", "light"],
        ["--tta", "-1"],
        ["--tta", "2", "--tta-augment", "x"],
    ):
        r = runner.invoke(main, tiny_train_args(data, tmp_path / "r", *extra))
        assert r.exit_code == 2, (extra, r.output)
        assert not (tmp_path / "r").exists()
    r = runner.invoke(main, ["evaluate", "--run", str(plain_run), "--tta-augment", "light"])
    assert r.exit_code == 2 and "--tta-augment needs --tta" in r.output, r.output
    r = runner.invoke(
        main, ["evaluate", "--run", str(plain_run), "--tta", "2", "--tta-augment", "bad"]
    )
    assert r.exit_code == 2, r.output
    r = runner.invoke(main, ["predict", "--run", str(plain_run), "--tta-augment", "light", "x.png"])
    assert r.exit_code == 2, r.output
    # The experiment file's keys go through the same checks.
    exp = tmp_path / "e.toml"
    exp.write_text('tta_augment = "light"\n')
    r = runner.invoke(main, tiny_train_args(data, tmp_path / "r", "--config", str(exp)))
    assert r.exit_code == 2 and "--tta-augment needs --tta" in r.output, r.output


def test_tta_is_an_experiment_file_option(workdir, tmp_path):
    from pneumojax.experiments import command_line, load_experiment, resolve_options

    exp = tmp_path / "e.toml"
    exp.write_text('tta = 4\ntta_augment = "strong"\nseed_ensemble = 3\n')
    cfg = resolve_options(load_experiment(exp))
    assert (cfg.tta, cfg.tta_augment, cfg.seed_ensemble) == (4, "strong", 3)
    line = command_line(cfg)
    assert "--tta 4" in line and "--tta-augment strong" in line and "--seed-ensemble 3" in line
    exp.write_text("tta = -2\n")
    with pytest.raises(ValueError, match="tta"):
        load_experiment(exp)


def test_evaluate_explain_labels_at_the_rederived_thresholds(plain_run):
    out = plain_run / "eval-explain-tta" / "metrics.json"
    args = ["evaluate", "--run", str(plain_run), "--split", "val", "--out", str(out)]
    r = CliRunner().invoke(main, args + ["--tta", "2", "--explain", "2"])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert m["thresholds_rederived"] and m["threshold"] != m["run_thresholds"][0]
    rows = list(csv.DictReader(open(out.parent / "explain" / "explain.csv")))
    _, labels, p = read_predictions(out.parent / "predictions.csv")
    by_path = dict(
        zip([row["path"] for row in csv.DictReader(open(out.parent / "predictions.csv"))], p[:, 0])
    )
    assert rows
    for row in rows:  # the errors it picked are errors at the re-derived threshold
        assert row["label"] == ("PNEUMONIA" if by_path[row["path"]] >= m["threshold"] else "NORMAL")
