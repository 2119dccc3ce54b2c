"""The options of ``pneumojax train`` in one place: the dataclass that a run saves as
config.json and that the CLI reads its defaults from. Imports nothing heavy, so the CLI can
build its options before JAX loads."""

from __future__ import annotations

import dataclasses

LR_SCHEDULES = ("keras-seed", "exponential", "constant", "warmup-cosine")
OPTIMIZERS = ("adam", "adamw")
BALANCE_METHODS = ("none", "class-weight", "undersample", "oversample", "ensemble")
RESIZE_METHODS = ("antialias", "keras")
PRECISIONS = ("auto", "float32", "bfloat16")  # --precision and --feature-cache-dtype
CALIBRATIONS = ("none", "temperature")


@dataclasses.dataclass
class FitOptions:
    """How :func:`pneumojax.train.fit` trains."""

    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_schedule: str = "keras-seed"
    warmup_epochs: float | None = None  # warmup-cosine only; None: WARMUP_EPOCHS
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
    intensity: str = "none"  # pneumojax.intensity: per-image normalisation inside the model
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
    # Optimisation (pneumojax.model.make_optimizer, pneumojax.step.train_step): the defaults
    # are the study's Keras Adam, unsmoothed targets, no clipping and no EMA.
    optimizer: str = "adam"
    weight_decay: float | None = None  # adamw only; None: ADAMW_WEIGHT_DECAY
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None
    ema: float | None = None  # the decay of the weights' moving average; None: off
    calibrate: str = "none"  # temperature: pneumojax.calibration, fitted on validation

    def fit_options(self) -> FitOptions:
        return FitOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FitOptions)})


ADAMW_WEIGHT_DECAY = 0.01  # --weight-decay under --optimizer adamw when not given (PyTorch's)
WARMUP_EPOCHS = 1.0  # --warmup-epochs under --lr-schedule warmup-cosine when not given


def resolve_optimisation(opts):
    """``opts`` (a TrainConfig or FitOptions) with the defaults that depend on another option
    filled in: ``weight_decay`` under adamw, ``warmup_epochs`` under warmup-cosine. Raises
    ValueError, naming the options, where one option means nothing without another."""
    values = {}
    optimizer = getattr(opts, "optimizer", None)  # FitOptions have no optimizer options
    if optimizer == "adam" and opts.weight_decay:
        raise ValueError(
            "--weight-decay needs --optimizer adamw (decoupled decay; Adam takes none)"
        )
    if optimizer == "adamw" and opts.weight_decay is None:
        values["weight_decay"] = ADAMW_WEIGHT_DECAY
    if opts.lr_schedule == "warmup-cosine":
        warmup = WARMUP_EPOCHS if opts.warmup_epochs is None else opts.warmup_epochs
        if warmup >= opts.epochs:
            raise ValueError(
                f"--warmup-epochs {warmup:g} leaves nothing of the {opts.epochs} epochs to "
                "decay over: give fewer warmup epochs (a fraction is fine) or more --epochs"
            )
        values["warmup_epochs"] = float(warmup)
    elif opts.warmup_epochs:
        raise ValueError("--warmup-epochs needs --lr-schedule warmup-cosine")
    return dataclasses.replace(opts, **values)


def optimisation_summary(cfg) -> str | None:
    """One log line for the optimisation options that differ from the study's; None if none."""
    parts = []
    if cfg.optimizer != "adam":
        parts.append(f"{cfg.optimizer} (weight decay {cfg.weight_decay:g} on kernels)")
    if cfg.lr_schedule == "warmup-cosine":
        parts.append(f"warmup-cosine learning rate ({cfg.warmup_epochs:g} warmup epochs, per step)")
    if cfg.label_smoothing:
        parts.append(f"label smoothing {cfg.label_smoothing:g} (training loss only)")
    if cfg.clip_grad_norm is not None:
        parts.append(f"gradients clipped to global norm {cfg.clip_grad_norm:g}")
    if cfg.ema is not None:
        parts.append(
            f"EMA of the weights, decay {cfg.ema:g} (validation, early stopping, the best "
            "and saved model use the average)"
        )
    return "optimisation: " + "; ".join(parts) if parts else None
