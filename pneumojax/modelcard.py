"""A run's model card: what the model is, what it was trained and checked on, what it is for
and what it is not, as ``MODEL_CARD.md`` and its JSON twin ``MODEL_CARD.json``.

Everything on the card is read from the run folder (config.json, splits.json, metrics.json,
every ``eval-*/metrics.json`` and the predictions beside them), so a card can be written again
at any time and says exactly what the folder holds. ``train`` writes it when a run finishes,
``evaluate`` and ``study`` rewrite it when they add a data set, and ``export`` puts a copy
beside the exported model. The limits are worded from the figures: a card whose run was never
scored on another site's images says so, and one whose external figures fell says by how much.
"""

from __future__ import annotations

import datetime
import json
from importlib import metadata
from pathlib import Path

import numpy as np

from pneumojax import stats
from pneumojax.config import TrainConfig
from pneumojax.io import write_text_atomic
from pneumojax.options import command_line
from pneumojax.predictions import read_predictions
from pneumojax.runfolder import MODEL_CARD_JSON, MODEL_CARD_MD

SCHEMA = "pneumojax-model-card/1"
INTENDED_USE = (
    "Research: comparing transfer-learning and class-imbalance methods for telling NORMAL from "
    "PNEUMONIA chest X-rays, and studying how such models fare on images from other sites. "
    "Not a medical device: not for diagnosis, triage or any decision about a patient."
)
# An external AUC this far below the run's own test AUC is reported as "does not transfer".
TRANSFER_DROP = 0.05
POORLY_CALIBRATED_ECE = 0.1


def model_card(run_dir: str | Path) -> dict:
    """The card of a finished run, as a dict (the JSON twin's content)."""
    run_dir = Path(run_dir)
    config = _read(run_dir / "config.json", run_dir, "is not a pneumojax run folder")
    metrics = _read(
        run_dir / "metrics.json",
        run_dir,
        "has not finished (no metrics.json): finish it with pneumojax train --resume",
    )
    splits = _read(run_dir / "splits.json", run_dir, "has no splits.json")
    card = {
        "schema": SCHEMA,
        "pneumojax_version": metadata.version("pneumojax"),
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "run": str(run_dir.resolve()),
        "model": _model(config),
        "training": _training(config, metrics),
        "training_data": (data := _training_data(config, splits)),
        "threshold": _threshold(config, metrics, splits),
        "evaluations": _evaluations(run_dir, config, metrics, data["test_origin"]),
        "intended_use": INTENDED_USE,
        "command": _command(config),
    }
    card["limits"] = _limits(card)
    return card


def write_model_card(
    run_dir: str | Path, out_dir: str | Path | None = None, export: dict | None = None
) -> Path:
    """Writes MODEL_CARD.md and MODEL_CARD.json of ``run_dir`` into ``out_dir`` (default: the
    run folder itself), each atomically; returns the Markdown file's path. ``export``: the
    metadata of an exported copy of the model (``pneumojax export``), which the card then
    describes too."""
    card = model_card(run_dir)
    if export is not None:
        card["export"] = export
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    write_text_atomic(out / MODEL_CARD_JSON, json.dumps(card, indent=1) + "\n")
    write_text_atomic(out / MODEL_CARD_MD, render_markdown(card))
    return out / MODEL_CARD_MD


def _read(path: Path, run_dir: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir} {what}") from None


# --- the card's sections ---------------------------------------------------------------------


def _model(config: dict) -> dict:
    plan = config["plan"]
    return {
        "backbone": config["backbone"],
        "cut": config["cut"],
        "weights": config["weights"],
        "weights_source": config.get("weights_source", {}),
        "image_size": config["image_size"],
        "resize": config.get("resize", "antialias"),
        "intensity": config.get("intensity", "none"),
        "trainable": plan.get("trainable_spec", config.get("trainable")),
        "trainable_params": plan["trainable_params"],
        "frozen_params": plan["frozen_params"],
        "seed_ensemble": config.get("seed_ensemble", 1),
        "balance": config.get("balance", "none"),
        "precision": config.get("precision"),
        "tta": config.get("tta", 0),
        "adaptation": config.get("adaptation"),  # pneumojax adapt's record (no labels used)
    }


def _training(config: dict, metrics: dict) -> dict:
    training = metrics.get("training", {})
    return {
        "epochs": config["epochs"],
        "epochs_run": training.get("epochs_run"),
        "best_epoch": training.get("best_epoch"),
        "optimizer": config.get("optimizer"),
        "learning_rate": config["learning_rate"],
        "lr_schedule": config.get("lr_schedule"),
        "batch_size": config["batch_size"],
        "seconds": training.get("seconds", {}).get("total"),
        "environment": config.get("environment", {}),
        "calibration": metrics.get("calibration", {"method": config.get("calibrate", "none")}),
    }


