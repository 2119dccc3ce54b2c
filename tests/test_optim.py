"""Optimisation options: AdamW (decoupled weight decay on kernels), the warmup-cosine schedule
(per step), label smoothing, gradient clipping and an EMA of the weights. Each lever against a
formula or a known case, then whole runs: the EMA copy is the one validated, saved and
re-scored, a run with every option resumes to exactly the uninterrupted run's end, and the
options at their defaults leave a run exactly as it was."""

import dataclasses
import functools
import json
import math
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from click.testing import CliRunner

from pneumojax.cli import main
from pneumojax.config import FitOptions, TrainConfig, resolve_optimisation
from pneumojax.optim import keras_adam, make_optimizer, step_learning_rates
from pneumojax.runcheckpoints import RunCheckpoints
from pneumojax.step import (
    EmaTrainState,
    create_train_state,
    evaluate_loss,
    loss_and_accuracy,
    predict_logits,
    train_step,
)
from pneumojax.train import Interrupted, fit

from conftest import TINY_CUT, TINY_MID, run_figures, tiny_train_args
from test_train_step import Toy
from test_train import MID, _tiny


def _params():
    """A parameter tree shaped like the classifier's: trainable and frozen backbone layers
    (a Conv kernel, BatchNorm scale and bias) and the head."""
    rng = np.random.default_rng(0)
    leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {
        "backbone": {
            "conv_t": {"kernel": leaf(3, 3, 2, 4)},
            "bn_t": {"scale": leaf(4), "bias": leaf(4)},
            "conv_f": {"kernel": leaf(3, 3, 2, 4)},
        },
        "dense": {"kernel": leaf(8, 4), "bias": leaf(4)},
    }


TRAINABLE = frozenset({"conv_t", "bn_t"})


def _leaves(tree):
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


# AdamW


def test_adamw_decays_trainable_kernels_only_and_otherwise_is_keras_adam():
    params, lr, wd = _params(), 1e-2, 0.5
    zero = jax.tree.map(jnp.zeros_like, params)
    adam = make_optimizer(params, TRAINABLE, lr)
    adamw = make_optimizer(params, TRAINABLE, lr, optimizer="adamw", weight_decay=wd)
    # A zero gradient: Adam stays put, AdamW shrinks each trainable kernel by lr * wd.
    still, _ = adam.update(zero, adam.init(params), params)
    assert all(not v.any() for v in _leaves(still).values())
    shrink, _ = adamw.update(zero, adamw.init(params), params)
    for name, u in _leaves(shrink).items():
        p = _leaves(params)[name]
        if name in ("['backbone']['conv_t']['kernel']", "['dense']['kernel']"):
            np.testing.assert_allclose(u, -lr * wd * p, rtol=1e-6)
        else:  # biases, BatchNorm scale and offset, the frozen kernel
            assert not u.any(), name
    # With a gradient, AdamW is Keras's Adam (its epsilon placement) plus the decay, each step.
    grads = jax.tree.map(lambda p: 1e-3 * jnp.sin(17 * p), params)
    sa, sw = adam.init(params), adamw.init(params)
    for _ in range(3):
        ua, sa = adam.update(grads, sa, params)
        uw, sw = adamw.update(grads, sw, params)
        decay = jax.tree.map(lambda a, w: w - a, ua, uw)
        np.testing.assert_allclose(
            _leaves(decay)["['dense']['kernel']"],
            -lr * wd * _leaves(params)["['dense']['kernel']"],
            rtol=0,
            atol=4e-9,  # the rounding of adam + decay at the step's size (lr * 1.2e-7)
        )
        np.testing.assert_array_equal(_leaves(decay)["['dense']['bias']"], 0)


