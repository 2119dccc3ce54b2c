"""The options of ``pneumojax train``, as data below the command line.

Every train option is declared once here, with its type, range, default (from
:class:`pneumojax.config.TrainConfig`) and help; ``pneumojax.cli`` decorates its ``train``
command with :data:`TRAIN_OPTIONS`, and :mod:`pneumojax.experiments` checks experiment files
against :func:`train_parameters`, so the library never imports the command line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shlex

import click

from pneumojax.backbones import REGISTRY
from pneumojax.config import (
    BALANCE_METHODS,
    CALIBRATIONS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    RESIZE_METHODS,
    TrainConfig,
)
from pneumojax.intensity import INTENSITY_METHODS

BACKBONES = click.Choice(sorted(REGISTRY))
DTYPES = click.Choice(PRECISIONS)  # --precision, --feature-cache-dtype
DEFAULTS = TrainConfig()  # the one source of train's defaults


class _FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which every range comparison lets by)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number.", param, ctx)
        return rv


class _AugmentSpecType(click.ParamType):
    """--device-augment: checked here (a usage error, exit 2), kept as given; the run records
    it resolved (pneumojax.augment.parse_augment)."""

    name = "SPEC"

    def convert(self, value, param, ctx):
        from pneumojax.augment import AugmentSpecError, parse_augment  # noqa: PLC0415

        try:
            parse_augment(value)
        except AugmentSpecError as e:
            self.fail(f"{value!r}: {e}", param, ctx)
        return str(value).strip()


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
FRACTION = _FiniteRange(0.0, 1.0, max_open=True)  # of the images, carved off as a split

# The options of `pneumojax train`, in the order --help shows them.
TRAIN_OPTIONS = (
    click.option(
        "--config",
        "config_file",
        default=None,
        metavar="FILE",
        help="An experiment file (TOML, e.g. configs/densenet121.toml) that sets these options; "
        "options given here override it. --out defaults to runs/NAME (the experiment's name).",
    ),
    click.option(
        "--data",
        default=DEFAULTS.data,
        show_default=True,
        help="Kaggle folder (train/ val/ test/), flat NORMAL/ PNEUMONIA/ folder, or "
        "'demo' (synthetic images, no download).",
    ),
    click.option("--backbone", default=DEFAULTS.backbone, show_default=True, type=BACKBONES),
    click.option(
        "--cut", default=DEFAULTS.cut, help="Head input layer (Keras name) [default: per backbone]."
    ),
    click.option(
        "--weights",
        default=DEFAULTS.weights,
        show_default=True,
        help="imagenet (the ported checkpoint under checkpoints/), none (random init), "
        "or a checkpoint folder made by `pneumojax port`.",
    ),
    click.option(
        "--trainable",
        default=DEFAULTS.trainable,
        show_default=True,
        help="Backbone layers to train: START:END by Keras name or index (end exclusive, "
        "open ends allowed), comma-separated ranges, 'all', or 'none' (head only).",
    ),
    click.option("--image-size", default=DEFAULTS.image_size, show_default=True, type=POSITIVE),
    click.option(
        "--resize",
        default=DEFAULTS.resize,
        show_default=True,
        type=click.Choice(RESIZE_METHODS),
        help="antialias: PIL bilinear, averaging every source pixel when it downscales; "
        "keras: exactly the study's tf.image.resize (bilinear, no antialiasing). "
        "evaluate and predict resize as the run did.",
    ),
    click.option(
        "--intensity",
        default=DEFAULTS.intensity,
        show_default=True,
        type=click.Choice(INTENSITY_METHODS),
        help="Per-image grey-level normalisation inside the model, before the backbone's "
        "preprocessing: equalize (histogram equalisation, as cv2.equalizeHist), clahe (adaptive, "
        "as cv2.createCLAHE(2.0)) or standardize "
        "(zero mean, unit deviation). evaluate, predict and explain normalise as the run did.",
    ),
    click.option("--epochs", default=DEFAULTS.epochs, show_default=True, type=POSITIVE),
    click.option(
        "--batch-size",
        default=DEFAULTS.batch_size,
        show_default=True,
        type=POSITIVE,
        help="Global batch: a multiple of the number of devices.",
    ),
    click.option(
        "--lr",
        "learning_rate",
        default=DEFAULTS.learning_rate,
        show_default=True,
        type=_FiniteRange(min=0.0, min_open=True),
    ),
    click.option(
        "--lr-schedule",
        default=DEFAULTS.lr_schedule,
        show_default=True,
        type=click.Choice(LR_SCHEDULES),
        help="keras-seed: the study's compounding x0.85**epoch per epoch; warmup-cosine: per "
        "step, linear warmup from 0 to --lr, then cosine decay to 0 at the end of --epochs.",
    ),
    click.option(
        "--warmup-epochs",
        default=DEFAULTS.warmup_epochs,
        type=_FiniteRange(min=0.0),
        help="warmup-cosine's warmup, in epochs (a fraction is fine) [default: 1].",
    ),
    click.option(
        "--optimizer",
        default=DEFAULTS.optimizer,
        show_default=True,
        type=click.Choice(OPTIMIZERS),
        help="adam: Keras's Adam (the study's); adamw: the same with decoupled weight decay on "
        "kernels (not biases or BatchNorm).",
    ),
    click.option(
        "--weight-decay",
        default=DEFAULTS.weight_decay,
        type=_FiniteRange(min=0.0),
        help="adamw's decoupled weight decay (each step p -= lr * W * p) [default: 0.01].",
    ),
    click.option(
        "--label-smoothing",
        default=DEFAULTS.label_smoothing,
        show_default=True,
        type=_FiniteRange(0.0, 1.0, max_open=True),
        help="Training targets y(1-S)+S/2 for each sigmoid unit; validation loss stays unsmoothed.",
    ),
    click.option(
        "--clip-grad-norm",
        default=DEFAULTS.clip_grad_norm,
        type=_FiniteRange(min=0.0, min_open=True),
        help="Scale the trainable parameters' gradients to at most this global norm [default: off].",
    ),
    click.option(
        "--ema",
        default=DEFAULTS.ema,
        type=_FiniteRange(0.0, 1.0, min_open=True, max_open=True),
        metavar="DECAY",
        help="Keep an exponential moving average of the weights (e.g. 0.999); validation, early "
        "stopping, the best and the saved model use it [default: off].",
    ),
    click.option(
        "--calibrate",
        default=DEFAULTS.calibrate,
        show_default=True,
        type=click.Choice(CALIBRATIONS),
        help="temperature: after training, one temperature fitted on validation (log loss) "
        "scales the PNEUMONIA logit, written into the head; the threshold is chosen after it.",
    ),
    click.option(
        "--patience",
        default=DEFAULTS.patience,
        show_default=True,
        type=NON_NEGATIVE,
        help="Early stopping on validation loss (restores the best epoch); 0 = off.",
    ),
    click.option("--seed", default=DEFAULTS.seed, show_default=True, type=NON_NEGATIVE),
    click.option(
        "--target-recall",
        default=DEFAULTS.target_recall,
        show_default=True,
        type=_FiniteRange(0.0, 1.0, min_open=True),
        help="The threshold is the most specific one reaching this recall on validation.",
    ),
    click.option(
        "--val-fraction",
        default=DEFAULTS.val_fraction,
        show_default=True,
        type=_FiniteRange(0.0, 1.0, min_open=True, max_open=True),
        help="Share of the images carved off for validation, by patient and per class "
        "(from train/ + val/ in a Kaggle folder).",
    ),
    click.option(
        "--test-fraction",
        default=DEFAULTS.test_fraction,
        show_default=True,
        type=FRACTION,
        help="Flat NORMAL/ PNEUMONIA/ folder only: share carved off for test (a Kaggle "
        "folder's test/ is used as given).",
    ),
    click.option("--out", default=DEFAULTS.out, show_default=True, help="Run folder."),
    click.option(
        "--balance",
        default=DEFAULTS.balance,
        show_default=True,
        type=click.Choice(BALANCE_METHODS),
        help="Class-imbalance method, applied to the train split only.",
    ),
    click.option(
        "--augment",
        default=DEFAULTS.augment,
        show_default=True,
        help="Oversampling augmentation: preset 'cxr' or an albumentations file (A.save).",
    ),
    click.option(
        "--device-augment",
        default=DEFAULTS.device_augment,
        show_default=True,
        type=_AugmentSpecType(),
        help="Random augmentation of every training batch on the device, inside the jitted step "
        "(each sample its own draw from --seed and the step): none, light, strong, or items such "
        "as 'rotate=10,translate=0.08,scale=0.9:1.1,crop=0.8,gamma=0.2,contrast=0.2,"
        "brightness=0.2,noise=4,blur=1,sharpen=1' (hflip=P and fill=edge only when asked). Turns the feature "
        "cache off: the frozen part must see each augmented batch.",
    ),
    click.option(
        "--ensemble-size",
        default=DEFAULTS.ensemble_size,
        type=POSITIVE,
        help="Ensemble members K [default: round(majority / minority)].",
    ),
    click.option(
        "--seed-ensemble",
        default=DEFAULTS.seed_ensemble,
        show_default=True,
        type=POSITIVE,
        metavar="K",
        help="Train K members side by side on the same train set, differing only in their seed "
        "(head init, dropout, shuffling order); P(pneumonia) is their mean, thresholded once on "
        "validation. Not with --balance ensemble.",
    ),
    click.option(
        "--tta",
        default=DEFAULTS.tta,
        show_default=True,
        type=NON_NEGATIVE,
        metavar="N",
        help="Test-time augmentation: validation and test (and evaluate/predict later) average "
        "P(pneumonia) over N random views of each image; thresholds are chosen on the TTA "
        "validation probabilities. 0 = none.",
    ),
    click.option(
        "--tta-augment",
        default=DEFAULTS.tta_augment,
        type=_AugmentSpecType(),
        help="With --tta: the views' transforms, as --device-augment [default: --device-augment "
        "if given, else light].",
    ),
    click.option(
        "--precision",
        default=DEFAULTS.precision,
        show_default=True,
        type=DTYPES,
        help="bfloat16 = bfloat16 compute, float32 parameters and optimizer state; "
        "auto = bfloat16 on GPU/TPU, float32 on CPU.",
    ),
    click.option(
        "--distributed",
        is_flag=True,
        help="Call jax.distributed.initialize() first (multi-host; see README).",
    ),
    click.option(
        "--coordinator",
        default=None,
        help="With --distributed: host:port of process 0 "
        "[default: auto-detected on Cloud TPU / SLURM, or JAX_COORDINATOR_ADDRESS].",
    ),
    click.option("--num-processes", default=None, type=POSITIVE, help="With --distributed."),
    click.option("--process-id", default=None, type=NON_NEGATIVE, help="With --distributed."),
    click.option(
        "--strict",
        is_flag=True,
        help="Stop at the first unreadable image instead of skipping unreadable images with a warning.",
    ),
    click.option(
        "--feature-cache/--no-feature-cache",
        default=DEFAULTS.feature_cache,
        show_default=True,
        help="Compute the frozen part's activations once and train the rest on them.",
    ),
    click.option(
        "--feature-cache-dtype",
        default=DEFAULTS.feature_cache_dtype,
        show_default=True,
        type=DTYPES,
        help="How cached activations are stored. auto = as computed (training on them "
        "is identical to the full model); bfloat16 halves a float32 cache.",
    ),
    click.option(
        "--resume",
        is_flag=True,
        help="Continue the interrupted run in --out (its own config.json is used).",
    ),
    click.option("--overwrite", is_flag=True, help="Replace a run already in --out."),
    click.option("--dry-run", is_flag=True, help="Print the plan and exit without loading data."),
)


def train_options(fn):
    """Decorates ``fn`` with every option of :data:`TRAIN_OPTIONS`, in their order."""
    for option in reversed(TRAIN_OPTIONS):
        fn = option(fn)
    return fn


@functools.cache
def train_parameters() -> tuple[click.Parameter, ...]:
    """The train command's click parameters (names, types, ranges, choices), without the CLI."""
    return tuple(click.command()(train_options(lambda **_: None)).params)


