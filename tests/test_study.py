"""`pneumojax study`: every experiment into one folder, skipped when finished, resumed when
interrupted, failures reported; a report whose every figure comes from the run folders."""

import base64
import io
import json
import re
import textwrap

import pytest
from click.testing import CliRunner
from PIL import Image

from pneumojax.cli import main
from pneumojax.data import make_demo_dataset

FAST = 'cut = "conv2_block3_concat"\n'  # a short DenseNet121 prefix: quick compiles


def _study(tmp_path, broken=False):
    """Three tiny experiments (one with a class-imbalance method), the first the reference."""
    folder = tmp_path / "configs"
    folder.mkdir()
    for name, extra in (
        ("plain", ""),
        ("weighted", 'balance = "class-weight"\n'),
        ("midrange", 'trainable = "conv2_block2_0_bn:conv2_block3_0_bn"\n'),
    ):
        (folder / f"{name}.toml").write_text(
            f'backbone = "densenet121"\n{FAST}{extra}'
            + (
                "[seed_reported]\naccuracy = 0.78\nrecall = 1.0\nprecision = 0.74\n"
                if name == "plain"
                else ""
            )
        )
    names = ["plain.toml", "weighted.toml", "midrange.toml"]
    if broken:  # a cut that exists but a trainable range after it: fails in its plan
        (folder / "broken.toml").write_text(
            'backbone = "densenet121"\n' + FAST + 'trainable = "conv5_block1_0_bn:"\n'
        )
        names.append("broken.toml")
    (folder / "study.toml").write_text(
        textwrap.dedent(f"""\
        experiments = {json.dumps(names)}
        reference = "plain"
        [target]
        auc = 0.0
        specificity = 1.0
        minutes = 600
        [shared]
        weights = "none"
        image_size = 32
        batch_size = 8
        epochs = 1
        """)
    )
    return folder / "study.toml"


def _invoke(study, data, out, *extra):
    return CliRunner().invoke(
        main, ["study", str(study), "--data", str(data), "--out", str(out), *extra]
    )


def test_a_study_runs_every_experiment_and_a_rerun_skips_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    data = make_demo_dataset(tmp_path / "xray", n_per_class=30, image_size=48, seed=1)
    study, out = _study(tmp_path), tmp_path / "study"
    r = _invoke(study, data, out)
    assert r.exit_code == 0, r.output
    assert len(re.findall(r"^\[\d/3\] \w+: done in", r.output, re.M)) == 3
    report = json.loads((out / "study.json").read_text())
    assert report["reference"] == "plain" and [row["name"] for row in report["rows"]] == [
        "plain",
        "weighted",
        "midrange",
    ]
    for row in report["rows"]:
        metrics = json.loads((out / row["name"] / "metrics.json").read_text())
        assert row["test"] == metrics  # the report's figures are the run folder's
        assert row["command"].startswith("pneumojax train ")
        assert set(row["operating_points"]) == {
            "sensitivity_at_specificity_0.8",
            "sensitivity_at_specificity_0.9",
            "specificity_at_recall_0.95",
            "specificity_at_recall_0.98",
        }
        assert 0 <= row["calibration"]["brier"] <= 1 and 0 <= row["calibration"]["ece"] <= 1
        config = json.loads((out / row["name"] / "config.json").read_text())
        assert config["experiment"]["name"] == row["name"]
    plain, weighted = report["rows"][0], report["rows"][1]
    assert plain["vs_reference"] is None and plain["seed_reported"]["accuracy"] == 0.78
    assert set(weighted["vs_reference"]) >= {"auc_delta", "auc_delta_ci95", "delong_p", "mcnemar_p"}
    assert (
        abs(
            weighted["vs_reference"]["auc_delta"] - (weighted["test"]["auc"] - plain["test"]["auc"])
        )
        < 1e-9
    )
    # The [target] lines read the reference's own figures and the experiments' wall times.
    lines = {line["key"]: line for line in report["target"]["lines"]}
    assert lines["auc"]["value"] == plain["test"]["auc"] and lines["auc"]["met"] is True
    spec = plain["test"]["specificity"]
    assert lines["specificity"]["value"] == spec and lines["specificity"]["met"] is (spec >= 1.0)
    wall = sum(json.loads((out / n / "metrics.json").read_text())["training"]["seconds"]["total"]
               for n in ("plain", "weighted", "midrange"))  # fmt: skip
    assert lines["minutes"]["value"] == pytest.approx(wall / 60) and lines["minutes"]["met"]
    assert report["target"]["met"] is (spec >= 1.0)
    assert re.search(r"^Target: (met|NOT met) \(reference plain on test\)$", r.output, re.M)
    assert re.search(r"^  minutes: [\d.]+ min \(target at most 600 min", r.output, re.M)
    md = (out / "study.md").read_text()
    assert "## Target: " in md
    assert "| plain |" in md and "0.78 / 1.00 / 0.74" in md and "DeLong p" in md

    page = (out / "study.html").read_text()
    assert not re.search(r"(src|href)=[\"'](?!data:)", page)  # self-contained
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 2 + 2 * 3  # ROC, reliability; each experiment's matrix and curves
    for b64 in images:
        Image.open(io.BytesIO(base64.b64decode(b64))).verify()

    before = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    again = _invoke(study, data, out)
    assert again.exit_code == 0, again.output
    assert len(re.findall(r": skipped in", again.output)) == 3
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}


