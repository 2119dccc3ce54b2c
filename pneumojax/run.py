"""One training run end to end: data, plan, weights, training, evaluation, and the run folder.

A run folder holds everything the run did: ``config.json`` (all resolved), ``splits.json``,
``history.jsonl``, ``checkpoints/{last,best}``, ``model/``, ``metrics.json``,
``predictions/test.csv``, ``plots/`` and ``tensorboard/`` (:mod:`pneumojax.tensorboard`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Callable

import jax

from pneumojax import balance, data
from pneumojax.augment import parse_augment
from pneumojax.backbones import get_backbone
from pneumojax.checkpoint import save_variables
from pneumojax.config import TrainConfig, optimisation_summary, resolve_optimisation
from pneumojax.features import cacheable_frontier, merge_variables, storage_dtype
from pneumojax.runmodel import RunModel, split_probabilities, stack_members
from pneumojax.scoring import combine_rule, score_split, validation_thresholds
from pneumojax.predictions import write_predictions
from pneumojax.io import write_text_atomic
from pneumojax.modelcard import write_model_card
from pneumojax.metrics import format_metrics
from pneumojax.model import (
    build_classifier,
    compute_dtype,
    init_variables,
    make_plan,
    resolve_precision,
)
from pneumojax.optim import make_optimizer
from pneumojax.plots import plot_history
from pneumojax.tensorboard import EventLog
from pneumojax.runfolder import (
    Replacement,
    check_not_in_use,
    check_replaceable,
    run_state,
    status_error,
    write_status,
)
from pneumojax.step import make_mesh
from pneumojax.train import Interrupted, fit
from pneumojax.tta import resolve_tta, run_tta
from pneumojax.workspace import (
    cache_dir,
    environment,
    load_split_arrays,
    read_json,
    resolve_data,
    resolve_weights,
    warn_via,
    write_json,
)


def train_run(
    cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
    changes: dict | None = None,
    config_extra: dict | None = None,
) -> dict:
    """Trains and evaluates; returns the test metrics (also in ``RUN_DIR/metrics.json``).

    ``resume`` continues the interrupted run in ``cfg.out`` with its own config.json, with
    ``changes`` (``epochs``, ``patience``: the options that may change on resume) applied;
    ``stop_after_steps`` simulates an interrupt (tests). ``config_extra`` is added to a new
    run's config.json.

    Nothing is written before every check (options, data, backbone, weights) has passed. A run
    already in ``cfg.out`` is replaced (``overwrite``, or a failed run's retry) only if it is
    provably one (:func:`pneumojax.runfolder.check_replaceable`), by moving it aside until the
    new run has its config.json and first checkpoint. ``status.json`` says whether the run is
    running, finished, failed or interrupted (:mod:`pneumojax.runfolder`).

    On several processes (``--distributed``) every process computes the same steps and
    process 0 alone writes the run folder; the others' ``cfg.out`` stays untouched.
    """
    t0 = time.perf_counter()
    run_dir = Path(cfg.out).absolute()
    writes = jax.process_index() == 0
    if resume and jax.process_count() > 1:
        raise ValueError("--resume is not supported on several processes yet")
    replacing = check_run_dir(run_dir, resume, overwrite, log) if writes else False
    if resume:
        check_resume_changes(run_dir, changes)
    cfg, requested = resolved_config(cfg, run_dir, resume, changes)
    info = get_backbone(cfg.backbone)
    plan = make_plan(info, cfg.cut, cfg.trainable, cfg.image_size)
    for line in plan.lines():
        log(line)
    source = resolve_data(cfg.data, log, strict=cfg.strict)
    splits = run_splits(cfg, source, run_dir, resume, log)
    backbone_vars, weights_record = resolve_weights(cfg.weights, info.name)
    # Every check has passed: from here on the run folder is written.
    replacement = Replacement(run_dir) if replacing else None
    try:
        if writes and not resume:
            start_run_folder(
                run_dir, cfg, plan, source, splits, weights_record, requested, config_extra
            )
        elif writes:
            record_resume_changes(run_dir, changes, log)
        if writes:
            write_status(run_dir, "running")
        metrics = _train_in_folder(
            cfg,
            run_dir,
            writes,
            resume,
            info,
            plan,
            splits,
            backbone_vars,
            t0,
            log,
            stop_after_steps,
            on_saved=replacement.commit if replacement is not None else None,
        )
    except (Interrupted, KeyboardInterrupt):
        _settle(writes, run_dir, replacement, "interrupted", None, log)
        raise
    except Exception as error:
        _settle(writes, run_dir, replacement, "failed", _one_line(error), log)
        raise
    if replacement is not None:
        replacement.commit()
    if writes:
        write_status(run_dir, "finished")
    return metrics


def _one_line(error: BaseException) -> str:
    return (f"{type(error).__name__}: {error}".splitlines() or [type(error).__name__])[0]


def _settle(writes, run_dir: Path, replacement, state: str, error: str | None, log) -> None:
    """After a failure or an interrupt: the run's status (in a folder this run started or
    resumed), then the run it replaced deleted or put back (:class:`Replacement`)."""
    if not writes:
        return
    if (run_dir / "config.json").exists():
        write_status(run_dir, state, error)
    if replacement is not None:
        note = replacement.settle()
        if note:
            log(note)


def _train_in_folder(
    cfg: TrainConfig,
    run_dir: Path,
    writes: bool,
    resume: bool,
    info,
    plan,
    splits: data.Splits,
    backbone_vars,
    t0: float,
    log: Callable[[str], None],
    stop_after_steps: int | None,
    on_saved: Callable[[], None] | None = None,
) -> dict:
    """The run once its folder is started: data, training, evaluation, the model."""
    arrays = {
        name: load_split_arrays(items, cfg.image_size, log, cfg.resize)
        for name, items in splits.as_dict().items()
    }
    train_key = data.image_set_key([p for p, _ in splits.train], cfg.image_size, cfg.resize)
    balanced = balance.apply_balance(
        cfg, *arrays["train"], train_key, log, augment_cache=cache_dir() / "augmented"
    )
    balanced = balance.seed_ensemble(balanced, cfg.seed_ensemble)
    if cfg.seed_ensemble > 1:
        log(
            f"seed ensemble: {cfg.seed_ensemble} members on the same train set, each with its "
            "own head init, dropout and shuffling order; P(pneumonia) is their mean, "
            "thresholded once on validation"
        )
    if writes and not resume:
        config = read_json(run_dir / "config.json")
        write_json(run_dir / "config.json", {**config, "balance_applied": balanced.record})
    t_data = time.perf_counter() - t0

    mesh = make_mesh()
    model = build_classifier(
        info,
        plan.cut,
        plan.trainable_layers,
        compute_dtype(cfg.precision),
        intensity=cfg.intensity,
    )
    member_vars = member_initial_variables(
        model, cfg.image_size, cfg.seed, len(balanced.members), backbone_vars
    )
    log_devices(mesh, cfg, len(balanced.members), log)
    frontier = (
        cacheable_frontier(info, plan.cut, plan.trainable_layers) if cfg.feature_cache else ()
    )
    # Members share the backbone (member_initial_variables), so member 0's prefix serves all.
    run_model = RunModel.build(
        info,
        plan.cut,
        plan.trainable_layers,
        cfg.precision,
        frontier,
        cfg.feature_cache_dtype,
        cfg.image_size,
        member_vars[0],
        cfg.batch_size,
        mesh,
        functools.partial(
            make_optimizer,
            optimizer=cfg.optimizer,
            weight_decay=cfg.weight_decay,
            clip_grad_norm=cfg.clip_grad_norm,
        ),
        cfg.learning_rate,
        cfg.intensity,
    )
    augment_spec = parse_augment(cfg.device_augment)
    if not augment_spec.identity:  # the same step, augmenting each batch first
        run_model.steps = dataclasses.replace(run_model.steps, augment=augment_spec)
    if cfg.label_smoothing or cfg.ema is not None:  # the same step, plus smoothing or the EMA
        run_model.steps = dataclasses.replace(
            run_model.steps, label_smoothing=cfg.label_smoothing, ema=cfg.ema
        )
    summary = optimisation_summary(cfg)
    if summary:
        log(summary)
    inputs = training_inputs(cfg, splits, balanced, arrays, run_model, frontier, log)
    events = EventLog(run_dir) if writes else None
    best, progress = fit(
        run_model.steps,
        [run_model.own_variables(v) for v in member_vars],
        (inputs["train"], balanced.labels, balanced.weights),
        (inputs["val"], arrays["val"][1]),
        cfg.fit_options(),
        run_dir,
        members=balanced.members,
        resume=resume,
        log=log,
        stop_after_steps=stop_after_steps,
        on_saved=_after_epoch(on_saved, events),
    )
    t_fit = time.perf_counter() - t0 - t_data
    run_model.variables = stack_members(best)
    temperature = None
    if cfg.calibrate == "temperature":
        best, temperature = calibrated(run_model, best, inputs["val"], arrays["val"][1], log)
        run_model.variables = stack_members(best)
    metrics = finish_run(run_dir, cfg, run_model, inputs, arrays, splits, log)
    if temperature is not None:
        metrics["calibration"] = {"method": "temperature", "temperature": temperature}
    if not writes:  # the scoring above ran on every process (its steps span them all)
        return metrics
    save_model(
        run_dir / "model", member_vars, best, plan, cfg.image_size, metrics["member_thresholds"]
    )
    metrics["balance"] = balanced.record
    metrics["training"] = {
        "epochs_run": progress.epoch,
        "best_epoch": progress.best_epoch,
        "stopped_early": progress.stopped_early,
        "seconds": {
            "data": round(t_data, 2),
            "fit": round(t_fit, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
    }
    write_json(run_dir / "metrics.json", metrics)
    plot_history(progress.history, run_dir / "plots" / "history.png")
    events.finish(progress.history, metrics, dataclasses.asdict(cfg), run_dir / "plots")
    write_model_card(run_dir)
    log(format_metrics(metrics))
    log(f"run folder: {run_dir} (its model card: MODEL_CARD.md)")
    return metrics


def _after_epoch(on_saved: Callable[[], None] | None, events: EventLog | None):
    """What follows each epoch's checkpoint: ``on_saved``, then the TensorBoard curves."""

    def after():
        if on_saved is not None:
            on_saved()
        if events is not None:
            events.epochs()

    return after


