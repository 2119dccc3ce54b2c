"""Training: one jitted step over a device mesh, early stopping, checkpoints, resume.

Read it top down, as Flax's ImageNet example: the pure step functions (``train_step`` for one
member, ``train_members_step`` for K side by side, ``predict_step``, ``create_train_state``);
``Steps``, the one place that jits them over a mesh; then ``fit``, an epoch loop whose pieces
(the batch loop, validation, ``EarlyStopping``, best weights, ``RunCheckpoints``) are separate.

The batch is sharded over the mesh's ``data`` axis and the state is replicated, so the same
step runs on 1 CPU, 8 GPUs or several hosts. Every random choice (init, shuffling, dropout,
augmentation) is derived from ``seed`` and the epoch/step number, so a resumed run redoes
exactly what an uninterrupted one would have done.

Longer than the other modules on purpose: the step and the loop that drives it are meant to be
read together. ``RunCheckpoints`` (orbax ``last``/``best``) is the piece to move, beside the
finished-model folders in ``checkpoint.py``, if this module has to shrink.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from pneumojax.augment import AugmentSpec, augment
from pneumojax.checkpoint import CheckpointError
from pneumojax.config import LR_SCHEDULES, FitOptions, resolve_optimisation
from pneumojax.io import fsync_path, fsync_tree, write_text_atomic
from pneumojax.metrics import rank_auc
from pneumojax.model import Classifier, pneumonia_probability
from pneumojax.progress import progress_bar


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a resumable checkpoint."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite."""


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


@dataclasses.dataclass
class EarlyStopping:
    """Keras's ``EarlyStopping(monitor="val_loss", patience, restore_best_weights=True)``, kept
    for each member: its best validation loss, the 1-based epoch of it, and the epochs since.

    Members share one step, so a member that has stopped keeps training beside the others and
    counts as stopped only until it improves again; training ends when all have stopped.
    """

    best_val_loss: list[float] = dataclasses.field(default_factory=list)
    best_epoch: list[int] = dataclasses.field(default_factory=list)
    wait: list[int] = dataclasses.field(default_factory=list)

    @classmethod
    def start(cls, members: int) -> EarlyStopping:
        """No epoch seen yet, for ``members`` members."""
        return cls([math.inf] * members, [-1] * members, [0] * members)

    def update(self, epoch: int, val_losses: list[float]) -> np.ndarray:
        """Records the validation loss of each member after ``epoch`` (1-based); returns which
        members improved, as a boolean array."""
        improved = np.array([v < b for v, b in zip(val_losses, self.best_val_loss)])
        for i, v in enumerate(val_losses):
            if improved[i]:
                self.best_val_loss[i], self.best_epoch[i], self.wait[i] = v, epoch, 0
            else:
                self.wait[i] += 1
        return improved

    def stopped(self, patience: int) -> list[bool]:
        """Per member: no improvement for ``patience`` epochs (patience 0 never stops)."""
        return [bool(patience) and w >= patience for w in self.wait]


@dataclasses.dataclass
class Progress:
    """Where a run stands: saved with every checkpoint, so a resume continues exactly.

    Saved flat (:meth:`to_json`): the early-stopping lists sit beside the other fields, as in
    checkpoints of every earlier version, which therefore still resume.
    """

    epoch: int = 0
    batch: int = 0  # batches done in the current epoch
    sums: dict = dataclasses.field(default_factory=lambda: {"loss": 0.0, "accuracy": 0.0})
    history: list = dataclasses.field(default_factory=list)
    stopping: EarlyStopping = dataclasses.field(default_factory=EarlyStopping)
    stopped_early: bool = False
    finished: bool = False
    steps_per_epoch: int = 0
    best_save: int | None = None  # which ``best`` checkpoint holds the weights of best_epoch
    # Each member's sums of ``sums``' figures (lists); None: unknown for this epoch (resumed
    # mid-epoch from a checkpoint that predates them).
    member_sums: dict | None = dataclasses.field(default_factory=dict)

    @property
    def best_epoch(self) -> list[int]:
        """Each member's best epoch (1-based; -1 before any)."""
        return self.stopping.best_epoch

    def global_step(self, batch_index: int) -> int:
        return self.epoch * self.steps_per_epoch + batch_index + 1

    def to_json(self) -> dict:
        """The checkpoint's record: every field, the early-stopping ones in place of
        ``stopping``."""
        record = {}
        for name, value in dataclasses.asdict(self).items():
            record.update(value if name == "stopping" else {name: value})
        return record

    @classmethod
    def from_json(cls, record: dict) -> Progress:
        """The inverse of :meth:`to_json`."""
        record = dict(record)
        if "member_sums" not in record:
            record["member_sums"] = None if record.get("batch") else {}
        stopping = EarlyStopping(
            **{
                f.name: record.pop(f.name)
                for f in dataclasses.fields(EarlyStopping)
                if f.name in record
            }
        )
        return cls(stopping=stopping, **record)


