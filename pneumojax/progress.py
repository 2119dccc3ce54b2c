"""Progress output that reads well both on a terminal and in a log file.

On a terminal (stderr is a TTY, or a Jupyter kernel) a phase shows a tqdm bar. Redirected to a
file (CI, nohup, SLURM) a bar would fill the log with carriage-return redraws, so a phase
instead prints one line when it ends (``decoding 128px: 600 images in 3.2 s``) and nothing per
step.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_UNITS = {"img": ("image", "images"), "it": ("step", "steps"), "batch": ("batch", "batches")}


def interactive() -> bool:
    """Whether progress goes to a person watching (bars) rather than to a log (lines)."""
    stream = sys.stderr
    if stream is None:
        return False
    if type(stream).__module__.startswith("ipykernel"):  # a notebook: tqdm.auto draws a widget
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    iterable: Iterable[T],
    desc: str | None = None,
    total: int | None = None,
    unit: str = "it",
    disable: bool = False,
    summary: bool = True,
    **tqdm_options,
):
    """Wraps ``iterable`` like ``tqdm`` on a terminal; otherwise yields the same items and, if
    ``summary`` and not ``disable``, prints one line to stderr when the iteration ends.

    ``summary=False`` suits phases that already log a line of their own (training epochs). The
    returned object supports ``set_postfix``, ``update`` and ``close`` in both cases."""
    if interactive():
        from tqdm.auto import tqdm  # noqa: PLC0415

        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, **tqdm_options)
    return _PhaseLine(iterable, desc, unit, quiet=disable or not summary or desc is None)


def write(line: str) -> None:
    """Prints a log line to stdout, above any bars on a terminal, flushed so a log file that
    someone follows (``tail -f``) is current."""
    if interactive():
        from tqdm.auto import tqdm  # noqa: PLC0415

        tqdm.write(line)
        sys.stdout.flush()
    else:
        print(line, flush=True)


def duration(seconds: float) -> str:
    """``3.2 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class _PhaseLine:
    """The log-file stand-in for a tqdm bar."""

    def __init__(self, iterable, desc, unit, quiet):
        self._iterable, self._desc, self._unit, self._quiet = iterable, desc, unit, quiet

    def __iter__(self) -> Iterator:
        start, n = time.perf_counter(), 0
        for item in self._iterable:
            n += 1
            yield item
        if n and not self._quiet:  # only a phase that ran to its end reports
            one, many = _UNITS.get(self._unit, (self._unit, self._unit))
            print(
                f"{self._desc}: {n:,} {one if n == 1 else many} in "
                f"{duration(time.perf_counter() - start)}",
                file=sys.stderr,
                flush=True,
            )

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
