"""What a run folder is and where it stands, and replacing one without losing anything.

A run folder is one that ``pneumojax train`` made: a ``config.json`` with the keys pneumojax
writes (``plan``, ``environment``) and only the files and folders a run writes. Its
``status.json`` says whether the run is ``running``, ``finished``, ``failed`` (with the error's
first line) or ``interrupted``; folders made before it existed are finished when they hold
``metrics.json`` and ``model/manifest.json``, else interrupted.

Only such a folder is ever replaced (``--overwrite``, or the retry of a failed run), and only
after every check of the new run has passed: the old run is moved aside to ``.NAME.old-PID``
beside it, deleted once the new run has written its config.json and first checkpoint, and put
back if the new run fails before that. :func:`check_run_dir` tells, before anything is
written, whether a run may start in a folder and whether it replaces the one there;
:func:`settle_run` records a failed or interrupted run and settles the one it replaced.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable

from pneumojax.io import fsync_path, write_text_atomic

STATUS = "status.json"
STATES = ("running", "finished", "failed", "interrupted")
MODEL_CARD_MD, MODEL_CARD_JSON = "MODEL_CARD.md", "MODEL_CARD.json"  # pneumojax.modelcard
# What a run writes at its top level (evaluate, explain and adapt add theirs).
RUN_FILES = frozenset(
    {
        "config.json",
        "splits.json",
        "history.jsonl",
        "metrics.json",
        STATUS,
        MODEL_CARD_MD,
        MODEL_CARD_JSON,
    }
)
RUN_FOLDERS = frozenset(
    {"checkpoints", "model", "predictions", "plots", "explain", "tensorboard", "adapt"}
)
CONFIG_KEYS = ("plan", "environment")  # keys every pneumojax config.json has
# write_text_atomic's temporary files (config.json.k3j2.tmp), checkpoint staging and set-aside
# copies (.model.tmp123, .model.old)
_TEMPORARY_FILE = re.compile(r"(?:%s)\..+\.tmp" % "|".join(map(re.escape, sorted(RUN_FILES))))
_HIDDEN_FOLDER = re.compile(r"\..+\.(?:tmp\d*|old)")


def write_status(run_dir: Path, state: str, error: str | None = None) -> None:
    """Records where the run stands in ``status.json`` (atomically)."""
    assert state in STATES, state
    record = {
        "state": state,
        "error": error,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomic(Path(run_dir) / STATUS, json.dumps(record, indent=1) + "\n")


def read_status(run_dir: Path) -> dict | None:
    """The run's ``status.json``, or None (none yet, or unreadable)."""
    try:
        record = json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("state") in STATES else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def writer(run_dir: Path) -> int | None:
    """The pid of another live process on this host that recorded the run as running, or None.

    ``status.json`` names its writer (pid, host); a run marked running whose process is gone
    was killed and is resumable. A process on another host cannot be checked: it counts as
    gone, as does this process itself."""
    status = read_status(run_dir)
    if status is None or status["state"] != "running":
        return None
    pid = status.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or status.get("host") != socket.gethostname():
        return None
    return pid if _alive(pid) else None


def check_not_in_use(run_dir: Path) -> None:
    """Raises FileExistsError (one line) when another live process is writing ``run_dir``."""
    pid = writer(run_dir)
    if pid is not None:
        raise FileExistsError(
            f"{run_dir} is being written by another pneumojax process (pid {pid}, running); "
            "wait for it to finish, stop it, or choose another --out"
        )


def run_state(run_dir: Path) -> str:
    """``new`` (no config.json), ``finished``, ``failed`` or ``interrupted``.

    A run recorded as running is one whose process was killed, or one still going (which
    :func:`writer` tells apart, and :func:`check_not_in_use` refuses): interrupted, resumable. A folder without ``status.json`` (made by an older
    pneumojax, or killed before it was written) is finished when it holds metrics.json and
    model/manifest.json, else interrupted."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        return "new"
    complete = (run_dir / "metrics.json").exists() and (
        run_dir / "model" / "manifest.json"
    ).exists()
    status = read_status(run_dir)
    if status is None:
        return "finished" if complete else "interrupted"
    if status["state"] == "finished":
        return "finished" if complete else "interrupted"
    return "failed" if status["state"] == "failed" else "interrupted"


def status_error(run_dir: Path) -> str | None:
    """The one-line error of a failed run."""
    status = read_status(run_dir)
    return None if status is None else status.get("error")


def unexpected_entries(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that no pneumojax run writes (symbolic links included)."""
    unexpected = []
    for entry in sorted(Path(run_dir).iterdir()):
        name = entry.name
        if entry.is_symlink():
            unexpected.append(name)
        elif entry.is_dir():
            if not (
                name in RUN_FOLDERS or name.startswith("eval-") or _HIDDEN_FOLDER.fullmatch(name)
            ):
                unexpected.append(name + "/")
        elif not (entry.is_file() and (name in RUN_FILES or _TEMPORARY_FILE.fullmatch(name))):
            unexpected.append(name)
    return unexpected


