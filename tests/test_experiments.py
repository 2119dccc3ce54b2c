"""Experiments and studies as TOML files: the study's eight, precedence, errors, train --config."""

import dataclasses
import json
import shlex
import textwrap

import pytest
from click.testing import CliRunner

from pneumojax.backbones import get_backbone
from pneumojax.cli import main
from pneumojax.cli.training import train
from pneumojax.config import TrainConfig
from pneumojax.experiments import (
    CONFIGS_DIR,
    SEED_STUDY,
    Experiment,
    ExperimentError,
    command_line,
    load_experiment,
    load_study,
    resolve_options,
)
from pneumojax.model import make_plan

from conftest import REPO, tiny_train_args
from test_train import CUT

MID = "conv2d_44:average_pooling2d_4"  # experiment 4's trainable range
# name: backbone, cut, trainable, balance; reported trainable params, accuracy, recall, precision
SEED = {
    "resnet152": ("resnet152", "conv5_block3_1_relu", "none", "none", 4_194_690, 0.73, 0.98, 0.70),
    "densenet121": ("densenet121", "conv5_block15_1_relu", "none", "none", 1_048_962, 0.78, 1.00, 0.74),
    "inception_v3": ("inception_v3", "conv2d_86", "none", "none", 1_769_858, 0.78, 0.99, 0.74),
    "inception_v3_midrange": ("inception_v3", "conv2d_86", MID, "none", 2_733_378, 0.75, 0.99, 0.72),
    "inception_v3_midrange_oversample": ("inception_v3", "conv2d_86", MID, "oversample", 2_733_378, 0.81, 1.00, 0.77),
    "resnet50v2_class_weight": ("resnet50v2", "post_relu", "none", "class-weight", None, 0.80, 1.00, 0.76),
    "inception_v3_midrange_undersample": ("inception_v3", "conv2d_86", MID, "undersample", None, None, None, None),
    "inception_v3_midrange_ensemble": ("inception_v3", "conv2d_86", MID, "ensemble", None, None, None, None),
}  # fmt: skip


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_the_configs_folder_is_the_study_in_its_order():
    assert CONFIGS_DIR == REPO / "configs"
    files = {p.stem for p in CONFIGS_DIR.glob("*.toml")} - {
        "seed_study",
        "no_imagenet",
        "no_imagenet_levers",
        "no_imagenet_levers_v2",
    }
    assert files == set(SEED)
    study = load_study()  # the default: configs/seed_study.toml
    assert study.source == SEED_STUDY
    assert study.names == list(SEED)
    assert study.reference == "inception_v3_midrange"
    assert study.shared == {"image_size": 256, "weights": "imagenet", "patience": 5}
    assert all(e.description for e in study.experiments)
    for name in ("inception_v3_midrange_undersample", "inception_v3_midrange_ensemble"):
        assert "experiment 4's configuration" in study.experiment(name).description


@pytest.mark.parametrize("name", list(SEED))
def test_each_experiment_resolves_to_the_studys_configuration_and_parameter_count(name):
    backbone, cut, trainable, balance, params, acc, recall, precision = SEED[name]
    study = load_study()
    experiment = load_experiment(CONFIGS_DIR / f"{name}.toml")
    assert experiment.name == name and experiment.source == CONFIGS_DIR / f"{name}.toml"
    cfg = study.resolve(name)
    assert (cfg.backbone, cfg.cut, cfg.trainable, cfg.balance) == (
        backbone,
        cut,
        trainable,
        balance,
    )
    assert cfg.image_size == 256 and cfg.weights == "imagenet"
    reported = {
        k: v
        for k, v in zip(("trainable_params", "accuracy", "recall", "precision"), SEED[name][4:])
        if v is not None
    }
    assert experiment.seed_reported == reported
    plan = make_plan(get_backbone(cfg.backbone), cfg.cut, cfg.trainable, cfg.image_size)
    if params is not None:  # the study's own count, exactly, at 256 px
        assert plan.trainable_params == params


