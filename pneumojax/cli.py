"""The ``pneumojax`` command line: a thin layer over library functions."""

from __future__ import annotations

import sys

import click

from pneumojax.backbones import REGISTRY, get_backbone, layer_table

BACKBONES = click.Choice(sorted(REGISTRY))


def _fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group()
def main():
    """Chest X-ray pneumonia classifiers by transfer learning, in JAX/Flax."""


@main.command()
@click.option("--backbone", required=True, type=BACKBONES, help="Backbone name.")
@click.option("--input-size", default=256, show_default=True, type=int, help="Input side in px.")
def layers(backbone: str, input_size: int):
    """List every layer as keras.Model.layers does: index, name, kind, output shape, params."""
    info = get_backbone(backbone)
    try:
        rows = layer_table(info, input_size)
    except ValueError as e:
        _fail(str(e), 2)
    width = max(len(r["name"]) for r in rows)
    click.echo(f"{'index':>5}  {'name':<{width}}  {'kind':<18}  {'output shape':<22}  params")
    for r in rows:
        shape = "(" + ", ".join("None" if d is None else str(d) for d in r["output_shape"]) + ")"
        click.echo(f"{r['index']:>5}  {r['name']:<{width}}  {r['kind']:<18}  {shape:<22}  "
                   f"{r['params']:,}")
    click.echo(f"{len(rows)} layers, {sum(r['params'] for r in rows):,} parameters "
               f"(BatchNorm statistics included, as Keras counts them)")


@main.command()
@click.option("--backbone", required=True, type=BACKBONES, help="Backbone name.")
@click.option("--weights", default="imagenet", show_default=True,
              help="imagenet (Keras downloads them: needs internet), none (Keras's random "
                   "init), or a Keras .h5 / .weights.h5 / .keras file.")
@click.option("--input-size", default=256, show_default=True, type=int)
@click.option("--out", default=None, help="Checkpoint folder [default: checkpoints/BACKBONE-SOURCE].")
@click.option("--randomize", "randomize_seed", type=int, default=None, metavar="SEED",
              help="Randomize every Keras variable (BatchNorm statistics too) before porting: "
                   "a strict parity self-test.")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint folder.")
def port(backbone, weights, input_size, out, randomize_seed, overwrite):
    """Port keras.applications weights into Flax, prove parity, save an orbax checkpoint."""
    from pneumojax.checkpoint import CheckpointError  # noqa: PLC0415
    from ports.keras_port import PortError, port_backbone  # noqa: PLC0415

    try:
        port_backbone(get_backbone(backbone), weights, input_size, out, randomize_seed,
                      overwrite, echo=click.echo)
    except (PortError, CheckpointError) as e:
        _fail(str(e))
