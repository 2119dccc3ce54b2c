"""Training: one jitted step over a device mesh, early stopping, checkpoints, resume.

The batch is sharded over the mesh's ``data`` axis and the state is replicated, so the same
step runs on 1 CPU, 8 GPUs or several hosts. Every random choice (init, shuffling, dropout)
is derived from ``seed`` and the epoch/step number, so a resumed run redoes exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
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

from pneumojax.checkpoint import CheckpointError
from pneumojax.io import fsync_path, fsync_tree, write_text_atomic
from pneumojax.model import Classifier, make_optimizer, pneumonia_probability
from pneumojax.progress import progress_bar

LR_SCHEDULES = ("keras-seed", "exponential", "constant")


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


def epoch_lr_factor(kind: str, epoch) -> Any:
    """Learning-rate factor for a 0-based epoch.

    ``keras-seed`` is the study's ``LearningRateScheduler(lambda e, lr: lr * 0.85 ** e)``:
    it multiplies the *current* rate, so the factor compounds to 0.85 ** (e (e + 1) / 2).
    """
    if kind == "keras-seed":
        return 0.85 ** (epoch * (epoch + 1) / 2)
    if kind == "exponential":
        return 0.85 ** epoch
    if kind == "constant":
        return 1.0 + 0 * epoch
    raise ValueError(f"unknown --lr-schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}")


def make_mesh() -> jax.sharding.Mesh:
    """All devices of all hosts on one ``data`` axis (XLA partitions the step: Auto axes)."""
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def loss_and_accuracy(logits, labels, weights):
    """The study's binary cross-entropy on one-hot labels (two sigmoid units), weighted."""
    onehot = jax.nn.one_hot(labels, 2)
    per_example = optax.sigmoid_binary_cross_entropy(logits, onehot).mean(-1)
    correct = ((pneumonia_probability(logits) >= 0.5) == (labels == 1)).astype(jnp.float32)
    # Keras's reduction: the weighted sum over the batch size (not over the weights' sum), so
    # class weights scale the gradient exactly as they do in the study.
    loss = (per_example * weights).sum() / weights.shape[-1]
    return loss, (correct * weights).sum() / jnp.maximum(weights.sum(), 1e-12)


