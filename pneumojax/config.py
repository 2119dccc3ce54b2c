"""The options of ``pneumojax train`` in one place: the dataclass that a run saves as
config.json and that the CLI reads its defaults from. Imports nothing heavy, so the CLI can
build its options before JAX loads."""

from __future__ import annotations

import dataclasses

LR_SCHEDULES = ("keras-seed", "exponential", "constant")
BALANCE_METHODS = ("none", "class-weight", "undersample", "oversample", "ensemble")
RESIZE_METHODS = ("antialias", "keras")
PRECISIONS = ("auto", "float32", "bfloat16")  # --precision and --feature-cache-dtype


@dataclasses.dataclass
class FitOptions:
    """How :func:`pneumojax.train.fit` trains."""

    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_schedule: str = "keras-seed"
    patience: int = 5
    seed: int = 0
    log_every: int = 10  # host syncs for the progress bar every N steps, not every step


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
    device_augment: str = "none"  # pneumojax.augment: random transforms inside the step
    ensemble_size: int | None = None
    seed_ensemble: int = 1  # K members on the same train set, differing only in their seed
    tta: int = 0  # test-time augmentation: views per image (0: none); pneumojax.tta
    tta_augment: str | None = None  # the views' spec [default: device_augment, else light]

    def fit_options(self) -> FitOptions:
        return FitOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FitOptions)})
