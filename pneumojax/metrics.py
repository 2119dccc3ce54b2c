"""Binary classification figures for pneumonia (class 1) vs normal (class 0).

Everything here takes plain arrays of labels and pneumonia probabilities, so it serves validation,
test, the CLI and benchmarks alike. Thresholds are chosen on validation data
(:func:`choose_threshold`) and only then applied to test (:func:`evaluate_predictions`); nothing
here looks at test labels to pick an operating point.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import classification_report, roc_auc_score, roc_curve

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
# The figures that get a confidence interval, in display order.
FIGURES = ("accuracy", "recall", "precision", "specificity", "f1", "auc")

# Bound on resamples x items held in memory at once by the bootstrap (~100 MB of temporaries).
_BOOT_CHUNK_ITEMS = 2_000_000


def _check_inputs(y_true, p) -> tuple[np.ndarray, np.ndarray]:
    """Labels as an int array of 0/1 and probabilities as a finite float array in [0, 1]."""
    y = np.asarray(y_true)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"y_true and p must be 1-D of equal length, got {y.shape} and {p.shape}")
    if y.size == 0:
        raise ValueError("no predictions to evaluate (empty arrays)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must hold 0 (NORMAL) or 1 (PNEUMONIA), got {np.unique(y)}")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("p must be finite pneumonia probabilities in [0, 1]")
    return y.astype(np.int64), p


def _safe_div(num, den):
    """num / den elementwise with 0.0 where den == 0 (the zero_division=0 convention)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _figures_from_counts(tn, fp, fn, tp) -> dict[str, np.ndarray]:
    """Threshold figures from confusion counts; counts may be scalars or arrays (bootstrap)."""
    recall = _safe_div(tp, tp + fn)
    precision = _safe_div(tp, tp + fp)
    return {
        "accuracy": _safe_div(tp + tn, tn + fp + fn + tp),
        "recall": recall,
        "precision": precision,
        "specificity": _safe_div(tn, tn + fp),
        # 2tp / (2tp + fp + fn) equals the harmonic mean and is 0 exactly when sklearn says so.
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
    }


def _confusion_counts(y, pred, axis=-1):
    """(tn, fp, fn, tp) summed along axis; y and pred are boolean arrays."""
    tp = np.sum(pred & y, axis=axis)
    fp = np.sum(pred & ~y, axis=axis)
    fn = np.sum(~pred & y, axis=axis)
    tn = np.sum(~pred & ~y, axis=axis)
    return tn, fp, fn, tp


