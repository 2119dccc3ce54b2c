"""Class-imbalance methods of the study, applied to the TRAIN split only.

* ``class-weight``: w_c = (1 / count_c) * total / 2 per sample in the loss.
* ``undersample``: a seeded subset of the majority class, as large as the minority class
  (equal classes: every image is kept).
* ``oversample``: minority images augmented with albumentations until the classes are equal;
  generated once per (images, seed, pipeline) and cached, so frozen activations cache too.
* ``ensemble``: the majority class cut into K disjoint chunks; member k trains on chunk k plus
  all minority images; members vote for the label and average their probabilities.

With equal classes NORMAL counts as the minority and PNEUMONIA as the majority, so "minority"
and "majority" are always two different classes and every method keeps both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from pneumojax.config import BALANCE_METHODS
from pneumojax.io import remove_stale_staging

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import

METHODS = BALANCE_METHODS


def class_counts(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.asarray(labels), minlength=2)
    if (counts == 0).any():
        raise ValueError(f"the train split needs both classes; counts NORMAL/PNEUMONIA = {counts}")
    return counts


def minority_majority(labels: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(minority class, majority class, counts); two different classes even when the counts are
    equal (argmin and argmax would both say NORMAL then)."""
    counts = class_counts(labels)
    minority = int(counts[1] < counts[0])
    return minority, 1 - minority, counts


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """The study's formula: w_c = (1 / count_c) * total / 2."""
    counts = class_counts(labels)
    total = counts.sum()
    return {c: float(total / (2.0 * counts[c])) for c in (0, 1)}


def sample_weights(labels: np.ndarray, weights: dict[int, float] | None) -> np.ndarray:
    if weights is None:
        return np.ones(len(labels), np.float32)
    return np.array([weights[int(y)] for y in labels], np.float32)


def undersample_indices(labels: np.ndarray, seed: int) -> np.ndarray:
    """All minority indices plus a seeded random subset of the majority of the same size."""
    minority, majority, counts = minority_majority(labels)
    rng = np.random.default_rng([seed, 1])
    keep = rng.choice(np.flatnonzero(labels == majority), counts[minority], replace=False)
    return np.sort(np.concatenate([np.flatnonzero(labels == minority), keep]))


def ensemble_chunks(labels: np.ndarray, k: int | None, seed: int) -> list[np.ndarray]:
    """K disjoint majority chunks covering the majority class, each joined with all minority
    indices. K defaults to round(majority / minority)."""
    minority, majority, counts = minority_majority(labels)
    k = k or max(1, int(round(counts[majority] / counts[minority])))
    if not 1 <= k <= counts[majority]:
        raise ValueError(
            f"--ensemble-size {k} must be between 1 and the majority count {counts[majority]}"
        )
    rng = np.random.default_rng([seed, 2])
    shuffled = rng.permutation(np.flatnonzero(labels == majority))
    minority_idx = np.flatnonzero(labels == minority)
    return [np.sort(np.concatenate([chunk, minority_idx])) for chunk in np.array_split(shuffled, k)]


def vote(member_probs: np.ndarray, member_thresholds: Sequence[float]) -> np.ndarray:
    """Majority vote of the members' labels (ties go to PNEUMONIA: missing it costs more)."""
    member_probs = np.asarray(member_probs)
    votes = (member_probs >= np.asarray(member_thresholds)[:, None]).sum(0)
    return (2 * votes >= len(member_probs)).astype(np.int32)


def mean_probability(member_probs: np.ndarray) -> np.ndarray:
    return np.asarray(member_probs).mean(0)


# --- oversampling with albumentations ---------------------------------------------------------


def augment_pipeline(spec: str = "cxr"):
    """A preset name or the path of an albumentations pipeline saved with ``A.save``.

    ``cxr`` suits chest radiographs: small rotations, shifts and scales, brightness/contrast,
    mild noise or blur. No horizontal flip: it would put the heart on the wrong side.
    """
    import albumentations as A  # noqa: PLC0415

    if spec == "cxr":
        return A.Compose(
            [
                A.Affine(
                    rotate=(-10, 10),
                    translate_percent=(-0.06, 0.06),
                    scale=(0.92, 1.08),
                    border_mode=0,
                    p=0.9,
                ),
                A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.7),
                A.OneOf(
                    [A.GaussNoise(std_range=(0.01, 0.04)), A.GaussianBlur(blur_limit=(3, 5))], p=0.4
                ),
            ]
        )
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--augment {spec!r}: not a preset (cxr) nor an albumentations file")
    try:
        return A.load(str(path), data_format="yaml" if path.suffix in (".yml", ".yaml") else "json")
    except Exception as e:  # noqa: BLE001  (YAML/JSON errors, unknown transforms, bad keys)
        what = f"{type(e).__name__}: {e}".splitlines()[0]
        raise ValueError(
            f"--augment {spec}: not an albumentations pipeline saved with A.save ({what})"
        ) from None


def pipeline_description(spec: str) -> dict:
    """The pipeline as albumentations serializes it (for config.json and cache keys)."""
    import albumentations as A  # noqa: PLC0415

    return A.to_dict(augment_pipeline(spec))