def test_precedence_defaults_then_shared_then_experiment_then_command_line(tmp_path):
    _write(
        tmp_path / "exp.toml",
        """
        backbone = "inception_v3"
        balance = "undersample"
        epochs = 7
        """,
    )
    _write(
        tmp_path / "study.toml",
        """
        experiments = ["exp.toml"]
        [shared]
        backbone = "resnet152"   # the experiment's own backbone wins
        epochs = 3               # so does its epochs
        image_size = 128         # the experiment says nothing: shared applies
        data = "shared-data"
        """,
    )
    study = load_study(tmp_path / "study.toml")
    cfg = study.resolve("exp")
    assert (cfg.backbone, cfg.balance, cfg.epochs, cfg.image_size, cfg.data) == (
        "inception_v3",
        "undersample",
        7,
        128,
        "shared-data",
    )
    assert cfg.patience == TrainConfig().patience  # neither says: the default
    cfg = study.resolve("exp", {"epochs": 1, "image_size": 96, "data": "cli-data"})
    assert (cfg.backbone, cfg.epochs, cfg.image_size, cfg.data) == (
        "inception_v3",
        1,
        96,
        "cli-data",
    )
    bare = resolve_options(Experiment("bare", {}))
    assert bare == TrainConfig()


def test_inline_experiments_and_files_together(tmp_path):
    _write(tmp_path / "sub" / "a.toml", 'backbone = "resnet152"\n')
    _write(
        tmp_path / "study.toml",
        """
        experiments = ["sub/a.toml"]
        reference = "b"
        [[experiment]]
        name = "b"
        backbone = "densenet121"
        learning_rate = 1          # an integer for a float option
        [experiment.seed_reported]
        auc = 0.9
        """,
    )
    study = load_study(tmp_path / "study.toml")
    assert study.names == ["a", "b"] and study.reference == "b"
    b = study.experiment("b")
    assert b.options == {"backbone": "densenet121", "learning_rate": 1.0}
    assert isinstance(b.options["learning_rate"], float) and b.seed_reported == {"auc": 0.9}
    assert b.source == (tmp_path / "study.toml").resolve()


