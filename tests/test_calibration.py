"""``--calibrate temperature``: the fitted temperature, the head it scales, and a run with it."""

import json

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax.backbones import get_backbone
from pneumojax.calibration import fit_temperature, scale_head
from pneumojax.cli import main
from pneumojax.data import make_demo_dataset
from pneumojax.predictions import read_predictions
from pneumojax.model import build_classifier

from conftest import RESCORED_METRICS, TINY_CUT, tiny_train_args


def test_the_fitted_temperature_undoes_an_over_confident_scale():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-z))  # calibrated at T = 1
    assert fit_temperature(3.0 * z, y) == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.05)
    # two members: the temperature of their mean probability
    assert fit_temperature(np.stack([3 * z, 3 * z], 1), y) == pytest.approx(3.0, rel=0.05)


def test_scaling_the_head_divides_the_pneumonia_logit():
    info = get_backbone("densenet121")
    model = build_classifier(info, TINY_CUT, frozenset())
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), np.uint8)
    variables = jax.tree.map(np.asarray, model.init(jax.random.key(0), x))
    variables["params"]["dense_1"]["bias"] = np.array([0.3, -0.7], np.float32)
    before = np.asarray(model.apply(variables, x))
    after = np.asarray(model.apply(scale_head(variables, 2.5), x))
    np.testing.assert_allclose(after[:, 1], before[:, 1] / 2.5, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(after[:, 0], before[:, 0])


def test_a_calibrated_run_is_calibrated_on_validation_and_rescores_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    data = make_demo_dataset(tmp_path / "demo", n_per_class=30, image_size=40, seed=4)
    # label noise, so that no validation split is separable (its best temperature is finite)
    for cls, other in (("NORMAL", "PNEUMONIA"), ("PNEUMONIA", "NORMAL")):
        for f in sorted((data / cls).iterdir())[::4]:
            f.rename(data / other / f"noisy_{f.name}")
    run = tmp_path / "run"
    r = CliRunner().invoke(
        main, tiny_train_args(data, run, "--calibrate", "temperature", "--seed-ensemble", "2")
    )
    assert r.exit_code == 0, r.output
    assert "temperature scaling: T = " in r.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["calibration"]["method"] == "temperature"
    # the saved model is calibrated already: fitting again on its validation gives T = 1
    _, y, p = read_predictions(run / "predictions" / "val.csv")
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    assert fit_temperature(np.log(p / (1 - p)), y) == pytest.approx(1.0, abs=0.02)
    r = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--split", "test"])
    assert r.exit_code == 0, r.output
    again = json.loads((run / "eval-test" / "metrics.json").read_text())
    for key in RESCORED_METRICS:
        assert again[key] == metrics[key], key
