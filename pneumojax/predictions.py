"""A run's predictions files (``predictions/val.csv``, ``predictions/test.csv``,
``eval-*/predictions.csv``): per image its path, label and P(pneumonia) of the members' mean
and of each member, written in full so that every figure can be recomputed from them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pneumojax import balance
from pneumojax.io import write_text_atomic
from pneumojax.metrics import CLASS_NAMES


def write_predictions(path: Path, items, member_p: np.ndarray):
    """Per image: path, label, P(pneumonia) (the members' mean) and each member's, exactly
    (float32 values written in full), so that a run's figures can be recomputed from it."""
    k = member_p.shape[1]
    header = "path,label,p_pneumonia" + (
        "".join(f",p_member{i + 1}" for i in range(k)) if k > 1 else ""
    )
    mean = balance.mean_probability(member_p.T)
    lines = [header] + [
        ",".join(
            [_csv_field(str(item[0])), CLASS_NAMES[item[1]], repr(float(m))]
            + ([repr(float(v)) for v in row] if k > 1 else [])
        )
        for item, m, row in zip(items, mean, member_p)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + "\n")


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """What :func:`write_predictions` wrote: paths, labels (0/1) and P(pneumonia) per image and
    member, (n, members)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return [], np.zeros(0, np.int32), np.zeros((0, 1), np.float32)
    members = [k for k in rows[0] if k.startswith("p_member")] or ["p_pneumonia"]
    p = np.array([[float(r[k]) for k in members] for r in rows], np.float32)
    labels = np.array([CLASS_NAMES.index(r["label"]) for r in rows], np.int32)
    return [r["path"] for r in rows], labels, p
