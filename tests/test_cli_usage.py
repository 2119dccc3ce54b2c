"""Readable logs, `pneumojax --version`, and out-of-range options as usage errors (exit 2)."""

import io
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
from click.testing import CliRunner

from pneumojax import hugepages
from pneumojax.cli import main

from conftest import REPO, tiny_train_args


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    from tqdm.std import tqdm as tqdm_std

    from pneumojax.progress import progress_bar

    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = progress_bar(range(3), desc="decoding 32px", unit="img")
    assert isinstance(bar, tqdm_std)
    assert list(bar) == [0, 1, 2]
    assert "\r" in sys.stderr.getvalue() and "decoding 32px" in sys.stderr.getvalue()


def test_progress_in_a_log_is_one_line_at_the_end(monkeypatch):
    from pneumojax.progress import progress_bar

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    seen = []
    for item in progress_bar(iter("abcd"), desc="decoding 32px", total=4, unit="img"):
        assert sys.stderr.getvalue() == ""  # nothing per step
        seen.append(item)
    assert seen == list("abcd")
    lines = sys.stderr.getvalue().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("decoding 32px: 4 images in ")
        and lines[0].endswith(" s")
    )

    sys.stderr.truncate(0)
    sys.stderr.seek(0)
    epoch = progress_bar(range(2), desc="epoch 1", total=2, initial=0, summary=False)
    for _ in epoch:
        epoch.set_postfix(loss="0.5")  # what fit calls on a bar
    epoch.close()
    assert list(progress_bar(range(2), desc="checking images", disable=True)) == [0, 1]
    assert list(progress_bar(range(2))) == [0, 1]  # no desc: nothing to name the phase by
    assert sys.stderr.getvalue() == ""


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    from pneumojax.data import make_demo_dataset

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    return make_demo_dataset(tmp_path / "xray", n_per_class=40, image_size=48, seed=1)


def test_train_log_redirected_to_files_has_no_bar_redraws(tiny_data, tmp_path):
    """Also: --val-fraction and --test-fraction reach the split."""
    unset = ("GLIBC_TUNABLES", hugepages.OPT_OUT, hugepages.MARKER)
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(PNEUMOJAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pneumojax",  # the console command's own entry (it may start itself again)
                *tiny_train_args(
                    tiny_data,
                    tmp_path / "run",
                    "--val-fraction",
                    "0.25",
                    "--test-fraction",
                    "0.25",
                ),
            ],
            cwd=REPO,
            env=env,
            stdout=stdout,
            stderr=stderr,
            timeout=300,
        )
    log, errors = out.read_text(), err.read_text()
    assert done.returncode == 0, log + errors
    assert "\r" not in log and "\r" not in errors and "\x1b[" not in errors
    epochs = [line.split(" loss=")[0] for line in log.splitlines() if line.startswith("epoch ")]
    assert epochs == ["epoch 1/2", "epoch 2/2"], log  # one line per epoch
    assert any(
        l.startswith("decoding 32px: ") and " images in " in l for l in errors.splitlines()
    ), errors
    # One line per phase: decoding three splits, frozen activations of three, predicting test.
    assert len(errors.splitlines()) <= 12, errors
    info = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert (info["info"]["val_fraction"], info["info"]["test_fraction"]) == (0.25, 0.25)
    assert 16 <= len(info["val"]) <= 24 and 16 <= len(info["test"]) <= 24  # of 80 images
    # The command ran with transparent huge pages for glibc's big blocks where that can
    # matter here (pneumojax.hugepages), and the run folder says how it ran.
    tunables = json.loads((tmp_path / "run" / "config.json").read_text())["environment"][
        "glibc_tunables"
    ]
    expected = hugepages.tunables(env)
    assert tunables == expected, (tunables, expected)


def test_version_names_pneumojax_jax_and_flax():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"pneumojax {metadata.version('pneumojax')} ")
    assert f"jax {metadata.version('jax')}" in result.output
    assert f"flax {metadata.version('flax')}" in result.output