def prefetch(make: Callable[[int], Any], indices, depth: int = 2):
    """Yields ``make(i)`` for each index, preparing the next ones in a background thread so
    batch assembly and host-to-device copies overlap the running step."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    indices = list(indices)
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = [pool.submit(make, i) for i in indices[:depth]]
        for n in range(len(indices)):
            if n + depth < len(indices):
                futures.append(pool.submit(make, indices[n + depth]))
            yield futures[n].result()
            futures[n] = None


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps (then saves and stops)."""

    def __init__(self):
        self.signal: int | None = None

    def __enter__(self):
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._old:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class RunCheckpoints:
    """``last`` (full state + progress, every epoch and on interrupt) and ``best`` (weights).

    Never deletes the last good copy first. Every save goes to a new folder named by a save
    counter (not by step or epoch, so a resumed run that redoes a step never overwrites or
    deletes the copy it resumed from): orbax writes it under a temporary name and renames it
    when complete, pneumojax flushes it to disk (fsync of its files and folders), and only then
    deletes older copies. ``last`` records which ``best`` belongs to it (``Progress.best_save``),
    and a ``best`` is deleted only once a newer ``last`` refers to another. So at every point of
    a save, under kill -9 or power loss, a consistent ``last`` and ``best`` pair is on disk;
    leftovers of an unfinished save are cleaned up on the next start.

    On several processes, process 0 alone saves (host copies of the replicated state, so no
    other process takes part or needs to see the folder); the others' saves do nothing.
    """

    def __init__(self, directory: Path):
        directory = Path(directory).absolute()  # orbax requires absolute paths
        self.multiprocess = jax.process_count() > 1
        self.active = jax.process_index() == 0
        if not self.active:
            return
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=False, cleanup_tmp_directories=True
        )
        if self.multiprocess:  # orbax's barriers then wait for process 0 only
            for d in ("last", "best"):  # orbax creates none with active_processes set
                (directory / d).mkdir(parents=True, exist_ok=True)
            opts = dataclasses.replace(
                opts,
                create=False,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=0, active_processes={0}
                ),
            )
        self.last = ocp.CheckpointManager(directory / "last", options=opts)
        self.best = ocp.CheckpointManager(directory / "best", options=opts)
        for d in (directory, directory.parent):  # the folders themselves survive power loss
            fsync_path(d)

    @staticmethod
    def _save(manager, args) -> int:
        step = max(manager.all_steps(), default=0) + 1
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
        fsync_tree(Path(manager.directory) / str(step))
        return step

    @staticmethod
    def _drop_all_but(manager, keep: set):
        for step in manager.all_steps():
            if step not in keep:
                manager.delete(step)

    def _host(self, tree):
        return jax.device_get(tree) if self.multiprocess else tree

    def save_last(self, state: TrainState, progress: Progress):
        if not self.active:
            return
        step = self._save(
            self.last,
            ocp.args.Composite(
                state=ocp.args.StandardSave(self._host(state)),
                progress=ocp.args.JsonSave(progress.to_json()),
            ),
        )
        # Only now, with the new copy on disk, older ones and bests it does not refer to go.
        self._drop_all_but(self.last, {step})
        self._drop_all_but(self.best, {progress.best_save} - {None})

    def restore_last(
        self, abstract_state: TrainState, log: Callable[[str], None] = print
    ) -> tuple[TrainState, Progress] | None:
        """The newest readable ``last``; an older one if the newest was cut short (power loss
        after its rename, before it was flushed: the older one is deleted only after that)."""
        errors = []
        for step in sorted(self.last.all_steps(), reverse=True):
            try:
                restored = self.last.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        progress=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any unreadable copy: try the one before
                errors.append(e)
                log(
                    f"checkpoint {Path(self.last.directory) / str(step)} is unreadable "
                    f"({type(e).__name__}: {e}); trying the one before it"
                )
                continue
            return restored["state"], Progress.from_json(restored["progress"])
        if errors:
            raise CheckpointError(
                f"no readable checkpoint in {self.last.directory}: {errors[0]}"
            ) from errors[0]
        return None

    def save_best(self, weights: dict, progress: Progress) -> int | None:
        """Saves the best weights; returns the save's number, for ``progress.best_save``
        (None on a process that does not save)."""
        if not self.active:
            return None
        return self._save(
            self.best,
            ocp.args.Composite(
                variables=ocp.args.StandardSave(self._host(weights)),
                info=ocp.args.JsonSave(
                    {
                        "epoch": max(progress.best_epoch),
                        "best_epoch": list(progress.best_epoch),
                        "best_val_loss": list(progress.stopping.best_val_loss),
                    }
                ),
            ),
        )

    def restore_best(self, abstract_variables, progress: Progress) -> dict | None:
        """The best weights ``progress`` refers to; None while no epoch has been the best.

        Fails, rather than going on with the initial weights, if they are missing or belong
        to other epochs than ``progress`` records. Sets ``progress.best_save`` where a run
        saved before it was recorded left it unset."""
        if max(progress.best_epoch, default=-1) < 1:
            return None
        # Runs saved before best_save was recorded named best folders by epoch: take the newest.
        step = progress.best_save if progress.best_save is not None else self.best.latest_step()
        epochs = ", ".join(map(str, progress.best_epoch))
        if step is None or step not in self.best.all_steps():
            raise CheckpointError(
                f"{self.best.directory} lacks the best weights (epoch {epochs}) that "
                f"{self.last.directory} refers to, so this run cannot end with its best "
                f"weights; start it again with --overwrite"
            )
        restored = self.best.restore(
            step,
            args=ocp.args.Composite(
                variables=ocp.args.StandardRestore(abstract_variables), info=ocp.args.JsonRestore()
            ),
        )
        info = restored["info"]
        matches = (
            info["best_epoch"] == list(progress.best_epoch)
            if "best_epoch" in info
            else info.get("epoch") == max(progress.best_epoch)
        )
        if not matches:
            raise CheckpointError(
                f"{Path(self.best.directory) / str(step)} holds the best weights of epoch "
                f"{info.get('best_epoch', info.get('epoch'))}, but {self.last.directory} records "
                f"epoch {epochs} as the best; start the run again with --overwrite"
            )
        progress.best_save = step
        return restored["variables"]

    def close(self):
        if self.active:
            self.last.close()
            self.best.close()


