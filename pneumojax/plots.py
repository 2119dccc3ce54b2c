"""The PNG plots a run folder holds: training curves, confusion matrix, ROC, run comparison.

Figures are built as ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot: no GUI
backend is touched, no global figure registry fills up in long runs, and it is safe off the main
thread. Every function writes a PNG, creates parent folders and returns the path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_auc_score, roc_curve

from pneumojax.metrics import CLASS_NAMES

# Figures shown side by side by plot_comparison, in order.
COMPARED_FIGURES = ("accuracy", "recall", "precision", "specificity", "auc")


def _new_figure(width: float, height: float, ncols: int = 1):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    fig.clear()  # drop artists now rather than waiting for garbage collection
    return path


def _series(history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for one history key, skipping epochs where it is missing or None."""
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        if value is not None:
            xs.append(row.get("epoch", i + 1))
            ys.append(float(value))
    return xs, ys


def plot_history(history: list[dict], path) -> Path:
    """Loss and accuracy per epoch, train and validation, in two panels.

    ``history`` holds one dict per epoch with keys epoch, loss, accuracy, val_loss,
    val_accuracy; any of them may be missing (a missing epoch counts from 1).
    """
    fig, (ax_loss, ax_acc) = _new_figure(10, 4, ncols=2)
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        for prefix, name, style in (("", "train", "o-"), ("val_", "validation", "s--")):
            xs, ys = _series(history, prefix + key)
            if xs:
                ax.plot(xs, ys, style, markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    return _save(fig, path)


def plot_confusion_matrix(cm, path, title: str = "Confusion matrix") -> Path:
    """2x2 confusion matrix (rows true, columns predicted) with counts and row percentages."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.shape != (2, 2):
        raise ValueError(f"expected a 2x2 confusion matrix, got shape {cm.shape}")
    row_sums = cm.sum(axis=1, keepdims=True)
    # Colour by row share so the 234-vs-390 class imbalance does not decide the shading.
    share = np.divide(cm, row_sums, out=np.zeros((2, 2)), where=row_sums != 0)

    fig, ax = _new_figure(4.8, 4.2)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{100 * share[i, j]:.1f}%",
                ha="center",
                va="center",
                fontsize=12,
                color="white" if share[i, j] > 0.5 else "black",
            )
    ax.set_xticks([0, 1], labels=CLASS_NAMES)
    ax.set_yticks([0, 1], labels=CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_roc(y_true, p, path, auc: float | None = None, threshold: float | None = None) -> Path:
    """ROC curve with the AUC in the legend and, if given, the threshold's operating point."""
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    fpr, tpr, _ = roc_curve(y, p)
    if auc is None:
        auc = roc_auc_score(y, p)

    fig, ax = _new_figure(5, 5)
    ax.plot(fpr, tpr, lw=2, label=f"ROC (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="gray", label="chance")
    if threshold is not None:
        pred = p >= threshold
        recall = (pred & y).sum() / y.sum()
        false_pos_rate = (pred & ~y).sum() / (~y).sum()
        ax.plot(
            [false_pos_rate],
            [recall],
            "o",
            color="crimson",
            markersize=8,
            label=f"threshold {threshold:.3f}: recall {recall:.3f}, "
            f"specificity {1 - false_pos_rate:.3f}",
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (recall)")
    ax.set_title("ROC, PNEUMONIA positive")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _value_and_error(metrics: dict[str, Any], key: str) -> tuple[float, float, float]:
    """(value, minus, plus) for an error bar; NaN value when the figure is absent."""
    value = metrics.get(key)
    if value is None:
        return math.nan, 0.0, 0.0
    low, high = metrics.get("ci95", {}).get(key, (None, None))
    if low is None or high is None:
        return float(value), 0.0, 0.0
    # A percentile interval can miss the point estimate on odd data; matplotlib rejects
    # negative error lengths.
    return float(value), max(0.0, value - low), max(0.0, high - value)


def plot_comparison(rows: list[dict], path) -> Path:
    """Grouped bars of accuracy, recall, precision, specificity and AUC per run, 95% CI bars.

    Each row has ``name`` and ``metrics``, a metrics.json payload (figures plus ``ci95``).
    """
    n_runs = max(len(rows), 1)
    x = np.arange(len(COMPARED_FIGURES))
    width = 0.8 / n_runs
    fig, ax = _new_figure(min(16.0, 7.0 + 0.6 * n_runs), 4.5)
    for r, row in enumerate(rows):
        stats = [_value_and_error(row["metrics"], k) for k in COMPARED_FIGURES]
        values, minus, plus = (np.array(col) for col in zip(*stats))
        ax.bar(
            x + (r - (n_runs - 1) / 2) * width,
            values,
            width,
            yerr=np.stack([minus, plus]),
            capsize=3,
            label=str(row["name"]),
        )
    ax.set_xticks(x, labels=COMPARED_FIGURES)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("value (bars: 95% bootstrap CI)")
    ax.set_title("Runs compared")
    ax.grid(axis="y", alpha=0.3)
    if rows:
        # Outside the axes: inside, it would cover the bars of whichever figure sits beneath it.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
