"""The train step as pure functions, and the one place that jits them over a device mesh.

As in Flax's ImageNet example: ``train_step`` (one member), ``train_members_step`` (K members
side by side, vmapped), ``predict_step`` / ``predict_members_step`` and ``create_train_state``
are module-level functions of their arguments; :class:`Steps` jits them once over the mesh
(``make_mesh``: every device of every host on one ``data`` axis), shards each batch along it
and keeps the state replicated, so the same step runs on 1 CPU, 8 GPUs or several hosts.
``fit`` (:mod:`pneumojax.train`) is the loop that drives them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from pneumojax.augment import AugmentSpec, augment
from pneumojax.model import Classifier, pneumonia_probability
from pneumojax.progress import progress_bar


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@flax.struct.dataclass
class EmaTrainState(TrainState):
    """A :class:`TrainState` that also keeps ``ema``, the exponential moving average of the
    weights (``params`` and ``batch_stats``), updated by every step (``--ema``). A subclass
    rather than an optional field, so a run without EMA saves and restores exactly the state
    it did before (and older checkpoints still resume)."""

    ema: Any


def make_mesh() -> jax.sharding.Mesh:
    """All devices of all hosts on one ``data`` axis (XLA partitions the step: Auto axes)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def loss_and_accuracy(logits, labels, weights, label_smoothing: float = 0.0):
    """The study's binary cross-entropy on one-hot labels (two sigmoid units), weighted.

    ``label_smoothing`` s moves each unit's binary target toward 1/2, ``y (1 - s) + s / 2``
    (Keras's ``BinaryCrossentropy(label_smoothing=s)``; for two classes the same as
    ``optax.smooth_labels``): the PNEUMONIA unit's target becomes 1 - s/2 or s/2. Only the
    training loss is smoothed; validation (early stopping) scores the plain loss."""
    onehot = jax.nn.one_hot(labels, 2)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    per_example = optax.sigmoid_binary_cross_entropy(logits, onehot).mean(-1)
    correct = ((pneumonia_probability(logits) >= 0.5) == (labels == 1)).astype(jnp.float32)
    # Keras's reduction: the weighted sum over the batch size (not over the weights' sum), so
    # class weights scale the gradient exactly as they do in the study.
    loss = (per_example * weights).sum() / weights.shape[-1]
    return loss, (correct * weights).sum() / jnp.maximum(weights.sum(), 1e-12)


# The step: pure functions of the model, the optimizer and arrays, testable without a mesh.


# Augmentation's keys: the member's key folded with this stream, then the step number (dropout
# folds the step alone), so the default step draws exactly what it drew before augmentation.
AUGMENT_STREAM = 0x617567


