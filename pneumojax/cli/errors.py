"""How a command fails: one line on stderr, ``error: ...``, and its exit status (2 for a usage
error, 1 for anything else), with the wording of the errors the commands share."""

from __future__ import annotations

import sys

import click


def fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def error_text(e: Exception) -> str:
    # KeyError's str() adds quotes around the message.
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


def describe_os_error(e: OSError) -> str:
    import errno  # noqa: PLC0415

    from pneumojax.io import NoSpaceError  # noqa: PLC0415

    if isinstance(e, NoSpaceError):  # a cache that does not fit: its partial files removed
        return str(e)
    if e.errno == errno.ENOSPC:
        return (
            f"disk full while writing {e.filename or 'the run folder'}: free space (or choose "
            "another --out) and continue with --resume; the previous checkpoint is intact"
        )
    return str(e)
