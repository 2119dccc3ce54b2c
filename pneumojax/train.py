"""Training: the epoch loop that drives the jitted step, with early stopping, checkpoints and
resume.

``fit`` runs epochs of :class:`pneumojax.step.Steps` (the pure step functions jitted once over
the device mesh) and keeps what a run needs between them: the learning rate of each epoch or
step (:mod:`pneumojax.optim`), each epoch's batches (:mod:`pneumojax.batches`), validation
after each epoch, Keras's early stopping and the best weights, and the ``last``/``best``
checkpoints with the run's :class:`Progress` (:mod:`pneumojax.runcheckpoints`). Every random choice (init, shuffling, dropout,
augmentation) is derived from ``seed`` and the epoch/step number, so a resumed run redoes
exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pneumojax.batches import batches_per_epoch, epoch_batches
from pneumojax.config import FitOptions, resolve_optimisation
from pneumojax.io import write_text_atomic
from pneumojax.metrics import rank_auc
from pneumojax.optim import epoch_learning_rates, set_learning_rate
from pneumojax.model import pneumonia_probability
from pneumojax.progress import progress_bar
from pneumojax.runcheckpoints import EarlyStopping, Progress, RunCheckpoints
from pneumojax.step import EmaTrainState, Steps, TrainState, evaluate_loss, member_logits


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a resumable checkpoint."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite."""


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps (then saves and stops);
    ``stop_after_steps`` stops it alike at that global step (a simulated interrupt, tests)."""

    def __init__(self, stop_after_steps: int | None = None):
        self.signal: int | None = None
        self.stop_after_steps = stop_after_steps

    def requested(self, global_step: int) -> bool:
        """Whether the loop is to save and stop before the step after ``global_step``."""
        return self.signal is not None or (
            self.stop_after_steps is not None and global_step >= self.stop_after_steps
        )

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
    (:func:`pneumojax.optim.step_learning_rates`) sets the rate before every step, the others
    once per epoch; the history's ``lr`` is the rate of the epoch's first step. ``on_saved()`` is called after
    each epoch's checkpoint is on disk. A resumed run ends by the ``epochs`` and ``patience``
    of ``opts``, which may differ from those it was started with (a larger ``epochs``
    continues a finished run).
    """
    opts = resolve_optimisation(opts)
    members = members if members is not None else [np.arange(len(train[1]))]
    k = len(members)
    variables = variables if isinstance(variables, list) else [variables] * k
    steps_per_epoch = batches_per_epoch(members, opts.batch_size, steps.mesh.devices.size)
    ckpt = RunCheckpoints(run_dir / "checkpoints")
    progress = Progress(stopping=EarlyStopping.start(k), steps_per_epoch=steps_per_epoch)
    state, progress, best = _start(steps, variables, progress, ckpt, resume, opts, log)
    keys = _member_keys(opts.seed, k)
    _write_history(run_dir, progress.history)

    with _StopFlag(stop_after_steps) as stop:
        epochs = _epochs_bar(progress, opts.epochs)
        for epoch in epochs:
            if progress.finished:
                break
            lr, rates = epoch_learning_rates(opts, epoch, steps_per_epoch)
            if rates is None:
                state = set_learning_rate(state, lr)
            batches = epoch_batches(steps, train, members, opts, epoch, progress)
            state, interrupted = _train_epoch(
                steps, state, keys, batches, progress, epoch, opts.log_every, stop.requested, rates
            )
            if interrupted:
                _save_and_raise(ckpt, state, progress, stop.signal, epoch, run_dir)
            val_row, val_losses = _validate(steps, _weights(state), val, opts.batch_size)
            row = _history_row(epoch, lr, _train_figures(progress, steps_per_epoch, k), val_row)
            _record_epoch(progress, row, epochs, opts.epochs, k, log)
            improved = _end_epoch(progress, val_losses, epoch, opts, log)
            best = _save_epoch(ckpt, state, best, improved, progress)
            _write_history(run_dir, progress.history)
            if on_saved is not None:
                on_saved()
    ckpt.close()
    best = jax.device_get(best)
    return [jax.tree.map(lambda x: np.asarray(x[i]), best) for i in range(k)], progress


def _member_keys(seed: int, k: int) -> jax.Array:
    """One random key per member, from ``seed`` (a single member uses the seed's own key)."""
    return jax.random.split(jax.random.key(seed), k) if k > 1 else jax.random.key(seed)[None]


def _start(
    steps: Steps,
    variables: list[dict],
    progress: Progress,
    ckpt: RunCheckpoints,
    resume: bool,
    opts: FitOptions,
    log: Callable[[str], None],
) -> tuple[TrainState, Progress, dict]:
    """The state, progress and best weights training starts from: the initial ones, or where
    a resumed run's last checkpoint left them."""
    state = steps.init_state(variables)
    best = jax.tree.map(jnp.copy, _weights(state))  # the step donates the state's buffers
    if resume:
        state, progress, best = _resume(ckpt, state, progress, best, log)
        _continue_with(progress, opts, log)
    return state, progress, best


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


def _epochs_bar(progress: Progress, epochs: int):
    """The progress bar over the epochs still to run (of ``epochs``)."""
    return progress_bar(
        range(progress.epoch, epochs),
        desc="epochs",
        initial=progress.epoch,
        total=epochs,
        summary=False,
    )


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
            state = set_learning_rate(state, rates[b])
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


def _history_row(epoch: int, lr: float, train_figures: dict, val_row: dict) -> dict:
    """The epoch's row of history.jsonl: its number (1-based) and rate, then the figures."""
    return {"epoch": epoch + 1, "lr": lr, **train_figures, **val_row}


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


def _write_history(run_dir: Path, history: list[dict]):
    if jax.process_index() != 0:  # process 0 alone writes the run folder
        return
    write_text_atomic(run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))
