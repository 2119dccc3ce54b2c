"""One training run end to end: the checks, then in the run folder the data, the model to
train, training and what the run leaves.

Nothing is written before every check has passed: the run folder (:mod:`pneumojax.runfolder`:
a run refused, replaced or resumed, its status) and the configuration and splits
(:mod:`pneumojax.runconfig`). Then :func:`train_run` decodes and balances the data, builds the
members' classifier, trains it (:func:`pneumojax.train.fit`) and scores and saves the result
(:mod:`pneumojax.runresults`).

A run folder holds everything the run did: ``config.json`` (all resolved), ``splits.json``,
``history.jsonl``, ``checkpoints/{last,best}``, ``model/``, ``metrics.json``,
``predictions/test.csv``, ``plots/`` and ``tensorboard/`` (:mod:`pneumojax.tensorboard`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable

import jax

from pneumojax import balance, data
from pneumojax.augment import parse_augment
from pneumojax.backbones import BackboneInfo, get_backbone
from pneumojax.config import TrainConfig, optimisation_summary
from pneumojax.features import cacheable_frontier
from pneumojax.runmodel import RunModel, stack_members
from pneumojax.model import ModelPlan, build_classifier, compute_dtype, init_variables, make_plan
from pneumojax.optim import make_optimizer
from pneumojax.tensorboard import EventLog
from pneumojax.runconfig import (
    check_resume_changes,
    record_resume_changes,
    resolved_config,
    run_splits,
    start_run_folder,
)
from pneumojax.runcheckpoints import Progress
from pneumojax.runresults import calibrated, finish_run, save_model, write_results
from pneumojax.runfolder import Replacement, check_run_dir, settle_run, write_status
from pneumojax.step import make_mesh
from pneumojax.train import Interrupted, fit
from pneumojax.workspace import (
    cache_dir,
    load_split_arrays,
    read_json,
    resolve_data,
    resolve_weights,
    write_json,
)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the phases of a run read once every check has passed."""

    cfg: TrainConfig  # resolved (a resumed run's own)
    run_dir: Path
    writes: bool  # process 0 alone writes the run folder
    resume: bool
    info: BackboneInfo
    plan: ModelPlan
    splits: data.Splits
    backbone_vars: dict | None  # None: a random init (--weights none)
    t0: float  # when train_run started; the run's timings count from it
    log: Callable[[str], None]


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
    run = _Run(cfg, run_dir, writes, resume, info, plan, splits, backbone_vars, t0, log)
    # Every check has passed: from here on the run folder is written.
    replacement = Replacement(run_dir) if replacing else None
    try:
        if writes:
            _open_folder(run, source, weights_record, requested, changes, config_extra)
        on_saved = replacement.commit if replacement is not None else None
        metrics = _train_in_folder(run, stop_after_steps, on_saved)
    except (Interrupted, KeyboardInterrupt):
        if writes:
            settle_run(run_dir, replacement, "interrupted", None, log)
        raise
    except Exception as error:
        if writes:
            settle_run(run_dir, replacement, "failed", _one_line(error), log)
        raise
    if replacement is not None:
        replacement.commit()
    if writes:
        write_status(run_dir, "finished")
    return metrics


def _one_line(error: BaseException) -> str:
    return (f"{type(error).__name__}: {error}".splitlines() or [type(error).__name__])[0]


def _open_folder(
    run: _Run,
    source: data.DataSource,
    weights_record: dict,
    requested: dict,
    changes: dict | None,
    config_extra: dict | None,
) -> None:
    """Process 0's first writes: a new run's splits.json and config.json, or the options a
    resumed run changed; then the status ``running``."""
    if run.resume:
        record_resume_changes(run.run_dir, changes, run.log)
    else:
        start_run_folder(
            run.run_dir,
            run.cfg,
            run.plan,
            source,
            run.splits,
            weights_record,
            requested,
            config_extra,
        )
    write_status(run.run_dir, "running")


