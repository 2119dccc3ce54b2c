"""DeLong, McNemar, calibration and operating points against published and hand-computed values."""

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from pneumojax import metrics, stats

# ----------------------------------------------------------------------- pROC's aSAH reference
#
# pROC (Robin et al. 2011, https://github.com/xrobin/pROC) tests its DeLong code on its bundled
# aSAH data (113 patients: 41 "Poor" outcome = cases, 72 "Good" = controls; markers wfns, s100b,
# ndka). The raw data ship as an .rda file we cannot read here, but pROC's own expected output of
# its C++ placement code, tests/testthat/helper-deLongPlacementsCpp-expected.R ("forward"
# direction), lists every case's placement X_i (fraction of controls below it, ties 1/2) and
# every control's placement Y_j (fraction of cases above it, ties 1/2), in data order, so the
# same index is the same patient in every marker. Below: 2 * 72 * X_i and 2 * 41 * Y_j, which
# are exact integers (2L + T: twice the strictly-below count plus the tie count).
# DeLong's statistics depend on the scores only through these placements, so scores rebuilt
# from them (_asah_scores) are, for DeLong, the aSAH data; the test checks that rebuild by
# recomputing the placements with an explicit pairwise comparison.
_ASAH_CASES = {
    "wfns": "117 94 128 140 140 140 140 94 140 94 37 94 140 128 128 94 140 140 140 94 140 94 140 "
    "94 128 140 128 128 37 128 128 94 94 140 140 94 94 140 140 140 140",
    "s100b": "81 63 103 78 130 144 140 26 123 50 26 128 126 139 144 118 144 144 144 26 144 120 0 "
    "50 116 144 118 144 38 118 81 63 74 116 144 88 144 121 144 144 130",
    "ndka": "116 90 98 110 6 40 74 134 140 134 134 58 104 124 24 36 102 2 144 124 62 74 80 102 "
    "128 93 124 36 142 109 6 49 124 6 48 134 76 104 138 74 110",
}
_ASAH_CONTROLS = {
    "wfns": "80 80 80 80 18 80 66 66 80 66 66 80 80 80 66 80 66 80 80 53 44 80 44 80 18 18 80 80 "
    "66 44 80 80 66 66 80 66 80 66 66 80 80 80 80 66 80 66 80 80 53 66 44 66 80 44 80 80 18 44 "
    "66 66 80 80 80 53 80 66 66 44 44 80 80 80",
    "s100b": "58 55 66 80 28 52 66 66 80 73 80 70 63 77 52 77 63 58 52 80 53 55 36 70 24 28 53 "
    "77 32 28 63 73 70 73 80 58 66 55 54 80 80 70 80 70 73 53 70 73 37 63 42 77 66 39 77 80 48 "
    "34 66 54 73 55 66 77 80 52 54 28 52 54 24 27",
    "ndka": "82 68 72 58 74 33 74 26 42 26 28 6 66 74 48 74 74 2 46 62 62 26 80 72 74 63 44 72 "
    "34 8 72 74 48 66 72 44 16 18 60 50 4 74 28 62 58 58 34 80 28 48 66 58 26 58 50 72 62 58 16 "
    "68 48 45 8 52 48 66 16 60 38 18 74 42",
}
N_CASES, N_CONTROLS = 41, 72

# pROC's expected values for the same data (tests/testthat/test-var.R, test-cov.R,
# test-roc.test.R, test-ci.auc.R; AUCs are the placement file's theta):
ASAH_AUC = {"wfns": 0.823678861788618, "s100b": 0.731368563685637, "ndka": 0.611957994579946}
ASAH_VAR = {"wfns": 0.00146991470882363, "ndka": 0.0031908105493913, "s100b": 0.00266868245717244}
ASAH_COV = {
    ("wfns", "ndka"): -0.000532967856762438,
    ("ndka", "s100b"): -0.000756164938056579,
    ("s100b", "wfns"): 0.00119615567376754,
}
# roc.test(r.a, r.b) (DeLong, paired, two-sided): Z, p, 95% interval of auc_a - auc_b.
ASAH_ROC_TEST = {
    ("wfns", "s100b"): (
        2.20898359144091,
        0.0271757822291882,
        0.0104061769564846,
        0.174214419249478,
    ),
    ("wfns", "ndka"): (
        2.79777591868904,
        0.00514557970691098,
        0.0634011709339876,
        0.3600405634833566,
    ),
    ("ndka", "s100b"): (
        -1.39077002573558,
        0.164295175223054,
        -0.2876917446341914,
        0.0488706064228094,
    ),
}
# ci.auc(r.ndka) with method "delong": lower, AUC, upper.
ASAH_CI_NDKA = (0.501244999271703, 0.611957994579946, 0.722670989888189)