@functools.cache
def config_options() -> dict:
    """The ``pneumojax train`` command's click parameters that are TrainConfig fields, in the
    command's order: the one definition of each option's type, range and choices."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {p.name: p for p in train_parameters() if p.name in fields}


def command_line(config: TrainConfig, always: tuple[str, ...] = ("backbone",)) -> str:
    """The ``pneumojax train ...`` line that reproduces ``config``: the options that differ
    from TrainConfig's defaults (and those in ``always``: the backbone, so that a line says
    what it trains), in the command's own order, shell-quoted."""
    defaults, parts = TrainConfig(), ["pneumojax", "train"]
    for f in dataclasses.fields(TrainConfig):
        if f.name not in config_options() and getattr(config, f.name) != getattr(defaults, f.name):
            raise ValueError(f"{f.name} is not a pneumojax train option: no line sets it")
    for name, param in config_options().items():
        value = getattr(config, name)
        if value == getattr(defaults, name) and name not in always:
            continue
        if param.is_flag:
            flag = param.opts[0] if value else (param.secondary_opts or [None])[0]
            if flag is None:
                raise ValueError(f"{name}={value!r} has no command-line form")
            parts.append(flag)
        elif value is None:
            raise ValueError(f"{name}=None has no command-line form (its default is not None)")
        else:
            parts += [
                param.opts[0],
                shlex.quote(repr(value) if isinstance(value, float) else str(value)),
            ]
    return " ".join(parts)
