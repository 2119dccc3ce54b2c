"""The ``pneumojax`` command line: a thin layer over library functions. The group ``main`` and
its ``--version`` live here; each command lives in the module of its kind (training, scoring,
studies, backbones), and how they fail in :mod:`pneumojax.cli.errors`."""

from __future__ import annotations

import click

from pneumojax.cli.backbones import layers, port
from pneumojax.cli.scoring import adapt, evaluate, explain, export, predict, serve
from pneumojax.cli.studies import compare, study
from pneumojax.cli.training import train


def _print_version(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    import platform  # noqa: PLC0415
    from importlib import metadata  # noqa: PLC0415

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    click.echo(
        f"pneumojax {version('pneumojax')} (jax {version('jax')}, jaxlib "
        f"{version('jaxlib')}, flax {version('flax')}, Python {platform.python_version()})"
    )
    ctx.exit()


@click.group()
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the pneumojax, JAX and Flax versions and exit.",
)
def main():
    """Chest X-ray pneumonia classifiers by transfer learning, in JAX/Flax."""
    import logging  # noqa: PLC0415

    import pydicom.config  # noqa: PLC0415, F401  (it sets its logger's level when imported)

    # pydicom logs every frame it cannot decode as an ERROR with its traceback; pneumojax says
    # in one line which file it skipped and why, so the command shows only that.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


COMMANDS = (train, evaluate, adapt, predict, explain, serve, export, compare, study, layers, port)
for command in COMMANDS:
    main.add_command(command)
