"""``pneumojax adapt``: AdaBN statistics, the EM prior, the label-free threshold, and that the
target's labels are never read."""

import json
import random
import shutil

import jax
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pneumojax.adapt import (
    em_prior,
    label_free_threshold,
    target_images,
    training_prior,
)
from pneumojax.backbones import get_backbone, preprocess
from pneumojax.checkpoint import load_variables
from pneumojax.cli import main
from pneumojax.data import make_demo_dataset
from pneumojax.metrics import choose_threshold

from conftest import RESCORED_METRICS, tiny_train_args
from test_dicom import write_dicom


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run (DenseNet121 cut early, every layer trained) on demo images."""
    root = tmp_path_factory.mktemp("adapt")
    data = make_demo_dataset(root / "demo", n_per_class=24, image_size=40, seed=1)
    run = root / "run"
    import os  # noqa: PLC0415

    os.environ["PNEUMOJAX_CACHE"] = str(root / "cache")
    r = CliRunner().invoke(main, tiny_train_args(data, run, trainable="all"))
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """Another 'site': demo images of another seed, darker, in a Kaggle layout."""
    root = tmp_path_factory.mktemp("target")
    demo = make_demo_dataset(root / "demo", n_per_class=15, image_size=48, seed=7)
    out = root / "site"
    for i, f in enumerate(sorted(demo.rglob("*.jpeg"))):
        split = "test" if i % 3 else "train"
        dest = out / split / f.parent.name / f"{f.stem}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        im = np.asarray(Image.open(f).convert("L"), np.float32)
        Image.fromarray((im * 0.6).astype(np.uint8)).save(dest)
    return out


def _adapt(run, data, out, *extra):
    r = CliRunner().invoke(
        main, ["adapt", "--run", str(run), "--data", str(data), "--out", str(out), *extra]
    )
    assert r.exit_code == 0, r.output
    return r


def test_em_recovers_the_prior_of_a_calibrated_model():
    rng = np.random.default_rng(0)
    # Class-conditional scores N(+-1, 1); the model's posterior under a 0.5 prior is
    # sigmoid(2x). The target draws PNEUMONIA with probability 0.2.
    y = rng.random(20000) < 0.2
    x = rng.normal(np.where(y, 1.0, -1.0), 1.0)
    p = 1 / (1 + np.exp(-2 * x))
    est = em_prior(p[:, None], 0.5)
    assert abs(est["target_prior"] - 0.2) < 0.01
    assert est["logit_shift"] == pytest.approx(
        np.log(est["target_prior"] / (1 - est["target_prior"]))
    )
    # the same images scored by a model trained under 0.75: the same estimate
    p75 = 1 / (1 + np.exp(-(2 * x + np.log(3))))
    assert em_prior(p75[:, None], 0.75)["target_prior"] == pytest.approx(
        est["target_prior"], abs=1e-4
    )
    # an over-confident model on images of one class: EM stops at its bound
    saturated = em_prior(np.full((50, 1), 0.999), 0.5)
    assert saturated["at_bound"] and saturated["target_prior"] == 0.98
    assert not est["at_bound"]


def test_label_free_threshold_with_true_labels_is_the_labelled_rule():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.random(300) < 0.4
        p = np.clip(rng.normal(np.where(y, 0.65, 0.35), 0.2), 0, 1).astype(np.float32)
        p[:30] = np.round(p[:30], 1)  # ties
        for recall in (0.8, 0.95, 0.98):
            assert label_free_threshold(p, y.astype(float), recall) == pytest.approx(
                choose_threshold(y.astype(int), p, recall)
            )


def test_training_prior_follows_the_balance():
    assert (
        training_prior({"balance_applied": {"method": "none", "member_counts": [[1, 3]]}}) == 0.75
    )
    assert (
        training_prior({"balance_applied": {"method": "class-weight", "member_counts": [[1, 3]]}})
        == 0.5
    )
    with pytest.raises(ValueError, match="balance_applied"):
        training_prior({"out": "r"})


def test_adabn_gives_the_first_batchnorm_the_target_statistics(tiny_run, target, tmp_path):
    out = tmp_path / "adapted"
    _adapt(tiny_run, target, out, "--no-prior", "--threshold", "keep")
    config = json.loads((tiny_run / "config.json").read_text())
    images, _ = target_images(target, config["image_size"], "antialias", log=lambda m: None)
    variables, _ = load_variables(out / "model")
    before, _ = load_variables(tiny_run / "model")
    # conv1_bn's input is conv1_conv of the zero-padded, preprocessed images: its statistics
    # over every target image, computed directly.
    info = get_backbone("densenet121")
    kernel = before["params"]["backbone"]["conv1_conv"]["kernel"][0]
    x = np.pad(
        np.asarray(preprocess(images, info.preprocess_mode)), ((0, 0), (3, 3), (3, 3), (0, 0))
    )
    conv = np.asarray(
        jax.lax.conv_general_dilated(
            x, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    got = variables["batch_stats"]["backbone"]["conv1_bn"]
    np.testing.assert_allclose(got["mean"][0], conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["var"][0], conv.var((0, 1, 2)), rtol=1e-3, atol=1e-5)
    assert not np.allclose(before["batch_stats"]["backbone"]["conv1_bn"]["mean"], got["mean"])
    # everything else as it was: parameters untouched, the run's threshold kept
    jax.tree.map(np.testing.assert_array_equal, before["params"], variables["params"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["member_thresholds"]
        == json.loads((tiny_run / "metrics.json").read_text())["member_thresholds"]
    )


def test_adapt_never_reads_labels(tiny_run, target, tmp_path):
    first = tmp_path / "a"
    _adapt(tiny_run, target, first)
    # the same images with their labels permuted, renamed, and in a flat layout
    shuffled = tmp_path / "shuffled"
    files = sorted(target.rglob("*.png"))
    rng = random.Random(0)
    for i, f in enumerate(rng.sample(files, len(files))):
        dest = shuffled / rng.choice(["NORMAL", "PNEUMONIA"]) / f"person{i}_x.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    second = tmp_path / "b"
    _adapt(tiny_run, shuffled, second)
    a, ma = load_variables(first / "model")
    b, mb = load_variables(second / "model")
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(u, v), a, b)
    assert ma["thresholds"] == mb["thresholds"]
    ca = json.loads((first / "config.json").read_text())["adaptation"]
    cb = json.loads((second / "config.json").read_text())["adaptation"]
    assert ca["prior_shift"] == cb["prior_shift"] and ca["target_digest"] == cb["target_digest"]


def test_an_adapted_run_is_a_run_that_rescores_exactly(tiny_run, target, tmp_path):
    out = tmp_path / "adapted"
    r = _adapt(tiny_run, target, out)
    assert "labels not read" in r.output and "estimated" in r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold_source"] == "target images, no labels"
    assert set(metrics["adaptation"]) >= {"bn", "prior_shift", "thresholds", "target_images"}
    r = CliRunner().invoke(main, ["evaluate", "--run", str(out), "--split", "test"])
    assert r.exit_code == 0, r.output
    again = json.loads((out / "eval-test" / "metrics.json").read_text())
    for key in RESCORED_METRICS:
        assert again[key] == metrics[key], key
    # scored on the target (its labels now used, by evaluate): the adapted thresholds apply
    r = CliRunner().invoke(
        main, ["evaluate", "--run", str(out), "--data", str(target), "--split", "all"]
    )
    assert r.exit_code == 0, r.output
    # (another folder than the run's own data: named after it, eval-all-site)
    external = json.loads((out / f"eval-all-{target.name}" / "metrics.json").read_text())
    assert external["member_thresholds"] == metrics["member_thresholds"]
    # compare names it an adapted run
    r = CliRunner().invoke(
        main, ["compare", str(tiny_run), str(out), "--out", str(tmp_path / "c.png")]
    )
    assert r.exit_code == 0, r.output
    assert "| run (none) |" in r.output and "| adapted (none, adapted to site) |" in r.output


def test_adapt_to_dicom_images(tiny_run, target, tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    for i, f in enumerate(sorted(target.rglob("*.png"))[:12]):
        pixels = np.asarray(Image.open(f).convert("L"), np.uint16) * 16
        write_dicom(folder / f"img{i}.dcm", pixels, bits_stored=12)
    out = tmp_path / "adapted"
    r = _adapt(tiny_run, folder, out)
    assert "12 images" in r.output


def test_adapt_usage_errors(tiny_run, target, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--data", str(empty), "--out", str(tmp_path / "x")], 1, "no images found"),
        (["--data", str(target), "--out", str(tiny_run)], 2, "already exists"),
        (["--data", str(target), "--out", str(empty), "--overwrite"], 2, "not a run made by"),
        (
            [
                "--data",
                str(target),
                "--out",
                str(tmp_path / "y"),
                "--no-bn",
                "--no-prior",
                "--threshold",
                "keep",
            ],
            2,
            "change nothing",
        ),
    ]
    for args, code, message in cases:
        r = CliRunner().invoke(main, ["adapt", "--run", str(tiny_run), *args])
        assert r.exit_code == code, r.output
        assert message in r.output and "Traceback" not in r.output
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    r = CliRunner().invoke(
        main,
        ["adapt", "--run", str(unfinished), "--data", str(target), "--out", str(tmp_path / "z")],
    )
    assert r.exit_code == 1 and "did not finish" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_adabn_that_saturates_the_model_is_refused_with_what_to_do(
    tiny_run, target, tmp_path, monkeypatch
):
    """A frozen backbone's head can meet re-estimated activations of another scale: every
    target probability 1.0 (a study's random_features run did). That is an error naming
    --no-bn, not an adapted run whose AUC is 0.5 by ties."""
    from pneumojax import adapt  # noqa: PLC0415

    with pytest.raises(ValueError, match="saturate"):
        adapt.check_not_saturated(np.ones(50, np.float32))
    with pytest.raises(ValueError, match="saturate"):
        adapt.check_not_saturated(np.full(50, 0.3, np.float32))
    adapt.check_not_saturated(np.linspace(0.0, 1.0, 50))  # two ends exactly 0 and 1: fine

    real = adapt.batchnorm_statistics

    def exploding(run, images, batch_size):  # variances a million times too small
        v = real(run, images, batch_size)
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x * 1e-12 if "var" in jax.tree_util.keystr(path) else x, v
        )

    monkeypatch.setattr(adapt, "batchnorm_statistics", exploding)
    out = tmp_path / "adapted"
    r = CliRunner().invoke(
        main, ["adapt", "--run", str(tiny_run), "--data", str(target), "--out", str(out)]
    )
    assert r.exit_code == 1, r.output
    assert "saturate this model" in r.output and "--no-bn" in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()
    _adapt(tiny_run, target, out, "--no-bn")  # the way out it names works
