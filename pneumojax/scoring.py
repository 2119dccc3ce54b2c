"""Scoring a saved run: loading it (:func:`load_run`: the model, its members, the thresholds it
chose on validation, its precision, resize and TTA), the thresholds and how members combine,
the TTA and thresholds to score with (:func:`scoring_tta`), a split's figures and plots
(:func:`score_split`), scoring a run on a split or another folder (:func:`score_run`), the
images a list of paths names (:func:`gather_image_files`), and predictions as rows and labels.
``inference`` (evaluate, predict) and ``explain`` both build on it; neither imports the other."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np

from pneumojax import balance
from pneumojax.data import IMAGE_EXTENSIONS, Splits, check_images, image_set_key
from pneumojax.data.layouts import not_regular_message
from pneumojax.backbones import get_backbone
from pneumojax.checkpoint import CheckpointError, load_variables
from pneumojax.features import (
    cacheable_frontier,
    suffix_variables,
    variables_digest,
)
from pneumojax.io import existing_folder
from pneumojax.metrics import choose_threshold, combined_metrics, format_metrics
from pneumojax.modelcard import write_model_card
from pneumojax.predictions import read_predictions, write_predictions  # noqa: F401 (read_: re-exported)
from pneumojax.model import (
    resolve_precision,
)
from pneumojax.plots import plot_confusion_matrix, plot_roc
from pneumojax.step import make_mesh
from pneumojax.tta import TTA, resolve_tta, run_tta
from pneumojax.runmodel import RunModel, split_probabilities, stack_members
from pneumojax.workspace import load_split_arrays, resolve_data, write_json


def validation_thresholds(
    y_val, p_val: np.ndarray, target_recall: float, combine: str = "vote"
) -> list[float]:
    """The most specific threshold reaching ``target_recall`` on validation (never on test):
    ``vote``, one per member (the balance ensemble's majority vote); ``mean``, one on the
    members' mean probability (a seed ensemble, or one model)."""
    if combine == "mean":
        return [choose_threshold(y_val, combined_probability(p_val), target_recall)]
    return [choose_threshold(y_val, p_val[:, i], target_recall) for i in range(p_val.shape[1])]


def combine_rule(config) -> str:
    """How a run combines its members: ``vote`` for ``--balance ensemble`` (members trained on
    different data), ``mean`` otherwise (one model, or a ``--seed-ensemble``). ``config``: a
    TrainConfig or a config.json dict."""
    balance_method = config["balance"] if isinstance(config, dict) else config.balance
    return "vote" if balance_method == "ensemble" else "mean"


def combined_probability(member_p: np.ndarray) -> np.ndarray:
    """P(pneumonia) of the members together: their mean (one model: its own)."""
    member_p = np.asarray(member_p)
    return member_p[:, 0] if member_p.shape[1] == 1 else balance.mean_probability(member_p.T)


def score_split(
    y,
    member_p: np.ndarray,
    thresholds: list[float],
    target_recall: float,
    plots_dir: Path,
    split_name: str,
) -> dict:
    """Figures and plots of one split at the given (validation-chosen) thresholds.

    ``member_p`` holds P(pneumonia) per image and member, (n, members).
    """
    metrics = combined_metrics(y, member_p, thresholds)
    metrics.update(split=split_name, threshold_source="validation", target_recall=target_recall)
    plot_confusion_matrix(
        metrics["confusion_matrix"],
        plots_dir / "confusion_matrix.png",
        title=f"{split_name}, threshold {metrics['threshold']:.3f}"
        + (f" ({len(thresholds)}-member vote)" if len(thresholds) > 1 else "")
        + (
            f" (mean of {member_p.shape[1]} members)" if len(thresholds) < member_p.shape[1] else ""
        ),
    )
    if metrics["auc"] is not None:  # one class only (an external set): no ROC curve
        plot_roc(
            y,
            balance.mean_probability(member_p.T),
            plots_dir / "roc.png",
            auc=metrics["auc"],
            threshold=thresholds[0] if len(thresholds) == 1 else None,
        )
    return metrics


@dataclasses.dataclass
class LoadedRun:
    run_dir: Path
    config: dict
    model: RunModel  # members stacked on a leading axis, as trained
    thresholds: list[float]  # one per member, chosen on validation
    precision: str  # what it scores in (the run's own unless overridden)
    full_variables: dict  # every member's whole classifier, stacked (for explain)
    tta: TTA | None = None  # what the run was thresholded with (config.json's tta)


def run_precision(config: dict) -> str:
    """The precision a run was trained in. Runs made before it was stored resolved say
    ``auto``: that meant float32 on the CPU backend they record, bfloat16 elsewhere."""
    stored = config.get("precision")
    if stored in (None, "auto"):
        backend = config.get("environment", {}).get("backend")
        return (
            resolve_precision("auto")
            if backend is None
            else "float32"
            if backend == "cpu"
            else "bfloat16"
        )
    return stored


def run_resize(config: dict) -> str:
    """How a run's images were resized; runs made before ``--resize`` existed used
    ``antialias``, the only method then."""
    return config.get("resize", "antialias")


def run_intensity(config: dict) -> str:
    """A run's ``--intensity``; runs made before the option normalised nothing."""
    return config.get("intensity", "none")


def load_run(run_dir: str | Path, precision: str | None = None, log=print) -> LoadedRun:
    """The model, best weights and validation-chosen thresholds of a finished run, scoring in
    the run's own precision unless ``precision`` overrides it (then it says so)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a pneumojax run folder (no config.json)")
    config = json.loads((run_dir / "config.json").read_text())
    if not (existing_folder(run_dir / "model") / "manifest.json").exists():
        raise FileNotFoundError(
            f"{run_dir} has no finished model (model/manifest.json): the run "
            "did not finish; continue it with pneumojax train --resume"
        )
    variables, manifest = load_variables(run_dir / "model")
    info = get_backbone(config["backbone"])
    own = run_precision(config)
    used = own if precision is None else resolve_precision(precision)
    if used != own:
        log(
            f"note: scoring in {used} as asked (--precision), not in the run's own {own}: "
            "figures can differ slightly from its metrics.json"
        )
    trainable = frozenset(config["plan"]["trainable_layers"])
    frontier = (
        cacheable_frontier(info, config["cut"], trainable) if config.get("feature_cache") else ()
    )
    members = [
        jax.tree.map(lambda a, i=i: np.asarray(a[i]), variables) for i in range(manifest["members"])
    ]
    cache_dtype = config.get("feature_cache_dtype", "auto") if used == own else "auto"
    model = RunModel.build(
        info,
        config["cut"],
        trainable,
        used,
        frontier,
        cache_dtype,
        config["image_size"],
        members[0],
        config["batch_size"],
        make_mesh(),
        intensity=run_intensity(config),
    )
    if frontier and any(
        variables_digest(suffix_variables(m, model.prefix_variables))
        != variables_digest(model.prefix_variables)
        for m in members[1:]
    ):
        raise CheckpointError(
            f"{run_dir}: the ensemble's members do not share their frozen layers, so they cannot "
            "all have trained on one set of cached activations (a run made before pneumojax "
            "0.1.1); train it again"
        )
    model.variables = stack_members([model.own_variables(v) for v in members])
    return LoadedRun(
        run_dir, config, model, list(manifest["thresholds"]), used, variables, run_tta(config)
    )


def scoring_tta(
    run: LoadedRun, views: int | None = None, augment: str | None = None, log=print
) -> tuple[TTA | None, list[float], dict]:
    """The TTA and thresholds to score ``run`` with: by default the run's own (those it chose
    its thresholds with). ``views`` (``--tta N``, 0 = none) and ``augment`` (``--tta-augment``)
    override it; a setting other than the run's own re-derives the thresholds on the run's
    validation split with that same TTA (a threshold chosen on other probabilities would not
    be the one the run's rule gives), and says so. Returns (TTA, thresholds, the record for
    metrics.json)."""
    own = run.tta
    if views is None:
        views = own.views if own else 0
    if augment is None and own and views:
        augment = own.augment
    tta = resolve_tta(views, augment, run.config.get("device_augment", "none"))
    record = {"tta": tta.record() if tta else None, "thresholds_rederived": tta != own}
    if tta == own:
        return tta, run.thresholds, record
    what = tta.describe() if tta else "no TTA"
    splits = Splits.from_json((run.run_dir / "splits.json").read_text())
    log(
        f"note: scoring with {what}, not as the run was thresholded "
        f"({own.describe() if own else 'no TTA'}): thresholds re-derived on the run's "
        f"validation split ({len(splits.val)} images) with the same TTA; figures differ from "
        "its metrics.json"
    )
    size, resize = run.config["image_size"], run_resize(run.config)
    x, y = load_split_arrays(splits.val, size, log, resize)
    key = image_set_key([p for p, _ in splits.val], size, resize)
    p_val = split_probabilities(run.model, x, key, tta, "val")
    thresholds = validation_thresholds(
        y, p_val, run.config["target_recall"], combine_rule(run.config)
    )
    record["run_thresholds"] = list(run.thresholds)
    return tta, thresholds, record


def prediction_rows(
    run: LoadedRun, files: list[str], member_p: np.ndarray, thresholds: list[float] | None = None
) -> list[dict]:
    """``predict``'s rows: path, P(pneumonia) (the members' mean), label at the run's
    threshold (``thresholds``: others, e.g. re-derived for another TTA) by the run's rule
    (:func:`predicted_labels`)."""
    thresholds = run.thresholds if thresholds is None else thresholds
    labels = predicted_labels(member_p, thresholds)
    return [
        {
            "path": f,
            "p_pneumonia": float(q),
            "label": "PNEUMONIA" if lab else "NORMAL",
            "threshold": thresholds[0] if len(thresholds) == 1 else "vote",
        }
        for f, q, lab in zip(files, balance.mean_probability(member_p.T), labels)
    ]


def predicted_labels(member_p: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """A run's labels: one threshold applies to the members' mean probability (one model, a
    seed ensemble); one threshold per member means their majority vote (a balance ensemble)."""
    member_p = np.asarray(member_p)
    if len(thresholds) == 1:
        return (combined_probability(member_p) >= thresholds[0]).astype(np.int32)
    return balance.vote(member_p.T, thresholds)


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
