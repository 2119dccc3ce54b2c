"""``pneumojax explain`` and ``pneumojax evaluate --explain``: a run's heat maps for image files,
written as one overlay PNG per image and ``explain.csv`` (probabilities and labels exactly as
``predict`` gives them), and the error sheet of an evaluation's most confident mistakes.

Here too the checks of the layer and method asked for (a usage error before anything loads);
the maps themselves are :mod:`pneumojax.heatmaps`'s, the pictures :mod:`pneumojax.overlays`'s.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from pneumojax import balance
from pneumojax.backbones import ancestors, get_backbone
from pneumojax.backbones.registry import BackboneInfo
from pneumojax.data import load_images
from pneumojax.heatmaps import Explainer, default_layer, input_layer
from pneumojax.overlays import overlay_names, plot_error_sheet, write_overlay
from pneumojax.scoring import (
    LoadedRun,
    gather_image_files,
    load_run,
    predicted_labels,
    prediction_rows,
    run_resize,
    score_run,
    scoring_tta,
)
from pneumojax.predictions import read_predictions
from pneumojax.io import write_text_atomic
from pneumojax.progress import progress_bar

_SUFFIX = {"gradcam": "gradcam", "gradcam++": "gradcampp", "saliency": "saliency"}
_TITLE = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "saliency": "saliency"}


class LayerChoiceError(ValueError):
    """A ``--layer`` that is not a spatial layer at or before the run's cut."""


def check_layer(info: BackboneInfo, cut: str, layer: str) -> str:
    """``layer`` if the gradient of the run's output reaches it (it lies at or before the cut,
    on a path to it) and its output is a spatial map; otherwise a clear error."""
    try:
        info.check_layer(layer)
    except KeyError as e:
        raise LayerChoiceError(e.args[0]) from None
    if layer not in ancestors(info.layers, [cut]) or layer == input_layer(info):
        where = "after" if info.layer_index[layer] > info.layer_index[cut] else "not on a path to"
        raise LayerChoiceError(
            f"{layer} is {where} the run's cut {cut}: the model's output does not "
            f"depend on it. Choose a layer up to {cut} "
            f"(pneumojax layers --backbone {info.name})"
        )
    return layer


def resolve_layer(info: BackboneInfo, cut: str, layer: str | None, method: str) -> str:
    if method == "saliency":
        if layer:
            raise LayerChoiceError("--layer does not apply to --method saliency (the raw image)")
        return ""
    return check_layer(info, cut, layer) if layer else default_layer(info, cut)


def check_run_layer(run_dir, layer: str | None, method: str) -> str:
    """:func:`resolve_layer` for a run folder, reading only its config.json."""
    config_file = Path(run_dir) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{run_dir} is not a pneumojax run folder (no config.json)")
    config = json.loads(config_file.read_text())
    return resolve_layer(get_backbone(config["backbone"]), config["cut"], layer, method)


def describe(run: LoadedRun, method: str, layer: str, chosen: bool) -> str:
    """One line saying what the maps are: method, layer (and why that one), members."""
    where = (
        "of the raw image's pixels"
        if method == "saliency"
        else f"at {layer}"
        + ("" if chosen else f" (default: the last block output up to the cut {run.config['cut']})")
    )
    members = member_count(run)
    mean = f"; the mean of the {members} ensemble members' maps" if members > 1 else ""
    tta = (
        f"; maps of each image as given, probabilities with the run's {run.tta.describe()}"
        if getattr(run, "tta", None)
        else ""
    )
    return f"{_TITLE[method]} {where}, of the PNEUMONIA logit in inference mode{mean}{tta}"


def member_count(run: LoadedRun) -> int:
    """How many models a run holds (balance and seed ensembles alike)."""
    return int(jax.tree.leaves(run.full_variables)[0].shape[0])


