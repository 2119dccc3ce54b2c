"""``pneumojax study``: every experiment of a study file into one folder, then one report.

Each experiment is an ordinary run folder ``OUT/<name>/``. A finished one (its ``metrics.json``
and ``model/`` exist) is skipped on a rerun, an interrupted one resumes, a failing one is
reported and the study goes on; on the next rerun a failed one starts again with the config it
has then (not its stale config.json). Work is shared through the caches every run uses: images are
decoded once per (files, size, resize), frozen activations once per (backbone weights, cut,
frontier, images), so the InceptionV3 experiments that share a frozen prefix compute it once.

The report (``study.json``, ``study.md``, ``study.html``) is made from the run folders alone:
``metrics.json``, ``predictions/{val,test}.csv``, ``config.json``, ``history.jsonl`` and the
plots, so it can be remade at any time (``pneumojax study --report-only``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable


from pneumojax import stats
from pneumojax.config import TrainConfig
from pneumojax.experiments import Study, command_line, record_experiment, resolve_options
from pneumojax.external import external_section, score_on_externals
from pneumojax.external import public as public_external
from pneumojax.scoring import predicted_labels
from pneumojax.predictions import read_predictions
from pneumojax.runfolder import run_state
from pneumojax.train import Interrupted

FIGURES = ("accuracy", "recall", "precision", "specificity", "f1", "auc")
REPORTED = ("accuracy", "recall", "precision")


@dataclasses.dataclass
class Outcome:
    """What happened to one experiment in this invocation."""

    name: str
    # "done" (trained now), "skipped" (finished earlier), "resumed", "restarted" (failed
    # earlier, trained again with the config it has now), "failed"
    status: str
    seconds: float
    error: str | None = None
    external_errors: list[str] = dataclasses.field(default_factory=list)


def run_folder_state(run_dir: Path) -> str:
    """``finished``, ``failed``, ``interrupted`` or ``new``: what the run folder's status.json
    says, or for a folder made before it, finished when metrics.json and model/ exist, else
    interrupted (:func:`pneumojax.runfolder.run_state`)."""
    return run_state(run_dir)


def run_study(
    study: Study,
    out: Path,
    overrides: dict,
    externals: tuple = (),
    only: list[str] | None = None,
    log: Callable[[str], None] = print,
    train: Callable | None = None,
    evaluate: Callable | None = None,
) -> list[Outcome]:
    """Runs the study's experiments (``only`` some of them) into ``out``, then scores each on
    every external set (:func:`pneumojax.external.score_on_externals`); returns what happened
    to each. ``overrides`` are command-line options applied to every experiment."""
    from pneumojax.adapt import adapt_run  # noqa: PLC0415

    if train is None or evaluate is None:
        from pneumojax.inference import evaluate_run  # noqa: PLC0415
        from pneumojax.run import train_run  # noqa: PLC0415

        train, evaluate = train or train_run, evaluate or evaluate_run
    names = [e.name for e in study.experiments]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ValueError(
            f"--only: no experiment {', '.join(unknown)}; the study has {', '.join(names)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    chosen = [e for e in study.experiments if not only or e.name in only]
    for i, experiment in enumerate(chosen, 1):
        run_dir = out / experiment.name
        cfg = resolve_options(experiment, study.shared, {**overrides, "out": str(run_dir)})
        o = _run_experiment(experiment, cfg, run_dir, out, externals, train, evaluate, adapt_run)
        outcomes.append(o)
        detail = f" ({o.error})" if o.error else ""
        detail += "".join(f" (not scored on {e})" for e in o.external_errors)
        log(f"[{i}/{len(chosen)}] {o.name}: {o.status} in {o.seconds:.1f} s{detail}")
    return outcomes


def _run_experiment(experiment, cfg, run_dir: Path, out, externals, train, evaluate, adapt):
    """One experiment: trained, resumed, retrained or skipped as its folder's state says, then
    scored on every external set; what happened is its :class:`Outcome`, a failure too."""
    state = run_folder_state(run_dir)
    t0 = time.perf_counter()
    quiet = lambda message: None  # noqa: E731  (one line per experiment, not the run's log)
    try:
        changed = changed_options(run_dir, cfg) if state in ("finished", "interrupted") else []
        if changed:
            # the study file (or the command line) asks for another run than the folder
            # holds: train it anew, replacing the old one once the new one has started
            check_plan(cfg)
            train(cfg, resume=False, overwrite=True, log=quiet)
            record_experiment(run_dir, experiment)
        elif state != "finished":
            check_plan(cfg)
            # a failed run starts again with today's config (its folder is replaced)
            train(cfg, resume=state == "interrupted", log=quiet)
            record_experiment(run_dir, experiment)
        failures = score_on_externals(
            run_dir, experiment.name, externals, out, evaluate, adapt, quiet
        )
        status = _STATUS[state]
        if changed:
            more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
            status = f"rerun, its options changed: {'; '.join(changed[:3])}{more}"
        return Outcome(experiment.name, status, time.perf_counter() - t0, None, failures)
    except (KeyboardInterrupt, Interrupted):
        raise  # Ctrl-C / SIGTERM stop the study; the same command resumes it
    except Exception as error:  # noqa: BLE001  (reported; the study goes on)
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        return Outcome(experiment.name, "failed", time.perf_counter() - t0, message)


# What an experiment's outcome is called, by the state its folder was in.
_STATUS = {"finished": "skipped", "interrupted": "resumed", "new": "done", "failed": "restarted"}


# Options that do not change what a run computes.
_NOT_COMPARED = frozenset({"out", "log_every", "strict"})


def changed_options(run_dir: Path, cfg: TrainConfig) -> list[str]:
    """What the experiment asks for now that the run in ``run_dir`` was not made with
    (``name stored -> now``), after resolving both the way ``train`` does; empty when they
    match or the folder has no readable config.json. The data folder is compared by where it
    is (its resolved path)."""
    from pneumojax.runconfig import resolved_config  # noqa: PLC0415

    from pneumojax.backbones import get_backbone  # noqa: PLC0415
    from pneumojax.model import make_plan  # noqa: PLC0415

    try:
        stored = json.loads((Path(run_dir) / "config.json").read_text())
        now, _ = resolved_config(cfg, Path(run_dir), resume=False)
        # a run stores the cut it used: the backbone's default where none was asked for
        plan = make_plan(get_backbone(now.backbone), now.cut, now.trainable, now.image_size)
        now = dataclasses.replace(now, cut=plan.cut)
    except (OSError, ValueError, KeyError):
        return []
    changed = []
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        if name in _NOT_COMPARED or name not in stored:
            continue
        then, value = stored[name], json.loads(json.dumps(getattr(now, name)))
        if name == "data" and "demo" not in (then, value):
            then, value = str(Path(then).resolve()), str(Path(value).resolve())
        if then != value:
            changed.append(f"{name} {then!r} -> {value!r}")
    return changed


def check_plan(cfg) -> None:
    """The checks ``pneumojax train`` makes before it reads data (layers, input size)."""
    from pneumojax.backbones import get_backbone  # noqa: PLC0415
    from pneumojax.model import make_plan  # noqa: PLC0415

    make_plan(get_backbone(cfg.backbone), cfg.cut, cfg.trainable, cfg.image_size)


# --- the report ---------------------------------------------------------------------------------


def study_report(
    study: Study, out: Path, outcomes: list[Outcome] | None = None, externals: tuple = ()
) -> dict:
    """The study's figures from its run folders: one row per finished experiment, with the
    study's reported figures, operating points, calibration and paired tests against the
    reference experiment on the same test images; and per external set (``externals``) the
    section "Images from elsewhere" (:func:`pneumojax.external.external_section`)."""
    rows, missing = [], []
    for experiment in study.experiments:
        run_dir = out / experiment.name
        if run_folder_state(run_dir) != "finished":
            missing.append(experiment.name)
            continue
        rows.append(_row(experiment, run_dir, externals))
    reference = next((r for r in rows if r["name"] == study.reference), None)
    for row in rows:
        row["vs_reference"] = (
            None if reference is None or row is reference else _paired(row, reference)
        )
    return {
        "reference": study.reference,
        "rows": rows,
        "missing": missing,
        "wall_s": total_wall_s(rows),
        "target": target_verdict(study.target, reference, rows, missing),
        "external": external_section(
            externals,
            rows,
            study.reference,
            out,
            rows[0]["test"].get("target_recall") if rows else None,
        ),
        "out": str(out),
        "this_invocation": [dataclasses.asdict(o) for o in outcomes or ()],
    }


def total_wall_s(rows: list[dict]) -> float:
    """The experiments' training wall times, as their run folders record them, summed."""
    return sum(r["wall_s"] or 0.0 for r in rows)