def calibrated(run_model: RunModel, best: list[dict], val_inputs, y_val, log) -> tuple:
    """``--calibrate temperature``: each member's head scaled by the T fitted on validation."""
    from pneumojax.calibration import fit_temperature, scale_head  # noqa: PLC0415
    from pneumojax.step import member_logits  # noqa: PLC0415

    z = member_logits(run_model.steps, run_model.variables, val_inputs, run_model.batch_size)
    temperature = fit_temperature(z[..., 1], y_val)
    log(
        f"temperature scaling: T = {temperature:.3f} fitted on validation (log loss of the "
        "PNEUMONIA probability), written into the head"
    )
    return [scale_head(b, temperature) for b in best], temperature


def resolved_config(
    cfg: TrainConfig, run_dir: Path, resume: bool, changes: dict | None = None
) -> tuple[TrainConfig, dict]:
    """The configuration to run (a resumed run's own) with precision and cache dtype resolved
    once, here: the run is thresholded and re-scored in what it was trained in. Also returns
    what was requested before resolving.

    ``device_augment`` is stored in its explicit form (a preset spelled out), and turns the
    feature cache off: the frozen prefix must run on every augmented batch, so training cannot
    read cached activations, and validation and test are then scored, un-augmented, by the
    same full model (one scoring path, which ``evaluate`` repeats exactly from config.json).
    A resumed run takes ``changes`` (:data:`RESUME_CHANGES`) over its stored values."""
    if resume:
        stored = read_json(run_dir / "config.json")
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in stored.items() if k in names})
        cfg.out = str(run_dir)
        cfg = dataclasses.replace(cfg, **_resume_changes(changes))
    cfg = dataclasses.replace(cfg)  # the caller's object stays as it was
    requested = {"precision": cfg.precision, "feature_cache_dtype": cfg.feature_cache_dtype}
    spec = parse_augment(cfg.device_augment)
    if not spec.identity:
        requested.update(device_augment=cfg.device_augment, feature_cache=cfg.feature_cache)
        cfg.feature_cache = False
    cfg.device_augment = str(spec)
    optim = resolve_optimisation(cfg)  # weight decay and warmup: defaults that depend on others
    for name in ("weight_decay", "warmup_epochs"):
        if getattr(optim, name) != getattr(cfg, name):
            requested[name] = getattr(cfg, name)
    cfg = optim
    if cfg.seed_ensemble > 1 and cfg.balance == "ensemble":
        raise ValueError(
            "--seed-ensemble cannot be combined with --balance ensemble (its members already "
            "differ in their data); use one or the other"
        )
    tta = resolve_tta(cfg.tta, cfg.tta_augment, cfg.device_augment)
    if cfg.tta_augment is not None:
        requested["tta_augment"] = cfg.tta_augment
    cfg.tta_augment = tta.augment if tta else None
    cfg.precision = resolve_precision(cfg.precision)
    cfg.feature_cache_dtype = storage_dtype(
        cfg.feature_cache_dtype, compute_dtype(cfg.precision)
    ).name
    return cfg, requested