def _ints(text):
    return np.array(text.split(), dtype=np.int64)


def _asah_scores(marker):
    """Scores whose case/control comparisons reproduce pROC's placements for one marker.

    On the controls' doubled mid-CDF scale F(v) = 2 #(controls < v) + #(controls == v), a case's
    score is its given 2L + T. Controls sharing a placement have no case between or at them, so
    they may be merged into one tie; each group sits at its own F, which lies strictly between
    the case values below and above it.
    """
    cases = _ints(_ASAH_CASES[marker]).astype(float)
    above = _ints(_ASAH_CONTROLS[marker])  # 2 * #(cases above) + #(cases tied)
    controls = np.empty(N_CONTROLS)
    below = 0
    for group in np.unique(above)[::-1]:  # most cases above = lowest value first
        members = above == group
        controls[members] = 2 * below + members.sum()
        below += members.sum()
    y = np.r_[np.ones(N_CASES, int), np.zeros(N_CONTROLS, int)]
    return y, np.r_[cases, controls] / (2 * N_CONTROLS)  # into [0, 1], order unchanged


def _slow_doubled_counts(y, p):
    """Per case 2 #(controls below) + #(tied), per control 2 #(cases above) + #(tied), by
    explicit comparison of every case with every control (integers, so comparisons are exact)."""
    cases, controls = p[y == 1], p[y == 0]
    psi2 = 2 * (cases[:, None] > controls[None, :]) + (cases[:, None] == controls[None, :])
    return psi2.sum(axis=1), psi2.sum(axis=0)


def _slow_placements(y, p):
    """DeLong's structural components V10 (per case) and V01 (per control), ties counting 1/2."""
    per_case, per_control = _slow_doubled_counts(y, p)
    return per_case / (2 * per_control.size), per_control / (2 * per_case.size)


@pytest.mark.parametrize("marker", ["wfns", "s100b", "ndka"])
def test_asah_rebuild_reproduces_pROC_placements(marker):
    y, p = _asah_scores(marker)
    per_case, per_control = _slow_doubled_counts(y, p)
    np.testing.assert_array_equal(per_case, _ints(_ASAH_CASES[marker]))
    np.testing.assert_array_equal(per_control, _ints(_ASAH_CONTROLS[marker]))
    v10, v01 = _slow_placements(y, p)
    # And the fast midrank placements agree with pROC's too.
    _, fast10, fast01 = stats._delong_placements(y, p[None, :])
    np.testing.assert_allclose(fast10[0], v10, rtol=0, atol=1e-15)
    np.testing.assert_allclose(fast01[0], v01, rtol=0, atol=1e-15)


@pytest.mark.parametrize("marker", ["wfns", "s100b", "ndka"])
def test_delong_variance_matches_pROC(marker):
    y, p = _asah_scores(marker)
    ci = stats.delong_auc_ci(y, p)
    assert ci["auc"] == pytest.approx(ASAH_AUC[marker], rel=1e-12)
    assert ci["var"] == pytest.approx(ASAH_VAR[marker], rel=1e-12)
    assert ci["se"] == pytest.approx(np.sqrt(ASAH_VAR[marker]), rel=1e-12)
    assert (ci["n_pos"], ci["n_neg"]) == (N_CASES, N_CONTROLS)


def test_delong_ci_matches_pROC_ci_auc():
    low, auc, high = ASAH_CI_NDKA
    ci = stats.delong_auc_ci(*_asah_scores("ndka"))
    assert ci["auc"] == pytest.approx(auc, rel=1e-12)
    assert ci["ci95"] == pytest.approx([low, high], rel=1e-12)