@pytest.mark.parametrize(
    "text, fragments",
    [
        ('backbon = "resnet152"\n', ["unknown option 'backbon'", "did you mean 'backbone'?"]),
        ("image-size = 128\n", ["unknown option 'image-size'", "the key for --image-size is 'image_size'"]),
        ("lr = 0.1\n", ["the key for --lr is 'learning_rate'"]),
        ("log_every = 5\n", ["unknown option 'log_every'", "pneumojax train options: data, backbone"]),
        ('epochs = "3"\n', ['epochs must be an integer, got a string "3"']),
        ("feature_cache = 1\n", ["feature_cache must be true or false, got an integer 1"]),
        ("learning_rate = true\n", ["learning_rate must be a number, got a boolean true"]),
        ("backbone = [1]\n", ["backbone must be a string, got an array [1]"]),
        ("epochs = 0\n", ["epochs = 0:", "not in the range x>=1"]),
        ("learning_rate = nan\n", ["learning_rate = nan", "not a finite number"]),
        ('balance = "smote"\n', ['balance = "smote"', "'smote' is not one of", "'oversample'"]),
        ('backbone = "vgg16"\n', ["'vgg16' is not one of"]),
        ('name = "a/b"\n', ['name "a/b" must be letters']),
        ("description = 3\n", ["description must be a string"]),
        ("seed_reported = 1\n", ["seed_reported must be a table"]),
        ("[seed_reported]\naccuracy = 1.5\n", ["seed_reported.accuracy must be a number from 0 to 1"]),
        ("[seed_reported]\ntrainable_params = 1.5\n", ["trainable_params must be a non-negative integer"]),
        ("[seed_reported]\nrecal = 0.9\n", ["unknown [seed_reported] key 'recal'", "did you mean 'recall'?"]),
        ('backbone = "densenet121"\nepochs = \n', ["not valid TOML", "line 2"]),
        ('backbone = "densenet121"\nbackbone = "resnet152"\n', ["not valid TOML", "line 2"]),
    ],
)  # fmt: skip
def test_bad_experiment_files_are_clear_errors(tmp_path, text, fragments):
    path = _write(tmp_path / "exp.toml", text)
    with pytest.raises(ExperimentError) as e:
        load_experiment(path)
    assert str(e.value).startswith(str(path)), str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "study, fragments",
    [
        ('experiments = ["a.toml", "gone.toml"]\n', ["experiment file 'gone.toml' does not exist"]),
        ('experiments = ["a.toml", "a2.toml"]\n', ["two experiments are named 'a'", "a2.toml"]),
        ('experiments = ["a.toml"]\n[[experiment]]\nname = "a"\n', ["two experiments are named 'a'"]),
        ('experiments = ["a.toml"]\nreference = "aa"\n', ["reference 'aa' names no experiment", "did you mean 'a'?"]),
        ('experiments = ["a.toml"]\nreference = 4\n', ["reference must be an experiment's name"]),
        ('experiment = ["a.toml"]\n', ["experiment must be an array of tables"]),
        ('experiments = "a.toml"\n', ["experiments must be an array of file paths"]),
        ('experiments = ["a.toml"]\nrefrence = "a"\n', ["unknown key 'refrence'", "did you mean 'reference'?"]),
        ('experiments = ["a.toml"]\nepochs = 3\n', ["unknown key 'epochs'", "go in [shared]"]),
        ('experiments = ["a.toml"]\n[shared]\nepoch = 3\n', ["[shared]: unknown option 'epoch'", "'epochs'"]),
        ('experiments = ["a.toml"]\n[shared]\nimage_size = -1\n', ["[shared]: image_size = -1"]),
        ('[[experiment]]\nbackbone = "resnet152"\n', ["[[experiment]] number 1: an inline experiment needs a name"]),
        ("description = 'x'\n", ["lists no experiments"]),
        ('experiments = ["a.toml"]\nreference = a\n', ["not valid TOML", "line 2"]),
        ('experiments = ["bad.toml"]\n', ["bad.toml: unknown option 'bakbone'"]),
    ],
)  # fmt: skip
def test_bad_study_files_are_clear_errors(tmp_path, study, fragments):
    _write(tmp_path / "a.toml", 'backbone = "resnet152"\n')
    _write(tmp_path / "a2.toml", 'name = "a"\nbackbone = "densenet121"\n')
    _write(tmp_path / "bad.toml", 'bakbone = "resnet152"\n')
    path = _write(tmp_path / "study.toml", study)
    with pytest.raises(ExperimentError) as e:
        load_study(path)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_overrides_are_checked_too():
    with pytest.raises(ExperimentError, match="command-line options: unknown option 'epoch'"):
        resolve_options(load_experiment(CONFIGS_DIR / "densenet121.toml"), overrides={"epoch": 1})
    with pytest.raises(ExperimentError, match="shared options: batch_size = 0"):
        resolve_options(Experiment("x", {}), shared={"batch_size": 0})
    with pytest.raises(ExperimentError, match="experiment file .*missing.toml does not exist"):
        load_experiment(CONFIGS_DIR / "missing.toml")


def _parse_train_line(line: str) -> TrainConfig:
    words = shlex.split(line)
    assert words[:2] == ["pneumojax", "train"]
    params = train.make_context("train", words[2:]).params
    return TrainConfig(
        **{f.name: params[f.name] for f in dataclasses.fields(TrainConfig) if f.name in params}
    )


@pytest.mark.parametrize("name", list(SEED))
def test_command_line_reproduces_each_seed_experiment(name):
    cfg = load_study().resolve(name, {"data": "../shared/data/chest_xray_mini", "epochs": 3})
    line = command_line(cfg)
    assert _parse_train_line(line) == cfg
    assert f"--backbone {cfg.backbone}" in line and "--epochs 3" in line
    assert "--image-size" not in line and "--weights" not in line  # the defaults stay out