def fit(
    steps: Steps,
    variables: dict | list[dict],
    train: tuple,
    val: tuple,
    opts: FitOptions,
    run_dir: Path,
    members: list[np.ndarray] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
    on_saved: Callable[[], None] | None = None,
) -> tuple[list[dict], Progress]:
    """Trains with early stopping on validation loss; returns each member's best variables.

    ``train`` is (inputs, labels, per-example weights), inputs being uint8 images or a dict of
    cached activations; ``val`` is (inputs, labels). ``members`` lists, per ensemble member,
    the train indices it learns from (default: one member, all of them); ``variables`` is one
    dict (shared start) or one per member. Members train side by side in one vmapped step and
    stop early each on its own validation loss; training ends when all have stopped.
    ``stop_after_steps`` simulates an interrupt (tests). A per-step schedule
    (:func:`step_learning_rates`) sets the rate before every step, the others once per epoch;
    the history's ``lr`` is the rate of the epoch's first step. ``on_saved()`` is called after
    each epoch's checkpoint is on disk. A resumed run ends by the ``epochs`` and ``patience``
    of ``opts``, which may differ from those it was started with (a larger ``epochs``
    continues a finished run).
    """
    opts = resolve_optimisation(opts)
    members = members if members is not None else [np.arange(len(train[1]))]
    k = len(members)
    variables = variables if isinstance(variables, list) else [variables] * k
    steps_per_epoch = _steps_per_epoch(members, opts.batch_size, steps.mesh.devices.size)
    ckpt = RunCheckpoints(run_dir / "checkpoints")
    state = steps.init_state(variables)
    progress = Progress(stopping=EarlyStopping.start(k), steps_per_epoch=steps_per_epoch)
    best = jax.tree.map(jnp.copy, _weights(state))  # the step donates the state's buffers
    if resume:
        state, progress, best = _resume(ckpt, state, progress, best, log)
        _continue_with(progress, opts, log)
    keys = (
        jax.random.split(jax.random.key(opts.seed), k) if k > 1 else jax.random.key(opts.seed)[None]
    )
    _write_history(run_dir, progress.history)

    with _StopFlag() as stop:

        def interrupt(global_step: int) -> bool:
            return stop.signal is not None or (
                stop_after_steps is not None and global_step >= stop_after_steps
            )

        epochs = progress_bar(
            range(progress.epoch, opts.epochs),
            desc="epochs",
            initial=progress.epoch,
            total=opts.epochs,
            summary=False,
        )
        for epoch in epochs:
            if progress.finished:
                break
            rates = None
            if opts.lr_schedule in STEP_SCHEDULES:
                rates = step_learning_rates(opts, epoch, steps_per_epoch)
                lr = float(rates[0])
            else:
                lr = opts.learning_rate * epoch_lr_factor(opts.lr_schedule, epoch)
                state = _set_learning_rate(state, lr)
            batches = _epoch_batches(steps, train, members, opts, epoch, progress)
            state, interrupted = _train_epoch(
                steps, state, keys, batches, progress, epoch, opts.log_every, interrupt, rates
            )
            if interrupted:
                _save_and_raise(ckpt, state, progress, stop.signal, epoch, run_dir)
            row, val_losses = _validate(steps, _weights(state), val, opts.batch_size)
            row = {
                "epoch": epoch + 1,
                "lr": lr,
                **_train_figures(progress, steps_per_epoch, k),
                **row,
            }
            _record_epoch(progress, row, epochs, opts.epochs, k, log)
            improved = _end_epoch(progress, val_losses, epoch, opts, log)
            best = _save_epoch(ckpt, state, best, improved, progress)
            _write_history(run_dir, progress.history)
            if on_saved is not None:
                on_saved()
    ckpt.close()
    best = jax.device_get(best)
    return [jax.tree.map(lambda x: np.asarray(x[i]), best) for i in range(k)], progress


