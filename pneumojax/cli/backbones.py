"""The commands about a backbone itself, before any run: ``layers`` (its Keras layer table) and
``port`` (keras.applications weights into a Flax checkpoint)."""

from __future__ import annotations

import click

from pneumojax.backbones import get_backbone, layer_table
from pneumojax.cli.errors import fail
from pneumojax.options import BACKBONES, NON_NEGATIVE, POSITIVE


def _check_input_size(backbone: str, size: int, option: str) -> None:
    info = get_backbone(backbone)
    if size < info.min_input_size:
        raise click.BadParameter(
            f"{backbone} needs an input of at least {info.min_input_size} px, got {size}",
            param_hint=f"'{option}'",
        )


@click.command()
@click.option("--backbone", required=True, type=BACKBONES, help="Backbone name.")
@click.option(
    "--input-size", default=256, show_default=True, type=POSITIVE, help="Input side in px."
)
def layers(backbone: str, input_size: int):
    """List every layer as keras.Model.layers does: index, name, kind, output shape, params."""
    _check_input_size(backbone, input_size, "--input-size")
    info = get_backbone(backbone)
    try:
        rows = layer_table(info, input_size)
    except ValueError as e:
        fail(str(e), 2)
    width = max(len(r["name"]) for r in rows)
    click.echo(f"{'index':>5}  {'name':<{width}}  {'kind':<18}  {'output shape':<22}  params")
    for r in rows:
        shape = "(" + ", ".join("None" if d is None else str(d) for d in r["output_shape"]) + ")"
        click.echo(
            f"{r['index']:>5}  {r['name']:<{width}}  {r['kind']:<18}  {shape:<22}  {r['params']:,}"
        )
    click.echo(
        f"{len(rows)} layers, {sum(r['params'] for r in rows):,} parameters "
        f"(BatchNorm statistics included, as Keras counts them)"
    )


@click.command()
@click.option("--backbone", required=True, type=BACKBONES, help="Backbone name.")
@click.option(
    "--weights",
    default="imagenet",
    show_default=True,
    help="imagenet (Keras downloads them: needs internet), none (Keras's random "
    "init), or a Keras .h5 / .weights.h5 / .keras file.",
)
@click.option("--input-size", default=256, show_default=True, type=POSITIVE)
@click.option(
    "--out", default=None, help="Checkpoint folder [default: checkpoints/BACKBONE-SOURCE]."
)
@click.option(
    "--randomize",
    "randomize_seed",
    type=NON_NEGATIVE,
    default=None,
    metavar="SEED",
    help="Randomize every Keras variable (BatchNorm statistics too) before porting: "
    "a strict parity self-test.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint folder.")
def port(backbone, weights, input_size, out, randomize_seed, overwrite):
    """Port keras.applications weights into Flax, prove parity, save an orbax checkpoint."""
    _check_input_size(backbone, input_size, "--input-size")  # before TensorFlow loads
    from pneumojax.checkpoint import CheckpointError  # noqa: PLC0415
    from ports.keras_port import PortError, port_backbone  # noqa: PLC0415

    try:
        port_backbone(
            get_backbone(backbone),
            weights,
            input_size,
            out,
            randomize_seed,
            overwrite,
            echo=click.echo,
        )
    except (PortError, CheckpointError) as e:
        fail(str(e))