def test_command_line_round_trips_every_kind_of_option():
    cfg = dataclasses.replace(
        TrainConfig(),
        data="my data/with 'quotes'",
        learning_rate=3e-5,
        val_fraction=0.2,
        feature_cache=False,
        strict=True,
        balance="ensemble",
        ensemble_size=3,
        lr_schedule="constant",
        precision="bfloat16",
        seed=7,
        patience=0,
    )
    line = command_line(cfg)
    assert "--no-feature-cache" in line and "--strict" in line and "--lr 3e-05" in line
    assert _parse_train_line(line) == cfg
    assert command_line(TrainConfig()) == "pneumojax train --backbone densenet121"
    assert command_line(TrainConfig(), always=()) == "pneumojax train"
    with pytest.raises(ValueError, match="log_every"):
        command_line(dataclasses.replace(TrainConfig(), log_every=1))


def test_train_config_dry_run_file_then_command_line(tmp_path):
    path = _write(tmp_path / "mine.toml", 'backbone = "inception_v3"\nimage_size = 128\n')
    args = ["train", "--config", str(path), "--dry-run"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "experiment mine (" in r.output and "--out runs/mine" in r.output
    assert "backbone=inception_v3 cut=conv2d_86 input_size=128" in r.output
    # Given on the command line, even at its default value, an option beats the file.
    r = CliRunner().invoke(main, args + ["--image-size", "256", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "input_size=256" in r.output and f"--out {tmp_path / 'o'}" in r.output


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--resume"], "--resume continues the run in --out with its own config.json"),
        (["--val-fraction", "0.9"], "--val-fraction plus --test-fraction"),
        (["--cut", "nope"], "densenet121 has no layer 'nope'"),
    ],
)
def test_train_config_usage_errors_exit_2(extra, fragment):
    r = CliRunner().invoke(
        main, ["train", "--config", str(CONFIGS_DIR / "densenet121.toml"), "--dry-run", *extra]
    )
    assert r.exit_code == 2 and fragment in r.output, r.output


def test_train_config_file_errors_exit_2(tmp_path):
    path = _write(tmp_path / "bad.toml", 'backbone = "densenet121"\nepocs = 3\n')
    r = CliRunner().invoke(main, ["train", "--config", str(path), "--dry-run"])
    assert r.exit_code == 2
    assert f"error: {path}: unknown option 'epocs'; did you mean 'epochs'?" in r.output
    r = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "none.toml")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_train_config_with_command_line_overrides_trains(tmp_path, monkeypatch):
    from pneumojax.data import make_demo_dataset

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    data = make_demo_dataset(tmp_path / "xray", n_per_class=20, image_size=48)
    out = tmp_path / "run"
    r = CliRunner().invoke(
        main,
        [
            *tiny_train_args(data, out, epochs=1),
            "--config",
            str(CONFIGS_DIR / "densenet121.toml"),
        ],
    )
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "densenet121" and config["balance"] == "none"  # the file's
    assert (config["cut"], config["image_size"], config["epochs"]) == (CUT, 32, 1)  # the CLI's
    assert (config["batch_size"], config["weights"], config["data"]) == (8, "none", str(data))
    assert config["experiment"] == {
        "file": str(CONFIGS_DIR / "densenet121.toml"),
        "name": "densenet121",
        "description": load_experiment(CONFIGS_DIR / "densenet121.toml").description,
        "seed_reported": {
            "trainable_params": 1_048_962,
            "accuracy": 0.78,
            "recall": 1.0,
            "precision": 0.74,
        },
    }
    assert (out / "metrics.json").exists()
    # Another experiment refused on that folder leaves the run's record alone.
    other = _write(tmp_path / "other.toml", 'backbone = "densenet121"\n')
    r = CliRunner().invoke(main, ["train", "--config", str(other), "--out", str(out)])
    assert r.exit_code == 2 and "already holds a run" in r.output
    assert json.loads((out / "config.json").read_text())["experiment"]["name"] == "densenet121"


@pytest.mark.parametrize(
    "target, message",
    [
        ("auc = 1.2", "auc must be a number from 0 to 1, got a number 1.2"),
        ('specificity = "high"', 'specificity must be a number from 0 to 1, got a string "high"'),
        ("minutes = 0", "minutes must be a positive number, got an integer 0"),
        ("aucc = 0.9", "unknown key 'aucc'; did you mean 'auc'?"),
        ("target_recall = 0.9", "unknown key 'target_recall'"),
    ],
)
def test_a_bad_study_target_is_named(tmp_path, target, message):
    study = _write(
        tmp_path / "study.toml",
        f"""\
        [[experiment]]
        name = "exp"
        backbone = "densenet121"
        [target]
        {target}
        """,
    )
    with pytest.raises(ExperimentError) as e:
        load_study(study)
    assert f"{study} [target]: {message}" in str(e.value)


