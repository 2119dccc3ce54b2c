"""Using a finished run: ``evaluate_run`` (``pneumojax evaluate``) and ``predict_paths``
(``predict``), both on :mod:`pneumojax.scoring`.

One scoring path serves training's own evaluation, ``evaluate`` and ``predict``
(:class:`RunModel`), so a saved run re-scores exactly to its metrics.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pneumojax.data import load_images
from pneumojax.scoring import (
    gather_image_files,
    load_run,
    prediction_rows,
    run_resize,
    score_run,
    scoring_tta,
)


def evaluate_run(
    run_dir: str | Path,
    data: str | None = None,
    split: str = "test",
    out: str | Path | None = None,
    log=print,
    strict: bool = False,
    precision: str | None = None,
    tta: int | None = None,
    tta_augment: str | None = None,
) -> dict:
    """Evaluates a run's best model on a split of its own data or of another folder.

    The thresholds are the ones the run chose on its validation split. On the run's own test
    split this reproduces its metrics.json exactly (same precision, same scoring path, the
    run's own test-time augmentation). ``tta``/``tta_augment`` (``--tta N``,
    ``--tta-augment``) score with another TTA: see :func:`scoring_tta`.
    :func:`score_run` also returns the run and thresholds it used (for
    :func:`pneumojax.explain.evaluate_and_explain`).
    """
    return score_run(run_dir, data, split, out, log, strict, precision, tta, tta_augment)[0]


def predict_paths(
    run_dir: str | Path,
    paths: list[str],
    precision: str | None = None,
    log=None,
    tta: int | None = None,
    tta_augment: str | None = None,
) -> list[dict]:
    """Pneumonia probability and label for each image (folders are searched for images),
    with the run's own test-time augmentation unless ``tta``/``tta_augment`` say otherwise
    (:func:`scoring_tta`)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    run = load_run(run_dir, precision, log)
    setting, thresholds, _ = scoring_tta(run, tta, tta_augment, log)
    files = gather_image_files(paths, log)
    images = load_images(
        files, run.config["image_size"], progress=len(files) > 50, resize=run_resize(run.config)
    )
    p = run.model.probabilities_of_images(images, tta=setting)
    return prediction_rows(run, files, p, thresholds)
