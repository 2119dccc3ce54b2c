"""``pneumojax adapt``: a finished run adapted to images from another site, without labels.

Two label-free corrections, each optional, both written into the model's own variables so that
the adapted run is an ordinary run folder that ``evaluate``, ``predict``, ``explain`` and
``study`` use unchanged:

- **BatchNorm statistics re-estimated on the target images** (AdaBN; Li et al. 2016). Every
  BatchNorm layer up to the cut, frozen or trained, gets the mean and variance of its inputs
  over the target images: each batch runs with batch statistics (as in training), and the
  batch means and variances are pooled over all target images (law of total variance).
- **The target's class prior re-estimated by EM** on the model's probabilities (Saerens,
  Latinne, Decaestecker 2002): ``pi <- mean_i p_pi(x_i)``, where ``p_pi`` is the posterior
  moved from the training prior to ``pi`` by Bayes' rule, a shift of the PNEUMONIA logit by
  ``logit(pi) - logit(pi_train)``. That shift is added to the bias of the head's PNEUMONIA
  unit (``dense_1``), so the model's probabilities are the target-prior posteriors.

The threshold is then chosen on the target images without their labels: the most specific one
whose recall, *estimated* with the adapted probabilities as soft labels
(``sum_i p_i [p_i >= t] / sum_i p_i``), reaches the run's ``target_recall``
(``--threshold keep`` keeps the run's validation threshold instead).

Labels are never read: the target folder is searched for image files as ``predict`` does
(any layout, DICOM too) and the images are put in the order of their contents' SHA-256, so
moving files between class folders, or renaming them, changes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pneumojax.backbones import get_backbone
from pneumojax.checkpoint import save_variables
from pneumojax.data import Splits, load_images
from pneumojax.scoring import (
    LoadedRun,
    combine_rule,
    gather_image_files,
    load_run,
    run_intensity,
    run_resize,
    score_split,
)
from pneumojax.runmodel import split_probabilities
from pneumojax.predictions import write_predictions
from pneumojax.io import file_sha256, remove_stale_staging, write_text_atomic
from pneumojax.modelcard import write_model_card
from pneumojax.metrics import format_metrics
from pneumojax.model import build_classifier
from pneumojax.progress import progress_bar
from pneumojax.workspace import load_split_arrays, write_json

THRESHOLD_RULES = ("target", "keep")
_EPS = 1e-6
# EM's prior is kept inside these bounds: an over-confident model drives EM towards 0 or 1,
# where the logit shift grows without limit and every probability saturates.
PRIOR_BOUNDS = (0.02, 0.98)


@dataclasses.dataclass(frozen=True)
class AdaptOptions:
    """What ``pneumojax adapt`` changes."""

    bn: bool = True  # re-estimate BatchNorm statistics on the target images
    prior: bool = True  # re-estimate the class prior by EM and shift the PNEUMONIA logit
    threshold: str = "target"  # target: label-free on the target images; keep: the run's own


def target_images(data: str | os.PathLike, image_size: int, resize: str, log=print):
    """The target folder's images (any layout; never their labels) in content order:
    (uint8 images, [(sha256, path)])."""
    files = gather_image_files([str(data)], log)
    digests = [file_sha256(f) for f in files]
    order = sorted(range(len(files)), key=lambda i: (digests[i], files[i]))
    files = [files[i] for i in order]
    images = load_images(files, image_size, progress=len(files) > 50, resize=resize)
    return images, [(digests[i], f) for i, f in zip(order, files)]


def batchnorm_statistics(run: LoadedRun, images: np.ndarray, batch_size: int) -> dict:
    """Every member's BatchNorm statistics re-estimated on ``images`` (AdaBN): the run's full
    variables with ``batch_stats`` replaced, stacked as the run stores them."""
    config = run.config
    info = get_backbone(config["backbone"])
    every_layer = frozenset(s.name for s in info.layers)  # every BatchNorm uses batch statistics
    model = build_classifier(
        info, config["cut"], every_layer, jnp.float32, intensity=run_intensity(config)
    )
    momentum = {s.name: s.cfg["momentum"] for s in info.layers if s.kind == "BatchNormalization"}
    stacked = run.full_variables
    members = int(jax.tree.leaves(stacked)[0].shape[0])

    @jax.jit
    def batch_moments(variables, x):
        # Stored statistics zeroed: the update m * 0 + (1 - m) * batch_stat gives the batch's own.
        zeroed = {
            **variables,
            "batch_stats": jax.tree.map(jnp.zeros_like, variables["batch_stats"]),
        }
        _, updated = model.apply(
            zeroed, x, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]
        )
        return updated["batch_stats"]

    adapted = []
    batches = range(0, len(images), batch_size)
    for k in range(members):
        variables = jax.tree.map(lambda a, k=k: np.asarray(a[k]), stacked)
        sums = None
        for start in progress_bar(batches, desc=f"BatchNorm statistics (member {k + 1})"):
            x = np.asarray(images[start : start + batch_size])
            stats = _batch_stats_of(batch_moments(variables, x), momentum)
            n = len(x)
            part = jax.tree.map(lambda s, n=n: n * s, stats)
            sums = part if sums is None else jax.tree.map(np.add, sums, part)
        total = len(images)
        pooled = jax.tree.map(lambda s: s / total, sums)
        new_stats = jax.tree.map(
            lambda m: {
                "mean": m["mean"].astype(np.float32),
                # E[var_b + mean_b^2] - E[mean_b]^2: the variance over all target images
                "var": np.maximum(m["second"] - m["mean"] ** 2, 0.0).astype(np.float32),
            },
            pooled,
            is_leaf=_is_moments,
        )
        adapted.append({**variables, "batch_stats": new_stats})
    return jax.tree.map(lambda *xs: np.stack(xs), *adapted)


def _is_moments(x) -> bool:
    return isinstance(x, dict) and set(x) == {"mean", "second"}


def _batch_stats_of(updated: dict, momentum: dict) -> dict:
    """Flax's updated moving averages (from zero) -> each layer's batch mean and
    E[x^2] = var + mean^2, as float64."""

    def walk(tree):
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict) and set(value) == {"mean", "var"}:
                scale = 1.0 - momentum[name]
                mean = np.asarray(value["mean"], np.float64) / scale
                var = np.asarray(value["var"], np.float64) / scale
                out[name] = {"mean": mean, "second": var + mean**2}
            else:
                out[name] = walk(value)
        return out

    return walk(updated)


def training_prior(config: dict) -> float:
    """The PNEUMONIA share the run's model learned under: its members' training counts after
    balancing (a class-weighted loss weighs both classes equally: 0.5)."""
    record = config.get("balance_applied") or {}
    if record.get("method") == "class-weight":
        return 0.5
    counts = record.get("member_counts")
    if not counts:
        raise ValueError(
            f"{config.get('out')}: config.json does not record the training counts "
            "(balance_applied); train the run again with this pneumojax"
        )
    return float(np.mean([c[1] / (c[0] + c[1]) for c in counts]))


def em_prior(
    member_p: np.ndarray, source_prior: float, max_iter: int = 1000, tol: float = 1e-9
) -> dict:
    """Saerens et al.'s EM estimate of the PNEUMONIA prior of the images ``member_p`` scores
    (n, members), from a model trained under ``source_prior``. Returns the prior, the logit
    shift that moves the model's posteriors to it, and the iterations taken."""
    p = np.clip(np.asarray(member_p, np.float64), _EPS, 1 - _EPS)
    z = np.log(p) - np.log1p(-p)
    base = _logit(source_prior)
    prior, iterations = source_prior, 0
    for iterations in range(1, max_iter + 1):
        q = _sigmoid(z + _logit(prior) - base).mean(1)
        new = float(np.clip(q.mean(), *PRIOR_BOUNDS))
        done = abs(new - prior) < tol
        prior = new
        if done:
            break
    return {
        "training_prior": source_prior,
        "target_prior": prior,
        "logit_shift": _logit(prior) - base,
        "iterations": iterations,
        "at_bound": prior in PRIOR_BOUNDS,
    }


