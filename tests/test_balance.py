"""Class-imbalance methods: counts, determinism, train-only, ensemble vote, compare."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pneumojax import balance
from pneumojax.cli import main
from pneumojax.metrics import combined_metrics

from conftest import tiny_train_args

LABELS = np.array([0] * 10 + [1] * 31, np.int32)


def test_class_weights_follow_the_study_formula():
    w = balance.class_weights(LABELS)
    assert w[0] == pytest.approx((1 / 10) * 41 / 2) and w[1] == pytest.approx((1 / 31) * 41 / 2)
    np.testing.assert_allclose(balance.sample_weights(LABELS, w)[[0, 40]], [w[0], w[1]])


def test_undersample_keeps_all_minority_and_a_seeded_majority_subset():
    idx = balance.undersample_indices(LABELS, seed=1)
    assert np.bincount(LABELS[idx]).tolist() == [10, 10]
    assert set(np.flatnonzero(LABELS == 0)) <= set(idx)
    np.testing.assert_array_equal(idx, balance.undersample_indices(LABELS, seed=1))
    assert not np.array_equal(idx, balance.undersample_indices(LABELS, seed=2))


def test_ensemble_chunks_are_disjoint_and_cover_the_majority():
    chunks = balance.ensemble_chunks(LABELS, None, seed=0)
    assert len(chunks) == round(31 / 10)
    majority = [set(c[LABELS[c] == 1]) for c in chunks]
    assert sum(len(m) for m in majority) == 31 and set().union(*majority) == set(range(10, 41))
    assert all(not (a & b) for i, a in enumerate(majority) for b in majority[i + 1 :])
    assert all(set(range(10)) <= set(c) for c in chunks)
    assert len(balance.ensemble_chunks(LABELS, 5, seed=0)) == 5


def test_vote_and_mean_on_hand_made_member_outputs():
    p = np.array([[0.9, 0.2, 0.6, 0.4], [0.8, 0.1, 0.3, 0.6], [0.1, 0.3, 0.7, 0.2]])
    np.testing.assert_array_equal(balance.vote(p, [0.5, 0.5, 0.5]), [1, 0, 1, 0])
    np.testing.assert_array_equal(balance.vote(p[:2], [0.5, 0.5]), [1, 0, 1, 1])  # tie -> PNEUMONIA
    np.testing.assert_allclose(balance.mean_probability(p), [0.6, 0.2, 16 / 30, 0.4])
    m = combined_metrics(np.array([1, 0, 1, 0]), p.T, [0.5, 0.5, 0.5])
    assert m["confusion_matrix"] == [[2, 0], [0, 2]] and m["auc"] == 1.0
    assert m["ensemble"]["members"] == 3


def test_oversampling_is_deterministic_per_seed_and_balances(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (41, 32, 32, 3), dtype=np.uint8)
    a, la, ka = balance.oversample(images, LABELS, 1, "cxr", tmp_path, "k")
    b, _, kb = balance.oversample(images, LABELS, 1, "cxr", None, "k")
    c, _, kc = balance.oversample(images, LABELS, 2, "cxr", None, "k")
    assert len(a) == 21 and (la == 0).all()
    np.testing.assert_array_equal(a, b)
    assert ka == kb != kc and not np.array_equal(a, c)
    assert (tmp_path / f"{ka}.npy").exists()


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    from pneumojax.data import make_demo_dataset

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    folder = make_demo_dataset(tmp_path / "xray", n_per_class=60, image_size=48, seed=1)
    for f in sorted((folder / "NORMAL").iterdir())[::2]:  # about 1 NORMAL : 2 PNEUMONIA
        f.unlink()
    return folder


def _train(tiny_data, out, *extra):
    args = tiny_train_args(tiny_data, out, *extra)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output, json.loads((out / "metrics.json").read_text())


def test_methods_touch_only_the_train_split_and_compare_them(tiny_data, tmp_path):
    _, plain = _train(tiny_data, tmp_path / "none")
    splits = json.loads((tmp_path / "none" / "splits.json").read_text())
    runs = [tmp_path / "none"]
    for method in ("oversample", "ensemble", "class-weight", "undersample"):
        out, metrics = _train(
            tiny_data,
            tmp_path / method,
            "--balance",
            method,
            *(["--ensemble-size", "3"] if method == "ensemble" else []),
        )
        runs.append(tmp_path / method)
        assert json.loads((tmp_path / method / "splits.json").read_text())["val"] == splits["val"]
        assert metrics["n"] == plain["n"]  # test split untouched
        assert metrics["balance"]["method"] == method
        if method == "oversample":
            assert "augmented copies" in out
            counts = metrics["balance"]["member_counts"][0]
            assert counts[0] == counts[1]
        if method == "ensemble":
            assert "3 ensemble members trained side by side" in out
            assert metrics["ensemble"]["members"] == 3 and len(metrics["member_thresholds"]) == 3
            predicted = CliRunner().invoke(
                main,
                ["predict", "--run", str(tmp_path / method), "--json", str(tiny_data / "NORMAL")],
            )
            assert predicted.exit_code == 0, predicted.output
            assert json.loads(predicted.output)[0]["threshold"] == "vote"
        if method == "class-weight":
            cw = metrics["balance"]["class_weights"]
            c = metrics["balance"]["train_counts_before"]
            assert cw["NORMAL"] == pytest.approx(sum(c) / (2 * c[0]))
    result = CliRunner().invoke(
        main, ["compare", *map(str, runs), "--out", str(tmp_path / "cmp.png")]
    )
    assert result.exit_code == 0, result.output
    assert "| run | n | threshold | accuracy | recall |" in result.output
    assert "ensemble (ensemble)" in result.output and (tmp_path / "cmp.png").exists()
