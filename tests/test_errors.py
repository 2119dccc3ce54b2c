"""Bad input gets a clear error (no traceback), and nothing is lost when a run is interrupted."""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from pneumojax.backbones import get_backbone
from pneumojax.cli import main
from pneumojax.model import TrainableSpecError, parse_trainable
from pneumojax.train import FitOptions, NonFiniteLoss, fit

from conftest import REPO, tiny_train_args
from test_train import MID, _tiny

INCEPTION = get_backbone("inception_v3")
NAMES = [s.name for s in INCEPTION.layers]
_token = st.one_of(
    st.sampled_from(NAMES), st.integers(-400, 400).map(str), st.text(max_size=6), st.just("")
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=30),
        st.lists(st.tuples(_token, st.sampled_from([":", "", "::"]), _token), max_size=3).map(
            lambda parts: ",".join(a + sep + b for a, sep, b in parts)
        ),
    )
)
def test_trainable_parser_parses_or_gives_a_clear_error(spec):
    try:
        ranges, layers = parse_trainable(spec, INCEPTION, "conv2d_86")
    except TrainableSpecError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert all(name in INCEPTION.layer_index for name in layers)
    for first, last in ranges:
        assert INCEPTION.layer_index[first] <= INCEPTION.layer_index[last] <= 283


def _invoke(*args):
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--backbone", "vgg16"], 2, "'vgg16' is not one of"),
        (["--backbone", "inception_v3", "--image-size", "64"], 2, "needs --image-size >= 75"),
        (["--trainable", "conv2_block3_concat:conv2_block1_concat"], 2, "selects no layer"),
        (["--trainable", "relu:"], 2, "after the cut layer conv5_block15_1_relu"),
        (["--cut", "conv9"], 2, "densenet121 has no layer 'conv9'"),
    ],
)
def test_model_usage_errors_exit_2(args, code, message):
    result = _invoke("train", "--dry-run", *args)
    assert result.exit_code == code and message in result.output


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    from pneumojax.data import make_demo_dataset

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    return make_demo_dataset(tmp_path / "xray", n_per_class=40, image_size=48, seed=1)


def test_checkpoint_errors_name_the_problem(tiny_data, tmp_path):
    half = tmp_path / "half"
    (half / "variables").mkdir(parents=True)
    result = _invoke(
        *tiny_train_args(tiny_data, tmp_path / "r1", "--weights", str(half), epochs=None)
    )
    assert result.exit_code == 1 and "incomplete" in result.output
    result = _invoke(
        *tiny_train_args(tiny_data, tmp_path / "r2", "--weights", str(tmp_path / "no"), epochs=None)
    )
    assert result.exit_code == 1 and "does not exist" in result.output
    from pneumojax.checkpoint import save_variables

    save_variables(tmp_path / "other", {"params": {}}, {"backbone": "resnet152"})
    result = _invoke(
        *tiny_train_args(
            tiny_data, tmp_path / "r3", "--weights", str(tmp_path / "other"), epochs=None
        )
    )
    assert result.exit_code == 1 and "holds resnet152 weights, not densenet121" in result.output


def test_resume_without_a_run_is_a_clear_error(tmp_path):
    result = _invoke("train", "--out", str(tmp_path / "nothing"), "--resume")
    assert result.exit_code == 1 and "holds no run to continue" in result.output


def test_nan_loss_stops_and_says_where(tmp_path):
    steps, variables, _, train, val = _tiny(MID, lr=1e30)
    with pytest.raises(NonFiniteLoss, match=r"at epoch 1, step \d+; the last good checkpoint"):
        fit(
            steps,
            variables,
            train,
            val,
            FitOptions(epochs=2, batch_size=8, patience=0, learning_rate=1e30, log_every=1),
            tmp_path,
        )


def test_disk_full_while_saving_is_reported(tiny_data, tmp_path, monkeypatch):
    from pneumojax import runcheckpoints as train_module

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run"))

    monkeypatch.setattr(train_module.RunCheckpoints, "save_last", full)
    result = _invoke(*tiny_train_args(tiny_data, tmp_path / "run", epochs=1))
    assert result.exit_code == 1 and "disk full while writing" in result.output
    assert "--resume" in result.output


def _spawn(args, env):
    return subprocess.Popen(
        [sys.executable, "-m", "pneumojax.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _env(tmp_path):
    return {**os.environ, "PNEUMOJAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}


@pytest.mark.slow
def test_sigterm_saves_and_resume_finishes(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_train_args(tiny_data, out, "--patience", "0", epochs=30)
    proc = _spawn(args, _env(tmp_path))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 2/30"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted by SIGTERM" in rest and "--resume" in rest
    done = subprocess.run(
        [sys.executable, "-m", "pneumojax.cli", "train", "--out", str(out), "--resume"],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    history = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 31))


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_completes(tiny_data, tmp_path):
    out = tmp_path / "run"
    epochs = 12
    args = tiny_train_args(tiny_data, out, "--patience", "0", epochs=epochs)
    rng = random.Random(7)
    checkpointed = []  # whether a complete checkpoint was on disk at each kill
    outputs = []
    for _ in range(3):
        proc = _spawn(
            args + (["--resume"] if (out / "config.json").exists() else ["--overwrite"]),
            _env(tmp_path),
        )
        lines = []
        for line in proc.stdout:  # a random point after the process finishes an epoch
            lines.append(line)
            if re.match(r"epoch \d+/\d+ ", line):
                break
        time.sleep(rng.uniform(0.0, 3.0))
        checkpointed.append(_has_checkpoint(out))  # a checkpoint on disk now stays there
        proc.kill()  # SIGKILL: no handler runs
        outputs.append("".join(lines) + proc.communicate()[0])
    done = subprocess.run(
        [sys.executable, "-m", "pneumojax.cli"]
        + (["train", "--out", str(out), "--resume"] if (out / "config.json").exists() else args),
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    outputs.append(done.stdout + done.stderr)
    assert any(checkpointed), "every kill came before the first checkpoint"
    for had, output in zip(checkpointed, outputs[1:]):  # each run after a kill
        assert "resuming at epoch" in output or not had, output
    history = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    predicted = _invoke("predict", "--run", str(out), str(tiny_data / "NORMAL"))
    assert predicted.exit_code == 0 and len(predicted.output.splitlines()) == 41


def _has_checkpoint(run_dir):
    last = run_dir / "checkpoints" / "last"
    return last.is_dir() and any(p.name.isdigit() for p in last.iterdir())