def check_replaceable(run_dir: Path) -> None:
    """Raises FileExistsError (one line) unless ``run_dir`` is provably a pneumojax run: its
    config.json written by pneumojax, and no file a run does not write."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise FileExistsError(
            f"refusing to replace {run_dir}: its config.json is not a pneumojax run's ({e}); "
            "move the folder away or choose another --out"
        ) from None
    missing = [k for k in CONFIG_KEYS if not isinstance(config, dict) or k not in config]
    if missing:
        raise FileExistsError(
            f"refusing to replace {run_dir}: its config.json lacks {', '.join(missing)}, so it "
            "is not a pneumojax run; move the folder away or choose another --out"
        )
    unexpected = unexpected_entries(run_dir)
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise FileExistsError(
            f"refusing to replace {run_dir}: it holds files no pneumojax run writes: "
            f"{', '.join(unexpected[:5])}{more}; move them out or choose another --out"
        )


def check_run_dir(
    run_dir: Path, resume: bool, overwrite: bool, log: Callable[[str], None] = print
) -> bool:
    """Refuses to mix two runs in one folder; returns whether the run in ``run_dir`` is to be
    replaced (``overwrite``, or a failed run retried), which it checks is provably a pneumojax
    run. Nothing is touched here: the replacement happens once every check has passed."""
    state = run_state(run_dir)
    if state != "new":
        check_not_in_use(run_dir)  # two processes never write one folder, whatever the flags
    if resume:
        if state == "new":
            raise FileNotFoundError(f"--resume: {run_dir} holds no run to continue")
        return False
    if state == "new":
        return False
    if state == "failed" or overwrite:
        check_replaceable(run_dir)
        if state == "failed" and not overwrite:
            log(
                f"{run_dir} holds a failed run ({status_error(run_dir) or 'no error recorded'}): "
                "starting it again (the failed run stays until the new one has its first "
                "checkpoint)"
            )
        return True
    raise FileExistsError(
        f"{run_dir} already holds a run ({state}); pass --resume to continue it, "
        "--overwrite to replace it, or choose another --out"
    )


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run saved a checkpoint (``checkpoints/last/<n>``) it can resume from."""
    last = Path(run_dir) / "checkpoints" / "last"
    try:
        return any(p.name.isdigit() and p.is_dir() for p in last.iterdir())
    except OSError:
        return False


class Replacement:
    """An old run moved aside (``.NAME.old-PID``) while a new one starts in its place.

    :meth:`commit` deletes it (the new run has its config.json and first checkpoint);
    :meth:`settle` after a failure deletes it if the new run got that far, else puts it back.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        aside = self.run_dir.with_name(f".{self.run_dir.name}.old-{os.getpid()}")
        n = 1
        while aside.exists() or aside.is_symlink():  # never onto anything that is there
            aside = self.run_dir.with_name(f".{self.run_dir.name}.old-{os.getpid()}-{n}")
            n += 1
        os.rename(self.run_dir, aside)
        fsync_path(aside.parent)
        self.aside: Path | None = aside

    def commit(self) -> None:
        if self.aside is not None and (self.run_dir / "config.json").exists():
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def settle(self) -> str | None:
        """After the new run failed: ``None`` if the old run is gone (the new one reached its
        first checkpoint), else puts it back and says so (or where it was left)."""
        if self.aside is None:
            return None
        if has_checkpoint(self.run_dir):
            self.commit()
            return None
        if self.run_dir.exists():
            if unexpected_entries(self.run_dir):  # something else wrote there meanwhile
                return f"the previous run is kept in {self.aside}"
            shutil.rmtree(self.run_dir)
        os.rename(self.aside, self.run_dir)
        fsync_path(self.run_dir.parent)
        self.aside = None
        return f"the previous run is back in {self.run_dir}"


def settle_run(
    run_dir: Path, replacement: Replacement | None, state: str, error: str | None, log
) -> None:
    """After a failure or an interrupt: the run's status (in a folder this run started or
    resumed), then the run it replaced deleted or put back (:class:`Replacement`)."""
    if (run_dir / "config.json").exists():
        write_status(run_dir, state, error)
    if replacement is not None:
        note = replacement.settle()
        if note:
            log(note)