def _steps_per_epoch(members: list[np.ndarray], batch_size: int, devices: int) -> int:
    if batch_size % devices:
        raise ValueError(f"--batch-size {batch_size} is not a multiple of the {devices} devices")
    smallest = min(len(m) for m in members)
    if smallest < batch_size:
        raise ValueError(
            f"the train split has {smallest} images, fewer than one batch of {batch_size}"
        )
    return smallest // batch_size


def _resume(
    ckpt: RunCheckpoints,
    state: TrainState,
    progress: Progress,
    best: dict,
    log: Callable[[str], None],
) -> tuple[TrainState, Progress, dict]:
    """State, progress and best weights as the last checkpoint left them; the given ones
    where no checkpoint was saved."""
    restored = ckpt.restore_last(jax.tree.map(ocp.utils.to_shape_dtype_struct, state), log)
    if restored is None:
        log("no checkpoint was saved before the interruption: starting from the beginning")
        return state, progress, best
    state, progress = restored
    saved_best = ckpt.restore_best(jax.tree.map(ocp.utils.to_shape_dtype_struct, best), progress)
    log(f"resuming at epoch {progress.epoch + 1}, batch {progress.batch}")
    return state, progress, best if saved_best is None else saved_best


def _continue_with(progress: Progress, opts: FitOptions, log: Callable[[str], None]) -> None:
    """Whether a resumed run is finished, by the epochs and patience it runs with now (the same
    as it recorded, unless they were changed on resume)."""
    stopped = all(progress.stopping.stopped(opts.patience))
    finished = stopped or progress.epoch >= opts.epochs
    if progress.finished and not finished:
        log(f"continuing after epoch {progress.epoch}, to epoch {opts.epochs} at most")
    progress.stopped_early, progress.finished = stopped, finished