@dataclasses.dataclass
class Steps:
    """The jitted train and predict steps for one model, optimizer and mesh.

    Training always runs K members side by side (``jax.vmap`` over a leading member axis of
    the state and the batch): K = 1 for a plain run, K > 1 for an ensemble whose members
    differ only in what they train on.
    """

    model: Classifier
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh

    def __post_init__(self):
        self._jitted = {}
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.member_batch_sharding = NamedSharding(self.mesh, P(None, "data"))
        self.train = jax.jit(self._train_members, donate_argnums=0,
                             in_shardings=(self.replicated, self.member_batch_sharding,
                                           self.replicated),
                             out_shardings=(self.replicated, self.replicated))

    def _train_members(self, state: TrainState, batch, keys):
        if keys.shape[0] == 1:
            # One member: drop the member axis rather than vmap, whose batching of
            # convolutions over stacked kernels (grouped convolutions) costs ~15% on CPU.
            one = lambda t: jax.tree.map(lambda x: x[0], t)  # noqa: E731
            new, metrics = self._train(one(state), one(batch), keys[0])
            return jax.tree.map(lambda x: x[None], (new, metrics))
        return jax.vmap(self._train)(state, batch, keys)

    def _train(self, state: TrainState, batch, key):
        key = jax.random.fold_in(key, state.step)

        def loss_fn(params):
            logits, updates = self.model.apply(
                {"params": params, "batch_stats": state.batch_stats}, batch["image"],
                train=True, rngs={"dropout": key}, mutable=["batch_stats"])
            loss, acc = loss_and_accuracy(logits, batch["label"], batch["weight"])
            return loss, (acc, updates.get("batch_stats", state.batch_stats))

        (loss, (acc, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(state.step + 1, params, batch_stats, opt_state)
        return new, {"loss": loss, "accuracy": acc}

    def _predict(self, variables, images):
        return self.model.apply(variables, images, train=False)

    def predict_members(self, member_variables, images):
        """Logits of every member, batch first: (batch, members, 2)."""
        return jnp.swapaxes(jax.vmap(self._predict, in_axes=(0, None))(member_variables,
                                                                         images), 0, 1)

    def init_state(self, member_variables: list[dict]) -> TrainState:
        """The members' variables stacked on a leading axis, with their optimizer states."""
        stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                               *member_variables)
        params, batch_stats = stacked["params"], stacked.get("batch_stats", {})
        k = len(member_variables)
        state = TrainState(jnp.zeros((k,), jnp.int32), params, batch_stats,
                           jax.vmap(self.tx.init)(params))
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
                sharding, np.take(a, np.arange(pid * n, (pid + 1) * n), axis=axis))
        return jax.tree.map(local, batch)

    def map(self, fn, variables, inputs, batch_size: int, sink, desc: str | None = None):
        """Runs ``fn(variables, batch)`` over ``inputs`` (an array or a dict of arrays) in
        fixed-size sharded batches, the last one padded, so it compiles once; hands each
        result to ``sink(start, stop, outputs)`` as numpy."""
        if fn not in self._jitted:
            self._jitted[fn] = jax.jit(fn, in_shardings=(self.replicated, self.batch_sharding),
                                       out_shardings=self.batch_sharding)
        jitted = self._jitted[fn]
        variables = jax.device_put(variables, self.replicated)
        n = len(jax.tree.leaves(inputs)[0])
        for start in progress_bar(range(0, n, batch_size), desc=desc, unit="batch", leave=False,
                                  disable=desc is None):
            stop = min(start + batch_size, n)

            def take(a):
                chunk = np.asarray(a[start:stop])
                if stop - start < batch_size:
                    pad = np.zeros((batch_size - (stop - start),) + chunk.shape[1:], chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                return chunk
            out = jitted(variables, self.shard(jax.tree.map(take, inputs)))
            sink(start, stop, jax.tree.map(lambda o: np.asarray(o)[:stop - start], out))


def predict_logits(steps: Steps, variables, inputs, batch_size: int,
                   desc: str | None = None) -> np.ndarray:
    """Logits for every input (images, or cached activations for a suffix model)."""
    out = np.zeros((len(jax.tree.leaves(inputs)[0]), 2), np.float32)

    def sink(start, stop, logits):
        out[start:stop] = logits
    steps.map(steps._predict, variables, inputs, batch_size, sink, desc)
    return out


def evaluate_loss(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    loss, acc = loss_and_accuracy(jnp.asarray(logits), jnp.asarray(labels),
                                  jnp.ones(len(labels), jnp.float32))
    return float(loss), float(acc)


@dataclasses.dataclass
class FitOptions:
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_schedule: str = "keras-seed"
    patience: int = 5
    seed: int = 0
    log_every: int = 10   # host syncs for the progress bar every N steps, not every step


@dataclasses.dataclass
class Progress:
    """Where a run stands: saved with every checkpoint, so a resume continues exactly.

    Early-stopping figures are per member.
    """

    epoch: int = 0
    batch: int = 0                # batches done in the current epoch
    sums: dict = dataclasses.field(default_factory=lambda: {"loss": 0.0, "accuracy": 0.0})
    history: list = dataclasses.field(default_factory=list)
    best_val_loss: list = dataclasses.field(default_factory=list)
    best_epoch: list = dataclasses.field(default_factory=list)
    wait: list = dataclasses.field(default_factory=list)
    stopped_early: bool = False
    finished: bool = False
    steps_per_epoch: int = 0
    best_save: int | None = None  # which ``best`` checkpoint holds the weights of best_epoch

    def global_step(self, batch_index: int) -> int:
        return self.epoch * self.steps_per_epoch + batch_index + 1


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
    """

    def __init__(self, directory: Path):
        directory = Path(directory).absolute()  # orbax requires absolute paths
        opts = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False,
                                            cleanup_tmp_directories=True)
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

    def save_last(self, state: TrainState, progress: Progress):
        step = self._save(self.last, ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            progress=ocp.args.JsonSave(dataclasses.asdict(progress))))
        # Only now, with the new copy on disk, older ones and bests it does not refer to go.
        self._drop_all_but(self.last, {step})
        self._drop_all_but(self.best, {progress.best_save} - {None})

    def restore_last(self, abstract_state: TrainState, log: Callable[[str], None] = print
                     ) -> tuple[TrainState, Progress] | None:
        """The newest readable ``last``; an older one if the newest was cut short (power loss
        after its rename, before it was flushed: the older one is deleted only after that)."""
        errors = []
        for step in sorted(self.last.all_steps(), reverse=True):
            try:
                restored = self.last.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    progress=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any unreadable copy: try the one before
                errors.append(e)
                log(f"checkpoint {Path(self.last.directory) / str(step)} is unreadable "
                    f"({type(e).__name__}: {e}); trying the one before it")
                continue
            return restored["state"], Progress(**restored["progress"])
        if errors:
            raise CheckpointError(f"no readable checkpoint in {self.last.directory}: "
                                  f"{errors[0]}") from errors[0]
        return None

    def save_best(self, weights: dict, progress: Progress) -> int:
        """Saves the best weights; returns the save's number, for ``progress.best_save``."""
        return self._save(self.best, ocp.args.Composite(
            variables=ocp.args.StandardSave(weights),
            info=ocp.args.JsonSave({"epoch": max(progress.best_epoch),
                                    "best_epoch": list(progress.best_epoch),
                                    "best_val_loss": list(progress.best_val_loss)})))

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
                f"weights; start it again with --overwrite")
        restored = self.best.restore(step, args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(abstract_variables), info=ocp.args.JsonRestore()))
        info = restored["info"]
        matches = (info["best_epoch"] == list(progress.best_epoch) if "best_epoch" in info
                   else info.get("epoch") == max(progress.best_epoch))
        if not matches:
            raise CheckpointError(
                f"{Path(self.best.directory) / str(step)} holds the best weights of epoch "
                f"{info.get('best_epoch', info.get('epoch'))}, but {self.last.directory} records "
                f"epoch {epochs} as the best; start the run again with --overwrite")
        progress.best_save = step
        return restored["variables"]

    def close(self):
        self.last.close()
        self.best.close()