def target_verdict(
    target: dict, reference: dict | None, rows: list[dict], missing: list[str]
) -> dict | None:
    """Each ``[target]`` line against the run folders: the reference experiment's test figure
    (at its validation-chosen threshold, with its interval) for a figure, the sum of every
    experiment's wall time for ``minutes``. A line is ``met`` when the value reaches it, and
    ``None`` when it cannot be told (the reference, or an experiment, has not finished)."""
    if not target:
        return None
    lines = []
    for key, wanted in target.items():
        if key == "minutes":
            minutes = total_wall_s(rows) / 60
            value, ci = (None, None) if missing else (minutes, None)
            met = None if value is None else value <= wanted
        else:
            value = None if reference is None else reference["test"][key]
            ci = None if reference is None else reference["test"]["ci95"].get(key)
            met = None if value is None else value >= wanted
        lines.append({"key": key, "target": wanted, "value": value, "ci95": ci, "met": met})
    known = [line["met"] for line in lines]
    return {"lines": lines, "met": None if None in known else all(known)}


def _row(experiment, run_dir: Path, externals: tuple = ()) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in config.items() if k in names})  # as it ran
    _, y_val, p_val = read_predictions(run_dir / "predictions" / "val.csv")
    paths, y_test, p_test = read_predictions(run_dir / "predictions" / "test.csv")
    mean_val, mean_test = p_val.mean(1), p_test.mean(1)
    reported = dict(experiment.seed_reported)
    trainable = config["plan"]["trainable_params"]
    external = {s.name: s.eval_dir(run_dir) / "metrics.json" for s in externals}
    return {
        "name": experiment.name,
        "description": experiment.description,
        "command": command_line(cfg),
        "trainable_params": trainable,
        "seed_reported": reported,
        "trainable_params_differ": "trainable_params" in reported
        and reported["trainable_params"] != trainable,
        "test": metrics,
        "external": {n: json.loads(p.read_text()) for n, p in external.items() if p.exists()},
        "operating_points": stats.operating_points(y_val, mean_val, y_test, mean_test),
        "calibration": {
            "brier": stats.brier_score(y_test, mean_test),
            "ece": stats.expected_calibration_error(y_test, mean_test),
            "reliability": stats.reliability_curve(y_test, mean_test),
        },
        "wall_s": metrics["training"]["seconds"]["total"],
        "_test": {
            "paths": paths,
            "y": y_test,
            "p": mean_test,
            "labels": predicted_labels(p_test, metrics["member_thresholds"]),
        },
        "_dir": str(run_dir),
    }


def _paired(row: dict, reference: dict) -> dict | None:
    a, b = row["_test"], reference["_test"]
    if a["paths"] != b["paths"]:
        return {"error": "not the same test images as the reference"}
    delong = stats.delong_auc_test(a["y"], a["p"], b["p"])
    mcnemar = stats.mcnemar_test(a["y"], a["labels"], b["labels"])
    return {
        "auc_delta": delong["auc_delta"],
        "auc_delta_ci95": delong["auc_delta_ci95"],
        "delong_p": delong["p"],
        "mcnemar_p": mcnemar["p"],
        "mcnemar_discordant": [mcnemar["b"], mcnemar["c"]],
    }


def public(report: dict) -> dict:
    """The report without its in-memory arrays (what study.json holds)."""
    return {
        **report,
        "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in report["rows"]],
        "external": public_external(report.get("external", [])),
    }