def rank_auc(y_true, p) -> np.ndarray:
    """ROC AUC by the Mann-Whitney rank formula, vectorized over leading axes.

    ``y_true`` and ``p`` have shape ``(..., n)``; each row gets
    ``(sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with tied scores given
    their average rank, which equals sklearn's ``roc_auc_score``. Rows with one class only get NaN.
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p, axis=-1, kind="stable")
    s = np.take_along_axis(p, order, axis=-1)
    y_sorted = np.take_along_axis(y, order, axis=-1)

    n = s.shape[-1]
    pos = np.broadcast_to(np.arange(n), s.shape)
    new_run = np.ones(s.shape, dtype=bool)
    new_run[..., 1:] = s[..., 1:] != s[..., :-1]
    # First and last sorted position of each run of equal scores, spread to every member.
    first = np.maximum.accumulate(np.where(new_run, pos, 0), axis=-1)
    run_end = np.ones(s.shape, dtype=bool)
    run_end[..., :-1] = new_run[..., 1:]
    last = np.flip(
        np.minimum.accumulate(np.flip(np.where(run_end, pos, n - 1), axis=-1), axis=-1), axis=-1
    )
    avg_rank = (first + last) / 2.0 + 1.0

    n_pos = y_sorted.sum(axis=-1)
    n_neg = n - n_pos
    rank_sum = np.sum(np.where(y_sorted, avg_rank, 0.0), axis=-1)
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def choose_threshold(y_true, p_pneumonia, target_recall: float = 0.98) -> float:
    """Threshold with the highest specificity among those reaching ``target_recall``.

    Meant for VALIDATION data; the result is then applied unchanged to test. Candidates are the
    ROC curve's thresholds (every distinct score); a prediction is PNEUMONIA when p >= threshold.
    Ties in specificity go to the higher threshold. Returns a finite float in [0, 1].
    """
    if not 0.0 <= target_recall <= 1.0:
        raise ValueError(f"target_recall must lie in [0, 1], got {target_recall}")
    y, p = _check_inputs(y_true, p_pneumonia)
    if np.unique(y).size < 2:
        raise ValueError(
            "choose_threshold needs both NORMAL (0) and PNEUMONIA (1) examples; "
            f"the data holds class {int(y[0])} only"
        )
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    # Thresholds fall and fpr never decreases along the curve, so the first point reaching the
    # target recall has the lowest fpr (highest specificity) and, among ties, the highest threshold.
    i = int(np.argmax(tpr >= target_recall))
    # thresholds[0] is +inf (nothing predicted positive); only a target of 0 can select it.
    return float(np.clip(thresholds[i], 0.0, 1.0))


def binary_metrics(y_true, p_pneumonia, threshold: float) -> dict[str, Any]:
    """Figures at one threshold; a prediction is PNEUMONIA (1) when p >= threshold.

    Returns n, threshold, accuracy, recall (sensitivity), precision, specificity, f1, auc and
    confusion_matrix ``[[tn, fp], [fn, tp]]``, all plain Python numbers. Undefined ratios are 0.0;
    auc is None when only one class is present.
    """
    y, p = _check_inputs(y_true, p_pneumonia)
    tn, fp, fn, tp = (int(c) for c in _confusion_counts(y.astype(bool), p >= threshold))
    figures = {k: float(v) for k, v in _figures_from_counts(tn, fp, fn, tp).items()}
    auc = float(roc_auc_score(y, p)) if np.unique(y).size == 2 else None
    return {
        "n": int(y.size),
        "threshold": float(threshold),
        **figures,
        "auc": auc,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def _bootstrap_figures(y, p, threshold, idx, one_class=False) -> dict[str, np.ndarray]:
    """All FIGURES for each resample (row of idx), dropping resamples with one class only
    (unless the data holds one class only: then every resample)."""
    yb = y.astype(bool)[idx]
    keep = np.ones(len(idx), bool) if one_class else yb.any(axis=1) & ~yb.all(axis=1)
    yb, pb = yb[keep], p[idx[keep]]
    figures = _figures_from_counts(*_confusion_counts(yb, pb >= threshold, axis=1))
    figures["auc"] = rank_auc(yb, pb)
    return figures


def bootstrap_ci(
    y_true, p, threshold: float, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float] | list[None]]:
    """Percentile bootstrap intervals ``[low, high]`` per figure, resampling images.

    Resamples holding one class only are skipped (AUC, recall and specificity are undefined
    there); if every resample is skipped, each interval is ``[None, None]``. Data of one class
    only (an external set of NORMAL images, say) get intervals for the figures defined on it
    (specificity and accuracy, or recall and accuracy) and ``[None, None]`` for the others.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    y, p = _check_inputs(y_true, p)
    one_class = np.unique(y).size < 2
    rng = np.random.default_rng(seed)
    n = y.size
    chunk = max(1, _BOOT_CHUNK_ITEMS // n)
    parts = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        parts.append(_bootstrap_figures(y, p, threshold, idx, one_class))
    samples = {k: np.concatenate([part[k] for part in parts]) for k in FIGURES}
    if one_class:
        defined = ("accuracy", "recall") if y.any() else ("accuracy", "specificity")
        samples = {k: v if k in defined else v[:0] for k, v in samples.items()}

    tail = (1.0 - level) / 2.0 * 100.0
    out = {}
    for k in FIGURES:
        if samples[k].size == 0:
            out[k] = [None, None]
        else:
            low, high = np.percentile(samples[k], [tail, 100.0 - tail])
            out[k] = [float(low), float(high)]
    return out


def _to_builtin(x):
    """Recursively turn numpy scalars and containers into JSON-serializable Python values."""
    if isinstance(x, dict):
        return {str(k): _to_builtin(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_builtin(v) for v in x]
    if isinstance(x, np.ndarray):
        return _to_builtin(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def evaluate_predictions(
    y_true, p, threshold: float, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The metrics.json payload for one evaluation (normally test) at a validation-chosen threshold.

    Top level: :func:`binary_metrics` at ``threshold``. ``at_0_5``: the same at 0.5, for
    comparison with the Keras study. ``ci95``: bootstrap 95% intervals per figure at
    ``threshold``. ``bootstrap``: how the intervals were drawn. ``classification_report``:
    sklearn's per-class report at ``threshold``.
    """
    y, p = _check_inputs(y_true, p)
    payload = binary_metrics(y, p, threshold)
    payload["at_0_5"] = binary_metrics(y, p, 0.5)
    payload["ci95"] = bootstrap_ci(y, p, threshold, n_boot=n_boot, seed=seed, level=0.95)
    payload["bootstrap"] = {"n_boot": int(n_boot), "seed": int(seed), "level": 0.95}
    payload["classification_report"] = classification_report(
        y,
        (p >= threshold).astype(np.int64),
        labels=[0, 1],
        target_names=list(CLASS_NAMES),
        output_dict=True,
        zero_division=0,
    )
    return _to_builtin(payload)


def _fmt(v) -> str:
    return "  n/a " if v is None else f"{v:.4f}"


def format_metrics(m: dict[str, Any]) -> str:
    """A compact multi-line summary of a binary_metrics / evaluate_predictions dict."""
    ci = m.get("ci95", {})
    at_half = m.get("at_0_5")
    lines = [f"n={m['n']}  threshold={m['threshold']:.4f}"]
    header = f"{'figure':<12}{'value':>8}   {'95% CI':<18}"
    lines.append(header + (f"{'at 0.5':>8}" if at_half else ""))
    for k in FIGURES:
        low, high = ci.get(k, (None, None))
        interval = f"[{_fmt(low)}, {_fmt(high)}]" if low is not None else ""
        row = f"{k:<12}{_fmt(m.get(k)):>8}   {interval:<18}"
        if at_half:
            row += f"{_fmt(at_half.get(k)):>8}"
        lines.append(row)
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    lines.append(f"confusion    tn={tn} fp={fp} fn={fn} tp={tp}")
    return "\n".join(line.rstrip() for line in lines)


def combined_metrics(y: np.ndarray, member_p: np.ndarray, thresholds: list[float]) -> dict:
    """One model: figures at its threshold. A seed ensemble (several members, one threshold):
    figures of the members' mean probability at that threshold. A balance ensemble (one
    threshold per member): labels by majority vote of the members (each at its own validation
    threshold; ties count as PNEUMONIA), AUC from the mean probability."""
    k = member_p.shape[1]
    if len(thresholds) == 1:
        p = member_p[:, 0] if k == 1 else member_p.T.mean(0)  # as balance.mean_probability
        metrics = evaluate_predictions(y, p, thresholds[0])
        if k > 1:
            metrics["ensemble"] = {
                "members": k,
                "label": "mean probability at one validation threshold",
                "auc": "mean probability",
                "threshold": "chosen on the members' mean validation probability",
            }
    else:
        # The vote fraction at 0.5 gives exactly balance.vote's labels (ties -> PNEUMONIA).
        votes = (member_p >= np.asarray(thresholds)).mean(1)
        metrics = evaluate_predictions(y, votes, 0.5)
        mean_p = member_p.mean(1)
        auc_ci = bootstrap_ci(y, mean_p, 0.5)["auc"]
        auc = binary_metrics(y, mean_p, 0.5)["auc"]
        metrics["auc"], metrics["ci95"]["auc"] = auc, auc_ci
        votes_05 = (member_p >= 0.5).mean(1)
        metrics["at_0_5"] = {**binary_metrics(y, votes_05, 0.5), "auc": auc}
        metrics["ensemble"] = {
            "members": len(thresholds),
            "label": "majority vote",
            "auc": "mean probability",
            "threshold": "0.5 on the fraction of members voting PNEUMONIA",
        }
    metrics["member_thresholds"] = [float(t) for t in thresholds]
    return metrics
