"""Shapes, parameter counts and the ``pneumojax layers`` table, computed abstractly."""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .network import KerasGraph
from .registry import BackboneInfo


def backbone_model(
    info: BackboneInfo,
    outputs: Iterable[str] | None = None,
    trainable: Iterable[str] = (),
    dtype=jnp.float32,
    given: Iterable[str] = (),
) -> KerasGraph:
    """The Flax module for ``info`` returning the named layer outputs (default: last layer)."""
    outputs = tuple(outputs) if outputs is not None else (info.layers[-1].name,)
    for name in outputs:
        info.check_layer(name)
    return KerasGraph(info.layers, outputs, frozenset(trainable), dtype, tuple(given))


def init_shapes(model: KerasGraph, input_size: int):
    """Variable and output shapes of ``model`` at ``input_size`` without computing anything."""
    x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    outputs = jax.eval_shape(model.apply, variables, x)
    return variables, outputs


def layer_table(info: BackboneInfo, input_size: int = 256) -> list[dict]:
    """One row per layer, as ``keras.Model.layers`` lists them.

    Parameter counts include BatchNorm moving statistics, as Keras's ``count_params`` does.
    """
    if input_size < info.min_input_size:
        raise ValueError(
            f"{info.name} needs an input size of at least {info.min_input_size} px, "
            f"got {input_size}"
        )
    model = backbone_model(info, outputs=[s.name for s in info.layers])
    variables, outputs = init_shapes(model, input_size)
    counts: dict[str, int] = {}
    for collection in variables.values():
        for layer, leaves in collection.items():
            counts[layer] = counts.get(layer, 0) + sum(
                int(np.prod(v.shape)) for v in jax.tree.leaves(leaves)
            )
    return [
        dict(
            index=i,
            name=s.name,
            kind=s.kind,
            output_shape=(None,) + tuple(outputs[s.name].shape[1:]),
            params=counts.get(s.name, 0),
        )
        for i, s in enumerate(info.layers)
    ]