def _epoch_batches(
    steps: Steps,
    train: tuple,
    members: list[np.ndarray],
    opts: FitOptions,
    epoch: int,
    progress: Progress,
):
    """The epoch's remaining batches, sharded with a member axis, prepared ahead.

    Each member's order is drawn from (seed, epoch, member) alone, so a resumed epoch
    continues the same order."""
    inputs, labels, weights = train
    orders = [
        m[np.random.default_rng([opts.seed, epoch, i]).permutation(len(m))]
        for i, m in enumerate(members)
    ]

    def make_batch(b):
        idx = [np.sort(o[b * opts.batch_size : (b + 1) * opts.batch_size]) for o in orders]
        return steps.shard(
            {
                "image": jax.tree.map(lambda a: np.stack([np.asarray(a[i]) for i in idx]), inputs),
                "label": np.stack([labels[i] for i in idx]),
                "weight": np.stack([weights[i] for i in idx]).astype(np.float32),
            },
            members=True,
        )

    return prefetch(make_batch, range(progress.batch, progress.steps_per_epoch))


def _train_epoch(
    steps: Steps,
    state: TrainState,
    keys,
    batches,
    progress: Progress,
    epoch: int,
    log_every: int,
    interrupt: Callable[[int], bool],
    rates: np.ndarray | None = None,
) -> tuple[TrainState, bool]:
    """Steps through ``batches``, adding their metrics to ``progress`` every ``log_every``
    steps; returns the state and whether ``interrupt(global_step)`` cut the epoch short.
    ``rates`` (one per batch of the epoch) are set before each step."""
    n = progress.steps_per_epoch
    bar = progress_bar(
        range(progress.batch, n),
        desc=f"epoch {epoch + 1}",
        initial=progress.batch,
        total=n,
        leave=False,
        summary=False,
    )
    pending = []  # metrics still on the device: a host sync every step would stall it
    for b, batch in zip(bar, batches):
        if rates is not None:
            state = _set_learning_rate(state, rates[b])
        state, metrics = steps.train(state, batch, keys)
        pending.append(metrics)
        stop = interrupt(progress.global_step(b))
        if (b + 1) % log_every and b + 1 < n and not stop:
            continue
        _add_metrics(progress, jax.device_get(pending), epoch, first_step=b + 2 - len(pending))
        pending = []
        progress.batch = b + 1
        means = _train_means(progress, progress.batch)
        bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['accuracy']:.3f}")
        if stop:
            return state, True
    bar.close()
    return state, False


def _add_metrics(progress: Progress, metrics: list[dict], epoch: int, first_step: int):
    """Adds each step's member-mean metrics to ``progress.sums``, in order (so where the host
    syncs does not change the sums); fails at the first non-finite loss."""
    for i, m in enumerate(metrics):
        if not np.isfinite(m["loss"]).all():
            raise NonFiniteLoss(
                f"loss became {m['loss']} at epoch {epoch + 1}, step "
                f"{first_step + i}; the last good checkpoint is kept"
            )
        for key in progress.sums:
            progress.sums[key] += float(np.mean(m[key]))
        if progress.member_sums is not None:
            for key in progress.sums:
                old = progress.member_sums.get(key, [0.0] * np.size(m[key]))
                progress.member_sums[key] = [s + float(v) for s, v in zip(old, np.ravel(m[key]))]


def _train_means(progress: Progress, batches: int) -> dict:
    return {key: total / batches for key, total in progress.sums.items()}


def _train_figures(progress: Progress, n: int, k: int) -> dict:
    """The history row's training figures: means over the epoch's ``n`` batches (and members),
    and with several members each member's own (where the epoch's sums of them are known)."""
    row = _train_means(progress, n)
    if k > 1 and progress.member_sums:
        row.update({f"member_{key}": [s / n for s in v] for key, v in progress.member_sums.items()})
    return row


def _save_and_raise(
    ckpt: RunCheckpoints,
    state: TrainState,
    progress: Progress,
    signum: int | None,
    epoch: int,
    run_dir: Path,
):
    """Saves ``last`` mid-epoch and raises :class:`Interrupted` (no signal: stop_after_steps)."""
    ckpt.save_last(state, progress)
    ckpt.close()
    why = signal.Signals(signum or signal.SIGINT).name
    raise Interrupted(
        f"interrupted by {why} at epoch {epoch + 1}, batch {progress.batch}; "
        f"state saved in {run_dir / 'checkpoints' / 'last'}"
    )