@pytest.mark.parametrize("pair", sorted(ASAH_ROC_TEST))
def test_delong_test_matches_pROC_roc_test(pair):
    a, b = pair
    y, p_a = _asah_scores(a)
    _, p_b = _asah_scores(b)
    z, p, low, high = ASAH_ROC_TEST[pair]
    t = stats.delong_auc_test(y, p_a, p_b)
    assert t["auc_a"] == pytest.approx(ASAH_AUC[a], rel=1e-12)
    assert t["auc_b"] == pytest.approx(ASAH_AUC[b], rel=1e-12)
    assert t["auc_delta"] == pytest.approx(ASAH_AUC[a] - ASAH_AUC[b], rel=1e-12)
    assert t["z"] == pytest.approx(z, rel=1e-12)
    assert t["p"] == pytest.approx(p, rel=1e-12)
    assert t["auc_delta_ci95"] == pytest.approx([low, high], rel=1e-12)
    assert t["auc_delta_se"] == pytest.approx(t["auc_delta"] / z, rel=1e-12)
    assert t["var_a"] == pytest.approx(ASAH_VAR[a], rel=1e-12)
    assert t["var_b"] == pytest.approx(ASAH_VAR[b], rel=1e-12)


@pytest.mark.parametrize("pair", sorted(ASAH_COV))
def test_delong_covariance_matches_pROC_cov(pair):
    a, b = pair
    y, p_a = _asah_scores(a)
    _, p_b = _asah_scores(b)
    assert stats.delong_auc_test(y, p_a, p_b)["cov_ab"] == pytest.approx(ASAH_COV[pair], rel=1e-12)


def test_delong_on_hanley_mcneil_ct_ratings():
    # Hanley & McNeil (1982, Radiology 143:29-36, Table 1; reused in their 1983 paper): 109 CT
    # images rated 1..5, normal 33/6/6/11/2 and abnormal 3/2/2/11/33. They give AUC 0.893 and,
    # from their exponential approximation (a different estimator), SE 0.032; DeLong's SE for
    # the same table is 0.0307, close but not equal, so only the AUC is checked to their digits.
    normal, abnormal = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    y = np.r_[np.zeros(sum(normal), int), np.ones(sum(abnormal), int)]
    p = np.r_[np.repeat(np.arange(1, 6), normal), np.repeat(np.arange(1, 6), abnormal)] / 5
    ci = stats.delong_auc_ci(y, p)
    assert round(ci["auc"], 3) == 0.893
    assert ci["se"] == pytest.approx(0.032, abs=0.002)


