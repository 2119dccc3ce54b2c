#!/usr/bin/env python
"""What separates the classes at each site, before any network: a few global image statistics
and a linear model on thumbnails, trained on the training site and scored on another.

For the training folder and an external one: the AUC of each statistic alone (mean grey
level, spread, the 5-95th percentile range, the mean absolute horizontal gradient as a measure
of fine texture, the centre's mean) for PNEUMONIA, on the raw grey image and on the histogram-
equalised one; then a logistic regression on S x S thumbnails (raw, equalised, standardised),
fitted on the training folder (a random 75%) and scored on its other 25% and on every external
image. A statistic whose AUC is far from 0.5 on one side of 0.5 at one site and on the other
side at the other is a shortcut that reverses between sites.

Usage: ``python benchmarks/site_statistics.py --train DIR --external DIR [--size 64]
--out benchmarks/results/site-statistics.json`` (markdown beside it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NORMALISATIONS = ("raw", "equalize", "standardize")
THUMBNAILS = (8, 16, 32)


def load_grey(folder: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a folder (any layout pneumojax reads) as grey uint8 (n, size, size)."""
    from pneumojax.data import find_images, load_images  # noqa: PLC0415

    items = find_images(folder, one_class=True).items
    images = load_images(items, size, progress=False)
    return images.mean(-1).round().astype(np.uint8), np.array([y for _, y in items])


def normalise(grey: np.ndarray, how: str) -> np.ndarray:
    """As ``--intensity`` does it (pneumojax.intensity), on the grey images; float32."""
    from pneumojax.intensity import normalize_intensity  # noqa: PLC0415

    method = {"raw": "none", "equalize": "equalize", "standardize": "standardize"}[how]
    return np.asarray(normalize_intensity(grey[..., None], method))[..., 0]


def statistics(x: np.ndarray) -> dict[str, np.ndarray]:
    s = x.shape[1]
    c = slice(s // 4, 3 * s // 4)
    return {
        "mean grey level": x.mean((1, 2)),
        "standard deviation": x.std((1, 2)),
        "5-95th percentile range": np.percentile(x, 95, (1, 2)) - np.percentile(x, 5, (1, 2)),
        "fine texture (mean absolute horizontal gradient)": np.abs(np.diff(x, axis=2)).mean((1, 2)),
        "centre's mean": x[:, c, c].mean((1, 2)),
    }


def thumbnails(x: np.ndarray, t: int) -> np.ndarray:
    n, s = x.shape[0], x.shape[1]
    return x.reshape(n, t, s // t, t, s // t).mean((2, 4)).reshape(n, -1) / 255.0


def measure(train: str, external: str, size: int, seed: int = 0) -> dict:
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    sites = {"train": load_grey(train, size), "external": load_grey(external, size)}
    out = {"size": size, "counts": {}, "statistics": {}, "linear": {}}
    for site, (grey, y) in sites.items():
        out["counts"][site] = [int((y == 0).sum()), int((y == 1).sum())]
        for how in ("raw", "equalize"):
            for name, values in statistics(normalise(grey, how)).items():
                key = f"{name}, {how}"
                out["statistics"].setdefault(key, {})[site] = float(roc_auc_score(y, values))
    grey, y = sites["train"]
    order = np.random.default_rng(seed).permutation(len(y))
    fit, held = order[: int(0.75 * len(y))], order[int(0.75 * len(y)) :]
    for how in NORMALISATIONS:
        x_train, x_ext = normalise(grey, how), normalise(sites["external"][0], how)
        for t in THUMBNAILS:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
            f_train = thumbnails(x_train, t)
            model.fit(f_train[fit], y[fit])
            out["linear"][f"{how}, {t}x{t}"] = {
                "train_held_out": float(
                    roc_auc_score(y[held], model.decision_function(f_train[held]))
                ),
                "external": float(
                    roc_auc_score(
                        sites["external"][1], model.decision_function(thumbnails(x_ext, t))
                    )
                ),
            }
    return out


def render(payload: dict) -> str:
    r = payload["results"]
    hw = payload["hardware"]
    lines = [
        "## What separates the classes at each site, before any network",
        "",
        f"Training folder: {payload['train']} ({r['counts']['train'][0]} NORMAL / "
        f"{r['counts']['train'][1]} PNEUMONIA); external: {payload['external']} "
        f"({r['counts']['external'][0]} / {r['counts']['external'][1]}); images at "
        f"{r['size']} px, grey. AUC of each statistic alone for PNEUMONIA (above 0.5: higher "
        "in PNEUMONIA). CPU: " + f"{hw['cpu']}.",
        "",
        common.markdown_table(
            ["statistic", "training folder AUC", "external AUC"],
            [[k, f"{v['train']:.3f}", f"{v['external']:.3f}"] for k, v in r["statistics"].items()],
        ),
        "",
        "A logistic regression on thumbnails, fitted on 75% of the training folder: AUC on "
        "its other 25% and on every external image.",
        "",
        common.markdown_table(
            ["input", "training folder, held out", "external"],
            [
                [k, f"{v['train_held_out']:.3f}", f"{v['external']:.3f}"]
                for k, v in r["linear"].items()
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True)
    p.add_argument("--external", required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.size % max(THUMBNAILS):
        p.error(f"--size must be a multiple of {max(THUMBNAILS)}")
    payload = {
        "benchmark": "site_statistics",
        "train": args.train,
        "external": args.external,
        "hardware": common.hardware(),
        "results": measure(args.train, args.external, args.size),
    }
    md = common.write_outputs(args.out, payload, render(payload))
    print(render(payload))
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