def oversample(
    images: np.ndarray,
    labels: np.ndarray,
    seed: int,
    spec: str,
    cache_dir: Path | None,
    image_key: str,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Augmented minority copies until both classes are equal.

    Returns (augmented images, their labels, a key identifying them). The copies are made
    once per (images, seed, pipeline) and cached as uint8.
    """
    minority, majority, counts = minority_majority(labels)
    n_new = int(counts[majority] - counts[minority])
    sources = np.flatnonzero(labels == minority)
    key = hashlib.sha256(
        json.dumps(
            {"images": image_key, "seed": seed, "n": n_new, "pipeline": pipeline_description(spec)},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.npy" if cache_dir else None
    new_labels = np.full(n_new, minority, np.int32)
    if path is not None and path.exists():
        return np.load(path, mmap_mode="r"), new_labels, key
    if n_new == 0:
        return np.empty((0,) + images.shape[1:], np.uint8), new_labels, key
    pipeline = augment_pipeline(spec)
    pipeline.set_random_seed(seed)
    rng = np.random.default_rng([seed, 3])
    picks = np.concatenate([rng.permutation(sources) for _ in range(-(-n_new // len(sources)))])
    out = np.empty((n_new,) + images.shape[1:], np.uint8)
    for i, j in enumerate(picks[:n_new]):
        out[i] = pipeline(image=np.asarray(images[j]))["image"]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        remove_stale_staging(path.parent, r"[0-9a-f]{24}\.tmp(?P<pid>\d+)\.npy")
        np.save(tmp, out)
        os.replace(tmp, path)
    return out, new_labels, key


# --- applying a method to the train split ----------------------------------------------------


@dataclasses.dataclass
class BalancedTrain:
    """The train split after a balance method: what the members see and with what weight."""

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    members: list[np.ndarray]
    key: str  # identifies ``images`` for the activation cache
    record: dict


def apply_balance(
    cfg, images, labels, image_key: str, log=print, augment_cache: Path | None = None
) -> BalancedTrain:
    """Applies ``cfg.balance`` to the train split (validation and test are never touched).

    ``cfg`` holds ``balance``, ``seed``, ``augment`` and ``ensemble_size`` (a TrainConfig);
    oversampled copies are cached under ``augment_cache``.
    """
    if cfg.balance not in METHODS:
        raise ValueError(f"unknown --balance {cfg.balance!r}; choose one of {', '.join(METHODS)}")
    counts = np.bincount(labels, minlength=2).tolist()
    weights = np.ones(len(labels), np.float32)
    members = [np.arange(len(labels))]
    record: dict = {"method": cfg.balance, "train_counts_before": counts}
    if cfg.balance == "class-weight":
        cw = class_weights(labels)
        weights = sample_weights(labels, cw)
        record["class_weights"] = {"NORMAL": cw[0], "PNEUMONIA": cw[1]}
        log(f"class weights: NORMAL {cw[0]:.4f}, PNEUMONIA {cw[1]:.4f} (w_c = total / (2 count_c))")
    elif cfg.balance == "undersample":
        members = [undersample_indices(labels, cfg.seed)]
    elif cfg.balance == "oversample":
        extra, extra_labels, aug_key = oversample(
            images, labels, cfg.seed, cfg.augment, augment_cache, image_key
        )
        images = np.concatenate([np.asarray(images), np.asarray(extra)])
        labels = np.concatenate([labels, extra_labels]).astype(np.int32)
        weights = np.ones(len(labels), np.float32)
        members = [np.arange(len(labels))]
        image_key = f"{image_key}+{aug_key}"
        record["augment"] = cfg.augment
        record["augmented_images"] = len(extra)
        log(
            f"oversampling: {len(extra)} augmented copies of the minority class "
            f"(albumentations '{cfg.augment}', seed {cfg.seed}, cached)"
        )
    elif cfg.balance == "ensemble":
        members = ensemble_chunks(labels, cfg.ensemble_size, cfg.seed)
    record["member_counts"] = [np.bincount(labels[m], minlength=2).tolist() for m in members]
    if any(min(c) == 0 for c in record["member_counts"]):  # a method's bug, never the data's
        raise AssertionError(
            f"balance {cfg.balance} left a member with one class: {record['member_counts']}"
        )
    if cfg.balance != "none":
        for i, c in enumerate(record["member_counts"]):
            who = f"member {i + 1}: " if len(members) > 1 else ""
            log(f"balance {cfg.balance}: {who}train {c[0]} NORMAL, {c[1]} PNEUMONIA")
    return BalancedTrain(images, labels, weights, members, image_key, record)


def seed_ensemble(balanced: BalancedTrain, k: int) -> BalancedTrain:
    """``--seed-ensemble K``: K members that all train on what the balance method gave the one
    member, differing only in their seed (head init, dropout, shuffling order, device
    augmentation: each drawn per member in pneumojax.run, pneumojax.train and
    pneumojax.batches)."""
    if k <= 1:
        return balanced
    if len(balanced.members) != 1:
        raise ValueError(
            "--seed-ensemble cannot be combined with --balance ensemble (its members already "
            "differ in their data); use one or the other"
        )
    record = {**balanced.record, "seed_ensemble": k}
    record["member_counts"] = record["member_counts"] * k
    return dataclasses.replace(balanced, members=balanced.members * k, record=record)