def run_splits(
    cfg: TrainConfig,
    source: data.DataSource,
    run_dir: Path,
    resume: bool,
    log: Callable[[str], None],
) -> data.Splits:
    """The run's splits (a resumed run's own), logged one line per split."""
    if resume:
        splits = data.Splits.from_json((run_dir / "splits.json").read_text())
    else:
        splits = data.make_splits(
            source, cfg.val_fraction, cfg.test_fraction, seed=cfg.seed, warn=warn_via(log)
        )
    for name, s in splits.summary().items():
        log(
            f"split {name}: {s['n']} images ({s['normal']} NORMAL, {s['pneumonia']} PNEUMONIA), "
            f"{s['patients']} patients"
        )
    return splits


def start_run_folder(
    run_dir: Path,
    cfg: TrainConfig,
    plan,
    source: data.DataSource,
    splits: data.Splits,
    weights_record: dict,
    requested: dict,
    extra: dict | None = None,
):
    """Writes splits.json, then config.json (last: its presence marks a run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        **(extra or {}),
        **dataclasses.asdict(cfg),
        "cut": plan.cut,
        "plan": dataclasses.asdict(plan),
        "weights_source": weights_record,
        "environment": environment(),
        "data_layout": source.layout,
        "requested": requested,
        "skipped_images": [[os.path.relpath(p, source.root), r] for p, r in source.skipped],
    }
    config["plan"]["trainable_layers"] = sorted(plan.trainable_layers)
    write_text_atomic(run_dir / "splits.json", splits.to_json())
    write_json(run_dir / "config.json", config)


def log_devices(mesh, cfg: TrainConfig, members: int, log: Callable[[str], None]):
    log(
        f"devices: {mesh.devices.size} x {jax.default_backend()} ({jax.process_count()} "
        f"host(s)), {cfg.precision} compute; global batch {cfg.batch_size}, "
        f"{cfg.batch_size // mesh.devices.size} per device"
        + (f"; {members} ensemble members trained side by side (one step)" if members > 1 else "")
    )


def training_inputs(
    cfg: TrainConfig,
    splits: data.Splits,
    balanced: balance.BalancedTrain,
    arrays: dict,
    run_model: RunModel,
    frontier: tuple[str, ...],
    log: Callable[[str], None],
) -> dict:
    """What the trainable part takes for each split: the images, or the frozen prefix's
    activations, computed once per (weights, images, size, resize) and cached."""
    keys = {
        "train": balanced.key,
        **{
            n: data.image_set_key([p for p, _ in getattr(splits, n)], cfg.image_size, cfg.resize)
            for n in ("val", "test")
        },
    }
    images = {"train": balanced.images, "val": arrays["val"][0], "test": arrays["test"][0]}
    inputs = {
        n: run_model.inputs(images[n], keys[n], desc=f"frozen activations ({n})") for n in images
    }
    if frontier:
        log(
            f"feature cache: training on cached activations of {', '.join(frontier)}, stored "
            f"as {cfg.feature_cache_dtype} (the frozen part runs once; --no-feature-cache turns "
            "this off)"
        )
    if cfg.device_augment != "none":
        log(
            f"device augmentation: {cfg.device_augment} on every training batch inside the "
            "step (per sample, from --seed and the step number); the feature cache is off, "
            "the frozen part runs on each augmented batch; validation and test score "
            "un-augmented images"
        )
    return inputs


def finish_run(
    run_dir: Path,
    cfg: TrainConfig,
    run_model: RunModel,
    inputs: dict,
    arrays: dict,
    splits: data.Splits,
    log: Callable[[str], None],
) -> dict:
    """Thresholds on validation, figures and plots on test; every validation and test
    probability saved (operating points and paired tests are recomputed from them).

    With ``--tta N`` both validation and test are scored with the same test-time
    augmentation, so the thresholds are chosen on the probabilities they are applied to. The
    members combine by the run's rule (:func:`pneumojax.scoring.combine_rule`)."""
    tta = run_tta(dataclasses.asdict(cfg))
    if tta is None:
        p_val = run_model.member_probabilities(inputs["val"])
        p_test = run_model.member_probabilities(inputs["test"], desc="predict test")
    else:
        log(f"test-time augmentation: validation and test scored with {tta.describe()}")
        p_val = split_probabilities(run_model, arrays["val"][0], None, tta, "val")
        p_test = split_probabilities(run_model, arrays["test"][0], None, tta, "test")
    if jax.process_index() != 0:  # process 0 alone writes the run folder
        return {}
    thresholds = validation_thresholds(
        arrays["val"][1], p_val, cfg.target_recall, combine_rule(cfg)
    )
    metrics = score_split(
        arrays["test"][1], p_test, thresholds, cfg.target_recall, run_dir / "plots", "test"
    )
    if tta is not None:
        metrics["tta"] = tta.record()
    write_predictions(run_dir / "predictions" / "val.csv", splits.val, p_val)
    write_predictions(run_dir / "predictions" / "test.csv", splits.test, p_test)
    return metrics