def test_a_failing_experiment_is_reported_and_the_study_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    data = make_demo_dataset(tmp_path / "xray", n_per_class=30, image_size=48, seed=1)
    study, out = _study(tmp_path, broken=True), tmp_path / "study"
    external = make_demo_dataset(tmp_path / "other_hospital", n_per_class=12, image_size=40, seed=5)
    r = _invoke(study, data, out, "--only", "plain,broken", "--eval-data", str(external))
    assert r.exit_code == 1
    assert re.search(r"\[2/2\] broken: failed in .*\(", r.output)
    assert "[1/2] plain: done" in r.output and "not finished: broken" in r.output
    report = json.loads((out / "study.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["plain"]
    ext = report["rows"][0]["external"]["other_hospital"]  # named after its folder
    assert ext["n"] == 24  # every image of the external folder
    assert ext["threshold"] == report["rows"][0]["test"]["threshold"]
    assert "Images from elsewhere: other_hospital" in (out / "study.md").read_text()
    assert set(report["missing"]) == {"weighted", "midrange", "broken"}
    # With experiments unfinished, the time budget cannot be told; the reference's AUC can.
    lines = {line["key"]: line for line in report["target"]["lines"]}
    assert lines["minutes"]["value"] is None and lines["minutes"]["met"] is None
    assert lines["auc"]["met"] is True and report["target"]["met"] is None
    assert "not known yet" in (out / "study.md").read_text()


def test_an_interrupted_experiment_resumes(tmp_path, monkeypatch):
    from pneumojax.experiments import load_study
    from pneumojax.study import run_folder_state, run_study

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    data = make_demo_dataset(tmp_path / "xray", n_per_class=30, image_size=48, seed=1)
    spec, out = load_study(_study(tmp_path)), tmp_path / "study"
    from pneumojax.run import train_run

    def interrupted(cfg, resume=False, log=print):
        return train_run(cfg, resume=resume, log=log, stop_after_steps=1)

    from pneumojax.train import Interrupted

    with pytest.raises(Interrupted):  # an interrupt stops the study rather than failing one run
        run_study(spec, out, {"data": str(data)}, only=["plain"], train=interrupted)
    assert run_folder_state(out / "plain") == "interrupted"
    outcome = run_study(spec, out, {"data": str(data)}, only=["plain"], log=lambda m: None)
    assert run_folder_state(out / "plain") == "finished"
    assert [o.status for o in outcome] == ["resumed"]


def test_the_target_verdict_compares_each_line_with_the_reference_and_the_wall_time():
    from pneumojax.study import target_verdict

    def row(auc, spec, wall):
        ci = {"auc": [auc - 0.01, auc + 0.01]}
        return {"test": {"auc": auc, "specificity": spec, "ci95": ci}, "wall_s": wall}

    ref, other = row(0.97, 0.79, 1800.0), row(0.5, 0.5, 1500.0)
    target = {"auc": 0.968, "specificity": 0.8, "minutes": 60.0}
    v = target_verdict(target, ref, [ref, other], [])
    lines = {line["key"]: line for line in v["lines"]}
    assert lines["auc"]["met"] is True and lines["auc"]["ci95"] == [0.96, 0.98]
    assert lines["specificity"]["met"] is False  # 0.79 < 0.80: not met, however close
    assert lines["minutes"]["value"] == 55.0 and lines["minutes"]["met"] is True
    assert v["met"] is False
    assert target_verdict({"minutes": 50.0}, ref, [ref, other], [])["met"] is False
    assert target_verdict({"auc": 0.968}, ref, [ref], [])["met"] is True
    unknown = target_verdict({"auc": 0.968, "minutes": 60.0}, None, [other], ["ref"])
    assert unknown["met"] is None and all(line["met"] is None for line in unknown["lines"])
    assert target_verdict({}, ref, [ref], []) is None
