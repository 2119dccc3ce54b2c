"""Backbones as lists of Keras-named layer records.

A backbone is the functional graph that ``keras.applications`` builds, written down as
:class:`LayerSpec` records (name, Keras class, inputs, config). :class:`GraphBuilder` hands out
names exactly as a fresh Keras 3 process does (``conv2d``, ``conv2d_1``, ...), and
:func:`keras_layer_order` sorts the records the way ``keras.Model.layers`` lists them, so
indices and names agree with Keras everywhere (cut, trainable ranges, porting, listings).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Sequence

# Keras 3 auto-names a layer after its class in snake case, counting per prefix from 0.
_AUTO_PREFIX = {
    "InputLayer": "input_layer",
    "ZeroPadding2D": "zero_padding2d",
    "Conv2D": "conv2d",
    "BatchNormalization": "batch_normalization",
    "Activation": "activation",
    "MaxPooling2D": "max_pooling2d",
    "AveragePooling2D": "average_pooling2d",
    "Add": "add",
    "Concatenate": "concatenate",
}

# Layer kinds that own variables, and how Keras names them (in Keras's weight order).
KERAS_WEIGHTS = {
    "Conv2D": ("kernel", "bias"),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One Keras layer: its name, Keras class name, input layer names and config."""

    name: str
    kind: str
    inputs: tuple[str, ...]
    config: tuple[tuple[str, Any], ...] = ()

    @property
    def cfg(self) -> dict[str, Any]:
        return dict(self.config)

    @property
    def keras_weight_names(self) -> tuple[str, ...]:
        """The Keras variable names this layer holds, in Keras's order."""
        cfg = self.cfg
        if self.kind == "Conv2D":
            return ("kernel", "bias") if cfg["use_bias"] else ("kernel",)
        if self.kind == "BatchNormalization":
            names = (("gamma",) if cfg["scale"] else ()) + (("beta",) if cfg["center"] else ())
            return names + ("moving_mean", "moving_variance")
        return ()


class GraphBuilder:
    """Records layers in the order Keras code creates them, naming them as Keras would."""

    def __init__(self) -> None:
        self._specs: list[LayerSpec] = []
        self._names: set[str] = set()
        self._counts: collections.Counter[str] = collections.Counter()
        self.input = self._add("InputLayer", (), None, {})

    def _add(self, kind: str, inputs: Sequence[str], name: str | None, cfg: dict) -> str:
        if name is None:
            prefix = _AUTO_PREFIX[kind]
            n = self._counts[prefix]
            self._counts[prefix] += 1
            name = prefix if n == 0 else f"{prefix}_{n}"
        if name in self._names:
            raise ValueError(f"duplicate layer name {name!r}")
        self._names.add(name)
        self._specs.append(LayerSpec(name, kind, tuple(inputs), tuple(sorted(cfg.items()))))
        return name

    # One method per Keras layer class, with Keras's defaults.
    def conv(self, x, filters, kernel, strides=1, padding="valid", use_bias=True, name=None):
        return self._add(
            "Conv2D",
            [x],
            name,
            dict(
                filters=filters,
                kernel=_pair(kernel),
                strides=_pair(strides),
                padding=padding,
                use_bias=use_bias,
            ),
        )

    def bn(self, x, epsilon=1e-3, scale=True, center=True, name=None):
        return self._add(
            "BatchNormalization",
            [x],
            name,
            dict(epsilon=epsilon, scale=scale, center=center, momentum=0.99),
        )

    def act(self, x, activation="relu", name=None):
        return self._add("Activation", [x], name, dict(activation=activation))

    def zero_pad(self, x, pad, name=None):
        return self._add("ZeroPadding2D", [x], name, dict(padding=(_pair(pad), _pair(pad))))

    def _pool(self, kind, x, pool, strides, padding, name):
        strides = strides if strides is not None else pool  # Keras: strides default to pool
        return self._add(
            kind, [x], name, dict(pool=_pair(pool), strides=_pair(strides), padding=padding)
        )

    def max_pool(self, x, pool, strides=None, padding="valid", name=None):
        return self._pool("MaxPooling2D", x, pool, strides, padding, name)

    def avg_pool(self, x, pool, strides=None, padding="valid", name=None):
        return self._pool("AveragePooling2D", x, pool, strides, padding, name)

    def add(self, xs, name=None):
        return self._add("Add", xs, name, {})

    def concat(self, xs, name=None):
        return self._add("Concatenate", xs, name, {})

    def build(self, output: str | None = None) -> tuple[LayerSpec, ...]:
        """Returns the layers in ``keras.Model.layers`` order, ending at ``output``."""
        return keras_layer_order(self._specs, output or self._specs[-1].name)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def keras_layer_order(specs: Iterable[LayerSpec], output: str) -> tuple[LayerSpec, ...]:
    """Orders layers as Keras 3's ``Functional.layers`` does.

    Keras walks the graph depth-first from the output (inputs in call order), gives each layer
    a depth (the longest path from it to the output), and lists layers by decreasing depth,
    breaking ties by first-visit order of that walk (``keras/src/ops/function.py: map_graph``).
    """
    by_name = {s.name: s for s in specs}
    visit_index: dict[str, int] = {}
    post_order: list[str] = []
    # Iterative DFS equal to Keras's recursive one: pre-order on entry, post-order on exit.
    stack: list[tuple[str, bool]] = [(output, False)]
    while stack:
        name, exiting = stack.pop()
        if exiting:
            post_order.append(name)
            continue
        if name in visit_index:
            continue
        visit_index[name] = len(visit_index)
        stack.append((name, True))
        stack.extend((inp, False) for inp in reversed(by_name[name].inputs))
    depth: dict[str, int] = {}
    for name in reversed(post_order):
        d = depth.setdefault(name, 0)
        for inp in by_name[name].inputs:
            depth[inp] = max(depth.get(inp, 0), d + 1)
    order = sorted(post_order, key=lambda n: (-depth[n], visit_index[n]))
    return tuple(by_name[n] for n in order)


def ancestors(
    specs: Sequence[LayerSpec], outputs: Iterable[str], given: Iterable[str] = ()
) -> set[str]:
    """Names of the layers needed to compute ``outputs`` (outputs included), not looking
    past the layers in ``given`` (whose values are supplied)."""
    by_name = {s.name: s for s in specs}
    given = set(given)
    need: set[str] = set()
    todo = list(outputs)
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            if n not in given:
                todo.extend(by_name[n].inputs)
    return need


def gradient_flow(
    specs: Sequence[LayerSpec], outputs: Iterable[str], trainable: Iterable[str]
) -> dict[str, bool]:
    """For each needed layer: does its output depend on a trainable layer?"""
    need, trainable = ancestors(specs, outputs), set(trainable)
    flows: dict[str, bool] = {}
    for s in specs:  # Keras order is topological
        if s.name in need:
            flows[s.name] = s.name in trainable or any(flows[i] for i in s.inputs)
    return flows


def frozen_frontier(
    specs: Sequence[LayerSpec], output: str, trainable: Iterable[str]
) -> tuple[str, ...]:
    """The frozen layers whose outputs feed the trainable part (or the head, at the cut).

    Their values do not change during training, so they can be computed once per image.
    """
    flows = gradient_flow(specs, [output], trainable)
    frontier = [output] if not flows[output] else []
    for s in specs:
        if flows.get(s.name):
            frontier += [i for i in s.inputs if not flows[i]]
    return tuple(sorted(set(frontier), key=[s.name for s in specs].index))
