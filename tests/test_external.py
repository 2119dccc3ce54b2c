"""A study's images from elsewhere: ``[[external]]`` sets scored for every experiment, adapted
copies, one-class and broken sets, and the report's section."""

import json
import shutil
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax.cli import main
from pneumojax.data import make_demo_dataset
from pneumojax.experiments import ExperimentError, load_study
from pneumojax.external import parse_eval_data
from pneumojax.predictions import read_predictions
from pneumojax.metrics import binary_metrics, choose_threshold
from pneumojax.stats import delong_auc_test


def _study_file(tmp_path, sets: str) -> str:
    path = tmp_path / "study.toml"
    path.write_text(
        textwrap.dedent("""\
        reference = "plain"
        [[experiment]]
        name = "plain"
        [[experiment]]
        name = "weighted"
        balance = "class-weight"
        [shared]
        backbone = "densenet121"
        cut = "conv2_block3_concat"
        weights = "none"
        image_size = 32
        batch_size = 8
        epochs = 1
        """)
        + sets
    )
    return str(path)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """Two tiny experiments scored on a labelled set (also adapted), a NORMAL-only set, a set
    whose folder does not exist and one whose images are all unreadable."""
    tmp = tmp_path_factory.mktemp("external")
    import os  # noqa: PLC0415

    os.environ["PNEUMOJAX_CACHE"] = str(tmp / "cache")
    data = make_demo_dataset(tmp / "xray", n_per_class=30, image_size=48, seed=1)
    other = make_demo_dataset(tmp / "other", n_per_class=14, image_size=56, seed=9)
    normal_only = tmp / "normal_only" / "NORMAL"
    shutil.copytree(other / "NORMAL", normal_only)
    broken = tmp / "broken" / "NORMAL"
    broken.mkdir(parents=True)
    (broken / "a.png").write_bytes(b"not a png")
    study = _study_file(
        tmp,
        textwrap.dedent(f"""\
        [[external]]
        name = "site_b"
        path = "{other}"
        adapt = true
        description = "another hospital"
        [[external]]
        name = "normals"
        path = "{normal_only.parent}"
        [[external]]
        name = "gone"
        path = "{tmp / "nowhere"}"
        """),
    )
    out = tmp / "study"
    r = CliRunner().invoke(
        main,
        ["study", study, "--data", str(data), "--out", str(out), "--eval-data",
         f"broken={broken.parent}"],
    )  # fmt: skip
    return out, r, study, data


def test_every_experiment_is_scored_on_every_set_at_its_validation_threshold(finished_study):
    out, r, _, _ = finished_study
    assert r.exit_code == 0, r.output
    assert "external set gone: no folder" in r.output
    assert "not scored on broken" in r.output
    assert "images from elsewhere, site_b (at each run's validation threshold):" in r.output
    assert "  plain (adapted): AUC " in r.output
    report = json.loads((out / "study.json").read_text())
    sets = {s["name"]: s for s in report["external"]}
    assert list(sets) == ["site_b", "normals", "gone", "broken"]
    site = sets["site_b"]
    assert [e["name"] for e in site["entries"]] == [
        "plain", "plain (adapted)", "weighted", "weighted (adapted)"
    ]  # fmt: skip
    for e in site["entries"]:
        run = (
            out / e["experiment"] if not e["adapted"] else out / "adapted/site_b" / e["experiment"]
        )
        own = json.loads((run / "metrics.json").read_text())
        assert e["metrics"]["n"] == 28 and e["counts"] == [14, 14]
        assert e["metrics"]["member_thresholds"] == own["member_thresholds"]
        # the oracle threshold is the one the set's own labels would choose
        _, y, p = read_predictions(run / "eval-site_b" / "predictions.csv")
        t = choose_threshold(y, p.mean(1), own["target_recall"])
        assert e["oracle"]["threshold"] == t
        assert e["oracle"]["specificity"] == binary_metrics(y, p.mean(1), t)["specificity"]
    plain, weighted = site["entries"][0], site["entries"][2]
    assert plain["vs_reference"] is None
    _, y, pa = read_predictions(out / "plain/eval-site_b/predictions.csv")
    _, _, pb = read_predictions(out / "weighted/eval-site_b/predictions.csv")
    assert weighted["vs_reference"]["delong_p"] == pytest.approx(
        delong_auc_test(y, pb.mean(1), pa.mean(1))["p"]
    )
    adapted = json.loads((out / "adapted/site_b/plain/config.json").read_text())["adaptation"]
    assert adapted["target_images"] == 28 and adapted["bn"] and "prior_shift" in adapted
    # the one-class set: specificity with its interval, no AUC, recall or oracle
    normals = sets["normals"]["entries"][0]
    assert normals["counts"] == [14, 0] and normals["metrics"]["auc"] is None
    assert None not in normals["metrics"]["ci95"]["specificity"] and normals["oracle"] is None
    assert sets["gone"]["found"] is False and sets["gone"]["entries"] == []
    assert sets["broken"]["entries"] == [] and len(sets["broken"]["errors"]) == 2


def test_the_report_shows_the_carve_and_elsewhere_side_by_side(finished_study):
    out, _, _, _ = finished_study
    md = (out / "study.md").read_text()
    assert "## Images from elsewhere: the carve and each external set side by side" in md
    assert "| site_b AUC [95% CI] |" in md and "oracle threshold (uses these labels)" in md
    assert "| plain (adapted) |" in md and "not scored: no folder" in md
    assert "study-plots/roc-site_b.png" in md and (out / "study-plots/roc-site_b.png").exists()
    page = (out / "study.html").read_text()
    assert (
        "<h2>Images from elsewhere</h2>" in page and "ROC curves and calibration on site_b" in page
    )


def test_a_rerun_skips_what_is_scored_and_report_only_keeps_every_set(finished_study):
    out, _, study, data = finished_study
    before = {p: p.stat().st_mtime_ns for p in out.rglob("eval-*/metrics.json")}
    r = CliRunner().invoke(main, ["study", study, "--data", str(data), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("eval-*/metrics.json")}
    r = CliRunner().invoke(
        main, ["study", study, "--data", str(data), "--out", str(out), "--report-only"]
    )
    assert r.exit_code == 0, r.output
    names = [s["name"] for s in json.loads((out / "study.json").read_text())["external"]]
    assert names == ["site_b", "normals", "gone", "broken"]  # --eval-data once: still shown


def test_external_tables_are_checked(tmp_path):
    for sets, message in (
        ('[[external]]\nname = "a b"\npath = "x"\n', "must be letters"),
        ('[[external]]\nname = "a"\n', "path must be a non-empty string"),
        ('[[external]]\nname = "a"\npath = "x"\nadapt = "yes"\n', "adapt must be true or false"),
        ('[[external]]\nname = "a"\npath = "x"\nsplit = "all"\n', "unknown key 'split'"),
        (
            '[[external]]\nname = "a"\npath = "x"\n[[external]]\nname = "a"\npath = "y"\n',
            "two external",
        ),
    ):
        with pytest.raises(ExperimentError, match=message):
            load_study(_study_file(tmp_path, sets))
    sets = parse_eval_data(["/data/nih_external/", "site=/data/other"])
    assert [(s.name, s.path) for s in sets] == [
        ("nih_external", "/data/nih_external/"),
        ("site", "/data/other"),
    ]
    assert np.all([not s.adapt for s in sets])
