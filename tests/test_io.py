"""Durable writes: a replaced file or checkpoint folder is never lost half-way."""

import os
import stat

import numpy as np
import pytest

from pneumojax import io as pio
from pneumojax.checkpoint import CheckpointError, load_variables, save_variables


def test_write_text_atomic_replaces_and_makes_a_readable_file(tmp_path):
    path = tmp_path / "a" / "x.json"
    pio.write_text_atomic(path, "one")
    pio.write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert list(path.parent.iterdir()) == [path]  # no temporary left behind
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o666 & ~_umask()  # not mkstemp's 0600


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def _variables(v):
    return {"params": {"dense": {"kernel": np.full((2, 3), v, np.float32)}}}


def test_a_replaced_model_folder_survives_a_kill_at_every_point(tmp_path, monkeypatch):
    target = tmp_path / "model"
    save_variables(target, _variables(1.0), {"n": 1})
    with pytest.raises(CheckpointError, match="already exists"):
        save_variables(target, _variables(2.0), {"n": 2})

    # A kill between setting the old copy aside and moving the new one in: the old one loads.
    real_replace = os.replace

    def killed_second_rename(src, dst):
        if os.path.basename(src).startswith(".model.tmp"):  # the new copy moving in
            raise KeyboardInterrupt  # stands for the kill
        return real_replace(src, dst)

    monkeypatch.setattr(pio.os, "replace", killed_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_variables(target, _variables(2.0), {"n": 2}, overwrite=True)
    monkeypatch.setattr(pio.os, "replace", real_replace)
    assert not target.exists()
    variables, manifest = load_variables(target)
    assert manifest == {"n": 1} and variables["params"]["dense"]["kernel"][0, 0] == 1.0

    # The next save completes and cleans up.
    save_variables(target, _variables(3.0), {"n": 3}, overwrite=True)
    variables, manifest = load_variables(target)
    assert manifest == {"n": 3} and variables["params"]["dense"]["kernel"][0, 0] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
