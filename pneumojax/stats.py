"""Statistics for comparing runs on the same test images: DeLong, McNemar, calibration and
clinical operating points.

Everything here takes plain numpy arrays (labels 0 = NORMAL, 1 = PNEUMONIA, and pneumonia
probabilities or predicted labels), like :mod:`pneumojax.metrics`, whose input checks, threshold
rule and bootstrap it reuses. Paired tests (:func:`delong_auc_test`, :func:`mcnemar_test`) need the
two runs' outputs on the SAME images in the SAME order.

Ensembles: the caller passes what the ensemble's figures are read from. For DeLong (and ROC AUC,
calibration, operating points) that is the members' mean probability, ``member_p.mean(1)``; for
McNemar it is the majority-vote labels. Nothing here knows about members.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats as sps

from pneumojax.metrics import _check_inputs, binary_metrics, bootstrap_ci, choose_threshold

# Two-sided 95% normal quantile, 1.959963984540054.
_Z95 = float(sps.norm.ppf(0.975))

# McNemar: the exact binomial test below this many discordant pairs, chi-square above.
MCNEMAR_EXACT_BELOW = 25

# The operating points a clinician asks for: (figure held on validation, its target).
CLINICAL_TARGETS = (
    ("specificity", 0.80),
    ("specificity", 0.90),
    ("recall", 0.95),
    ("recall", 0.98),
)


def _check_two_classes(y, need: int = 1) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos < need or n_neg < need:
        raise ValueError(
            f"need at least {need} NORMAL (0) and {need} PNEUMONIA (1) examples, "
            f"got {n_neg} and {n_pos}"
        )
    return n_pos, n_neg


# --------------------------------------------------------------------------------------- DeLong


def _delong_placements(y: np.ndarray, scores: np.ndarray):
    """AUCs and DeLong placement values for each row of ``scores`` (shape (k, n)).

    Sun & Xu (2014): with midranks tx of the positives among the positives, ty of the negatives
    among the negatives and tz of everything among everything, the placement of positive i is
    V10_i = (tz_i - tx_i) / n_neg (the fraction of negatives below it, ties 1/2) and of negative
    j is V01_j = 1 - (tz_j - ty_j) / n_pos (the fraction of positives above it, ties 1/2).
    """
    pos = scores[:, y == 1]
    neg = scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx = sps.rankdata(pos, axis=1)
    ty = sps.rankdata(neg, axis=1)
    tz = sps.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01


def _delong_covariance(y: np.ndarray, scores: np.ndarray):
    """AUCs (k,) and their DeLong covariance matrix (k, k): S10 / n_pos + S01 / n_neg."""
    aucs, v10, v01 = _delong_placements(y, scores)
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / v10.shape[1] + s01 / v01.shape[1]


def delong_auc_ci(y_true, p) -> dict[str, Any]:
    """One ROC AUC with its DeLong (1988) variance and a 95% normal interval.

    The variance is DeLong, DeLong & Clarke-Pearson's structural-components estimate,
    ``var(V10) / n_pos + var(V01) / n_neg`` with unbiased (n - 1) sample variances, computed from
    midranks as in Sun & Xu (2014), O(n log n). This is pROC's ``var(roc)`` and
    ``ci.auc(roc, method="delong")``. The interval ``auc -/+ 1.96 se`` is clipped to [0, 1].

    Returns ``{"auc", "var", "se", "ci95": [low, high], "n_pos", "n_neg"}`` as Python floats/ints.
    Needs at least two images of each class.
    """
    y, p = _check_inputs(y_true, p)
    n_pos, n_neg = _check_two_classes(y, need=2)
    aucs, cov = _delong_covariance(y, p[None, :])
    auc, var = float(aucs[0]), float(cov[0, 0])
    se = float(np.sqrt(max(var, 0.0)))
    return {
        "auc": auc,
        "var": var,
        "se": se,
        "ci95": [max(0.0, auc - _Z95 * se), min(1.0, auc + _Z95 * se)],
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def delong_auc_test(y_true, p_a, p_b) -> dict[str, Any]:
    """DeLong's paired test for the difference of two correlated ROC AUCs on the same images.

    DeLong, DeLong & Clarke-Pearson (1988), Biometrics 44:837-845, with the fast midrank algorithm
    of Sun & Xu (2014), IEEE Signal Processing Letters 21:1389-1393. ``p_a`` and ``p_b`` score the
    same images as ``y_true`` (for an ensemble pass its mean member probability). The statistic is
    ``z = (auc_a - auc_b) / se`` with ``se**2 = var_a + var_b - 2 cov_ab``; the p value is
    two-sided from the standard normal, the interval ``delta -/+ 1.96 se`` (normal, not clipped).
    When the difference has no variance left (e.g. ``p_a == p_b``) and the AUCs are equal, z = 0
    and p = 1, as in pROC.
    This reproduces pROC's ``roc.test(roc_a, roc_b, method="delong")``.

    Returns a dict of Python numbers: ``auc_a``, ``auc_b``, ``auc_delta`` (a - b),
    ``auc_delta_se``, ``auc_delta_ci95`` ([low, high]), ``z``, ``p``, ``var_a``, ``var_b``,
    ``cov_ab``, ``n_pos``, ``n_neg``, ``method``. Needs at least two images of each class.
    """
    y, p_a = _check_inputs(y_true, p_a)
    _, p_b = _check_inputs(y, p_b)
    n_pos, n_neg = _check_two_classes(y, need=2)
    aucs, cov = _delong_covariance(y, np.stack([p_a, p_b]))
    delta = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    if se > 0.0:
        z = delta / se
    else:  # no variance left: any difference is certain, none is no evidence at all
        z = 0.0 if delta == 0.0 else float(np.copysign(np.inf, delta))
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "auc_delta": delta,
        "auc_delta_se": se,
        "auc_delta_ci95": [delta - _Z95 * se, delta + _Z95 * se],
        "z": float(z),
        "p": float(2.0 * sps.norm.sf(abs(z))),
        "var_a": float(cov[0, 0]),
        "var_b": float(cov[1, 1]),
        "cov_ab": float(cov[0, 1]),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "method": "DeLong paired test (DeLong et al. 1988; Sun & Xu 2014 midranks)",
    }


# ------------------------------------------------------------------------------------- McNemar


def _check_labels(name, pred, n) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.shape != (n,):
        raise ValueError(f"{name} must be 1-D of length {n}, got shape {pred.shape}")
    if not np.isin(pred, (0, 1)).all():
        raise ValueError(f"{name} must hold predicted labels 0 or 1, got {np.unique(pred)}")
    return pred.astype(np.int64)


def mcnemar_test(y_true, pred_a, pred_b) -> dict[str, Any]:
    """McNemar's test for paired errors of two classifiers on the same images.

    ``pred_a`` and ``pred_b`` are predicted labels (0/1) for the images of ``y_true`` (for an
    ensemble pass its majority-vote labels). Only discordant images count: ``b`` = a right and b
    wrong, ``c`` = a wrong and b right. Under H0 (equal error rates) b ~ Binomial(b + c, 1/2).

    Rule: with ``b + c < 25`` the p value is the exact two-sided binomial test
    (``scipy.stats.binomtest(b, b + c, 0.5)``); otherwise the chi-square test with Edwards'
    continuity correction, ``chi2 = max(|b - c| - 1, 0)**2 / (b + c)`` on 1 degree of freedom.
    (The ``max(., 0)`` only matters when b == c, where the correction would otherwise overshoot
    to a positive statistic; p is then 1.) ``b = c = 0`` gives p = 1 by both routes.

    Returns Python numbers: ``n``, ``b``, ``c``, ``both_correct``, ``both_wrong``,
    ``table`` ([[both correct, a right b wrong], [a wrong b right, both wrong]]),
    ``exact_p``, ``chi2`` (corrected), ``chi2_p``, ``chi2_uncorrected``, ``p`` (the one the rule
    picks) and ``method`` ("exact" or "chi2").
    """
    y = _check_labels("y_true", y_true, np.size(y_true))
    if y.size == 0:
        raise ValueError("no predictions to compare (empty arrays)")
    right_a = _check_labels("pred_a", pred_a, y.size) == y
    right_b = _check_labels("pred_b", pred_b, y.size) == y
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    both_correct = int(np.sum(right_a & right_b))
    both_wrong = int(np.sum(~right_a & ~right_b))
    discordant = b + c
    if discordant == 0:
        exact_p, chi2, chi2_unc, chi2_p = 1.0, 0.0, 0.0, 1.0
    else:
        exact_p = float(sps.binomtest(b, discordant, 0.5).pvalue)
        chi2 = max(abs(b - c) - 1, 0) ** 2 / discordant
        chi2_unc = (b - c) ** 2 / discordant
        chi2_p = float(sps.chi2.sf(chi2, df=1))
    exact = discordant < MCNEMAR_EXACT_BELOW
    return {
        "n": int(y.size),
        "b": b,
        "c": c,
        "both_correct": both_correct,
        "both_wrong": both_wrong,
        "table": [[both_correct, b], [c, both_wrong]],
        "exact_p": exact_p,
        "chi2": float(chi2),
        "chi2_p": chi2_p,
        "chi2_uncorrected": float(chi2_unc),
        "p": exact_p if exact else chi2_p,
        "method": "exact" if exact else "chi2",
    }


# --------------------------------------------------------------------------------- Calibration


def brier_score(y_true, p) -> float:
    """Mean squared difference between the pneumonia probability and the label (0 is perfect)."""
    y, p = _check_inputs(y_true, p)
    return float(np.mean((p - y) ** 2))


def _bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    # floor(p * n_bins) puts k/n <= p < (k+1)/n in bin k; p = 1 joins the last bin.
    return np.minimum(np.floor(p * n_bins).astype(np.int64), int(n_bins) - 1)


def reliability_curve(y_true, p, n_bins: int = 10) -> dict[str, list]:
    """Per equal-width probability bin: mean predicted probability, observed frequency, count.

    Bin k of ``n_bins`` holds ``k / n_bins <= p < (k + 1) / n_bins`` (``p = 1`` falls in the last
    bin). Every bin is listed; an empty bin has count 0 and ``None`` for the two means. Returns
    ``{"bin_edges": [n_bins + 1], "mean_predicted": [n_bins], "observed_frequency": [n_bins],
    "count": [n_bins]}``.
    """
    y, p = _check_inputs(y_true, p)
    k = _bins(p, n_bins)
    count = np.bincount(k, minlength=n_bins)
    sum_p = np.bincount(k, weights=p, minlength=n_bins)
    sum_y = np.bincount(k, weights=y, minlength=n_bins)
    full = count > 0
    mean_p = np.divide(sum_p, count, out=np.zeros(n_bins), where=full)
    freq = np.divide(sum_y, count, out=np.zeros(n_bins), where=full)
    return {
        "bin_edges": (np.arange(n_bins + 1) / n_bins).tolist(),
        "mean_predicted": [float(v) if f else None for v, f in zip(mean_p, full)],
        "observed_frequency": [float(v) if f else None for v, f in zip(freq, full)],
        "count": count.astype(int).tolist(),
    }


def expected_calibration_error(y_true, p, n_bins: int = 10) -> float:
    """ECE: sum over equal-width bins of (bin count / n) * |mean predicted - observed frequency|.

    The bins are :func:`reliability_curve`'s (``n_bins`` equal-width bins on [0, 1]); empty bins
    contribute nothing. 0 is perfect; a perfectly calibrated model still shows a small positive
    ECE from sampling noise (roughly ``sqrt(p (1 - p) / bin count)`` per bin).
    """
    curve = reliability_curve(y_true, p, n_bins)
    n = sum(curve["count"])
    return float(
        sum(
            c / n * abs(mp - fr)
            for c, mp, fr in zip(
                curve["count"], curve["mean_predicted"], curve["observed_frequency"]
            )
            if c
        )
    )


# --------------------------------------------------------------------------- Operating points


def choose_threshold_for_specificity(y_true, p_pneumonia, target_specificity: float = 0.9) -> float:
    """Threshold with the highest recall (sensitivity) among those reaching ``target_specificity``.

    The counterpart of :func:`pneumojax.metrics.choose_threshold`, meant for VALIDATION data.
    Candidates are the distinct scores (PNEUMONIA when p >= threshold); ties in recall go to the
    higher specificity, then to the higher threshold. When no score qualifies (many NORMAL images
    share the top score), the threshold is the next float above the top score, so that nothing
    is called PNEUMONIA (specificity 1).
    """
    if not 0.0 <= target_specificity <= 1.0:
        raise ValueError(f"target_specificity must lie in [0, 1], got {target_specificity}")
    y, p = _check_inputs(y_true, p_pneumonia)
    n_pos, n_neg = _check_two_classes(y)
    candidates = np.unique(p)[::-1]
    # Images at or above each candidate, per class (searchsorted on sorted scores).
    tp = n_pos - np.searchsorted(np.sort(p[y == 1]), candidates, side="left")
    fp = n_neg - np.searchsorted(np.sort(p[y == 0]), candidates, side="left")
    specificity = (n_neg - fp) / n_neg
    ok = specificity >= target_specificity
    if not ok[0]:
        return float(np.nextafter(candidates[0], np.inf))
    # Candidates fall, so recall rises and specificity falls along them: the qualifying ones are
    # a prefix, its last one has the most recall, and the first candidate with that recall has
    # the most specificity (and the highest threshold) among the ties.
    best_tp = tp[np.flatnonzero(ok)[-1]]
    return float(candidates[int(np.argmax(tp == best_tp))])


def operating_points(
    y_val,
    p_val,
    y_test,
    p_test,
    targets=CLINICAL_TARGETS,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Clinical operating points: threshold chosen on validation, figures read on test.

    ``targets`` lists ``(figure, target)`` pairs, figure "specificity" or "recall"; the default is
    sensitivity at specificity 0.80 and 0.90 and specificity at recall 0.95 and 0.98. For
    ("specificity", s) the threshold is the most sensitive one whose VALIDATION specificity is at
    least s (:func:`choose_threshold_for_specificity`); for ("recall", r) the most specific one
    whose VALIDATION recall is at least r (:func:`pneumojax.metrics.choose_threshold`). Test labels
    never influence a threshold. At that threshold, TEST sensitivity and specificity get seeded
    percentile bootstrap 95% intervals over the test images (:func:`pneumojax.metrics.bootstrap_ci`;
    every point uses the same resamples).

    For an ensemble pass the score its figures are thresholded on (e.g. the mean probability).
    Returns ``{name: {"figure", "target", "threshold", "validation": {"sensitivity",
    "specificity"}, "test": {"sensitivity", "specificity"}, "ci95": {"sensitivity": [lo, hi],
    "specificity": [lo, hi]}}}`` with names such as ``"sensitivity_at_specificity_0.8"`` and
    ``"specificity_at_recall_0.95"``.
    """
    y_val, p_val = _check_inputs(y_val, p_val)
    y_test, p_test = _check_inputs(y_test, p_test)
    out = {}
    for figure, target in targets:
        if figure == "specificity":
            threshold = choose_threshold_for_specificity(y_val, p_val, target)
            name = f"sensitivity_at_specificity_{target:g}"
        elif figure == "recall":
            threshold = choose_threshold(y_val, p_val, target)
            name = f"specificity_at_recall_{target:g}"
        else:
            raise ValueError(f"targets hold ('specificity' or 'recall', target), got {figure!r}")
        val = binary_metrics(y_val, p_val, threshold)
        test = binary_metrics(y_test, p_test, threshold)
        ci = bootstrap_ci(y_test, p_test, threshold, n_boot=n_boot, seed=seed)
        out[name] = {
            "figure": figure,
            "target": float(target),
            "threshold": float(threshold),
            "validation": {"sensitivity": val["recall"], "specificity": val["specificity"]},
            "test": {"sensitivity": test["recall"], "specificity": test["specificity"]},
            "ci95": {"sensitivity": ci["recall"], "specificity": ci["specificity"]},
        }
    return out