def save_model(
    folder: Path,
    member_vars: list[dict],
    best: list[dict],
    plan,
    image_size: int,
    thresholds: list[float],
):
    """The finished model: each member's trained part merged into its full variables (the
    frozen backbone as it was), stacked, with what scoring needs in the manifest."""
    full = stack_members([merge_variables(v, b) for v, b in zip(member_vars, best)])
    save_variables(
        folder,
        full,
        {
            "backbone": plan.backbone,
            "cut": plan.cut,
            "image_size": image_size,
            "members": len(best),
            "thresholds": thresholds,
        },
        overwrite=True,
    )


def member_initial_variables(
    model, image_size: int, seed: int, k: int, backbone_vars: dict | None
) -> list[dict]:
    """Initial variables of K members. The backbone starts the same for all, as with ported
    weights (one random init from ``seed`` under ``--weights none``): the frozen part's
    activations are computed once and shared, and the saved model must pair each head with the
    backbone it trained on. Member i's head starts from ``seed + i``."""
    first = init_variables(model, image_size, seed, backbone_vars)
    if backbone_vars is None:
        backbone_vars = {c: first[c]["backbone"] for c in first if "backbone" in first[c]}
    return [first] + [
        init_variables(model, image_size, seed + i, backbone_vars) for i in range(1, k)
    ]


