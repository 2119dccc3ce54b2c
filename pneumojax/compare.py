"""Side-by-side figures of several runs (``pneumojax compare``)."""

from __future__ import annotations

import json
from pathlib import Path

FIGURES = ("accuracy", "recall", "precision", "specificity", "auc")


def _adapted(run: Path) -> str:
    """``, adapted to FOLDER`` for a run made by ``pneumojax adapt``."""
    try:
        target = json.loads((run / "config.json").read_text()).get("adaptation", {}).get("target")
    except (OSError, ValueError):
        return ""
    return f", adapted to {Path(target).name}" if target else ""


def comparison_rows(run_dirs, metrics_file: str = "metrics.json") -> list[dict]:
    """One row per run: a name (folder and method) and its metrics."""
    rows = []
    for run in map(Path, run_dirs):
        path = run / metrics_file
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run} a finished pneumojax run?")
        try:
            metrics = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(
                f"{path} is not readable JSON ({e}): is {run} a finished run?"
            ) from None
        missing = [
            k for k in ("n", "threshold") if not isinstance(metrics, dict) or k not in metrics
        ]
        if missing and not (isinstance(metrics, dict) and "ensemble" in metrics and "n" in metrics):
            raise ValueError(
                f"{path} has no {' or '.join(missing)}: not the metrics of a finished pneumojax "
                f"run or evaluation (is {run} still running, or did it fail?)"
            )
        method = (metrics.get("balance") or {}).get("method", "none")
        rows.append({"name": f"{run.name} ({method}{_adapted(run)})", "metrics": metrics})
    return rows


def comparison_table(rows: list[dict]) -> str:
    """Markdown: each figure as value [95% interval], plus n and threshold."""
    head = "| run | n | threshold | " + " | ".join(FIGURES) + " |"
    lines = [head, "|" + "---|" * (3 + len(FIGURES))]
    for row in rows:
        m = row["metrics"]
        cells = []
        for f in FIGURES:
            lo, hi = m.get("ci95", {}).get(f) or [None, None]
            ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
            cells.append(f"{m[f]:.3f}{ci}" if m.get(f) is not None else "n/a")
        threshold = "vote" if "ensemble" in m else f"{m['threshold']:.3f}"
        lines.append(f"| {row['name']} | {m['n']} | {threshold} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