def explain_paths(
    run_dir,
    paths: list[str],
    out,
    layer: str | None = None,
    method: str = "gradcam",
    precision: str | None = None,
    log=print,
) -> list[dict]:
    """``pneumojax explain``: an overlay PNG per image and ``explain.csv`` in ``out``."""
    chosen = check_run_layer(run_dir, layer, method)  # usage errors before any loading
    run = load_run(run_dir, precision, log)
    files = gather_image_files(paths, log)
    images = load_images(
        files, run.config["image_size"], progress=len(files) > 50, resize=run_resize(run.config)
    )
    # probabilities and labels exactly as ``predict`` gives them (the run's own TTA included)
    tta, thresholds, _ = scoring_tta(run, log=log)
    member_p = run.model.probabilities_of_images(images, tta=tta)
    run = dataclasses.replace(run, thresholds=thresholds)
    return explain_images(run, files, images, member_p, Path(out), chosen, method, layer, log)


def explain_images(run, files, images, member_p, out: Path, layer, method, asked, log):
    """Maps for ``images`` (decoded ``files``), overlays named after the files, explain.csv."""
    log(describe(run, method, layer, chosen=bool(asked)))
    maps = Explainer.of_run(run, method, layer).maps(images, desc="heat maps")
    rows = prediction_rows(run, files, member_p)
    names = overlay_names(files, _SUFFIX[method])
    out.mkdir(parents=True, exist_ok=True)
    what = _TITLE[method] + ("" if method == "saliency" else f" at {layer}")
    for row, heat, name in progress_bar(
        list(zip(rows, maps, names)), desc="overlays", unit="img", disable=len(rows) < 20
    ):
        threshold = row["threshold"]
        caption = (
            f"{Path(row['path']).name}\nP(pneumonia) {row['p_pneumonia']:.3f}: {row['label']}"
            + (f" (threshold {threshold:.3f})" if threshold != "vote" else " (members' vote)")
            + f"\n{what}"
        )
        peak = write_overlay(row["path"], heat, caption, out / name)
        row.update(peak_x=peak[0], peak_y=peak[1], overlay=name)
    header = ["path", "p_pneumonia", "label", "peak_x", "peak_y", "overlay"]
    lines = [",".join(header)] + [
        ",".join(_csv(str(row[k])) if k in ("path", "overlay") else str(row[k]) for k in header)
        for row in rows
    ]
    write_text_atomic(out / "explain.csv", "\n".join(lines) + "\n")
    log(f"wrote {len(rows)} overlays and {out / 'explain.csv'}")
    return rows


def _csv(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def explain_errors(
    run: LoadedRun, eval_dir: Path, count: int, method="gradcam", layer=None, log=print
):
    """``evaluate --explain N``: overlays of the N most confident false positives and false
    negatives of an evaluation (read back from its predictions.csv) in ``eval_dir/explain``
    and their contact sheet in ``eval_dir/plots/errors.png``."""
    info = get_backbone(run.config["backbone"])
    chosen = resolve_layer(info, run.config["cut"], layer, method)
    paths, labels, member_p = read_predictions(eval_dir / "predictions.csv")
    predicted = predicted_labels(member_p, run.thresholds)
    mean = balance.mean_probability(member_p.T)
    fp = [i for i in np.argsort(-mean, kind="stable") if labels[i] == 0 and predicted[i] == 1]
    fn = [i for i in np.argsort(mean, kind="stable") if labels[i] == 1 and predicted[i] == 0]
    picked = fp[:count] + fn[:count]
    rows: list[dict] = []
    if picked:
        files = [paths[i] for i in picked]
        images = load_images(
            files, run.config["image_size"], progress=False, resize=run_resize(run.config)
        )
        rows = explain_images(
            run, files, images, member_p[picked], eval_dir / "explain", chosen, method, layer, log
        )
    sheet = plot_error_sheet(
        rows[: len(fp[:count])],
        rows[len(fp[:count]) :],
        eval_dir / "explain",
        eval_dir / "plots" / "errors.png",
        count,
    )
    log(f"wrote {sheet} ({len(fp[:count])} false positives, {len(fn[:count])} false negatives)")
    return sheet


def evaluate_and_explain(run_dir, explain: tuple[int, str, str | None], log=print, **evaluate):
    """``pneumojax evaluate --explain N``: :func:`pneumojax.inference.evaluate_run`, then heat
    maps of the N most confident false positives and false negatives, labelled at the
    thresholds the evaluation used (re-derived for another TTA)."""
    metrics, run, folder = score_run(run_dir, log=log, **evaluate)
    if explain[0]:
        explain_errors(run, folder, *explain, log=log)
    return metrics