def check_run_dir(
    run_dir: Path, resume: bool, overwrite: bool, log: Callable[[str], None] = print
) -> bool:
    """Refuses to mix two runs in one folder; returns whether the run in ``run_dir`` is to be
    replaced (``overwrite``, or a failed run retried), which it checks is provably a pneumojax
    run. Nothing is touched here: the replacement happens once every check has passed."""
    state = run_state(run_dir)
    if state != "new":
        check_not_in_use(run_dir)  # two processes never write one folder, whatever the flags
    if resume:
        if state == "new":
            raise FileNotFoundError(f"--resume: {run_dir} holds no run to continue")
        return False
    if state == "new":
        return False
    if state == "failed" or overwrite:
        check_replaceable(run_dir)
        if state == "failed" and not overwrite:
            log(
                f"{run_dir} holds a failed run ({status_error(run_dir) or 'no error recorded'}): "
                "starting it again (the failed run stays until the new one has its first "
                "checkpoint)"
            )
        return True
    raise FileExistsError(
        f"{run_dir} already holds a run ({state}); pass --resume to continue it, "
        "--overwrite to replace it, or choose another --out"
    )


RESUME_CHANGES = ("epochs", "patience")  # what --resume may change; the rest is the run's own


def _resume_changes(changes: dict | None) -> dict:
    changes = {k: v for k, v in (changes or {}).items() if v is not None}
    unknown = sorted(set(changes) - set(RESUME_CHANGES))
    if unknown:
        raise ValueError(
            f"a resumed run keeps its own {', '.join(unknown)}; only "
            f"{' and '.join(RESUME_CHANGES)} can change on --resume"
        )
    return changes


