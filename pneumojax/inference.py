"""Scoring with a run's model exactly as it was trained, and using a finished run:
``load_run``, ``evaluate_run`` (``pneumojax evaluate``) and ``predict_paths`` (``predict``).

One scoring path serves training's own evaluation, ``evaluate`` and ``predict``
(:class:`RunModel`), so a saved run re-scores exactly to its metrics.json.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path


from pneumojax.data import (
    IMAGE_EXTENSIONS,
    Splits,
    check_images,
    image_set_key,
    load_images,
)
from pneumojax.data.layouts import not_regular_message
from pneumojax.metrics import format_metrics
from pneumojax.modelcard import write_model_card
from pneumojax.predictions import read_predictions, write_predictions  # noqa: F401 (read_: re-exported)
from pneumojax.workspace import load_split_arrays, resolve_data, write_json


from pneumojax.runmodel import split_probabilities
from pneumojax.scoring import (
    LoadedRun,
    load_run,
    prediction_rows,
    run_resize,
    score_split,
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


def score_run(
    run_dir,
    data=None,
    split="test",
    out=None,
    log=print,
    strict=False,
    precision=None,
    tta=None,
    tta_augment=None,
) -> tuple[dict, LoadedRun, Path]:
    """:func:`evaluate_run`'s work: (metrics, the run with the thresholds this evaluation
    used (re-derived for another TTA), the folder it wrote)."""
    run = load_run(run_dir, precision, log)
    setting, thresholds, tta_record = scoring_tta(run, tta, tta_augment, log)
    size, resize = run.config["image_size"], run_resize(run.config)
    folder = f"eval-{split}"  # the run's own data; another folder's are named after it
    if data is None:
        splits = Splits.from_json((run.run_dir / "splits.json").read_text())
        items = (
            splits.as_dict()[split] if split != "all" else splits.train + splits.val + splits.test
        )
    else:
        source = resolve_data(data, log, strict=strict, one_class=split == "all")
        if split == "all":
            items = [it for v in source.splits.values() for it in v]
        elif source.layout == "kaggle" and split in source.splits and source.splits[split]:
            items = source.splits[split]
        else:
            raise ValueError(
                f"--split {split} needs a Kaggle-layout folder with {split}/; for a "
                "flat NORMAL/ PNEUMONIA/ folder use --split all"
            )
        if not is_run_data(run.config, data, source):
            folder = f"eval-{split}-{_folder_label(source.root)}"
    x, y = load_split_arrays(items, size, log, resize)
    out = Path(out) if out else run.run_dir / folder / "metrics.json"
    key = image_set_key([p for p, _ in items], size, resize)
    p = split_probabilities(run.model, x, key, setting, split)
    metrics = score_split(
        y, p, thresholds, run.config["target_recall"], out.parent / "plots", split
    )
    metrics["data"] = str(data or run.config["data"])
    metrics["compute_precision"] = run.precision
    if setting is not None or tta_record["thresholds_rederived"]:
        metrics.update(tta_record)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, metrics)
    write_predictions(out.parent / "predictions.csv", items, p)
    if (run.run_dir / "metrics.json").exists():  # the card lists every set the run was scored on
        write_model_card(run.run_dir)
    log(format_metrics(metrics))
    log(f"wrote {out}")
    return metrics, dataclasses.replace(run, thresholds=thresholds), out.parent


def is_run_data(config: dict, data: str, source) -> bool:
    """Whether ``--data`` names the folder the run was trained on (``demo`` included)."""
    own = config.get("data")
    if own is None:
        return False
    if data == own:
        return True
    if own == "demo" or data == "demo":
        return False
    try:
        return Path(own).expanduser().resolve() == Path(source.root).resolve()
    except OSError:
        return False


def _folder_label(root: Path) -> str:
    """A data folder's name as part of a folder name (``eval-test-<name>``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(root).name).strip("._") or "data"
    return name


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


def gather_image_files(paths: list[str], log) -> list[str]:
    """The readable images among ``paths`` (folders are searched; unreadable files are
    skipped with a warning). Only regular files are opened: a named pipe, device or socket
    (which a reader would block on for ever) is skipped with a warning."""
    files: list[str] = []
    special: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            named = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
            files += [str(f) for f in named if f.is_file()]  # is_file: a regular file
            special += [str(f) for f in named if not f.is_file() and not f.is_dir()]
        elif p.is_file():
            files.append(str(p))
        elif p.exists():
            special.append(str(p))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if special:
        log(f"warning: {not_regular_message(special)}")
    if not files:
        raise FileNotFoundError("no images found in " + ", ".join(paths))
    files = check_images(files, warn=lambda m: log(f"warning: {m}"))
    if not files:
        raise FileNotFoundError("no readable images among " + ", ".join(paths))
    return files