def _train_in_folder(
    run: _Run, stop_after_steps: int | None, on_saved: Callable[[], None] | None = None
) -> dict:
    """The run once its folder is started: data, training, evaluation, the model."""
    cfg, log = run.cfg, run.log
    arrays, balanced = _train_data(run)
    t_data = time.perf_counter() - run.t0
    run_model, member_vars, frontier = _training_model(run, len(balanced.members))
    inputs = training_inputs(cfg, run.splits, balanced, arrays, run_model, frontier, log)
    events = EventLog(run.run_dir) if run.writes else None
    best, progress = fit(
        run_model.steps,
        [run_model.own_variables(v) for v in member_vars],
        (inputs["train"], balanced.labels, balanced.weights),
        (inputs["val"], arrays["val"][1]),
        cfg.fit_options(),
        run.run_dir,
        members=balanced.members,
        resume=run.resume,
        log=log,
        stop_after_steps=stop_after_steps,
        on_saved=_after_epoch(on_saved, events),
    )
    t_fit = time.perf_counter() - run.t0 - t_data
    run_model.variables = stack_members(best)
    temperature = None
    if cfg.calibrate == "temperature":
        best, temperature = calibrated(run_model, best, inputs["val"], arrays["val"][1], log)
        run_model.variables = stack_members(best)
    metrics = finish_run(run.run_dir, cfg, run_model, inputs, arrays, run.splits, log)
    if temperature is not None:
        metrics["calibration"] = {"method": "temperature", "temperature": temperature}
    if not run.writes:  # the scoring above ran on every process (its steps span them all)
        return metrics
    save_model(
        run.run_dir / "model",
        member_vars,
        best,
        run.plan,
        cfg.image_size,
        metrics["member_thresholds"],
    )
    metrics["balance"] = balanced.record
    metrics["training"] = _training_record(progress, run.t0, t_data, t_fit)
    write_results(run.run_dir, cfg, metrics, progress, events, log)
    return metrics


def _train_data(run: _Run) -> tuple[dict, balance.BalancedTrain]:
    """Every split decoded, and train balanced by the run's method (then repeated for a seed
    ensemble); a new run records the balance applied in its config.json."""
    cfg, log = run.cfg, run.log
    arrays = {
        name: load_split_arrays(items, cfg.image_size, log, cfg.resize)
        for name, items in run.splits.as_dict().items()
    }
    train_key = data.image_set_key([p for p, _ in run.splits.train], cfg.image_size, cfg.resize)
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
    if run.writes and not run.resume:
        config = read_json(run.run_dir / "config.json")
        write_json(run.run_dir / "config.json", {**config, "balance_applied": balanced.record})
    return arrays, balanced


def _training_model(run: _Run, members: int) -> tuple[RunModel, list[dict], tuple[str, ...]]:
    """The classifier to train: the members' initial variables (one shared backbone) and the
    :class:`RunModel` over the device mesh, its step with the run's device augmentation,
    label smoothing and EMA. Also returns the frontier whose activations are cached (none
    without the feature cache)."""
    cfg, info, plan = run.cfg, run.info, run.plan
    mesh = make_mesh()
    model = build_classifier(
        info,
        plan.cut,
        plan.trainable_layers,
        compute_dtype(cfg.precision),
        intensity=cfg.intensity,
    )
    member_vars = member_initial_variables(
        model, cfg.image_size, cfg.seed, members, run.backbone_vars
    )
    log_devices(mesh, cfg, members, run.log)
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
        run.log(summary)
    return run_model, member_vars, frontier


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


def _after_epoch(on_saved: Callable[[], None] | None, events: EventLog | None):
    """What follows each epoch's checkpoint: ``on_saved``, then the TensorBoard curves."""

    def after():
        if on_saved is not None:
            on_saved()
        if events is not None:
            events.epochs()

    return after


def _training_record(progress: Progress, t0: float, t_data: float, t_fit: float) -> dict:
    """metrics.json's ``training``: how far it went, and the seconds of each phase."""
    return {
        "epochs_run": progress.epoch,
        "best_epoch": progress.best_epoch,
        "stopped_early": progress.stopped_early,
        "seconds": {
            "data": round(t_data, 2),
            "fit": round(t_fit, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
    }
