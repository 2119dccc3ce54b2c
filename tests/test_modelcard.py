"""The model card: written by train, refreshed by evaluate with every set the run is scored on,
its figures those of the run folder, its command the run's, its limits worded from the
figures (another site's AUC fell: it says so; never scored elsewhere: it says that)."""

import json
import shlex

import pytest
from click.testing import CliRunner

from pneumojax import stats
from pneumojax.cli import main
from pneumojax.cli.training import train
from pneumojax.config import TrainConfig
from pneumojax.predictions import read_predictions
from pneumojax.modelcard import model_card, render_markdown

from conftest import MINI_DATA, NIH_DATA, tiny_train_args

pytestmark = pytest.mark.skipif(not MINI_DATA.is_dir(), reason=f"no data at {MINI_DATA}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMOJAX_CACHE", str(root / "cache"))
        out = root / "run"
        r = CliRunner().invoke(main, tiny_train_args(MINI_DATA, out, "--seed-ensemble", "2"))
        assert r.exit_code == 0, r.output
        assert "MODEL_CARD.md" in r.output
        yield out


def _card(run):
    return json.loads((run / "MODEL_CARD.json").read_text())


def test_train_writes_a_card_whose_figures_are_the_run_folders(run):
    card = _card(run)
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    (test,) = card["evaluations"]
    assert test["same_source_as_training"] and test["n"] == metrics["n"]
    for key in ("auc", "recall", "specificity", "accuracy"):
        assert test[key] == metrics[key] and test[f"{key}_ci"] == metrics["ci95"][key]
    assert card["threshold"]["value"] == metrics["threshold"]
    _, y, member_p = read_predictions(run / "predictions" / "test.csv")
    assert member_p.shape[1] == 2 and card["model"]["seed_ensemble"] == 2
    assert test["normal"] == int((y == 0).sum()) and test["pneumonia"] == int((y == 1).sum())
    assert test["ece"] == pytest.approx(stats.expected_calibration_error(y, member_p.mean(1)))
    assert card["model"]["trainable_params"] == config["plan"]["trainable_params"]
    assert card["training_data"]["splits"]["train"]["patients"] > 0
    text = (run / "MODEL_CARD.md").read_text()
    assert f"{metrics['auc']:.3f}" in text and "## Known limits" in text
    assert any("Never scored on images from another site" in x for x in card["limits"])


def test_the_cards_command_trains_the_same_configuration(run):
    args = shlex.split(_card(run)["command"])
    assert args[:2] == ["pneumojax", "train"]
    ctx = train.make_context("train", args[2:])
    stored = json.loads((run / "config.json").read_text())
    names = TrainConfig.__dataclass_fields__
    given = TrainConfig(**{k: v for k, v in ctx.params.items() if k in names})
    assert given == TrainConfig(**{k: v for k, v in stored.items() if k in names})


@pytest.mark.skipif(not NIH_DATA.is_dir(), reason=f"no data at {NIH_DATA}")
def test_evaluate_adds_the_other_site_and_the_limits_say_what_it_shows(run):
    r = CliRunner().invoke(
        main, ["evaluate", "--run", str(run), "--data", str(NIH_DATA), "--split", "all"]
    )
    assert r.exit_code == 0, r.output
    card = _card(run)
    own, nih = card["evaluations"]
    metrics = json.loads(next(run.glob("eval-*nih*/metrics.json")).read_text())
    assert nih["name"] == NIH_DATA.name and not nih["same_source_as_training"]
    assert nih["auc"] == metrics["auc"] and nih["auc_ci"] == metrics["ci95"]["auc"]
    assert nih["n"] == nih["normal"] + nih["pneumonia"] == metrics["n"]
    said = [x for x in card["limits"] if x.startswith(f"On {NIH_DATA.name}")]
    assert len(said) == 1 and f"{nih['auc']:.3f}" in said[0]
    assert ("do not transfer" in said[0]) == (own["auc"] - nih["auc"] > 0.05)
    assert not any("Never scored" in x for x in card["limits"])
    assert NIH_DATA.name in (run / "MODEL_CARD.md").read_text()
    # scoring the run's own test split again adds nothing (it is the first row already)
    r = CliRunner().invoke(main, ["evaluate", "--run", str(run)])
    assert r.exit_code == 0, r.output
    assert len(_card(run)["evaluations"]) == 2


def test_a_falling_external_auc_is_named_and_a_steady_one_is_not(run):
    card = model_card(run)
    own = card["evaluations"][0]
    steady = {**own, "name": "steady", "same_source_as_training": False}
    fallen = {**steady, "name": "fallen", "auc": own["auc"] - 0.2, "auc_ci": [0.1, 0.2]}
    card["evaluations"] = [own, steady, fallen]
    from pneumojax.modelcard import _limits  # noqa: PLC0415

    limits = {x.split(" ")[1]: x for x in _limits(card) if x.startswith("On ")}
    assert "do not transfer" in limits["fallen"] and "do not transfer" not in limits["steady"]
    assert "fallen" in render_markdown(card)


def test_an_unfinished_run_has_no_card_and_says_how_to_finish(run, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.json", "splits.json"):
        (unfinished / name).write_text((run / name).read_text())
    with pytest.raises(FileNotFoundError, match="--resume"):
        model_card(unfinished)
    with pytest.raises(FileNotFoundError, match="not a pneumojax run"):
        model_card(tmp_path)


def test_a_run_with_its_card_can_still_be_replaced(run):
    from pneumojax.runfolder import check_replaceable  # noqa: PLC0415

    assert (run / "MODEL_CARD.md").is_file()
    check_replaceable(run)  # --overwrite / a retry may replace it: the card is a run's file