def _validate(
    steps: Steps, member_weights: dict, val: tuple, batch_size: int
) -> tuple[dict, list[float]]:
    """The history row's validation figures (means over members; with several members each
    member's too) and each member's loss. The AUC is None where validation has one class."""
    logits = member_logits(steps, member_weights, val[0], batch_size)
    scores = [evaluate_loss(logits[:, i], val[1]) for i in range(logits.shape[1])]
    losses = [loss for loss, _ in scores]
    accuracies = [acc for _, acc in scores]
    p = np.asarray(pneumonia_probability(jnp.asarray(logits))).T  # (members, n)
    aucs = [float(a) for a in rank_auc(np.broadcast_to(np.asarray(val[1]) == 1, p.shape), p)]
    row = {
        "val_loss": float(np.mean(losses)),
        "val_accuracy": float(np.mean(accuracies)),
        "val_auc": _finite_or_none(float(np.mean(aucs))),
    }
    if len(scores) > 1:
        row["member_val_loss"] = losses
        row["member_val_accuracy"] = accuracies
        row["member_val_auc"] = [_finite_or_none(a) for a in aucs]
    return row, losses


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _record_epoch(
    progress: Progress, row: dict, bar, epochs: int, k: int, log: Callable[[str], None]
):
    progress.history.append(row)
    bar.set_postfix(
        loss=f"{row['loss']:.4f}",
        val_loss=f"{row['val_loss']:.4f}",
        val_acc=f"{row['val_accuracy']:.3f}",
    )
    log(
        f"epoch {row['epoch']}/{epochs} loss={row['loss']:.4f} "
        f"accuracy={row['accuracy']:.4f} val_loss={row['val_loss']:.4f} "
        f"val_accuracy={row['val_accuracy']:.4f} lr={row['lr']:.3g}"
        + (f" ({k} members)" if k > 1 else "")
    )


def _end_epoch(
    progress: Progress,
    val_losses: list[float],
    epoch: int,
    opts: FitOptions,
    log: Callable[[str], None],
) -> np.ndarray:
    """Moves ``progress`` past ``epoch``: early stopping, counters, whether the run is
    finished. Returns which members improved."""
    improved = progress.stopping.update(epoch + 1, val_losses)
    progress.epoch, progress.batch = epoch + 1, 0
    progress.sums = {key: 0.0 for key in progress.sums}
    progress.member_sums = {}
    if all(progress.stopping.stopped(opts.patience)):
        progress.stopped_early = progress.finished = True
        log(
            f"early stopping after epoch {epoch + 1}: val_loss has not improved for "
            f"{opts.patience} epochs; restoring epoch "
            f"{', '.join(map(str, progress.best_epoch))}"
        )
    if epoch + 1 == opts.epochs:
        progress.finished = True
    return improved


def _save_epoch(
    ckpt: RunCheckpoints, state: TrainState, best: dict, improved: np.ndarray, progress: Progress
) -> dict:
    """The checkpoint policy at an epoch's end: new best weights first (only if a member
    improved), then ``last``, which refers to them. Returns the best weights."""
    if improved.any():
        best = _keep_improved(best, _weights(state), improved)
        progress.best_save = ckpt.save_best(best, progress)
    ckpt.save_last(state, progress)
    return best


def _keep_improved(best: dict, weights: dict, improved: np.ndarray) -> dict:
    """``best`` with the improved members' slices replaced by their current weights."""
    return jax.tree.map(
        lambda b, w: jnp.where(improved.reshape((-1,) + (1,) * (w.ndim - 1)), w, b), best, weights
    )


def _weights(state: TrainState) -> dict:
    """The weights that are validated, kept as the best and saved: the moving average under
    ``--ema``, else the trained ones."""
    if isinstance(state, EmaTrainState):
        return state.ema
    return {"params": state.params, "batch_stats": state.batch_stats}


_HYPERPARAM_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _set_learning_rate(state: TrainState, lr: float) -> TrainState:
    """Sets the rate inside ``inject_hyperparams`` state: a value, not a recompile."""

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


def _write_history(run_dir: Path, history: list[dict]):
    if jax.process_index() != 0:  # process 0 alone writes the run folder
        return
    write_text_atomic(run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))
