"""The optimisers and learning-rate schedules: Keras's Adam and AdamW exactly
(``scale_by_keras_adam``: Keras's epsilon placement), the frozen layers masked out with
``optax.multi_transform`` (``make_optimizer``: the ``train``/``freeze`` labels of
:func:`pneumojax.model.trainable_labels`, AdamW's decay mask, gradient clipping), and the
schedules (``epoch_lr_factor``: the study's compounding 0.85 per epoch and the others set once
an epoch; ``step_learning_rates``: warmup-cosine per step), and the rate set in a running
optimizer's state (``set_learning_rate``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pneumojax.config import ADAMW_WEIGHT_DECAY, LR_SCHEDULES, FitOptions, resolve_optimisation
from pneumojax.model import trainable_labels


def scale_by_keras_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
    """Adam's direction as ``keras.optimizers.Adam`` computes it.

    Keras bias-corrects the step, ``sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`` with
    the uncorrected ``v``; optax adds ``eps`` to the corrected ``sqrt(v_hat)``, an epsilon
    ``sqrt(1 - b2^t)`` times Keras's (32x smaller at step 1), so gradients below ~3e-6 moved
    nearly a full step where Keras moves them a fraction of one
    (tests/test_keras_training_oracle.py). Same state as ``optax.scale_by_adam``.
    """

    def update(grads, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: m + (g - m) * (1 - b1), grads, state.mu)
        nu = jax.tree.map(lambda g, v: v + (g * g - v) * (1 - b2), grads, state.nu)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        alpha = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        return (
            jax.tree.map(lambda m, v: m * alpha / (jnp.sqrt(v) + eps), mu, nu),
            optax.ScaleByAdamState(count=count, mu=mu, nu=nu),
        )

    return optax.GradientTransformation(optax.scale_by_adam(b1, b2, eps).init, update)


def keras_adam(
    learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
    """``keras.optimizers.Adam`` with its defaults (epsilon 1e-7, where Keras adds it)."""
    return optax.chain(
        scale_by_keras_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate)
    )


def keras_adamw(
    learning_rate,
    weight_decay: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-7,
    mask=None,
) -> optax.GradientTransformation:
    """AdamW: :func:`keras_adam`'s direction plus decoupled weight decay, both scaled by the
    rate, as ``optax.adamw`` chains them (and ``keras.optimizers.AdamW`` and PyTorch apply it):
    ``p <- p - lr * (adam(g) + weight_decay * p)``, on the leaves ``mask(params)`` marks."""
    return optax.chain(
        scale_by_keras_adam(b1, b2, eps),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def decayed_leaves(params) -> Any:
    """AdamW's rule: weight decay on kernels (Dense and Conv weights) only; biases and
    BatchNorm's scale and offset are not decayed (BatchNorm statistics are not parameters)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_optimizer(
    params: dict,
    trainable: frozenset[str],
    learning_rate,
    optimizer: str = "adam",
    weight_decay: float | None = None,
    clip_grad_norm: float | None = None,
) -> optax.GradientTransformation:
    """Keras's Adam (or AdamW, :func:`keras_adamw`) on trainable leaves, zero updates on
    frozen ones; with ``clip_grad_norm``, the trainable leaves' gradients are first scaled
    to at most that global norm (``optax.clip_by_global_norm``; frozen leaves take no part:
    ``multi_transform`` hands the train branch only its own leaves).

    The rate lives in the optimizer state (``inject_hyperparams``) so a schedule changes a
    value, not the compiled step. The defaults build exactly the optimizer (and state) of
    runs made before these options existed, so their checkpoints still resume.
    """
    if optimizer == "adam":
        if weight_decay:
            raise ValueError("weight decay needs the adamw optimizer")
        train = optax.inject_hyperparams(keras_adam)(learning_rate=learning_rate)
    elif optimizer == "adamw":
        # The mask in a closure (inject_hyperparams would take a callable for a schedule);
        # b1, b2 and eps injected, as for adam, so both compute them in float32 alike.
        def adamw(learning_rate, weight_decay, b1=0.9, b2=0.999, eps=1e-7):
            return keras_adamw(learning_rate, weight_decay, b1, b2, eps, mask=decayed_leaves)

        train = optax.inject_hyperparams(adamw)(
            learning_rate=learning_rate,
            weight_decay=ADAMW_WEIGHT_DECAY if weight_decay is None else weight_decay,
        )
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose adam or adamw")
    if clip_grad_norm is not None:
        train = optax.chain(optax.clip_by_global_norm(clip_grad_norm), train)
    return optax.multi_transform(
        {"train": train, "freeze": optax.set_to_zero()}, trainable_labels(params, trainable)
    )


