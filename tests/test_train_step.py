"""The step on its own: ``train_step``, its member-batched form and ``predict_step`` on a toy
Flax module (no backbone, no mesh, no ``fit``), and the record a checkpoint keeps of a run."""

import functools
import json

import flax.linen as nn
import jax
import numpy as np
import optax

from pneumojax.runcheckpoints import EarlyStopping, Progress
from pneumojax.step import (
    create_train_state,
    predict_members_step,
    predict_step,
    train_members_step,
    train_step,
)


class Toy(nn.Module):
    """What the step must carry: BatchNorm statistics and dropout keys."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(2)(x)


def _members(k):
    model, tx = Toy(), optax.adam(1e-2)
    x = np.random.default_rng(0).normal(size=(k, 6, 3)).astype(np.float32)
    variables = [model.init(jax.random.key(i), x[0]) for i in range(k)]
    batch = {
        "image": x,
        "label": np.tile(np.array([0, 1, 0, 1, 1, 0], np.int32), (k, 1)),
        "weight": np.ones((k, 6), np.float32),
    }
    return model, tx, variables, batch


def _member(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def test_members_step_is_each_members_own_train_step():
    for k in (1, 2, 3):  # each member, unrolled in one step, is its own train step
        model, tx, variables, batch = _members(k)
        state = create_train_state(tx, variables)
        keys = jax.random.split(jax.random.key(0), k)
        new, metrics = jax.jit(functools.partial(train_members_step, model, tx))(state, batch, keys)
        assert new.step.tolist() == [1] * k
        alone = jax.jit(functools.partial(train_step, model, tx))
        for i in range(k):
            one, one_metrics = alone(_member(state, i), _member(batch, i), keys[i])
            for a, b in zip(
                jax.tree.leaves((one, one_metrics)), jax.tree.leaves(_member((new, metrics), i))
            ):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            for before, after in zip(
                jax.tree.leaves(_member((state.params, state.batch_stats), i)),
                jax.tree.leaves((one.params, one.batch_stats)),
            ):
                assert not np.array_equal(before, after)  # weights and statistics both move


def test_predict_members_step_stacks_each_members_predictions():
    model, _, variables, batch = _members(2)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *variables)
    logits = predict_members_step(model, stacked, batch["image"][0])
    assert logits.shape == (6, 2, 2)
    for i, v in enumerate(variables):
        np.testing.assert_allclose(
            logits[:, i], predict_step(model, v, batch["image"][0]), rtol=1e-6, atol=1e-6
        )


def test_early_stopping_is_per_member():
    stopping = EarlyStopping.start(2)
    assert stopping.update(1, [0.5, 0.7]).tolist() == [True, True]
    assert stopping.update(2, [0.6, 0.4]).tolist() == [False, True]
    assert (stopping.best_epoch, stopping.wait) == ([1, 2], [1, 0])
    assert stopping.stopped(1) == [True, False] and stopping.stopped(0) == [False, False]


def test_progress_record_keeps_the_flat_format_of_earlier_checkpoints():
    progress = Progress(stopping=EarlyStopping([0.5, 0.4], [1, 2], [1, 0]), steps_per_epoch=3)
    record = progress.to_json()
    assert list(record) == [
        "epoch",
        "batch",
        "sums",
        "history",
        "best_val_loss",
        "best_epoch",
        "wait",
        "stopped_early",
        "finished",
        "steps_per_epoch",
        "best_save",
        "member_sums",
    ]
    assert record["best_epoch"] == [1, 2] and record["wait"] == [1, 0]
    assert Progress.from_json(json.loads(json.dumps(record))) == progress
