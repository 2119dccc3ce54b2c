"""Where a run stands and its checkpoints: :class:`EarlyStopping` (Keras's, per member),
:class:`Progress` (epoch, batch, sums, history; saved with every checkpoint so a resume
continues exactly) and :class:`RunCheckpoints`, the orbax ``last`` and ``best`` folders of a
run in training (finished models are :mod:`pneumojax.checkpoint`'s).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from pneumojax.checkpoint import CheckpointError
from pneumojax.io import fsync_path, fsync_tree
from pneumojax.step import TrainState


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