def epochs_done(run_dir: Path) -> int:
    """The epochs a run has finished, as its history.jsonl records them."""
    try:
        return sum(1 for line in (run_dir / "history.jsonl").read_text().splitlines() if line)
    except OSError:
        return 0


def check_resume_changes(run_dir: Path, changes: dict | None) -> None:
    """Raises ValueError when ``changes`` cannot apply to the run in ``run_dir``: unknown
    options, or fewer ``epochs`` than it has already trained."""
    changes = _resume_changes(changes)
    done = epochs_done(run_dir)
    if "epochs" in changes and changes["epochs"] < done:
        raise ValueError(
            f"--epochs {changes['epochs']}: the run in {run_dir} has already trained {done} "
            f"epochs; give at least {done} (a larger --epochs continues training)"
        )


def record_resume_changes(run_dir: Path, changes: dict | None, log: Callable[[str], None]):
    """Writes the options changed on resume into config.json (which says how the run ran),
    with the old values under ``resume_changes``."""
    config = read_json(run_dir / "config.json")
    changed = {k: v for k, v in _resume_changes(changes).items() if config.get(k) != v}
    if not changed:
        return
    log(
        "resuming with " + ", ".join(f"--{k} {v} (was {config.get(k)})" for k, v in changed.items())
    )
    if "epochs" in changed and config.get("lr_schedule") == "warmup-cosine":
        log(
            "note: the warmup-cosine schedule is planned over --epochs: the epochs still to "
            "run follow the schedule to the new end"
        )
    history = config.get("resume_changes", [])
    history.append({k: [config.get(k), v] for k, v in changed.items()})
    write_json(run_dir / "config.json", {**config, **changed, "resume_changes": history})
