"""Shared test set-up: fast JAX on CPU, TensorFlow-marked tests, real-data locations."""

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]
# JAX's persistent compilation cache for the suite (and the processes it starts): the same tiny
# models are compiled by many tests, and by every later run of the suite. The folder is safe to
# delete (`make clean-cache`); JAX keys each entry on the program, its options and versions.
JAX_CACHE = Path(os.environ.get("PNEUMOJAX_TEST_JAX_CACHE", REPO / ".jax-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(JAX_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
MINI_DATA = Path(
    os.environ.get("PNEUMOJAX_MINI_DATA", REPO.parent / "shared" / "data" / "chest_xray_mini")
)
TRAIN224_DATA = Path(
    os.environ.get(
        "PNEUMOJAX_TRAIN224_DATA", REPO.parent / "shared" / "data" / "chest_xray_train224"
    )
)
NIH_DATA = Path(
    os.environ.get("PNEUMOJAX_NIH_DATA", REPO.parent / "shared" / "data" / "nih_external")
)
HAS_TF = all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "keras"))

# What a saved run's re-scoring must reproduce exactly from its metrics.json.
RESCORED_METRICS = (
    "threshold",
    "member_thresholds",
    "confusion_matrix",
    "auc",
    "accuracy",
    "recall",
    "specificity",
    "at_0_5",
    "ci95",
)
TINY_CUT = "conv2_block3_concat"  # a short DenseNet121 prefix: quick to compile
TINY_MID = "conv2_block2_0_bn:conv2_block3_0_bn"  # a trainable range inside it


def tiny_train_args(
    data,
    out=None,
    *extra,
    cut=TINY_CUT,
    trainable=None,
    image_size=32,
    epochs=2,
    batch_size=8,
    weights="none",
) -> list[str]:
    """The `train` argument list of a tiny, fast run (DenseNet121 cut at conv2_block3_concat,
    random init), plus `extra` arguments. An option given as None is left out (its CLI
    default applies); `out=None` leaves out --out."""
    args = ["train", "--data", str(data)]
    if weights is not None:
        args += ["--weights", weights]
    args += ["--cut", cut]
    if trainable is not None:
        args += ["--trainable", trainable]
    for flag, value in (
        ("--image-size", image_size),
        ("--epochs", epochs),
        ("--batch-size", batch_size),
    ):
        if value is not None:
            args += [flag, str(value)]
    if out is not None:
        args += ["--out", str(out)]
    return args + [str(a) for a in extra]


def pytest_collection_modifyitems(config, items):
    if HAS_TF:
        return
    skip = pytest.mark.skip(
        reason="needs TensorFlow + Keras (pip install -e '.[test]' installs them)"
    )
    for item in items:
        if "tensorflow" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return (
        "TensorFlow/Keras: available, porting and parity tests run"
        if HAS_TF
        else "TensorFlow/Keras: NOT installed, tests marked 'tensorflow' will be SKIPPED"
    )


def run_figures(run):
    """A finished run's metrics.json (less its wall time) and history: what an equal run must
    reproduce exactly (resumed, or with options at their defaults)."""
    import json  # noqa: PLC0415

    metrics = json.loads((Path(run) / "metrics.json").read_text())
    metrics["training"].pop("seconds")
    return metrics, (Path(run) / "history.jsonl").read_text()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny finished run (tiny_train_args on the packaged real X-ray sample, ``--data
    sample``), trained once per session for the tests that only score with a run (serve)."""
    from click.testing import CliRunner  # noqa: PLC0415

    from pneumojax.cli import main  # noqa: PLC0415

    root = tmp_path_factory.mktemp("tiny_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PNEUMOJAX_CACHE", str(root / "cache"))
        result = CliRunner().invoke(main, tiny_train_args("sample", root / "run"))
    assert result.exit_code == 0, result.output
    return root / "run"
