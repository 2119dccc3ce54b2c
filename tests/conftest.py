"""Shared test set-up: fast JAX on CPU, TensorFlow-marked tests, real-data locations."""

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]
HAS_TF = all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "keras"))


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