def test_the_defaults_build_the_optimizer_runs_were_made_with():
    """Same optimizer state as before the options existed: checkpoints of earlier runs resume,
    and a default run trains exactly as it did."""
    params = _params()
    before = optax.multi_transform(
        {
            "train": optax.inject_hyperparams(keras_adam)(learning_rate=1e-3),
            "freeze": optax.set_to_zero(),
        },
        {
            "backbone": {
                "conv_t": {"kernel": "train"},
                "bn_t": {"scale": "train", "bias": "train"},
                "conv_f": {"kernel": "freeze"},
            },
            "dense": {"kernel": "train", "bias": "train"},
        },
    )
    now = make_optimizer(params, TRAINABLE, 1e-3)
    assert jax.tree_util.tree_structure(now.init(params)) == jax.tree_util.tree_structure(
        before.init(params)
    )
    grads = jax.tree.map(lambda p: 0.1 * p, params)
    a, _ = now.update(grads, now.init(params), params)
    b, _ = before.update(grads, before.init(params), params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


# Gradient clipping


def _mu(state):
    """Adam's first moment (trainable leaves) inside make_optimizer's state."""
    found = []
    jax.tree.map(
        lambda x: found.append(x.mu) if isinstance(x, optax.ScaleByAdamState) else None,
        state,
        is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState),
    )
    (mu,) = found
    return [v for v in jax.tree.leaves(mu)]


