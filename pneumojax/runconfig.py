"""A run's configuration and splits, as ``config.json`` and ``splits.json`` record them.

The configuration is resolved once, before anything is written (:func:`resolved_config`), and
a new run's folder starts with both files (:func:`start_run_folder`). A resumed run reads them
back and runs with its own, except for :data:`RESUME_CHANGES`: checked against what it has
already trained (:func:`check_resume_changes`), then recorded in its config.json.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from pneumojax import data
from pneumojax.augment import parse_augment
from pneumojax.config import TrainConfig, resolve_optimisation
from pneumojax.features import storage_dtype
from pneumojax.io import write_text_atomic
from pneumojax.model import compute_dtype, resolve_precision
from pneumojax.tta import resolve_tta
from pneumojax.workspace import environment, read_json, warn_via, write_json


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
