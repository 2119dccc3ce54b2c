"""Metrics agree with sklearn, thresholds follow the validation rule, plots write PNGs."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from pneumojax import metrics
from pneumojax import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(seed, n=200, decimals=None, pos_frac=0.6):
    """Labels and overlapping pneumonia probabilities; rounding creates tied scores."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos_frac).astype(int)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0.0, 1.0)
    return y, (p.round(decimals) if decimals is not None else p)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.71])
def test_binary_metrics_match_sklearn(seed, threshold):
    y, p = _scores(seed, decimals=2)
    pred = (p >= threshold).astype(int)
    m = metrics.binary_metrics(y, p, threshold)

    assert m["n"] == len(y) and m["threshold"] == threshold
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred, zero_division=0))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()
    (tn, fp), _ = m["confusion_matrix"]
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert all(type(c) is int for row in m["confusion_matrix"] for c in row)


def test_binary_metrics_zero_division_and_one_class():
    y = np.array([0, 0, 0])
    with np.errstate(all="raise"):
        m = metrics.binary_metrics(y, np.array([0.1, 0.2, 0.3]), threshold=0.9)
    assert m["recall"] == m["precision"] == m["f1"] == 0.0
    assert m["specificity"] == 1.0 and m["auc"] is None


def _recall_specificity(y, p, t):
    pred = p >= t
    return pred[y == 1].mean(), (~pred[y == 0]).mean()


def _brute_force_best_specificity(y, p, target_recall):
    """Max specificity over every unique score used as threshold, among those meeting recall."""
    best = -1.0
    for t in np.unique(p):
        recall, specificity = _recall_specificity(y, p, t)
        if recall >= target_recall:
            best = max(best, specificity)
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target_recall", [0.9, 0.98, 1.0])
def test_choose_threshold_meets_recall_with_best_specificity(seed, target_recall):
    y, p = _scores(seed, n=150, decimals=2 if seed % 2 else None)
    t = metrics.choose_threshold(y, p, target_recall)
    m = metrics.binary_metrics(y, p, t)

    assert isinstance(t, float) and 0.0 <= t <= 1.0
    assert m["recall"] >= target_recall
    assert m["specificity"] == _brute_force_best_specificity(y, p, target_recall)
    # Ties go to the higher threshold: no higher unique score reaches the same operating point.
    for higher in np.unique(p)[np.unique(p) > t]:
        recall, specificity = _recall_specificity(y, p, higher)
        assert recall < target_recall or specificity < m["specificity"]


def test_choose_threshold_is_finite_and_rejects_one_class():
    y, p = _scores(0, n=50)
    assert metrics.choose_threshold(y, p, target_recall=0.0) == 1.0  # sklearn's +inf, clipped
    with pytest.raises(ValueError, match="both NORMAL"):
        metrics.choose_threshold(np.ones(10, int), np.linspace(0, 1, 10))


@pytest.mark.parametrize("seed", range(3))
def test_rank_auc_matches_sklearn_with_ties(seed):
    y, p = _scores(seed, n=300, decimals=1)  # ~11 distinct scores: many ties
    assert metrics.rank_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(8, len(y)))
    batch = metrics.rank_auc(y[idx], p[idx])
    expected = [skm.roc_auc_score(y[i], p[i]) for i in idx]
    np.testing.assert_allclose(batch, expected, atol=1e-12)


def test_rank_auc_one_class_row_is_nan():
    out = metrics.rank_auc(np.array([[1, 1, 1], [0, 1, 1]]), np.array([[0.1, 0.2, 0.3]] * 2))
    assert np.isnan(out[0]) and out[1] == 1.0


def _width(ci):
    return ci[1] - ci[0]


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_data():
    small = _scores(1, n=150)
    large = _scores(1, n=2400)
    m = metrics.binary_metrics(*small, 0.5)
    ci_small = metrics.bootstrap_ci(*small, 0.5, n_boot=300)
    ci_large = metrics.bootstrap_ci(*large, 0.5, n_boot=300)

    assert set(ci_small) == set(metrics.FIGURES)
    for k in metrics.FIGURES:
        low, high = ci_small[k]
        assert low <= m[k] <= high, k
        assert _width(ci_large[k]) < _width(ci_small[k]), k


def test_bootstrap_ci_is_reproducible_and_skips_one_class_resamples():
    y, p = _scores(2, n=100)
    assert metrics.bootstrap_ci(y, p, 0.5, n_boot=50, seed=3) == metrics.bootstrap_ci(
        y, p, 0.5, n_boot=50, seed=3
    )
    # One positive among 20: many resamples lack it; intervals must still be finite numbers.
    y = np.r_[np.zeros(19, int), 1]
    ci = metrics.bootstrap_ci(y, np.linspace(0, 1, 20), 0.5, n_boot=200)
    assert all(np.isfinite(ci[k]).all() for k in metrics.FIGURES)
    assert metrics.bootstrap_ci(np.zeros(5, int), np.full(5, 0.2), 0.5, n_boot=20)["auc"] == [
        None,
        None,
    ]


def test_evaluate_predictions_is_json_and_complete():
    y, p = _scores(4, n=120)
    out = metrics.evaluate_predictions(y, p, threshold=0.4, n_boot=100)
    roundtrip = json.loads(json.dumps(out))

    figure_keys = {"n", "threshold", "confusion_matrix", *metrics.FIGURES}
    assert figure_keys | {"at_0_5", "ci95", "classification_report"} <= set(roundtrip)
    assert figure_keys <= set(roundtrip["at_0_5"]) and roundtrip["at_0_5"]["threshold"] == 0.5
    assert set(roundtrip["ci95"]) == set(metrics.FIGURES)
    report = roundtrip["classification_report"]
    assert {"NORMAL", "PNEUMONIA", "accuracy"} <= set(report)
    assert report["PNEUMONIA"]["recall"] == pytest.approx(out["recall"])
    assert report["NORMAL"]["recall"] == pytest.approx(out["specificity"])

    text = metrics.format_metrics(out)
    assert "specificity" in text and "95% CI" in text and f"{out['auc']:.4f}" in text


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plots_write_png(tmp_path):
    y, p = _scores(5, n=100)
    m = metrics.evaluate_predictions(y, p, threshold=0.45, n_boot=50)
    history = [
        {"epoch": 1, "loss": 0.7, "accuracy": 0.6, "val_loss": 0.65, "val_accuracy": 0.62},
        {"epoch": 2, "loss": 0.5, "accuracy": 0.75},  # validation missing this epoch
        {"epoch": 3, "loss": 0.4, "accuracy": 0.8, "val_loss": 0.5, "val_accuracy": 0.78},
    ]
    rows = [{"name": "a", "metrics": m}, {"name": "b", "metrics": {**m, "auc": None}}]

    written = [
        plots.plot_history(history, tmp_path / "nested" / "history.png"),
        plots.plot_confusion_matrix(m["confusion_matrix"], tmp_path / "cm.png"),
        plots.plot_roc(y, p, tmp_path / "roc.png", auc=m["auc"], threshold=m["threshold"]),
        plots.plot_comparison(rows, tmp_path / "compare.png"),
    ]
    for path in written:
        _assert_png(path)
