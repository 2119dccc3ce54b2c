"""A run end to end: data, plan, weights, training, evaluation, and the run folder.

A run folder holds everything the run did: ``config.json`` (all resolved), ``splits.json``,
``history.jsonl``, ``checkpoints/{last,best}``, ``metrics.json`` and ``plots/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import optax

from pneumojax import balance as B
from pneumojax import data as D
from pneumojax.backbones import get_backbone
from pneumojax.checkpoint import load_variables, save_variables
from pneumojax.features import (cacheable_frontier, cached_activations, merge_variables,
                                prefix_model, storage_dtype, suffix_variables)
from pneumojax.metrics import choose_threshold, evaluate_predictions, format_metrics
from pneumojax.model import build_classifier, compute_dtype, init_variables, make_optimizer, \
    make_plan, pneumonia_probability
from pneumojax.plots import plot_confusion_matrix, plot_history, plot_roc
from pneumojax.train import FitOptions, Steps, fit, make_mesh, member_logits


def cache_dir() -> Path:
    """Where decoded images and generated data live between runs."""
    return Path(os.environ.get("PNEUMOJAX_CACHE", Path.home() / ".cache" / "pneumojax"))


def checkpoints_dir() -> Path:
    return Path(os.environ.get("PNEUMOJAX_CHECKPOINTS", "checkpoints"))


@dataclasses.dataclass
class TrainConfig(FitOptions):
    """Every option of ``pneumojax train`` (the fit options plus the rest); saved resolved as
    ``config.json``."""

    data: str = "demo"
    backbone: str = "densenet121"
    cut: str | None = None
    weights: str = "imagenet"
    trainable: str = "none"
    image_size: int = 256
    target_recall: float = 0.98
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    out: str = "runs/latest"
    feature_cache: bool = True
    feature_cache_dtype: str = "auto"
    balance: str = "none"
    strict: bool = False
    precision: str = "auto"
    augment: str = "cxr"
    ensemble_size: int | None = None

    def fit_options(self) -> FitOptions:
        return FitOptions(**{f.name: getattr(self, f.name)
                             for f in dataclasses.fields(FitOptions)})


def _warn(log):
    return lambda message: log(f"warning: {message}")


def resolve_data(spec: str, log: Callable[[str], None] = print,
                 strict: bool = False) -> D.DataSource:
    """``demo`` makes (once) and uses the synthetic set; anything else is a data folder.

    Unreadable images are skipped with one warning (or stop the run with ``strict``)."""
    kwargs = dict(strict=strict, warn=_warn(log), cache_dir=cache_dir() / "images")
    if spec == "demo":
        folder = D.make_demo_dataset(cache_dir() / "demo")
        log(f"data: SYNTHETIC demo images ({folder}), not real X-rays: for trying the pipeline only")
        return D.find_images(folder, **kwargs)
    return D.find_images(spec, **kwargs)


def resolve_weights(weights: str, backbone: str) -> tuple[dict | None, dict]:
    """``none`` | ``imagenet`` (the ported checkpoint) | a checkpoint folder."""
    if weights == "none":
        return None, {"weights": "none"}
    folder = checkpoints_dir() / f"{backbone}-imagenet" if weights == "imagenet" else Path(weights)
    if weights == "imagenet" and not folder.exists():
        raise FileNotFoundError(
            f"no ported ImageNet checkpoint at {folder}. Make it with `pneumojax port --backbone "
            f"{backbone} --weights imagenet` (needs internet once), or train from Keras's random "
            "init with --weights none")
    variables, manifest = load_variables(folder)
    if manifest.get("backbone") != backbone:
        raise ValueError(f"checkpoint {folder} holds {manifest.get('backbone')} weights, "
                         f"not {backbone}")
    return variables, {"weights": str(folder), "weights_sha256": manifest.get("weights_sha256")}


def load_split_arrays(items, image_size: int, log=print) -> tuple[np.ndarray, np.ndarray]:
    images = D.load_images(items, image_size, cache_dir=cache_dir() / "images")
    labels = np.array([label for _, label in items], np.int32)
    return images, labels


def environment() -> dict:
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
            "python": platform.python_version(), "machine": platform.machine()}


def train_run(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
              log: Callable[[str], None] = print, stop_after_steps: int | None = None) -> dict:
    """Trains and evaluates; returns the test metrics (also in ``RUN_DIR/metrics.json``)."""
    t0 = time.perf_counter()
    run_dir = Path(cfg.out).absolute()
    check_run_dir(run_dir, resume, overwrite)
    if resume:
        cfg = TrainConfig(**{k: v for k, v in _read_json(run_dir / "config.json").items()
                             if k in {f.name for f in dataclasses.fields(TrainConfig)}})
        cfg.out = str(run_dir)
    info = get_backbone(cfg.backbone)
    plan = make_plan(info, cfg.cut, cfg.trainable, cfg.image_size)
    for line in plan.lines():
        log(line)

    source = resolve_data(cfg.data, log, strict=cfg.strict)
    if resume:
        splits = D.Splits.from_json((run_dir / "splits.json").read_text())
    else:
        splits = D.make_splits(source, cfg.val_fraction, cfg.test_fraction, seed=cfg.seed,
                               warn=_warn(log))
    for name, s in splits.summary().items():
        log(f"split {name}: {s['n']} images ({s['normal']} NORMAL, {s['pneumonia']} PNEUMONIA), "
            f"{s['patients']} patients")
    backbone_vars, weights_record = resolve_weights(cfg.weights, info.name)

    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        config = {**dataclasses.asdict(cfg), "cut": plan.cut, "plan": dataclasses.asdict(plan),
                  "weights_source": weights_record, "environment": environment(),
                  "data_layout": source.layout,
                  "skipped_images": [[os.path.relpath(p, source.root), r]
                                     for p, r in source.skipped]}
        config["plan"]["trainable_layers"] = sorted(plan.trainable_layers)
        D.write_text_atomic(run_dir / "splits.json", splits.to_json())
        _write_json(run_dir / "config.json", config)  # last: its presence marks a run

    train_x, train_y = load_split_arrays(splits.train, cfg.image_size, log)
    val_x, val_y = load_split_arrays(splits.val, cfg.image_size, log)
    test_x, test_y = load_split_arrays(splits.test, cfg.image_size, log)
    train_key = D.image_set_key([p for p, _ in splits.train], cfg.image_size)
    balanced = apply_balance(cfg, train_x, train_y, train_key, log)
    if not resume:
        config = _read_json(run_dir / "config.json")
        config["balance_applied"] = balanced.record
        _write_json(run_dir / "config.json", config)
    t_data = time.perf_counter() - t0

    dtype = compute_dtype(cfg.precision)
    model = build_classifier(info, plan.cut, plan.trainable_layers, dtype)
    k = len(balanced.members)
    member_vars = [init_variables(model, cfg.image_size, cfg.seed + i, backbone_vars)
                   for i in range(k)]
    mesh = make_mesh()
    log(f"devices: {mesh.devices.size} x {jax.default_backend()} ({jax.process_count()} "
        f"host(s)), {np.dtype(dtype).name} compute; global batch {cfg.batch_size}, "
        f"{cfg.batch_size // mesh.devices.size} per device"
        + (f"; {k} ensemble members trained side by side (vmap)" if k > 1 else ""))
    frontier = cacheable_frontier(info, plan.cut, plan.trainable_layers) if cfg.feature_cache else ()
    if frontier:
        # Train the suffix on activations computed once; same results as the full model.
        prefix = prefix_model(info, frontier, dtype)
        storage = storage_dtype(cfg.feature_cache_dtype, dtype)
        probe = Steps(model, optax.identity(), mesh)
        inputs = {}
        for name, x, key in (("train", balanced.images, balanced.key),
                             ("val", val_x, D.image_set_key([p for p, _ in splits.val],
                                                            cfg.image_size)),
                             ("test", test_x, D.image_set_key([p for p, _ in splits.test],
                                                              cfg.image_size))):
            inputs[name] = cached_activations(
                prefix, member_vars[0], x, key, cache_dir() / "features", cfg.batch_size,
                lambda *a, name=name: probe.map(*a, desc=f"frozen activations ({name})"),
                storage)
        log(f"feature cache: training on cached activations of {', '.join(frontier)}, stored "
            f"as {storage.name} (the frozen part runs once; --no-feature-cache turns this off)")
        train_model = build_classifier(info, plan.cut, plan.trainable_layers, dtype, given=frontier)
        example = jax.tree.map(lambda a: np.asarray(a[:1]), inputs["val"])
        template = jax.eval_shape(train_model.init, jax.random.key(0), example)
        train_vars = [suffix_variables(v, template) for v in member_vars]
    else:
        inputs = {"train": balanced.images, "val": val_x, "test": test_x}
        train_model, train_vars = model, member_vars
    steps = Steps(train_model, make_optimizer(train_vars[0]["params"], plan.trainable_layers,
                                              cfg.learning_rate), mesh)
    best, progress = fit(steps, train_vars, (inputs["train"], balanced.labels, balanced.weights),
                         (inputs["val"], val_y), cfg.fit_options(), run_dir,
                         members=balanced.members, resume=resume, log=log,
                         stop_after_steps=stop_after_steps)
    t_fit = time.perf_counter() - t0 - t_data

    stacked = stack_members(best)
    metrics = evaluate_arrays(steps, stacked, (inputs["val"], val_y), (inputs["test"], test_y),
                              cfg.target_recall, cfg.batch_size, run_dir / "plots", "test")
    full = stack_members([merge_variables(v, b) for v, b in zip(member_vars, best)])
    save_variables(run_dir / "model", full,
                   {"backbone": info.name, "cut": plan.cut, "image_size": cfg.image_size,
                    "members": k, "thresholds": metrics["member_thresholds"]}, overwrite=True)
    metrics["balance"] = balanced.record
    metrics["training"] = {"epochs_run": progress.epoch, "best_epoch": progress.best_epoch,
                           "stopped_early": progress.stopped_early,
                           "seconds": {"data": round(t_data, 2), "fit": round(t_fit, 2),
                                       "total": round(time.perf_counter() - t0, 2)}}
    _write_json(run_dir / "metrics.json", metrics)
    plot_history(progress.history, run_dir / "plots" / "history.png")
    log(format_metrics(metrics))
    log(f"run folder: {run_dir.absolute()}")
    return metrics


@dataclasses.dataclass
class BalancedTrain:
    """The train split after a balance method: what the members see and with what weight."""

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    members: list[np.ndarray]
    key: str                     # identifies ``images`` for the activation cache
    record: dict


def apply_balance(cfg: TrainConfig, images, labels, image_key: str, log=print) -> BalancedTrain:
    """Applies ``cfg.balance`` to the train split (validation and test are never touched)."""
    if cfg.balance not in B.METHODS:
        raise ValueError(f"unknown --balance {cfg.balance!r}; choose one of {', '.join(B.METHODS)}")
    counts = np.bincount(labels, minlength=2).tolist()
    weights = np.ones(len(labels), np.float32)
    members = [np.arange(len(labels))]
    record: dict = {"method": cfg.balance, "train_counts_before": counts}
    if cfg.balance == "class-weight":
        cw = B.class_weights(labels)
        weights = B.sample_weights(labels, cw)
        record["class_weights"] = {"NORMAL": cw[0], "PNEUMONIA": cw[1]}
        log(f"class weights: NORMAL {cw[0]:.4f}, PNEUMONIA {cw[1]:.4f} "
            "(w_c = total / (2 count_c))")
    elif cfg.balance == "undersample":
        members = [B.undersample_indices(labels, cfg.seed)]
    elif cfg.balance == "oversample":
        extra, extra_labels, aug_key = B.oversample(images, labels, cfg.seed, cfg.augment,
                                                    cache_dir() / "augmented", image_key)
        images = np.concatenate([np.asarray(images), np.asarray(extra)])
        labels = np.concatenate([labels, extra_labels]).astype(np.int32)
        weights = np.ones(len(labels), np.float32)
        members = [np.arange(len(labels))]
        image_key = f"{image_key}+{aug_key}"
        record["augment"] = cfg.augment
        record["augmented_images"] = len(extra)
        log(f"oversampling: {len(extra)} augmented copies of the minority class "
            f"(albumentations '{cfg.augment}', seed {cfg.seed}, cached)")
    elif cfg.balance == "ensemble":
        members = B.ensemble_chunks(labels, cfg.ensemble_size, cfg.seed)
    record["member_counts"] = [np.bincount(labels[m], minlength=2).tolist() for m in members]
    if cfg.balance != "none":
        for i, c in enumerate(record["member_counts"]):
            who = f"member {i + 1}: " if len(members) > 1 else ""
            log(f"balance {cfg.balance}: {who}train {c[0]} NORMAL, {c[1]} PNEUMONIA")
    return BalancedTrain(images, labels, weights, members, image_key, record)


def stack_members(member_variables: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *member_variables)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool):
    """Refuses to mix two runs in one folder."""
    has_run = (run_dir / "config.json").exists()
    if resume and not has_run:
        raise FileNotFoundError(f"--resume: {run_dir} holds no run to continue")
    if has_run and not resume:
        if not overwrite:
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, "
                                  "--overwrite to replace it, or choose another --out")
        shutil.rmtree(run_dir)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def evaluate_arrays(steps: Steps, member_variables, val, target, target_recall: float,
                    batch_size: int, plots_dir: Path, split_name: str,
                    thresholds: list[float] | None = None) -> dict:
    """Thresholds from validation (unless given), figures and plots on ``target``.

    ``member_variables`` holds K models stacked on a leading axis (K = 1 for a plain run).
    """
    if thresholds is None:
        p_val = member_probabilities(steps, member_variables, val[0], batch_size)
        thresholds = [choose_threshold(val[1], p_val[:, i], target_recall)
                      for i in range(p_val.shape[1])]
    p = member_probabilities(steps, member_variables, target[0], batch_size,
                             desc=f"predict {split_name}")
    metrics = combined_metrics(target[1], p, thresholds)
    metrics.update(split=split_name, threshold_source="validation", target_recall=target_recall)
    score = p.mean(1)
    plot_confusion_matrix(metrics["confusion_matrix"], plots_dir / "confusion_matrix.png",
                          title=f"{split_name}, threshold {metrics['threshold']:.3f}"
                          + (f" ({len(thresholds)}-member vote)" if len(thresholds) > 1 else ""))
    plot_roc(target[1], score, plots_dir / "roc.png", auc=metrics["auc"],
             threshold=thresholds[0] if len(thresholds) == 1 else None)
    return metrics


def member_probabilities(steps, member_variables, inputs, batch_size, desc=None) -> np.ndarray:
    """P(pneumonia) per input and member: (n, members)."""
    return np.asarray(pneumonia_probability(member_logits(steps, member_variables, inputs,
                                                          batch_size, desc)))


def combined_metrics(y: np.ndarray, member_p: np.ndarray, thresholds: list[float]) -> dict:
    """One model: figures at its threshold. An ensemble: labels by majority vote of the members
    (each at its own validation threshold; ties count as PNEUMONIA), AUC from the mean
    probability."""
    from pneumojax.metrics import binary_metrics, bootstrap_ci  # noqa: PLC0415
    if len(thresholds) == 1:
        metrics = evaluate_predictions(y, member_p[:, 0], thresholds[0])
    else:
        # The vote fraction at 0.5 gives exactly balance.vote's labels (ties -> PNEUMONIA).
        votes = (member_p >= np.asarray(thresholds)).mean(1)
        metrics = evaluate_predictions(y, votes, 0.5)
        mean_p = member_p.mean(1)
        auc_ci = bootstrap_ci(y, mean_p, 0.5)["auc"]
        auc = binary_metrics(y, mean_p, 0.5)["auc"]
        metrics["auc"], metrics["ci95"]["auc"] = auc, auc_ci
        votes_05 = (member_p >= 0.5).mean(1)
        metrics["at_0_5"] = {**binary_metrics(y, votes_05, 0.5), "auc": auc}
        metrics["ensemble"] = {"members": len(thresholds), "label": "majority vote",
                               "auc": "mean probability",
                               "threshold": "0.5 on the fraction of members voting PNEUMONIA"}
    metrics["member_thresholds"] = [float(t) for t in thresholds]
    return metrics


def _write_json(path: Path, payload: dict):
    D.write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


# --- using a finished run ---------------------------------------------------------------------

@dataclasses.dataclass
class LoadedRun:
    run_dir: Path
    config: dict
    steps: Steps
    variables: dict              # members stacked on a leading axis
    thresholds: list[float]      # one per member, chosen on validation


def load_run(run_dir: str | Path) -> LoadedRun:
    """The model, best weights and validation-chosen threshold of a finished run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a pneumojax run folder (no config.json)")
    config = json.loads((run_dir / "config.json").read_text())
    if not (run_dir / "model" / "manifest.json").exists():
        raise FileNotFoundError(f"{run_dir} has no finished model (model/manifest.json): the run "
                                "did not finish; continue it with pneumojax train --resume")
    variables, manifest = load_variables(run_dir / "model")
    info = get_backbone(config["backbone"])
    model = build_classifier(info, config["cut"], frozenset(),
                             compute_dtype(config.get("precision")))
    steps = Steps(model, optax.identity(), make_mesh())
    return LoadedRun(run_dir, config, steps, variables, list(manifest["thresholds"]))


