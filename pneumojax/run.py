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
import jax.numpy as jnp
import numpy as np
import optax

from pneumojax import balance as B
from pneumojax import data as D
from pneumojax.backbones import get_backbone
from pneumojax.checkpoint import CheckpointError, load_variables, save_variables
from pneumojax.io import existing_folder, write_text_atomic
from pneumojax.features import (cacheable_frontier, cached_activations, merge_variables,
                                prefix_model, storage_dtype, suffix_variables, variables_digest)
from pneumojax.metrics import choose_threshold, evaluate_predictions, format_metrics
from pneumojax.model import (build_classifier, compute_dtype, init_variables, make_optimizer,
                             make_plan, pneumonia_probability, resolve_precision)
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
    resize: str = "antialias"
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


def load_split_arrays(items, image_size: int, log=print,
                      resize: str = "antialias") -> tuple[np.ndarray, np.ndarray]:
    images = D.load_images(items, image_size, cache_dir=cache_dir() / "images", resize=resize)
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
    requested = {"precision": cfg.precision, "feature_cache_dtype": cfg.feature_cache_dtype}
    # Resolved once, here: the run is thresholded and re-scored in what it was trained in.
    cfg.precision = resolve_precision(cfg.precision)
    cfg.feature_cache_dtype = storage_dtype(cfg.feature_cache_dtype,
                                            compute_dtype(cfg.precision)).name
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
                  "data_layout": source.layout, "requested": requested,
                  "skipped_images": [[os.path.relpath(p, source.root), r]
                                     for p, r in source.skipped]}
        config["plan"]["trainable_layers"] = sorted(plan.trainable_layers)
        write_text_atomic(run_dir / "splits.json", splits.to_json())
        _write_json(run_dir / "config.json", config)  # last: its presence marks a run

    train_x, train_y = load_split_arrays(splits.train, cfg.image_size, log, cfg.resize)
    val_x, val_y = load_split_arrays(splits.val, cfg.image_size, log, cfg.resize)
    test_x, test_y = load_split_arrays(splits.test, cfg.image_size, log, cfg.resize)
    train_key = D.image_set_key([p for p, _ in splits.train], cfg.image_size, cfg.resize)
    balanced = apply_balance(cfg, train_x, train_y, train_key, log)
    if not resume:
        config = _read_json(run_dir / "config.json")
        config["balance_applied"] = balanced.record
        _write_json(run_dir / "config.json", config)
    t_data = time.perf_counter() - t0

    dtype = compute_dtype(cfg.precision)
    model = build_classifier(info, plan.cut, plan.trainable_layers, dtype)
    k = len(balanced.members)
    member_vars = member_initial_variables(model, cfg.image_size, cfg.seed, k, backbone_vars)
    mesh = make_mesh()
    log(f"devices: {mesh.devices.size} x {jax.default_backend()} ({jax.process_count()} "
        f"host(s)), {np.dtype(dtype).name} compute; global batch {cfg.batch_size}, "
        f"{cfg.batch_size // mesh.devices.size} per device"
        + (f"; {k} ensemble members trained side by side (vmap)" if k > 1 else ""))
    frontier = cacheable_frontier(info, plan.cut, plan.trainable_layers) if cfg.feature_cache else ()
    # Members share the backbone (member_initial_variables), so member 0's prefix serves all.
    run_model = RunModel.build(info, plan.cut, plan.trainable_layers, cfg.precision, frontier,
                               cfg.feature_cache_dtype, cfg.image_size, member_vars[0],
                               cfg.batch_size, mesh, make_optimizer, cfg.learning_rate)
    image_keys = {"train": balanced.key,
                  **{n: D.image_set_key([p for p, _ in getattr(splits, n)], cfg.image_size,
                                        cfg.resize)
                     for n in ("val", "test")}}
    inputs = {name: run_model.inputs(x, image_keys[name], desc=f"frozen activations ({name})")
              for name, x in (("train", balanced.images), ("val", val_x), ("test", test_x))}
    if frontier:
        log(f"feature cache: training on cached activations of {', '.join(frontier)}, stored "
            f"as {cfg.feature_cache_dtype} (the frozen part runs once; --no-feature-cache turns "
            "this off)")
    train_vars = [run_model.own_variables(v) for v in member_vars]
    steps = run_model.steps
    best, progress = fit(steps, train_vars, (inputs["train"], balanced.labels, balanced.weights),
                         (inputs["val"], val_y), cfg.fit_options(), run_dir,
                         members=balanced.members, resume=resume, log=log,
                         stop_after_steps=stop_after_steps)
    t_fit = time.perf_counter() - t0 - t_data

    run_model.variables = stack_members(best)
    p_val = run_model.member_probabilities(inputs["val"])
    p_test = run_model.member_probabilities(inputs["test"], desc="predict test")
    thresholds = validation_thresholds(val_y, p_val, cfg.target_recall)
    metrics = score_split(test_y, p_test, thresholds, cfg.target_recall, run_dir / "plots", "test")
    write_predictions(run_dir / "predictions" / "test.csv", splits.test, p_test)
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