def _training_data(config: dict, splits: dict) -> dict:
    summary, info = splits.get("summary", {}), splits.get("info", {})
    train, val = summary.get("train", {}), summary.get("val", {})
    given = info.get("given_splits", [])
    test_origin = (
        "the folder's own test/ split" if "test" in given else "carved from the same folder"
    )
    return {
        "folder": config["data"],
        "layout": config.get("data_layout", info.get("layout")),
        "grouping": info.get("grouping"),
        "splits": summary,
        "test_origin": test_origin,
        "summary": (
            f"{train.get('n', '?')} training images ({train.get('normal', '?')} NORMAL, "
            f"{train.get('pneumonia', '?')} PNEUMONIA, {train.get('patients', '?')} patients) "
            f"and {val.get('n', '?')} validation images from {config['data']}; test: "
            f"{test_origin}"
        ),
        "site": (
            "one folder: training, validation and test images share its source (site, "
            "population, preparation); pneumojax does not know which site that is"
        ),
    }


def _threshold(config: dict, metrics: dict, splits: dict) -> dict:
    target = metrics.get("target_recall", config.get("target_recall"))
    n_val = splits.get("summary", {}).get("val", {}).get("n")
    members = metrics.get("member_thresholds", [metrics["threshold"]])
    vote = len(members) > 1
    rule = (
        f"chosen on the {n_val} validation images: the highest specificity among thresholds "
        f"whose validation recall is at least {target}"
        + (" (one per member; the label is their majority vote)" if vote else "")
    )
    return {
        "value": metrics["threshold"] if not vote else None,
        "member_values": members,
        "target_recall": target,
        "source": metrics.get("threshold_source", "validation"),
        "rule": rule,
    }


def _evaluations(run_dir: Path, config: dict, metrics: dict, origin: str) -> list[dict]:
    """The run's own test split first, then every other data set it was scored on."""
    found = [_entry(f"test ({origin})", metrics, run_dir / "predictions" / "test.csv", True)]
    for folder in sorted(run_dir.glob("eval-*")):
        path = folder / "metrics.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        own = _same_folder(record.get("data"), config["data"])
        if own and record.get("split") in ("test", "val"):
            continue  # the run's own split scored again: the figures above, or validation
        data = record.get("data")
        name = Path(data).name if data and not own else folder.name.removeprefix("eval-")
        if record.get("split") not in (None, "all"):
            name += f" ({record['split']} split)"
        found.append(_entry(name, record, folder / "predictions.csv", own))
    return found


def _same_folder(a: str | None, b: str) -> bool:
    return a is not None and Path(a).resolve() == Path(b).resolve()


def _entry(name: str, metrics: dict, predictions: Path, same_source: bool) -> dict:
    ci = metrics.get("ci95", {})
    calibration, counts = _calibration(predictions)
    entry = {
        "name": name,
        "data": metrics.get("data"),
        "split": metrics.get("split"),
        "same_source_as_training": same_source,
        "n": metrics["n"],
        **counts,
        "threshold": metrics["threshold"],
    }
    for key in ("auc", "recall", "specificity", "accuracy", "precision"):
        entry[key] = metrics.get(key)
        entry[f"{key}_ci"] = ci.get(key)
    return {**entry, **calibration}


def _calibration(predictions: Path) -> tuple[dict, dict]:
    """ECE and Brier score of the members' mean probability, and the class counts, from a
    predictions file (None where it is missing or one class only)."""
    none = {"ece": None, "brier": None}
    if not predictions.is_file():
        return none, {"normal": None, "pneumonia": None}
    _, y, member_p = read_predictions(predictions)
    counts = {"normal": int((y == 0).sum()), "pneumonia": int((y == 1).sum())}
    if not (y.any() and not y.all()):
        return none, counts
    p = member_p.mean(1).astype(np.float64)
    return {
        "ece": stats.expected_calibration_error(y, p),
        "brier": stats.brier_score(y, p),
    }, counts


def _command(config: dict) -> str:
    names = TrainConfig.__dataclass_fields__
    return command_line(TrainConfig(**{k: v for k, v in config.items() if k in names}))


def _limits(card: dict) -> list[str]:
    data, evaluations = card["training_data"], card["evaluations"]
    own, others = evaluations[0], [e for e in evaluations[1:] if not e["same_source_as_training"]]
    limits = [
        f"Trained and tested on one source ({data['folder']}): the test figures describe images "
        "like the training images, not other hospitals, scanners, ages or preparations."
    ]
    for e in others:
        limits.append(_external_limit(e, own))
    if not others:
        limits.append(
            "Never scored on images from another site: nothing on this card says how the model "
            "does elsewhere. Score it with: pneumojax evaluate --run RUN --data OTHER --split all"
        )
    limits.append(
        f"The threshold ({card['threshold']['rule']}) was set on this source; at another site "
        "the balance of recall and specificity moves: choose it again on that site's labelled "
        "images before relying on the labels."
    )
    if own.get("ece") is not None and own["ece"] > POORLY_CALIBRATED_ECE:
        limits.append(
            f"The probabilities are not calibrated (ECE {own['ece']:.3f} on test): read them as "
            "scores for ranking, not as the chance of pneumonia."
        )
    limits.append("Not a medical device; not validated for clinical use.")
    return limits