def fit(steps: Steps, variables: dict | list[dict], train: tuple, val: tuple,
        opts: FitOptions, run_dir: Path, members: list[np.ndarray] | None = None,
        resume: bool = False, log: Callable[[str], None] = print,
        stop_after_steps: int | None = None) -> tuple[list[dict], Progress]:
    """Trains with early stopping on validation loss; returns each member's best variables.

    ``train`` is (inputs, labels, per-example weights), inputs being uint8 images or a dict of
    cached activations; ``val`` is (inputs, labels). ``members`` lists, per ensemble member,
    the train indices it learns from (default: one member, all of them); ``variables`` is one
    dict (shared start) or one per member. Members train side by side in one vmapped step and
    stop early each on its own validation loss; training ends when all have stopped.
    ``stop_after_steps`` simulates an interrupt (tests).
    """
    inputs, labels, weights = train
    members = members if members is not None else [np.arange(len(labels))]
    k = len(members)
    variables = variables if isinstance(variables, list) else [variables] * k
    n_dev = steps.mesh.devices.size
    if opts.batch_size % n_dev:
        raise ValueError(f"--batch-size {opts.batch_size} is not a multiple of the "
                         f"{n_dev} devices")
    steps_per_epoch = min(len(m) for m in members) // opts.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the train split has {min(len(m) for m in members)} images, fewer than "
                         f"one batch of {opts.batch_size}")
    ckpt = RunCheckpoints(run_dir / "checkpoints")
    state = steps.init_state(variables)
    progress = Progress(best_val_loss=[math.inf] * k, best_epoch=[-1] * k, wait=[0] * k,
                        steps_per_epoch=steps_per_epoch)
    best = jax.tree.map(jnp.copy, _weights(state))  # the step donates the state's buffers
    if resume:
        restored = ckpt.restore_last(jax.tree.map(ocp.utils.to_shape_dtype_struct, state), log)
        if restored is None:
            log("no checkpoint was saved before the interruption: starting from the beginning")
        else:
            state, progress = restored
            saved_best = ckpt.restore_best(jax.tree.map(ocp.utils.to_shape_dtype_struct, best),
                                           progress)
            if saved_best is not None:
                best = saved_best
            log(f"resuming at epoch {progress.epoch + 1}, batch {progress.batch}")
    keys = jax.random.split(jax.random.key(opts.seed), k) if k > 1 else \
        jax.random.key(opts.seed)[None]
    _write_history(run_dir, progress.history)

    with _StopFlag() as stop:
        epochs = progress_bar(range(progress.epoch, opts.epochs), desc="epochs",
                              initial=progress.epoch, total=opts.epochs, summary=False)
        for epoch in epochs:
            if progress.finished:
                break
            lr = opts.learning_rate * epoch_lr_factor(opts.lr_schedule, epoch)
            state = _set_learning_rate(state, lr)
            orders = [m[np.random.default_rng([opts.seed, epoch, i]).permutation(len(m))]
                      for i, m in enumerate(members)]
            bar = progress_bar(range(progress.batch, steps_per_epoch), desc=f"epoch {epoch + 1}",
                               initial=progress.batch, total=steps_per_epoch, leave=False,
                               summary=False)

            def make_batch(b, orders=orders):
                idx = [np.sort(o[b * opts.batch_size:(b + 1) * opts.batch_size]) for o in orders]
                return steps.shard({
                    "image": jax.tree.map(lambda a: np.stack([np.asarray(a[i]) for i in idx]),
                                          inputs),
                    "label": np.stack([labels[i] for i in idx]),
                    "weight": np.stack([weights[i] for i in idx]).astype(np.float32)},
                    members=True)

            pending = []  # metrics still on the device: the host syncs every log_every steps
            for b, batch in zip(bar, prefetch(make_batch, range(progress.batch, steps_per_epoch))):
                state, metrics = steps.train(state, batch, keys)
                pending.append(metrics)
                last = b + 1 == steps_per_epoch
                interrupt = stop.signal is not None or (
                    stop_after_steps is not None and progress.global_step(b) >= stop_after_steps)
                if (b + 1) % opts.log_every and not last and not interrupt:
                    continue
                for i, m in enumerate(jax.device_get(pending)):
                    if not np.isfinite(m["loss"]).all():
                        raise NonFiniteLoss(
                            f"loss became {m['loss']} at epoch {epoch + 1}, step "
                            f"{b + 2 - len(pending) + i}; the last good checkpoint is kept")
                    for key in progress.sums:  # per step, in order: windows don't change sums
                        progress.sums[key] += float(np.mean(m[key]))
                pending = []
                progress.batch = b + 1
                bar.set_postfix(loss=f"{progress.sums['loss'] / progress.batch:.4f}",
                                acc=f"{progress.sums['accuracy'] / progress.batch:.3f}")
                if interrupt:
                    ckpt.save_last(state, progress)
                    ckpt.close()
                    why = signal.Signals(stop.signal or signal.SIGINT).name
                    raise Interrupted(f"interrupted by {why} at epoch {epoch + 1}, batch {b + 1}; "
                                      f"state saved in {run_dir / 'checkpoints' / 'last'}")
            bar.close()
            val_logits = member_logits(steps, _weights(state), val[0], opts.batch_size)
            val_scores = [evaluate_loss(val_logits[:, i], val[1]) for i in range(k)]
            row = {"epoch": epoch + 1, "lr": lr,
                   "loss": progress.sums["loss"] / steps_per_epoch,
                   "accuracy": progress.sums["accuracy"] / steps_per_epoch,
                   "val_loss": float(np.mean([v[0] for v in val_scores])),
                   "val_accuracy": float(np.mean([v[1] for v in val_scores]))}
            if k > 1:
                row["member_val_loss"] = [v[0] for v in val_scores]
            progress.history.append(row)
            epochs.set_postfix(loss=f"{row['loss']:.4f}", val_loss=f"{row['val_loss']:.4f}",
                               val_acc=f"{row['val_accuracy']:.3f}")
            log(f"epoch {epoch + 1}/{opts.epochs} loss={row['loss']:.4f} "
                f"accuracy={row['accuracy']:.4f} val_loss={row['val_loss']:.4f} "
                f"val_accuracy={row['val_accuracy']:.4f} lr={lr:.3g}"
                + (f" ({k} members)" if k > 1 else ""))
            improved = np.array([v[0] < b_ for v, b_ in zip(val_scores, progress.best_val_loss)])
            for i, (v, _) in enumerate(val_scores):
                if improved[i]:
                    progress.best_val_loss[i], progress.best_epoch[i] = v, epoch + 1
                    progress.wait[i] = 0
                else:
                    progress.wait[i] += 1
            if improved.any():
                best = jax.tree.map(
                    lambda b_, s_: jnp.where(improved.reshape((-1,) + (1,) * (s_.ndim - 1)),
                                             s_, b_), best, _weights(state))
                progress.best_save = ckpt.save_best(best, progress)
            progress.epoch, progress.batch = epoch + 1, 0
            progress.sums = {key: 0.0 for key in progress.sums}
            if opts.patience and min(progress.wait) >= opts.patience:
                progress.stopped_early = progress.finished = True
                log(f"early stopping after epoch {epoch + 1}: val_loss has not improved for "
                    f"{opts.patience} epochs; restoring epoch "
                    f"{', '.join(map(str, progress.best_epoch))}")
            if epoch + 1 == opts.epochs:
                progress.finished = True
            ckpt.save_last(state, progress)
            _write_history(run_dir, progress.history)
    ckpt.close()
    best = jax.device_get(best)
    return [jax.tree.map(lambda x: np.asarray(x[i]), best) for i in range(k)], progress


def _weights(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def member_logits(steps: Steps, member_variables, inputs, batch_size: int,
                  desc: str | None = None) -> np.ndarray:
    """Logits of every member for every input: (n, members, 2)."""
    k = len(jax.tree.leaves(member_variables)[0])
    out = np.zeros((len(jax.tree.leaves(inputs)[0]), k, 2), np.float32)

    def sink(start, stop, logits):
        out[start:stop] = logits
    steps.map(steps.predict_members, member_variables, inputs, batch_size, sink, desc)
    return out


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
    opt_state = jax.tree.map(visit, state.opt_state,
                             is_leaf=lambda x: isinstance(x, _HYPERPARAM_STATES))
    return state.replace(opt_state=opt_state)


def _write_history(run_dir: Path, history: list[dict]):
    write_text_atomic(run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))