def test_clipping_bounds_the_trainable_gradients_global_norm():
    params, clip, b1 = _params(), 0.5, 0.9
    tx = make_optimizer(params, TRAINABLE, 1e-3, clip_grad_norm=clip)
    big = jax.tree.map(lambda p: 10.0 * p, params)
    norm = lambda leaves: float(np.sqrt(sum(np.sum(np.square(x)) for x in leaves)))  # noqa: E731
    _, state = tx.update(big, tx.init(params), params)
    # Adam's first moment after one step is (1 - b1) * the gradient it was given: clipped.
    assert norm(_mu(state)) == pytest.approx((1 - b1) * clip, rel=1e-5)
    unclipped = make_optimizer(params, TRAINABLE, 1e-3)
    _, free = unclipped.update(big, unclipped.init(params), params)
    assert norm(_mu(free)) > 10 * (1 - b1) * clip
    # The frozen kernel takes no part in the norm: a huge gradient there changes nothing.
    huge = {
        **big,
        "backbone": {
            **big["backbone"],
            "conv_f": {"kernel": 1e6 * params["backbone"]["conv_f"]["kernel"]},
        },
    }
    _, same = tx.update(huge, tx.init(params), params)
    for x, y in zip(_mu(state), _mu(same)):
        np.testing.assert_array_equal(x, y)
    # A gradient already within the bound goes through unchanged.
    small = jax.tree.map(lambda p: 1e-3 * p, params)
    _, a = tx.update(small, tx.init(params), params)
    _, b = unclipped.update(small, unclipped.init(params), params)
    for x, y in zip(_mu(a), _mu(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6)


# The warmup-cosine schedule


def _formula(s, lr, warmup, total):
    if s < warmup:
        return lr * s / warmup
    return lr * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize("warmup_epochs, warmup_steps", [(1.5, 8), (0.0, 0), (None, 5)])
def test_warmup_cosine_rates_are_the_formula_at_every_step(warmup_epochs, warmup_steps):
    opts = FitOptions(
        epochs=4, learning_rate=2e-3, lr_schedule="warmup-cosine", warmup_epochs=warmup_epochs
    )
    spe = 5  # steps per epoch; warmup 1.5 epochs = 7.5 -> 8 steps, None = 1 epoch
    rates = np.concatenate([step_learning_rates(opts, e, spe) for e in range(4)])
    expected = [_formula(s, 2e-3, warmup_steps, 20) for s in range(20)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6, atol=2e-3 * 1e-6)  # float32
    if warmup_steps:
        assert rates[0] == 0 and rates[warmup_steps] == pytest.approx(2e-3)
        assert np.all(np.diff(rates[: warmup_steps + 1]) > 0)
    assert np.all(np.diff(rates[warmup_steps:]) < 0) and rates[-1] < 2e-3 * 0.05


def _recording(steps):
    """Wraps ``steps.train`` to record the rate in the state each step receives."""
    seen = []
    train = steps.train

    def spy(state, batch, keys):
        found = []
        jax.tree.map(
            lambda x: (
                found.append(float(np.asarray(x.hyperparams["learning_rate"]).ravel()[0]))
                if isinstance(x, optax.InjectStatefulHyperparamsState)
                else None
            ),
            state.opt_state,
            is_leaf=lambda x: isinstance(x, optax.InjectStatefulHyperparamsState),
        )
        seen.extend(found)
        return train(state, batch, keys)

    steps.train = spy
    return seen


ALL = dict(clip=1.0, smoothing=0.1, ema=0.9)


def _steps_with_every_option(trainable=MID, lr=3e-3):

    steps, variables, layers, train, val = _tiny(trainable, lr=lr)
    tx = make_optimizer(
        variables["params"],
        layers,
        lr,
        optimizer="adamw",
        weight_decay=0.05,
        clip_grad_norm=ALL["clip"],
    )
    steps = dataclasses.replace(steps, tx=tx, label_smoothing=ALL["smoothing"], ema=ALL["ema"])
    return steps, variables, train, val


def test_fit_sets_the_scheduled_rate_before_every_step_and_a_resume_continues_it(tmp_path):
    """Every option on at once (AdamW, warmup-cosine, smoothing, clipping, EMA): the rate each
    step receives is the formula's, the history's lr is each epoch's first, and a run
    interrupted mid-epoch resumes to exactly the uninterrupted run's history and best weights."""
    opts = FitOptions(
        epochs=3,
        batch_size=8,
        patience=0,
        seed=4,
        learning_rate=3e-3,
        lr_schedule="warmup-cosine",
        warmup_epochs=1.0,
    )
    steps, variables, train, val = _steps_with_every_option()
    jitted = steps.train
    seen = _recording(steps)
    full, full_progress = fit(steps, variables, train, val, opts, tmp_path / "a")
    assert jitted._cache_size() == 1  # a new rate each step is a value, not a recompile
    spe = full_progress.steps_per_epoch  # 24 images / 8 = 3
    expected = [_formula(s, 3e-3, spe, 3 * spe) for s in range(3 * spe)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6, atol=3e-9)
    assert [r["lr"] for r in full_progress.history] == pytest.approx(expected[::spe], rel=1e-6)

    steps, variables, train, val = _steps_with_every_option()
    seen = _recording(steps)
    with pytest.raises(Interrupted, match="epoch 2, batch 2"):
        fit(steps, variables, train, val, opts, tmp_path / "b", stop_after_steps=spe + 2)
    del seen[:]
    resumed, progress = fit(steps, variables, train, val, opts, tmp_path / "b", resume=True)
    np.testing.assert_allclose(seen, expected[spe + 2 :], rtol=1e-6, atol=3e-9)
    assert progress.history == full_progress.history
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Label smoothing


def test_label_smoothing_moves_each_units_target_toward_one_half():
    logits = jnp.array([[0.3, 2.0], [-1.0, -0.5]])
    labels = jnp.array([1, 0])
    weights = jnp.ones(2)

    def bce(z, t):
        p = 1 / (1 + math.exp(-z))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    for s in (0.0, 0.1, 0.3):
        targets = [[s / 2, 1 - s / 2], [1 - s / 2, s / 2]]  # y (1 - s) + s / 2 per unit
        expected = np.mean(
            [
                np.mean([bce(float(z), t) for z, t in zip(row, tr)])
                for row, tr in zip(logits, targets)
            ]
        )
        loss, acc = loss_and_accuracy(logits, labels, weights, s)
        assert float(loss) == pytest.approx(expected, rel=1e-6)
        assert float(acc) == 1.0  # accuracy is about the predictions, not the targets
    plain, _ = loss_and_accuracy(logits, labels, weights)
    assert float(loss_and_accuracy(logits, labels, weights, 0.0)[0]) == float(plain)
    # Validation (early stopping) scores the plain loss.
    assert evaluate_loss(np.asarray(logits), np.asarray(labels))[0] == pytest.approx(float(plain))


def _toy():
    model, tx = Toy(), optax.adam(1e-1)
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    batch = {
        "image": x,
        "label": np.array([0, 1, 0, 1, 1, 0], np.int32),
        "weight": np.ones(6, np.float32),
    }
    return model, tx, variables, batch


def test_the_step_trains_on_the_smoothed_loss():
    model, tx, variables, batch = _toy()
    state = jax.tree.map(lambda a: a[0], create_train_state(tx, [variables]))
    key = jax.random.key(5)
    _, smoothed = train_step(model, tx, state, batch, key, label_smoothing=0.2)
    _, plain = train_step(model, tx, state, batch, key)
    logits, _ = model.apply(
        variables,
        batch["image"],
        train=True,
        rngs={"dropout": jax.random.fold_in(key, state.step)},
        mutable=["batch_stats"],
    )
    want, _ = loss_and_accuracy(logits, batch["label"], batch["weight"], 0.2)
    assert float(smoothed["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert float(smoothed["loss"]) != pytest.approx(float(plain["loss"]), rel=1e-3)


# The EMA


def test_ema_is_the_formula_after_each_step_and_starts_at_the_initial_weights():
    model, tx, variables, batch = _toy()
    plain_state = jax.tree.map(lambda a: a[0], create_train_state(tx, [variables]))
    state = jax.tree.map(lambda a: a[0], create_train_state(tx, [variables], ema=True))
    assert isinstance(state, EmaTrainState) and not isinstance(plain_state, EmaTrainState)
    step = jax.jit(functools.partial(train_step, model, tx, ema_decay=0.9))
    plain = jax.jit(functools.partial(train_step, model, tx))
    ema = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    for t in (1, 2, 3):
        state, _ = step(state, batch, jax.random.key(1))
        plain_state, _ = plain(plain_state, batch, jax.random.key(1))
        d = min(0.9, (1 + t) / (10 + t))
        now = {"params": state.params, "batch_stats": state.batch_stats}
        ema = jax.tree.map(lambda e, w: e + (1 - d) * (w - e), ema, now)
        for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(ema)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        # The average is a copy beside training: the trained weights are the plain step's.
        for a, b in zip(
            jax.tree.leaves((state.params, state.batch_stats)),
            jax.tree.leaves((plain_state.params, plain_state.batch_stats)),
        ):
            np.testing.assert_array_equal(a, b)
    moved = [
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(now))
    ]
    assert all(moved)  # BatchNorm statistics too


def test_fit_validates_and_keeps_the_ema_weights(tmp_path):
    """With --ema, early stopping's validation loss, the best weights and the checkpoints'
    ``best`` are the moving average, not the trained weights; frozen leaves stay exactly as
    they were; training itself (its losses) is the same as without the average."""

    opts = FitOptions(epochs=1, batch_size=8, patience=0, seed=1, learning_rate=1e-2)
    steps, variables, layers, train, val = _tiny(MID, lr=1e-2)
    [raw], raw_progress = fit(steps, variables, train, val, opts, tmp_path / "raw")
    ema_steps = dataclasses.replace(steps, ema=0.9)
    [best], progress = fit(ema_steps, variables, train, val, opts, tmp_path / "ema")
    assert [r["loss"] for r in progress.history] == [r["loss"] for r in raw_progress.history]
    # One epoch: the best weights are the ones after it. The trained ones equal the plain run's.
    ckpt = RunCheckpoints(tmp_path / "ema" / "checkpoints")
    state = ema_steps.init_state([variables])
    last, _ = ckpt.restore_last(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    ckpt.close()
    assert isinstance(last, EmaTrainState)
    trained = {"params": last.params, "batch_stats": last.batch_stats}
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(raw)):
        np.testing.assert_array_equal(np.asarray(a)[0], b)
    for a, b in zip(jax.tree.leaves(last.ema), jax.tree.leaves(best)):
        np.testing.assert_array_equal(np.asarray(a)[0], b)
    flat_best, flat_raw = _leaves(best), _leaves(raw)
    for name, v in _leaves(variables).items():
        keys = name.strip("[]'").split("']['")
        if keys[1] == "backbone" and keys[2] not in layers:
            np.testing.assert_array_equal(flat_best[name], v)  # frozen: exactly unchanged
        elif name.endswith("kernel']"):
            assert not np.array_equal(flat_best[name], flat_raw[name]), name
    # The validation loss recorded (and early-stopped on) is the average's.
    val_loss = lambda w: evaluate_loss(predict_logits(steps, w, val[0], 8), val[1])[0]  # noqa: E731
    assert progress.history[0]["val_loss"] == pytest.approx(val_loss(best), rel=1e-6)
    assert progress.history[0]["val_loss"] != pytest.approx(val_loss(raw), rel=1e-4)
    assert raw_progress.history[0]["val_loss"] == pytest.approx(val_loss(raw), rel=1e-6)


# Whole runs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from pneumojax.data import make_demo_dataset

    root = tmp_path_factory.mktemp("optim")
    return make_demo_dataset(root / "xray", n_per_class=30, image_size=40, seed=1)


EVERY_OPTION = [
    "--optimizer", "adamw",
    "--weight-decay", "0.05",
    "--lr-schedule", "warmup-cosine",
    "--warmup-epochs", "0.5",
    "--label-smoothing", "0.1",
    "--clip-grad-norm", "1.0",
    "--ema", "0.9",
    "--lr", "0.003",
    "--patience", "0",
]  # fmt: skip


def test_the_saved_model_is_the_ema_copy_and_rescores_exactly(demo, tmp_path, monkeypatch):
    from pneumojax.checkpoint import load_variables
    from pneumojax.features import suffix_variables

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    r = CliRunner().invoke(main, tiny_train_args(demo, run, "--ema", "0.9", epochs=1))
    assert r.exit_code == 0, r.output
    assert "optimisation: EMA of the weights, decay 0.9" in r.output
    config = json.loads((run / "config.json").read_text())
    assert config["ema"] == 0.9 and config["optimizer"] == "adam"
    saved, _ = load_variables(run / "model")
    ckpt = RunCheckpoints(run / "checkpoints")
    raw = ckpt.last.restore(ckpt.last.latest_step())["state"]
    ckpt.close()
    ema = jax.tree.map(np.asarray, raw["ema"])
    trained = jax.tree.map(np.asarray, {"params": raw["params"], "batch_stats": raw["batch_stats"]})
    mine = suffix_variables(saved, ema)  # the head (the cached prefix is frozen)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(trained))
    )
    r = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--split", "test"])
    assert r.exit_code == 0, r.output
    again = json.loads((run / "eval-test" / "metrics.json").read_text())
    trained_metrics = json.loads((run / "metrics.json").read_text())
    for key in ("threshold", "confusion_matrix", "auc"):
        assert again[key] == trained_metrics[key], key


@pytest.mark.slow
def test_a_run_with_every_option_resumes_to_the_same_end(demo, tmp_path, monkeypatch):
    from pneumojax.checkpoint import load_variables
    from pneumojax.run import train_run

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    ref = tmp_path / "ref"
    r = CliRunner().invoke(main, tiny_train_args(demo, ref, *EVERY_OPTION, trainable=TINY_MID))
    assert r.exit_code == 0, r.output
    assert "optimisation: adamw (weight decay 0.05 on kernels); warmup-cosine" in r.output
    config = json.loads((ref / "config.json").read_text())
    assert config["optimizer"] == "adamw" and config["weight_decay"] == 0.05
    assert config["lr_schedule"] == "warmup-cosine" and config["warmup_epochs"] == 0.5
    assert config["label_smoothing"] == 0.1 and config["clip_grad_norm"] == 1.0
    assert config["ema"] == 0.9
    lrs = [json.loads(line)["lr"] for line in (ref / "history.jsonl").read_text().splitlines()]
    assert lrs[0] == 0.0 and 0 < lrs[1] < 0.003

    run = tmp_path / "run"
    cfg = TrainConfig(
        data=str(demo),
        weights="none",
        cut=TINY_CUT,
        trainable=TINY_MID,
        image_size=32,
        batch_size=8,
        epochs=2,
        patience=0,
        learning_rate=0.003,
        optimizer="adamw",
        weight_decay=0.05,
        lr_schedule="warmup-cosine",
        warmup_epochs=0.5,
        label_smoothing=0.1,
        clip_grad_norm=1.0,
        ema=0.9,
        out=str(run),
    )
    with pytest.raises(Interrupted, match="epoch 1, batch 3;"):
        train_run(cfg, log=lambda line: None, stop_after_steps=3)
    resumed = CliRunner().invoke(main, ["train", "--out", str(run), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at epoch 1, batch 3" in resumed.output
    assert run_figures(run) == run_figures(ref)
    a, _ = load_variables(ref / "model")
    b, _ = load_variables(run / "model")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_the_options_at_their_defaults_leave_a_run_exactly_as_it_was(demo, tmp_path, monkeypatch):
    from pneumojax.checkpoint import load_variables

    monkeypatch.setenv("PNEUMOJAX_CACHE", str(tmp_path / "cache"))
    defaults = [
        "--optimizer", "adam",
        "--weight-decay", "0",
        "--lr-schedule", "keras-seed",
        "--label-smoothing", "0",
    ]  # fmt: skip
    runs = {}
    for name, extra in (("plain", []), ("defaults", defaults)):
        r = CliRunner().invoke(main, tiny_train_args(demo, tmp_path / name, *extra))
        assert r.exit_code == 0, r.output
        assert "optimisation:" not in r.output
        runs[name] = tmp_path / name
    assert run_figures(runs["plain"]) == run_figures(runs["defaults"])
    a, _ = load_variables(runs["plain"] / "model")
    b, _ = load_variables(runs["defaults"] / "model")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    config = json.loads((runs["plain"] / "config.json").read_text())
    assert config["optimizer"] == "adam" and config["weight_decay"] is None
    assert config["ema"] is None and config["clip_grad_norm"] is None
    assert config["warmup_epochs"] is None
    assert not {"weight_decay", "warmup_epochs"} & set(config["requested"])
    ckpt = RunCheckpoints(runs["plain"] / "checkpoints")
    state = ckpt.last.restore(ckpt.last.latest_step())["state"]
    ckpt.close()
    assert set(state) == {"step", "params", "batch_stats", "opt_state"}  # no EMA in the state


# Options: the command line, experiment files, config.json


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weight-decay", "0.1"], "--weight-decay needs --optimizer adamw"),
        (["--warmup-epochs", "1"], "--warmup-epochs needs --lr-schedule warmup-cosine"),
        (["--lr-schedule", "warmup-cosine", "--warmup-epochs", "2"], "leaves nothing of the 2"),
        (["--ema", "1"], "--ema"),
        (["--label-smoothing", "1"], "--label-smoothing"),
        (["--clip-grad-norm", "0"], "--clip-grad-norm"),
        (["--optimizer", "sgd"], "--optimizer"),
    ],
)
def test_options_that_mean_nothing_are_usage_errors(extra, message):
    r = CliRunner().invoke(main, ["train", "--epochs", "2", *extra, "--dry-run"])
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_the_options_are_experiment_keys_and_resolve_into_config(tmp_path):
    from pneumojax.cli.training import train
    from pneumojax.experiments import (
        ExperimentError,
        check_options,
        command_line,
        load_experiment,
        resolve_options,
    )

    (tmp_path / "recipe.toml").write_text(
        'backbone = "densenet121"\noptimizer = "adamw"\nlr_schedule = "warmup-cosine"\n'
        "label_smoothing = 0.1\nclip_grad_norm = 1\nema = 0.999\n"
    )
    cfg = resolve_options(load_experiment(tmp_path / "recipe.toml"))
    assert (cfg.optimizer, cfg.label_smoothing, cfg.clip_grad_norm, cfg.ema) == (
        "adamw",
        0.1,
        1.0,
        0.999,
    )
    resolved = resolve_optimisation(cfg)
    assert resolved.weight_decay == 0.01 and resolved.warmup_epochs == 1.0
    # A study report's command line gives them back.
    line = command_line(resolved)
    assert "--optimizer adamw --weight-decay 0.01" in line and "--ema 0.999" in line
    params = train.make_context("train", shlex.split(line)[2:]).params
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name in params]
    again = TrainConfig(**{name: params[name] for name in names})
    assert again == resolved
    for bad, message in (
        ({"optimizer": "sgd"}, "optimizer"),
        ({"ema": 1.5}, "ema"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"label_smoothing": "0.1"}, "label_smoothing must be a number"),
    ):
        with pytest.raises(ExperimentError, match=message):
            check_options(bad, "x.toml")