def train_step(
    model: Classifier,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: dict,
    key: jax.Array,
    augment_spec: AugmentSpec | None = None,
    label_smoothing: float = 0.0,
    ema_decay: float | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer step of one member on ``batch`` (``image``: images or cached activations,
    ``label``, ``weight``); returns the new state and the batch's ``loss`` and ``accuracy``
    (the loss with ``label_smoothing``, see :func:`loss_and_accuracy`).

    Dropout draws from ``key`` folded with the state's step number, so a resumed run draws
    what an uninterrupted one would have drawn. ``augment_spec`` (not the identity) transforms
    the images first (:func:`pneumojax.augment.augment`), drawing from ``key`` and the step
    number too; with none, the step is exactly the plain one. With ``ema_decay`` (the state an
    :class:`EmaTrainState`) the step also moves the average: :func:`ema_update`."""
    images = batch["image"]
    if augment_spec is not None and not augment_spec.identity:
        if isinstance(images, dict):
            raise ValueError(
                "device augmentation needs the images, not cached activations: the frozen "
                "prefix must see each augmented batch (train without the feature cache)"
            )
        aug_key = jax.random.fold_in(jax.random.fold_in(key, AUGMENT_STREAM), state.step)
        images = augment(aug_key, images, augment_spec)
    key = jax.random.fold_in(key, state.step)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        loss, acc = loss_and_accuracy(logits, batch["label"], batch["weight"], label_smoothing)
        return loss, (acc, updates.get("batch_stats", state.batch_stats))

    (loss, (acc, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    if ema_decay is not None:
        trained = {"params": new.params, "batch_stats": new.batch_stats}
        new = new.replace(ema=ema_update(new.ema, trained, new.step, ema_decay))
    return new, {"loss": loss, "accuracy": acc}


def ema_update(ema, weights, step, decay: float):
    """The moving average after optimizer step ``step`` (1-based): ``ema + (1 - d) (w - ema)``
    with ``d = min(decay, (1 + step) / (10 + step))``, TensorFlow's
    ``ExponentialMovingAverage(decay, num_updates)``: the early average follows the weights
    rather than staying at the initial ones. It starts at the initial weights (not at zero,
    as ``optax.ema``, whose debiasing would move every leaf by a rounding error), so a leaf
    the step leaves unchanged (frozen layers) keeps its value exactly."""
    t = jnp.asarray(step, jnp.float32)
    d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, w: e + ((1.0 - d) * (w - e)).astype(e.dtype), ema, weights)


def train_members_step(
    model: Classifier,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: dict,
    keys: jax.Array,
    augment_spec: AugmentSpec | None = None,
    label_smoothing: float = 0.0,
    ema_decay: float | None = None,
) -> tuple[TrainState, dict]:
    """:func:`train_step` for K members side by side: the state, the batch and the metrics
    carry a leading member axis, ``keys`` holds one key per member (each member its own
    augmentation draw).

    K = 1 for a plain run, K > 1 for an ensemble whose members differ only in what they
    train on. The members are unrolled in the one jitted step, not vmapped: vmap batches a
    convolution over stacked kernels as one grouped convolution, which XLA:CPU runs far slower
    than K plain ones (two DenseNet121 members, every layer trained, 64 px, batch 32: 1.45 s
    a step vmapped, 1.07 s unrolled); compiling takes longer (37 -> 60 s), once per run."""
    step = functools.partial(
        train_step,
        model,
        tx,
        augment_spec=augment_spec,
        label_smoothing=label_smoothing,
        ema_decay=ema_decay,
    )
    outs = [step(_member_of(state, i), _member_of(batch, i), keys[i]) for i in range(keys.shape[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _member_of(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def predict_step(model: Classifier, variables: dict, images) -> jax.Array:
    """Logits of one model in inference mode: (batch, 2)."""
    return model.apply(variables, images, train=False)


def predict_members_step(model: Classifier, member_variables: dict, images) -> jax.Array:
    """Logits of every member (variables stacked on a leading axis), batch first:
    (batch, members, 2). Unrolled over the members, as :func:`train_members_step`."""
    k = jax.tree.leaves(member_variables)[0].shape[0]
    logits = [predict_step(model, _member_of(member_variables, i), images) for i in range(k)]
    return jnp.stack(logits, axis=1)


def create_train_state(
    tx: optax.GradientTransformation, member_variables: list[dict], ema: bool = False
) -> TrainState:
    """The members' variables stacked on a leading axis, with their optimizer states; with
    ``ema``, an :class:`EmaTrainState` whose average starts at these variables."""
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *member_variables)
    params, batch_stats = stacked["params"], stacked.get("batch_stats", {})
    k = len(member_variables)
    state = TrainState(jnp.zeros((k,), jnp.int32), params, batch_stats, jax.vmap(tx.init)(params))
    if not ema:
        return state
    copy = jax.tree.map(np.copy, {"params": params, "batch_stats": batch_stats})
    return EmaTrainState(state.step, params, batch_stats, state.opt_state, copy)


@dataclasses.dataclass
class Steps:
    """The steps above, jitted once for one model, optimizer and mesh, with the shardings
    that place their inputs: the state replicated, batches split over the ``data`` axis.

    ``train`` is the jitted :func:`train_members_step` (it donates the state), augmenting each
    batch as ``augment`` says (None: not at all), smoothing the training targets by
    ``label_smoothing`` and keeping a moving average of the weights with decay ``ema`` (None:
    none; validation and the best weights then use the average); ``map`` runs
    any ``fn(variables, batch)``, such as ``predict`` or ``predict_members``, over inputs in
    fixed-size batches, jitting each ``fn`` once (``_jitted``).
    """

    model: Classifier
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    augment: AugmentSpec | None = None
    label_smoothing: float = 0.0
    ema: float | None = None

    def __post_init__(self):
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.member_batch_sharding = NamedSharding(self.mesh, P(None, "data"))
        self.train = jax.jit(
            functools.partial(
                train_members_step,
                self.model,
                self.tx,
                augment_spec=self.augment,
                label_smoothing=self.label_smoothing,
                ema_decay=self.ema,
            ),
            donate_argnums=0,
            in_shardings=(self.replicated, self.member_batch_sharding, self.replicated),
            out_shardings=(self.replicated, self.replicated),
        )
        self.predict = functools.partial(predict_step, self.model)
        self.predict_members = functools.partial(predict_members_step, self.model)
        self._jitted = {}

    def init_state(self, member_variables: list[dict]) -> TrainState:
        """:func:`create_train_state`, replicated over the mesh."""
        state = create_train_state(self.tx, member_variables, ema=self.ema is not None)
        return jax.device_put(state, self.replicated)

    def shard(self, batch, members: bool = False):
        """Places a global batch on the mesh. On several hosts each host passes the same
        global batch and contributes only its own slice of the batch axis."""
        sharding = self.member_batch_sharding if members else self.batch_sharding
        if jax.process_count() == 1:
            return jax.device_put(batch, sharding)
        axis = 1 if members else 0
        pid, count = jax.process_index(), jax.process_count()

        def local(a):
            n = a.shape[axis] // count
            return jax.make_array_from_process_local_data(
                sharding, np.take(a, np.arange(pid * n, (pid + 1) * n), axis=axis)
            )

        return jax.tree.map(local, batch)

    def map(self, fn, variables, inputs, batch_size: int, sink, desc: str | None = None):
        """Runs ``fn(variables, batch)`` over ``inputs`` (an array or a dict of arrays) in
        fixed-size sharded batches, the last one padded, so it compiles once; hands each
        result to ``sink(start, stop, outputs)`` as numpy. On several hosts the outputs are
        gathered to every host inside the step (a host can read only a replicated array)."""
        if fn not in self._jitted:
            self._jitted[fn] = jax.jit(
                fn,
                in_shardings=(self.replicated, self.batch_sharding),
                out_shardings=self.batch_sharding if jax.process_count() == 1 else self.replicated,
            )
        jitted = self._jitted[fn]
        variables = jax.device_put(variables, self.replicated)
        n = len(jax.tree.leaves(inputs)[0])
        for start in progress_bar(
            range(0, n, batch_size), desc=desc, unit="batch", leave=False, disable=desc is None
        ):
            stop = min(start + batch_size, n)
            batch = jax.tree.map(lambda a: _padded(a[start:stop], batch_size), inputs)
            out = jitted(variables, self.shard(batch))
            sink(start, stop, jax.tree.map(lambda o: np.asarray(o)[: stop - start], out))


def _padded(chunk, size: int) -> np.ndarray:
    chunk = np.asarray(chunk)
    if len(chunk) < size:
        pad = np.zeros((size - len(chunk),) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
    return chunk


def predict_logits(
    steps: Steps, variables, inputs, batch_size: int, desc: str | None = None
) -> np.ndarray:
    """Logits for every input (images, or cached activations for a suffix model)."""
    out = np.zeros((len(jax.tree.leaves(inputs)[0]), 2), np.float32)

    def sink(start, stop, logits):
        out[start:stop] = logits

    steps.map(steps.predict, variables, inputs, batch_size, sink, desc)
    return out


def member_logits(
    steps: Steps, member_variables, inputs, batch_size: int, desc: str | None = None
) -> np.ndarray:
    """Logits of every member for every input: (n, members, 2)."""
    k = len(jax.tree.leaves(member_variables)[0])
    out = np.zeros((len(jax.tree.leaves(inputs)[0]), k, 2), np.float32)

    def sink(start, stop, logits):
        out[start:stop] = logits

    steps.map(steps.predict_members, member_variables, inputs, batch_size, sink, desc)
    return out


def evaluate_loss(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Loss and accuracy of one model's logits over a whole split (unweighted)."""
    loss, acc = loss_and_accuracy(
        jnp.asarray(logits), jnp.asarray(labels), jnp.ones(len(labels), jnp.float32)
    )
    return float(loss), float(acc)
