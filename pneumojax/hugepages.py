"""Transparent huge pages for XLA:CPU's per-step buffers: a glibc setting the ``pneumojax``
command sets for its own process, chosen by measurement.

XLA:CPU allocates a step's temporaries as one block per call (514 MB for the no-ImageNet
recipe's step: DenseNet121, every layer trained, 64 px, batch 32) from a worker thread. glibc
serves a block that large from a fresh ``mmap`` and unmaps it when the call ends, so every step
the kernel maps and zeroes it again in 4 KiB pages: 132,000 page faults a step, 0.45 of the 2
cores spent in the kernel. With the glibc tunable ``glibc.malloc.hugetlb=1`` glibc asks for
transparent huge pages on such blocks (``madvise``), and the same step faults about 1,000 times
(2 MiB pages): 0.52 s a step instead of 0.62-0.68 on this 2-core machine (1.2-1.3x), the same
numbers out. Steps that compute more per byte gain less: at 256 px the faults cost about 5%.

glibc reads its tunables only when a process starts, so the console command re-executes itself
once, before importing anything heavy, with the tunable added to ``GLIBC_TUNABLES``
(:func:`reexec`). It does so only where it can matter: Linux, glibc 2.35 or later (the first with
the tunable), transparent huge pages in ``madvise`` mode (``always`` already gives them, ``never``
refuses them), and a ``GLIBC_TUNABLES`` that does not already set ``glibc.malloc.hugetlb`` (the
user's own value wins). ``PNEUMOJAX_HUGEPAGES=0`` turns it off. Importing pneumojax as a library
changes nothing; start Python with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` for the same effect.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pneumojax import xla_flags

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "PNEUMOJAX_HUGEPAGES"
MARKER = "PNEUMOJAX_REEXECUTED"  # set in the re-executed process: never twice
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library, or None if it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def thp_mode(path: Path = THP_MODE) -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def tunables(
    environ=os.environ,
    platform: str = sys.platform,
    glibc=...,
    mode=...,
) -> str | None:
    """The ``GLIBC_TUNABLES`` value to start with, or None to leave the process as it is.
    ``glibc`` ((major, minor) or None: not glibc) and ``mode`` (the transparent huge page mode,
    None: none) are this machine's unless given."""
    if xla_flags.turned_off(environ, OPT_OUT):
        return None
    if environ.get(MARKER) or not platform.startswith("linux"):
        return None
    given = environ.get("GLIBC_TUNABLES", "")
    if any(part.split("=", 1)[0] == TUNABLE for part in given.split(":") if part):
        return None
    glibc = glibc_version() if glibc is ... else glibc
    if glibc is None or glibc < (2, 35):
        return None
    if (thp_mode() if mode is ... else mode) != "madvise":
        return None
    return ":".join(part for part in (given, f"{TUNABLE}=1") if part)


def reexec() -> None:
    """Replaces this process with the same command line, started with the tunable set, when
    :func:`tunables` says it helps; otherwise returns and the command runs as it is."""
    value = tunables()
    if value is None or not getattr(sys, "orig_argv", None):
        return
    env = {**os.environ, "GLIBC_TUNABLES": value, MARKER: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return  # could not start again: run as it is