def member_initial_variables(model, image_size: int, seed: int, k: int,
                             backbone_vars: dict | None) -> list[dict]:
    """Initial variables of K members. The backbone starts the same for all, as with ported
    weights (one random init from ``seed`` under ``--weights none``): the frozen part's
    activations are computed once and shared, and the saved model must pair each head with the
    backbone it trained on. Member i's head starts from ``seed + i``."""
    first = init_variables(model, image_size, seed, backbone_vars)
    if backbone_vars is None:
        backbone_vars = {c: first[c]["backbone"] for c in first if "backbone" in first[c]}
    return [first] + [init_variables(model, image_size, seed + i, backbone_vars)
                      for i in range(1, k)]


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
    if any(min(c) == 0 for c in record["member_counts"]):  # a method's bug, never the data's
        raise AssertionError(f"balance {cfg.balance} left a member with one class: "
                             f"{record['member_counts']}")
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


@dataclasses.dataclass
class RunModel:
    """A run's classifier as it was trained: images -> (frozen prefix -> activations, rounded to
    their storage dtype) -> trainable suffix -> member logits; or the full classifier when the
    run trained without the feature cache. Training, ``evaluate`` and ``predict`` all score
    through this one path, so a saved run re-scores exactly to its own metrics.json.

    ``variables`` holds the suffix's variables of K members stacked on a leading axis (set once
    trained); ``prefix_variables`` the shared frozen prefix's.
    """

    steps: Steps
    prefix: object | None
    prefix_variables: dict | None
    storage: np.dtype | None
    batch_size: int
    variables: dict | None = None

    @classmethod
    def build(cls, info, cut: str, trainable: frozenset[str], precision: str,
              frontier: tuple[str, ...], cache_dtype: str, image_size: int,
              backbone_source: dict, batch_size: int, mesh, optimizer=None,
              learning_rate: float = 0.0) -> "RunModel":
        """``backbone_source``: full classifier variables whose backbone is the run's frozen
        one; ``optimizer(params, trainable, lr)`` makes the training optimizer (None: the
        model only scores)."""
        dtype = compute_dtype(precision)
        images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
        prefix = prefix_vars = storage = None
        example = images
        if frontier:
            prefix = prefix_model(info, frontier, dtype)
            storage = storage_dtype(cache_dtype, dtype)
            prefix_vars = suffix_variables(backbone_source,
                                           jax.eval_shape(prefix.init, jax.random.key(0), images))
            example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, storage),
                                   jax.eval_shape(prefix.apply, prefix_vars, images))
        model = build_classifier(info, cut, trainable, dtype, given=frontier)
        template = jax.eval_shape(model.init, jax.random.key(0), example)
        tx = optax.identity()
        if optimizer is not None:
            tx = optimizer(suffix_variables(backbone_source, template)["params"], trainable,
                           learning_rate)
        self = cls(Steps(model, tx, mesh), prefix, prefix_vars, storage, batch_size)
        self._template = template
        return self

    def own_variables(self, full: dict) -> dict:
        """Full classifier variables restricted to what this model's suffix holds."""
        return suffix_variables(full, self._template)

    def inputs(self, images, image_key: str | None = None, desc: str | None = None):
        """What the suffix takes for ``images``: the images themselves, or the prefix's
        activations (from the activation cache when ``image_key`` identifies the images)."""
        if self.prefix is None:
            return images
        return cached_activations(
            self.prefix, self.prefix_variables, images, image_key,
            cache_dir() / "features" if image_key else None, self.batch_size,
            lambda *a: self.steps.map(*a, desc=desc), self.storage)

    def member_probabilities(self, inputs, desc: str | None = None) -> np.ndarray:
        """P(pneumonia) per input and member, (n, members), for inputs from :meth:`inputs`."""
        return np.asarray(pneumonia_probability(member_logits(
            self.steps, self.variables, inputs, self.batch_size, desc)))

    def probabilities_of_images(self, images, chunk: int = 512) -> np.ndarray:
        """:meth:`member_probabilities` of raw images, a chunk at a time (bounded memory)."""
        chunk = max(self.batch_size, chunk // self.batch_size * self.batch_size)
        parts = [self.member_probabilities(self.inputs(images[i:i + chunk]))
                 for i in range(0, len(images), chunk)]
        return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def validation_thresholds(y_val, p_val: np.ndarray, target_recall: float) -> list[float]:
    """One threshold per member, each the most specific reaching ``target_recall`` on
    validation (never on test)."""
    return [choose_threshold(y_val, p_val[:, i], target_recall) for i in range(p_val.shape[1])]


def score_split(y, member_p: np.ndarray, thresholds: list[float], target_recall: float,
                plots_dir: Path, split_name: str) -> dict:
    """Figures and plots of one split at the given (validation-chosen) thresholds.

    ``member_p`` holds P(pneumonia) per image and member, (n, members).
    """
    metrics = combined_metrics(y, member_p, thresholds)
    metrics.update(split=split_name, threshold_source="validation", target_recall=target_recall)
    plot_confusion_matrix(metrics["confusion_matrix"], plots_dir / "confusion_matrix.png",
                          title=f"{split_name}, threshold {metrics['threshold']:.3f}"
                          + (f" ({len(thresholds)}-member vote)" if len(thresholds) > 1 else ""))
    plot_roc(y, B.mean_probability(member_p.T), plots_dir / "roc.png", auc=metrics["auc"],
             threshold=thresholds[0] if len(thresholds) == 1 else None)
    return metrics


def write_predictions(path: Path, items, member_p: np.ndarray):
    """Per image: path, label, P(pneumonia) (the members' mean) and each member's, exactly
    (float32 values written in full), so that a run's figures can be recomputed from it."""
    k = member_p.shape[1]
    header = "path,label,p_pneumonia" + ("".join(f",p_member{i + 1}" for i in range(k))
                                         if k > 1 else "")
    mean = B.mean_probability(member_p.T)
    lines = [header] + [
        ",".join([_csv_field(str(item[0])), D.CLASS_NAMES[item[1]], repr(float(m))]
                 + ([repr(float(v)) for v in row] if k > 1 else []))
        for item, m, row in zip(items, mean, member_p)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + "\n")


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


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
        mean_p = B.mean_probability(member_p.T)
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
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


# --- using a finished run ---------------------------------------------------------------------

@dataclasses.dataclass
class LoadedRun:
    run_dir: Path
    config: dict
    model: RunModel              # members stacked on a leading axis, as trained
    thresholds: list[float]      # one per member, chosen on validation
    precision: str               # what it scores in (the run's own unless overridden)


def run_precision(config: dict) -> str:
    """The precision a run was trained in. Runs made before it was stored resolved say
    ``auto``: that meant float32 on the CPU backend they record, bfloat16 elsewhere."""
    stored = config.get("precision")
    if stored in (None, "auto"):
        backend = config.get("environment", {}).get("backend")
        return resolve_precision("auto") if backend is None else \
            "float32" if backend == "cpu" else "bfloat16"
    return stored


def run_resize(config: dict) -> str:
    """How a run's images were resized; runs made before ``--resize`` existed used
    ``antialias``, the only method then."""
    return config.get("resize", "antialias")


def load_run(run_dir: str | Path, precision: str | None = None, log=print) -> LoadedRun:
    """The model, best weights and validation-chosen thresholds of a finished run, scoring in
    the run's own precision unless ``precision`` overrides it (then it says so)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a pneumojax run folder (no config.json)")
    config = json.loads((run_dir / "config.json").read_text())
    if not (existing_folder(run_dir / "model") / "manifest.json").exists():
        raise FileNotFoundError(f"{run_dir} has no finished model (model/manifest.json): the run "
                                "did not finish; continue it with pneumojax train --resume")
    variables, manifest = load_variables(run_dir / "model")
    info = get_backbone(config["backbone"])
    own = run_precision(config)
    used = own if precision is None else resolve_precision(precision)
    if used != own:
        log(f"note: scoring in {used} as asked (--precision), not in the run's own {own}: "
            "figures can differ slightly from its metrics.json")
    trainable = frozenset(config["plan"]["trainable_layers"])
    frontier = (cacheable_frontier(info, config["cut"], trainable)
                if config.get("feature_cache") else ())
    members = [jax.tree.map(lambda a, i=i: np.asarray(a[i]), variables)
               for i in range(manifest["members"])]
    cache_dtype = config.get("feature_cache_dtype", "auto") if used == own else "auto"
    model = RunModel.build(info, config["cut"], trainable, used, frontier, cache_dtype,
                           config["image_size"], members[0], config["batch_size"], make_mesh())
    if frontier and any(variables_digest(suffix_variables(m, model.prefix_variables))
                        != variables_digest(model.prefix_variables) for m in members[1:]):
        raise CheckpointError(
            f"{run_dir}: the ensemble's members do not share their frozen layers, so they cannot "
            "all have trained on one set of cached activations (a run made before pneumojax "
            "0.1.1); train it again")
    model.variables = stack_members([model.own_variables(v) for v in members])
    return LoadedRun(run_dir, config, model, list(manifest["thresholds"]), used)


def evaluate_run(run_dir: str | Path, data: str | None = None, split: str = "test",
                 out: str | Path | None = None, log=print, strict: bool = False,
                 precision: str | None = None) -> dict:
    """Evaluates a run's best model on a split of its own data or of another folder.

    The thresholds are the ones the run chose on its validation split. On the run's own test
    split this reproduces its metrics.json exactly (same precision, same scoring path).
    """
    run = load_run(run_dir, precision, log)
    size, resize = run.config["image_size"], run_resize(run.config)
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
    x, y = load_split_arrays(items, size, log, resize)
    out = Path(out) if out else run.run_dir / f"eval-{split}" / "metrics.json"
    key = D.image_set_key([p for p, _ in items], size, resize)
    p = run.model.member_probabilities(run.model.inputs(x, key, desc=f"frozen activations ({split})"),
                                       desc=f"predict {split}")
    metrics = score_split(y, p, run.thresholds, run.config["target_recall"], out.parent / "plots",
                          split)
    metrics["data"] = str(data or run.config["data"])
    metrics["compute_precision"] = run.precision
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out, metrics)
    write_predictions(out.parent / "predictions.csv", items, p)
    log(format_metrics(metrics))
    log(f"wrote {out}")
    return metrics


def predict_paths(run_dir: str | Path, paths: list[str], precision: str | None = None,
                  log=None) -> list[dict]:
    """Pneumonia probability and label for each image (folders are searched for images)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    run = load_run(run_dir, precision, log)
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
    files = D.check_images(files, warn=lambda m: log(f"warning: {m}"))
    if not files:
        raise FileNotFoundError("no readable images among " + ", ".join(paths))
    images = D.load_images(files, run.config["image_size"], progress=len(files) > 50,
                           resize=run_resize(run.config))
    p = run.model.probabilities_of_images(images)
    labels = B.vote(p.T, run.thresholds)  # one member: its own threshold
    return [{"path": f, "p_pneumonia": float(q), "label": "PNEUMONIA" if lab else "NORMAL",
             "threshold": run.thresholds[0] if len(run.thresholds) == 1 else "vote"}
            for f, q, lab in zip(files, B.mean_probability(p.T), labels)]
