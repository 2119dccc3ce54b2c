"""Data as users bring it: the Kaggle download's real naming (test reuses train's patient
numbers), every balance method on equal, 1:3 and 3:1 classes, and the precision a run keeps."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax import balance
from pneumojax import data
from pneumojax.cli import main
from pneumojax.balance import apply_balance
from pneumojax.run import TrainConfig

from conftest import MINI_DATA as MINI, tiny_train_args


def _jpeg(path: Path, seed: int, bright: bool):
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 90, (40, 40), dtype=np.uint8)
    if bright:
        a[10:30, 5:18] += 120
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "L").save(path)


def kaggle_with_reused_patient_numbers(root: Path) -> Path:
    """The Kaggle download's naming: test/ reuses train's patient numbers, as the real data set
    does (person1_bacteria_1 in train, person1_virus_6 in test; IM-0117-0001 in train and
    IM-0117-0003 in test), plus a small val/ folder."""
    n = 0
    for p in range(1, 31):
        _jpeg(root / "train" / "PNEUMONIA" / f"person{p}_bacteria_{p}.jpeg", n := n + 1, True)
        _jpeg(root / "train" / "NORMAL" / f"IM-{100 + p:04d}-0001.jpeg", n := n + 1, False)
    for p in range(31, 33):
        _jpeg(root / "val" / "PNEUMONIA" / f"person{p}_virus_{p}.jpeg", n := n + 1, True)
        _jpeg(root / "val" / "NORMAL" / f"NORMAL2-IM-{p:04d}-0001.jpeg", n := n + 1, False)
    for p in range(1, 9):  # patients 1-4 also in train; 5-8 are not ... and 40+ are new
        _jpeg(root / "test" / "PNEUMONIA" / f"person{p}_virus_{50 + p}.jpeg", n := n + 1, True)
        _jpeg(root / "test" / "NORMAL" / f"IM-{100 + p:04d}-0003.jpeg", n := n + 1, False)
    for p in range(40, 44):
        _jpeg(root / "test" / "PNEUMONIA" / f"person{p}_bacteria_{p}.jpeg", n := n + 1, True)
        _jpeg(root / "test" / "NORMAL" / f"IM-{p:04d}-0001.jpeg", n := n + 1, False)
    return root


def test_the_kaggle_test_folder_is_used_as_given_with_a_warning(tmp_path):
    root = kaggle_with_reused_patient_numbers(tmp_path / "chest_xray")
    source = data.find_images(root)
    warnings = []
    splits = data.make_splits(source, val_fraction=0.2, warn=warnings.append)
    assert splits.test == source.splits["test"]  # as given: nothing moved, nothing dropped
    shared = splits.info["shared_patients"]
    assert list(shared) == ["test"]
    assert shared["test"]["patients"] == 16  # person1-8 and IM-0101..0108
    assert shared["test"]["of_patients"] == 24 and shared["test"]["images"] == 16
    assert shared["test"]["examples"][0] == "IM-0101"
    assert len(warnings) == 1 and "16 of the 24 patient ids in the given test folder" in warnings[0]
    assert "used as given" in warnings[0]
    # What pneumojax carves itself stays strictly patient-disjoint.
    tr = {data.patient_id(p) for p, _ in splits.train}
    va = {data.patient_id(p) for p, _ in splits.val}
    assert not tr & va
    assert splits.info["given_splits"] == ["test"]
    # The official val/ joined train before validation was carved.
    assert set(source.splits["val"]) <= set(splits.train) | set(splits.val)
    payload = json.loads(splits.to_json())
    assert payload["info"]["shared_patients"] == shared


def test_train_runs_on_the_kaggle_layout_and_records_the_overlap(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    root = kaggle_with_reused_patient_numbers(tmp_path / "chest_xray")
    run = tmp_path / "run"
    r = CliRunner().invoke(main, tiny_train_args(root, run, epochs=1))
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "used as given" in r.output
    splits = json.loads((run / "splits.json").read_text())
    assert splits["summary"]["test"]["n"] == 24
    assert splits["info"]["shared_patients"]["test"]["patients"] == 16
    assert json.loads((run / "metrics.json").read_text())["n"] == 24


def test_a_flat_folder_is_carved_strictly_by_patient(tmp_path):
    root = tmp_path / "flat"
    for p in range(1, 25):  # several images per patient
        for shot in range(3):
            _jpeg(
                root / "PNEUMONIA" / f"person{p}_bacteria_{p * 10 + shot}.jpeg", p * 10 + shot, True
            )
            _jpeg(root / "NORMAL" / f"IM-{p:04d}-{shot + 1:04d}.jpeg", 1000 + p * 10 + shot, False)
    warnings = []
    splits = data.make_splits(data.find_images(root), 0.2, 0.2, warn=warnings.append)
    assert splits.info["shared_patients"] == {} and not warnings
    assert splits.info["given_splits"] == []


@pytest.mark.skipif(not (MINI / "train").is_dir(), reason=f"real mini set not found at {MINI}")
def test_real_mini_set_splits_are_carved_by_patient_and_keep_test(tmp_path):
    source = data.find_images(MINI, check=False)
    splits = data.make_splits(source, warn=lambda m: None)
    assert len(splits.test) == 120 and splits.test == source.splits["test"]
    assert not (
        {data.patient_id(p) for p, _ in splits.train} & {data.patient_id(p) for p, _ in splits.val}
    )


# --- balance methods keep both classes, however the counts fall ---------------------------

COUNTS = {"equal": (12, 12), "1:3": (6, 18), "3:1": (18, 6), "far": (2, 30)}


@pytest.mark.parametrize("counts", list(COUNTS.values()), ids=list(COUNTS))
@pytest.mark.parametrize("method", balance.METHODS)
def test_every_method_keeps_both_classes_with_its_documented_meaning(
    method, counts, tmp_path, monkeypatch
):
    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    n0, n1 = counts
    labels = np.array([0] * n0 + [1] * n1, np.int32)
    images = np.random.default_rng(0).integers(0, 255, (len(labels), 16, 16, 3), np.uint8)
    cfg = TrainConfig(balance=method, seed=3)
    out = apply_balance(cfg, images, labels, "key", log=lambda m: None)
    minority, majority = (0, 1) if n0 <= n1 else (1, 0)
    small, large = min(n0, n1), max(n0, n1)
    member_counts = [np.bincount(out.labels[m], minlength=2) for m in out.members]
    assert all((c > 0).all() for c in member_counts), member_counts
    for m in out.members:
        assert len(np.unique(m)) == len(m)  # no index twice
    if method in ("none", "class-weight"):
        assert member_counts[0].tolist() == [n0, n1]
    if method == "class-weight":
        np.testing.assert_allclose(np.unique(out.weights[labels == 0]), (n0 + n1) / (2 * n0))
        np.testing.assert_allclose(np.unique(out.weights[labels == 1]), (n0 + n1) / (2 * n1))
    if method == "undersample":
        assert member_counts[0].tolist() == [small, small]
        assert set(np.flatnonzero(labels == minority)) <= set(out.members[0])
    if method == "oversample":
        assert np.bincount(out.labels).tolist() == [large, large]
        assert (out.labels[len(labels) :] == minority).all()
    if method == "ensemble":
        assert len(out.members) == max(1, round(large / small))
        chunks = [set(m[out.labels[m] == majority]) for m in out.members]
        assert sum(map(len, chunks)) == large and len(set().union(*chunks)) == large
        assert all(set(np.flatnonzero(labels == minority)) <= set(m) for m in out.members)


def test_equal_classes_ensemble_of_three_splits_pneumonia_and_keeps_all_normal():
    labels = np.array([0] * 12 + [1] * 12, np.int32)
    chunks = balance.ensemble_chunks(labels, 3, seed=0)
    assert [np.bincount(labels[c], minlength=2).tolist() for c in chunks] == [[12, 4]] * 3


@pytest.mark.skipif(not (MINI / "train").is_dir(), reason=f"real mini set not found at {MINI}")
@pytest.mark.parametrize("method", ["undersample", "ensemble"])
def test_real_mini_set_with_equal_classes_trains_on_both(method, tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(
        main,
        tiny_train_args(MINI, tmp_path / "run", "--balance", method, epochs=1, batch_size=32),
    )
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["balance"]
    assert record["train_counts_before"][0] == record["train_counts_before"][1]
    assert all(min(c) > 0 for c in record["member_counts"]), record
    assert not re.search(r"\b0 (NORMAL|PNEUMONIA)", r.output), r.output
