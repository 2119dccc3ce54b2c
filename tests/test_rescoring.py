"""Every saved run re-scores exactly to its own metrics.json: ``evaluate --split test`` gives
the same threshold, confusion matrix and AUC, and ``predict`` the same probabilities, for every
balance method, both precisions and with and without the frozen-prefix cache."""

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pneumojax.cli import main
from pneumojax.data import make_demo_dataset

from conftest import RESCORED_METRICS, TINY_MID, tiny_train_args


@pytest.fixture(scope="module")
def unequal_data(tmp_path_factory):
    """The demo images with classes 1:2 (NORMAL:PNEUMONIA), so that every method acts."""
    root = tmp_path_factory.mktemp("data")
    demo = make_demo_dataset(root / "demo", n_per_class=60, image_size=48, seed=2)
    flat = root / "flat"
    shutil.copytree(demo / "PNEUMONIA", flat / "PNEUMONIA")
    (flat / "NORMAL").mkdir()
    for f in sorted((demo / "NORMAL").iterdir())[:30]:
        shutil.copy(f, flat / "NORMAL" / f.name)
    return flat


# Each method with each precision and each cache setting; the cross product is 20 runs, so the
# full matrix runs for the two structurally different cases (one model, an ensemble) and every
# other method covers both precisions and both cache settings once.
CASES = (
    [("none", p, c) for p in ("float32", "bfloat16") for c in (True, False)]
    + [("ensemble", p, c) for p in ("float32", "bfloat16") for c in (True, False)]
    + [(m, "float32", True) for m in ("class-weight", "undersample", "oversample")]
    + [(m, "bfloat16", False) for m in ("class-weight", "undersample", "oversample")]
)


@pytest.mark.parametrize(
    "method,precision,cache",
    CASES,
    ids=[f"{m}-{p}-{'cache' if c else 'nocache'}" for m, p, c in CASES],
)
def test_a_saved_run_rescores_exactly(
    method, precision, cache, unequal_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    # --weights none: with an ensemble every member must share the one random backbone.
    args = tiny_train_args(
        unequal_data,
        run,
        "--balance",
        method,
        "--precision",
        precision,
        "--feature-cache" if cache else "--no-feature-cache",
        trainable="none" if method != "undersample" else TINY_MID,
    )
    if method == "ensemble":
        args += ["--ensemble-size", "3"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert ("feature cache:" in r.output) == cache
    config = json.loads((run / "config.json").read_text())
    assert config["precision"] == precision
    trained = json.loads((run / "metrics.json").read_text())

    # The cache is gone (another machine, a cleaned disk): the frozen part is recomputed.
    shutil.rmtree(tmp_path / "cache" / "features", ignore_errors=True)
    r = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--split", "test"])
    assert r.exit_code == 0, r.output
    again = json.loads((run / "eval-test" / "metrics.json").read_text())
    for key in RESCORED_METRICS:
        assert again[key] == trained[key], key

    stored = list(csv.DictReader(io.StringIO((run / "predictions" / "test.csv").read_text())))
    assert (run / "eval-test" / "predictions.csv").read_text() == (
        run / "predictions" / "test.csv"
    ).read_text()  # every image's probability, exactly
    assert [row["path"] for row in stored] == [p for p, _ in _test_items(run)]
    r = CliRunner().invoke(main, ["predict", "--run", str(run)] + [row["path"] for row in stored])
    assert r.exit_code == 0, r.output
    predicted = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [float(row["p_pneumonia"]) for row in predicted] == [
        float(row["p_pneumonia"]) for row in stored
    ]
    labels = ["PNEUMONIA" if p else "NORMAL" for p in _predicted_positive(trained, stored)]
    assert [row["label"] for row in predicted] == labels


def _test_items(run: Path):
    splits = json.loads((run / "splits.json").read_text())
    return [(str(Path(splits["root"]) / p), y) for p, y in splits["test"]]


def _predicted_positive(metrics, rows):
    thresholds = metrics["member_thresholds"]
    if len(thresholds) == 1:
        return [float(r["p_pneumonia"]) >= thresholds[0] for r in rows]
    return [
        2 * sum(float(r[f"p_member{i + 1}"]) >= t for i, t in enumerate(thresholds))
        >= len(thresholds)
        for r in rows
    ]


def test_the_precision_a_run_used_is_kept_on_another_machine(unequal_data, tmp_path, monkeypatch):
    """A run trained and thresholded in float32 on a CPU is scored in float32 on a GPU too,
    unless the user asks otherwise (and is told)."""
    from pneumojax import model as model_module
    from pneumojax.scoring import load_run

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    r = CliRunner().invoke(main, tiny_train_args(unequal_data, run, epochs=1))  # --precision auto
    assert r.exit_code == 0, r.output
    config = json.loads((run / "config.json").read_text())
    assert config["precision"] == "float32" and config["requested"]["precision"] == "auto"
    monkeypatch.setattr(model_module.jax, "default_backend", lambda: "gpu")
    assert load_run(run).precision == "float32"
    notes = []
    assert load_run(run, precision="bfloat16", log=notes.append).precision == "bfloat16"
    assert any("not in the run's own float32" in n for n in notes)
    # A run folder from before precision was stored resolved: its recorded backend decides.
    config["precision"] = "auto"
    (run / "config.json").write_text(json.dumps(config))
    assert load_run(run).precision == "float32"