def test_a_study_target_is_read_as_numbers(tmp_path):
    study = _write(
        tmp_path / "study.toml",
        """\
        [[experiment]]
        name = "exp"
        [target]
        auc = 0.968
        specificity = 0.8
        minutes = 60
        """,
    )
    assert load_study(study).target == {"auc": 0.968, "specificity": 0.8, "minutes": 60.0}
    assert load_study().target == {}  # the seed study states none


def test_the_second_lever_screen_changes_one_thing_of_v2_at_a_time():
    study = load_study(CONFIGS_DIR / "no_imagenet_levers_v2.toml")
    base = dataclasses.asdict(study.resolve("eq_texture"))
    recipe = load_study(CONFIGS_DIR / "no_imagenet.toml").resolve("recipe")
    assert (base["intensity"], base["device_augment"]) == (
        recipe.intensity,
        recipe.device_augment,
    )
    changed = {
        name: {k for k, v in dataclasses.asdict(study.resolve(name)).items() if v != base[k]}
        for name in study.names
    }
    assert changed["eq_texture_cosine"] == {"lr_schedule", "warmup_epochs"}
    assert changed["clahe_texture"] == {"intensity"}
    assert changed["eq_texture.s1"] == {"seed"} == changed["clahe_texture.s1"] - {"intensity"}
    assert [s.name for s in study.external] == ["nih"]


def test_each_lever_experiment_adds_one_lever_to_the_one_before():
    study = load_study(CONFIGS_DIR / "no_imagenet_levers.toml")
    configs = [dataclasses.asdict(study.resolve(name)) for name in study.names]
    added = [
        {k for k in after if after[k] != before[k]} for before, after in zip(configs, configs[1:])
    ]
    assert study.names == ["random_features", "scratch", "optimisation", "augment"]
    assert added == [
        {"trainable", "image_size", "epochs", "patience"},  # train it all, from scratch
        {"optimizer", "weight_decay", "lr_schedule", "warmup_epochs", "label_smoothing", "ema"},
        {"device_augment"},
    ]
    assert all(c["weights"] == "none" for c in configs) and study.reference == "scratch"
    recipe = load_study(CONFIGS_DIR / "no_imagenet.toml").resolve("recipe")
    # recipe v2 is the scratch run on equalised images with texture augmentation, two seeds
    # (the levers chosen by images from another hospital: docs/cross-site.md)
    scratch = dict(
        configs[1],
        seed_ensemble=recipe.seed_ensemble,
        epochs=8,
        intensity="equalize",
        device_augment="blur=1.5,sharpen=1.5,noise=6",
    )
    assert scratch == dataclasses.asdict(recipe)


def test_the_no_imagenet_study_trains_from_random_init_with_the_recipe_as_reference():
    study = load_study(CONFIGS_DIR / "no_imagenet.toml")
    assert study.reference == "recipe" and set(study.names) == {"recipe", "random_features"}
    # scored on (and adapted to) another hospital's images wherever they are beside the checkout
    assert [(s.name, s.path, s.adapt) for s in study.external] == [
        ("nih", "../shared/data/nih_external", True)
    ]
    assert study.target == {"auc": 0.968, "specificity": 0.8, "recall": 0.98, "minutes": 60.0}
    for name in study.names:  # no ImageNet anywhere, whatever the user's default
        assert study.resolve(name).weights == "none"
    recipe = study.resolve("recipe")
    assert recipe.trainable == "all" and recipe.target_recall == 0.98
    assert recipe.seed_ensemble == 2 and recipe.patience == 0
    plan = make_plan(get_backbone(recipe.backbone), recipe.cut, recipe.trainable, 64)
    assert plan.trainable_params > 6_000_000  # the whole DenseNet121 learns
    line = command_line(recipe)
    assert "--weights none" in line and "--trainable all" in line