def epoch_lr_factor(kind: str, epoch) -> Any:
    """Learning-rate factor for a 0-based epoch.

    ``keras-seed`` is the study's ``LearningRateScheduler(lambda e, lr: lr * 0.85 ** e)``:
    it multiplies the *current* rate, so the factor compounds to 0.85 ** (e (e + 1) / 2).
    """
    if kind == "keras-seed":
        return 0.85 ** (epoch * (epoch + 1) / 2)
    if kind == "exponential":
        return 0.85**epoch
    if kind == "constant":
        return 1.0 + 0 * epoch
    if kind in STEP_SCHEDULES:
        raise ValueError(f"--lr-schedule {kind} sets the rate per step: see step_learning_rates")
    raise ValueError(f"unknown --lr-schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}")


STEP_SCHEDULES = ("warmup-cosine",)  # the rest of LR_SCHEDULES set the rate once per epoch


def step_learning_rates(opts: FitOptions, epoch: int, steps_per_epoch: int) -> np.ndarray:
    """The rate of every step of a 0-based ``epoch`` under a per-step schedule.

    ``warmup-cosine`` is ``optax.warmup_cosine_decay_schedule`` over the planned run, at the
    0-based global step s (the number of steps before this one), T = epochs x steps per epoch,
    W = round(warmup_epochs x steps per epoch): ``lr * s / W`` while s < W, then
    ``lr * (1 + cos(pi (s - W) / (T - W))) / 2``. It is planned over ``--epochs``: early
    stopping ends a run where it is on that curve, and a resumed run (the rate is a function
    of s alone) takes the rates an uninterrupted one would have taken.
    """
    opts = resolve_optimisation(opts)
    if opts.lr_schedule != "warmup-cosine":
        raise ValueError(f"--lr-schedule {opts.lr_schedule} sets the rate once per epoch")
    total = opts.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opts.learning_rate,
        warmup_steps=round(opts.warmup_epochs * steps_per_epoch),
        decay_steps=total,
        end_value=0.0,
    )
    steps = np.arange(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
    return np.asarray(jax.device_get(jax.vmap(schedule)(steps)), np.float64)


def epoch_learning_rates(
    opts: FitOptions, epoch: int, steps_per_epoch: int
) -> tuple[float, np.ndarray | None]:
    """The rate of a 0-based ``epoch``'s first step, and under a per-step schedule the rate of
    every step (None where the rate is set once for the epoch)."""
    if opts.lr_schedule in STEP_SCHEDULES:
        rates = step_learning_rates(opts, epoch, steps_per_epoch)
        return float(rates[0]), rates
    return opts.learning_rate * epoch_lr_factor(opts.lr_schedule, epoch), None


_HYPERPARAM_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def set_learning_rate(state, lr: float):
    """A train state with the rate set inside its ``inject_hyperparams`` state: a value, not a
    recompile."""

    def visit(x):
        if isinstance(x, _HYPERPARAM_STATES):
            hp = dict(x.hyperparams)
            old = jnp.asarray(hp["learning_rate"])
            # Same sharding as before, or the step would see a new input type and recompile.
            hp["learning_rate"] = jax.device_put(jnp.full(old.shape, lr, old.dtype), old.sharding)
            return x._replace(hyperparams=hp)
        return x

    opt_state = jax.tree.map(
        visit, state.opt_state, is_leaf=lambda x: isinstance(x, _HYPERPARAM_STATES)
    )
    return state.replace(opt_state=opt_state)
