"""TensorBoard event files in ``RUN/tensorboard/``, so ``tensorboard --logdir runs/`` shows a run
(or a study's runs) as it trains and once it has finished.

Runs, as TensorBoard names them under ``RUN/tensorboard/``, with the step the 1-based epoch of
``history.jsonl``:

- ``train/``: ``epoch_loss``, ``epoch_accuracy``, ``epoch_learning_rate`` (Keras's
  ``TensorBoard`` callback's names); ``validation/``: ``epoch_loss``, ``epoch_accuracy``,
  ``epoch_auc``. With a seed ensemble these are the members' means, as in history.jsonl, and
  ``member-<i>/train/`` and ``member-<i>/validation/`` hold each member's own.
- ``test/``: the test figures of ``metrics.json`` (``auc``, ``accuracy``, ``recall``, ...) at the
  last epoch, and the images ``roc`` and ``confusion_matrix`` (``plots/``).
- the folder itself: the run's options as the ``hparams`` plugin's session, whose metrics are the
  scalars above (the test figures among them).

The epochs are written from history.jsonl, so the curves always say what it says: each process
writes them afresh into new files at its first epoch's end (a resumed run thus drops whatever
the interrupted one had written) and appends one epoch at each later epoch's end, flushed, for
a TensorBoard that watches live. Written with TensorBoard's own protos and record writer:
importing TensorFlow would cost the training process about 5 s.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

# history.jsonl's keys -> the runs' tags; member_<key> holds each member's value of <key>.
TRAIN_SCALARS = {"loss": "epoch_loss", "accuracy": "epoch_accuracy", "lr": "epoch_learning_rate"}
VALIDATION_SCALARS = {
    "val_loss": "epoch_loss",
    "val_accuracy": "epoch_accuracy",
    "val_auc": "epoch_auc",
}
TEST_SCALARS = ("auc", "accuracy", "recall", "specificity", "precision", "f1", "threshold")
IMAGES = ("roc", "confusion_matrix")  # plots/<name>.png


def read_history(run_dir: Path) -> list[dict]:
    """history.jsonl's rows (none if there is no such file yet)."""
    try:
        text = (Path(run_dir) / "history.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def epoch_scalars(row: dict) -> dict[str, dict[str, float]]:
    """One history row as {run: {tag: value}}; a value that is missing or None is left out."""
    k = max((len(v) for n, v in row.items() if n.startswith("member_") and v), default=0)
    runs: dict[str, dict[str, float]] = {}
    for run, keys in (("train", TRAIN_SCALARS), ("validation", VALIDATION_SCALARS)):
        for key, tag in keys.items():
            shared = [row.get(key)] * k if key == "lr" else []  # one rate for every member
            values = [(run, row.get(key))] + [
                (f"member-{i + 1}/{run}", v)
                for i, v in enumerate(row.get(f"member_{key}") or shared)
            ]
            for name, value in values:
                if value is not None:
                    runs.setdefault(name, {})[tag] = value
    return runs


class EventLog:
    """The event files of one run folder, written by the process that writes the folder."""

    def __init__(self, run_dir: Path):
        self.root = Path(run_dir) / "tensorboard"
        self._rows: list[dict] | None = None  # the epochs this process wrote, None: none yet
        self._files: dict[str, RecordWriter] = {}

    def epochs(self, history: list[dict] | None = None) -> None:
        """Brings the curves up to ``history`` (default: the run's history.jsonl): the epochs
        not yet written are appended; if the written ones are not what history begins with (a
        new process: a resume), every curve is rewritten from the start into new files."""
        history = read_history(self.root.parent) if history is None else history
        if self._rows is None or history[: len(self._rows)] != self._rows:
            self._start_afresh()
        for row in history[len(self._rows) :]:
            for run, values in epoch_scalars(row).items():
                for tag, value in values.items():
                    self._writer(run, row["epoch"]).write(
                        _event(row["epoch"], scalar_pb(tag, value))
                    )
            self._rows.append(row)
        for writer in self._files.values():
            writer.flush()

    def finish(self, history: list[dict], metrics: dict, options: dict, plots: Path) -> None:
        """At the run's end: the curves as ``history`` has them, the test figures and images,
        and the hyperparameters; closes the files."""
        self.epochs(history)
        self.close()
        step = history[-1]["epoch"] if history else 0
        test = [
            _event(step, scalar_pb(name, metrics[name]))
            for name in TEST_SCALARS
            if isinstance(metrics.get(name), (int, float))
        ]
        for name in IMAGES:
            if (plots / f"{name}.png").exists():
                test.append(_event(step, _image_pb(name, (plots / f"{name}.png").read_bytes())))
        _write_file(self.root / "test", test)
        session = hparams_pb(hparam_values(options))  # one group per options (out among them)
        _write_file(self.root, [_event(0, session)])

    def close(self) -> None:
        for writer in self._files.values():
            writer.close()
        self._files = {}

    def _start_afresh(self) -> None:
        self.close()
        if self.root.is_dir():
            for folder in self.root.iterdir():
                if folder.is_dir() and (folder.name == "train" or folder.name == "validation"):
                    _remove_event_files(folder)
                elif folder.is_dir() and folder.name.startswith("member-"):
                    for run in folder.iterdir():
                        _remove_event_files(run)
        self._rows = []

    def _writer(self, run: str, step: int) -> RecordWriter:
        """The run's file of this process, opened at its first event, ``step``. The file
        begins with a session (re)start at that step, by which TensorBoard's Python loader
        drops the steps from there on that it read from an earlier file (its fast loader does
        so when a step repeats)."""
        if run not in self._files:
            folder = self.root / run
            folder.mkdir(parents=True, exist_ok=True)
            writer = RecordWriter(open(folder / _event_file_name(), "wb"))
            writer.write(_file_version())
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            writer.write(
                event_pb2.Event(
                    wall_time=time.time(), step=step, session_log=start
                ).SerializeToString()
            )
            self._files[run] = writer
        return self._files[run]


def hparam_values(options: dict) -> dict:
    """The run's options as hparams values (bool, number or string): None as ``"none"``,
    lists and mappings as their JSON."""
    values = {}
    for name, value in options.items():
        if value is None:
            value = "none"
        elif not isinstance(value, (bool, int, float, str)):
            value = json.dumps(value, sort_keys=True)
        values[name] = value
    return values


def _event(step: int, summary: summary_pb2.Summary) -> bytes:
    return event_pb2.Event(wall_time=time.time(), step=step, summary=summary).SerializeToString()


def _file_version() -> bytes:
    return event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()


def _image_pb(tag: str, png: bytes) -> summary_pb2.Summary:
    """A PNG as the image plugin's summary (``tf.summary.image``'s form: width, height, PNG)."""
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    tensor = tensor_util.make_tensor_proto(
        np.array([str(width).encode(), str(height).encode(), png], dtype=object)
    )
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=tag, metadata=image_metadata.create_summary_metadata(tag, ""), tensor=tensor
    )
    return summary


_sequence = itertools.count()


def _event_file_name() -> str:
    """TensorBoard's own pattern; names sort by time, as its readers order the files."""
    host = socket.gethostname().replace(".", "-")
    return f"events.out.tfevents.{int(time.time()):010d}.{host}.{os.getpid()}.{next(_sequence)}"


def _remove_event_files(folder: Path) -> None:
    for path in folder.glob("*tfevents*"):
        path.unlink(missing_ok=True)


def _write_file(folder: Path, events: list[bytes]) -> None:
    """One complete event file in ``folder``, replacing the ones there (renamed into place, so
    a reader never sees half of it)."""
    folder.mkdir(parents=True, exist_ok=True)
    _remove_event_files(folder)
    staging = folder / f".pending-{os.getpid()}.tmp"  # no "tfevents": readers skip it
    writer = RecordWriter(open(staging, "wb"))
    for record in [_file_version(), *events]:
        writer.write(record)
    writer.close()
    os.replace(staging, folder / _event_file_name())