def _logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def shift_pneumonia_logit(stacked: dict, shift: float) -> dict:
    """The variables with ``shift`` added to the head's PNEUMONIA bias (every member)."""
    bias = np.array(stacked["params"]["dense_1"]["bias"], np.float32, copy=True)
    bias[:, 1] += np.float32(shift)
    params = {**stacked["params"], "dense_1": {**stacked["params"]["dense_1"], "bias": bias}}
    return {**stacked, "params": params}


def label_free_threshold(scores: np.ndarray, soft_labels: np.ndarray, target_recall: float):
    """The highest threshold on ``scores`` whose recall, estimated with ``soft_labels``
    (P(pneumonia) per image) as the labels, reaches ``target_recall``."""
    scores = np.asarray(scores, np.float64)
    weights = np.asarray(soft_labels, np.float64)
    order = np.argsort(-scores, kind="stable")
    s, w = scores[order], weights[order]
    recall = np.cumsum(w) / max(w.sum(), _EPS)
    last = np.r_[s[1:] != s[:-1], True]  # a threshold counts every image tied with it
    ok = np.flatnonzero(last & (recall >= target_recall - 1e-12))
    return float(s[ok[0]]) if ok.size else float(s[-1])


def adapt_run(
    run_dir: str | Path,
    data: str | os.PathLike,
    out: str | Path,
    options: AdaptOptions = AdaptOptions(),
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Writes ``out``: ``run_dir`` adapted to the images of ``data`` (never their labels), as
    a run folder (config.json with an ``adaptation`` record, model/, metrics.json and
    predictions of the run's own splits, ``adapt/target.csv``). Returns its metrics."""
    run_dir, out = Path(run_dir), Path(out).absolute()
    _check_request(run_dir, out, options, overwrite)
    run = load_run(run_dir, log=log)
    config = run.config
    rule = combine_rule(config)
    size, resize = config["image_size"], run_resize(config)
    images, files = target_images(data, size, resize, log)
    log(f"target: {len(images)} images from {data} (labels not read)")
    variables = run.full_variables
    record: dict = {
        "source_run": str(run_dir.absolute()),
        "target": str(Path(data).absolute()),
        "target_images": len(images),
        "target_digest": hashlib.sha256("".join(d for d, _ in files).encode()).hexdigest(),
        "bn": options.bn,
        "prior": options.prior,
        "threshold_rule": options.threshold,
        "source_thresholds": list(run.thresholds),
    }
    if options.bn:
        variables = batchnorm_statistics(run, images, config["batch_size"])
        log(f"BatchNorm statistics re-estimated on the {len(images)} target images")
        run = _with_variables(run, variables)
    p_before = run.model.probabilities_of_images(images, tta=run.tta)
    if options.bn:
        check_not_saturated(p_before)
    if options.prior:
        prior = _target_prior(p_before, config, log)
        record["prior_shift"] = prior
        variables = shift_pneumonia_logit(variables, prior["logit_shift"])
        run = _with_variables(run, variables)
    p_target = run.model.probabilities_of_images(images, tta=run.tta) if options.prior else p_before
    if options.threshold == "keep":
        thresholds = list(run.thresholds)
    else:
        thresholds = _label_free_thresholds(p_target, rule, config["target_recall"], record, log)
    record["thresholds"] = thresholds
    record["target_mean_probability"] = float(p_target.mean())
    return _write_adapted(run, variables, thresholds, record, files, p_target, out, overwrite, log)


def _check_request(run_dir: Path, out: Path, options: AdaptOptions, overwrite: bool) -> None:
    """The usage errors, before anything is read: the threshold rule, and an ``--out`` that
    would overwrite something other than an earlier adapted run."""
    if options.threshold not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {options.threshold!r}: choose {THRESHOLD_RULES}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.resolve() == run_dir.resolve():
        raise ValueError("--out must be a new folder: the run it adapts stays as it is")
    if out.exists() and not _is_adapted_run(out):
        raise FileExistsError(
            f"{out} exists and is not a run made by pneumojax adapt: --overwrite replaces only "
            "those; choose another --out"
        )


def _target_prior(p_before: np.ndarray, config: dict, log) -> dict:
    """EM's estimate of the target's PNEUMONIA prior (:func:`em_prior`), said in the log."""
    prior = em_prior(p_before, training_prior(config))
    log(
        f"class prior: PNEUMONIA {prior['training_prior']:.3f} in training, estimated "
        f"{prior['target_prior']:.3f} on the target by EM ({prior['iterations']} "
        f"iterations); PNEUMONIA logit shifted by {prior['logit_shift']:+.3f}"
    )
    if prior["at_bound"]:
        log(
            f"warning: EM stopped at its bound {prior['target_prior']:g}: the model is "
            "too confident on these images for its probabilities to estimate their prior"
        )
    return prior


def _label_free_thresholds(p_target, rule: str, target_recall: float, record: dict, log):
    """The thresholds chosen on the target images without labels (:func:`label_free_threshold`):
    one for the members' mean, or one per member for a vote."""
    soft = p_target.mean(1)
    scores = [soft] if rule == "mean" else [p_target[:, k] for k in range(p_target.shape[1])]
    thresholds = [label_free_threshold(s, soft, target_recall) for s in scores]
    log(
        f"threshold chosen on the target images without labels (estimated recall >= "
        f"{target_recall:g}): {', '.join(f'{t:.4f}' for t in thresholds)} "
        f"(the run's: {', '.join(f'{t:.4f}' for t in record['source_thresholds'])})"
    )
    return thresholds


SATURATED = 0.5  # share of target probabilities at exactly 0 or 1 that AdaBN may not leave


def check_not_saturated(p: np.ndarray) -> None:
    """Raises ValueError when the target's probabilities after AdaBN carry no ranking: all
    equal, or more than half exactly 0 or 1 in float32. A head trained on a frozen backbone's
    activations can meet activations of another scale once the backbone's BatchNorm layers
    are re-estimated, and its logits saturate."""
    p = np.asarray(p, np.float32)
    share = float(np.mean((p <= 0.0) | (p >= 1.0)))
    if share > SATURATED or float(np.ptp(p)) == 0.0:
        raise ValueError(
            f"BatchNorm statistics re-estimated on the target saturate this model: "
            f"{share:.0%} of the target's probabilities are exactly 0 or 1 (min "
            f"{float(p.min()):.3g}, max {float(p.max()):.3g}), so they cannot rank the images; "
            "adapt it with --no-bn (class prior and threshold only)"
        )


def _is_adapted_run(folder: Path) -> bool:
    try:
        return "adaptation" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _with_variables(run: LoadedRun, variables: dict) -> LoadedRun:
    model = copy.copy(run.model)  # (keeps the built model's suffix template)
    members = [
        jax.tree.map(lambda a, k=k: np.asarray(a[k]), variables)
        for k in range(int(jax.tree.leaves(variables)[0].shape[0]))
    ]
    model.prefix_variables = (
        None
        if model.prefix is None
        else _suffix_like(members[0], model.prefix_variables)  # members share the prefix
    )
    model.variables = jax.tree.map(
        lambda *xs: np.stack(xs), *[model.own_variables(m) for m in members]
    )
    return dataclasses.replace(run, model=model, full_variables=variables)


def _suffix_like(full: dict, template: dict) -> dict:
    from pneumojax.features import suffix_variables  # noqa: PLC0415

    return suffix_variables(full, template)


def _write_adapted(run, variables, thresholds, record, files, p_target, out, overwrite, log):
    config = run.config
    staging = out.with_name(f".{out.name}.tmp{os.getpid()}")
    remove_stale_staging(out.parent, rf"\.{re.escape(out.name)}\.tmp(?P<pid>\d+)")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("splits.json", "history.jsonl"):
        if (run.run_dir / name).exists():
            shutil.copy2(run.run_dir / name, staging / name)
    if (run.run_dir / "plots" / "history.png").exists():
        (staging / "plots").mkdir()
        shutil.copy2(run.run_dir / "plots" / "history.png", staging / "plots" / "history.png")
    manifest = json.loads((run.run_dir / "model" / "manifest.json").read_text())
    save_variables(staging / "model", variables, {**manifest, "thresholds": thresholds})
    new_config = {**config, "out": str(out), "adaptation": record}
    write_json(staging / "config.json", new_config)
    lines = ["sha256,path,p_pneumonia"] + [
        f"{d},{json.dumps(f) if ',' in f else f},{float(p)!r}"
        for (d, f), p in zip(files, p_target.mean(1))
    ]
    (staging / "adapt").mkdir()
    write_text_atomic(staging / "adapt" / "target.csv", "\n".join(lines) + "\n")
    # The adapted model on the run's own splits: figures at the adapted thresholds.
    splits = Splits.from_json((run.run_dir / "splits.json").read_text())
    p = {}
    for name in ("val", "test"):
        items = getattr(splits, name)
        x, y = load_split_arrays(items, config["image_size"], log, run_resize(config))
        p[name] = (y, split_probabilities(run.model, x, None, run.tta, name))
        write_predictions(staging / "predictions" / f"{name}.csv", items, p[name][1])
    metrics = score_split(
        p["test"][0], p["test"][1], thresholds, config["target_recall"], staging / "plots", "test"
    )
    metrics["threshold_source"] = (
        "validation" if record["threshold_rule"] == "keep" else "target images, no labels"
    )
    metrics["adaptation"] = record
    if run.tta is not None:
        metrics["tta"] = run.tta.record()
    source_metrics = json.loads((run.run_dir / "metrics.json").read_text())
    for key in ("balance", "training"):
        if key in source_metrics:
            metrics[key] = source_metrics[key]
    write_json(staging / "metrics.json", metrics)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    os.replace(staging, out)
    write_model_card(out)
    log(format_metrics(metrics) + "  (the run's own test split, adapted model)")
    log(f"adapted run: {out}")
    return metrics