def evaluate_run(run_dir: str | Path, data: str | None = None, split: str = "test",
                 out: str | Path | None = None, log=print, strict: bool = False) -> dict:
    """Evaluates a run's best model on a split of its own data or of another folder.

    The threshold is the one the run chose on its validation split.
    """
    run = load_run(run_dir)
    size = run.config["image_size"]
    if data is None:
        splits = D.Splits.from_json((run.run_dir / "splits.json").read_text())
        items = splits.as_dict()[split] if split != "all" else splits.train + splits.val + splits.test
    else:
        source = resolve_data(data, log, strict=strict)
        if split == "all":
            items = [it for v in source.splits.values() for it in v]
        elif source.layout == "kaggle" and split in source.splits and source.splits[split]:
            items = source.splits[split]
        else:
            raise ValueError(f"--split {split} needs a Kaggle-layout folder with {split}/; for a "
                             "flat NORMAL/ PNEUMONIA/ folder use --split all")
    x, y = load_split_arrays(items, size, log)
    out = Path(out) if out else run.run_dir / f"eval-{split}" / "metrics.json"
    metrics = evaluate_arrays(run.steps, run.variables, None, (x, y), run.config["target_recall"],
                              run.config["batch_size"], out.parent / "plots", split,
                              thresholds=run.thresholds)
    metrics["data"] = str(data or run.config["data"])
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out, metrics)
    log(format_metrics(metrics))
    log(f"wrote {out}")
    return metrics


def predict_paths(run_dir: str | Path, paths: list[str]) -> list[dict]:
    """Pneumonia probability and label for each image (folders are searched for images)."""
    run = load_run(run_dir)
    files: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in D.IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(str(p))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not files:
        raise FileNotFoundError("no images found in " + ", ".join(paths))
    files = D.check_images(files, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    if not files:
        raise FileNotFoundError("no readable images among " + ", ".join(paths))
    images = D.load_images(files, run.config["image_size"], progress=len(files) > 50)
    p = member_probabilities(run.steps, run.variables, images, run.config["batch_size"])
    labels = B.vote(p.T, run.thresholds)  # one member: its own threshold
    return [{"path": f, "p_pneumonia": float(q), "label": "PNEUMONIA" if lab else "NORMAL",
             "threshold": run.thresholds[0] if len(run.thresholds) == 1 else "vote"}
            for f, q, lab in zip(files, B.mean_probability(p.T), labels)]