MISSING = "/nonexistent/chest_xray"


def _bad(option):
    return f"Invalid value for '{option}'"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], _bad("--epochs")),
        (["--batch-size", "0"], _bad("--batch-size")),
        (["--lr", "-1"], _bad("--lr")),
        (["--lr", "0"], _bad("--lr")),
        (["--lr", "nan"], _bad("--lr")),
        (["--patience", "-1"], _bad("--patience")),
        (["--seed", "-3"], _bad("--seed")),
        (["--target-recall", "1.5"], _bad("--target-recall")),
        (["--target-recall", "0"], _bad("--target-recall")),
        (["--target-recall", "inf"], _bad("--target-recall")),
        (["--ensemble-size", "0"], _bad("--ensemble-size")),
        (["--val-fraction", "1"], _bad("--val-fraction")),
        (["--val-fraction", "0"], _bad("--val-fraction")),  # validation picks the threshold
        (["--test-fraction", "-0.1"], _bad("--test-fraction")),
        (
            ["--val-fraction", "0.5", "--test-fraction", "0.5"],
            "--val-fraction plus --test-fraction must be below 1",
        ),
        (["--num-processes", "2"], "--num-processes needs --distributed"),
        (["--distributed", "--num-processes", "0"], _bad("--num-processes")),
        (["--distributed", "--process-id", "-1"], _bad("--process-id")),
        (["--distributed", "--num-processes", "2", "--process-id", "2"], _bad("--process-id")),
    ],
)
def test_out_of_range_train_option_is_a_usage_error_before_any_data(args, message):
    result = CliRunner().invoke(main, ["train", "--data", MISSING, "--weights", "none", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and MISSING not in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, option",
    [
        (["layers", "--backbone", "densenet121", "--input-size", "0"], "--input-size"),
        (["layers", "--backbone", "inception_v3", "--input-size", "64"], "--input-size"),
        (
            ["port", "--backbone", "inception_v3", "--weights", "none", "--input-size", "64"],
            "--input-size",
        ),
        (
            ["port", "--backbone", "densenet121", "--weights", "none", "--input-size", "-1"],
            "--input-size",
        ),
        (
            ["port", "--backbone", "densenet121", "--weights", "none", "--randomize", "-1"],
            "--randomize",
        ),
    ],
)
def test_out_of_range_layers_and_port_options_are_usage_errors(args, option, tmp_path):
    result = CliRunner().invoke(
        main, [*args] + (["--out", str(tmp_path / "c")] if args[0] == "port" else [])
    )
    assert result.exit_code == 2, result.output
    assert _bad(option) in result.output and "Traceback" not in result.output


def test_in_range_edge_values_are_accepted():
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--dry-run",
            "--weights",
            "none",
            "--val-fraction",
            "0.2",
            "--test-fraction",
            "0",
            "--target-recall",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output


def test_split_errors_name_the_cli_options():
    from pneumojax.data import DataError
    from pneumojax.data.splits import _check_both_classes

    with pytest.raises(DataError, match="--val-fraction/--test-fraction"):
        _check_both_classes(
            {"train": [("person1_bacteria_1.jpeg", 1), ("IM-0001-0001.jpeg", 0)], "val": []}
        )
    with pytest.raises(DataError, match="--val-fraction/--test-fraction"):
        _check_both_classes(
            {
                "train": [("person1_bacteria_1.jpeg", 1), ("IM-0001-0001.jpeg", 0)],
                "val": [("person2_bacteria_2.jpeg", 1)],
            }
        )


def test_ensemble_size_without_ensemble_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(
        main, ["train", "--data", str(tmp_path / "nowhere"), "--ensemble-size", "3", "--dry-run"]
    )
    assert r.exit_code == 2 and "--ensemble-size needs --balance ensemble" in r.output


def test_evaluate_and_predict_take_a_precision_override():
    for command in ("evaluate", "predict"):
        r = CliRunner().invoke(main, [command, "--help"])
        assert "--precision" in r.output