def _paired_scores(seed, n=300, decimals=2):
    """Two correlated, tied score vectors on the same images."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    shared = rng.normal(0, 1, n)
    p_a = 1 / (1 + np.exp(-(1.2 * y + shared + rng.normal(0, 0.7, n))))
    p_b = 1 / (1 + np.exp(-(0.8 * y + shared + rng.normal(0, 0.7, n))))
    return y, p_a.round(decimals), p_b.round(decimals)


@pytest.mark.parametrize("seed", range(4))
def test_delong_matches_slow_structural_components(seed):
    y, p_a, p_b = _paired_scores(seed, decimals=1 + seed % 2)  # heavy ties
    assert np.unique(p_a).size < y.size // 3
    v10 = np.stack([_slow_placements(y, p)[0] for p in (p_a, p_b)])
    v01 = np.stack([_slow_placements(y, p)[1] for p in (p_a, p_b)])
    m, n = v10.shape[1], v01.shape[1]
    cov = np.cov(v10) / m + np.cov(v01) / n
    aucs = v10.mean(axis=1)
    se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])

    t = stats.delong_auc_test(y, p_a, p_b)
    assert t["auc_a"] == pytest.approx(roc_auc_score(y, p_a), rel=1e-12)
    assert [t["auc_a"], t["auc_b"]] == pytest.approx(aucs, rel=1e-12)
    assert [t["var_a"], t["cov_ab"], t["var_b"]] == pytest.approx(
        [cov[0, 0], cov[0, 1], cov[1, 1]], rel=1e-12
    )
    assert t["auc_delta_se"] == pytest.approx(se, rel=1e-12)
    assert t["z"] == pytest.approx((aucs[0] - aucs[1]) / se, rel=1e-12)
    assert t["p"] == pytest.approx(2 * sps.norm.sf(abs(t["z"])), rel=1e-12)
    assert stats.delong_auc_ci(y, p_a)["var"] == pytest.approx(cov[0, 0], rel=1e-12)


def test_delong_variance_matches_bootstrap():
    y, p_a, p_b = _paired_scores(7, n=700, decimals=3)
    t = stats.delong_auc_test(y, p_a, p_b)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, y.size, size=(2000, y.size))
    auc_a = metrics.rank_auc(y[idx], p_a[idx])
    auc_b = metrics.rank_auc(y[idx], p_b[idx])
    # 2000 resamples estimate a variance to about +-3% (sqrt(2 / 2000)); the two estimators also
    # differ by O(1/n), so allow 15%.
    assert np.var(auc_a, ddof=1) == pytest.approx(t["var_a"], rel=0.15)
    assert np.var(auc_b, ddof=1) == pytest.approx(t["var_b"], rel=0.15)
    assert np.var(auc_a - auc_b, ddof=1) == pytest.approx(t["auc_delta_se"] ** 2, rel=0.15)


def test_delong_identical_symmetric_and_rank_invariant():
    y, p_a, p_b = _paired_scores(3)
    same = stats.delong_auc_test(y, p_a, p_a)
    assert same["auc_delta"] == 0.0 and same["z"] == 0.0 and same["p"] == 1.0
    ab, ba = stats.delong_auc_test(y, p_a, p_b), stats.delong_auc_test(y, p_b, p_a)
    assert ba["z"] == pytest.approx(-ab["z"]) and ba["p"] == pytest.approx(ab["p"])
    squashed = stats.delong_auc_test(y, p_a**3, np.sqrt(p_b))  # monotone maps keep the ranks
    assert squashed["z"] == pytest.approx(ab["z"], rel=1e-12)


def test_delong_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        stats.delong_auc_ci([0, 0, 1], [0.1, 0.2, 0.9])
    with pytest.raises(ValueError, match="equal length"):
        stats.delong_auc_test([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], [0.1, 0.2, 0.8])


# --------------------------------------------------------------------------------------- McNemar


def _paired_predictions(both_right, a_only, b_only, both_wrong):
    """Labels and two prediction vectors with the given 2x2 table of right/wrong."""
    a = np.r_[np.ones(both_right + a_only), np.zeros(b_only + both_wrong)].astype(int)
    b = np.r_[np.ones(both_right), np.zeros(a_only), np.ones(b_only), np.zeros(both_wrong)]
    y = np.ones(a.size, int)
    y[::2] = 0  # mix classes: for y == 0 a right prediction is 0
    return y, np.where(a == 1, y, 1 - y), np.where(b == 1, y, 1 - y).astype(int)


def test_mcnemar_agresti_presidential_approval():
    # Agresti, An Introduction to Categorical Data Analysis (2nd ed. 2007), Table 8.1: 1600
    # people's approval at two surveys, 794 / 150 / 86 / 570. He gives z = -4.17, i.e.
    # chi2 = 64**2 / 236 = 17.36 without correction; with Edwards' correction 63**2 / 236 = 16.82.
    m = stats.mcnemar_test(*_paired_predictions(794, 150, 86, 570))
    assert (m["b"], m["c"], m["n"]) == (150, 86, 1600)
    assert m["table"] == [[794, 150], [86, 570]]
    assert m["chi2_uncorrected"] == pytest.approx(17.36, abs=0.005)
    assert m["chi2"] == pytest.approx(16.82, abs=0.005)
    assert m["method"] == "chi2" and m["p"] == m["chi2_p"]
    assert m["p"] == pytest.approx(sps.chi2.sf(3969 / 236, 1)) and m["p"] < 1e-4


def test_mcnemar_small_table_is_exact():
    # b = 1, c = 6: two-sided exact p = 2 * P(X <= 1 | 7, 1/2) = 2 * (1 + 7) / 128 = 0.125.
    m = stats.mcnemar_test(*_paired_predictions(20, 1, 6, 3))
    assert (m["b"], m["c"]) == (1, 6)
    assert m["method"] == "exact" and m["p"] == m["exact_p"] == pytest.approx(0.125)
    assert m["chi2"] == pytest.approx(16 / 7)


@pytest.mark.parametrize("b,c", [(0, 0), (3, 3), (40, 40)])
def test_mcnemar_no_difference_gives_p_one(b, c):
    m = stats.mcnemar_test(*_paired_predictions(10, b, c, 5))
    assert m["p"] == 1.0 and m["exact_p"] == 1.0 and m["chi2"] == 0.0


def test_mcnemar_rule_switches_at_25_and_is_symmetric():
    assert stats.mcnemar_test(*_paired_predictions(5, 6, 18, 5))["method"] == "exact"
    assert stats.mcnemar_test(*_paired_predictions(5, 6, 19, 5))["method"] == "chi2"
    y, a, b = _paired_predictions(30, 9, 2, 4)
    ab, ba = stats.mcnemar_test(y, a, b), stats.mcnemar_test(y, b, a)
    assert (ba["b"], ba["c"]) == (ab["c"], ab["b"]) and ba["p"] == ab["p"]
    # Exact two-sided p is twice the smaller tail (capped at 1).
    assert ab["exact_p"] == pytest.approx(2 * sps.binom.cdf(2, 11, 0.5))


def test_mcnemar_rejects_probabilities():
    with pytest.raises(ValueError, match="labels 0 or 1"):
        stats.mcnemar_test([0, 1], [0.2, 0.9], [0, 1])


# ----------------------------------------------------------------------------------- Calibration


def test_calibration_four_sample_hand_calculation():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.6, 0.9])
    # (0.01 + 0.36 + 0.36 + 0.01) / 4
    assert stats.brier_score(y, p) == pytest.approx(0.185)
    # Two bins: [0.1, 0.4] mean 0.25 vs 1/2, [0.6, 0.9] mean 0.75 vs 1/2 -> 0.25.
    assert stats.expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.25)
    # Ten bins, one sample each: (0.1 + 0.6 + 0.6 + 0.1) / 4.
    assert stats.expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.35)
    curve = stats.reliability_curve(y, p, n_bins=2)
    assert curve["bin_edges"] == [0.0, 0.5, 1.0] and curve["count"] == [2, 2]
    assert curve["mean_predicted"] == pytest.approx([0.25, 0.75])
    assert curve["observed_frequency"] == pytest.approx([0.5, 0.5])


def test_calibration_constant_predictor():
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    p = np.full(100, 0.3)
    assert stats.brier_score(y, p) == pytest.approx(0.5 * 0.09 + 0.5 * 0.49)
    assert stats.expected_calibration_error(y, p) == pytest.approx(0.2)
    curve = stats.reliability_curve(y, p)
    assert curve["count"] == [0, 0, 0, 100] + [0] * 6
    assert curve["mean_predicted"][3] == pytest.approx(0.3) and curve["mean_predicted"][0] is None


def test_calibration_perfectly_calibrated_and_edges():
    rng = np.random.default_rng(0)
    p = rng.random(100_000)
    y = (rng.random(p.size) < p).astype(int)
    assert stats.expected_calibration_error(y, p) < 0.01  # sampling noise is about 0.004
    assert stats.expected_calibration_error(y, np.clip(p * 0.5 + 0.5, 0, 1)) > 0.2
    # p = 1 joins the last bin, p = 0 the first.
    assert stats.reliability_curve([0, 1], [0.0, 1.0], n_bins=4)["count"] == [1, 0, 0, 1]


def test_calibration_matches_sklearn():
    rng = np.random.default_rng(1)
    p = rng.random(500) ** 2
    y = (rng.random(p.size) < np.sqrt(p)).astype(int)
    assert stats.brier_score(y, p) == pytest.approx(brier_score_loss(y, p))
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    curve = stats.reliability_curve(y, p, n_bins=10)
    full = [i for i, c in enumerate(curve["count"]) if c]
    assert [curve["observed_frequency"][i] for i in full] == pytest.approx(frac)
    assert [curve["mean_predicted"][i] for i in full] == pytest.approx(mean)


# ------------------------------------------------------------------------------ Operating points

# Validation: 10 NORMAL and 10 PNEUMONIA scores, no ties.
VAL_NEG = [0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.60, 0.85]
VAL_POS = [0.45, 0.50, 0.55, 0.65, 0.70, 0.75, 0.80, 0.90, 0.95, 0.99]
TEST_NEG = [0.1, 0.3, 0.5, 0.7]
TEST_POS = [0.4, 0.6, 0.8, 0.9]


def _split(neg, pos):
    return np.r_[np.zeros(len(neg), int), np.ones(len(pos), int)], np.array(neg + pos)


def test_operating_points_hand_computed():
    y_val, p_val = _split(VAL_NEG, VAL_POS)
    y_test, p_test = _split(TEST_NEG, TEST_POS)
    targets = (("specificity", 0.8), ("specificity", 0.9), ("recall", 0.9), ("recall", 1.0))
    ops = stats.operating_points(y_val, p_val, y_test, p_test, targets=targets, n_boot=200)
    # Specificity >= 0.8 allows 2 of 10 NORMAL at or above the threshold (0.60, 0.85): the lowest
    # such threshold is 0.45, which catches every PNEUMONIA image.
    # Specificity >= 0.9 allows only 0.85 above: threshold 0.65, recall 7/10.
    # Recall >= 0.9 needs 9 of 10: 0.50 and 0.45 both give specificity 0.8; ties go higher, 0.50.
    # Recall 1.0 needs 0.45.
    expected = {
        "sensitivity_at_specificity_0.8": (0.45, 1.0, 0.8, 3 / 4, 2 / 4),
        "sensitivity_at_specificity_0.9": (0.65, 0.7, 0.9, 2 / 4, 3 / 4),
        "specificity_at_recall_0.9": (0.50, 0.9, 0.8, 3 / 4, 2 / 4),
        "specificity_at_recall_1": (0.45, 1.0, 0.8, 3 / 4, 2 / 4),
    }
    assert list(ops) == list(expected)
    for name, (t, val_sens, val_spec, test_sens, test_spec) in expected.items():
        op = ops[name]
        assert op["threshold"] == t
        assert op["validation"] == pytest.approx({"sensitivity": val_sens, "specificity": val_spec})
        assert op["test"] == pytest.approx({"sensitivity": test_sens, "specificity": test_spec})
        ci = metrics.bootstrap_ci(y_test, p_test, t, n_boot=200, seed=0)
        assert op["ci95"] == {"sensitivity": ci["recall"], "specificity": ci["specificity"]}


def test_operating_points_default_targets_ignore_test_labels():
    rng = np.random.default_rng(0)
    y_val = (rng.random(400) < 0.6).astype(int)
    p_val = np.clip(rng.normal(0.35 + 0.3 * y_val, 0.2), 0, 1).round(2)
    y_test = (rng.random(600) < 0.6).astype(int)
    p_test = np.clip(rng.normal(0.35 + 0.3 * y_test, 0.2), 0, 1)
    ops = stats.operating_points(y_val, p_val, y_test, p_test, n_boot=300)
    flipped = stats.operating_points(y_val, p_val, 1 - y_test, p_test, n_boot=300)
    assert list(ops) == [
        "sensitivity_at_specificity_0.8",
        "sensitivity_at_specificity_0.9",
        "specificity_at_recall_0.95",
        "specificity_at_recall_0.98",
    ]
    for name, op in ops.items():
        assert flipped[name]["threshold"] == op["threshold"]
        assert flipped[name]["validation"] == op["validation"]
        assert (
            op["validation"]["specificity" if "at_specificity" in name else "sensitivity"]
            >= (op["target"])
        )
        for figure in ("sensitivity", "specificity"):
            low, high = op["ci95"][figure]
            assert low <= op["test"][figure] <= high


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 1.0])
def test_specificity_threshold_is_most_sensitive(seed, target):
    rng = np.random.default_rng(seed)
    y = (rng.random(150) < 0.5).astype(int)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).round(2 if seed % 2 else 6)
    t = stats.choose_threshold_for_specificity(y, p, target)
    m = metrics.binary_metrics(y, p, t)
    assert m["specificity"] >= target
    best = max(
        ((p[y == 1] >= c).mean() for c in np.unique(p) if (p[y == 0] < c).mean() >= target),
        default=0.0,
    )
    assert m["recall"] == best
    for higher in np.unique(p)[np.unique(p) > t]:  # ties go to the higher specificity/threshold
        m_high = metrics.binary_metrics(y, p, higher)
        assert m_high["recall"] < m["recall"] or m_high["specificity"] < m["specificity"]


def test_specificity_threshold_when_no_score_qualifies():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.9, 0.9, 0.2, 0.9, 0.5])  # two NORMAL share the top score
    t = stats.choose_threshold_for_specificity(y, p, 0.5)
    assert t > 0.9 and metrics.binary_metrics(y, p, t)["specificity"] == 1.0