def _external_limit(e: dict, own: dict) -> str:
    if e["auc"] is None or own["auc"] is None:
        return (
            f"On {e['name']} ({e['n']} images, one class only) recall/specificity "
            f"{_fmt(e['recall'])}/{_fmt(e['specificity'])} at the validation threshold; "
            "no AUC can be computed there."
        )
    drop = own["auc"] - e["auc"]
    verdict = (
        "the figures do not transfer there: validate on the target site's own "
        "labelled images before any use there"
        if drop > TRANSFER_DROP
        else "within the chosen margin of the run's own test AUC"
    )
    return (
        f"On {e['name']} ({e['n']} images from another folder) AUC {_fmt(e['auc'])} "
        f"{_ci(e['auc_ci'])} against {_fmt(own['auc'])} on its own test, with recall "
        f"{_fmt(e['recall'])} and specificity {_fmt(e['specificity'])} at the validation "
        f"threshold; {verdict}."
    )


# --- Markdown --------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ci(pair) -> str:
    return "" if not pair else f"[{_fmt(pair[0])}, {_fmt(pair[1])}]"


def _figure(e: dict, key: str) -> str:
    return f"{_fmt(e[key])} {_ci(e[f'{key}_ci'])}".strip()


def _count(e: dict) -> str:
    if e["normal"] is None:
        return str(e["n"])
    return f"{e['n']} ({e['normal']} / {e['pneumonia']})"


def _export_section(e: dict) -> list[str]:
    check = e.get("check", {})
    shape = " x ".join(str(d) for d in e["input"]["shape"])
    return [
        "",
        "## This export",
        "",
        f"`{e['file']}` ({e['format']}): input `{e['input']['name']}` uint8 [{shape}] "
        f"({e['input']['meaning']}); output `{e['output']['name']}` float32 [N], P(pneumonia)"
        f" of the {e['members']} member(s) combined by their {e['combine_rule']}. Label: "
        f"{e['label_rule']}, threshold {_fmt(e['threshold'], 4)}. Computed in float32 (trained "
        f"in {e['precision']['trained']}); {e['tta']['note']}. Checked at export against "
        f"`pneumojax predict` on {check.get('images', '?')} validation images: max difference "
        f"{check.get('max_abs_diff', float('nan')):.1e}. Metadata: `pneumojax-export.json`.",
    ]


def render_markdown(card: dict) -> str:
    m, d, t = card["model"], card["training_data"], card["threshold"]
    weights = m["weights"] + (
        f" ({', '.join(f'{k}: {v}' for k, v in m['weights_source'].items() if k != 'weights')})"
        if len(m["weights_source"]) > 1
        else ""
    )
    lines = [
        f"# Model card: {m['backbone']} pneumonia classifier",
        "",
        f"Run folder `{card['run']}`, written by pneumojax {card['pneumojax_version']} on "
        f"{card['written']}. Twin: `MODEL_CARD.json`.",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {m['backbone']} cut at `{m['cut']}` + head |",
        f"| weights origin | {weights} |",
        f"| trainable | `{m['trainable']}`: {m['trainable_params']:,} parameters trained, "
        f"{m['frozen_params']:,} frozen |",
        f"| input | {m['image_size']} x {m['image_size']} px ({m['resize']} resize, intensity "
        f"{m['intensity']}) |",
        f"| members | {m['seed_ensemble']} (balance: {m['balance']}) |",
        f"| precision | {m['precision']} |",
    ]
    if m["adaptation"]:
        lines.append(f"| adapted | without labels, to {m['adaptation'].get('target')} |")
    lines += [
        "",
        "## Training data",
        "",
        d["summary"] + ".",
        "",
        f"Site: {d['site']}.",
        "",
        f"Threshold: {_fmt(t['value'], 4) if t['value'] is not None else t['member_values']}, "
        f"{t['rule']}.",
        "",
        "## Figures at the validation threshold (95% bootstrap CIs)",
        "",
        "| data set | n (NORMAL / PNEUMONIA) | AUC | recall | specificity | accuracy | ECE | Brier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in card["evaluations"]:
        lines.append(
            f"| {e['name']} | {_count(e)} | {_figure(e, 'auc')} | {_figure(e, 'recall')} | "
            f"{_figure(e, 'specificity')} | {_figure(e, 'accuracy')} | {_fmt(e['ece'])} | "
            f"{_fmt(e['brier'])} |"
        )
    lines += ["", "## Known limits", ""] + [f"- {x}" for x in card["limits"]]
    if "export" in card:
        lines += _export_section(card["export"])
    lines += ["", "## Reproduce", "", "```", card["command"], "```", ""]
    return "\n".join(lines)
